"""Trained heads: a head fitted on every labelled cell of a category, saved for later predictions.

The evaluation grid (:mod:`scdm.classify.grid`) fits heads on folds and keeps only their scores.
Here a head is fitted once on all labelled cells of one category (no held-out fold), saved as an
artifact in the store and used to predict cells of any dataset embedded in the same space::

    head_id = train_head(st, dataset="a375", model="pca", category_type="all", category="all", head="logreg")
    frame = predict(st, head_id, "a375-new-batch", out="predictions.csv")

Artifacts live in ``<store>/artifacts/heads/<head_id>/`` in formats that cannot run code when read
(a store may be shared, and a pickle in it would run whatever its writer put there):

* ``json-npz`` (logreg, ridge, majority): ``head.npz``, the fitted arrays (coefficients, the
  standardiser's mean and scale) as ``.npy`` members plus the head's name, parameters and fitted
  scalars as JSON in the ``scdm_state`` member; read with ``np.load(allow_pickle=False)``;
* ``safetensors`` (mlp): ``head.safetensors``, the network's ``state_dict`` and the standardiser's
  arrays as tensors; the JSON state (including the layer list the network is rebuilt from) is
  the file's metadata;
* ``lightgbm-text`` (lightgbm): ``head.npz`` holding LightGBM's own text model
  (``Booster.model_to_string``, read back with ``lightgbm.Booster(model_str=...)``) and the JSON
  state.

Next to it, the card ``head.json`` describes the head for people. The catalog row in
``trained_heads`` (:mod:`store.heads`) records the artifact's format and blake2b hash; loading
refuses a file whose hash differs. Heads saved by older scdm versions as pickles (``head.joblib``,
``head.pt``) are refused with the command that trains them again; ``trust_pickle=True`` (``scdm
predict --trust-pickle``) converts such a file once, which unpickles it. Predictions go to the
``predictions`` table (one row per head x dataset x cell).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import logging
import os
import re
import shlex
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from scdm.classify.grid import MixedDrugsWarning, mixed_drugs, respell_stored_params
from scdm.classify.heads import REVISION_NOTES, BaseHead, get_head, head_revision, respelled_params_key
from scdm.classify.metrics import METRICS, compute_metrics
from scdm.classify.results import stale_sql
from scdm.store.adapters import adapter_dir, tuned_training_rows
from scdm.store.errors import EmbeddingNotFoundError, InputDataError, ScdmError
from scdm.store.genes import gene_table_version
from scdm.store.hashing import file_blake2b
from scdm.store.heads import (
    HeadNotFoundError,
    Predictions,
    TrainedHeadRecord,
    add_trained_head,
    has_trained_head,
    replace_predictions,
    response_label_set,
    set_head_artifact,
    trained_head,
    trained_head_params,
    trained_head_table,
)
from scdm.store.leftovers import place_folder, temp_prefix
from scdm.store.matrix import same_expression
from scdm.store.metrics import fold_summary, fold_summary_sql
from scdm.store.splits import cells_hash
from scdm.store.verify import BASELINE_MODELS, repair_hint

if TYPE_CHECKING:
    from scdm.store import Store

logger = logging.getLogger(__name__)

__all__ = [
    "TRAINABLE_HEADS",
    "CATEGORY_TYPES",
    "HeadArtifactError",
    "HeadNotFoundError",
    "LegacyHeadError",
    "SpaceMismatchError",
    "TrainedHead",
    "head_state",
    "with_revision_notes",
    "load_head",
    "load_head_artifact",
    "predict",
    "requested_label_set",
    "retrain_command",
    "save_head_artifact",
    "train_head",
    "trained_heads",
]

TRAINABLE_HEADS: tuple[str, ...] = ("logreg", "ridge", "lightgbm", "mlp", "majority")
"""Heads that can be trained and saved (``dann`` needs a target domain; ``shuffled-label`` is a leakage alarm)."""
CATEGORY_TYPES: tuple[str, ...] = ("all", "tissue", "cancer_type", "drug_type", "regimen")
HEADS_DIR = "artifacts/heads"
"""Folder of trained-head artifacts, relative to the store root."""
DEFAULT_THRESHOLD = 0.5


class HeadArtifactError(ScdmError, RuntimeError):
    """A trained head's artifact is missing, its bytes differ from the catalogued hash, or it cannot be read."""


class LegacyHeadError(HeadArtifactError):
    """The head was saved as a pickle by an older scdm; it is not loaded without explicit trust."""


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


def _training_cells(st: Store, rows: pd.DataFrame, category_type: str, category: str,
                    label_set: str | None = None) -> pd.DataFrame:
    """Labelled cells of the category, with the labels of ``label_set`` (default: each dataset's default)."""
    if category_type not in CATEGORY_TYPES:
        msg = f"Unknown category type {category_type!r}; choose from {', '.join(CATEGORY_TYPES)}."
        raise InputDataError(msg)
    if category_type == "all" and category != "all":
        msg = f"category_type 'all' has the one category 'all'; got category={category!r}."
        raise InputDataError(msg)
    cells = st.cells(list(rows["dataset_name"]), label_set=label_set)  # refuses a dataset without it, naming its sets
    labelled = cells[cells["response"].notna()]
    if category_type != "all":
        present = sorted(labelled[category_type].dropna().astype(str).unique())
        labelled = labelled[labelled[category_type].astype(str) == category]
        if labelled.empty:
            msg = (f"No labelled cell has {category_type} = {category!r} in {', '.join(rows['dataset_name'])}; "
                   f"categories present: {', '.join(present) or 'none'}.")
            raise InputDataError(msg)
    if labelled.empty:
        where = f" in label set {label_set!r}" if label_set is not None else ""
        msg = (f"No cell of {', '.join(rows['dataset_name'])} has a response label{where}; ingest with "
               "label_key=<obs column> to train a head.")
        raise InputDataError(msg)
    each = mixed_drugs(st, labelled, list(rows["dataset_name"]))
    if each is not None:  # its probability would be of no one drug's response, and its predictions say one label set
        warnings.warn(f"the training datasets are labelled with responses to different drugs ({each}): the head learns "
                      "them as one response, of no single drug; train it on the datasets labelled for one drug "
                      "(with --label-set)", MixedDrugsWarning, stacklevel=4)
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


EVAL_THRESHOLD = 0.5
"""The threshold the evaluation grid labels its test cells at (:func:`store.metrics.compute_metrics`' default)."""
THRESHOLD_FREE_METRICS: tuple[str, ...] = ("auroc", "ap")
"""Metrics of the probabilities alone: the same whatever threshold labels the cells."""
RECOMPUTED_KEY = "recomputed_at_threshold"
"""Key of a ``train_metrics`` entry recomputed from the grid's stored predictions at the head's threshold."""


