"""Evaluation records: runs, finished tasks, their metrics and predictions, skipped tasks.

A *task* is one (embedding space, split, fold, head with its parameters) fit. Its identity is
:func:`task_id`; its result rows carry the whole result identity (embedding space, datasets,
label set, split with scenario/scheme/k/seed, head and parameters, variant), so nothing reading
them needs to re-join to know what a number is. Both stages score and write tasks through
:class:`ResultWriter`, so a LoRA-tuned head's row and a frozen-embedding head's row are computed by
the same code (:func:`store.metrics.compute_metrics`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from scdm.store._catalog import registered
from scdm.store.metrics import METRICS, FoldMetrics, compute_metrics

if TYPE_CHECKING:
    import duckdb

    from scdm.store._store import Store
    from scdm.store.splits import Split

__all__ = [
    "TaskKey",
    "unanswered_flag",
    "unanswered_sql",
    "TaskOutcome",
    "SkippedTask",
    "ResultWriter",
    "task_id",
    "start_run",
    "finish_run",
    "finished_tasks",
    "same_fits",
    "delete_tasks",
    "task_results",
    "run_skipped",
    "skip_reasons",
    "record_tasks",
    "forget_tasks",
    "forget_variant_tasks",
    "respell_head_params",
    "stored_head_params",
    "stored_revision_sql",
    "OUTSIDE_GRID_REVISIONS",
]

logger = logging.getLogger(__name__)

OUTSIDE_GRID_REVISIONS: dict[str, int] = {"lora-mlp": 2}
"""Revisions of heads fitted outside the evaluation grid (``scdm finetune``'s ``lora-mlp``), named here
because both stages read them: finetune records and keys its tasks with it, the results leave out rows of
an earlier one. 2: the softmax runs in float64 (before: float32, exactly 1.0 past a logit gap of ~16.6)."""


def _now() -> pd.Timestamp:
    return pd.Timestamp.now(tz="UTC").tz_localize(None)


def task_id(space_id: str, embedding_ids: Sequence[str], split_id: str, fold: int, head: str, params_key: str,
            label_set: str | None = None, revision: int = 1) -> str:
    """The identity of one task: a rerun with the same inputs finds it finished.

    ``label_set`` only for a split shared with other label-set names (``Split.partition_of``): the
    same fit under another name is a task of its own; left out otherwise, so stored ids stay valid.
    ``revision``: the head's (what it computes, raised by fixes that change its numbers), from 2
    on: a task an earlier revision stored is not this task.
    """
    parts: list[Any] = [space_id, sorted(embedding_ids), split_id, int(fold), head, params_key]
    if label_set is not None:
        parts.append(label_set)
    if revision != 1:
        parts.append({"revision": int(revision)})
    text = json.dumps(parts)
    return hashlib.blake2b(text.encode(), digest_size=10).hexdigest()


@dataclass(frozen=True)
class TaskKey:
    """Everything that identifies one task's result."""

    space_id: str
    model: str
    variant: str
    embedding_ids: tuple[str, ...]
    split: Split
    datasets: str
    """Names of the datasets the split covers, sorted, comma-separated."""
    fold: int
    head: str
    params_key: str
    """Canonical JSON of the head's parameters."""
    revision: int = 1
    """The head's revision (see :func:`task_id`)."""

    @property
    def task_id(self) -> str:
        s = self.split
        shared = s.label_set if s.partition_of is not None else None
        return task_id(self.space_id, self.embedding_ids, s.split_id, self.fold, self.head, self.params_key, shared,
                       self.revision)

    def columns(self) -> dict[str, Any]:
        """The identity columns shared by eval_tasks and eval_results rows."""
        s = self.split
        return {"task_id": self.task_id, "space_id": self.space_id, "model": self.model, "variant": self.variant,
                "split_id": s.split_id, "scenario": s.scenario, "category_type": s.category_type,
                "category": s.category, "scheme": s.scheme, "fold": int(self.fold), "head": self.head,
                "label_set": s.label_set, "datasets": self.datasets, "n_folds": int(s.n_folds), "seed": s.seed}


@dataclass
class TaskOutcome:
    """One fitted task: the test cells' labels and predicted P(sensitive)."""

    key: TaskKey
    y_true: np.ndarray
    proba: np.ndarray
    dataset_ids: np.ndarray
    """dataset_id of each test cell."""
    rows: np.ndarray
    """Row of each test cell in its dataset."""
    n_train: int
    fit_seconds: float
    predict_seconds: float
    hard_only: bool = False
    """``proba`` holds hard labels (0/1), not probabilities (e.g. a language model's answers without
    token log-probabilities): AUROC and AP are NULL with the flag ``no_scores``."""
    extra_flags: tuple[str, ...] = ()
    """Flags the producer adds to the metric flags (e.g. ``unanswered=3``: test cells without an answer)."""

    def metrics(self) -> FoldMetrics:
        """The one scoring of a task (the same for every head and both stages)."""
        # scored as eval_predictions stores them: in float64 (DOUBLE since migration 15), so the metrics
        # recomputed from the stored predictions are these; float32 tied every cell past a logit of ~16.6
        stored = np.asarray(self.proba, dtype=np.float64)
        return compute_metrics(self.y_true, stored, hard_only=self.hard_only)


@dataclass(frozen=True)
class SkippedTask:
    """A task not fitted, and why (split or fold skipped, one training class, the head failed)."""

    space_id: str
    split: Split
    datasets: str
    fold: int | None
    head: str
    reason: str

    def row(self, run_id: str) -> dict[str, Any]:
        s = self.split
        return {"run_id": run_id, "space_id": self.space_id, "split_id": s.split_id, "scenario": s.scenario,
                "category_type": s.category_type, "category": s.category, "fold": self.fold, "head": self.head,
                "reason": self.reason, "created_at": _now(), "label_set": s.label_set, "datasets": self.datasets}


def unanswered_flag(n: int) -> tuple[str, ...]:
    """The task flag of ``n`` test cells scored on no answer (a prompting model's unreadable answers)."""
    return (f"unanswered={int(n)}",) if n else ()


def unanswered_sql(flags: str) -> str:
    """SQL: the test cells a task left unscored for want of an answer (0 without the flag), from the
    ``eval_tasks.flags`` expression ``flags``. Its metrics are over the other test cells only."""
    return f"coalesce(TRY_CAST(regexp_extract({flags}, 'unanswered=([0-9]+)', 1) AS BIGINT), 0)"


@dataclass
class _Rows:
    tasks: list[dict[str, Any]] = field(default_factory=list)
    results: list[dict[str, Any]] = field(default_factory=list)
    predictions: list[pd.DataFrame] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.tasks or self.skipped)


