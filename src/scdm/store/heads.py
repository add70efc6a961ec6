"""Trained heads and their predictions: the ``trained_heads`` and ``predictions`` tables.

A trained head is a classifier fitted once on every labelled cell of one category, kept for later
predictions (:mod:`scdm.classify.trained_heads` fits, saves and loads it). Its catalog row is a
:class:`TrainedHeadRecord`: what it was trained on (embedding space, embeddings, datasets, label
set, category), how (head and parameters, threshold), and where its artifact lies with the
artifact's format and content hash. The artifact itself is a file under the store root in a format
that cannot run code (``json-npz``, ``safetensors``, ``lightgbm-text``); ``joblib`` and ``torch``
rows are heads saved by older scdm versions as pickles.

A head's predictions on a dataset are one :class:`Predictions` record; writing it replaces the
head's earlier predictions on that dataset.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from scdm.store.errors import InputDataError, ScdmError
from scdm.store.genes import gene_table_note_sql

if TYPE_CHECKING:
    from scdm.store._store import Store
    from scdm.store.labels import LabelSet

__all__ = [
    "ARTIFACT_FORMATS",
    "LEGACY_ARTIFACT_FORMATS",
    "HeadNotFoundError",
    "Predictions",
    "TrainedHeadRecord",
    "add_trained_head",
    "has_trained_head",
    "replace_predictions",
    "trained_head_params",
    "response_label_set",
    "with_responses",
    "set_head_artifact",
    "trained_head",
    "trained_head_table",
]

ARTIFACT_FORMATS: tuple[str, ...] = ("json-npz", "safetensors", "lightgbm-text")
"""Artifact formats scdm writes: none of them can run code when read."""
LEGACY_ARTIFACT_FORMATS: tuple[str, ...] = ("joblib", "torch")
"""Pickled artifacts of scdm versions before the safe formats; never loaded without explicit trust."""


class HeadNotFoundError(ScdmError, KeyError):
    """No trained head with this id (or unambiguous prefix)."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class TrainedHeadRecord:
    """One row of ``trained_heads``."""

    head_id: str
    """Hash of space, embeddings, category, head, parameters and threshold."""
    head: str
    """logreg | ridge | lightgbm | mlp | majority."""
    head_params: str
    """Canonical JSON of the head's constructor arguments."""
    space_id: str
    """The embedding space a dataset must be embedded in to be predicted."""
    model: str
    variant: str
    checkpoint_hash: str | None
    adapter_hash: str | None
    embedding_params: str
    """JSON of the training embeddings' parameters."""
    dim: int
    embedding_ids: tuple[str, ...]
    """Training embeddings, one per dataset."""
    datasets: tuple[str, ...]
    """Names of the datasets whose cells the head was fitted on (a category may hold one dataset of the embeddings)."""
    category_type: str
    category: str
    n_train: int
    """Labelled training cells."""
    n_train_pos: int
    """Of which sensitive."""
    threshold: float
    """Label 1 (sensitive) where the probability is at least this."""
    train_metrics: str | None
    """JSON: mean/sd over folds of the evaluation results of the same configuration, one entry per split of
    exactly the training cells and labels and per metric (``split_id``, ``scenario``, ``scheme``, ``k``,
    ``seed``, ``metric``, ``mean``, ``sd``, ``n_folds``); None: none. Splits are never averaged together."""
    fit_seconds: float | None
    artifact_format: str
    """One of :data:`ARTIFACT_FORMATS`, or a legacy pickle format."""
    path: str
    """Artifact file, relative to the store root."""
    file_hash: str
    """blake2b of the artifact file's bytes."""
    scdm_version: str | None
    label_set: str | None = None
    """Label set name(s) the head was trained with, comma-separated, sorted."""
    revision: int | None = None
    """The revision of its head that fitted it (None: trained before scdm recorded it)."""
    created_at: pd.Timestamp | None = None
    """Set by :func:`add_trained_head` when None."""

    @property
    def params(self) -> dict[str, Any]:
        """The head's constructor arguments."""
        return dict(json.loads(self.head_params))

    @property
    def is_legacy(self) -> bool:
        """Whether the artifact is a pickle written by an older scdm."""
        return self.artifact_format in LEGACY_ARTIFACT_FORMATS


def _now() -> pd.Timestamp:
    return pd.Timestamp.now(tz="UTC").tz_localize(None)


def _text(value: Any) -> str | None:
    return None if value is None or (isinstance(value, float) and np.isnan(value)) or value is pd.NA else str(value)


def _float(value: Any) -> float | None:
    text = _text(value)
    return None if text is None else float(value)


