"""Heads benchmark: the evaluation grid on a synthetic collection shaped like scDrugMap's.

The collection copies the shape of scDrugMap's 36 primary datasets (``benchmarks/data/``, see its
PROVENANCE.md): cells per dataset and their sensitive share (from the per-regimen counts; datasets
sharing a regimen row split it evenly; Data19, which has no regimen, gets the remainder of its
cancer type), study (``Original_Dataset``), tissue, cancer type, drug type, regimen and number of
samples (labels constant within a sample, as in the real data). Embeddings are random N(0, 1)
float32 vectors plus a study offset and a weak label direction, so heads have something to learn.
Everything goes through the store and :func:`scdm.classify.evaluate` (ingest, embedding write,
split build, catalog writes of results and per-cell predictions).

Prints one table:
  - ``ridge folds`` and ``logreg folds``: the K folds of one pooled split fitted by scdm (ridge: one
    pass of Gram statistics, downdates and one-thread Cholesky solves side by side; logreg: every
    fold's L-BFGS in one batch, each fold at its own pace, sharing each pass over the rows; the
    grid also solves a category's pooled and cross-data splits in one batch) against scikit-learn fitting the same folds one by one with the same
    settings (``RidgeClassifier`` on the globally scaled inputs, ``LogisticRegression(lbfgs)`` on each
    fold's standardised inputs), with the ratio scdm / scikit-learn beside its goal (<= 0.2x) and
    the test AUROC of both (they solve the same problems, so these agree).
  - ``ridge`` and ``logreg``: wall time of the whole pooled (5 category types x 10 folds) +
    cross-data (leave-one-study-out) grid for one embedding. Targets at full scale (326,751 cells,
    D=3072): ridge <= 5 min, logreg <= 5 min (issue #19, 2 cores).
  - ``mlp default``: one fit of the default MLP profile (batch and learning rate from the fold,
    at least 500 steps, early stopping on 10% of the training cells) vs its FLOP floor (training
    matmul FLOPs of the epochs it ran / this machine's matmul rate in the fit's precision, measured
    on the same layer shapes and batch with the same number of threads, in this process, just
    after: fp32, or bf16 for the fast profile where the CPU runs bf16 natively), with one thread and
    with every core. Target <= 1.3x. ``mlp paper`` (scDrugMap's code: batch 128, fp32,
    10 epochs) and ``mlp fast`` for comparison.

Usage: python benchmarks/bench_heads.py [--scale 0.05] [--dim 3072] [--heads ridge,logreg]
           [--mlp-cells 20000] [--workdir bench-out/bench_heads] [--jobs 1] [--fold-cells 20000] [--folds 10]
``--scale 1`` is the full 326,751-cell collection (needs ~4 GB per copy of the matrix in memory).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))  # `import scdm` without installing it

from scdm.classify.grid import evaluate  # noqa: E402
from scdm.classify.heads import get_head, mlp_train_flops  # noqa: E402
from scdm.store import Store  # noqa: E402

DATA = Path(__file__).resolve().parent.parent / "src" / "scdm" / "classify" / "_data"
"""scDrugMap's real dataset and category tables (the copy the package ships; benchmarks/data has the same files)."""