def _eval_metrics(st: Store, space_id: str, cells: pd.DataFrame, label_set: str, category_type: str, category: str,
                  head: str, params_key: str, threshold: float = EVAL_THRESHOLD) -> list[dict[str, Any]]:
    """Mean/sd over the folds of each stored split of exactly the training cells, per metric (empty if none).

    A split qualifies when it holds exactly ``cells`` with their labels (its ``cells_hash``: the
    same datasets, category and responses) and was evaluated under the head's label set, in its
    space, with the same head and parameters. Results are never pooled across splits: one entry
    per split and metric, naming the split (``split_id``, ``scenario``, ``scheme``, ``k`` folds,
    ``seed``); ``n_folds`` is the folds where the metric has a value (the n of the mean), as in
    the leaderboard. The grid labels cells at :data:`EVAL_THRESHOLD`: for a head of another
    threshold its stored scores are kept only for the metrics that do not depend on it
    (:data:`THRESHOLD_FREE_METRICS`); the others are recomputed at the head's threshold from the
    split's stored test predictions (:func:`_recomputed_metrics`) where every fold has them.
    """
    where = (f"s.cells_hash = ? AND r.label_set = ? AND r.space_id = ? AND r.category_type = ? AND r.category = ? "
             f"AND r.head = ? AND t.head_params = ? AND NOT {stale_sql(st, 'r')}")
    args = [cells_hash(cells), label_set, space_id, category_type, category, head, params_key]
    metrics = "" if threshold == EVAL_THRESHOLD else f"AND list_contains({list(THRESHOLD_FREE_METRICS)}, r.metric)"
    frame = st.query(
        f"""SELECT r.split_id, r.scenario, r.scheme, s.n_folds AS k, s.seed, r.metric,
                  {fold_summary_sql('r.value', n='n_folds')}
           FROM eval_results r JOIN eval_tasks t USING (task_id) JOIN splits s ON s.split_id = r.split_id
           WHERE {where} {metrics}
           GROUP BY r.split_id, r.scenario, r.scheme, s.n_folds, s.seed, r.metric
           ORDER BY r.scenario, r.scheme, k, s.seed NULLS FIRST, r.split_id, r.metric""",
        args,
    )
    records = frame.astype(object).where(frame.notna(), None).to_dict("records")
    entries = [{k: (int(v) if k in ("k", "seed", "n_folds") and v is not None else v) for k, v in r.items()}
               for r in records]
    if threshold == EVAL_THRESHOLD or not entries:
        return entries
    entries += _recomputed_metrics(st, where, args, threshold)
    return sorted(entries, key=lambda e: (e["scenario"], e["scheme"], e["k"], e["seed"] is not None, e["seed"] or 0,
                                          e["split_id"], e["metric"]))


def _recomputed_metrics(st: Store, where: str, args: list[Any], threshold: float) -> list[dict[str, Any]]:
    """The threshold-dependent metrics of each qualifying split, recomputed per fold at ``threshold``.

    Each fold's stored test predictions (``eval_predictions``, probabilities as the grid
    scored them) are labelled at the head's threshold and scored with :func:`compute_metrics`;
    an entry is the mean/sd over the split's folds, marked with :data:`RECOMPUTED_KEY`. A split
    with a fold evaluated without predictions (``scdm evaluate --no-predictions``) gets none: a
    mean over some of its folds would not be the split's score.
    """
    tasks = st.query(
        f"""SELECT DISTINCT r.task_id, r.split_id, r.scenario, r.scheme, s.n_folds AS k, s.seed, t.flags,
                  EXISTS (SELECT 1 FROM eval_predictions p WHERE p.task_id = r.task_id) AS has_predictions
           FROM eval_results r JOIN eval_tasks t USING (task_id) JOIN splits s ON s.split_id = r.split_id
           WHERE {where} ORDER BY r.split_id, r.task_id""",
        args,
    )
    dependent = [m for m in METRICS if m not in THRESHOLD_FREE_METRICS]
    entries: list[dict[str, Any]] = []
    for split_id, folds in tasks.groupby("split_id", sort=True):
        if not folds["has_predictions"].all():
            logger.warning("split %s was evaluated without per-cell predictions (scdm evaluate --no-predictions) in "
                           "%d of its %d folds: the head's train_metrics hold only its threshold-free scores (%s) "
                           "there, because the grid's other scores label cells at %s, not at the head's threshold %s. "
                           "Run that `scdm evaluate` again without --no-predictions to have them recomputed.",
                           split_id, int((~folds["has_predictions"].astype(bool)).sum()), len(folds),
                           ", ".join(THRESHOLD_FREE_METRICS), EVAL_THRESHOLD, threshold)
            continue
        per_fold = [_fold_metrics_at(st, str(task_id), flags, threshold)
                    for task_id, flags in zip(folds["task_id"], folds["flags"])]
        first = folds.iloc[0]
        seed = None if pd.isna(first["seed"]) else int(first["seed"])
        for metric in dependent:
            mean, sd, n = fold_summary(v[metric] for v in per_fold)
            entries.append({
                "split_id": str(split_id), "scenario": str(first["scenario"]), "scheme": str(first["scheme"]),
                "k": int(first["k"]), "seed": seed, "metric": metric,
                "mean": mean, "sd": sd, "n_folds": n, RECOMPUTED_KEY: threshold,  # as the stored scores' summary
            })
    return entries


def _fold_metrics_at(st: Store, task_id: str, flags: Any, threshold: float) -> dict[str, float | None]:
    """One fold's metrics from its stored test predictions, labelled at ``threshold``."""
    preds = st.query('SELECT y_true, proba FROM eval_predictions WHERE task_id = ? ORDER BY dataset_id, "row"', [task_id])
    hard_only = isinstance(flags, str) and "no_scores" in flags.split(",")
    # as the grid scored them: DOUBLE (rows stored as REAL before migration 15 hold their float32 values)
    proba = preds["proba"].to_numpy(np.float64)
    return dict(compute_metrics(preds["y_true"].to_numpy(np.int8), proba, threshold=threshold, hard_only=hard_only).values)


# --------------------------------------------------------------------------------------------
# artifacts: a fitted head's public state in formats that cannot run code
# --------------------------------------------------------------------------------------------
ARTIFACT_FILES: dict[str, str] = {"json-npz": "head.npz", "safetensors": "head.safetensors", "lightgbm-text": "head.npz"}
"""Artifact file name per format."""
STATE_KEY = "scdm_state"
"""NPZ member / safetensors metadata key holding the head's JSON state."""
ARTIFACT_VERSION = 1
_FITTED_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*_$")
"""Fitted attributes end in ``_`` (scikit-learn convention); private caches start with ``_``."""
_NOT_SAVED: dict[tuple[str, str], str] = {
    ("logreg", "model_"): "the scikit-learn estimator is kept only for warm starts; coef_/intercept_ hold the solution",
}
"""Fitted attributes deliberately left out of the artifact, and why."""
_LAYER_ARGS: dict[str, tuple[str, ...]] = {
    "Linear": ("in_features", "out_features", "bias"),
    "ReLU": (), "GELU": ("approximate",), "LeakyReLU": ("negative_slope",), "SiLU": (), "Tanh": (), "Sigmoid": (),
    "Identity": (), "Dropout": ("p",), "LayerNorm": ("normalized_shape", "eps", "elementwise_affine"),
    "BatchNorm1d": ("num_features", "eps", "momentum", "affine", "track_running_stats"),
}  # fmt: skip
"""torch layers a saved network may contain, with the constructor arguments recorded for each."""


@dataclass
class HeadState:
    """A fitted head's public state, split by how each part is stored."""

    head: str
    params: dict[str, Any]
    values: dict[str, Any] = field(default_factory=dict)
    """JSON-able fitted attributes (numbers, strings, None, lists/dicts of them)."""
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    """Numeric numpy arrays."""
    modules: dict[str, Any] = field(default_factory=dict)
    """torch networks (``nn.Sequential`` of :data:`_LAYER_ARGS` layers)."""
    boosters: dict[str, str] = field(default_factory=dict)
    """LightGBM models as LightGBM's text model format."""

    @property
    def artifact_format(self) -> str:
        """``safetensors`` with a torch network, ``lightgbm-text`` with a LightGBM model, else ``json-npz``."""
        if self.modules and self.boosters:
            msg = f"A {self.head} head holding both a torch network and a LightGBM model cannot be saved in one artifact."
            raise HeadArtifactError(msg)
        return "safetensors" if self.modules else "lightgbm-text" if self.boosters else "json-npz"

    def header(self) -> dict[str, Any]:
        """The JSON state: everything but the arrays, tensors and model texts themselves."""
        return {"scdm_head_artifact": ARTIFACT_VERSION, "head": self.head, "params": self.params, "values": self.values,
                "arrays": sorted(self.arrays), "modules": {k: _module_spec(m) for k, m in self.modules.items()},
                "boosters": sorted(self.boosters)}


