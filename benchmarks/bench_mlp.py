"""MLP head benchmark: time per epoch against the FLOP floor of its precision (issue 19 point 5).

Prints ONE table, one row per configuration (profile, precision, batch size):
  - ``s/epoch``     median seconds of one training epoch of :class:`MLPHead`: a fit of ``1 + --epochs``
                    epochs minus a fit of 1 epoch, over ``--epochs`` (no early stopping; the fit's fixed
                    costs such as the input statistics cancel out); ``--rounds`` such pairs
  - ``peak_GFLOP/s`` the best rate of a square ``torch.mm`` of 2048 over all rounds (measured next to each fit)
  - ``floor_s``     the epoch's matmul FLOPs / ``peak_GFLOP/s`` of that precision
  - ``ratio``       s/epoch / floor_s; goal 1.3
  - ``AUROC``       mean test AUROC over the same ``--folds`` folds (full fits with the profile's
                    early stopping), fp32 and bf16 side by side; ``fold sd`` is the spread over folds

FLOPs of one training cell (D inputs, H hidden, k outputs): forward ``2 (D H + H H + H k)``,
backward ``2 D H`` (weights of the first layer only: the input needs no gradient) ``+ 4 (H H + H k)``.

Usage: python benchmarks/bench_mlp.py [--cells 40000] [--dim 512] [--epochs 2] [--rounds 3] [--folds 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))  # `import scdm` without installing it

from scdm.classify.heads import MLPHead, bf16_supported  # noqa: E402

GOAL = 1.3
CONFIGS = [("fast", "fp32", None), ("fast", "bf16", None), ("default", "fp32", 512)]
"""(profile, precision, batch size or the profile's): the fast profile in both precisions, and the default one."""


def matmul_rate(dtype: object, n: int = 2048, reps: int = 3) -> float:
    """FLOP/s of one square ``torch.mm`` in ``dtype`` (the best of ``reps``)."""
    import torch

    a = torch.randn(n, n).to(dtype)  # type: ignore[arg-type]
    b = torch.randn(n, n).to(dtype)  # type: ignore[arg-type]
    torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def _verdict(ratio: float) -> str:
    """Met or not; a ratio under 0.8 (faster than the measured matmul peak) is timing noise, not a result."""
    if ratio < 0.8:
        return "noise: raise --cells/--epochs"
    return "yes" if ratio <= GOAL else "NO"


def epoch_flops(n_train: int, dim: int, hidden: int, outputs: int) -> float:
    forward = 2 * (dim * hidden + hidden * hidden + hidden * outputs)
    backward = 2 * dim * hidden + 4 * (hidden * hidden + hidden * outputs)
    return float(n_train) * (forward + backward)


def synthetic(n: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Cells with a label direction plus a non-linear (XOR-like) part, so that the MLP has something to learn."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, dim), dtype=np.float32)
    score = X[:, :8].sum(axis=1) / np.sqrt(8) + 0.8 * np.sign(X[:, 8] * X[:, 9]) + rng.standard_normal(n)
    return X, (score > 0).astype(np.int8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", type=int, default=40_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--epochs", type=int, default=2, help="epochs per timed fit")
    ap.add_argument("--rounds", type=int, default=3, help="timed fits per configuration (interleaved); medians")
    ap.add_argument("--folds", type=int, default=5, help="folds of the AUROC comparison (0: skip it)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on a shared machine, threads waiting for a busy core dominate)")
    args = ap.parse_args()
    import torch
    from sklearn.metrics import roc_auc_score

    torch.set_num_threads(args.threads)
    X, y = synthetic(args.cells, args.dim)
    rates: dict[str, list[float]] = {"fp32": [], "bf16": []}
    times: dict[tuple[str, str, int | None], list[float]] = {c: [] for c in CONFIGS}
    n_train: dict[tuple[str, str, int | None], int] = {}
    for profile, precision, batch in CONFIGS:  # warm-up: the first fit pays one-time kernel and thread-pool setup
        MLPHead(profile, precision=precision, epochs=1, early_stopping=False, min_steps=0,  # type: ignore[arg-type]
                batch_size=batch).fit(X[:2048], y[:2048])
    for _ in range(args.rounds):
        for config in CONFIGS:
            profile, precision, batch = config
            rates[precision].append(matmul_rate(torch.float32 if precision == "fp32" else torch.bfloat16))
            spent = []
            for epochs in (1, 1 + args.epochs):  # the difference: epochs alone, without the fit's fixed costs
                head = MLPHead(profile, precision=precision, epochs=epochs, early_stopping=False, min_steps=0,  # type: ignore[arg-type]
                               batch_size=batch)
                t0 = time.perf_counter()
                head.fit(X, y)
                spent.append(time.perf_counter() - t0)
            times[config].append((spent[1] - spent[0]) / args.epochs)
            n_train[config] = head.n_train_
    aurocs: dict[str, list[float]] = {"fp32": [], "bf16": []}
    folds = np.arange(args.cells) % max(args.folds, 1)
    for k in range(args.folds):
        test = folds == k
        for precision in aurocs:
            head = MLPHead("fast", precision=precision).fit(X[~test], y[~test])  # type: ignore[arg-type]
            aurocs[precision].append(float(roc_auc_score(y[test], head.proba_sensitive(X[test]))))
    rows = []
    for config in CONFIGS:
        profile, precision, batch = config
        head = MLPHead(profile, precision=precision, batch_size=batch)  # type: ignore[arg-type]
        flops = epoch_flops(n_train[config], args.dim, head.hidden, 1)
        floor = flops / max(rates[precision])
        per_epoch = statistics.median(times[config])
        row = {"profile": profile, "precision": precision, "batch": batch or MLPHead(profile).resolved()["batch_size"],
               "s/epoch": per_epoch, "GFLOP/epoch": flops / 1e9, "peak_GFLOP/s": max(rates[precision]) / 1e9,
               "floor_s": floor, "ratio": per_epoch / floor, "goal": GOAL, "met": _verdict(per_epoch / floor)}
        if args.folds and profile == "fast":
            row["AUROC"] = statistics.mean(aurocs[precision])
            row["fold sd"] = statistics.stdev(aurocs[precision]) if args.folds > 1 else float("nan")
        rows.append(row)
    print(f"MLPHead, {args.cells:,} cells x {args.dim}, {args.threads} torch threads, bf16 native: {bf16_supported()}; "
          f"medians of {args.rounds} interleaved rounds ({args.epochs} epochs each); AUROC: {args.folds} folds, same cells; "
          f"load {os.getloadavg()[0]:.2f}")
    if args.folds:
        diffs = np.subtract(aurocs["bf16"], aurocs["fp32"])
        print(f"AUROC bf16 - fp32 per fold: {', '.join(f'{d:+.4f}' for d in diffs)}")
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    main()
