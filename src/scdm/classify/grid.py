"""The evaluation grid: every (embedding space, split, fold, head) task, straight from the store.

:func:`evaluate` groups the selected embeddings by ``space_id`` (embeddings of one space across
datasets are pooled; spaces are never mixed), builds the splits of the pooled cells (stored once,
reused by every model), reads each space's embedding matrix once, fits every head on every fold
(in parallel, ``jobs=N``), and writes long-format metrics and per-cell test predictions to the
catalog. A task already in the catalog (same embeddings, split, fold, head and head parameters)
is not fitted again, so an interrupted or extended run only does what is missing.

Ridge is not fitted task by task: per split, one pass over the category's cells gives the Gram
statistics of every fold, and each fold's training fit is the downdate ``total - fold`` and one
Cholesky solve (cross-data splits share per-atom statistics from a single pass). Logistic
regression is not fitted task by task either: the folds of a split are solved together, one
L-BFGS per fold in lockstep, so each pass over the split's cells serves every fold
(:mod:`scdm.classify._logreg_batch`). Ridge runs in this process whatever the executor; with
``executor="ray"`` each split's logreg folds are one Ray task (:mod:`scdm.classify._ray_grid`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from scdm.classify._row_keys import row_keys
from scdm.classify._threads import cpu_budget, current_blas_threads, gemm_threads, map_solves, solve_threads
from scdm.classify.heads import (
    HEADS,
    GramStats,
    RidgeHead,
    get_head,
    head_revision,
    linear_scores,
    respelled_params_key,
    ridge_from_stats,
    ridge_score_to_proba,
)
from scdm.classify.results import name_list
from scdm.classify.tasks import (
    Outcome,
    Space,
    Task,
    fit_task,
    logreg_groups,
    logreg_split,
    one_math_thread,
    runs_torch,
)
from scdm.store import evaluation as records
from scdm.store.errors import (
    EmbeddingIncompleteError,
    EmbeddingNotFoundError,
    InputDataError,
    ScdmError,
    ScdmWarning,
)
from scdm.store.matrix import copied_cells
from scdm.store.splits import CATEGORY_TYPES, Split, load_split, make_splits, save_splits, shared_partitions, split_seed
from scdm.store.warning_scopes import in_context, once_each
from scdm.store.wording import option

if TYPE_CHECKING:
    from scdm.store import Store

logger = logging.getLogger(__name__)

__all__ = ["DuplicateCellsWarning", "EvalSummary", "MixedDrugsWarning", "mixed_drugs", "Task", "duplicate_cells", "evaluate", "progress_bar",
           "respell_stored_params"]

_ATOM_COLUMNS = ["dataset_id", "study", "tissue", "cancer_type", "drug_type", "regimen"]
_FLUSH_SECONDS = 5.0
_ATOM_MEMORY_BYTES = 3 * 1024**3
"""Cross-data ridge keeps one dim x dim float64 matrix per atom when they fit in this budget."""


@dataclass(frozen=True)
class EvalSummary:
    """What one :func:`evaluate` call did."""

    run_id: str
    """Id of the run (``eval_runs.run_id``)."""
    n_tasks: int
    """Tasks requested (fitted now + already in the catalog)."""
    n_done: int
    """Tasks fitted by this call."""
    n_reused: int
    """Tasks found finished in the catalog and not fitted again."""
    n_skipped: int
    """Tasks recorded as skipped (split or fold skipped, or the head failed)."""
    seconds: float
    """Wall time of the call."""
    spaces: tuple[str, ...]
    """Embedding spaces evaluated."""
    split_scheme: str
    """The pooled scheme(s) used, ``auto`` resolved (``sample``, ``cell`` or ``cell,sample`` when spaces
    differ): always reported with the results."""
    results: pd.DataFrame = field(repr=False)
    """Long-format metrics of every requested task (fitted now or reused)."""
    skipped: pd.DataFrame = field(repr=False)
    """Tasks skipped by this run, with the reason."""


def progress_bar(total: int, *, desc: str, silent: bool = False) -> Any:
    """The grid's task bar: the shared scdm progress helper, counting tasks."""
    from scdm.store.progress import progress_bar as _bar

    return _bar(total, desc=desc, unit="task", silent=silent, leave=False)


# --------------------------------------------------------------------------------------------
# selection
# --------------------------------------------------------------------------------------------
def _select_spaces(st: Store, embeddings: Sequence[str] | None) -> list[Space]:
    table = st.embeddings()
    if embeddings is not None:
        wanted = list(dict.fromkeys(embeddings))
        unknown = [e for e in wanted if e not in set(table["embedding_id"])]
        if unknown:
            msg = f"No embedding {unknown[0]!r} in the store; list them with `scdm ls` (SELECT * FROM embeddings)."
            raise EmbeddingNotFoundError(msg)
        table = table[table["embedding_id"].isin(wanted)]
        partial = table[table["status"] != "complete"]
        if len(partial):
            msg = (f"Embedding {partial['embedding_id'].iloc[0]!r} is not complete; finish it with `scdm embed` "
                   "(it resumes) before evaluating it.")
            raise EmbeddingIncompleteError(msg)
    else:
        table = table[table["status"] == "complete"]
        if table.empty:
            msg = "The store holds no complete embedding to evaluate; compute one with `scdm embed` first."
            raise EmbeddingNotFoundError(msg)
    spaces = []
    for space_id, group in table.groupby("space_id", sort=True):
        # One embedding per dataset in a space (the newest if a dataset somehow has several).
        group = group.sort_values("created_at").drop_duplicates("dataset_id", keep="last").sort_values("dataset_id")
        if group["dim"].nunique() != 1:
            msg = f"Embeddings of space {space_id} have different dims {sorted(group['dim'].unique())}; they cannot be pooled."
            raise InputDataError(msg)
        first = group.iloc[0]
        scope = json.loads(first["params"]).get("lora")
        spaces.append(Space(space_id=str(space_id), model=str(first["model"]), variant=str(first["variant"]),
                             embeddings=group.reset_index(drop=True),
                             lora=(str(scope["split_id"]), int(scope["fold"])) if scope else None))
    return spaces


