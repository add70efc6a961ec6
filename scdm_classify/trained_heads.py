"""Trained heads: a head fitted on every labelled cell of a category, saved for later predictions.

The evaluation grid (:mod:`scdm_classify.grid`) fits heads on folds and keeps only their scores.
Here a head is fitted once on all labelled cells of one category (no held-out fold), saved as an
artifact in the store and used to predict cells of any dataset embedded in the same space::

    head_id = train_head(st, dataset="a375", model="pca", category_type="all", category="all", head="logreg")
    frame = predict(st, head_id, "a375-new-batch", out="predictions.csv")

Artifacts live in ``<store>/artifacts/heads/<head_id>/``: ``head.joblib`` for the scikit-learn
style heads, ``head.pt`` (the torch ``state_dict`` plus the standardiser) for ``mlp``, and the
card ``head.json``. The catalog row in ``trained_heads`` records the blake2b hash of the artifact
file; loading refuses a file whose hash differs (a pickle is only unpickled when it is the one
scdm wrote). Predictions go to the ``predictions`` table (one row per head x dataset x cell).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import pandas as pd

from scdm_classify.heads import BaseHead, get_head
from store.errors import EmbeddingNotFoundError, InputDataError, ScdmError

if TYPE_CHECKING:
    from store import Store

logger = logging.getLogger(__name__)

__all__ = [
    "TRAINABLE_HEADS",
    "CATEGORY_TYPES",
    "HeadArtifactError",
    "HeadNotFoundError",
    "SpaceMismatchError",
    "TrainedHead",
    "load_head",
    "predict",
    "train_head",
    "trained_heads",
]

TRAINABLE_HEADS: tuple[str, ...] = ("logreg", "ridge", "lightgbm", "mlp", "majority")
"""Heads that can be trained and saved (``dann`` needs a target domain; ``shuffled-label`` is a leakage alarm)."""
CATEGORY_TYPES: tuple[str, ...] = ("all", "tissue", "cancer_type", "drug_type", "regimen")
HEADS_DIR = "artifacts/heads"
"""Folder of trained-head artifacts, relative to the store root."""
DEFAULT_THRESHOLD = 0.5


class HeadNotFoundError(ScdmError, KeyError):
    """No trained head with this id."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class HeadArtifactError(ScdmError, RuntimeError):
    """A trained head's artifact is missing or its bytes differ from the catalogued hash."""


class SpaceMismatchError(InputDataError):
    """The dataset is not embedded in the space the head was trained in."""


