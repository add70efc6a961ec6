"""The evaluation grid on a Ray cluster: (space, split, fold, head) fits as Ray tasks.

:func:`scdm.classify.grid.evaluate` with ``executor="ray"`` hands the non-ridge tasks of each
embedding space to :class:`RayGrid`. The driver stays the only process that touches the store:

- **Data movement.** Each space's embedding matrix (with labels and row lookup) is ``ray.put``
  **once** into the object store and each split (its cells and fold assignment) once; a Ray task
  receives those ObjectRefs plus a list of (task id, fold, head, params), never a matrix. Workers
  on the driver's node map the matrix zero-copy from shared memory; workers on other nodes fetch
  it once per node. Putting once (rather than workers reading the Zarr arrays) is right for the
  grid: the driver has already read and filtered the labelled rows, and one copy per node is
  what every fold of every head then shares.
- **Batching.** Tasks of one (split, head) are grouped into batches so a cheap head (majority,
  small categories) does not pay Ray's per-task cost (~5-10 ms) per fold; there are about four
  batches per cluster CPU so the cluster stays busy while results stream back. Logistic
  regression solves all folds of a split together (one L-BFGS per fold in lockstep, see
  :mod:`scdm.classify._logreg_batch`); such a group is always one Ray task, the same group the
  local executor solves.
- **Same numbers as local.** A batch calls the local executor's own ``fit_task`` on each task,
  with one math thread per fit and the same seeds, so metrics are identical to
  ``executor="local"``. (The local executor also uses one thread per fit for matrices below
  ``grid.SMALL_MATRIX`` entries and for parallel jobs; on a larger matrix its ``jobs=1`` fits and
  its batched logreg use every BLAS thread, whose different summation order can move the last
  bits of a score.)
- **Ridge stays on the driver.** The grid computes every ridge task of a space from shared Gram
  statistics (one pass per split, or per-atom statistics shared by every cross-data split, folds
  by downdates): one sequential computation over the whole matrix whose parts reuse each other,
  not a set of independent fits, and it costs a few passes over a matrix the driver already holds.
  Shipping it as Ray tasks would mean shipping the statistics. The driver computes it between
  polls of the Ray results, so it overlaps with the workers' fits (pass it as ``driver_side``).
- **Head settings as the task id says.** Settings a head resolves from the machine (mlp
  ``precision="auto"``: bf16 where the CPU has it; dann ``cluster_method="auto"``: the clustering
  packages installed) are resolved on the driver, where they become part of the task id; a worker
  with another CPU or other packages would resolve them otherwise. So a task travels with its
  parameters as its id spells them (``auto`` replaced by what it stood for on the driver), and a
  worker whose head would still have another identity records the task as not fitted, saying why.
- **Results and failures.** Results come back through a ``ray.wait`` loop as soon as each batch
  ends; the caller writes them in batches through the grid's ``_Writer`` (resume then skips
  finished tasks exactly as with the local executor). A batch whose worker dies or raises is
  retried by Ray (``max_retries``); only the successful attempt's results reach the driver, so a
  task is recorded once. A head's own input error is recorded as a skipped task, as locally. The
  warnings a batch's fits raise (logreg stopping at ``max_iter``, ...) come back with its results
  and are raised again on the driver, where a local run's fits raise them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from scdm.classify.heads import HEADS, get_head
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
from scdm.store.errors import InputDataError

if TYPE_CHECKING:
    from scdm.classify.splits import Split

logger = logging.getLogger(__name__)

__all__ = ["RayGrid", "RayGridStats", "import_ray"]

MAX_RETRIES = 3
"""Attempts Ray makes again when a batch's worker dies or the batch raises."""
BATCHES_PER_CPU = 4
"""Target batches per cluster CPU: enough for load balance, few enough to amortise per-task costs."""
SPLIT_HEADS = ("logreg",)
"""Heads whose folds are solved together (``tasks.logreg_groups``: every fold of the splits over the
same cells): one Ray task holds exactly the group the local executor solves together, so the numbers
are the same."""