def _plain(value: Any) -> Any:
    """``value`` as JSON-able Python values (numpy scalars converted), or raise TypeError."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.generic) and value.dtype.kind in "biufU":
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _plain(v) for k, v in value.items()}
    raise TypeError(type(value).__name__)


def _is_torch_module(value: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.nn.Module)


def _is_lightgbm_model(value: Any) -> bool:
    return isinstance(value, BoosterClassifier) or (type(value).__module__.startswith("lightgbm") and hasattr(value, "booster_"))


def head_state(head: BaseHead) -> HeadState:
    """Split a fitted head's public state (attributes ending in ``_``) into storable parts.

    Raises
    ------
    HeadArtifactError
        An attribute is of a kind that could only be stored as a pickle.
    """
    try:
        params = _plain(head.get_params())  # the constructor arguments as given (params_key may resolve them)
    except TypeError as err:
        msg = f"A parameter of the {head.name} head is a {err}, which scdm cannot save without pickling."
        raise HeadArtifactError(msg) from None
    state = HeadState(head.name, params)
    for name, value in sorted(vars(head).items()):
        if not _FITTED_NAME.match(name) or (head.name, name) in _NOT_SAVED:
            continue
        if isinstance(value, np.ndarray) and value.dtype.kind in "biuf":
            state.arrays[name] = value
        elif _is_torch_module(value):
            state.modules[name] = value
        elif _is_lightgbm_model(value):
            state.boosters[name] = value.booster_.model_to_string()
        else:
            try:
                state.values[name] = _plain(value)
            except TypeError as err:
                msg = (f"The fitted {head.name} head's attribute {name} is a {err}, which scdm cannot save without "
                       "pickling; teach scdm.classify.trained_heads.head_state to store it.")
                raise HeadArtifactError(msg) from None
    return state


def _module_spec(module: Any) -> list[dict[str, Any]]:
    """The layer list (types and constructor arguments) a ``nn.Sequential`` is rebuilt from."""
    from torch import nn

    if type(module) is not nn.Sequential:
        msg = f"Only nn.Sequential networks can be saved without pickling; got {type(module).__name__}."
        raise HeadArtifactError(msg)
    spec = []
    for layer in module:
        kind = type(layer).__name__
        if kind not in _LAYER_ARGS or type(layer) is not getattr(nn, kind):
            msg = f"Layer {kind} is not one scdm can save without pickling ({', '.join(_LAYER_ARGS)})."
            raise HeadArtifactError(msg)
        args = {a: getattr(layer, a) for a in _LAYER_ARGS[kind]}
        if kind == "Linear":
            args["bias"] = layer.bias is not None
        spec.append({"type": kind, "args": _plain(args)})
    return spec


def _build_module(spec: list[dict[str, Any]]) -> Any:
    """``nn.Sequential`` from :func:`_module_spec`'s layer list; only allow-listed layer types."""
    from torch import nn

    layers = []
    for entry in spec:
        kind, args = entry["type"], dict(entry["args"])
        if kind not in _LAYER_ARGS or set(args) != set(_LAYER_ARGS[kind]):
            msg = f"The artifact names a layer {kind!r} with arguments {sorted(args)}, which scdm does not build."
            raise HeadArtifactError(msg)
        if kind == "LayerNorm":
            args["normalized_shape"] = tuple(args["normalized_shape"])
        layers.append(getattr(nn, kind)(**args))
    return nn.Sequential(*layers)


class BoosterClassifier:
    """A LightGBM booster read from its text model, with the classifier's ``predict_proba``.

    Stands in for the ``LGBMClassifier`` of a fitted ``lightgbm`` head (binary, labels 0/1): the
    same booster gives the same probabilities.
    """

    def __init__(self, booster: Any) -> None:
        self.booster_ = booster

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        p = np.asarray(self.booster_.predict(X), np.float64)
        return np.vstack((1.0 - p, p)).T


def save_head_artifact(head: BaseHead, folder: str | os.PathLike[str]) -> tuple[str, str]:
    """Write a fitted head into ``folder`` in a format that cannot run code.

    Parameters
    ----------
    head : BaseHead
        A fitted head.
    folder : path
        Existing folder; receives ``head.npz`` or ``head.safetensors``.

    Returns
    -------
    (file name, artifact format)
        Format ``json-npz``, ``safetensors`` or ``lightgbm-text``.
    """
    state = head_state(head)
    artifact_format = state.artifact_format
    path = Path(folder) / ARTIFACT_FILES[artifact_format]
    header = json.dumps(state.header(), sort_keys=True)
    if artifact_format == "safetensors":
        import torch
        from safetensors.torch import save_file

        tensors = {name: torch.from_numpy(np.ascontiguousarray(a)) for name, a in state.arrays.items()}
        for name, module in state.modules.items():
            tensors.update({f"{name}.{k}": v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()})
        save_file(tensors, str(path), metadata={STATE_KEY: header})
    else:
        members: dict[str, Any] = {STATE_KEY: np.array(header), **state.arrays,
                                   **{k: np.array(t) for k, t in state.boosters.items()}}
        with open(path, "wb") as fh:
            np.savez_compressed(fh, **members)
    return path.name, artifact_format


def _restore(header: dict[str, Any], head_name: str, arrays: dict[str, np.ndarray], tensors: dict[str, Any],
             boosters: dict[str, str], where: str) -> BaseHead:
    """Rebuild a head from its JSON state and stored parts (only fitted attribute names are set)."""
    if header.get("scdm_head_artifact") != ARTIFACT_VERSION or header.get("head") != head_name:
        msg = (f"{where} is not a version-{ARTIFACT_VERSION} artifact of a {head_name} head "
               f"(it says {header.get('head')!r}, version {header.get('scdm_head_artifact')!r}).")
        raise HeadArtifactError(msg)
    try:
        head = get_head(head_name, **header["params"])
    except InputDataError as err:
        msg = f"{where} holds parameters this scdm's {head_name} head does not take ({err}); train the head again."
        raise HeadArtifactError(msg) from err
    parts: dict[str, Any] = {**header["values"], **arrays}
    for name, spec in header["modules"].items():
        module = _build_module(spec)
        prefix = f"{name}."
        module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, strict=True)
        parts[name] = module.eval()
    if boosters:
        import lightgbm

        parts.update({name: BoosterClassifier(lightgbm.Booster(model_str=text)) for name, text in boosters.items()})
    # artifacts written before heads were scikit-learn classifiers have no classes_: all were fitted on 0/1 labels
    parts.setdefault("classes_", np.array([0, 1]))
    for name, value in parts.items():
        if not _FITTED_NAME.match(name):  # never set a private or dunder attribute from a file
            msg = f"{where} names an attribute {name!r}, which is not a fitted attribute of a head."
            raise HeadArtifactError(msg)
        setattr(head, name, value)
    return head


def load_head_artifact(path: str | os.PathLike[str], artifact_format: str, head_name: str) -> BaseHead:
    """Read a head written by :func:`save_head_artifact`; nothing in the file is unpickled.

    Raises
    ------
    HeadArtifactError
        Unknown format, or the file is not a readable artifact of a ``head_name`` head.
    """
    path = Path(path)
    where = f"The artifact {str(path)!r}"
    try:
        if artifact_format == "safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as fh:
                header = json.loads((fh.metadata() or {})[STATE_KEY])
                tensors = {k: fh.get_tensor(k) for k in fh.keys()}
            arrays = {name: tensors.pop(name).numpy() for name in header["arrays"]}
            return _restore(header, head_name, arrays, tensors, {}, where)
        if artifact_format in ("json-npz", "lightgbm-text"):
            with np.load(path, allow_pickle=False) as npz:
                header = json.loads(str(npz[STATE_KEY]))
                arrays = {name: npz[name] for name in header["arrays"]}
                boosters = {name: str(npz[name]) for name in header["boosters"]}
            return _restore(header, head_name, arrays, {}, boosters, where)
    except HeadArtifactError:
        raise
    except Exception as err:  # a damaged or foreign file: zip, JSON, safetensors, torch or LightGBM errors
        msg = f"{where} cannot be read as a {artifact_format} {head_name} head ({type(err).__name__}: {err})."
        raise HeadArtifactError(msg) from err
    msg = f"{where} has format {artifact_format!r}, which this scdm does not read."
    raise HeadArtifactError(msg)


