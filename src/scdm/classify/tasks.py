"""One evaluation task and how it is fitted: shared by the local grid and the Ray executor.

A :class:`Task` is one (embedding space, split, fold, head with parameters) fit on a
:class:`Space`'s matrix; :func:`fit_task` fits it head by head, :func:`logreg_split` fits the
logistic-regression folds of the splits over the same cells together (:func:`logreg_groups`).
Both return :class:`Outcome` values, which :func:`Outcome.to_store` turns into the store's
evaluation records (scored there, the same way for every head and stage).
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from scipy.special import expit

from scdm.classify.heads import LogRegHead, get_head, head_revision
from scdm.store.errors import InputDataError
from scdm.store.evaluation import SkippedTask, TaskKey, TaskOutcome
from scdm.store.splits import Split

__all__ = ["Space", "Task", "Outcome", "TORCH_HEADS", "fit_task", "logreg_groups", "logreg_split", "one_math_thread",
           "runs_torch", "same_cells_key"]


@dataclass(frozen=True)
class Task:
    """One (embedding space, split, fold, head) fit."""

    task_id: str
    space: Space
    split: Split
    fold: int
    head: str
    params: dict[str, Any]
    params_key: str

    @classmethod
    def make(cls, space: Space, split: Split, fold: int, head: str, params: dict[str, Any], params_key: str) -> Task:
        """The task with its identity (:func:`store.evaluation.task_id`)."""
        key = TaskKey(space.space_id, space.model, space.variant, tuple(space.embedding_ids), split,
                      space.datasets(split), fold, head, params_key, head_revision(head, params))
        return cls(key.task_id, space, split, fold, head, params, params_key)

    def key(self) -> TaskKey:
        """The store's identity record of this task."""
        space = self.space
        return TaskKey(space.space_id, space.model, space.variant, tuple(space.embedding_ids), self.split,
                       space.datasets(self.split), self.fold, self.head, self.params_key,
                       head_revision(self.head, self.params))


@dataclass
class Space:
    space_id: str
    model: str
    variant: str
    embeddings: pd.DataFrame  # one row per dataset: embedding_id, dataset_id, dataset_name, dim
    cells: pd.DataFrame | None = None
    splits: list[Split] = field(default_factory=list)
    X: np.ndarray | None = None
    y: np.ndarray | None = None
    lookup: dict[str, np.ndarray] = field(default_factory=dict)
    lora: tuple[str, int] | None = None
    """(split_id, fold) a LoRA variant was tuned on: it is evaluated on that fold's test cells only."""

    @property
    def embedding_ids(self) -> list[str]:
        return sorted(self.embeddings["embedding_id"])

    def datasets(self, split: Split) -> str:
        """Names of the datasets ``split`` covers, sorted and comma-separated (a result-identity column)."""
        names = dict(zip(self.embeddings["dataset_id"], self.embeddings["dataset_name"]))
        return ",".join(sorted({str(names.get(d, d)) for d in split.cells["dataset_id"].unique()}))

    def skipped(self, split: Split, fold: int | None, head: str, reason: str) -> SkippedTask:
        """The record of a task of this space that is not fitted."""
        return SkippedTask(self.space_id, split, self.datasets(split), fold, head, reason)

    def positions(self, frame: pd.DataFrame) -> np.ndarray:
        """Rows of ``X`` holding the cells (dataset_id, row) of ``frame``."""
        out = np.empty(len(frame), np.int64)
        ds = frame["dataset_id"].to_numpy()
        rows = frame["row"].to_numpy(np.int64)
        for dataset_id in pd.unique(ds):
            sel = ds == dataset_id
            out[sel] = self.lookup[dataset_id][rows[sel]]
        if (out < 0).any():  # -1 would silently read the last cell's embedding and label
            missing = frame.iloc[int(np.flatnonzero(out < 0)[0])]
            msg = (f"Cell {missing['row']} of dataset {missing['dataset_id']} is in a split of space {self.space_id} but "
                   f"not among its labelled cells; the split and the labels disagree (report this as a bug).")
            raise RuntimeError(msg)
        return out


@dataclass
class Outcome:
    task: Task
    proba: np.ndarray | None
    test_pos: np.ndarray | None
    fit_seconds: float
    predict_seconds: float
    n_train: int
    error: str | None = None

    def to_store(self) -> TaskOutcome:
        """The store record of a fitted task (its test cells' labels, predictions and ids)."""
        task, space = self.task, self.task.space
        assert space.y is not None and space.cells is not None and self.test_pos is not None and self.proba is not None
        cells = space.cells
        return TaskOutcome(task.key(), space.y[self.test_pos], self.proba,
                           cells["dataset_id"].to_numpy()[self.test_pos], cells["row"].to_numpy(np.int64)[self.test_pos],
                           self.n_train, self.fit_seconds, self.predict_seconds)


def fit_task(task: Task) -> Outcome:
    """Fit one head on one fold's training cells and predict its test cells."""
    space, split = task.space, task.split
    assert space.X is not None and space.y is not None
    pos = space.positions(split.cells)
    test = split.test_mask(task.fold)
    train_pos, test_pos = pos[~test], pos[test]
    try:
        head = get_head(task.head, **task.params)
        t0 = time.perf_counter()
        if getattr(head, "uses_target_domain", False):
            # domain adaptation (dann): the held-out study's cells are the unlabelled target; their labels are never read
            head.fit(space.X[train_pos], space.y[train_pos], target=space.X[test_pos])  # type: ignore[call-arg]
        else:
            head.fit_rows(space.X, train_pos, space.y)  # mlp reads the rows in place; the others get a copy
        t1 = time.perf_counter()
        proba = head.predict_proba_rows(space.X, test_pos)
        t2 = time.perf_counter()
    except InputDataError as err:
        return Outcome(task, None, None, 0.0, 0.0, int(train_pos.size), error=str(err))
    return Outcome(task, proba, test_pos, t1 - t0, t2 - t1, int(train_pos.size))


