"""scDEAL transfer runs and their outputs: the ``transfer_*`` and ``critical_genes`` tables.

A transfer run (:func:`scdm.classify.transfer.transfer`) trains on a labelled source and predicts
an unlabelled target dataset. Its catalog rows:

- ``transfer_runs``: one :class:`TransferRunStart` written when the run starts (status
  ``running``), completed by a :class:`TransferRunResult` or marked ``failed`` with the error;
- ``transfer_predictions``, ``transfer_metrics``, ``transfer_history``, ``transfer_features``: the
  :class:`TransferOutputs` of a complete run, written in the same transaction that marks it
  complete (a run is never ``complete`` without them, and never has them while ``running``);
- ``critical_genes``: one :class:`CriticalGenes` table per run (integrated-gradient attributions
  compared between predicted sensitive and resistant cells); writing it replaces the run's
  earlier table.

Model weights, scalers and the latent space live under ``<store>/artifacts/transfer/<run_id>/``.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from scdm.store._constants import ARTIFACTS_DIR
from scdm.store.errors import InputDataError, ScdmError

if TYPE_CHECKING:
    from scdm.store._store import Store

__all__ = [
    "CRITICAL_GENE_COLUMNS",
    "HISTORY_COLUMNS",
    "CriticalGenes",
    "TransferMetrics",
    "TransferOutputs",
    "TransferRunNotFoundError",
    "TransferRunRecord",
    "TransferRunResult",
    "TransferRunStart",
    "complete_transfer_run",
    "critical_genes_table",
    "fail_transfer_run",
    "replace_critical_genes",
    "start_transfer_run",
    "transfer_artifacts_dir",
    "transfer_predictions",
    "transfer_run",
    "transfer_run_stopped",
    "transfer_runs_table",
]

TRANSFER_ARTIFACTS_DIR = "transfer"
"""Sub-folder of the store's artifacts holding one folder per transfer run."""

HISTORY_COLUMNS: tuple[str, ...] = ("ce", "mmd", "cluster", "rec_source", "rec_target", "rec", "total", "val_ce")
"""Loss columns of ``transfer_history`` (a stage records the ones it has; the others are NULL)."""

CRITICAL_GENE_COLUMNS: tuple[str, ...] = (
    "gene", "rank", "direction", "critical", "mean_sensitive", "mean_resistant", "mean_abs_sensitive",
    "mean_abs_resistant", "log2fc", "effect_size", "cohens_d", "pts_sensitive", "pts_resistant", "detect_sensitive",
    "detect_resistant", "statistic", "pvalue", "pvalue_adj",
)
"""Per-gene columns of ``critical_genes`` (besides run_id, params and created_at); see migration 0007."""


class TransferRunNotFoundError(ScdmError, KeyError):
    """No transfer run with this id."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


def _now() -> pd.Timestamp:
    return pd.Timestamp.now(tz="UTC").tz_localize(None)


def _json(value: Any) -> str | None:
    return None if value is None else json.dumps(value, sort_keys=True, default=str)


def _none(value: Any) -> Any:
    if value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value)):
        return None
    return value


# --------------------------------------------------------------------------------------------
# transfer_runs
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TransferRunStart:
    """What a run records when it starts."""

    run_id: str
    drug: str | None
    """The drug (bulk response column) or None."""
    source_kind: str
    """``bulk-csv``, ``bulk-anndata`` or ``store``."""
    source: Mapping[str, Any]
    """Paths or dataset ids of the source, response kind, sample counts."""
    target_dataset_id: str
    features: str
    """``expr`` or the target's embedding id."""
    source_features: Sequence[str] | None
    """Embedding ids of the source datasets (embedding features only)."""
    adapt: bool
    """False: the same predictor without domain adaptation."""
    selection: str
    """What will choose the kept epoch: ``source_val`` or ``target_val``."""
    config: Mapping[str, Any]
    """Every hyper-parameter."""
    scdm_version: str | None = None
    created_at: pd.Timestamp | None = None
    """Set by :func:`start_transfer_run` when None."""
    source_label_set: str | None = None
    """Label set(s) of the source datasets read (names, comma-separated, sorted); None for a bulk source."""
    target_label_set: str | None = None
    """Label set of the target its predictions are scored against; None when the target has no labels."""
    validation_label_set: str | None = None
    """Label set of the validation dataset; None without one."""