_crash_on_first_attempt: dict[str, str] = {}
"""Test hook: task id -> ``"exit"`` or ``"raise"``. The batch holding that task kills its worker
(``os._exit``) or raises on its first attempt; the driver passes this to the batch at submission."""


def import_ray() -> Any:
    """Import Ray, or say how to install it."""
    try:
        import ray
    except ImportError as err:
        msg = "--executor ray needs Ray: pip install 'scdm[ray]'"
        raise InputDataError(msg) from err
    return ray


@dataclass
class RayGridStats:
    """Telemetry of the Ray executor over one :func:`~scdm.classify.grid.evaluate` call."""

    cluster_cpus: int = 0
    """CPUs of the cluster when the executor connected."""
    tasks: int = 0
    """Tasks fitted by Ray workers (ridge, done on the driver, not counted)."""
    batches: int = 0
    """Ray tasks (batches of fits) that finished."""
    retried: int = 0
    """Failed attempts of those batches that Ray retried (worker died or the batch raised)."""
    failed: int = 0
    """Fits recorded as skipped because the head refused its input."""
    train_cells: int = 0
    """Training cells summed over the fits."""
    worker_seconds: float = 0.0
    """Seconds the workers spent inside batches (their successful attempts)."""
    wall_seconds: float = 0.0
    """Driver wall time from the first submission to the last result, summed over spaces."""

    def line(self) -> str:
        """One log line: tasks, batches, retries, failures and throughput."""
        rate = self.tasks / self.wall_seconds if self.wall_seconds else 0.0
        cells = self.train_cells / self.wall_seconds if self.wall_seconds else 0.0
        return (f"ray executor: {self.tasks} tasks in {self.batches} batches on {self.cluster_cpus} CPUs, "
                f"{self.retried} retried, {self.failed} failed; {rate:.1f} tasks/s, {cells:,.0f} training cells/s, "
                f"workers busy {self.worker_seconds:.1f} s of {self.wall_seconds:.1f} s wall")


@dataclass(frozen=True)
class _Item:
    """What a worker needs of one task besides the space and split (they travel as ObjectRefs)."""

    task_id: str
    split_id: str
    fold: int
    head: str
    params: dict[str, Any]
    params_key: str


@dataclass(frozen=True)
class _BatchResult:
    outcomes: list[tuple[str, np.ndarray | None, np.ndarray | None, float, float, int, str | None]]
    attempt: int
    seconds: float
    warnings: tuple[tuple[type[Warning], str], ...] = ()
    """The warnings the fits raised (category, message), once each: the driver raises them again."""