def _check_round_trip(head: BaseHead, loaded: BaseHead) -> None:
    """The saved head predicts what the fitted one does (on a fixed random probe)."""
    probe = np.random.default_rng(0).standard_normal((32, int(head.n_features_in_))).astype(np.float32)
    expected, got = head.predict_proba(probe), loaded.predict_proba(probe)
    if not np.allclose(got, expected, rtol=1e-5, atol=1e-6):
        msg = (f"The saved {head.name} head predicts differently from the fitted one "
               f"(max |diff| {float(np.max(np.abs(got - expected))):.2e}); this is a bug in scdm, please report it.")
        raise HeadArtifactError(msg)


# ---- heads pickled by older scdm versions -----------------------------------------------------
def retrain_command(st: Store, record: TrainedHeadRecord) -> str:
    """The ``scdm train-head`` command that trains this head again (same cells and settings)."""
    parts = ["scdm", "--store", str(st.root), "train-head"]
    for embedding_id in record.embedding_ids:
        parts += ["--embedding", embedding_id]
    if (record.category_type, record.category) != ("all", "all"):
        parts += ["--by", record.category_type, "--category", record.category]
    parts += ["--head", record.head]
    try:  # the default head's identity: parameters equal to it need not be spelled out
        defaults = json.loads(get_head(record.head).params_key())
    except InputDataError:
        defaults = {}
    for key, value in sorted(record.params.items()):
        if key in defaults and defaults[key] == value:
            continue
        text = value if isinstance(value, str) and not _parses_as_json(value) else json.dumps(value)
        parts += ["--param", f"{key}={text}"]
    if record.threshold != DEFAULT_THRESHOLD:
        parts += ["--threshold", repr(record.threshold)]
    chosen = requested_label_set(st, record)
    if chosen is not None:
        parts += ["--label-set", chosen]
    return shlex.join(parts)


def requested_label_set(st: Store, record: TrainedHeadRecord) -> str | None:
    """The ``label_set`` a head was trained with where that is not its datasets' default, else None.

    Training it again without it would fit the default labels (possibly another drug's response):
    a head's one label set that one of its datasets holds but not as its default was asked for.
    """
    from scdm.store.labels import label_sets

    if not record.label_set or "," in record.label_set:  # several names: each dataset's default
        return None
    known = st.query("SELECT dataset_id FROM datasets WHERE list_contains(?, name)", [list(record.datasets)])
    chosen = [ls for ls in label_sets(st, sorted(known["dataset_id"])) if ls.name == record.label_set]
    return record.label_set if any(not ls.is_default for ls in chosen) else None