def _task_rows(out: TaskOutcome, run_id: str, save_predictions: bool) -> tuple[dict[str, Any], list[dict[str, Any]], pd.DataFrame | None]:
    m = out.metrics()
    common = {**out.key.columns(), "run_id": run_id}
    results = [{**common, "metric": name, "value": m.values[name], "n_train": out.n_train, "n_test": m.n,
                "fit_seconds": out.fit_seconds, "head_params": out.key.params_key} for name in METRICS]
    task = {**common, "embedding_ids": json.dumps(sorted(out.key.embedding_ids)), "head_params": out.key.params_key,
            "n_train": out.n_train, "n_test": m.n, "n_test_pos": m.n_pos, "fit_seconds": out.fit_seconds,
            "predict_seconds": out.predict_seconds, "flags": ",".join((*m.flags, *out.extra_flags)) or None,
            "created_at": _now()}
    preds = None
    if save_predictions:
        preds = pd.DataFrame({"task_id": out.key.task_id, "dataset_id": np.asarray(out.dataset_ids, dtype=object),
                              "row": np.asarray(out.rows, dtype=np.int32), "y_true": np.asarray(out.y_true, dtype=np.int8),
                              "proba": np.asarray(out.proba, dtype=np.float64)})
    return task, results, preds


def _without_gone_splits(con: duckdb.DuckDBPyConnection, rows: _Rows) -> tuple[_Rows, int]:
    """The rows whose split is still stored, and how many tasks were dropped.

    A split goes (with its results) when its cells' labels are replaced, their metadata rewritten
    or their dataset removed (:func:`forget_tasks`). A run that was fitting it at that moment must
    not store results of the old labels afterwards: they would outlive the cleanup and print
    beside the results of the new partition.
    """
    asked = sorted({r["split_id"] for r in (*rows.tasks, *rows.skipped)})
    if not asked:
        return rows, 0
    kept = {r[0] for r in con.execute("SELECT split_id FROM splits WHERE list_contains(?, split_id)", [asked]).fetchall()}
    if len(kept) == len(asked):
        return rows, 0
    ids = {t["task_id"] for t in rows.tasks if t["split_id"] in kept}
    skipped = [s for s in rows.skipped if s["split_id"] in kept]
    return _keep_tasks(rows, ids, skipped), len(rows.tasks) - len(ids)


