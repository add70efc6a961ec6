"""Synthetic collection benchmark: generation speed, peak memory and file size per scale.

Each scale runs in a fresh Python process that writes the collection to an .h5ad in blocks
(``synthesize(out=...)``) and reports its own peak RSS, so the numbers do not leak between runs.
Prints one table: scale, cells, genes, seconds, cells/s, peak RSS, file size, zeros.

With ``--signal`` it instead runs the planted-signal check at one scale: log-normalise, PCA,
logistic regression; AUROC of pooled 5-fold (cell level and grouped by sample) and of
leave-one-study-out.

Usage:
    python benchmarks/bench_synth.py [--scales 0.01,0.1,1.0] [--genes 2000] [--workdir /tmp/scdm-bench-synth]
    python benchmarks/bench_synth.py --signal [--scale 0.01]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))  # `import scdm` without installing it


def run_one(scale: float, n_genes: int, out: Path, block_cells: int, compression: str | None) -> dict:
    """Generate one collection in this process and measure it."""
    import h5py

    from scdm.classify.synth import synthesize

    t0 = time.perf_counter()
    synthesize(scale, n_genes=n_genes, out=out, overwrite=True, block_cells=block_cells, compression=compression)
    seconds = time.perf_counter() - t0
    with h5py.File(out, "r") as f:
        n_cells, n_vars = (int(v) for v in f["X"].attrs["shape"])
        nnz = int(f["X/data"].shape[0])
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "scale": scale, "cells": n_cells, "genes": n_vars, "seconds": seconds, "cells_per_s": n_cells / seconds,
        "peak_rss_mb": peak_kb / 1024, "file_mb": out.stat().st_size / 2**20, "zeros": 1 - nnz / (n_cells * n_vars),
    }


def bench(scales: list[float], n_genes: int, workdir: Path, block_cells: int, compression: str | None) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for scale in scales:
        out = workdir / f"synth_{scale:g}.h5ad"
        cmd = [sys.executable, __file__, "--one", str(scale), "--genes", str(n_genes), "--out", str(out),
               "--block-cells", str(block_cells), "--compression", compression or "none"]
        result = subprocess.run(cmd, check=True, capture_output=True, text=True)
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
        out.unlink(missing_ok=True)
    shutil.rmtree(workdir, ignore_errors=True)
    header = f"{'scale':>7} {'cells':>9} {'genes':>6} {'seconds':>8} {'cells/s':>9} {'peak RSS MB':>12} {'file MB':>8} {'zeros':>6}"
    print(f"synthesize(out=...) in blocks of {block_cells} cells, compression={compression}")
    print(header)
    for r in rows:
        print(f"{r['scale']:>7g} {r['cells']:>9,} {r['genes']:>6} {r['seconds']:>8.1f} {r['cells_per_s']:>9,.0f} "
              f"{r['peak_rss_mb']:>12.0f} {r['file_mb']:>8.1f} {r['zeros']:>6.3f}")


def signal_check(scale: float, n_genes: int, n_pcs: int = 50, seed: int = 0) -> dict[str, float]:
    """AUROC of log-normalise + PCA + logistic regression: pooled vs leave-one-study-out."""
    import scipy.sparse as sp
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    from scdm.classify.synth import synthesize

    adata = synthesize(scale, n_genes=n_genes, seed=seed)
    x = adata.X.astype(np.float64)
    x = sp.diags(1e4 / np.maximum(np.asarray(x.sum(axis=1)).ravel(), 1)) @ x
    x.data = np.log1p(x.data)
    z = PCA(n_pcs, random_state=0).fit_transform(x.toarray())
    y = (adata.obs["response"] == "sensitive").to_numpy().astype(int)
    study = adata.obs["study"].astype(str).to_numpy()
    sample = adata.obs["sample"].astype(str).to_numpy()

    def fit_predict(train: np.ndarray, test: np.ndarray) -> np.ndarray:
        model = LogisticRegression(max_iter=2000).fit(z[train], y[train])
        return model.predict_proba(z[test])[:, 1]

    pooled, grouped, cross = (np.zeros(len(y)) for _ in range(3))
    for train, test in StratifiedKFold(5, shuffle=True, random_state=0).split(z, y):
        pooled[test] = fit_predict(train, test)
    for train, test in StratifiedGroupKFold(5, shuffle=True, random_state=0).split(z, y, sample):
        grouped[test] = fit_predict(train, test)
    per_study, pooled_per_study = [], []
    for s in np.unique(study):
        test = study == s
        cross[test] = fit_predict(~test, test)
        if len(np.unique(y[test])) == 2:
            per_study.append(roc_auc_score(y[test], cross[test]))
            pooled_per_study.append(roc_auc_score(y[test], pooled[test]))
    return {
        "cells": len(y), "genes": adata.n_vars,
        "pooled 5-fold (cell level)": roc_auc_score(y, pooled),
        "pooled 5-fold (grouped by sample)": roc_auc_score(y, grouped),
        "leave-one-study-out (all held-out cells)": roc_auc_score(y, cross),
        "pooled, mean per-study AUROC": float(np.mean(pooled_per_study)),
        "leave-one-study-out, mean per-study AUROC": float(np.mean(per_study)),
        "studies scored": len(per_study),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scales", default="0.01,0.1,1.0")
    parser.add_argument("--genes", type=int, default=2000)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "scdm-bench-synth")
    parser.add_argument("--block-cells", type=int, default=16_384)
    parser.add_argument("--compression", default="gzip", choices=["gzip", "lzf", "none"])
    parser.add_argument("--signal", action="store_true", help="run the planted-signal check instead")
    parser.add_argument("--scale", type=float, default=0.01, help="scale of the signal check")
    parser.add_argument("--one", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    compression = None if args.compression == "none" else args.compression
    if args.one is not None:
        print(json.dumps(run_one(args.one, args.genes, args.out, args.block_cells, compression)))
    elif args.signal:
        for name, value in signal_check(args.scale, args.genes).items():
            print(f"{name:<45} {value:.3f}" if isinstance(value, float) else f"{name:<45} {value}")
    else:
        bench([float(s) for s in args.scales.split(",")], args.genes, args.workdir, args.block_cells, compression)


if __name__ == "__main__":
    main()