class RayGrid:
    """Connection to a Ray cluster that runs the grid's fits; one per :func:`evaluate` call.

    Parameters
    ----------
    address : str, optional
        ``None``: start a local cluster (or join the one in ``RAY_ADDRESS``, as ``ray.init`` does);
        ``"auto"``: join the cluster running on this machine; ``"ray://host:10001"``: Ray client
        (every ``ray.put`` then crosses the network: prefer running on the head node with ``"auto"``).
        If Ray is already initialised in this process, that cluster is used and left running.
    max_retries : int, default 3
        Attempts Ray makes again for a batch whose worker dies or that raises.
    """

    def __init__(self, address: str | None = None, *, max_retries: int = MAX_RETRIES) -> None:
        self.ray = import_ray()
        self.max_retries = max_retries
        self.started = False
        if self.ray.is_initialized():
            logger.info("ray: using the cluster this process is already connected to")
        else:
            t0 = time.perf_counter()
            # A new local cluster: no dashboard, and worker logs stay in Ray's session folder (heads'
            # convergence warnings would flood stderr). A Ray client (ray://) takes no such options.
            options = {} if address is not None and "://" in address else {"log_to_driver": False}
            if address is None:
                options["include_dashboard"] = False
            self.ray.init(address=address, **options)
            self.started = True
            logger.info("ray: connected to %s in %.1f s", address or "a new local cluster", time.perf_counter() - t0)
        self.stats = RayGridStats(cluster_cpus=int(self.ray.cluster_resources().get("CPU", 0)))
        self._remote = self.ray.remote(num_cpus=1, max_retries=max_retries, retry_exceptions=True)(_fit_batch)

    def close(self) -> None:
        """Log the telemetry and shut down the cluster if this object started it."""
        if self.stats.batches:
            logger.info(self.stats.line())
        if self.started and self.ray.is_initialized():
            self.ray.shutdown()
        self.started = False

    def outcomes(self, space: Space, tasks: list[Task], *, driver_side: Iterable[Outcome] = (),
                 bar: Any = None) -> Iterator[Outcome]:
        """Fit ``tasks`` (all of ``space``) on the cluster; yield each outcome as its batch ends.

        Parameters
        ----------
        space : Space
            The space, with its matrix loaded.
        tasks : list of Task
            Pending tasks of the space (no ridge: see ``driver_side``).
        driver_side : iterable of Outcome
            Work the driver does itself while the workers fit (the ridge outcomes); consumed
            between polls and yielded in between.
        bar : tqdm, optional
            Progress bar whose postfix shows failed and retried counts.
        """
        ray = self.ray
        side: Iterator[Outcome] | None = iter(driver_side)
        if not tasks:
            yield from driver_side
            return
        t0 = time.perf_counter()
        by_id = {t.task_id: t for t in tasks}
        # One copy of the matrix in the object store; the cells frame and splits stay on the driver.
        space_ref = ray.put(dataclasses.replace(space, cells=None, splits=[]))
        split_refs: dict[str, Any] = {}
        pending: dict[Any, list[str]] = {}
        for batch in _batches(tasks, self._batch_size(len(tasks))):
            splits = {t.split.split_id: t.split for t in batch}
            for split_id, split in splits.items():
                if split_id not in split_refs:
                    split_refs[split_id] = ray.put(split)
            crash = next((_crash_on_first_attempt[t.task_id] for t in batch if t.task_id in _crash_on_first_attempt), None)
            items = [_Item(t.task_id, t.split.split_id, t.fold, t.head, _resolved_params(t.head, t.params, t.params_key),
                           t.params_key) for t in batch]
            refs = [split_refs[split_id] for split_id in splits]  # top-level arguments: Ray resolves them
            pending[self._remote.remote(space_ref, items, crash, *refs)] = [t.task_id for t in batch]
        logger.info("ray: %d tasks of space %s in %d batches", len(tasks), space.space_id, len(pending))
        try:
            while pending or side is not None:
                if pending:
                    # Poll without blocking while the driver has its own work; block once it has none.
                    ready, _ = ray.wait(list(pending), num_returns=len(pending) if side is not None else 1,
                                        timeout=0 if side is not None else None)
                    for ref in ready:
                        del pending[ref]
                        yield from self._collect(ray.get(ref), by_id, bar)
                if side is not None:
                    out = next(side, None)
                    if out is None:
                        side = None
                    else:
                        yield out
        finally:
            for ref in pending:  # the run failed or was interrupted: stop what is still queued
                ray.cancel(ref)
            self.stats.wall_seconds += time.perf_counter() - t0

    def _batch_size(self, n_tasks: int) -> int:
        return max(1, math.ceil(n_tasks / (BATCHES_PER_CPU * max(self.stats.cluster_cpus, 1))))

    def _collect(self, result: _BatchResult, by_id: dict[str, Task], bar: Any) -> Iterator[Outcome]:
        stats = self.stats
        for category, message in result.warnings:
            # as a local fit's warning reaches the user (a worker's stderr may never reach the driver)
            warnings.warn(message, category, stacklevel=2)
        stats.batches += 1
        stats.retried += result.attempt
        stats.worker_seconds += result.seconds
        for task_id, proba, test_pos, fit_s, predict_s, n_train, error in result.outcomes:
            stats.tasks += 1
            stats.train_cells += n_train
            stats.failed += error is not None
            yield Outcome(by_id[task_id], proba, test_pos, fit_s, predict_s, n_train, error=error)
        if bar is not None and (stats.failed or stats.retried):
            bar.set_postfix(failed=stats.failed, retried=stats.retried, refresh=False)