def _keep_tasks(rows: _Rows, ids: set[str], skipped: list[dict[str, Any]] | None = None) -> _Rows:
    """The rows of the tasks ``ids`` (every table), with ``skipped`` (default: as they were)."""
    return _Rows(tasks=[t for t in rows.tasks if t["task_id"] in ids],
                 results=[r for r in rows.results if r["task_id"] in ids],
                 predictions=[p for p in rows.predictions if p["task_id"].isin(ids).all()],
                 skipped=rows.skipped if skipped is None else skipped)


def _write(st: Store, rows: _Rows, replaces: dict[str, str] | None = None) -> tuple[int, int]:
    """One transaction: a task is stored whole or not at all, and once.

    ``replaces``: task id -> the id of the same fit stored under another id without predictions
    (:func:`same_fits`), deleted when the task is stored, so the fold is never stored twice.

    The first run to store a task owns it: another run that fitted the same task at the same time
    (two identical ``scdm evaluate`` at once) counts it as reused, so each run's ``n_done`` is the
    number of task rows carrying its ``run_id`` and filtering by run finds what the run says it fitted.
    Returns how many tasks were not stored, by reason: (their split was removed meanwhile, another
    run had stored them first).
    """
    replaces = replaces or {}
    with st.catalog.transaction() as con:
        rows, dropped = _without_gone_splits(con, rows)
        ids = [t["task_id"] for t in rows.tasks]
        stored = {r[0] for r in con.execute("SELECT task_id FROM eval_tasks WHERE list_contains(?, task_id)",
                                            [ids]).fetchall()} if ids else set()
        # a task stored without predictions (--no-predictions) is replaced by a fit that has them
        stored -= _tasks_without_predictions(con, stored) & {p["task_id"].iloc[0] for p in rows.predictions if len(p)}
        if stored:
            rows = _keep_tasks(rows, set(ids) - stored)
        if rows.tasks:
            # rows of these tasks without their eval_tasks row (deleted by hand) are replaced, never doubled
            written = [t["task_id"] for t in rows.tasks]
            delete_tasks(con, written + [replaces[i] for i in written if i in replaces])
            if rows.predictions:
                st.catalog.insert_df("eval_predictions", pd.concat(rows.predictions, ignore_index=True), con)
            st.catalog.insert_df("eval_results", pd.DataFrame(rows.results), con)
            st.catalog.insert_df("eval_tasks", pd.DataFrame(rows.tasks), con)
        if rows.skipped:
            st.catalog.insert_df("skipped_tasks", pd.DataFrame(rows.skipped), con)
    return dropped, len(stored)