def _record(row: dict[str, Any]) -> TrainedHeadRecord:
    return TrainedHeadRecord(
        head_id=str(row["head_id"]), head=str(row["head"]), head_params=str(row["head_params"]),
        space_id=str(row["space_id"]), model=str(row["model"]), variant=str(row["variant"]),
        checkpoint_hash=_text(row.get("checkpoint_hash")), adapter_hash=_text(row.get("adapter_hash")),
        embedding_params=str(row["embedding_params"]), dim=int(row["dim"]),
        embedding_ids=tuple(json.loads(row["embedding_ids"])), datasets=tuple(json.loads(row["datasets"])),
        category_type=str(row["category_type"]), category=str(row["category"]), n_train=int(row["n_train"]),
        n_train_pos=int(row["n_train_pos"]), threshold=float(row["threshold"]),
        train_metrics=_text(row.get("train_metrics")), fit_seconds=_float(row.get("fit_seconds")),
        artifact_format=str(row["artifact_format"]), path=str(row["path"]), file_hash=str(row["file_hash"]),
        scdm_version=_text(row.get("scdm_version")), label_set=_text(row.get("label_set")),
        revision=None if _text(row.get("revision")) is None else int(row["revision"]), created_at=row.get("created_at"),
    )


def _row(record: TrainedHeadRecord) -> dict[str, Any]:
    row = asdict(record)
    row["embedding_ids"] = json.dumps(list(record.embedding_ids))
    row["datasets"] = json.dumps(list(record.datasets))
    row["created_at"] = record.created_at if record.created_at is not None else _now()
    return row


def add_trained_head(st: Store, record: TrainedHeadRecord) -> None:
    """Insert a trained head's catalog row (its artifact must already be written)."""
    if record.artifact_format not in ARTIFACT_FORMATS:
        msg = f"Artifact format {record.artifact_format!r} is not one scdm writes ({', '.join(ARTIFACT_FORMATS)})."
        raise InputDataError(msg)
    st.catalog.insert_df("trained_heads", pd.DataFrame([_row(record)]))


def set_head_artifact(st: Store, head_id: str, *, artifact_format: str, path: str, file_hash: str,
                      scdm_version: str | None, fit_seconds: float | None = None) -> None:
    """Point a trained head's row at a new artifact (a legacy pickle converted or retrained)."""
    if artifact_format not in ARTIFACT_FORMATS:
        msg = f"Artifact format {artifact_format!r} is not one scdm writes ({', '.join(ARTIFACT_FORMATS)})."
        raise InputDataError(msg)
    st.catalog.execute(
        "UPDATE trained_heads SET artifact_format = ?, path = ?, file_hash = ?, scdm_version = ?, "
        "fit_seconds = COALESCE(?, fit_seconds) WHERE head_id = ?",
        [artifact_format, path, file_hash, scdm_version, fit_seconds, head_id],
    )


def trained_head(st: Store, head_id: str) -> TrainedHeadRecord:
    """The trained head with this id, or with this unambiguous prefix of at least 6 characters.

    Raises
    ------
    HeadNotFoundError
        No head, or several, match.
    """
    frame = st.query(
        "SELECT * FROM trained_heads WHERE head_id = ? OR (length(?) >= 6 AND starts_with(head_id, ?))",
        [head_id, head_id, head_id],
    )
    exact = frame[frame["head_id"] == head_id]
    if len(exact) == 1:
        frame = exact
    if len(frame) != 1:
        what = "matches several trained heads" if len(frame) > 1 else "does not exist"
        msg = f"Trained head {head_id!r} {what}. List them with `scdm sql \"SELECT * FROM trained_heads\"`."
        raise HeadNotFoundError(msg)
    return _record(frame.iloc[0].to_dict())


def has_trained_head(st: Store, head_id: str) -> bool:
    """Whether a trained head with exactly this id exists."""
    return bool(len(st.query("SELECT 1 FROM trained_heads WHERE head_id = ?", [head_id])))


def trained_head_params(st: Store, head: str) -> list[str]:
    """Every ``head_params`` text the trained heads of ``head`` were stored with (the key each id was hashed from)."""
    return [str(p) for p in st.query("SELECT DISTINCT CAST(head_params AS VARCHAR) AS p FROM trained_heads "
                                     "WHERE head = ? ORDER BY p", [head])["p"]]


def trained_head_table(st: Store, *, model: str | None = None, head_id: str | None = None) -> pd.DataFrame:
    """All trained heads (catalog rows), newest first, or those of one model or one id; ``note`` is
    ``'older gene table (...)'`` for a head trained on embeddings of another gene table than this scdm's
    (no dataset this scdm embeds can enter its space), as ``scdm ls`` marks such embeddings."""
    where = [(clause, value) for clause, value in (("model = ?", model), ("head_id = ?", head_id)) if value is not None]
    sql = (f"SELECT *, {gene_table_note_sql('embedding_params')} AS note FROM trained_heads"
           + (" WHERE " + " AND ".join(c for c, _ in where) if where else "") + " ORDER BY created_at DESC")
    return st.query(sql, [v for _, v in where])