@dataclass(frozen=True)
class TrainedHead:
    """A trained head loaded from the store, ready to predict."""

    head_id: str
    """Catalog id (``trained_heads.head_id``)."""
    head: BaseHead
    """The fitted head."""
    space_id: str
    """Embedding space a dataset must be embedded in."""
    model: str
    """Embedding model of that space."""
    variant: str
    """Embedding variant (``frozen`` or ``lora:<adapter id>``)."""
    threshold: float
    """Label 1 (sensitive) where the probability is at least this."""


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _hash_text(*parts: Any) -> str:
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def file_hash(path: str | os.PathLike[str]) -> str:
    """blake2b (32 hex digits) of a file's bytes."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _now() -> pd.Timestamp:
    return pd.Timestamp.now(tz="UTC").tz_localize(None)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("scdm")
    except PackageNotFoundError:
        return "0+unknown"


def _select_embeddings(st: Store, embeddings: str | Sequence[str] | None, dataset: str | Sequence[str] | None,
                       model: str | None, variant: str) -> pd.DataFrame:
    """Catalog rows of the training embeddings: one space, complete, one per dataset."""
    table = st.embeddings()
    if embeddings is not None:
        wanted = [embeddings] if isinstance(embeddings, str) else list(dict.fromkeys(embeddings))
        ids = [st.embedding(e).embedding_id for e in wanted]  # accepts unambiguous prefixes
    elif dataset is not None and model is not None:
        names = [dataset] if isinstance(dataset, str) else list(dataset)
        ids = [st.find_embedding(name, model, variant).embedding_id for name in names]
    else:
        msg = "Name the training embeddings: pass embeddings=[ids], or dataset=NAME with model=MODEL (and variant)."
        raise InputDataError(msg)
    rows = table[table["embedding_id"].isin(ids)].reset_index(drop=True)
    partial = rows[rows["status"] != "complete"]
    if len(partial):
        msg = (f"Embedding {partial['embedding_id'].iloc[0]!r} is not complete; finish it with `scdm embed` "
               "(it resumes) before training a head on it.")
        raise InputDataError(msg)
    if rows["space_id"].nunique() != 1:
        spaces = ", ".join(f"{r.embedding_id}: {r.model}/{r.variant} space {r.space_id}" for r in rows.itertuples())
        msg = (f"The training embeddings lie in different spaces ({spaces}); a head is trained in one space. "
               "Embed the datasets jointly (one model, checkpoint and params) or train one head per space.")
        raise InputDataError(msg)
    if rows["dataset_id"].duplicated().any():
        msg = "Two training embeddings belong to the same dataset; pass one embedding per dataset."
        raise InputDataError(msg)
    return rows.sort_values("dataset_id").reset_index(drop=True)


def _training_cells(st: Store, rows: pd.DataFrame, category_type: str, category: str) -> pd.DataFrame:
    if category_type not in CATEGORY_TYPES:
        msg = f"Unknown category type {category_type!r}; choose from {', '.join(CATEGORY_TYPES)}."
        raise InputDataError(msg)
    if category_type == "all" and category != "all":
        msg = f"category_type 'all' has the one category 'all'; got category={category!r}."
        raise InputDataError(msg)
    cells = st.cells(list(rows["dataset_name"]))
    labelled = cells[cells["response"].notna()]
    if category_type != "all":
        present = sorted(labelled[category_type].dropna().astype(str).unique())
        labelled = labelled[labelled[category_type].astype(str) == category]
        if labelled.empty:
            msg = (f"No labelled cell has {category_type} = {category!r} in {', '.join(rows['dataset_name'])}; "
                   f"categories present: {', '.join(present) or 'none'}.")
            raise InputDataError(msg)
    if labelled.empty:
        msg = (f"No cell of {', '.join(rows['dataset_name'])} has a response label; ingest with "
               "label_key=<obs column> to train a head.")
        raise InputDataError(msg)
    return labelled.sort_values(["dataset_id", "row"]).reset_index(drop=True)


def _training_matrix(st: Store, rows: pd.DataFrame, cells: pd.DataFrame) -> np.ndarray:
    dim = int(rows["dim"].iloc[0])
    X = np.empty((len(cells), dim), np.float32)
    dataset_of = cells["dataset_id"].to_numpy()
    for row in rows.itertuples():
        idx = np.flatnonzero(dataset_of == row.dataset_id)
        if idx.size:
            X[idx] = st.read_embedding(row.embedding_id, cells["row"].to_numpy(np.int64)[idx])
    if not np.isfinite(X).all():
        msg = f"The training embeddings of space {rows['space_id'].iloc[0]} hold NaN or inf values; recompute them."
        raise InputDataError(msg)
    return X


def _eval_metrics(st: Store, space_id: str, category_type: str, category: str, head: str, params_key: str) -> list[dict[str, Any]]:
    """Mean/sd over folds of the evaluation runs of the same configuration (empty if none)."""
    frame = st.query(
        """SELECT r.scenario, r.scheme, r.metric, avg(r.value) AS mean, stddev_samp(r.value) AS sd,
                  count(r.value) AS n_folds
           FROM eval_results r JOIN eval_tasks t USING (task_id)
           WHERE r.space_id = ? AND r.category_type = ? AND r.category = ? AND r.head = ? AND t.head_params = ?
           GROUP BY r.scenario, r.scheme, r.metric ORDER BY r.scenario, r.scheme, r.metric""",
        [space_id, category_type, category, head, params_key],
    )
    records = frame.astype(object).where(frame.notna(), None).to_dict("records")
    return [{k: (int(v) if k == "n_folds" else v) for k, v in r.items()} for r in records]


# --------------------------------------------------------------------------------------------
# artifacts
# --------------------------------------------------------------------------------------------
def _save_artifact(head: BaseHead, folder: Path) -> tuple[str, str]:
    """Write the fitted head into ``folder``; returns (file name, format)."""
    if head.name == "mlp":
        import torch

        state = {
            "state_dict": head.model_.state_dict(),
            "params": head.params_key(),
            "n_features_in": int(head.n_features_in_),
            "mean": None if head.mean_ is None else torch.from_numpy(np.asarray(head.mean_)),
            "scale": None if head.scale_ is None else torch.from_numpy(np.asarray(head.scale_)),
            "bf16": bool(head.bf16_),
            "fit_seconds": float(head.fit_seconds_),
        }
        torch.save(state, folder / "head.pt")
        return "head.pt", "torch"
    import joblib

    joblib.dump(head, folder / "head.joblib")
    return "head.joblib", "joblib"


def _load_artifact(path: Path, artifact_format: str, head_name: str) -> BaseHead:
    if artifact_format == "torch":
        import torch

        state = torch.load(path, map_location="cpu", weights_only=True)
        head = get_head(head_name, **json.loads(state["params"]))
        model = head._build(int(state["n_features_in"]))
        model.load_state_dict(state["state_dict"])
        model.eval()
        head.model_ = model
        head.mean_ = None if state["mean"] is None else state["mean"].numpy()
        head.scale_ = None if state["scale"] is None else state["scale"].numpy()
        head._affine = None
        head.bf16_ = bool(state["bf16"])
        head.n_features_in_ = int(state["n_features_in"])
        head.fit_seconds_ = float(state["fit_seconds"])
        return head
    import joblib

    head = joblib.load(path)
    if not isinstance(head, BaseHead) or head.name != head_name:
        msg = f"The artifact {str(path)!r} does not hold a fitted {head_name} head."
        raise HeadArtifactError(msg)
    return head


def _head_row(st: Store, head_id: str) -> dict[str, Any]:
    frame = st.query(
        "SELECT * FROM trained_heads WHERE head_id = ? OR (length(?) >= 6 AND starts_with(head_id, ?))",
        [head_id, head_id, head_id],
    )
    if len(frame) != 1:
        what = "matches several trained heads" if len(frame) > 1 else "does not exist"
        msg = f"Trained head {head_id!r} {what}. List them with `scdm sql \"SELECT * FROM trained_heads\"`."
        raise HeadNotFoundError(msg)
    return frame.iloc[0].to_dict()


def load_head(store: str | os.PathLike[str] | Store, head_id: str) -> TrainedHead:
    """Load a trained head after checking its artifact against the catalogued file hash.

    Raises
    ------
    HeadNotFoundError
        No trained head with this id (or unambiguous prefix).
    HeadArtifactError
        The artifact is missing, or its hash differs from the catalog's (it was changed or corrupted).
    """
    from store import open_store

    st = open_store(store)
    row = _head_row(st, head_id)
    path = (st.root / row["path"]).resolve()
    if not path.is_relative_to(st.root.resolve()) or not path.is_file():
        msg = f"The artifact of trained head {row['head_id']} is missing ({str(path)!r}); train it again with `scdm train-head`."
        raise HeadArtifactError(msg)
    found = file_hash(path)
    if found != row["file_hash"]:
        msg = (f"The artifact {str(path)!r} of trained head {row['head_id']} has hash {found}, but the catalog "
               f"recorded {row['file_hash']}: the file was changed or corrupted, so it is not loaded. "
               "Train the head again with `scdm train-head`.")
        raise HeadArtifactError(msg)
    head = _load_artifact(path, str(row["artifact_format"]), str(row["head"]))
    return TrainedHead(str(row["head_id"]), head, str(row["space_id"]), str(row["model"]), str(row["variant"]),
                       float(row["threshold"]))


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------
def train_head(
    store: str | os.PathLike[str] | Store,
    embeddings: str | Sequence[str] | None = None,
    category_type: str = "all",
    category: str = "all",
    head: str = "logreg",
    *,
    dataset: str | Sequence[str] | None = None,
    model: str | None = None,
    variant: str = "frozen",
    threshold: float = DEFAULT_THRESHOLD,
    **params: Any,
) -> str:
    """Fit a head on every labelled cell of one category and save it in the store.

    Parameters
    ----------
    store : str, path or Store
    embeddings : str or list of str, optional
        Training embedding ids (one per dataset, all in one space). Or name them with
        ``dataset`` + ``model`` (+ ``variant``).
    category_type : {"all", "tissue", "cancer_type", "drug_type", "regimen"}, default "all"
    category : str, default "all"
        The category value (``"all"`` for category type ``all``).
    head : {"logreg", "ridge", "lightgbm", "mlp", "majority"}, default "logreg"
    dataset : str or list of str, optional
        Dataset name(s) whose ``model``/``variant`` embedding to train on.
    model, variant : str
        Embedding model and variant (with ``dataset``).
    threshold : float, default 0.5
        Predicted label is 1 (sensitive) where the probability is at least this.
    **params
        Head constructor arguments (e.g. ``C=0.5`` for logreg, ``profile="fast"`` for mlp).

    Returns
    -------
    str
        ``head_id``. Training the same configuration again returns the stored head unchanged.

    Raises
    ------
    InputDataError
        Unknown head or category, embeddings of several spaces, incomplete embeddings, no labelled
        cell in the category, or one class only.

    Examples
    --------
    >>> train_head("scdm-store", dataset="a375", model="pca", head="ridge", alpha=10.0)  # doctest: +SKIP
    '3f2a9c0d1e7b4a65'
    """
    from store import open_store

    st = open_store(store)
    if head not in TRAINABLE_HEADS:
        msg = f"Head {head!r} cannot be trained for later use; choose from {', '.join(TRAINABLE_HEADS)}."
        raise InputDataError(msg)
    if not 0.0 <= float(threshold) <= 1.0:
        msg = f"threshold must lie in [0, 1]; got {threshold!r}."
        raise InputDataError(msg)
    estimator = get_head(head, **params)
    params_key = estimator.params_key()
    rows = _select_embeddings(st, embeddings, dataset, model, variant)
    first = rows.iloc[0]
    space_id = str(first["space_id"])
    embedding_ids = [str(e) for e in rows["embedding_id"]]
    head_id = _hash_text("trained-head", space_id, embedding_ids, category_type, category, head, params_key, float(threshold))
    if len(st.query("SELECT 1 FROM trained_heads WHERE head_id = ?", [head_id])):
        load_head(st, head_id)  # verifies the artifact is intact
        logger.info("trained head %s exists; reusing it", head_id)
        return head_id
    cells = _training_cells(st, rows, category_type, category)
    X = _training_matrix(st, rows, cells)
    y = cells["response"].to_numpy(np.int64)
    t0 = time.perf_counter()
    estimator.fit(X, y)
    fit_seconds = time.perf_counter() - t0
    relative = _write_artifact(st, head_id, estimator)
    record = {
        "head_id": head_id, "head": head, "head_params": params_key, "space_id": space_id, "model": str(first["model"]),
        "variant": str(first["variant"]), "checkpoint_hash": first["checkpoint_hash"], "adapter_hash": first["adapter_hash"],
        "embedding_params": str(first["params"]), "dim": int(first["dim"]), "embedding_ids": json.dumps(embedding_ids),
        "datasets": json.dumps([str(n) for n in rows["dataset_name"]]), "category_type": category_type,
        "category": category, "n_train": int(len(y)), "n_train_pos": int(y.sum()), "threshold": float(threshold),
        "train_metrics": None, "fit_seconds": fit_seconds, "artifact_format": "torch" if head == "mlp" else "joblib",
        "path": relative, "file_hash": file_hash(st.root / relative), "scdm_version": _version(), "created_at": _now(),
    }
    metrics = _eval_metrics(st, space_id, category_type, category, head, params_key)
    record["train_metrics"] = json.dumps(metrics) if metrics else None
    st.insert_df("trained_heads", pd.DataFrame([record]))
    logger.info("trained %s head %s on %d cells of %s=%s (%s, space %s)", head, head_id, len(y), category_type,
                category, record["model"], space_id)
    return head_id


def _write_artifact(st: Store, head_id: str, estimator: BaseHead) -> str:
    """Write the artifact folder atomically (temporary folder, then rename); returns the file path."""
    final = st.root / HEADS_DIR / head_id
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{head_id}-", dir=final.parent))
    try:
        name, artifact_format = _save_artifact(estimator, tmp)
        card = {"head_id": head_id, "head": estimator.name, "params": json.loads(estimator.params_key()),
                "format": artifact_format, "file": name, "file_hash": file_hash(tmp / name), "scdm_version": _version()}
        (tmp / "head.json").write_text(json.dumps(card, indent=2) + "\n")
        if final.exists():  # left over from an interrupted run whose catalog row never went in
            shutil.rmtree(final)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return f"{HEADS_DIR}/{head_id}/{name}"


# --------------------------------------------------------------------------------------------
# prediction
# --------------------------------------------------------------------------------------------
def _embedding_for(st: Store, trained: TrainedHead, dataset: str) -> tuple[Any, str]:
    """(DatasetInfo, embedding_id) of ``dataset`` in the head's space, or a clear refusal."""
    ds = st.dataset(dataset)
    table = st.embeddings()
    mine = table[table["dataset_id"] == ds.dataset_id]
    same = mine[(mine["space_id"] == trained.space_id) & (mine["status"] == "complete")]
    if len(same):
        return ds, str(same.sort_values("created_at")["embedding_id"].iloc[-1])
    expected = f"{trained.model} ({trained.variant}, space {trained.space_id})"
    if mine.empty:
        msg = (f"Dataset {ds.name!r} has no embedding; head {trained.head_id} reads {expected}. "
               f"Embed it first: `scdm embed {ds.name} --model {trained.model}`.")
        raise EmbeddingNotFoundError(msg)
    have = ", ".join(f"{r.model} ({r.variant}, space {r.space_id}, {r.status})" for r in mine.itertuples())
    hint = (f"Embed it with the head's model: `scdm embed {ds.name} --model {trained.model}` (same checkpoint and params)."
            if trained.model not in set(mine["model"]) else
            "It is embedded with the same model but other parameters, checkpoint or fit (a pca/hvg baseline fitted "
            "on other datasets is a space of its own): embed it jointly with the head's training datasets and train "
            "the head in that space, or embed it with the exact parameters of the head's embeddings.")
    msg = f"Dataset {ds.name!r} is embedded as {have}, but head {trained.head_id} expects {expected}. {hint}"
    raise SpaceMismatchError(msg)