class ResultWriter:
    """Scores finished tasks and writes them (with predictions) in short catalog transactions.

    Parameters
    ----------
    st
        The store.
    run_id
        The run the rows belong to (:func:`start_run`).
    save_predictions
        Also write per-cell test predictions (``eval_predictions``).
    flush_seconds
        Buffer rows for at most this long between transactions.
    """

    def __init__(self, st: Store, run_id: str, *, save_predictions: bool = True, flush_seconds: float = 5.0) -> None:
        self.st, self.run_id, self.save_predictions = st, run_id, save_predictions
        self.flush_seconds = flush_seconds
        self._rows = _Rows()
        self._last = time.monotonic()
        self.n_dropped = 0
        """Finished tasks not stored: their split was removed while they were fitted (labels
        replaced, metadata rewritten, dataset removed); a rerun fits them on the new splits."""
        self.n_elsewhere = 0
        """Finished tasks not stored because another run stored them first (they count as reused)."""
        self.replaces: dict[str, str] = {}
        """Task id -> the same fit stored under another id without predictions, replaced when it is written."""

    def add(self, out: TaskOutcome) -> None:
        task, results, preds = _task_rows(out, self.run_id, self.save_predictions)
        self._rows.tasks.append(task)
        self._rows.results += results
        if preds is not None:
            self._rows.predictions.append(preds)
        self._maybe_flush()

    def skip(self, skipped: SkippedTask) -> None:
        self._rows.skipped.append(skipped.row(self.run_id))
        self._maybe_flush()

    def _maybe_flush(self) -> None:
        if time.monotonic() - self._last > self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        if self._rows:
            dropped, elsewhere = _write(self.st, self._rows, self.replaces)
            self.n_elsewhere += elsewhere
            if dropped:
                logger.warning("%d finished tasks were not stored: the labels, metadata or dataset of their cells changed "
                               "while they were fitted, which removed their splits; run the same command again to "
                               "evaluate the new data", dropped)
            self.n_dropped += dropped
        self._rows = _Rows()
        self._last = time.monotonic()


def start_run(st: Store, config: dict[str, Any], *, scdm_version: str) -> str:
    """Record a new evaluation run (status ``running``); returns its id.

    The config also records the host and process id of the run (``process``), so that a run whose
    process was killed can be told from one still running (:func:`run_process_gone`).
    """
    run_id = uuid.uuid4().hex[:16]
    config = {**config, "process": {"host": socket.gethostname(), "pid": os.getpid()}}
    with st.catalog.transaction() as con:
        con.execute("INSERT INTO eval_runs (run_id, created_at, status, config, scdm_version) VALUES (?, ?, 'running', ?, ?)",
                    [run_id, _now(), json.dumps(config, sort_keys=True, default=str), scdm_version])
    return run_id


def run_process_gone(host: Any, pid: Any) -> bool:
    """Whether a ``running`` run's process is known to be gone: it ran on this host and no process has its id.

    False where that cannot be known (another host, or a run recorded before runs kept their process).
    """
    if host != socket.gethostname() or pid is None or pid != pid:  # pid != pid: a NaN from SQL
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError, OverflowError):
        return False
    return False


RUN_END_STATUSES = ("complete", "partial", "failed")
"""How an evaluation run ends (``eval_runs.status``; ``running`` until then)."""


def finish_run(st: Store, run_id: str, *, status: str, seconds: float, n_tasks: int | None = None,
               n_done: int | None = None, n_reused: int | None = None, n_skipped: int | None = None) -> None:
    """Close a run: ``complete`` with its counts, ``partial`` (it ended on purpose with tasks left to do,
    e.g. a prompting run whose request budget ran out: the same command continues it), or ``failed``."""
    if status not in RUN_END_STATUSES:
        msg = f"run status {status!r} is not one of {', '.join(map(repr, RUN_END_STATUSES))}"
        raise ValueError(msg)
    with st.catalog.transaction() as con:
        con.execute("UPDATE eval_runs SET status = ?, finished_at = ?, seconds = ?, n_tasks = COALESCE(?, n_tasks), "
                    "n_done = COALESCE(?, n_done), n_reused = COALESCE(?, n_reused), n_skipped = COALESCE(?, n_skipped) "
                    "WHERE run_id = ?", [status, _now(), seconds, n_tasks, n_done, n_reused, n_skipped, run_id])


def record_tasks(st: Store, outcomes: Sequence[TaskOutcome], config: dict[str, Any], *, scdm_version: str,
                 seconds: float) -> str:
    """Record finished tasks as one complete run (for callers that fit outside :func:`evaluate`, e.g. LoRA)."""
    run_id = start_run(st, config, scdm_version=scdm_version)
    writer = ResultWriter(st, run_id)
    try:
        for out in outcomes:
            writer.add(out)
        writer.flush()
    except BaseException:
        finish_run(st, run_id, status="failed", seconds=seconds)
        raise
    finish_run(st, run_id, status="complete", seconds=seconds, n_tasks=len(outcomes),
               n_done=len(outcomes) - writer.n_dropped - writer.n_elsewhere, n_reused=writer.n_elsewhere,
               n_skipped=0)
    return run_id