def _say_refitted_for_predictions(st: Store, pending: Sequence[Task], replaces: dict[str, str]) -> None:
    """Tasks stored by a run with ``--no-predictions`` (under their id, or the same fit under another:
    ``replaces``) are fitted again when predictions are asked for."""
    again = len(records.finished_tasks(st, [t.task_id for t in pending])) + sum(t.task_id in replaces for t in pending)
    if again:
        logger.warning("%d tasks were stored without test predictions (an earlier run with --no-predictions); fitting "
                       "them again to store their predictions (their metrics are replaced by the new fit's)", again)


def _load_matrix(st: Store, space: Space) -> None:
    """Read every embedding of the space once and keep the labelled cells' rows, in cells order."""
    cells = space.cells
    assert cells is not None
    dim = int(space.embeddings["dim"].iloc[0])
    dataset_of = cells["dataset_id"].to_numpy()
    # one embedding whose labelled cells are one run of its rows, in order: X is a view of the matrix
    # read (no second copy of it; a partly labelled matrix is kept whole, never more than the copy it saves)
    single = len(space.embeddings) == 1 and _is_run(cells["row"].to_numpy(np.int64))
    X = np.empty((0 if single else len(cells), dim), np.float32)
    for row in space.embeddings.itertuples():
        idx = np.flatnonzero(dataset_of == row.dataset_id)
        rows = cells["row"].to_numpy(np.int64)[idx]
        matrix = st.read_embedding(row.embedding_id)
        if single:
            X = np.asarray(matrix[rows[0]:rows[-1] + 1], np.float32)
        elif _is_run(idx) and _is_run(rows):  # every cell labelled, in order; no gather
            X[idx[0]:idx[-1] + 1] = matrix[rows[0]:rows[-1] + 1]
        else:
            X[idx] = matrix[rows]
        lookup = np.full(matrix.shape[0], -1, np.int64)
        lookup[rows] = idx
        space.lookup[row.dataset_id] = lookup
        del matrix
    if not all(np.isfinite(X[lo:lo + 8192]).all() for lo in range(0, len(X), 8192)):  # no n x dim mask
        msg = f"Embedding space {space.space_id} ({space.model}) holds NaN or inf values; recompute the embedding."
        raise InputDataError(msg)
    space.X = X
    space.y = cells["response"].to_numpy(np.int8)


class DuplicateCellsWarning(ScdmWarning):
    """Cells of two datasets of one space have identical embeddings: most likely the same cells ingested twice."""


class MixedDrugsWarning(ScdmWarning):
    """One space's datasets are labelled with responses to different drugs, and its folds pool them."""


class UnreadOptionWarning(ScdmWarning):
    """An option was given that no split or head of the run reads: its results are those of the run without it."""


def unread_options(scenarios: Iterable[str], heads: Iterable[str], head_params: Mapping[str, Mapping[str, Any]] | None,
                   *, seed: int = 0, split_scheme: str = "auto", folds: int | None = None,
                   pair_folds_with: str | None = None) -> list[str]:
    """What of ``seed``, ``split_scheme``, ``folds`` (None: not given) and ``pair_folds_with`` nothing of the run
    reads, one sentence each.

    Only pooled splits are dealt with a seed, a number of folds and a scheme (cross-data folds are the
    studies, custom ones given), and only some heads take a seed. Without them a second ``seed``
    reproduces the first run's tasks and numbers, which must not read as a result over another seed.
    """
    scenarios, heads, head_params = list(scenarios), list(heads), dict(head_params or {})
    if "pooled" in scenarios:
        return []
    dealt = (f"no pooled split is asked for (scenario {', '.join(scenarios) or 'none'}; cross-data folds are the "
             "held-out studies)")
    out = []
    if folds is not None:
        out.append(f"{option('folds', str(folds))} is ignored: {dealt}")
    if split_scheme != "auto":
        out.append(f"{option('split_scheme', str(split_scheme))} is ignored: {dealt}")
    if pair_folds_with is not None:  # it stratifies pooled folds only; the results would read as paired
        out.append(f"{option('pair_folds_with', pair_folds_with)} is ignored: {dealt}")
    if seed != 0 and not any(_takes_seed(h) and "seed" not in head_params.get(h, {}) for h in heads):
        takes = ", ".join(h for h in HEADS if _takes_seed(h))
        out.append(f"{option('seed', str(seed))} changes nothing: {dealt}, and {', '.join(heads)} take{'s' if len(heads) == 1 else ''} no "
                   "seed, so "
                   f"these are the tasks and numbers of seed 0 (heads that take one: {takes})")
    return out


def mixed_drugs(st: Store, cells: pd.DataFrame, names: list[str]) -> str | None:
    """``'a375: PLX-4720 (drug PLX-4720); ...'`` when the label sets of ``cells`` are of different drugs, else None."""
    used = cells[["dataset_id", "label_set"]].drop_duplicates()
    sets = st.label_sets(names)[["dataset_id", "dataset", "name", "drug"]].rename(columns={"name": "label_set"})
    drugs = used.merge(sets, on=["dataset_id", "label_set"], how="left").dropna(subset=["drug"])
    if drugs["drug"].str.casefold().nunique() < 2:  # one drug in two spellings is one drug, as transfer reads it
        return None
    return "; ".join(f"{r.dataset}: {r.label_set} (drug {r.drug})" for r in drugs.sort_values("dataset").itertuples())


def _warn_mixed_drugs(st: Store, cells: pd.DataFrame, names: list[str]) -> None:
    """Say when the label sets a space is evaluated on are responses to different drugs.

    scDrugMap pools drugs within a category, so this is allowed; but a cross-data fold then scores a
    held-out study's drug with a head trained on the other studies' drugs (A375 PLX-4720 held out,
    trained on JHU006 Gefitinib and SCC47 Afatinib), which `scdm transfer` refuses, and nothing in the
    result row said so beyond the joined label set names.
    """
    each = mixed_drugs(st, cells, names)
    if each is None:
        return
    warnings.warn(f"the datasets evaluated together in one space are labelled with responses to different drugs ({each}): "
                  "their pooled folds mix drugs, and each cross-data fold scores a held-out study's drug with a head "
                  "trained on the other studies' drugs (scDrugMap's protocol, but not a measure of one drug's "
                  "response); to evaluate one drug, give --dataset only the datasets labelled for it (with --label-set)",
                  MixedDrugsWarning, stacklevel=4)


