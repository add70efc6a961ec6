"""Feeding the device: tokenisation overlapped with the forward pass by the runner's workers (issue 19, point 7).

On a GPU the forward pass uses the device, not the CPU, so the runner can tokenise the next chunks
in worker processes (``--workers``; 2 by default on CUDA) while the model runs. Whether that keeps
the device busy depends on the CPU side alone: tokenising, collating, the store's reads and writes.
This benchmark measures that CPU side on any machine. It runs ``scdm.embedding.runner.embed`` end to
end (real store, real scGPT tokeniser on synthetic counts, real collate and chunk writes) with the
model's forward pass replaced by a device stand-in: it sleeps ``1 / --device-cells-per-s`` per cell
and uses no CPU, as a GPU kernel does. The default rate, 2,676 cells/s, is scGPT's measured forward
pass on an H200 (``benchmarks/results/bench_embed_gpu_h200_2026-12-04_after.md``), the fastest
published-size model there relative to its tokeniser.

Prints ONE table, a row per ``--workers`` value: wall time, cells/s end to end, the share of the wall
time the stand-in device was busy (its sleep time over the wall time), and cells/s against inline
tokenisation (``workers`` 0). Goal (ours): the device busy >= 90 % with the CUDA default of 2 workers.
The first chunk cannot overlap with anything, so fewer, larger chunks lower the ceiling; the
default 16 chunks of 1,024 cells leave at most ~1/16 to it.

Usage: python benchmarks/bench_feed.py [--cells 16384] [--chunk-rows 1024] [--device-cells-per-s 2676] [--workers 0,1,2]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))  # `import scdm` without installing it
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_embed import synthetic_counts, synthetic_genes  # noqa: E402

BUSY_GOAL = 0.90
CUDA_DEFAULT_WORKERS = 2  # runner.TOKENISE_WORKERS_CUDA, checked in main()


def device_standin(cells_per_s: float, busy: list[float]) -> Any:
    """A replacement for ``ScGPTAdapter.embed``: sleeps per cell (no CPU used), returns unit vectors."""
    import torch

    def embed(self: Any, batch: dict[str, Any]) -> torch.Tensor:
        n = int(batch["input_ids"].shape[0])
        seconds = n / cells_per_s
        time.sleep(seconds)
        busy.append(seconds)
        return torch.full((n, self.emb_dim), self.emb_dim ** -0.5)

    return embed


def tokenise_rate(st: Any, dataset: str, ckpt: Path, n: int) -> float:
    """Cells/s of the scGPT tokeniser in this process, on the first ``n`` cells."""
    from scdm.embedding import get_adapter

    adapter = get_adapter("scgpt")(checkpoint=ckpt)
    adapter.prepare(st.genes(dataset)["gene_id"].astype(str).tolist(), gene_id_kind="symbol")
    x = st.open_anndata(dataset, backed=True).X[:n]
    import scipy.sparse as sp

    x = sp.csr_matrix(x)
    t0 = time.perf_counter()
    adapter.tokenize(x, np.arange(n))
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", type=int, default=16_384)
    ap.add_argument("--chunk-rows", type=int, default=1024, help="cells per stored chunk (the runner's default on real data: 4,096 for scGPT)")
    ap.add_argument("--device-cells-per-s", type=float, default=2676.0, help="the stand-in device's rate (default: scGPT, H200)")
    ap.add_argument("--workers", default="0,1,2", help="comma-separated --workers values, one row each")
    ap.add_argument("--batch-size", type=int, default=256, help="cells per forward pass (the runner's CUDA default for scGPT)")
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "scdm-bench-feed"))
    args = ap.parse_args()

    import anndata as ad

    from scdm.embedding import runner
    from scdm.embedding.models import scgpt
    from scdm.store import Store

    assert runner.TOKENISE_WORKERS_CUDA == CUDA_DEFAULT_WORKERS, "update CUDA_DEFAULT_WORKERS"
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    genes = synthetic_genes(20_000, seed=0)
    counts = synthetic_counts(args.cells, len(genes), seed=1)
    ckpt = scgpt.write_tiny_checkpoint(work / "scgpt", genes=genes)
    st = Store(work / "store")
    ds = st.ingest(ad.AnnData(X=counts, obs=pd.DataFrame(index=[f"c{i}" for i in range(args.cells)]), var=pd.DataFrame(index=genes)),
                   name="feed")
    one_process = tokenise_rate(st, ds.dataset_id, ckpt, min(2048, args.cells))

    busy: list[float] = []
    scgpt.ScGPTAdapter.embed = device_standin(args.device_cells_per_s, busy)  # type: ignore[method-assign]
    rows = []
    for workers in (int(w) for w in args.workers.split(",")):
        busy.clear()
        t0 = time.perf_counter()
        result = runner.embed(st, "feed", "scgpt", ckpt, workers=workers, device="cpu", precision="fp32", batch_size=args.batch_size,
                              chunk_rows=args.chunk_rows, progress=False)
        wall = time.perf_counter() - t0  # the whole call: model load, claims, every chunk, finalize
        st.remove_embedding(result.embedding_id)
        default = workers == CUDA_DEFAULT_WORKERS
        loop = float(result.telemetry["wall_s"])  # the chunk loop: tokenise, forward, write (no model load, no finalize)
        rows.append({"workers": f"{workers}{' (CUDA default)' if default else ''}", "wall_s": wall, "loop_s": loop,
                     "cells_per_s": args.cells / wall, "device_busy": sum(busy) / wall, "busy_in_loop": sum(busy) / loop,
                     "goal": f">={BUSY_GOAL:.0%}" if default else "-", "met": ("yes" if sum(busy) / wall >= BUSY_GOAL else "NO") if default else "-"})
    inline = rows[0]["cells_per_s"] if args.workers.split(",")[0] == "0" else None
    for r in rows:
        r["x_inline"] = r["cells_per_s"] / inline if inline else float("nan")
    pd.set_option("display.width", 200)
    print(f"{args.cells} cells in chunks of {args.chunk_rows}, batches of {args.batch_size}; device stand-in at "
          f"{args.device_cells_per_s:,.0f} cells/s (floor {args.cells / args.device_cells_per_s:.2f} s); "
          f"scGPT tokeniser, one process: {one_process:,.0f} cells/s")
    print(pd.DataFrame(rows)[["workers", "wall_s", "loop_s", "cells_per_s", "x_inline", "device_busy", "busy_in_loop", "goal", "met"]]
          .to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