def finished_tasks(st: Store, task_ids: Sequence[str], *, with_predictions: bool = False) -> set[str]:
    """The task ids that have a stored result (``with_predictions``: and stored test predictions)."""
    if not task_ids:
        return set()
    return set(st.query("SELECT task_id FROM eval_tasks t WHERE list_contains(?, task_id) AND (NOT ? OR EXISTS "
                        "(SELECT 1 FROM eval_predictions p WHERE p.task_id = t.task_id))",
                        [list(task_ids), with_predictions])["task_id"])


def _tasks_without_predictions(con: duckdb.DuckDBPyConnection, task_ids: set[str]) -> set[str]:
    """Those of these stored tasks that have no ``eval_predictions`` rows (fitted with ``--no-predictions``)."""
    if not task_ids:
        return set()
    with_rows = {r[0] for r in con.execute("SELECT DISTINCT task_id FROM eval_predictions WHERE list_contains(?, task_id)",
                                           [sorted(task_ids)]).fetchall()}
    return set(task_ids) - with_rows


def stored_revision_sql(alias: str) -> str:
    """SQL: the revision of its head that fitted a row ``alias`` of ``eval_tasks``, ``eval_results`` or the
    ``results`` view (a row with ``run_id`` and ``head``): its run's ``config.head_revisions``, 1 for a run of an
    scdm that recorded none.

    The one spelling of it outside the ``results`` view, whose ``revision`` column (migration 0018, which
    parses each run's config once) is the same value: ``tests/store/test_stored_revision.py`` holds the two
    to each other.
    """
    return (f"coalesce(TRY_CAST(json_extract_string((SELECT _run.config FROM eval_runs _run WHERE _run.run_id = {alias}.run_id), "
            f"'/head_revisions/' || {alias}.head) AS INTEGER), 1)")


def same_fits(st: Store, keys: Sequence[TaskKey]) -> dict[str, str]:
    """Stored tasks that are the fit of ``keys`` under another task id: planned id -> stored id.

    A task id names every embedding of the space selected for the run, but the fit reads only the
    cells of its split, whose embeddings the space and the split's datasets fix (one embedding per
    dataset and space). The same split, fold, head and parameters in the same space and label set,
    evaluated with more or fewer of the space's datasets selected, is the same result: it is
    reused, never fitted again under a second id and counted twice in a result's folds. A fit by
    another revision of the head (``TaskKey.revision``; its run's ``head_revisions``) is not the same.
    """
    if not keys:
        return {}
    identity = ["space_id", "split_id", "fold", "head", "head_params", "label_set", "revision"]
    planned = pd.DataFrame([{"planned": k.task_id, "space_id": k.space_id, "split_id": k.split.split_id,
                             "fold": int(k.fold), "head": k.head, "head_params": k.params_key,
                             "label_set": k.split.label_set or "", "revision": int(k.revision)} for k in keys])
    stored = st.query(
        "SELECT t.task_id AS stored, t.space_id, t.split_id, t.fold, t.head, CAST(t.head_params AS VARCHAR) AS head_params, "
        "coalesce(t.label_set, '') AS label_set, "
        f"{stored_revision_sql('t')} AS revision "
        "FROM eval_tasks t "
        "WHERE list_contains(?, t.space_id) AND list_contains(?, t.split_id) ORDER BY t.task_id",
        [sorted(set(planned["space_id"])), sorted(set(planned["split_id"]))])
    if stored.empty:
        return {}
    for frame in (stored, planned):
        frame["fold"] = frame["fold"].astype(np.int64)
        frame["revision"] = frame["revision"].astype(np.int64)
    found = planned.merge(stored.drop_duplicates(identity), on=identity, how="inner")
    found = found[found["planned"] != found["stored"]]  # its own row: stored without predictions, fitted again
    return {str(p): str(t) for p, t in zip(found["planned"], found["stored"])}