@dataclass(frozen=True)
class TransferRunResult:
    """What a complete run adds to its ``transfer_runs`` row."""

    selection: str
    """``source_val``, ``target_val`` or ``last``."""
    selected_epoch: int
    val_score: float | None
    """Validation cross-entropy of the kept epoch (None when nothing was validated)."""
    cluster_method: str
    n_clusters: int
    waterfall: Mapping[str, Any] | None
    """The waterfall cutoff of a continuous bulk response (None for binary labels)."""
    n_source: int
    n_target: int
    n_features: int
    config: Mapping[str, Any]
    """Every hyper-parameter, the chosen ones included."""
    metric_flags: Sequence[str] | None
    """Flags of the target metrics (None when the target has no labels)."""
    artifacts_path: str
    """Folder of the run's artifacts, relative to the store root."""
    seconds: float


@dataclass(frozen=True)
class TransferMetrics:
    """Metrics on the target cells that carry a label."""

    values: Mapping[str, float | None]
    """Metric -> value (None where undefined, never 0.0)."""
    n: int
    """Labelled target cells."""
    n_pos: int
    """Of which sensitive."""


@dataclass(frozen=True)
class TransferOutputs:
    """Everything a complete run writes besides its ``transfer_runs`` row."""

    dataset_id: str
    """The target dataset."""
    proba: np.ndarray
    """Probability of sensitive of every target cell, in dataset row order, shape (n,); stored in float64."""
    label: np.ndarray
    """Predicted label (1 sensitive), shape (n,): ``proba >= threshold`` on the stored values."""
    cluster: np.ndarray
    """Target cluster of every cell (the cluster regulariser's), shape (n,)."""
    history: Sequence[Mapping[str, Any]]
    """Per stage and epoch: ``stage``, ``epoch`` and any of :data:`HISTORY_COLUMNS`."""
    features: Sequence[str]
    """Input features in column order (gene symbols or embedding dimensions)."""
    metrics: TransferMetrics | None = None

    def prediction_frame(self, run_id: str) -> pd.DataFrame:
        n = len(self.proba)
        if not len(self.label) == len(self.cluster) == n:
            msg = (f"Transfer predictions need one label and one cluster per cell; got {n} probabilities, "
                   f"{len(self.label)} labels and {len(self.cluster)} clusters.")
            raise InputDataError(msg)
        return pd.DataFrame({"run_id": run_id, "dataset_id": self.dataset_id, "row": np.arange(n, dtype=np.int32),
                             "proba": np.asarray(self.proba, np.float64), "label": np.asarray(self.label, np.int8),
                             "cluster": np.asarray(self.cluster, np.int32)})

    def history_frame(self, run_id: str) -> pd.DataFrame:
        frame = pd.DataFrame([dict(r) for r in self.history])
        for col in ("stage", "epoch", *HISTORY_COLUMNS):
            if col not in frame.columns:
                frame[col] = np.nan
        frame.insert(0, "run_id", run_id)
        return frame[["run_id", "stage", "epoch", *HISTORY_COLUMNS]]

    def metric_frame(self, run_id: str) -> pd.DataFrame:
        if self.metrics is None:
            return pd.DataFrame()
        return pd.DataFrame({"run_id": run_id, "metric": list(self.metrics.values),
                             "value": [_none(v) for v in self.metrics.values.values()], "n": self.metrics.n,
                             "n_pos": self.metrics.n_pos})

    def feature_frame(self, run_id: str) -> pd.DataFrame:
        return pd.DataFrame({"run_id": run_id, "idx": np.arange(len(self.features), dtype=np.int32),
                             "feature": [str(f) for f in self.features]})