# ---------------------------------------------------------------------------------------------
# the synthetic collection
# ---------------------------------------------------------------------------------------------
def collection_shape() -> pd.DataFrame:
    """One row per scDrugMap primary dataset: cells, sensitive cells, samples and categories."""
    datasets = pd.read_csv(DATA / "datasets.tsv", sep="\t")
    datasets = datasets[datasets["Collections"] == "Primary collection"].copy()
    counts = pd.read_csv(DATA / "category_counts.tsv", sep="\t")
    counts = counts[counts["Collections"] == "Main collection"]
    cells: dict[str, float] = {}
    sensitive: dict[str, float] = {}
    for row in counts[counts["Maintask"] == "Regimen"].itertuples():
        members = [m.strip() for m in row.scDrugMap_collection_series_number.split(",")]
        for m in members:
            cells[m] = row.samples / len(members)
            sensitive[m] = row.sensitive / len(members)
    # Datasets without a regimen row (Data19) get the rest of their cancer type.
    for row in datasets.itertuples():
        name = row.scDrugMap_collection_series_number
        if name in cells:
            continue
        cancer = counts[(counts["Maintask"] == "Cancer_type") & (counts["Subtask"] == row.Cancer_type_level1)].iloc[0]
        known = datasets[(datasets["Cancer_type_level1"] == row.Cancer_type_level1)
                         & datasets["scDrugMap_collection_series_number"].isin(list(cells))]
        ids = list(known["scDrugMap_collection_series_number"])
        cells[name] = cancer.samples - sum(cells[i] for i in ids)
        sensitive[name] = cancer.sensitive - sum(sensitive[i] for i in ids)
    datasets["n_cells"] = datasets["scDrugMap_collection_series_number"].map(cells).round().astype(int)
    datasets["n_sensitive"] = datasets["scDrugMap_collection_series_number"].map(sensitive).round().astype(int)
    return datasets.rename(columns={"scDrugMap_collection_series_number": "dataset", "Original_Dataset": "study",
                                    "Tissue": "tissue", "Cancer_type_level1": "cancer_type", "Drug_type": "drug_type",
                                    "Regimen": "regimen", "Sample_size_all": "n_samples"})[
        ["dataset", "study", "tissue", "cancer_type", "drug_type", "regimen", "n_samples", "n_cells", "n_sensitive"]]