def task_results(st: Store, task_ids: Sequence[str]) -> pd.DataFrame:
    """Long-format metrics of these tasks."""
    return st.query("SELECT * FROM eval_results WHERE list_contains(?, task_id) ORDER BY model, head, scenario, "
                    "category_type, category, fold, metric", [list(task_ids)])


def skip_reasons(skipped: pd.DataFrame, top: int = 3) -> str:
    """Why tasks were skipped, most frequent reasons first: ``reason (n tasks); ...; k other reasons``."""
    counts = skipped["reason"].value_counts()
    more = f"; {len(counts) - top} other reasons" if len(counts) > top else ""
    return "; ".join(f"{reason} ({n} tasks)" for reason, n in counts.head(top).items()) + more


def run_skipped(st: Store, run_id: str) -> pd.DataFrame:
    """The tasks a run skipped, with the reason."""
    return st.query("SELECT * FROM skipped_tasks WHERE run_id = ?", [run_id])


def forget_tasks(con: duckdb.DuckDBPyConnection, split_ids: Sequence[str], label_set: str | None = None) -> int:
    """Delete the tasks evaluated on these splits (only those under ``label_set`` if given), with
    their metrics, predictions and skip rows; returns how many tasks.

    Store-internal, inside the caller's transaction: used when the cells a split was made from
    changed (metadata rewritten, labels replaced, dataset removed), so that no result of the old
    partition is read as one of the new. ``label_set``: a split shared by label sets with the same
    labels is stored under the first name, and the tasks of the others carry their own name.
    """
    ids = list(split_ids)
    if not ids:
        return 0
    where, args = "list_contains(?, split_id)", list[Any]([ids])
    if label_set is not None:
        where += " AND list_contains(string_split(label_set, ','), ?)"
        args.append(label_set)
    tasks = [r[0] for r in con.execute(f"SELECT task_id FROM eval_tasks WHERE {where}", args).fetchall()]
    delete_tasks(con, tasks)
    con.execute(f"DELETE FROM skipped_tasks WHERE {where}", args)
    return len(tasks)


def forget_variant_tasks(st: Store, variant: str) -> int:
    """Delete every task of an embedding variant (``lora:<adapter_id>``), with its metrics,
    predictions and skip rows; returns how many tasks.

    Used when an adapter whose files were lost is trained again into other weights: the old
    results belong to a space that no longer exists, and kept beside the new ones they would be
    averaged as extra folds of the same tuning in the leaderboard.
    """
    with st.catalog.transaction() as con:
        rows = con.execute("SELECT task_id, space_id FROM eval_tasks WHERE variant = ?", [variant]).fetchall()
        spaces = sorted({r[1] for r in rows} | {r[0] for r in con.execute(
            "SELECT DISTINCT space_id FROM embeddings WHERE variant = ?", [variant]).fetchall()})
        delete_tasks(con, [r[0] for r in rows])
        con.execute("DELETE FROM skipped_tasks WHERE list_contains(?, space_id)", [spaces])
    return len(rows)


def forget_older_revisions(st: Store, revisions: dict[str, int]) -> int:
    """Delete the tasks of an earlier revision of a head (``revisions``: head -> current revision) that a
    task of the current one has replaced (same space, split, fold, head parameters and label set),
    with their metrics and predictions; returns how many.

    A task's revision is its run's (``eval_runs.config.head_revisions``; 1 where absent). Kept, the
    old fold would sit beside the new one under one result identity (the ``result_key`` of the
    ``results`` view), and a SQL average over it would mix the two.
    """
    revised = {head: int(r) for head, r in revisions.items() if int(r) > 1}
    if not revised:
        return 0
    frame = pd.DataFrame({"head": list(revised), "revision": list(revised.values())})
    sql = f"""
        WITH t AS (
            SELECT t.task_id, t.space_id, t.split_id, t.fold, t.head, t.head_params, t.label_set,
                   {stored_revision_sql('t')} >= c.revision AS current
            FROM eval_tasks t JOIN _scdm_revisions c USING (head)
        )
        SELECT old.task_id FROM t old JOIN t new
          ON old.space_id = new.space_id AND old.split_id = new.split_id AND old.fold = new.fold
         AND old.head = new.head AND old.head_params = new.head_params
         AND old.label_set IS NOT DISTINCT FROM new.label_set
        WHERE NOT old.current AND new.current
    """
    with st.catalog.transaction() as con, registered(con, "_scdm_revisions", frame):
        tasks = sorted({r[0] for r in con.execute(sql).fetchall()})
        delete_tasks(con, tasks)
    return len(tasks)