@dataclass(frozen=True)
class TransferRunRecord:
    """One row of ``transfer_runs``."""

    run_id: str
    status: str
    """``running``, ``complete`` or ``failed``."""
    created_at: pd.Timestamp
    finished_at: pd.Timestamp | None
    drug: str | None
    source_kind: str
    source: dict[str, Any]
    target_dataset_id: str
    features: str
    source_features: tuple[str, ...] | None
    adapt: bool
    selection: str
    selected_epoch: int | None
    val_score: float | None
    cluster_method: str | None
    n_clusters: int | None
    waterfall: dict[str, Any] | None
    n_source: int | None
    n_target: int | None
    n_features: int | None
    config: dict[str, Any]
    metric_flags: str | None
    artifacts_path: str | None
    seconds: float | None
    scdm_version: str | None
    error: str | None
    source_label_set: str | None = None
    """Label set(s) of the source datasets (comma-separated, sorted); None for a bulk source."""
    target_label_set: str | None = None
    """Label set the target was scored against; None when unlabelled (or not recorded: before schema 9)."""
    validation_label_set: str | None = None
    """Label set of the validation dataset; None without one."""


def _load(value: Any) -> Any:
    value = _none(value)
    return json.loads(value) if isinstance(value, str) else value


def _int(value: Any) -> int | None:
    value = _none(value)
    return None if value is None else int(value)


def _run_record(row: dict[str, Any]) -> TransferRunRecord:
    features = _load(row.get("source_features"))
    return TransferRunRecord(
        run_id=str(row["run_id"]), status=str(row["status"]), created_at=row["created_at"],
        finished_at=_none(row.get("finished_at")), drug=_none(row.get("drug")), source_kind=str(row["source_kind"]),
        source=_load(row["source"]) or {}, target_dataset_id=str(row["target_dataset_id"]), features=str(row["features"]),
        source_features=tuple(features) if features else None, adapt=bool(row["adapt"]), selection=str(row["selection"]),
        selected_epoch=_int(row.get("selected_epoch")), val_score=_none(row.get("val_score")),
        cluster_method=_none(row.get("cluster_method")), n_clusters=_int(row.get("n_clusters")),
        waterfall=_load(row.get("waterfall")), n_source=_int(row.get("n_source")), n_target=_int(row.get("n_target")),
        n_features=_int(row.get("n_features")), config=_load(row["config"]) or {},
        metric_flags=_none(row.get("metric_flags")), artifacts_path=_none(row.get("artifacts_path")),
        seconds=_none(row.get("seconds")), scdm_version=_none(row.get("scdm_version")), error=_none(row.get("error")),
        source_label_set=_none(row.get("source_label_set")), target_label_set=_none(row.get("target_label_set")),
        validation_label_set=_none(row.get("validation_label_set")),
    )


def start_transfer_run(st: Store, run: TransferRunStart) -> None:
    """Insert a run's row with status ``running``.

    Its config records the run's host and process id (``process``) until it completes, so that a
    run whose process was killed (it could not record failing) reads as stopped, not running.
    """
    config = {**run.config, "process": {"host": socket.gethostname(), "pid": os.getpid()}}
    row = {"run_id": run.run_id, "created_at": run.created_at if run.created_at is not None else _now(),
           "status": "running", "drug": run.drug, "source_kind": run.source_kind, "source": _json(dict(run.source)),
           "target_dataset_id": run.target_dataset_id, "features": run.features,
           "source_features": _json(list(run.source_features)) if run.source_features else None, "adapt": bool(run.adapt),
           "selection": run.selection, "config": _json(config), "scdm_version": run.scdm_version,
           "source_label_set": run.source_label_set, "target_label_set": run.target_label_set,
           "validation_label_set": run.validation_label_set}
    st.catalog.insert_df("transfer_runs", pd.DataFrame([row]))