def same_cells_key(split: Split) -> str:
    """Identity of a split's cells, in order, without its folds: splits sharing it read the same rows.

    The pooled and the cross-data split of one category hold the same cells (only their folds
    differ), so their logistic regressions are solved in one batch.
    """
    hashed = pd.util.hash_pandas_object(split.cells[["dataset_id", "row"]], index=False).to_numpy()
    return hashlib.blake2b(hashed.tobytes(), digest_size=16).hexdigest()


def logreg_groups(tasks: Sequence[Task]) -> list[list[Task]]:
    """The logistic-regression tasks fitted together: every fold of the splits over the same cells.

    Grouped by head parameters and :func:`same_cells_key`, in the order the tasks come; both
    executors use this grouping, so a task's numbers do not depend on the executor.
    """
    keys: dict[str, str] = {}
    groups: dict[tuple[str, str], list[Task]] = {}
    for task in tasks:
        split = task.split
        if split.split_id not in keys:
            keys[split.split_id] = same_cells_key(split)
        groups.setdefault((task.params_key, keys[split.split_id]), []).append(task)
    return list(groups.values())


def logreg_split(space: Space, tasks: list[Task], *, threads: int | None = None) -> Iterator[Outcome]:
    """The folds of one group of :func:`logreg_groups` fitted together (see ``fit_logreg_folds``).

    ``tasks`` are folds of one split, or of several splits over the same cells in the same order
    (checked); ``threads`` share each pass over the rows.
    """
    from scdm.classify._logreg_batch import fit_logreg_folds

    assert space.X is not None and space.y is not None
    first, params = tasks[0].split, tasks[0].params
    others = {t.split.split_id: t.split for t in tasks if t.split.split_id != first.split_id}
    if others and any(same_cells_key(split) != same_cells_key(first) for split in others.values()):
        msg = "logreg_split: the tasks' splits must hold the same cells in the same order (group them with logreg_groups)"
        raise ValueError(msg)
    head = LogRegHead(**params)
    head.validate_params()
    pos = space.positions(first.cells)
    y = space.y[pos]
    fittable, train = [], []
    for task in tasks:
        mask = task.split.train_mask(task.fold)
        if np.unique(y[mask]).size < 2:  # the head's own rule: both classes or no fit
            error = (f"LogRegHead needs both classes in its training cells, but all {int(mask.sum())} are "
                     f"{int(y[mask][0]) if mask.any() else 'absent'}; this task cannot be fitted.")
            yield Outcome(task, None, None, 0.0, 0.0, int(mask.sum()), error=error)
            continue
        fittable.append(task)
        train.append(mask)
    if not fittable:
        return
    t0 = time.perf_counter()
    # the split's rows are read from space.X in place (no copy of them: see _logreg_batch)
    fits = fit_logreg_folds(space.X, y, np.stack(train, axis=1), rows=pos, C=head.C, tol=head.tol,
                            max_iter=head.max_iter, standardize=head.standardize, threads=threads, decisions=True)
    assert fits.decision is not None
    # every fold scored every cell in one pass (its test cells among them): no pass per fold over its test rows
    predict_seconds = fits.decision_seconds / len(fittable)
    fit_seconds = (time.perf_counter() - t0 - fits.decision_seconds) / len(fittable)
    for k, task in enumerate(fittable):
        # the checks and the warning of a head fitted alone (max_iter reached)
        LogRegHead(**params).set_solution(fits.coef[k], fits.intercept[k], n_iter=int(fits.n_iter[k]),
                                          converged=bool(fits.converged[k]))
        test = task.split.test_mask(task.fold)
        proba = expit(fits.decision[test, k].astype(np.float64))
        yield Outcome(task, proba, pos[test], fit_seconds, predict_seconds, int(train[k].sum()))


PREDICT_BLOCK_ROWS = 2048
"""Rows per prediction block (a head may standardise them in float64: 8 MiB at D=512); a fold's test rows
are never copied nor standardised all at once."""


def predict_in_blocks(head: Any, X: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """``head.proba_sensitive(X[positions])`` block by block (the same values: each row is scored alone)."""
    if positions.size <= PREDICT_BLOCK_ROWS:
        return np.asarray(head.proba_sensitive(X[positions]))
    return np.concatenate([np.asarray(head.proba_sensitive(X[positions[lo:lo + PREDICT_BLOCK_ROWS]]))
                           for lo in range(0, positions.size, PREDICT_BLOCK_ROWS)])


TORCH_HEADS = ("mlp", "dann", "lora-mlp")
"""Heads that run torch inside a fit (their torch thread count is pinned like BLAS's)."""


def runs_torch(head: str, params: dict[str, Any]) -> bool:
    """Whether a fit of ``head`` runs torch: a torch head, or a shuffled-label baseline of one."""
    return head in TORCH_HEADS or (head == "shuffled-label" and params.get("base") in TORCH_HEADS)


@contextlib.contextmanager
def one_math_thread(*, torch_heads: bool) -> Iterator[None]:
    """One BLAS/OpenMP thread (and one torch thread when torch heads run) for the block."""
    from threadpoolctl import threadpool_limits

    torch: Any = None
    if torch_heads:
        import torch as torch_module

        torch = torch_module
    before = torch.get_num_threads() if torch else 0
    if torch:
        torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1):
            yield
    finally:
        if torch:
            torch.set_num_threads(before)