def stored_head_params(st: Store) -> pd.DataFrame:
    """Every (head, head_params) pair the stored tasks were keyed with, ``head_params`` as stored text."""
    return st.query("SELECT DISTINCT head, CAST(head_params AS VARCHAR) AS head_params FROM eval_tasks ORDER BY ALL")


def respell_head_params(st: Store, spellings: dict[tuple[str, str], str]) -> int:
    """Key stored tasks with the current spelling of their head's parameters; returns how many tasks changed.

    ``spellings``: (head, head_params as stored) -> the same parameters as this scdm spells them
    (``{"C": 1}`` -> ``{"C": 1.0}``: one fit, two spellings). Task ids stay (the results found
    through them are the same); the tasks' and their metrics' ``head_params`` change, so a rerun
    finds the fit (:func:`same_fits`) instead of fitting it again and the results view shows one
    result where it showed one per spelling. Where both spellings of one fit were stored, the first
    one stored (with its predictions, if only one has them) stays and the others go, as migration 11
    removed copies of one fit.
    """
    if not spellings:
        return 0
    frame = pd.DataFrame([{"head": head, "old": old, "new": new} for (head, old), new in spellings.items()])
    with st.catalog.transaction() as con, registered(con, "_scdm_spellings", frame):
        changed = sorted(r[0] for r in con.execute(
            "SELECT t.task_id FROM eval_tasks t JOIN _scdm_spellings s "
            "ON t.head = s.head AND CAST(t.head_params AS VARCHAR) = s.old").fetchall())
        for table in ("eval_tasks", "eval_results"):
            con.execute(f"UPDATE {table} SET head_params = s.new FROM _scdm_spellings s "
                        f"WHERE {table}.head = s.head AND CAST({table}.head_params AS VARCHAR) = s.old")
        delete_tasks(con, _later_copies(con, changed))
    return len(changed)


def _later_copies(con: duckdb.DuckDBPyConnection, task_ids: list[str]) -> list[str]:
    """Tasks that are a second stored copy of one fit (same space, split, fold, head, parameters, label set and
    revision) where one of ``task_ids`` is among the copies: all but the first stored, one with predictions first."""
    if not task_ids:
        return []
    rows = con.execute(f"""
        WITH t AS (
            SELECT t.task_id, t.space_id, t.split_id, t.fold, t.head, CAST(t.head_params AS VARCHAR) AS params,
                   coalesce(t.label_set, '') AS label_set, {stored_revision_sql('t')} AS revision, t.created_at,
                   EXISTS (SELECT 1 FROM eval_predictions p WHERE p.task_id = t.task_id) AS predicted
            FROM eval_tasks t
        ), ranked AS (
            SELECT task_id, list_contains(?, task_id) AS respelled, row_number() OVER (
                PARTITION BY space_id, split_id, fold, head, params, label_set, revision
                ORDER BY predicted DESC, created_at, task_id) AS copy,
                bool_or(list_contains(?, task_id)) OVER (
                PARTITION BY space_id, split_id, fold, head, params, label_set, revision) AS touched
            FROM t
        )
        SELECT task_id FROM ranked WHERE copy > 1 AND touched ORDER BY task_id""", [task_ids, task_ids]).fetchall()
    return [r[0] for r in rows]


def delete_tasks(con: duckdb.DuckDBPyConnection, task_ids: list[str]) -> None:
    """Delete tasks' rows from every table that holds them, inside the caller's write transaction
    (``con`` from ``st.catalog.transaction()``): the store's one way of removing a fit."""
    for table in ("eval_predictions", "eval_results", "eval_tasks"):
        con.execute(f"DELETE FROM {table} WHERE list_contains(?, task_id)", [task_ids])