def fail_transfer_run(st: Store, run_id: str, error: str) -> None:
    """Mark a run ``failed`` with its error (first 2,000 characters)."""
    st.catalog.execute("UPDATE transfer_runs SET status = 'failed', finished_at = ?, error = ? WHERE run_id = ?",
                       [_now(), error[:2000], run_id])


def complete_transfer_run(st: Store, run_id: str, result: TransferRunResult, outputs: TransferOutputs) -> None:
    """Write a run's outputs and mark it ``complete``, in one transaction."""
    frames = {"transfer_predictions": outputs.prediction_frame(run_id), "transfer_metrics": outputs.metric_frame(run_id),
              "transfer_history": outputs.history_frame(run_id), "transfer_features": outputs.feature_frame(run_id)}
    with st.catalog.transaction() as con:
        for table, frame in frames.items():
            if not frame.empty:
                st.catalog.insert_df(table, frame, con)
        con.execute(
            "UPDATE transfer_runs SET status = 'complete', finished_at = ?, selection = ?, selected_epoch = ?, "
            "val_score = ?, cluster_method = ?, n_clusters = ?, waterfall = ?, n_source = ?, n_target = ?, "
            "n_features = ?, config = ?, metric_flags = ?, artifacts_path = ?, seconds = ? WHERE run_id = ?",
            [_now(), result.selection, int(result.selected_epoch), result.val_score, result.cluster_method,
             int(result.n_clusters), _json(dict(result.waterfall)) if result.waterfall is not None else None,
             int(result.n_source), int(result.n_target), int(result.n_features), _json(dict(result.config)),
             ",".join(result.metric_flags) if result.metric_flags is not None else None, result.artifacts_path,
             float(result.seconds), run_id])


def transfer_run(st: Store, run_id: str, *, complete: bool = False) -> TransferRunRecord:
    """A run's row.

    Parameters
    ----------
    complete : bool, default False
        Refuse a run that is not ``complete`` (its outputs are only then readable).

    Raises
    ------
    TransferRunNotFoundError
        No such run (the message lists the most recent ones).
    InputDataError
        ``complete=True`` and the run is running or failed.
    """
    frame = st.query("SELECT * FROM transfer_runs WHERE run_id = ?", [run_id])
    if frame.empty:
        recent = st.query("SELECT run_id FROM transfer_runs ORDER BY created_at DESC LIMIT 5")["run_id"]
        msg = (f"No transfer run {run_id!r} in the store; recent runs: {', '.join(recent) or '(none)'} "
               "(all: scdm sql \"SELECT * FROM transfer_runs\").")
        raise TransferRunNotFoundError(msg)
    record = _run_record(frame.iloc[0].to_dict())
    if complete and record.status != "complete":
        msg = f"Transfer run {run_id} is {record.status}; only complete runs can be read back."
        if transfer_run_stopped(record):
            msg = (f"Transfer run {run_id} never finished: its process is gone (killed, or the machine stopped), so it "
                   "has no outputs. Run the same `scdm transfer` command again.")
        raise InputDataError(msg)
    return record


def transfer_run_stopped(record: TransferRunRecord) -> bool:
    """Whether a ``running`` run's process is known to be gone (see :func:`store.evaluation.run_process_gone`)."""
    from scdm.store.evaluation import run_process_gone

    process = record.config.get("process") or {}
    return record.status == "running" and run_process_gone(process.get("host"), process.get("pid"))