def predict(
    store: str | os.PathLike[str] | Store,
    head_id: str,
    dataset: str,
    out: str | os.PathLike[str] | None = None,
) -> pd.DataFrame:
    """Predict every cell of a dataset with a trained head; store and return the predictions.

    Parameters
    ----------
    store : str, path or Store
    head_id : str
        Trained head id (or unambiguous prefix of at least 6 characters).
    dataset : str
        Dataset name or id; it must be embedded in the head's space (same model, variant,
        checkpoint and parameters).
    out : str or path, optional
        Also write the predictions to a ``.csv``, or to an ``.h5ad`` copy of the dataset with obs
        columns ``scdm_proba`` and ``scdm_label`` (and the head id in ``uns["scdm"]``).

    Returns
    -------
    DataFrame
        One row per cell in dataset order: ``head_id``, ``dataset_id``, ``row``, ``cell_id``,
        ``embedding_id``, ``proba`` (probability of sensitive), ``label`` (1 sensitive, 0
        resistant), ``response`` (the stored label, if any).

    Raises
    ------
    HeadNotFoundError, HeadArtifactError
    SpaceMismatchError
        The dataset is embedded only with another model, variant or space.
    EmbeddingNotFoundError
        The dataset has no embedding at all.
    """
    from store import open_store

    st = open_store(store)
    if out is not None and Path(out).suffix not in (".csv", ".h5ad"):
        msg = f"Cannot write predictions to {str(out)!r}: use a path ending in .csv or .h5ad."
        raise InputDataError(msg)
    trained = load_head(st, head_id)
    ds, embedding_id = _embedding_for(st, trained, dataset)
    X = st.read_embedding(embedding_id)
    proba = trained.head.predict_proba(X)
    label = (proba >= trained.threshold).astype(np.int8)
    cells = st.cells([ds.dataset_id]).sort_values("row").reset_index(drop=True)
    frame = pd.DataFrame({
        "head_id": trained.head_id, "dataset_id": ds.dataset_id, "row": cells["row"].to_numpy(np.int32),
        "cell_id": cells["cell_id"].astype(str), "embedding_id": embedding_id, "proba": proba.astype(np.float32),
        "label": label, "response": cells["response"],
    })
    _store_predictions(st, frame)
    if out is not None:
        _write_out(st, ds, frame, Path(out), trained)
    logger.info("predicted %d cells of %s with head %s (%d sensitive)", len(frame), ds.name, trained.head_id,
                int(label.sum()))
    return frame