def _batches(tasks: list[Task], size: int) -> Iterator[list[Task]]:
    """Consecutive folds of one (split, head, params), at most ``size`` per batch (split heads: their group)."""
    yield from logreg_groups([t for t in tasks if t.head in SPLIT_HEADS])
    groups: dict[tuple[str, str, str], list[Task]] = {}
    for task in tasks:
        if task.head not in SPLIT_HEADS:
            groups.setdefault((task.split.split_id, task.head, task.params_key), []).append(task)
    for group in groups.values():
        for start in range(0, len(group), size):
            yield group[start:start + size]


def _resolved_params(head: str, params: dict[str, Any], params_key: str) -> dict[str, Any]:
    """The head parameters as the task id spells them (``auto`` settings as the driver resolved them).

    ``params_key`` builds the same head (the heads' contract), with machine-dependent settings
    fixed; ``params`` as given where it does not (an unknown head or parameters that do not build).
    """
    if head not in HEADS:
        return params
    try:
        spelled = json.loads(params_key)
        # JSON has no tuple: a tuple parameter (dann's hidden) comes back a list, which the head refuses
        given = get_head(head, **params).get_params()
        if isinstance(spelled, dict):
            spelled = {k: tuple(v) if isinstance(v, list) and isinstance(given.get(k), tuple) else v
                       for k, v in spelled.items()}
        same = get_head(head, **spelled).params_key() == params_key
    except (InputDataError, TypeError, ValueError):
        return params
    return spelled if same and isinstance(spelled, dict) else params


# --------------------------------------------------------------------------------------------
# worker side
# --------------------------------------------------------------------------------------------
def _identity_differs(item: _Item) -> str | None:
    """Why this worker would fit another head than the task id names (None when it would not)."""
    if item.head not in HEADS:
        return None
    try:
        here = get_head(item.head, **item.params).params_key()
    except (InputDataError, TypeError):
        return None  # the fit itself says what is wrong with the parameters
    if here == item.params_key:
        return None
    return (f"the Ray worker resolves the {item.head} head's settings to {here}, but the task was planned (and is "
            f"identified) as {item.params_key}; give these settings explicitly (not 'auto') or use workers with the "
            "driver's packages and CPU features")
def _fit_batch(space: Space, items: list[_Item], crash: str | None, *splits: Split) -> _BatchResult:
    """Fit a batch of tasks of ``splits`` in a Ray worker (the matrix arrives zero-copy)."""
    attempt = _attempt_number()
    if crash is not None and attempt == 0:
        if crash == "exit":
            os._exit(1)  # a killed worker: Ray sees the process die mid-task
        msg = "injected failure on the first attempt (test hook)"
        raise RuntimeError(msg)
    t0 = time.perf_counter()
    by_id = {split.split_id: split for split in splits}
    tasks = [Task(item.task_id, space, by_id[item.split_id], item.fold, item.head, item.params, item.params_key)
             for item in items]
    differs = {item.task_id: why for item in items if (why := _identity_differs(item)) is not None}
    with one_math_thread(torch_heads=any(runs_torch(item.head, item.params) for item in items)), \
            warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if tasks[0].head in SPLIT_HEADS:  # the group's folds together, as the local executor does
            outcomes = list(logreg_split(space, tasks))
        else:
            outcomes = [fit_task(task) if task.task_id not in differs
                        else Outcome(task, None, None, 0.0, 0.0, 0, error=differs[task.task_id]) for task in tasks]
    results = [(out.task.task_id, out.proba, out.test_pos, out.fit_seconds, out.predict_seconds, out.n_train, out.error)
               for out in outcomes]
    raised = tuple(dict.fromkeys((w.category, str(w.message)) for w in caught))
    return _BatchResult(results, attempt, time.perf_counter() - t0, raised)


def _attempt_number() -> int:
    """0 on a task's first attempt, 1 on its first retry, ... (0 if Ray does not say)."""
    from ray._private.worker import global_worker

    core = getattr(global_worker, "core_worker", None)
    getter = getattr(core, "get_current_task_attempt_number", None)
    return int(getter()) if getter is not None else 0