def _parses_as_json(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True


def _legacy_refusal(st: Store, record: TrainedHeadRecord, path: Path) -> LegacyHeadError:
    msg = (f"Trained head {record.head_id} was saved by scdm {record.scdm_version or '(unknown version)'} as a "
           f"{record.artifact_format} pickle ({str(path)!r}). scdm no longer loads pickled heads: loading a pickle runs "
           "code stored in the file, and anyone who can write to the store could have planted it. Train the head "
           f"again (same cells and settings, saved in a safe format; the command prints its head id):\n  "
           f"{retrain_command(st, record)}\nOnly if you are sure nobody else could have written this store, convert "
           "the file once instead with `scdm predict --trust-pickle ...` (this unpickles it, running any code in it).")
    return LegacyHeadError(msg)


def _load_legacy_pickle(path: Path, artifact_format: str, head_name: str) -> BaseHead:
    """Unpickle a head saved by an older scdm. Runs code from the file: only with ``trust_pickle``."""
    if artifact_format == "torch":
        return _load_legacy_torch(path, head_name)
    import joblib

    with _legacy_module_names():
        head = joblib.load(path)  # trusted explicitly by the caller (--trust-pickle)
    if not isinstance(head, BaseHead) or head.name != head_name:
        msg = f"The artifact {str(path)!r} does not hold a fitted {head_name} head."
        raise HeadArtifactError(msg)
    return head


# Before scdm had one import root, heads were pickled under the top-level package ``scdm_classify``.
_LEGACY_HEAD_MODULES = {"scdm_classify": "scdm.classify", "scdm_classify.heads": "scdm.classify.heads",
                        "scdm_classify.head_base": "scdm.classify.head_base"}


@contextlib.contextmanager
def _legacy_module_names() -> Iterator[None]:
    """Let an old pickle find its classes under their old module names, for the duration of one load."""
    added = []
    for old, new in _LEGACY_HEAD_MODULES.items():
        if old not in sys.modules:
            sys.modules[old] = importlib.import_module(new)
            added.append(old)
    try:
        yield
    finally:
        for old in added:
            del sys.modules[old]


def _load_legacy_torch(path: Path, head_name: str) -> BaseHead:
    """A ``head.pt`` of the old mlp format: Linear-ReLU-Linear-ReLU-Linear ``state_dict`` and the standardiser."""
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    weights = state["state_dict"]
    spec = []
    for i in (0, 2, 4):  # the layer layout every scdm before the safe formats used
        out_features, in_features = (int(n) for n in weights[f"{i}.weight"].shape)
        spec.append({"type": "Linear", "args": {"in_features": in_features, "out_features": out_features, "bias": True}})
        if i < 4:
            spec.append({"type": "ReLU", "args": {}})
    arrays = {f"{k}_": state[k].numpy() for k in ("mean", "scale") if state[k] is not None}
    values = {"n_features_in_": int(state["n_features_in"]), "bf16_": bool(state["bf16"]),
              "fit_seconds_": float(state["fit_seconds"]), **{f"{k}_": None for k in ("mean", "scale") if state[k] is None}}
    header = {"scdm_head_artifact": ARTIFACT_VERSION, "head": "mlp", "params": json.loads(state["params"]),
              "values": values, "arrays": sorted(arrays), "modules": {"model_": spec}, "boosters": []}
    tensors = {f"model_.{k}": v for k, v in weights.items()}
    return _restore(header, head_name, arrays, tensors, {}, f"The artifact {str(path)!r}")


def _convert_legacy(st: Store, record: TrainedHeadRecord, head: BaseHead) -> None:
    """Save an unpickled legacy head in the safe format and point its catalog row at it."""
    relative, artifact_format = _write_artifact(st, record.head_id, head)
    set_head_artifact(st, record.head_id, artifact_format=artifact_format, path=relative,
                      file_hash=file_blake2b(st.root / relative), scdm_version=_version())
    logger.warning("trained head %s: converted its %s pickle to %s", record.head_id, record.artifact_format, relative)


def _artifact_path(st: Store, record: TrainedHeadRecord) -> Path:
    path = (st.root / record.path).resolve()
    if not path.is_relative_to(st.root.resolve()) or not path.is_file():
        msg = (f"The artifact of trained head {record.head_id} is missing ({str(path)!r}); train it again:\n  "
               f"{retrain_command(st, record)}")
        raise HeadArtifactError(msg)
    found = file_blake2b(path)
    if found != record.file_hash:
        msg = (f"The artifact {str(path)!r} of trained head {record.head_id} has hash {found}, but the catalog "
               f"recorded {record.file_hash}: the file was changed or corrupted, so it is not loaded. "
               f"Train the head again:\n  {retrain_command(st, record)}")
        raise HeadArtifactError(msg)
    return path


def load_head(store: str | os.PathLike[str] | Store, head_id: str, *, trust_pickle: bool = False) -> TrainedHead:
    """Load a trained head after checking its artifact against the catalogued file hash.

    Parameters
    ----------
    store : str, path or Store
    head_id : str
        Trained head id, or an unambiguous prefix of at least 6 characters.
    trust_pickle : bool, default False
        Convert a head pickled by an older scdm (``joblib``/``torch`` format) to the safe format
        and load it. Unpickling runs code stored in the file: use it only for a store nobody else
        can write to. Without it such heads are refused.

    Raises
    ------
    HeadNotFoundError
        No trained head with this id (or unambiguous prefix).
    HeadArtifactError
        The artifact is missing, its hash differs from the catalog's (it was changed or corrupted),
        or it cannot be read.
    LegacyHeadError
        The head is a pickle written by an older scdm and ``trust_pickle`` is False; the message
        holds the command that trains it again.
    """
    from scdm.store import open_store

    st = open_store(store)
    record = trained_head(st, head_id)
    path = _artifact_path(st, record)
    if record.is_legacy:
        if not trust_pickle:
            raise _legacy_refusal(st, record, path)
        head = _load_legacy_pickle(path, record.artifact_format, record.head)
        if "classes_" not in vars(head):  # pickled before heads had classes_: all were fitted on 0/1 labels
            head.classes_ = np.array([0, 1])
        _convert_legacy(st, record, head)
    else:
        head = load_head_artifact(path, record.artifact_format, record.head)
    return TrainedHead(record.head_id, head, record.space_id, record.model, record.variant, record.threshold)


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
    label_set: str | None = None,
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
    label_set : str, optional
        Train on the labels of the label set of this name (every training dataset must have one;
        ``scdm ls --what labels`` lists them), e.g. JHU006's Vorinostat responses rather than its
        default Gefitinib ones. Default: each dataset's default label set.
    **params
        Head constructor arguments (e.g. ``C=0.5`` for logreg, ``profile="fast"`` for mlp).

    Returns
    -------
    str
        ``head_id``. Training the same configuration on the same cells and labels again returns
        the stored head unchanged; relabelled or re-annotated cells give a head of their own.
        Its catalog row's ``train_metrics`` (JSON, NULL when none) holds the cross-validated
        scores of this configuration already in the store: one entry per split of exactly the
        training cells and labels (same datasets, category and label set) evaluated in the same
        space with the same head and parameters, and per metric: ``split_id``, ``scenario``,
        ``scheme``, ``k`` (the split's folds), ``seed``, ``metric``, ``mean``, ``sd`` and ``n_folds``
        (folds with a value). Splits of other datasets, labels or fold counts are left out and
        different splits are never averaged together. The evaluation labels cells at 0.5: for a head of
        another ``threshold`` the threshold-dependent scores (accuracy, precision, recall, f1, mcc, ...)
        are recomputed at that threshold from each fold's stored test predictions, over the same folds,
        and marked ``recomputed_at_threshold``; a split evaluated with ``--no-predictions`` gives only
        its threshold-free scores (``auroc``, ``ap``), and a warning says so.

    Raises
    ------
    InputDataError
        Unknown head or category, embeddings of several spaces, incomplete embeddings, a training
        dataset without a label set named ``label_set``, no labelled cell in the category, or one
        class only.

    Examples
    --------
    >>> train_head("scdm-store", dataset="a375", model="pca", head="ridge", alpha=10.0)  # doctest: +SKIP
    '3f2a9c0d1e7b4a65'
    """
    from scdm.store import open_store

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
    cells = _training_cells(st, rows, category_type, category, label_set)
    # the label sets of the datasets with training cells (a category may hold one dataset of the space);
    # a named label set is part of the identity through this name and the labels in cells_hash
    label_names = label_set if label_set is not None else _label_set_names(st, sorted(cells["dataset_id"].unique()))
    # the datasets the head learned from: a category may hold the cells of one dataset of the space
    trained_datasets = tuple(str(r.dataset_name) for r in rows.itertuples() if r.dataset_id in set(cells["dataset_id"]))
    # the training cells and their labels are part of the identity: relabelled or re-annotated data
    # trains a head of its own instead of finding the one fitted on the old labels; so is the head's
    # revision (from 2): a head an older scdm fitted differently is not reused as this one's
    cells_key = cells_hash(cells)

    def identity(key: str) -> str:
        parts: list[Any] = [space_id, embedding_ids, category_type, category, head, key, float(threshold), cells_key,
                            label_names]
        if estimator.revision() != 1:
            parts.append({"revision": estimator.revision()})
        return _hash_text("trained-head", *parts)

    head_id = identity(params_key)
    if not has_trained_head(st, head_id):
        # an older scdm keyed the parameters as given ({"C": 1} where this one keys {"C": 1.0}): its head is this one
        older = [identity(p) for p in trained_head_params(st, head) if respelled_params_key(head, p) == params_key]
        head_id = next((h for h in older if has_trained_head(st, h)), head_id)
    exists = has_trained_head(st, head_id)
    if exists:
        try:
            load_head(st, head_id)  # verifies the artifact is intact
        except HeadArtifactError as err:  # missing, changed, or a pickle of an older scdm: fit it again
            why = "is a pickle of an older scdm" if isinstance(err, LegacyHeadError) else "is missing or damaged"
            logger.warning("trained head %s: its artifact %s; training it again", head_id, why)
        else:
            logger.info("trained head %s exists; reusing it", head_id)
            return head_id
    X = _training_matrix(st, rows, cells)
    y = cells["response"].to_numpy(np.int64)
    respell_stored_params(st)  # its evaluation's rows of an older scdm's spelling are found by params_key
    t0 = time.perf_counter()
    estimator.fit(X, y)
    fit_seconds = time.perf_counter() - t0
    relative, artifact_format = _write_artifact(st, head_id, estimator)
    if exists:
        set_head_artifact(st, head_id, artifact_format=artifact_format, path=relative,
                          file_hash=file_blake2b(st.root / relative), scdm_version=_version(), fit_seconds=fit_seconds)
        return head_id
    metrics = _eval_metrics(st, space_id, cells, label_names, category_type, category, head, params_key, float(threshold))
    record = TrainedHeadRecord(
        head_id=head_id, head=head, head_params=params_key, space_id=space_id, model=str(first["model"]),
        variant=str(first["variant"]), checkpoint_hash=_optional(first["checkpoint_hash"]),
        adapter_hash=_optional(first["adapter_hash"]), embedding_params=str(first["params"]), dim=int(first["dim"]),
        embedding_ids=tuple(embedding_ids), datasets=trained_datasets,
        category_type=category_type, category=category, n_train=int(len(y)), n_train_pos=int(y.sum()),
        threshold=float(threshold), train_metrics=json.dumps(metrics) if metrics else None, fit_seconds=fit_seconds,
        artifact_format=artifact_format, path=relative, file_hash=file_blake2b(st.root / relative),
        scdm_version=_version(), label_set=label_names, revision=estimator.revision(),
    )
    add_trained_head(st, record)
    logger.info("trained %s head %s on %d cells of %s=%s, label set %s (%s, space %s)", head, head_id, len(y),
                category_type, category, label_names, record.model, space_id)
    return head_id


def _optional(value: Any) -> str | None:
    return None if value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value)) else str(value)


def _label_set_names(st: Store, dataset_ids: Sequence[str]) -> str:
    """Names of the label sets the training labels came from (each dataset's default), sorted."""
    from scdm.store.labels import resolve_label_sets

    return ",".join(sorted({ls.name for ls in resolve_label_sets(st, dataset_ids).values()}))


def _write_artifact(st: Store, head_id: str, estimator: BaseHead) -> tuple[str, str]:
    """Write the artifact folder atomically (temporary folder, then rename); returns (file path, format).

    The written file is read back and must predict what ``estimator`` does before it replaces
    anything.
    """
    final = st.root / HEADS_DIR / head_id
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(head_id), dir=final.parent))  # pid in the name: see store.leftovers
    try:
        name, artifact_format = save_head_artifact(estimator, tmp)
        _check_round_trip(estimator, load_head_artifact(tmp / name, artifact_format, estimator.name))
        card = {"head_id": head_id, "head": estimator.name, "params": json.loads(estimator.params_key()),
                "format": artifact_format, "file": name, "file_hash": file_blake2b(tmp / name), "scdm_version": _version()}
        (tmp / "head.json").write_text(json.dumps(card, indent=2) + "\n")
        # another run of the same head may have placed the same artifact first: kept (the same bytes); a
        # leftover of an interrupted run, or a damaged one, is replaced, never deleted under a reader
        place_folder(tmp, final, same=lambda there: _intact_artifact(there) == card["file_hash"],
                     what=f"trained head {head_id}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already when it was renamed into place
    card = json.loads((final / "head.json").read_text())
    return f"{HEADS_DIR}/{head_id}/{card['file']}", str(card["format"])


def _intact_artifact(folder: Path) -> str | None:
    """The file hash of the complete head artifact in ``folder`` (its file matches its card), or None."""
    try:
        card = json.loads((folder / "head.json").read_text())
        found = file_blake2b(folder / str(card["file"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return found if found == card["file_hash"] else None


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
    unfinished = mine[mine["space_id"] == trained.space_id]
    if len(unfinished):  # the right space, interrupted: finishing it is the way in, not another fit or parameters
        row = unfinished.sort_values("created_at").iloc[-1]
        emb = st.embedding(str(row["embedding_id"]))
        lora = f" --lora {trained.variant.removeprefix('lora:')}" if trained.variant.startswith("lora:") else ""
        again = (f"`{repair_hint(st, emb)}`" if trained.model in BASELINE_MODELS else
                 f"run the `scdm embed {shlex.quote(ds.name)} --model {trained.model}{lora}` that started it again, with "
                 "the same checkpoint and parameters")
        msg = (f"Dataset {ds.name!r} has an embedding in head {trained.head_id}'s space, {emb.embedding_id}, but it is "
               f"not complete (status {row['status']}: an embedding that was interrupted); finish it, it resumes: "
               f"{again}. Then predict again.")
        raise InputDataError(msg)
    expected = f"{trained.model} ({trained.variant}, space {trained.space_id})"
    # a baseline's space is fitted on the datasets embedded together: the way in is a joint fit, not another dataset alone
    joint = _joint_baseline_hint(st, trained, ds.name) if trained.model in BASELINE_MODELS else None
    if trained.variant.startswith("lora:"):  # `scdm embed` makes the frozen space, never this one
        joint = _tuned_space_hint(st, trained, ds.name)
    older = _older_gene_table_hint(st, trained, ds.name)
    if older is not None:  # no embedding this scdm makes can enter the head's space: the other hints would not work
        joint = older
    if mine.empty:
        advice = joint or f"Embed it first: `scdm embed {ds.name} --model {trained.model}`."
        raise EmbeddingNotFoundError(f"Dataset {ds.name!r} has no embedding; head {trained.head_id} reads {expected}. {advice}")
    have = ", ".join(f"{r.model} ({r.variant}, space {r.space_id}, {r.status})" for r in mine.itertuples())
    hint = (joint if joint is not None else
            f"Embed it with the head's model: `scdm embed {ds.name} --model {trained.model}` (same checkpoint and params)."
            if trained.model not in set(mine["model"]) else
            "It is embedded with the same model but other parameters, checkpoint or fit (a pca/hvg baseline fitted "
            "on other datasets is a space of its own): embed it jointly with the head's training datasets and train "
            "the head in that space, or embed it with the exact parameters of the head's embeddings.")
    msg = f"Dataset {ds.name!r} is embedded as {have}, but head {trained.head_id} expects {expected}. {hint}"
    raise SpaceMismatchError(msg)


def _older_gene_table_hint(st: Store, trained: TrainedHead, dataset: str) -> str | None:
    """Why a dataset cannot enter a head's space made with an older gene table, and what to do; None otherwise.

    The gene table version is part of every embedding's identity: this scdm maps gene ids with its own table,
    so embedding any dataset again (the head's training datasets included) makes a new space beside the head's.
    """
    record = trained_head(st, trained.head_id)
    table = json.loads(record.embedding_params).get("gene_table")
    if table is None or table == gene_table_version():
        return None
    names = " ".join(shlex.quote(n) for n in dict.fromkeys([*record.datasets, dataset]))
    checkpoint = "" if trained.model in BASELINE_MODELS else " --checkpoint CHECKPOINT"
    joint = " --joint" if trained.model in BASELINE_MODELS else ""
    return (f"Head {record.head_id} was trained on {trained.model} embeddings made with gene table {table} (an older "
            f"scdm); this scdm maps gene ids with gene table {gene_table_version()}, so no embedding it makes, of "
            f"{dataset!r} or of the head's training datasets, is in the head's space. Embed the training datasets and "
            f"{dataset!r} with this scdm (`scdm embed {names} --model {trained.model}{joint}{checkpoint}`, with the "
            f"options they were embedded with), train the head again on the training datasets' new embeddings "
            f"(`scdm train-head --embedding ID,... --head {record.head}{_label_set_option(st, record)}`, ids from "
            f"`scdm ls`, with the --by, --category, "
            f"--param and --threshold of SELECT * FROM trained_heads WHERE head_id = '{record.head_id}') and predict "
            f"with the new head."
            + (f" Its embeddings were tuned by LoRA adapter {trained.variant.removeprefix('lora:')}, also of the older "
               f"table: tune again with `scdm finetune` and embed through the new adapter (--lora) for a tuned head, "
               f"or train it on the frozen embeddings." if trained.variant.startswith("lora:") else ""))


def _tuned_space_hint(st: Store, trained: TrainedHead, dataset: str) -> str:
    """How a dataset gets into a LoRA-tuned head's space: embedded through the same adapter."""
    adapter_id = trained.variant.removeprefix("lora:")
    folder = adapter_dir(st, adapter_id)
    return (f"The head reads embeddings tuned by LoRA adapter {adapter_id}; `scdm embed` without --lora makes the frozen "
            f"{trained.model} space, never this one. Embed {dataset!r} through the adapter with the head's checkpoint and "
            f"parameters: scdm embed {dataset} --model {trained.model} -c CHECKPOINT --lora {adapter_id} (Python: "
            f"scdm.embedding.runner.embed(store, {dataset!r}, {trained.model!r}, CHECKPOINT, lora_dir={str(folder)!r})), "
            f"or train a head on the frozen {trained.model} embeddings.")


def _label_set_option(st: Store, record: TrainedHeadRecord) -> str:
    """`` --label-set NAME`` where the head learned a label set that is not its datasets' default, else ''.

    Without it the train-head a refusal advises fits the default labels: another drug's response
    (JHU006's Gefitinib labels are the exact inverse of its Vorinostat ones).
    """
    chosen = requested_label_set(st, record)
    return "" if chosen is None else f" --label-set {shlex.quote(chosen)}"


def _joint_baseline_hint(st: Store, trained: TrainedHead, dataset: str) -> str:
    """How a dataset gets into a baseline head's space: a joint fit with the head's training datasets, and the head again."""
    record = trained_head(st, trained.head_id)
    params = json.loads(record.embedding_params)
    options = [f"--{key.replace('_', '-')} {params[f'{key}_requested']}" for key in ("n_comps", "n_hvg")
               if params.get(f"{key}_requested") is not None and (key != "n_comps" or trained.model == "pca")]
    if params.get("normalized") is not None:  # without it the joint fit detects each dataset's value kind anew
        options.append("--normalized" if params["normalized"] else "--counts")
    names = " ".join(shlex.quote(n) for n in dict.fromkeys([*record.datasets, dataset]))
    command = " ".join([f"scdm embed {names} --model {trained.model} --joint", *options])
    return (f"A {trained.model} space is fitted on the datasets embedded together, so embedding {dataset!r} alone makes "
            f"another space. Embed it jointly with the head's training datasets (`{command}`), train the head again "
            f"on their embeddings in that space (`scdm train-head --embedding ID,... --head {record.head}"
            f"{_label_set_option(st, record)}`, ids from "
            f"`scdm ls`, with the --by, --category, --param and --threshold of SELECT * FROM trained_heads WHERE "
            f"head_id = '{record.head_id}') and predict with the new head.")


def predict(
    store: str | os.PathLike[str] | Store,
    head_id: str,
    dataset: str,
    out: str | os.PathLike[str] | None = None,
    *,
    trust_pickle: bool = False,
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
        columns ``scdm_proba``, ``scdm_label`` and ``scdm_trained_on`` (and the head's ``head_id``,
        ``model``, ``variant``, ``space_id`` and ``threshold`` in ``uns["scdm_prediction"]``).
    trust_pickle : bool, default False
        Convert a head pickled by an older scdm to the safe format first (see :func:`load_head`):
        this unpickles the file, which runs any code stored in it.

    Returns
    -------
    DataFrame
        One row per cell in dataset order: ``head_id``, ``dataset_id``, ``row``, ``cell_id``,
        ``embedding_id``, ``proba`` (probability of sensitive, float64, as stored), ``label`` (1
        sensitive, 0 resistant: ``proba >= threshold`` of the head), ``response`` (the stored label, if any: of the label set the head was trained
        on where the dataset has it, else of its default), ``label_set`` (that label set's name),
        ``trained_on`` (True for the cells the head was fitted on, or whose labels tuned the
        LoRA adapter of a ``lora:`` embedding, or that are such a cell under another dataset name:
        the same cell id and expression values; their predictions are not held-out; a warning
        says how many). The catalog's ``predictions`` rows keep ``proba``, ``label`` and
        ``trained_on``; ``attrs["notes"]`` holds the warnings logged about these predictions, in
        their words (the server shows them beside the same numbers).

    Raises
    ------
    HeadNotFoundError, HeadArtifactError
    LegacyHeadError
        The head is a pickle of an older scdm (the message says how to train it again).
    SpaceMismatchError
        The dataset is embedded only with another model, variant or space.
    EmbeddingNotFoundError
        The dataset has no embedding at all.
    """
    from scdm.store import open_store

    st = open_store(store)
    if out is not None and Path(out).suffix not in (".csv", ".h5ad"):
        msg = f"Cannot write predictions to {str(out)!r}: use a path ending in .csv or .h5ad."
        raise InputDataError(msg)
    trained = load_head(st, head_id, trust_pickle=trust_pickle)
    ds, embedding_id = _embedding_for(st, trained, dataset)
    record = trained_head(st, trained.head_id)
    notes: list[str] = []
    _warn_older_revision(st, record, notes)
    _warn_fewer_known_genes(st, trained, record, ds.name, embedding_id, notes)
    X = st.read_embedding(embedding_id)
    # labelled from the probabilities exactly as they are stored (DOUBLE since migration 16) and returned,
    # so the stored label is proba >= threshold; float32 (REAL) made every cell past a logit of ~16.6 read 1.0
    proba = np.asarray(trained.head.proba_sensitive(X), np.float64)
    label = (proba >= trained.threshold).astype(np.int8)
    _warn_all_zero_rows(X, proba, ds.name, trained, notes)
    cells = st.cells([ds.dataset_id], label_set=_response_label_set(st, record, ds, notes)).sort_values("row")
    cells = cells.reset_index(drop=True)
    trained_on = _trained_on(st, record, embedding_id, cells, notes)
    copies = _copies_of_training_cells(st, record, ds.dataset_id, cells, notes) & ~trained_on
    if copies.any():
        _note(notes, "%d of the %d cells of %s have the cell id and the expression values of a cell that trained head "
                       "%s in another dataset (the same cells ingested under another name): marked trained_on, their "
                       "predictions are not held-out.", int(copies.sum()), len(cells), ds.name, trained.head_id)
        trained_on = trained_on | copies
    frame = pd.DataFrame({
        "head_id": trained.head_id, "dataset_id": ds.dataset_id, "row": cells["row"].to_numpy(np.int32),
        "cell_id": cells["cell_id"].astype(str), "embedding_id": embedding_id, "proba": proba,
        "label": label, "response": cells["response"], "label_set": cells["label_set"], "trained_on": trained_on,
    })
    if trained_on.any():
        _note(notes, "%d of the %d cells of %s trained head %s (or the LoRA adapter of its embedding): their "
                       "predictions are fitted values, not held-out ones (column trained_on); a score on them is a "
                       "training score. The head's cross-validated scores are its train_metrics (scdm sql \"SELECT "
                       "train_metrics FROM trained_heads WHERE head_id = '%s'\", or GET /api/heads).",
                       int(trained_on.sum()), len(frame), ds.name, trained.head_id, trained.head_id)
    replace_predictions(st, Predictions(trained.head_id, ds.dataset_id, embedding_id, frame["row"].to_numpy(),
                                        frame["proba"].to_numpy(), frame["label"].to_numpy(), trained_on))
    if out is not None:
        _write_out(st, ds, frame, Path(out), trained)
    logger.info("predicted %d cells of %s with head %s (%d sensitive)", len(frame), ds.name, trained.head_id,
                int(label.sum()))
    frame.attrs["notes"] = notes
    return frame


def _note(notes: list[str], msg: str, *args: Any) -> None:
    """Log a warning about the predictions being made and keep its text: predict returns it with them, so
    whoever shows the numbers elsewhere (the server's job, page) shows what qualifies them, in the same words."""
    logger.warning(msg, *args)
    notes.append(msg % args)


def _warn_older_revision(st: Store, record: TrainedHeadRecord, notes: list[str]) -> None:
    """Warn when an older revision of the head fitted it (its ``revision_note``, as the head listings show it):
    the leaderboard leaves such a revision's results out as known wrong, but its predictions look like any."""
    (note,) = with_revision_notes(trained_head_table(st, head_id=record.head_id))["revision_note"]
    if note:
        _note(notes, "head %s: %s (%s); these predictions come from that fit, which may differ from a head this scdm trains.",
              record.head_id, note, retrain_command(st, record))


KNOWN_GENES_WARN_RATIO = 0.5
"""Warn when a predicted dataset has fewer than this share of the model-known genes of the head's least-covered training dataset."""


def _known_genes(st: Store, embedding_ids: Sequence[str]) -> dict[str, int]:
    """Genes of each embedding's dataset that its model knew (the gene audit's ``n_matched``; left out where not recorded)."""
    frame = st.query("SELECT embedding_id, audit FROM embeddings WHERE list_contains(?, embedding_id)", [list(embedding_ids)])
    audits = {str(e): json.loads(a) if isinstance(a, str) else {} for e, a in frame.itertuples(index=False, name=None)}
    return {e: int(a["n_matched"]) for e, a in audits.items() if isinstance(a.get("n_matched"), int)}


def _warn_fewer_known_genes(st: Store, trained: TrainedHead, record: TrainedHeadRecord, dataset: str,
                            embedding_id: str, notes: list[str]) -> None:
    """Warn when the dataset's cells showed the model far fewer genes than the training cells did.

    Its embedding is then made from a fraction of the genes the head learned from (a gene panel, or
    gene ids the model mostly does not know): the vectors lie in the head's space but where the
    training cells never were, and the predictions look like any others. The audit's
    ``fraction_matched`` does not show it (1000 of a 1000-gene panel is 100%); the count does.
    """
    known = _known_genes(st, [embedding_id, *record.embedding_ids])
    trained_known = [known[e] for e in record.embedding_ids if e in known]
    if embedding_id not in known or not trained_known or embedding_id in record.embedding_ids:
        return
    if known[embedding_id] < KNOWN_GENES_WARN_RATIO * min(trained_known):
        _note(notes, "dataset %s has %d genes the %s model knows, the training datasets of head %s at least %d: its "
                       "embedding is made from a fraction of the genes the head learned from, so its predictions may "
                       "not mean what they mean on the training data (see the audit column of scdm ls). Check them "
                       "against labelled cells first, or train a head on datasets measuring the same genes.", dataset,
                       known[embedding_id], trained.model, trained.head_id, min(trained_known))


def _warn_all_zero_rows(X: np.ndarray, proba: np.ndarray, dataset: str, trained: TrainedHead, notes: list[str]) -> None:
    """Warn about cells whose embedding is all zeros (kept by ``allow_empty_cells``): the model saw nothing of
    them, so the head's answer for them is one number for no data, labelled like a real prediction."""
    empty = ~X.any(axis=1)
    if empty.any():
        values = ", ".join(f"{p:.3f}" for p in np.unique(np.round(proba[empty], 3))[:3])
        _note(notes, "%d of the %d cells of %s have an all-zero %s embedding (the model saw none of their genes): "
                       "head %s gives them all the probability %s and a label, which say nothing about those cells. "
                       "Leave them out of any reading (their rows have all-zero vectors in the embedding).",
                       int(empty.sum()), len(X), dataset, trained.model, trained.head_id, values)


def _response_label_set(st: Store, record: TrainedHeadRecord, ds: Any, notes: list[str]) -> str | None:
    """The dataset's label set shown beside the predictions (:func:`store.heads.response_label_set`)."""
    ls = response_label_set(st, record.label_set, ds.dataset_id)
    if ls is not None and record.label_set and ls.name not in record.label_set.split(","):
        _note(notes, "dataset %s has no label set %s, the one head %s was trained on; the response column holds its "
                       "default label set %s, which may be another drug's response", ds.name,
                       " or ".join(sorted(record.label_set.split(","))), record.head_id, ls.name)
    return None if ls is None else ls.name


def _trained_on(st: Store, record: TrainedHeadRecord, embedding_id: str, cells: pd.DataFrame,
                notes: list[str]) -> np.ndarray:
    """Which of a dataset's cells (in ``cells`` order) are not held-out: the head was fitted on them (its
    labelled cells of the head's category), or their labels tuned the LoRA adapter of the embedding."""
    tuned = tuned_training_rows(st, embedding_id)
    mask = np.zeros(len(cells), bool) if tuned is None else np.isin(cells["row"].to_numpy(np.int64), tuned)
    if embedding_id not in set(_fitted_embeddings(st, record)["embedding_id"]):
        return mask
    in_category = np.ones(len(cells), bool)
    if record.category_type != "all":
        in_category = (cells[record.category_type].astype(str) == record.category).to_numpy(bool)
    if _training_labels_changed(st, record):
        # which cells were labelled at fit time is no longer known: none of the category is claimed held-out
        _note(notes, "the labels of head %s's training datasets changed since it was fitted (%d labelled training "
                       "cells then): every cell of its category in them is marked trained_on. Train the head again "
                       "(scdm train-head) to predict them held-out.", record.head_id, record.n_train)
        return mask | in_category
    return mask | (cells["response"].notna().to_numpy(bool) & in_category)


def _fitted_embeddings(st: Store, record: TrainedHeadRecord) -> pd.DataFrame:
    """Catalog rows of the head's training embeddings whose datasets held its training cells (``record.datasets``).

    An embedding passed along without a label in the head's category or label set (an unlabelled
    dataset of a joint space) trained nothing: its cells are held-out, and reading it with the head's
    label set would refuse it (a dataset without that label set), which read as changed labels.
    """
    rows = st.embeddings()
    return rows[rows["embedding_id"].isin(record.embedding_ids) & rows["dataset_name"].isin(record.datasets)]


def _copies_of_training_cells(st: Store, record: TrainedHeadRecord, dataset_id: str, cells: pd.DataFrame,
                              notes: list[str]) -> np.ndarray:
    """Which of a dataset's cells (in ``cells`` order) are a training cell of the head under another dataset name.

    A copy has the cell id of a labelled training cell of another dataset and exactly its expression
    values on the genes both datasets have (a subset or a re-save of one file is another dataset, so
    its embedding id is not the head's). A cell id alone is no evidence: barcodes repeat across runs.
    Only cells whose id matches are read, so a dataset that shares no cell id costs no read.
    """
    mask = np.zeros(len(cells), bool)
    rows = _fitted_embeddings(st, record)
    rows = rows[rows["dataset_id"] != dataset_id]
    if rows.empty:
        return mask
    label_set = record.label_set if record.label_set and "," not in record.label_set else None
    try:
        train = _training_cells(st, rows, record.category_type, record.category, label_set)
    except ScdmError:
        return mask  # no labelled training cell there today: nothing to match
    ids = cells["cell_id"].astype(str).to_numpy()
    for other_id, group in train.groupby("dataset_id"):
        where = pd.Index(group["cell_id"].astype(str)).get_indexer(ids)  # cell ids are unique within a dataset
        here = np.flatnonzero(where >= 0)
        if here.size:
            there = group["row"].to_numpy(np.int64)[where[here]]
            mask[here] = _same_expression(st, dataset_id, cells["row"].to_numpy(np.int64)[here], str(other_id), there,
                                          notes)
    return mask


def _same_expression(st: Store, dataset_a: str, rows_a: np.ndarray, dataset_b: str, rows_b: np.ndarray,
                     notes: list[str]) -> np.ndarray:
    """Whether row ``rows_a[i]`` of one dataset holds exactly the values of ``rows_b[i]`` of another
    (:func:`store.matrix.same_expression`); none where a dataset's data cannot be read, with a note."""
    try:
        return same_expression(st, dataset_a, rows_a, dataset_b, rows_b)
    except ScdmError as err:
        _note(notes, "could not compare the expression of %s and %s to find copies of training cells (%s): cells of "
                       "one under another name are not marked trained_on", dataset_a, dataset_b, err)
        return np.zeros(len(rows_a), bool)


def _training_labels_changed(st: Store, record: TrainedHeadRecord) -> bool:
    """Whether the head's training cells, read with today's labels, differ in number or positives from its fit."""
    rows = _fitted_embeddings(st, record)
    # one label set named for every dataset reads exactly those labels; several names were each dataset's default
    label_set = record.label_set if record.label_set and "," not in record.label_set else None
    try:
        cells = _training_cells(st, rows, record.category_type, record.category, label_set)
    except ScdmError:
        return True
    return len(cells) != record.n_train or int((cells["response"] == 1).sum()) != record.n_train_pos


def _write_out(st: Store, ds: Any, frame: pd.DataFrame, out: Path, trained: TrainedHead) -> None:
    if out.suffix == ".csv":
        frame.to_csv(out, index=False)
        return
    adata = st.open_anndata(ds.dataset_id, backed=False)
    for note in st.add_stored_labels(adata, ds.dataset_id):  # the store's labels beside the file's columns
        logger.warning("predictions of %s: %s", ds.name, note)
    adata.obs["scdm_proba"] = frame["proba"].to_numpy()
    adata.obs["scdm_label"] = frame["label"].to_numpy()
    adata.obs["scdm_trained_on"] = frame["trained_on"].to_numpy()
    adata.uns["scdm_prediction"] = {"head_id": trained.head_id, "model": trained.model, "variant": trained.variant,
                                    "space_id": trained.space_id, "threshold": trained.threshold}
    adata.write_h5ad(out)


def trained_heads(store: str | os.PathLike[str] | Store) -> pd.DataFrame:
    """All trained heads (catalog rows), newest first, with :func:`revision_notes`."""
    from scdm.store import open_store

    return with_revision_notes(trained_head_table(open_store(store)))


def with_revision_notes(heads: pd.DataFrame) -> pd.DataFrame:
    """Trained-head rows with ``revision_note``: empty for a head this scdm's revision of it fitted, else why
    its numbers may differ from a head trained now (an older revision fitted it, with what that revision got
    wrong; or it was trained before scdm recorded revisions, by a head that has been revised since)."""
    notes = []
    for row in heads.to_dict("records"):
        current = head_revision(str(row["head"]), json.loads(row["head_params"]))
        stored = row.get("revision")
        if stored is None or pd.isna(stored):
            notes.append("" if current == 1 else
                         f"trained before scdm recorded head revisions; {row['head']} is at revision {current} now "
                         f"({REVISION_NOTES.get((str(row['head']), current), 'its numbers changed')}): train it again to be sure")
        elif int(stored) < current:
            # every fix since its revision, newest first: revision 1 of ridge missed two
            fixes = [REVISION_NOTES[(str(row["head"]), r)] for r in range(current, int(stored), -1)
                     if (str(row["head"]), r) in REVISION_NOTES] or ["its numbers changed"]
            notes.append(f"fitted by revision {int(stored)} of {row['head']}, now {current} ({'; and '.join(fixes)}): "
                         "train it again")
        else:
            notes.append("")
    return heads.assign(revision_note=notes)