def _store_predictions(st: Store, frame: pd.DataFrame) -> None:
    rows = frame[["head_id", "dataset_id", "row", "embedding_id", "proba", "label"]].assign(created_at=_now())
    with st.catalog.transaction() as con:
        con.execute("DELETE FROM predictions WHERE head_id = ? AND dataset_id = ?",
                    [str(frame["head_id"].iloc[0]), str(frame["dataset_id"].iloc[0])])
        st.catalog.insert_df("predictions", rows, con)


def _write_out(st: Store, ds: Any, frame: pd.DataFrame, out: Path, trained: TrainedHead) -> None:
    if out.suffix == ".csv":
        frame.to_csv(out, index=False)
        return
    adata = st.open_anndata(ds.dataset_id, backed=False)
    adata.obs["scdm_proba"] = frame["proba"].to_numpy()
    adata.obs["scdm_label"] = frame["label"].to_numpy()
    adata.uns["scdm_prediction"] = {"head_id": trained.head_id, "model": trained.model, "variant": trained.variant,
                                    "space_id": trained.space_id, "threshold": trained.threshold}
    adata.write_h5ad(out)


def trained_heads(store: str | os.PathLike[str] | Store) -> pd.DataFrame:
    """All trained heads (catalog rows), newest first."""
    from store import open_store

    return open_store(store).query("SELECT * FROM trained_heads ORDER BY created_at DESC")