def transfer_runs_table(st: Store) -> pd.DataFrame:
    """Every transfer run, oldest first, in the shape of the evaluation runs' table (``GET /api/runs``).

    Columns: ``run_id``, ``kind`` (``transfer``), ``created_at``, ``finished_at``, ``status`` (a
    ``running`` run whose process is gone reads ``stopped (...)``, as :func:`transfer_run_stopped`
    tells), ``state`` (its first word), ``drug``, ``target`` (the target dataset's name),
    ``label_set`` (the target's, scored against; None when unscored), ``source_label_set``,
    ``n_source``, ``n_target``, ``seconds``.
    """
    frame = st.query(
        "SELECT r.run_id, 'transfer' AS kind, r.created_at, r.finished_at, r.status, r.drug, d.name AS target, "
        "r.target_label_set AS label_set, r.source_label_set, r.n_source, r.n_target, round(r.seconds, 1) AS seconds, "
        "r.config->'process'->>'host' AS host, CAST(r.config->'process'->>'pid' AS BIGINT) AS pid "
        "FROM transfer_runs r LEFT JOIN datasets d ON d.dataset_id = r.target_dataset_id ORDER BY r.created_at, r.run_id")
    from scdm.store.evaluation import run_process_gone

    gone = [s == "running" and run_process_gone(h, p) for s, h, p in zip(frame["status"], frame["host"], frame["pid"])]
    frame.loc[gone, "status"] = "stopped (its process is gone; run the same scdm transfer command again)"
    frame.insert(frame.columns.get_loc("status") + 1, "state", frame["status"].astype(str).str.split(" ").str[0])
    return frame.drop(columns=["host", "pid"])  # where a run ran is not shown


def transfer_predictions(st: Store, run_id: str) -> pd.DataFrame:
    """A run's per-cell predictions (``row``, ``proba``, ``label``, ``cluster``) in row order.

    ``proba`` is float64 as stored (DOUBLE since migration 16; rows written before hold their float32
    values), so that ``proba >= threshold`` (the run's ``config.threshold``) gives the stored ``label``:
    numpy compares a float32 column with a Python float in float32, which rounds a threshold such as
    0.7 down onto a probability below it.
    """
    frame = st.query('SELECT "row", proba, label, cluster FROM transfer_predictions WHERE run_id = ? ORDER BY "row"',
                     [run_id])
    frame["proba"] = frame["proba"].astype(np.float64)
    return frame


# --------------------------------------------------------------------------------------------
# critical_genes
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CriticalGenes:
    """The critical-gene table of one run: one row per gene (:data:`CRITICAL_GENE_COLUMNS`)."""

    run_id: str
    genes: pd.DataFrame
    """One row per gene with the :data:`CRITICAL_GENE_COLUMNS`, best first."""
    params: Mapping[str, Any] = field(default_factory=dict)
    """How the table was computed (cells, correction, pseudocount, ...)."""

    def frame(self, created_at: pd.Timestamp) -> pd.DataFrame:
        missing = [c for c in CRITICAL_GENE_COLUMNS if c not in self.genes.columns]
        if missing:
            msg = f"The critical-gene table lacks the columns {', '.join(missing)}."
            raise InputDataError(msg)
        out = self.genes[list(CRITICAL_GENE_COLUMNS)].copy()
        out.insert(0, "run_id", self.run_id)
        out["params"] = _json(dict(self.params))
        out["created_at"] = created_at
        return out


def replace_critical_genes(st: Store, table: CriticalGenes) -> None:
    """Store a run's critical-gene table, replacing its earlier one, in one transaction."""
    rows = table.frame(_now())
    with st.catalog.transaction() as con:
        con.execute("DELETE FROM critical_genes WHERE run_id = ?", [table.run_id])
        st.catalog.insert_df("critical_genes", rows, con)


def critical_genes_table(st: Store, run_id: str) -> pd.DataFrame:
    """A run's stored critical-gene table, best first (empty when none was computed)."""
    return st.query("SELECT * FROM critical_genes WHERE run_id = ? ORDER BY rank", [run_id])


def transfer_artifacts_dir(st: Store, run_id: str) -> Path:
    """Folder of a run's weights, scalers and latent space: ``<store>/artifacts/transfer/<run_id>``."""
    return st.root / ARTIFACTS_DIR / TRANSFER_ARTIFACTS_DIR / run_id