def duplicate_cells(X: np.ndarray, dataset_of: np.ndarray) -> dict[str, int]:
    """Dataset -> how many of its cells have an embedding row identical to a cell's of another dataset.

    Rows are keyed by one random projection (float64, block by block: no copy of ``X``) and rows
    with equal keys are compared exactly, so the check costs one pass over the matrix. All-zero rows
    are left out: a baseline gives them to unrelated cells (no counts in its genes), not only to copies.
    """
    return _count_by_dataset(_identical_rows(X, dataset_of), dataset_of)


def _identical_rows(X: np.ndarray, dataset_of: np.ndarray) -> np.ndarray:
    """Which rows of ``X`` equal a row of another dataset exactly (see :func:`duplicate_cells`)."""
    mask = np.zeros(X.shape[0], bool)
    if X.shape[0] < 2:
        return mask
    key, informative = row_keys(X)
    order = np.flatnonzero(informative)
    order = order[np.argsort(key[order], kind="stable")]
    n = order.size
    sorted_key = key[order]
    starts = np.flatnonzero(np.r_[True, sorted_key[1:] != sorted_key[:-1]])
    for first, end in zip(starts, np.r_[starts[1:], n]):
        if end - first < 2:
            continue
        idx = order[first:end]
        _, group = np.unique(X[idx], axis=0, return_inverse=True)  # equal keys: the exactly equal rows among them
        for g in np.unique(group):
            members = idx[group.ravel() == g]
            if np.unique(dataset_of[members]).size > 1:
                mask[members] = True
    return mask


def _count_by_dataset(mask: np.ndarray, dataset_of: np.ndarray) -> dict[str, int]:
    datasets, counts = np.unique(dataset_of[mask].astype(str), return_counts=True)
    return {str(d): int(n) for d, n in zip(datasets, counts)}


def _copied_cells(st: Store, space: Space) -> np.ndarray:
    """Cells of the space with the cell id and expression values of a cell of another of its datasets.

    Identical embeddings miss copies a model embeds differently: UCE and scGPT draw each cell's genes
    with a seed of its row, so a copy at another row (a subset, a reordered file) gets another vector.
    """
    assert space.cells is not None
    try:
        return copied_cells(st, space.cells)
    except ScdmError as err:  # a dataset's file is gone: the embeddings are still evaluated
        logger.info("space %s: copies of cells in other datasets looked for by embedding only (%s)", space.space_id, err)
        return np.zeros(len(space.cells), bool)


def _warn_duplicate_cells(st: Store, space: Space) -> None:
    """Warn when a space pools the same cells twice: a split can train on one copy and test the other."""
    assert space.X is not None and space.cells is not None
    dataset_of = space.cells["dataset_id"].to_numpy()
    found = _count_by_dataset(_identical_rows(space.X, dataset_of) | _copied_cells(st, space), dataset_of)
    if not found:
        return
    names = dict(zip(space.embeddings["dataset_id"], space.embeddings["dataset_name"]))
    counts = ", ".join(f"{n} of {names.get(d, d)!r}" for d, n in sorted(found.items(), key=lambda kv: str(names.get(kv[0], kv[0]))))
    msg = (f"{space.model} space {space.space_id}: cells with an identical embedding, or the cell id and expression "
           f"values of a cell, in another dataset ({counts}), most "
           "likely the same cells ingested twice. Folds can train on one copy and test the other (cross-data: a held-out "
           "study seen in training under another study name), which inflates every score. Evaluate one of the datasets "
           "only (--dataset), or ingest both copies with the same study and sample ids so that cross-data and "
           "sample-grouped folds keep the copies together.")
    warnings.warn(msg, DuplicateCellsWarning, stacklevel=3)


def _is_run(index: np.ndarray) -> bool:
    """Whether ``index`` is consecutive ascending integers (a slice)."""
    return index.size > 0 and int(index[-1]) - int(index[0]) == index.size - 1 and bool((np.diff(index) == 1).all())


# --------------------------------------------------------------------------------------------
# tasks
# --------------------------------------------------------------------------------------------
def _plan(space: Space, heads: Sequence[str], head_params: dict[str, dict[str, Any]]) -> tuple[list[Task], list[records.SkippedTask]]:
    tasks: list[Task] = []
    skipped: list[records.SkippedTask] = []
    for head in heads:
        params = dict(head_params.get(head, {}))
        params_key = get_head(head, **params).params_key()
        for split in space.splits:
            if split.reason:
                skipped.append(space.skipped(split, None, head, split.reason))
                continue
            for fold in range(split.n_folds):
                if space.lora is not None and fold != space.lora[1]:
                    continue  # a fold-specific variant never sees another fold's test cells (it trained on them)
                if fold in split.skipped_folds:
                    skipped.append(space.skipped(split, fold, head, split.skipped_folds[fold]))
                    continue
                tasks.append(Task.make(space, split, fold, head, params, params_key))
    return tasks, skipped


def _ridge_outcomes(space: Space, tasks: list[Task]) -> Iterator[Outcome]:
    """All ridge tasks of a space by Gram downdates (see module docstring)."""
    assert space.X is not None and space.y is not None
    X = space.X
    if not tasks:
        return
    buffers = _Buffers(X.shape[1])
    by_params: dict[str, list[Task]] = {}
    for task in tasks:
        by_params.setdefault(task.params_key, []).append(task)
    for group in by_params.values():
        head = RidgeHead(**group[0].params)
        head.validate_params()
        by_split: dict[str, list[Task]] = {}
        for task in group:
            by_split.setdefault(task.split.split_id, []).append(task)
        atoms = _AtomStats(space) if any(t.split.scenario == "cross" for t in group) else None
        for split_tasks in by_split.values():
            yield from _ridge_split(space, split_tasks, head, buffers, atoms)


