"""Memory benchmark: peak RSS of ``scdm evaluate`` against the matrix it reads (issue 19 point 4).

Builds a synthetic store through the public API (``Store.ingest`` + ``create_embedding`` /
``Embedding.writer``): one dataset of ``--cells`` cells (4 studies, 20 samples, labels with a
planted direction) and one float32 embedding of ``--dim`` dimensions (default 100,000 x 512 =
195 MiB). Then, for each head, runs ``python -m scdm --store S evaluate --head H ...`` in a child
process and reads its peak RSS with ``/usr/bin/time -v`` (maximum resident set size).

The interpreter's floor is the peak RSS of the same command on a store of the same shape with
1,000 cells (imports, DuckDB, the evaluation machinery; its matrix is 2 MiB). The table shows
``(peak - floor) / matrix``; the goal is <= 1.5.

Usage: python benchmarks/bench_memory.py [--cells 100000] [--dim 512] [--heads logreg,ridge]
           [--grid "--scenario pooled,cross --by all --folds 5"] [--workdir /tmp/scdm-bench-memory]
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))  # `import scdm` without installing it

from scdm.store import Store  # noqa: E402

GOAL = 1.5


def build(root: Path, n: int, dim: int, seed: int = 0) -> float:
    """A store with one labelled dataset of ``n`` cells and one ``dim``-wide embedding; its MiB."""
    import anndata as ad
    import scipy.sparse as sp

    from scdm.store.genes import gene_table

    shutil.rmtree(root, ignore_errors=True)
    st = Store(root)
    rng = np.random.default_rng(seed)
    genes = gene_table()["symbol"].drop_duplicates().iloc[:8].tolist()
    sample = rng.integers(0, 20, n)
    response = np.where(sample % 2 == 0, "sensitive", "resistant")  # labels per sample, as in scDrugMap
    obs = pd.DataFrame({"response": response, "sample": [f"s{s}" for s in sample], "study": [f"st{s % 4}" for s in sample]},
                       index=[f"c{i}" for i in range(n)])
    x = sp.random(n, len(genes), density=0.3, format="csr", random_state=seed, data_rvs=lambda k: rng.integers(1, 20, k))
    st.ingest(ad.AnnData(X=x.astype(np.float32), obs=obs, var=pd.DataFrame(index=genes)), name="mem",
              label_key="response", positive="sensitive", sample_key="sample", study_key="study")
    emb = st.create_embedding("mem", model="synthetic", params={"dim": dim}, dim=dim)
    direction = rng.standard_normal(dim).astype(np.float32) / np.sqrt(dim)
    y = (response == "sensitive").astype(np.float32)
    with emb.writer() as w:
        for c in range(emb.n_chunks):
            lo, hi = emb.chunk_bounds(c)
            block = rng.standard_normal((hi - lo, dim), dtype=np.float32)
            block += np.outer(2 * y[lo:hi] - 1, direction)
            w.write(c, block)
    emb.finalize()
    return n * dim * 4 / 2**20


def peak_rss_mib(store: Path, head: str, grid: str) -> float:
    """Peak RSS (MiB) of ``scdm evaluate --head HEAD`` on ``store`` (a child process, /usr/bin/time -v)."""
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "scdm", "--store", str(store), "evaluate", "--head", head,
           *shlex.split(grid)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    found = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    if proc.returncode != 0 or found is None:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return int(found.group(1)) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--heads", default="logreg,ridge")
    ap.add_argument("--grid", default="--scenario pooled,cross --by all --folds 5", help="further evaluate options")
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "scdm-bench-memory"))
    args = ap.parse_args()
    work = Path(args.workdir)
    big, small = work / "big", work / "small"
    matrix = build(big, args.cells, args.dim)
    build(small, 1000, args.dim)
    rows = []
    for head in args.heads.split(","):
        floor = peak_rss_mib(small, head, args.grid)
        peak = peak_rss_mib(big, head, args.grid)
        ratio = (peak - floor) / matrix
        rows.append({"head": head, "matrix_MiB": matrix, "floor_MiB": floor, "peak_MiB": peak,
                     "(peak-floor)/matrix": ratio, "goal": GOAL, "met": "yes" if ratio <= GOAL else "NO"})
    print(f"scdm evaluate {args.grid}; {args.cells:,} cells x {args.dim} float32; floor = peak RSS of the same "
          f"command on 1,000 cells; load {os.getloadavg()[0]:.2f}")
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