def build_store(root: Path, shape: pd.DataFrame, scale: float, dim: int, seed: int = 0) -> tuple[Store, int]:
    """Ingest the synthetic datasets and write one embedding space; returns (store, n_cells)."""
    import anndata as ad
    import scipy.sparse as sp

    from scdm.store.genes import gene_table

    if root.exists():
        shutil.rmtree(root)
    st = Store(root)
    rng = np.random.default_rng(seed)
    genes = gene_table()["symbol"].drop_duplicates().iloc[:20].tolist()
    label_direction = rng.standard_normal(dim).astype(np.float32)
    label_direction /= np.linalg.norm(label_direction)
    total = 0
    for row in shape.itertuples():
        n = max(int(round(row.n_cells * scale)), 4)
        n_pos = min(max(int(round(row.n_sensitive * scale)), 1), n - 1)
        response = np.array(["sensitive"] * n_pos + ["resistant"] * (n - n_pos))
        # Samples hold one class each (labels are per sample in scDrugMap).
        n_samples = max(int(row.n_samples), 2)
        n_pos_samples = max(1, n_samples // 2)
        sample = np.where(response == "sensitive", [f"s{i % n_pos_samples}" for i in range(n)],
                          [f"r{i % (n_samples - n_pos_samples)}" for i in range(n)])
        obs = pd.DataFrame({"response": response, "sample": sample}, index=[f"{row.dataset}_c{i}" for i in range(n)])
        counts = sp.random(n, len(genes), density=0.3, format="csr", random_state=int(rng.integers(1 << 31)),
                           data_rvs=lambda k: rng.integers(1, 20, k)).astype(np.float32)
        adata = ad.AnnData(X=counts, obs=obs, var=pd.DataFrame(index=genes))
        meta = {k: (None if pd.isna(getattr(row, k)) else str(getattr(row, k)))
                for k in ("tissue", "cancer_type", "drug_type", "regimen")}
        st.ingest(adata, name=row.dataset, label_key="response", positive="sensitive", sample_key="sample",
                  study=row.study, **meta)
        emb = st.create_embedding(row.dataset, model="synthetic", params={"dim": dim, "seed": seed}, dim=dim)
        y = (response == "sensitive").astype(np.float32)
        study_offset = 0.5 * rng.standard_normal(dim).astype(np.float32)
        for chunk in range(emb.n_chunks):
            lo, hi = emb.chunk_bounds(chunk)
            block = rng.standard_normal((hi - lo, dim), dtype=np.float32)
            block += study_offset
            block += np.outer(0.15 * (2 * y[lo:hi] - 1), label_direction)
            emb.write_chunk(chunk, block)
        emb.finalize()
        total += n
    return st, total


def open_or_build_store(root: Path, shape: pd.DataFrame, scale: float, dim: int, reuse: bool) -> tuple[Store, int]:
    """A store built by an earlier run with the same scale and dim (its results cleared), or a new one."""
    marker = root / "bench_heads.json"
    wanted = {"scale": scale, "dim": dim}
    if reuse and marker.exists() and json.loads(marker.read_text()) == wanted:
        st = Store(root)
        for table in ("eval_predictions", "eval_results", "eval_tasks", "skipped_tasks", "eval_runs"):
            st.execute(f"DELETE FROM {table}")
        return st, int(st.query("SELECT count(*) AS n FROM cells")["n"].iloc[0])
    st, n = build_store(root, shape, scale, dim)
    marker.write_text(json.dumps(wanted))
    return st, n


# ---------------------------------------------------------------------------------------------
# measurements
# ---------------------------------------------------------------------------------------------
def time_grid(st: Store, head: str, jobs: int, by: list[str], scenarios: list[str]) -> dict[str, object]:
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        summary = evaluate(st, heads=[head], scenarios=scenarios, by=by, folds=10, jobs=jobs, silent=False)
    wall = time.perf_counter() - t0
    tasks = st.query("SELECT count(*) AS n, sum(n_train) AS cells, sum(fit_seconds) AS fit FROM eval_tasks "
                     "WHERE head = ?", [head]).iloc[0]
    auroc = st.query("SELECT avg(value) AS v FROM eval_results WHERE head = ? AND metric = 'auroc'", [head])["v"].iloc[0]
    return {"what": f"{head} grid", "tasks": summary.n_done, "train_Mcells": tasks["cells"] / 1e6, "wall_s": wall,
            "fit_s": float(tasks["fit"]), "auroc": auroc, "load": load}


def full_grid_size(shape: pd.DataFrame, by: list[str], scenarios: list[str]) -> tuple[int, float, int]:
    """Tasks, summed training cells (millions) and cells of the full-scale grid (splits only, no fits)."""
    from scdm.classify.splits import make_splits

    frames = []
    for row in shape.itertuples():
        n, n_pos = int(row.n_cells), int(row.n_sensitive)
        frames.append(pd.DataFrame({
            "dataset_id": row.dataset, "row": np.arange(n), "study": row.study,
            "sample": [f"s{i % max(int(row.n_samples), 2)}" for i in range(n)],
            "tissue": row.tissue, "cancer_type": row.cancer_type, "drug_type": row.drug_type,
            "regimen": None if pd.isna(row.regimen) else row.regimen,
            "response": np.r_[np.ones(n_pos, np.int8), np.zeros(n - n_pos, np.int8)]}))
    cells = pd.concat(frames, ignore_index=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        splits = make_splits(cells, scenarios=scenarios, by=by, n_folds=10)
    n_tasks, train = 0, 0
    for split in splits:
        for fold in split.folds:
            n_tasks += 1
            train += int(split.train_mask(fold).sum())
    return n_tasks, train / 1e6, len(cells)


def ridge_costs(dim: int) -> tuple[float, float]:
    """(seconds per fold solve, Gram rows per second) on this machine now, under the grid's thread policy.

    Solves: one BLAS thread each, as many side by side as the CPU budget allows (``map_solves``),
    so the time per solve is the wall time of a batch over its size. Gram: every core (``gemm_threads``).
    """
    from scdm.classify._threads import cpu_budget, gemm_threads, map_solves
    from scdm.classify.heads import GramStats, ridge_from_stats

    rng = np.random.default_rng(0)
    X = rng.standard_normal((8192, dim), dtype=np.float32)
    y = rng.integers(0, 2, 8192)
    buf = np.empty((dim, dim), np.float32, order="F")
    with gemm_threads(X.size):
        t0 = time.perf_counter()
        fold = GramStats.from_rows(X, y, out=buf)
        rows_per_s = 8192 / (time.perf_counter() - t0)
    total = GramStats.zeros(dim)
    total.iadd(fold)
    total.iadd(fold)
    n_solves = 2 * cpu_budget()
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        map_solves(lambda _: ridge_from_stats(total, 1.0, minus=fold), range(n_solves))
        times.append((time.perf_counter() - t0) / n_solves)
    return float(np.median(times)), rows_per_s


def fold_problem(n_cells: int, dim: int, n_folds: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(X, y, fold of each cell): N(0, 1) embeddings with a weak label direction, stratified folds."""
    from sklearn.model_selection import StratifiedKFold

    rng = np.random.default_rng(seed)
    y = (rng.random(n_cells) < 0.4).astype(np.int8)
    X = rng.standard_normal((n_cells, dim), dtype=np.float32)
    direction = rng.standard_normal(dim).astype(np.float32)
    X += np.outer(0.15 * (2 * y - 1), direction / np.linalg.norm(direction)).astype(np.float32)
    fold = np.empty(n_cells, np.int64)
    for k, (_, test) in enumerate(StratifiedKFold(n_folds, shuffle=True, random_state=seed).split(X, y)):
        fold[test] = k
    return X, y, fold


def _auroc(y: np.ndarray, score: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, score))


def compare_ridge(X: np.ndarray, y: np.ndarray, fold: np.ndarray, alpha: float = 1.0) -> dict[str, object]:
    """The grid's ridge (Gram downdates, one-thread solves side by side) vs RidgeClassifier fold by fold."""
    from sklearn.linear_model import RidgeClassifier

    from scdm.classify._threads import map_solves
    from scdm.classify.heads import GramStats, ridge_from_stats

    dim, folds = X.shape[1], np.unique(fold)
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    shift = X[np.linspace(0, len(X) - 1, min(len(X), 4096)).astype(np.int64)].mean(axis=0, dtype=np.float64).astype(np.float32)
    stats = {int(k): GramStats.from_rows(X, y, rows=np.flatnonzero(fold == k), shift=shift,
                                         out=np.empty((dim, dim), np.float32, order="F")) for k in folds}
    total = GramStats.zeros(dim, shift)
    for st in stats.values():
        total.iadd(st)
    solutions = map_solves(lambda k: ridge_from_stats(total, alpha, minus=stats[int(k)]), folds)
    ours = time.perf_counter() - t0
    score_ours = np.empty(len(y))
    for k, (coef, intercept) in zip(folds, solutions):
        score_ours[fold == k] = X[fold == k] @ coef.astype(np.float32) + intercept
    # scikit-learn on the same folds: the same problem, the inputs scaled by the training cells' mean
    # centred sd (standardize="global") and the same alpha on the scaled inputs
    score_sk = np.empty(len(y))
    t0 = time.perf_counter()
    for k in folds:
        train = fold != k
        Xt = X[train]
        scale = float(np.sqrt(Xt.var(axis=0, dtype=np.float64).mean()))
        model = RidgeClassifier(alpha=alpha).fit(Xt / scale, y[train])
        score_sk[fold == k] = model.decision_function(X[fold == k] / scale)
    theirs = time.perf_counter() - t0
    return {"what": f"ridge {len(folds)} folds", "tasks": len(folds), "train_Mcells": (len(folds) - 1) * len(y) / 1e6,
            "wall_s": ours, "sklearn_s": theirs, "x_sklearn": ours / theirs, "goal_x": 0.2, "load": load,
            "auroc": _auroc(y, score_ours), "sklearn_auroc": _auroc(y, score_sk),
            "note": f"{len(y):,} cells x {dim}; RidgeClassifier(alpha={alpha:g}) on globally scaled inputs"}


def compare_logreg(X: np.ndarray, y: np.ndarray, fold: np.ndarray, C: float = 1.0, tol: float = 1e-4,
                   max_iter: int = 200) -> dict[str, object]:
    """The grid's batched L-BFGS over all folds vs LogisticRegression(lbfgs) fold by fold."""
    from sklearn.linear_model import LogisticRegression

    from scdm.classify._logreg_batch import fit_logreg_folds
    from scdm.classify._threads import solve_threads

    folds = np.unique(fold)
    train = np.stack([fold != k for k in folds], axis=1)
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    with warnings.catch_warnings(), solve_threads():  # as the grid runs it (_logreg_outcomes)
        warnings.simplefilter("ignore")
        fits = fit_logreg_folds(X, y, train, C=C, tol=tol, max_iter=max_iter, standardize=True)
    ours = time.perf_counter() - t0
    score_ours = np.empty(len(y))
    for i, k in enumerate(folds):
        test = fold == k
        score_ours[test] = ((X[test] - fits.mean[i]) / fits.scale[i]) @ fits.coef[i] + fits.intercept[i]
    score_sk = np.empty(len(y))
    t0 = time.perf_counter()
    for k in folds:
        tr, test = fold != k, fold == k
        mean, sd = X[tr].mean(axis=0), X[tr].std(axis=0)
        sd[sd == 0] = 1.0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = LogisticRegression(C=C, tol=tol, max_iter=max_iter).fit((X[tr] - mean) / sd, y[tr])
        score_sk[test] = model.decision_function((X[test] - mean) / sd)
    theirs = time.perf_counter() - t0
    return {"what": f"logreg {len(folds)} folds", "tasks": len(folds), "train_Mcells": float(train.sum()) / 1e6,
            "wall_s": ours, "sklearn_s": theirs, "x_sklearn": ours / theirs, "goal_x": 0.2, "load": load,
            "auroc": _auroc(y, score_ours), "sklearn_auroc": _auroc(y, score_sk),
            "note": f"{len(y):,} cells x {X.shape[1]}; LogisticRegression(C={C:g}, tol={tol:g}, max_iter={max_iter}), "
                    f"per-fold standardised; scdm iterations {int(fits.n_iter.max())}"}


def matmul_rate(dim: int, batch: int, hidden: int = 512, seconds: float = 2.0, *, bf16: bool = False) -> float:
    """GFLOP/s of the MLP's own matmul shapes (forward of layer 1 and 2, batch rows), fp32 or bf16."""
    import torch

    dtype = torch.bfloat16 if bf16 else torch.float32
    a, w1 = torch.randn(batch, dim).to(dtype), torch.randn(dim, hidden).to(dtype)
    h, w2 = torch.randn(batch, hidden).to(dtype), torch.randn(hidden, hidden).to(dtype)
    flops = 2 * batch * hidden * (dim + hidden)
    for _ in range(5):
        a @ w1, h @ w2
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ w1
        h @ w2
        n += 1
    return n * flops / (time.perf_counter() - t0) / 1e9


def time_mlp(n_cells: int, dim: int, profile: str, threads: int, seed: int = 0) -> dict[str, object]:
    """One MLP fit with ``threads`` torch threads against the FLOP floor at that thread count.

    The paper and fast profiles run their fixed epochs (no early stopping); the default profile runs
    as the grid runs it. The floor counts the training rows of the epochs actually run.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        rng = np.random.default_rng(seed)
        y = rng.integers(0, 2, n_cells)
        X = rng.standard_normal((n_cells, dim), dtype=np.float32)
        X[:, 0] += y
        head = get_head("mlp", profile=profile) if profile == "default" else get_head("mlp", profile=profile,
                                                                                        early_stopping=False)
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        head.fit(X, y)
        wall = time.perf_counter() - t0
        batch = int(head.batch_size_)
        rate = matmul_rate(dim, batch, bf16=head.bf16_)  # the floor of the precision the fit used
    finally:
        torch.set_num_threads(before)
    epochs = len(head.history_)
    floor = mlp_train_flops(head.n_train_, dim, epochs=epochs) / (rate * 1e9)
    precision = "bf16" if head.bf16_ else "fp32"
    return {"what": f"mlp {profile} ({threads} thr)", "tasks": 1, "train_Mcells": n_cells / 1e6, "wall_s": wall,
            "fit_s": wall, "load": load, "floor_s": floor, "x_floor": wall / floor,
            "note": f"batch {batch}, {epochs} epochs, {precision}; {precision} matmul {rate:.0f} GFLOP/s on the layer shapes"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=0.05, help="fraction of scDrugMap's 326,751 cells (default 0.05)")
    parser.add_argument("--dim", type=int, default=3072)
    parser.add_argument("--heads", default="ridge,logreg", help="grid heads to time (comma-separated)")
    parser.add_argument("--by", default="all,tissue,cancer_type,drug_type,regimen", help="category types of the grid")
    parser.add_argument("--scenarios", default="pooled,cross")
    parser.add_argument("--mlp-cells", type=int, default=20000, help="training cells of the timed MLP fit (0: skip)")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--fold-cells", type=int, default=20000,
                        help="cells of the fold-by-fold comparison with scikit-learn (0: skip)")
    parser.add_argument("--folds", type=int, default=10, help="folds of that comparison")
    parser.add_argument("--workdir", default="bench-out/bench_heads")
    parser.add_argument("--reuse-store", action="store_true",
                        help="keep a store this script built before with the same --scale/--dim (drops its results)")
    args = parser.parse_args()
    by, scenarios = args.by.split(","), args.scenarios.split(",")

    shape = collection_shape()
    print(f"collection: {len(shape)} datasets, {shape['n_cells'].sum():,} cells "
          f"({shape['n_sensitive'].sum():,} sensitive), {shape['study'].nunique()} studies; scale {args.scale}, "
          f"D={args.dim}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}", flush=True)
    full_tasks, full_mcells, full_cells = full_grid_size(shape, by, scenarios)
    print(f"full-scale grid ({','.join(scenarios)} x {','.join(by)}): {full_tasks} tasks per head, "
          f"{full_mcells:.1f} M training cells summed over tasks", flush=True)
    rows = []
    heads = [h for h in args.heads.split(",") if h]
    if args.fold_cells:
        X, y, fold = fold_problem(args.fold_cells, args.dim, args.folds)
        for compare in (compare_ridge, compare_logreg):
            rows.append(compare(X, y, fold))
            print(rows[-1], flush=True)
        del X
    if heads:
        t0 = time.perf_counter()
        st, n = open_or_build_store(Path(args.workdir) / "store", shape, args.scale, args.dim, args.reuse_store)
        print(f"store built: {n:,} cells x {args.dim} in {time.perf_counter() - t0:.0f} s", flush=True)
        for head in heads:
            row = time_grid(st, head, args.jobs, by, scenarios)
            if head == "ridge":
                # Cost model: every fold is one solve; the Gram statistics take one pass over the
                # cells per pooled category type plus one for all cross-data splits (atoms).
                t_solve, rows_per_s = ridge_costs(args.dim)
                passes = (len(by) if "pooled" in scenarios else 0) + (1 if "cross" in scenarios else 0)
                row["model_at_scale_s"] = row["tasks"] * t_solve + passes * n / rows_per_s
                row["full_scale_s"] = full_tasks * t_solve + passes * full_cells / rows_per_s
                row["note"] = f"{t_solve:.2f} s/solve, Gram {rows_per_s:,.0f} rows/s, {passes} passes"
            else:
                # Linear in training cells x fits (same dim): the time per million cell-fits. An upper
                # bound: each L-BFGS iteration's fixed costs scale with cells here, and small folds
                # take them as often as large ones (session 14: 649 s projected from scale 0.05, 250 s
                # measured at --scale 1).
                row["full_scale_s"] = row["wall_s"] / row["train_Mcells"] * full_mcells
                row["note"] = (f"{row['wall_s'] / row['train_Mcells']:.1f} s per M training cells; projection is an "
                               "upper bound, run --scale 1 for the real time")
            row["target_s"] = {"ridge": 300, "logreg": 300}.get(head)  # issue #19: <= 5 min per model on 2 cores
            rows.append(row)
            print(row, flush=True)
    if args.mlp_cells:
        # per thread count: a fit against the floor at the same thread count (one thread per fit
        # is what the grid uses for parallel fits, --jobs N)
        for threads in sorted({1, os.cpu_count() or 1}):
            for profile in ("default", "paper", "fast"):
                rows.append(time_mlp(args.mlp_cells, args.dim, profile, threads))
                print(rows[-1], flush=True)
    table = pd.DataFrame(rows)
    with pd.option_context("display.width", 250, "display.max_colwidth", 70, "display.float_format", "{:.2f}".format):
        print(table.to_string(index=False))


if __name__ == "__main__":
    main()