def response_label_set(st: Store, head_label_set: str | None, dataset_id: str) -> LabelSet | None:
    """The label set of a dataset whose labels stand beside a head's predictions on it.

    A head learned the labels of the label set(s) named ``head_label_set`` (its training datasets'
    defaults, comma-joined). A dataset's default may be another drug's, so the head's own label set
    is taken where the dataset has it; else the dataset's default; None for an unlabelled dataset.
    """
    from scdm.store.labels import label_sets

    have = label_sets(st, dataset_id)
    if not have:
        return None
    learned = set(head_label_set.split(",")) if isinstance(head_label_set, str) else set()
    match = [ls for ls in have if ls.name in learned] or have
    return next((ls for ls in match if ls.is_default), match[0])


def with_responses(st: Store, frame: pd.DataFrame) -> pd.DataFrame:
    """Prediction rows (``head_id``, ``dataset_id``, ``row``) with ``response`` and ``label_set`` columns.

    Each (head, dataset) pair gets the labels of :func:`response_label_set`; cells without a label
    in it get a missing ``response``.
    """
    if frame.empty:
        return frame.assign(response=pd.Series(dtype="Int8"), label_set=pd.Series(dtype=object))
    pairs = frame[["head_id", "dataset_id"]].drop_duplicates()
    learned = dict(st.query("SELECT head_id, label_set FROM trained_heads WHERE list_contains(?, head_id)",
                            [list(pairs["head_id"].unique())]).itertuples(index=False, name=None))
    chosen = []
    for head_id, dataset_id in pairs.itertuples(index=False, name=None):
        ls = response_label_set(st, learned.get(head_id), dataset_id)
        if ls is not None:
            chosen.append((head_id, dataset_id, ls.label_set_id, ls.name))
    sets = pd.DataFrame(chosen, columns=["head_id", "dataset_id", "label_set_id", "label_set"])
    labels = st.query('SELECT label_set_id, "row", response FROM cell_labels WHERE list_contains(?, label_set_id)',
                      [list(sets["label_set_id"].unique())])
    labels["row"] = labels["row"].astype(np.int64)
    out = frame.assign(row=frame["row"].astype(np.int64)).merge(sets, on=["head_id", "dataset_id"], how="left")
    out = out.merge(labels, on=["label_set_id", "row"], how="left").drop(columns="label_set_id")
    out["response"] = out["response"].astype("Int8")
    return out


@dataclass(frozen=True)
class Predictions:
    """One trained head's predictions for the cells of one dataset."""

    head_id: str
    dataset_id: str
    embedding_id: str
    """The embedding the head read."""
    rows: np.ndarray
    """Cell rows in the dataset, shape (n,)."""
    proba: np.ndarray
    """Probability of sensitive, shape (n,); stored in float64 (DOUBLE since migration 16)."""
    label: np.ndarray
    """1 sensitive, 0 resistant, shape (n,): ``proba >= threshold`` on the stored values."""
    trained_on: np.ndarray | None = None
    """Whether each cell trained the head (its prediction is a fitted value, not a held-out one), shape
    (n,); None: not known (stored as NULL)."""

    def frame(self) -> pd.DataFrame:
        """The ``predictions`` rows (without ``created_at``)."""
        n = len(self.rows)
        if not len(self.proba) == len(self.label) == n:
            msg = f"Predictions need one proba and one label per row; got {n} rows, {len(self.proba)} probas, {len(self.label)} labels."
            raise InputDataError(msg)
        trained_on = pd.array([pd.NA] * n if self.trained_on is None else np.asarray(self.trained_on, bool), "boolean")
        if len(trained_on) != n:
            msg = f"Predictions need one trained_on flag per row; got {n} rows, {len(trained_on)} flags."
            raise InputDataError(msg)
        return pd.DataFrame({
            "head_id": self.head_id, "dataset_id": self.dataset_id, "row": np.asarray(self.rows, np.int32),
            "embedding_id": self.embedding_id, "proba": np.asarray(self.proba, np.float64),
            "label": np.asarray(self.label, np.int8), "trained_on": trained_on,
        })


def replace_predictions(st: Store, predictions: Predictions) -> None:
    """Store a head's predictions on a dataset, replacing its earlier ones, in one transaction."""
    rows = predictions.frame().assign(created_at=_now())
    with st.catalog.transaction() as con:
        con.execute("DELETE FROM predictions WHERE head_id = ? AND dataset_id = ?",
                    [predictions.head_id, predictions.dataset_id])
        st.catalog.insert_df("predictions", rows, con)