def _rows_mean(X: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The shift Gram statistics of ``X[rows]`` are summed about: the mean of up to 4096 of the rows.

    Each split and each atom is summed about its own rows' mean, never one mean of the whole space:
    float32 sums about a point far from the rows (datasets of a space a batch offset apart) lose
    their spread to the offset, and a split's numbers would depend on the other datasets pooled.
    """
    sample = rows[np.linspace(0, rows.size - 1, min(rows.size, 4096)).astype(np.int64)]
    return X[sample].mean(axis=0, dtype=np.float64).astype(np.float32)


def _logreg_outcomes(space: Space, tasks: list[Task]) -> Iterator[Outcome]:
    """All logreg tasks of a space, the folds of the splits over the same cells solved together (see _logreg_batch)."""
    assert space.X is not None and space.y is not None
    # Each pass over a split's rows is shared by the threads the caller allows here (_math_threads:
    # every core for one large fit, one for parallel jobs or small matrices), each running its
    # own blocks with one BLAS thread: measured 1.7x faster on 2 cores than one thread, while two
    # BLAS threads inside one skinny product are slower than one (scdm.classify._threads).
    threads = current_blas_threads()
    with solve_threads():
        for group in logreg_groups(tasks):
            yield from logreg_split(space, group, threads=threads)


class _Buffers:
    """dim x dim work matrices reused by every split (a fresh 40-80 MB array costs page faults)."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.total = np.zeros((dim, dim), order="F")  # zeros: BLAS fills only the lower triangle
        self.works = [np.zeros((dim, dim), order="F")]  # one per fold solved at the same time
        self.works_lock = threading.Lock()
        self.folds: list[np.ndarray] = []

    def take_work(self) -> np.ndarray:
        """A free float64 (dim, dim) scratch matrix for one solve (give it back after)."""
        with self.works_lock:
            return self.works.pop() if self.works else np.zeros((self.dim, self.dim), order="F")

    def give_work(self, work: np.ndarray) -> None:
        with self.works_lock:
            self.works.append(work)

    def fold(self, i: int) -> np.ndarray:
        while len(self.folds) <= i:
            self.folds.append(np.zeros((self.dim, self.dim), np.float32, order="F"))
        return self.folds[i]


class _AtomStats:
    """Float32 Gram statistics per atom (dataset x study x categories) from one pass over the rows.

    A cross-data split's total is a sum of atoms and its held-out study is one or a few atoms, so
    every cross-data fold of every category costs additions, not passes over the embeddings. Each
    atom is summed about its own mean (:func:`_rows_mean`) and moved to a split's shift in float64
    when added.
    """

    def __init__(self, space: Space) -> None:
        assert space.cells is not None and space.X is not None
        dim = space.X.shape[1]
        self.codes = space.cells[_ATOM_COLUMNS].astype(str).groupby(_ATOM_COLUMNS, sort=True).ngroup().to_numpy()
        n_atoms = int(self.codes.max()) + 1
        self.enabled = n_atoms * dim * dim * 4 <= _ATOM_MEMORY_BYTES
        self.stats: dict[int, GramStats] = {}
        if not self.enabled:
            logger.info("ridge: %d atoms x dim %d exceed the memory budget; cross-data splits take one pass each",
                        n_atoms, dim)
            return
        t0 = time.perf_counter()
        assert space.X is not None and space.y is not None
        for code in range(n_atoms):
            rows = np.flatnonzero(self.codes == code)
            self.stats[code] = GramStats.from_rows(space.X, space.y, rows=rows, shift=_rows_mean(space.X, rows),
                                                   out=np.empty((dim, dim), np.float32, order="F"))
        logger.info("ridge: Gram statistics of %d atoms in %.1f s", n_atoms, time.perf_counter() - t0)

    def covering(self, positions: np.ndarray) -> list[int] | None:
        """Atoms whose union is exactly the rows at ``positions`` (None if there are none such)."""
        if not self.enabled:
            return None
        present = [int(c) for c in np.unique(self.codes[positions])]
        if sum(int(self.stats[c].n) for c in present) != positions.size:
            return None
        return present


def _ridge_split(space: Space, tasks: list[Task], head: RidgeHead, buffers: _Buffers,
                 atoms: _AtomStats | None) -> Iterator[Outcome]:
    assert space.X is not None and space.y is not None
    split = tasks[0].split
    X, y = space.X, space.y
    dim = X.shape[1]
    pos = space.positions(split.cells)
    shift = _rows_mean(X, pos)
    fold_of = split.cells["fold"].to_numpy(dtype=float, na_value=np.nan)
    t0 = time.perf_counter()
    total = GramStats.zeros(dim, shift, out=buffers.total)
    fold_stats: dict[int, GramStats] = {}
    covering = atoms.covering(pos) if atoms is not None and split.scenario == "cross" else None
    if covering is not None:
        assert atoms is not None
        for code in covering:  # the category is whole atoms: sum them, no pass over rows
            total.iadd(atoms.stats[code])
        for task in tasks:
            held_out = atoms.covering(pos[fold_of == task.fold])
            assert held_out is not None  # a study is a union of atoms
            if len(held_out) == 1:
                stats = atoms.stats[held_out[0]]
            else:
                stats = GramStats.zeros(dim, shift)
                for code in held_out:
                    stats.iadd(atoms.stats[code])
            fold_stats[task.fold] = stats
    else:
        present = np.unique(fold_of[~np.isnan(fold_of)]).astype(int)
        for i, fold in enumerate(present):
            rows = pos[fold_of == fold]
            fold_stats[fold] = GramStats.from_rows(X, y, rows=rows, shift=shift, out=buffers.fold(i))
            total.iadd(fold_stats[fold])
        always_train = pos[np.isnan(fold_of)]
        if always_train.size:
            total.iadd(GramStats.from_rows(X, y, rows=always_train, shift=shift))
    stats_seconds = (time.perf_counter() - t0) / max(len(tasks), 1)

    def solve(task: Task) -> tuple[tuple[np.ndarray, float] | str, float]:
        """One fold's solution (or why it has none) and its seconds; one BLAS thread, folds side by side."""
        t1, work = time.perf_counter(), buffers.take_work()
        try:
            return ridge_from_stats(total, head.alpha, standardize=head.standardize, minus=fold_stats[task.fold],
                                    work=work), time.perf_counter() - t1
        except InputDataError as err:  # one degenerate fold is a skipped task, not a failed run
            return str(err), 0.0
        finally:
            buffers.give_work(work)

    for task, (solved, solve_seconds) in zip(tasks, map_solves(solve, tasks)):
        test_pos = pos[fold_of == task.fold]
        if isinstance(solved, str):
            yield Outcome(task, None, None, 0.0, 0.0, int(pos.size - test_pos.size), error=solved)
            continue
        coef, intercept = solved
        t2 = time.perf_counter()
        # in float64, block by block (no copy of the fold's test rows): the scores of RidgeHead.predict_proba
        proba = ridge_score_to_proba(linear_scores(X, coef, intercept, rows=test_pos))
        t3 = time.perf_counter()
        yield Outcome(task, proba, test_pos, stats_seconds + solve_seconds, t3 - t2, int(pos.size - test_pos.size))


# --------------------------------------------------------------------------------------------
# parallel execution
# --------------------------------------------------------------------------------------------
def _run_tasks(tasks: list[Task], jobs: int) -> Iterator[Outcome]:
    if jobs == 1 or len(tasks) <= 1:
        for task in tasks:
            yield fit_task(task)
        return
    from joblib import Parallel, delayed

    # Threads share the embedding matrix (read once per process); the heavy parts of every head
    # (BLAS, torch, LightGBM) release the GIL. Each fit runs on the one math thread _math_threads set
    # (as with jobs=1 and on Ray): cpu_budget() // jobs threads each gave other numbers on larger machines.
    parallel = Parallel(n_jobs=jobs, prefer="threads", return_as="generator_unordered")
    # each fit in the caller's context: its warning blocks (once_each) and a server job's record cover the threads
    yield from parallel(delayed(in_context(fit_task))(task) for task in tasks)


# --------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------
def evaluate(
    store: str | os.PathLike[str] | Store,
    embeddings: Sequence[str] | None = None,
    *,
    scenarios: Iterable[Literal["pooled", "cross", "custom"]] = ("pooled", "cross"),
    by: Iterable[str] = CATEGORY_TYPES,
    heads: Iterable[str] = ("mlp", "logreg"),
    folds: int = 10,
    split_scheme: Literal["auto", "cell", "sample"] = "auto",
    seed: int = 0,
    label_set: str | None = None,
    pair_folds_with: str | None = None,
    jobs: int | None = None,
    head_params: dict[str, dict[str, Any]] | None = None,
    custom: pd.DataFrame | None = None,
    save_predictions: bool = True,
    silent: bool = False,
    executor: Literal["local", "ray"] = "local",
    ray_address: str | None = None,
) -> EvalSummary:
    """Evaluate embeddings: every (embedding space, split, fold, head) task, resumably.

    Parameters
    ----------
    store : str, path or Store
    embeddings : list of str, optional
        Embedding ids to evaluate. Default: every complete embedding in the store. Embeddings
        with the same ``space_id`` (one model/checkpoint/variant/params, several datasets) are
        pooled into one task; different spaces are evaluated separately.
    scenarios : iterable of {"pooled", "cross", "custom"}, default ("pooled", "cross")
    by : iterable of category types, default ("all", "tissue", "cancer_type", "drug_type", "regimen")
    heads : iterable of head names, default ("mlp", "logreg")
        See :data:`scdm.classify.heads.HEADS`.
    folds : int, default 10
        Folds of the pooled scenario.
    split_scheme : {"auto", "cell", "sample"}, default "auto"
        Pooled folds grouped by sample (no sample on both sides of a fold) or at cell level (the
        scDrugMap protocol, which can leak sample identity). ``auto``: ``sample`` when every
        labelled cell of a space has a sample id and there are at least ``folds`` samples, else
        ``cell`` (see :func:`scdm.store.splits.resolve_split_scheme`); every result records the
        scheme it used.
    seed : int, default 0
        Seed of the pooled folds and of every head that takes one (``mlp``, ``lightgbm``,
        ``shuffled-label`` and its base, ``dann``), unless ``head_params`` gives that head its own
        ``seed``. The heads' seed is part of their parameters (and of every task's identity); the
        default 0 is their own default, so its tasks are the ones fitted before the seed reached
        the heads. Another seed that no pooled split and no head reads is named in an
        :class:`UnreadOptionWarning` (so is a ``split_scheme`` without a pooled scenario).
    label_set : str, optional
        Name of the label set to evaluate (every dataset of a space must have one of that name;
        see :mod:`store.labels`). Default: each dataset's default label set. Results of different
        label sets are different rows of every leaderboard.
    pair_folds_with : str, optional
        Stratify the pooled folds by this other label set's labels, so that ``label_set`` is
        evaluated on exactly the partition that label set gets (paired drug-vs-drug comparisons;
        part of the split's identity).
    jobs : int, optional
        Parallel fits (threads sharing one copy of the embeddings), each on one math thread.
        Default (None): per space, one fit per CPU this process may use (affinity, cgroup quota,
        ``OMP_NUM_THREADS``) when its matrix is small (below :data:`SMALL_MATRIX` values), where a
        fit cannot use several threads well and runs on one either way (so the results equal
        ``jobs=1``'s); one fit at a time, its products on every core, for a larger matrix.
    head_params : dict, optional
        Per-head constructor arguments, e.g. ``{"mlp": {"profile": "fast"}, "logreg": {"C": 0.1}}``;
        part of every task's identity.
    custom : DataFrame, optional
        Assignments for the ``custom`` scenario (dataset_id, row or cell_id, fold).
    save_predictions : bool, default True
        Write per-cell test probabilities to ``eval_predictions``.
    silent : bool, default False
        Hide the progress bar (stderr).
    executor : {"local", "ray"}, default "local"
        ``ray``: fits run as Ray tasks (``pip install 'scdm[ray]'``); each space's matrix is put
        once in Ray's object store, results come back to this process, which alone writes the
        catalog; ridge stays here (see :mod:`scdm.classify._ray_grid`). Same results as local;
        ``jobs`` is then unused (the cluster's CPUs set the parallelism, one thread per fit).
    ray_address : str, optional
        With ``executor="ray"``: ``None`` starts a local cluster, ``"auto"`` joins the running
        one, ``"ray://host:10001"`` connects a Ray client. An initialised Ray is reused.

    Returns
    -------
    EvalSummary

    Raises
    ------
    EmbeddingNotFoundError, EmbeddingIncompleteError, InputDataError

    Examples
    --------
    >>> summary = evaluate("scdm-store", heads=["ridge", "logreg"], by=["all", "tissue"])  # doctest: +SKIP
    >>> leaderboard("scdm-store")  # doctest: +SKIP
    """
    from scdm.store import open_store

    st = open_store(store)
    started = time.perf_counter()
    heads = list(dict.fromkeys(name_list(heads)))
    seed = split_seed(seed)  # one int: it deals the folds and seeds the heads, whatever type it was given as
    scenarios = name_list(scenarios)
    for unread in unread_options(scenarios, heads, head_params, seed=seed, split_scheme=split_scheme,
                                 pair_folds_with=pair_folds_with):  # before seeding
        warnings.warn(f"{unread}.", UnreadOptionWarning, stacklevel=2)
    head_params = _seeded_head_params(heads, dict(head_params or {}), seed)
    for head in heads:  # validate names and parameters before any work
        get_head(head, **head_params.get(head, {})).validate_params()
    if jobs is not None and (isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1):
        msg = f"jobs={jobs!r} must be an integer >= 1 (or None: chosen per space)."
        raise InputDataError(msg)
    if executor not in ("local", "ray"):
        msg = f"executor={executor!r} is not one of 'local', 'ray'."
        raise InputDataError(msg)
    if ray_address is not None and executor != "ray":
        msg = f"ray_address={ray_address!r} needs executor='ray'; pass --executor ray or drop --ray-address."
        raise InputDataError(msg)
    if executor == "ray":
        from scdm.classify._ray_grid import import_ray

        import_ray()  # a missing Ray is a clear error before any run is recorded
    scenarios, by = name_list(scenarios), name_list(by)
    respell_stored_params(st)  # before planning: a fit an older scdm keyed {"C": 1} is this run's {"C": 1.0}
    spaces = _select_spaces(st, embeddings)
    revisions = {head: head_revision(head, head_params.get(head, {})) for head in heads}
    config = {"embeddings": [e for s in spaces for e in s.embedding_ids], "scenarios": scenarios, "by": by,
              "heads": heads, "head_params": head_params, "folds": folds, "split_scheme": split_scheme, "seed": seed,
              "jobs": "auto" if jobs is None else jobs, "save_predictions": save_predictions, "executor": executor, "label_set": label_set,
              "pair_folds_with": pair_folds_with,
              # what each head computes: results of an earlier revision are left out (classify.results.stale_sql)
              "head_revisions": revisions}
    spaces = [space for space in spaces if space.lora is None or _lora_split_kept(st, space)]
    kept = []
    for space in spaces:  # labels and splits are checked before a run is recorded
        if space.lora is not None:
            split = load_split(st, space.lora[0])
            cells = _lora_cells(st, space, split, label_set)
            if cells is None:
                continue
            space.cells, space.splits = cells, [split]
        else:
            space.cells = _labelled_cells(st, space, label_set, pair_folds_with)
            space.splits = make_splits(space.cells, scenarios=scenarios, by=by, n_folds=folds, scheme=split_scheme,
                                       seed=seed, custom=custom, folds_from=pair_folds_with,
                                       dataset_names=dict(zip(space.embeddings["dataset_id"], space.embeddings["dataset_name"])))
        kept.append(space)
    spaces = kept
    # what "auto" resolved to (the report shows it beside the scheme asked for); [] when no pooled split
    config["split_schemes_used"] = _pooled_schemes(spaces)
    run_id = records.start_run(st, config, scdm_version=_version())
    writer = records.ResultWriter(st, run_id, save_predictions=save_predictions, flush_seconds=_FLUSH_SECONDS)
    all_ids: list[str] = []
    n_done = n_reused = n_skipped = 0
    pool = None
    try:
        if executor == "ray":
            from scdm.classify._ray_grid import RayGrid

            pool = RayGrid(ray_address)
        for space in spaces:
            _check_cells_unchanged(st, space, label_set, pair_folds_with)
            save_splits(st, space.splits)
            space.splits = shared_partitions(st, space.splits)  # tasks of a shared partition report the label set asked
            tasks, skipped = _plan(space, heads, head_params)
            for row in skipped:
                writer.skip(row)
            n_skipped += len(skipped)
            assert space.cells is not None
            finished = records.finished_tasks(st, [t.task_id for t in tasks], with_predictions=save_predictions)
            pending = [t for t in tasks if t.task_id not in finished]
            # the same fit stored by a run that selected more or fewer of the space's datasets: reused, not fitted
            # again under this run's id and counted twice in its result's folds
            stored_as = records.same_fits(st, [t.key() for t in pending])
            if save_predictions:  # a copy stored without predictions is fitted again, and replaced when stored
                bare = set(stored_as.values()) - records.finished_tasks(st, list(set(stored_as.values())), with_predictions=True)
                writer.replaces.update({p: s for p, s in stored_as.items() if s in bare})
                stored_as = {p: s for p, s in stored_as.items() if s not in bare}
            pending = [t for t in pending if t.task_id not in stored_as]
            all_ids += [stored_as.get(t.task_id, t.task_id) for t in tasks]
            n_reused += len(tasks) - len(pending)
            _say_refitted_for_predictions(st, pending, writer.replaces)
            logger.info("space %s (%s, %d datasets, %d cells): %d tasks, %d already done, %d skipped",
                        space.space_id, space.model, len(space.embeddings), len(space.cells), len(tasks),
                        len(tasks) - len(pending), len(skipped))
            if not pending:
                continue
            _load_matrix(st, space)
            _warn_duplicate_cells(st, space)
            bar = progress_bar(len(pending), desc=f"evaluate {space.model}", silent=silent)
            batched = [t for t in pending if t.head in _BATCHED_HEADS]
            others = [t for t in pending if t.head not in _BATCHED_HEADS]
            space_jobs = _space_jobs(space, jobs, len(others))
            with once_each(), _math_threads(space, space_jobs, torch_heads=any(runs_torch(t.head, t.params) for t in others)):
                # Ray: ridge stays here (shared Gram statistics); a split's logreg folds are one Ray task.
                outcomes = (_chain(_batched_outcomes(space, batched), _run_tasks(others, space_jobs)) if pool is None
                            else pool.outcomes(space, [t for t in pending if t.head != "ridge"], bar=bar,
                                               driver_side=_ridge_outcomes(space, [t for t in batched if t.head == "ridge"])))
                for out in outcomes:
                    if out.error is None:
                        writer.add(out.to_store())
                        n_done += 1
                    else:
                        writer.skip(space.skipped(out.task.split, out.task.fold, out.task.head, out.error))
                        n_skipped += 1
                        logger.warning("task %s (%s, fold %d) not fitted: %s", out.task.head, out.task.split.category,
                                       out.task.fold, out.error)
                    bar.update(1)
            bar.close()
            writer.flush()
            space.X = None  # free the matrix before the next space
        writer.flush()
    except BaseException:
        writer.flush()
        records.finish_run(st, run_id, status="failed", seconds=time.perf_counter() - started)
        raise
    finally:
        if pool is not None:
            pool.close()
    seconds = time.perf_counter() - started
    n_done -= writer.n_dropped + writer.n_elsewhere  # fitted, but not stored: their split went, or another run stored them
    n_old = records.forget_older_revisions(st, revisions)
    if n_old:
        logger.warning("evaluate: %d tasks an older scdm fitted with an earlier revision of their head are replaced by "
                       "this run's", n_old)
    n_reused += writer.n_elsewhere
    records.finish_run(st, run_id, status="complete", seconds=seconds, n_tasks=len(all_ids), n_done=n_done,
                       n_reused=n_reused, n_skipped=n_skipped)
    results = records.task_results(st, all_ids)
    skipped_frame = records.run_skipped(st, run_id)
    logger.info("run %s: %d tasks fitted, %d reused, %d skipped in %.1f s", run_id, n_done, n_reused, n_skipped, seconds)
    if n_skipped:
        _report_skipped(skipped_frame, nothing_evaluated=n_done + n_reused == 0)
    return EvalSummary(run_id=run_id, n_tasks=len(all_ids), n_done=n_done, n_reused=n_reused, n_skipped=n_skipped,
                       seconds=seconds, spaces=tuple(s.space_id for s in spaces), split_scheme=_schemes_used(spaces, split_scheme),
                       results=results, skipped=skipped_frame)


def _check_cells_unchanged(st: Store, space: Space, label_set: str | None, pair_folds_with: str | None) -> None:
    """Refuse to go on when another process relabelled, re-annotated or removed a space's cells after
    this run read them: its planned splits would be saved again and scored on the old labels."""
    if space.lora is not None or space.cells is None:
        return
    try:
        now = _labelled_cells(st, space, label_set, pair_folds_with, warn=False)
    except ScdmError:
        now = None  # the dataset or label set went
    if now is None or not now.equals(space.cells):
        names = ", ".join(space.embeddings["dataset_name"])
        msg = (f"The labels or metadata of {names} changed (or the dataset was removed) while this run evaluated "
               "them; the results stored so far are kept. Run the same command again to evaluate the new data.")
        raise InputDataError(msg)


def _report_skipped(skipped: pd.DataFrame, *, nothing_evaluated: bool) -> None:
    """Why tasks were skipped, most frequent reasons first: a warning when nothing could be evaluated."""
    if skipped.empty:
        return
    level = logging.WARNING if nothing_evaluated else logging.INFO
    logger.log(level, "%d tasks skipped%s: %s (all of them: the skipped_tasks table)", len(skipped),
               ", nothing could be evaluated" if nothing_evaluated else "", records.skip_reasons(skipped))


def _lora_split_kept(st: Store, space: Space) -> bool:
    """Whether a LoRA-tuned space's split is still stored (it goes when its cells' labels or metadata change)."""
    assert space.lora is not None
    split_id, fold = space.lora
    if len(st.query("SELECT 1 FROM splits WHERE split_id = ?", [split_id])):
        return True
    logger.warning("%s tuned embeddings %s are left out: they were tuned on fold %d of split %s, which was removed when "
                   "the labels or metadata of its cells changed; fine-tune again (scdm finetune) on the new splits",
                   space.model, ",".join(space.embedding_ids), fold, split_id)
    return False


def respell_stored_params(st: Store) -> int:
    """Key the stored tasks of an older scdm with this one's spelling of their head parameters; returns how many.

    Before parameters were spelled by the heads' rules (``BaseHead.canonical_params``), ``C=1`` and
    ``C=1.0`` were stored as two results of one fit, and asking again in the other spelling fitted it
    once more. The numbers are the same computation (an int where a float is meant), so the stored
    fit is kept under the current spelling (:func:`store.evaluation.respell_head_params`), not fitted again.
    """
    spellings: dict[tuple[str, str], str] = {}
    for head, stored in records.stored_head_params(st).itertuples(index=False):
        new = respelled_params_key(str(head), str(stored))
        if new != stored:
            spellings[(str(head), str(stored))] = new
    n = records.respell_head_params(st, spellings)
    if n:
        logger.info("%d stored tasks keyed by an older scdm's spelling of their head parameters now read %s", n,
                    "; ".join(sorted(set(spellings.values()))))
    return n


def _seeded_head_params(heads: Sequence[str], head_params: dict[str, dict[str, Any]], seed: int) -> dict[str, dict[str, Any]]:
    """``head_params`` with the run's ``seed`` given to every head in ``heads`` that takes one and was given none."""
    out = dict(head_params)
    for head in heads:
        if head in HEADS:  # an unknown name is refused with the registered ones by get_head
            out[head] = _with_seed(head, dict(out.get(head, {})), seed)
    return out


def _takes_seed(head: str) -> bool:
    return head in HEADS and "seed" in HEADS[head].param_names()


def _with_seed(head: str, params: dict[str, Any], seed: int) -> dict[str, Any]:
    """A head's parameters with ``seed`` where it takes one and none is given; a shuffled-label head's base too.

    Every head's own default seed is 0: ``seed=0`` leaves every parameter key (and task id) as it
    was, so the base's parameters of a shuffled-label head only get a seed that differs from it.
    """
    if _takes_seed(head) and "seed" not in params:
        params["seed"] = seed
    if head == "shuffled-label" and seed != 0:
        base = params.get("base", HEADS[head]().get_params()["base"])
        base_params = dict(params.get("base_params") or {})
        if isinstance(base, str) and _takes_seed(base) and "seed" not in base_params:
            params["base_params"] = {**base_params, "seed": seed}
    return params


def _pooled_schemes(spaces: Sequence[Space]) -> list[str]:
    """The pooled schemes the spaces' splits were made with (``auto`` resolved), sorted."""
    return sorted({sp.scheme for space in spaces for sp in (space.splits or []) if sp.scenario == "pooled"})


def _schemes_used(spaces: Sequence[Space], asked: str) -> str:
    """The pooled schemes the splits were made with (``auto`` resolved), comma-separated."""
    return ",".join(_pooled_schemes(spaces)) or asked


SMALL_MATRIX = 4_000_000
"""Below this many matrix entries one BLAS/torch thread per fit is faster than several."""


def _space_jobs(space: Space, jobs: int | None, n_tasks: int) -> int:
    """Parallel fits for one space: ``jobs`` when given; else one per CPU for a small matrix, one for a large one.

    Fits of a small matrix run on one thread each (see :func:`_math_threads`), so one at a time
    leaves the other cores idle (``scdm demo``'s MLP fits took 63 s on one of two cores, 31 s on
    both). A large matrix's products use every core in one fit (and lightgbm and dann fits copy
    their training cells: parallel ones would hold several copies).
    """
    if jobs is not None:
        return jobs
    assert space.X is not None
    if space.X.size >= SMALL_MATRIX:
        return 1
    return max(1, min(cpu_budget(), n_tasks))


@contextlib.contextmanager
def _math_threads(space: Space, jobs: int, *, torch_heads: bool) -> Iterator[None]:
    """One math thread per fit for small matrices or parallel jobs.

    Small fits cannot use two BLAS/OpenMP threads well, and threads of parallel fits (or of other
    processes) spinning against each other make them many times slower.
    """
    assert space.X is not None
    if jobs == 1 and space.X.size >= SMALL_MATRIX:
        # products over the rows use the process's CPU budget (affinity, cgroup quota, OMP_NUM_THREADS);
        # factorisations inside pin themselves to one thread (scdm.classify._threads)
        with gemm_threads(space.X.size):
            yield
        return
    with one_math_thread(torch_heads=torch_heads):
        yield


_BATCHED_HEADS = ("ridge", "logreg")
"""Heads whose folds are fitted together per split (with executor="ray", logreg's split groups are Ray tasks)."""


def _batched_outcomes(space: Space, tasks: list[Task]) -> Iterator[Outcome]:
    yield from _ridge_outcomes(space, [t for t in tasks if t.head == "ridge"])
    yield from _logreg_outcomes(space, [t for t in tasks if t.head == "logreg"])


def _chain(*iterators: Iterator[Outcome]) -> Iterator[Outcome]:
    for it in iterators:
        yield from it


def _lora_cells(st: Store, space: Space, split: Split, label_set: str | None) -> pd.DataFrame | None:
    """The cells a tuned space is evaluated on: its tuning split's, with the labels it was tuned with.

    None (the space is left out, with a warning) when another label set is asked: a variant tuned
    on one drug's labels says nothing of another's.
    """
    if label_set is not None and label_set not in str(split.label_set or "").split(","):
        logger.warning("%s tuned embeddings %s are left out: they were tuned on label set %s, not %r", space.model,
                       ",".join(space.embedding_ids), split.label_set, label_set)
        return None
    if _split_datasets_unselected(st, space, split):
        return None
    meta = st.cells(list(space.embeddings["dataset_name"])).drop(columns=["response", "label_set"])
    meta["row"] = meta["row"].astype(np.int64)
    cells = split.cells[["dataset_id", "row", "response"]].merge(meta, on=["dataset_id", "row"], how="left")
    cells["label_set"] = split.label_set
    return cells.sort_values(["dataset_id", "row"]).reset_index(drop=True)


def _split_datasets_unselected(st: Store, space: Space, split: Split) -> bool:
    """Whether the tuning split pools datasets whose tuned embeddings were not selected (say so, and which).

    The tuned variant is evaluated on its split's fold, over every dataset of the split: with one of
    them not selected (``scdm evaluate --dataset first`` of a split over first and second) its cells
    have no row in the space, which the heads could not read (a bare KeyError of a dataset id).
    """
    missing = sorted(set(split.cells["dataset_id"].astype(str)) - set(space.embeddings["dataset_id"].astype(str)))
    if not missing:
        return False
    names = st.query("SELECT name FROM datasets WHERE list_contains(?, dataset_id) ORDER BY name", [missing])["name"].tolist()
    stored = st.query("SELECT embedding_id FROM embeddings WHERE space_id = ? AND list_contains(?, dataset_id) "
                      "AND status = 'complete' ORDER BY embedding_id", [space.space_id, missing])["embedding_id"].tolist()
    have = f"their tuned embeddings {', '.join(stored)}" if stored else "their tuned embeddings (none complete: run `scdm finetune` again)"
    logger.warning("%s tuned embeddings %s are left out: their tuning split %s also pools %s, and %s are not selected; "
                   "evaluate the tuned embeddings of every dataset of the split together (--embedding, or --dataset for each)",
                   space.model, ",".join(space.embedding_ids), split.split_id, ", ".join(names), have)
    return True


def _warn_unpaired(cells: pd.DataFrame, pair: pd.DataFrame, label_set: str | None, pair_folds_with: str) -> None:
    """Paired folds are the other label set's partition only where both label the same cells: say when they do not."""
    here, there = cells["response"].notna().to_numpy(), pair["response"].notna().to_numpy()
    only_here, only_there = int((here & ~there).sum()), int((there & ~here).sum())
    if only_here or only_there:
        logger.warning("label sets %s and %s label different cells (%d only in the first, %d only in %s): the folds are "
                       "stratified by %s's labels, but they are %s's own partition only on identical labelled cells, so "
                       "the paired comparison is approximate", label_set or "(default)", pair_folds_with, only_here,
                       only_there, pair_folds_with, pair_folds_with, pair_folds_with)


def _labelled_cells(st: Store, space: Space, label_set: str | None, pair_folds_with: str | None = None, *,
                    warn: bool = True) -> pd.DataFrame:
    names = list(space.embeddings["dataset_name"])
    cells = st.cells(names, label_set=label_set)
    if pair_folds_with is not None:
        pair = st.cells(names, label_set=pair_folds_with)
        if warn:
            _warn_unpaired(cells, pair, label_set, pair_folds_with)
        # cells labelled here but not in the other label set form a stratum of their own
        cells["fold_response"] = pair["response"].astype("Int64").fillna(-1).astype(np.int64).to_numpy()
    labelled = cells[cells["response"].notna()].copy()
    if labelled.empty:
        msg = (f"No cell of {', '.join(names)} has a response label; ingest with label_key=<obs column> to "
               "evaluate it.")
        raise InputDataError(msg)
    if warn:
        _warn_mixed_drugs(st, labelled, names)
    labelled["row"] = labelled["row"].astype(np.int64)
    labelled["response"] = labelled["response"].astype(np.int8)
    return labelled.sort_values(["dataset_id", "row"]).reset_index(drop=True)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("scdm")
    except PackageNotFoundError:
        return "0+unknown"
