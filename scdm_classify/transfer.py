"""scDEAL transfer learning: from labelled bulk (or labelled studies) to unlabelled single cells.

:func:`transfer` trains the scDEAL network (see :mod:`scdm_classify._transfer_model`) from a
labelled *source* to an unlabelled *target* dataset of the store and writes every target cell's
probability of sensitivity to the catalog; :func:`critical_genes` explains a run with integrated
gradients and a Wilcoxon test between predicted sensitive and resistant cells.

Sources
    * bulk cell lines: an AnnData / ``.h5ad`` (``obs[drug]`` = response) or a pair of CSV paths
      ``(expression.csv, response.csv)``; a continuous response (IC50, AUC, activity area) is
      binarised per drug with the waterfall method (:func:`waterfall_cutoff`);
    * labelled single-cell studies of the store: a dataset name or a list of names.

Features
    * ``"expr"``: log-normalised expression (counts: ``normalize_total`` 1e4 + ``log1p``) on the
      genes shared by source and target, restricted to the target's ``n_hvg`` most variable
      ones, MinMax-scaled to [0, 1] per domain as in the paper;
    * an embedding id of the target dataset: its cached embedding (any model), with the source
      datasets' embeddings of the same space (or ``source_features``), MinMax-scaled per domain.

No peeking
    The epoch kept is the one with the lowest cross-entropy on held-out *source* cells
    (``validation_fraction``), or on a labelled target-validation dataset passed as
    ``validation`` (a different dataset than the target). A grid of ``alpha``/``beta`` values
    needs such a target-validation set: source cross-entropy cannot measure adaptation. Target
    labels are read only after the predictions are made, to compute metrics.

Examples
--------
>>> res = transfer("scdm-store", source=("gdsc_expr.csv", "gdsc_ic50.csv"), target="GSE110894",
...                drug="I-BET-762", response="ic50")           # doctest: +SKIP
>>> res.metrics["auroc"]                                        # doctest: +SKIP
>>> genes = critical_genes("scdm-store", res.run_id)             # doctest: +SKIP
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from scdm_classify._transfer_data import (
    MinMax,
    ResponseKind,
    TransferWarning,
    WaterfallCut,
    balance_classes,
    binarize_response,
    bulk_kind,
    cluster_cells,
    column_index,
    dense,
    log_normalize,
    read_bulk,
    read_store_expression,
    select_hvg,
    shared_genes,
    store_symbols,
    symbols_of,
    waterfall_cutoff,
)
from scdm_classify.metrics import METRICS, compute_metrics
from store.errors import (
    EmbeddingIncompleteError,
    EmbeddingNotFoundError,
    InputDataError,
)

if TYPE_CHECKING:
    import anndata as ad

    from store import Store

logger = logging.getLogger(__name__)

__all__ = [
    "TransferResult",
    "TransferWarning",
    "WaterfallCut",
    "binarize_response",
    "critical_genes",
    "transfer",
    "transfer_latent",
    "waterfall_cutoff",
]

_ARTIFACTS = "transfer"
_HISTORY_COLUMNS = ("ce", "mmd", "cluster", "rec_source", "rec_target", "rec", "total", "val_ce")


# --------------------------------------------------------------------------------------------
# result
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TransferResult:
    """What one :func:`transfer` call did."""

    run_id: str
    """Id of the run (``transfer_runs.run_id``)."""
    target: str
    """Target dataset name."""
    drug: str | None
    """Drug name (the response column of a bulk source)."""
    features: str
    """``expr`` or the target's embedding id."""
    adapt: bool
    """False for the same predictor without domain adaptation."""
    proba: np.ndarray = field(repr=False)
    """Probability that each target cell is sensitive, shape (n_target,), dataset row order."""
    label: np.ndarray = field(repr=False)
    """Predicted label (1 sensitive) of each target cell."""
    metrics: dict[str, float | None] | None
    """Metrics on the target cells that have a label (None when the target is unlabelled)."""
    metric_flags: tuple[str, ...]
    """Why some metrics are None."""
    selection: str
    """What chose the kept epoch (``source_val``, ``target_val`` or ``last``)."""
    selected_epoch: int
    """Joint-stage epoch kept."""
    val_score: float
    """Validation cross-entropy of the kept epoch."""
    alpha: float
    """MMD weight used (the chosen one when a grid was given)."""
    beta: float
    """Cluster-regulariser weight used."""
    cluster_method: str
    """How the target clusters were made (``leiden``, ``louvain``, ``kmeans``)."""
    n_clusters: int
    """Target clusters."""
    waterfall: WaterfallCut | None
    """Cutoff of the bulk response (None for binary labels and store sources)."""
    n_source: int
    """Labelled source samples/cells (training + validation)."""
    n_features: int
    """Input features (genes or embedding dims)."""
    feature_names: tuple[str, ...] = field(repr=False)
    """The input features in column order."""
    history: pd.DataFrame = field(repr=False)
    """Mean losses per stage and epoch."""
    artifacts: Path = field(repr=False)
    """Folder with the weights, scalers and latent space of the run."""
    seconds: float = 0.0
    """Wall time."""


# --------------------------------------------------------------------------------------------
# domains
# --------------------------------------------------------------------------------------------
@dataclass
class _Domains:
    """Features of both domains, unscaled, plus what the run records about them."""

    Xs: np.ndarray
    ys: np.ndarray
    Xt: np.ndarray
    features: list[str]
    source_kind: str
    source_desc: dict[str, Any]
    cut: WaterfallCut | None = None
    source_features: list[str] | None = None
    Xv: np.ndarray | None = None
    yv: np.ndarray | None = None


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def _resolve_source(st: Store, source: Any) -> tuple[str, Any]:
    """("bulk", source) or ("store", [dataset names])."""
    import anndata as ad

    if isinstance(source, ad.AnnData):
        return "bulk", source
    if isinstance(source, (tuple, list)) and len(source) == 2 and all(str(s).lower().endswith(".csv") for s in source):
        return "bulk", tuple(source)
    if isinstance(source, (str, os.PathLike)):
        text = str(source)
        if text.lower().endswith((".h5ad", ".h5")) or (Path(text).suffix and Path(text).exists()):
            return "bulk", text
        return "store", [st.dataset(text).name]
    if isinstance(source, (tuple, list)) and source and all(isinstance(s, str) for s in source):
        return "store", [st.dataset(s).name for s in source]
    msg = (f"source={source!r} is not understood: pass a bulk AnnData or .h5ad path, a pair "
           "(expression.csv, response.csv), or the name(s) of labelled datasets in the store.")
    raise InputDataError(msg)


def _labelled_rows(st: Store, name: str) -> tuple[np.ndarray, np.ndarray]:
    cells = st.cells(name)
    keep = cells["response"].notna().to_numpy()
    if not keep.any():
        msg = f"Source dataset {name!r} has no labelled cell; ingest it with label_key=<obs column>."
        raise InputDataError(msg)
    return cells["row"].to_numpy(np.int64)[keep], cells["response"].to_numpy(np.float64)[keep].astype(np.int8)


def _expr_domains(st: Store, kind: str, source: Any, target: str, *, drug: str | None, response: ResponseKind,
                  linear_r: float, source_transform: str, n_hvg: int | None, validation: str | None) -> _Domains:
    """Log-normalised expression of source, target (and target-validation) on shared HVGs."""
    target_symbols = store_symbols(st, target)
    if kind == "bulk":
        bulk = read_bulk(source, drug=drug, response=response, linear_r=linear_r)
        lists = [symbols_of(bulk.genes)]
    else:
        lists = [store_symbols(st, name) for name in source]
    if validation is not None:
        lists.append(store_symbols(st, validation))
    genes = shared_genes([*lists, target_symbols])
    target_all = read_store_expression(st, target, genes)
    features = select_hvg(target_all, genes, n_hvg)
    Xt = dense(target_all[:, column_index(np.asarray(genes, dtype=object), features)])
    del target_all
    if kind == "bulk":
        how = bulk_kind(bulk.X, source_transform)
        Xs = dense(log_normalize(bulk.X, how, columns=column_index(lists[0], features)))
        desc = {**bulk.description, "transform": how}
        dom = _Domains(Xs, bulk.y, Xt, features, desc["kind"], desc, cut=bulk.cut)
    else:
        blocks, labels = [], []
        for name in source:
            rows, y = _labelled_rows(st, name)
            blocks.append(dense(read_store_expression(st, name, features)[rows]))
            labels.append(y)
        desc = {"kind": "store", "datasets": [st.dataset(n).dataset_id for n in source], "names": list(source)}
        dom = _Domains(np.vstack(blocks), np.concatenate(labels), Xt, features, "store", desc)
    if validation is not None:
        rows, dom.yv = _labelled_rows(st, validation)
        dom.Xv = dense(read_store_expression(st, validation, features)[rows])
    logger.info("transfer features: %d genes shared, %d kept (target HVGs)", len(genes), len(features))
    return dom


def _embedding_domains(st: Store, kind: str, source: Any, target: str, features: str,
                       source_features: Sequence[str] | None, validation: str | None) -> _Domains:
    """Cached embeddings of the target and of the source (and validation) datasets."""
    if kind == "bulk":
        msg = (f"features={features!r} is an embedding, but the source is bulk expression, which has no embedding in "
               "the store. Use features='expr', or a labelled single-cell source from the store.")
        raise InputDataError(msg)
    table = st.embeddings()
    target_id = st.dataset(target).dataset_id
    row = table[table["embedding_id"] == features]
    if row.empty:
        msg = f"No embedding {features!r} in the store; pass features='expr' or an embedding id of {target!r} (scdm ls)."
        raise EmbeddingNotFoundError(msg)
    if row["dataset_id"].iloc[0] != target_id:
        msg = f"Embedding {features} belongs to dataset {row['dataset_name'].iloc[0]!r}, not to the target {target!r}."
        raise InputDataError(msg)
    space = row["space_id"].iloc[0]
    names = list(source) + ([validation] if validation is not None else [])
    ids = _source_embedding_ids(st, table, names, space, source_features, len(source))
    Xt = st.read_embedding(features)
    blocks, labels = [], []
    for name, emb_id in zip(source, ids):
        rows, y = _labelled_rows(st, name)
        blocks.append(st.read_embedding(emb_id, rows))
        labels.append(y)
    dims = {b.shape[1] for b in blocks}
    if len(dims) != 1:
        msg = f"The source embeddings have different dims {sorted(dims)}; pick embeddings of one space (source_features)."
        raise InputDataError(msg)
    desc = {"kind": "store", "datasets": [st.dataset(n).dataset_id for n in source], "names": list(source)}
    dom = _Domains(np.vstack(blocks).astype(np.float32), np.concatenate(labels), Xt.astype(np.float32),
                   [f"dim_{i}" for i in range(Xt.shape[1])], "store", desc, source_features=ids[:len(source)])
    if validation is not None:
        rows, dom.yv = _labelled_rows(st, validation)
        dom.Xv = st.read_embedding(ids[-1], rows).astype(np.float32)
    return dom


def _source_embedding_ids(st: Store, table: pd.DataFrame, names: list[str], space: str,
                          given: Sequence[str] | None, n_source: int) -> list[str]:
    if given is not None:
        given = list(given)
        if len(given) != n_source:
            msg = f"source_features lists {len(given)} embeddings for {n_source} source datasets; pass one per dataset."
            raise InputDataError(msg)
    ids = []
    for i, name in enumerate(names):
        ds_id = st.dataset(name).dataset_id
        if given is not None and i < n_source:
            match = table[(table["embedding_id"] == given[i]) & (table["dataset_id"] == ds_id)]
        else:
            match = table[(table["dataset_id"] == ds_id) & (table["space_id"] == space)]
        match = match[match["status"] == "complete"]
        if match.empty:
            msg = (f"Dataset {name!r} has no complete embedding in the target embedding's space {space}; embed it "
                   "with the same model and parameters, or name its embedding with source_features=[...].")
            raise EmbeddingIncompleteError(msg)
        ids.append(str(match.sort_values("created_at")["embedding_id"].iloc[-1]))
    return ids


# --------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------
def _as_list(value: float | Sequence[float], name: str) -> list[float]:
    values = [value] if isinstance(value, (int, float)) else list(value)
    if not values or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0 for v in values):
        msg = f"{name}={value!r}: pass a number >= 0 (or a list of them with a target-validation set)."
        raise InputDataError(msg)
    return [float(v) for v in values]


def _check_params(epochs: int, pretrain_epochs: int, lr: float, batch_size: int, validation_fraction: float,
                  threshold: float, hidden: Sequence[int] = (1,), latent_dim: int = 1,
                  predictor_hidden: Sequence[int] = (1,)) -> None:
    problems = []
    for name, sizes in (("hidden", hidden), ("predictor_hidden", predictor_hidden), ("latent_dim", [latent_dim])):
        if any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1 for v in sizes):
            problems.append(f"{name}={sizes!r} (layer sizes >= 1)")
    for name, value in (("epochs", epochs), ("pretrain_epochs", pretrain_epochs), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "pretrain_epochs" else 1):
            problems.append(f"{name}={value!r} (an integer >= {0 if name == 'pretrain_epochs' else 1})")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        problems.append(f"lr={lr!r} (a number > 0)")
    if not 0 < validation_fraction < 1:
        problems.append(f"validation_fraction={validation_fraction!r} (in (0, 1))")
    if not 0 < threshold < 1:
        problems.append(f"threshold={threshold!r} (in (0, 1))")
    if problems:
        msg = "Invalid transfer parameters: " + "; ".join(problems) + "."
        raise InputDataError(msg)


def _split_source(X: np.ndarray, y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified train / validation row indices of the source."""
    rng = np.random.default_rng(seed)
    val = []
    for cls in (0, 1):
        members = np.flatnonzero(y == cls)
        take = round(members.size * fraction)
        if members.size >= 2 and take == 0:
            take = 1
        if take >= members.size:
            take = members.size - 1
        if take > 0:
            val.append(rng.choice(members, size=take, replace=False))
    val_idx = np.sort(np.concatenate(val)) if val else np.zeros(0, np.int64)
    return np.setdiff1d(np.arange(y.size), val_idx), val_idx


def transfer(
    store: str | os.PathLike[str] | Store,
    *,
    source: str | Sequence[str] | tuple[str, str] | ad.AnnData,
    target: str,
    drug: str | None = None,
    features: str = "expr",
    source_features: Sequence[str] | None = None,
    response: ResponseKind = "auto",
    linear_r: float = 0.95,
    source_transform: Literal["auto", "counts", "tpm", "log"] = "auto",
    n_hvg: int | None = 2000,
    balance: Literal["none", "upsample", "downsample", "smote"] = "none",
    validation: str | None = None,
    validation_fraction: float = 0.2,
    alpha: float | Sequence[float] = 1.0,
    beta: float | Sequence[float] = 0.1,
    rec_weight: float = 1.0,
    epochs: int = 50,
    pretrain_epochs: int = 20,
    lr: float = 1e-3,
    batch_size: int = 128,
    hidden: Sequence[int] = (256, 128),
    latent_dim: int = 32,
    predictor_hidden: Sequence[int] = (16,),
    dropout: float = 0.1,
    noise_std: float = 0.1,
    shared_encoder: bool = False,
    cluster_method: Literal["auto", "leiden", "louvain", "kmeans"] = "auto",
    resolution: float = 0.3,
    n_clusters: int | None = None,
    adapt: bool = True,
    threshold: float = 0.5,
    seed: int = 0,
) -> TransferResult:
    """Train scDEAL from a labelled source to an unlabelled target dataset and store the predictions.

    Parameters
    ----------
    store : str, path or Store
    source
        Bulk: an AnnData or ``.h5ad`` path (response in ``obs[drug]``) or ``(expression.csv,
        response.csv)``. Single cell: a store dataset name or a list of names (labelled cells).
    target : str
        Store dataset to predict (its labels, if any, are used only for the metrics).
    drug : str, optional
        The response column of a bulk source; recorded with the run.
    features : str, default "expr"
        ``"expr"`` or an embedding id of the target dataset.
    source_features : list of str, optional
        Embedding ids of the source datasets (default: their embeddings in the target's space).
    response : {"auto", "binary", "ic50", "auc", "activity_area"}, default "auto"
        How a bulk response is given; continuous kinds are binarised by the waterfall method.
    linear_r : float, default 0.95
        Waterfall linearity threshold (see :func:`waterfall_cutoff`).
    source_transform : {"auto", "counts", "tpm", "log"}, default "auto"
        How bulk expression is log-normalised (``auto``: integers -> counts, values above 50 ->
        tpm, otherwise already log-scale).
    n_hvg : int or None, default 2000
        Target highly variable genes kept among the shared genes (None: all shared genes).
    balance : {"none", "upsample", "downsample", "smote"}, default "none"
        Class balancing of the source training cells (``smote`` needs imbalanced-learn).
    validation : str, optional
        A labelled store dataset used as target-validation set (chooses the kept epoch and, with
        lists of ``alpha``/``beta``, the hyper-parameters). Must differ from ``target``. Default:
        ``validation_fraction`` of the source, held out.
    validation_fraction : float, default 0.2
    alpha, beta : float or list of float, default 1.0 and 0.1
        Weights of the MMD and cluster terms; lists form a grid (needs ``validation``).
    rec_weight : float, default 1.0
        Weight of the denoising reconstruction terms in the joint stage (0: CE + MMD + cluster only).
    epochs, pretrain_epochs : int, default 50 and 20
    lr : float, default 1e-3
        Adam learning rate of every stage.
    batch_size, hidden, latent_dim, predictor_hidden, dropout, noise_std
        Network and training settings (:class:`scdm_classify._transfer_model.TrainConfig`).
    cluster_method : {"auto", "leiden", "louvain", "kmeans"}, default "auto"
    resolution : float, default 0.3
        Leiden/Louvain resolution.
    n_clusters : int, optional
        KMeans clusters (default: chosen by silhouette).
    adapt : bool, default True
        False trains the same network on the source alone and predicts the target through the
        source encoder (no adaptation), for comparison.
    threshold : float, default 0.5
        Cells with ``proba >= threshold`` are labelled sensitive.
    seed : int, default 0

    Returns
    -------
    TransferResult

    Raises
    ------
    InputDataError, GeneMappingError, DatasetNotFoundError, EmbeddingNotFoundError
    """
    from scdm_classify import _transfer_model as tm
    from store import open_store

    started = time.perf_counter()
    st = open_store(store)
    _check_params(epochs, pretrain_epochs, lr, batch_size, validation_fraction, threshold, tuple(hidden), latent_dim,
                  tuple(predictor_hidden))
    alphas, betas = _as_list(alpha, "alpha"), _as_list(beta, "beta")
    target_info = st.dataset(target)
    kind, src = _resolve_source(st, source)
    if kind == "store" and target_info.name in src:
        msg = f"The target {target_info.name!r} is also a source; transfer would train on the cells it evaluates."
        raise InputDataError(msg)
    if validation is not None:
        validation = st.dataset(validation).name
        if validation == target_info.name:
            msg = ("validation must be a labelled dataset other than the target: choosing epochs or alpha/beta on "
                   "the evaluated target cells is the leak this tool avoids.")
            raise InputDataError(msg)
    grid = list(itertools.product(alphas, betas))
    if len(grid) > 1 and validation is None:
        msg = (f"alpha={alphas} and beta={betas} form a grid of {len(grid)} settings; choosing among them needs a "
               "labelled target-validation dataset (validation=...). Source validation cells cannot measure "
               "adaptation, and the target's own labels must not be used.")
        raise InputDataError(msg)
    if features == "expr":
        dom = _expr_domains(st, kind, src, target_info.name, drug=drug, response=response, linear_r=linear_r,
                            source_transform=source_transform, n_hvg=n_hvg, validation=validation)
    else:
        dom = _embedding_domains(st, kind, src, target_info.name, features, source_features, validation)
    cfg = tm.TrainConfig(alpha=alphas[0], beta=betas[0], rec_weight=float(rec_weight), epochs=epochs,
                         pretrain_epochs=pretrain_epochs, lr=float(lr), batch_size=batch_size, hidden=tuple(hidden),
                         latent_dim=latent_dim, predictor_hidden=tuple(predictor_hidden), dropout=float(dropout),
                         noise_std=float(noise_std), shared_encoder=bool(shared_encoder), seed=seed)
    run_id = uuid.uuid4().hex[:16]
    _insert_run(st, run_id, dom, target_info.dataset_id, features, drug, adapt, cfg, validation)
    try:
        result = _run(st, run_id, dom, target_info, cfg, grid, validation, validation_fraction, balance, adapt,
                      threshold, cluster_method, resolution, n_clusters, features, drug, started)
    except BaseException as err:
        st.execute("UPDATE transfer_runs SET status = 'failed', finished_at = ?, error = ? WHERE run_id = ?",
                   [_now(), f"{type(err).__name__}: {err}"[:2000], run_id])
        raise
    return result


def _insert_run(st: Store, run_id: str, dom: _Domains, target_id: str, features: str, drug: str | None, adapt: bool,
                cfg: Any, validation: str | None) -> None:
    st.insert_df("transfer_runs", pd.DataFrame([{
        "run_id": run_id, "created_at": _now(), "status": "running", "drug": drug, "source_kind": dom.source_kind,
        "source": json.dumps(dom.source_desc, sort_keys=True, default=str), "target_dataset_id": target_id,
        "features": features, "source_features": json.dumps(dom.source_features) if dom.source_features else None,
        "adapt": bool(adapt), "selection": "target_val" if validation else "source_val",
        "config": json.dumps(cfg.to_dict(), sort_keys=True), "scdm_version": _version()}]))


def _run(st: Store, run_id: str, dom: _Domains, target_info: Any, cfg: Any, grid: list[tuple[float, float]],
         validation: str | None, validation_fraction: float, balance: str, adapt: bool, threshold: float,
         cluster_method: str, resolution: float, n_clusters: int | None, features: str, drug: str | None,
         started: float) -> TransferResult:
    from scdm_classify import _transfer_model as tm

    source_scaler, target_scaler = MinMax.fit(dom.Xs), MinMax.fit(dom.Xt)
    Xs, Xt = source_scaler.transform(dom.Xs), target_scaler.transform(dom.Xt)
    if validation is None:
        train_idx, val_idx = _split_source(Xs, dom.ys, validation_fraction, cfg.seed)
        val = tm.Validation(Xs[val_idx], dom.ys[val_idx], "source") if val_idx.size else None
    else:
        assert dom.Xv is not None and dom.yv is not None
        train_idx = np.arange(dom.ys.size)
        val = tm.Validation(MinMax.fit(dom.Xv).transform(dom.Xv), dom.yv, "target")
    X_train, y_train = balance_classes(Xs[train_idx], dom.ys[train_idx], balance, seed=cfg.seed)
    clusters = cluster_cells(Xt, method=cluster_method, resolution=resolution, n_clusters=n_clusters, seed=cfg.seed)  # type: ignore[arg-type]
    logger.info("transfer %s: %d source (%d train), %d target cells, %d features; clusters: %s", run_id, dom.ys.size,
                y_train.size, Xt.shape[0], Xt.shape[1], clusters.note)
    fits = []
    for a, b in grid:
        run_cfg = replace(cfg, alpha=a, beta=b)
        fits.append((tm.fit_transfer(X_train, y_train, Xt, clusters.labels, run_cfg, validation=val, adapt=adapt), run_cfg))
    outcome, cfg = min(fits, key=lambda f: (f[0].best_score if not math.isnan(f[0].best_score) else math.inf))
    proba, latent = tm.predict_target(outcome.net, Xt)
    label = (proba >= threshold).astype(np.int8)
    # Target labels are read only now, after the model is fixed: they feed the metrics alone.
    metrics = _target_metrics(st, target_info.name, proba, threshold)
    art = _save_artifacts(st, run_id, outcome.net, cfg, dom, source_scaler, target_scaler, latent,
                          tm.encode_source(outcome.net, Xs), grid, fits)
    history = _history_frame(run_id, outcome.history)
    _write_outputs(st, run_id, target_info.dataset_id, proba, label, clusters.labels, metrics, history, dom.features)
    seconds = time.perf_counter() - started
    selection = ("target_val" if validation else "source_val") if val is not None else "last"
    st.execute(
        "UPDATE transfer_runs SET status = 'complete', finished_at = ?, selection = ?, selected_epoch = ?, val_score = ?, "
        "cluster_method = ?, n_clusters = ?, waterfall = ?, n_source = ?, n_target = ?, n_features = ?, config = ?, "
        "metric_flags = ?, artifacts_path = ?, seconds = ? WHERE run_id = ?",
        [_now(), selection, outcome.best_epoch, None if math.isnan(outcome.best_score) else float(outcome.best_score),
         clusters.method, clusters.n_clusters, json.dumps(dom.cut.to_dict()) if dom.cut else None, int(dom.ys.size),
         int(Xt.shape[0]), int(Xt.shape[1]), json.dumps(_config_record(cfg, grid, fits, clusters, threshold, balance,
                                                                      validation, validation_fraction), sort_keys=True),
         ",".join(metrics[1]) if metrics else None, str(art.relative_to(st.root)), seconds, run_id])
    logger.info("transfer %s done in %.1f s (epoch %d kept on %s)", run_id, seconds, outcome.best_epoch, selection)
    return TransferResult(
        run_id=run_id, target=target_info.name, drug=drug, features=features, adapt=adapt, proba=proba, label=label,
        metrics=metrics[0] if metrics else None, metric_flags=metrics[1] if metrics else (), selection=selection,
        selected_epoch=int(outcome.best_epoch), val_score=float(outcome.best_score), alpha=cfg.alpha, beta=cfg.beta,
        cluster_method=clusters.method, n_clusters=clusters.n_clusters, waterfall=dom.cut, n_source=int(dom.ys.size),
        n_features=int(Xt.shape[1]), feature_names=tuple(dom.features), history=history, artifacts=art,
        seconds=seconds)


def _config_record(cfg: Any, grid: list[tuple[float, float]], fits: list[Any], clusters: Any, threshold: float,
                   balance: str, validation: str | None, validation_fraction: float) -> dict[str, Any]:
    return {**cfg.to_dict(), "grid": [{"alpha": a, "beta": b, "val_ce": None if math.isnan(f[0].best_score) else f[0].best_score}
                                      for (a, b), f in zip(grid, fits)],
            "cluster_note": clusters.note, "threshold": threshold, "balance": balance, "validation": validation,
            "validation_fraction": None if validation else validation_fraction}


def _target_metrics(st: Store, target: str, proba: np.ndarray, threshold: float) -> tuple[dict[str, float | None], tuple[str, ...], int, int] | None:
    cells = st.cells(target)
    labelled = cells["response"].notna().to_numpy()
    if not labelled.any():
        return None
    rows = cells["row"].to_numpy(np.int64)[labelled]
    y = cells["response"].to_numpy(np.float64)[labelled].astype(np.int8)
    m = compute_metrics(y, proba[rows], threshold=threshold)
    return m.values, m.flags, m.n, m.n_pos


def _history_frame(run_id: str, history: list[dict[str, Any]]) -> pd.DataFrame:
    frame = pd.DataFrame(history)
    for col in _HISTORY_COLUMNS:
        if col not in frame.columns:
            frame[col] = np.nan
    frame.insert(0, "run_id", run_id)
    return frame[["run_id", "stage", "epoch", *_HISTORY_COLUMNS]]


def _write_outputs(st: Store, run_id: str, dataset_id: str, proba: np.ndarray, label: np.ndarray, clusters: np.ndarray,
                   metrics: Any, history: pd.DataFrame, features: list[str]) -> None:
    st.insert_df("transfer_predictions", pd.DataFrame({
        "run_id": run_id, "dataset_id": dataset_id, "row": np.arange(proba.size, dtype=np.int32),
        "proba": proba.astype(np.float32), "label": label.astype(np.int8), "cluster": clusters.astype(np.int32)}))
    if metrics is not None:
        values, _, n, n_pos = metrics
        st.insert_df("transfer_metrics", pd.DataFrame({"run_id": run_id, "metric": list(METRICS),
                                                       "value": [values[m] for m in METRICS], "n": n, "n_pos": n_pos}))
    st.insert_df("transfer_history", history)
    st.insert_df("transfer_features", pd.DataFrame({"run_id": run_id, "idx": np.arange(len(features), dtype=np.int32),
                                                    "feature": features}))


def _artifacts_dir(st: Store, run_id: str) -> Path:
    from store._constants import ARTIFACTS_DIR

    return st.root / ARTIFACTS_DIR / _ARTIFACTS / run_id


def _save_artifacts(st: Store, run_id: str, net: Any, cfg: Any, dom: _Domains, source_scaler: MinMax,
                    target_scaler: MinMax, latent_target: np.ndarray, latent_source: np.ndarray,
                    grid: list[tuple[float, float]], fits: list[Any]) -> Path:
    import torch

    folder = _artifacts_dir(st, run_id)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), folder / "model.pt")
    np.savez(folder / "scalers.npz", source_low=source_scaler.low, source_span=source_scaler.span,
             target_low=target_scaler.low, target_span=target_scaler.span)
    np.savez_compressed(folder / "latent.npz", target=latent_target, source=latent_source,
                        source_y=dom.ys.astype(np.int8))
    meta = {"config": cfg.to_dict(), "n_source_features": int(dom.Xs.shape[1]), "n_target_features": int(dom.Xt.shape[1]),
            "adapted": bool(net.adapted), "features": dom.features}
    (folder / "run.json").write_text(json.dumps(meta, sort_keys=True, indent=1))
    return folder


# --------------------------------------------------------------------------------------------
# reading a run back
# --------------------------------------------------------------------------------------------
def _run_row(st: Store, run_id: str) -> pd.Series:
    frame = st.query("SELECT * FROM transfer_runs WHERE run_id = ?", [run_id])
    if frame.empty:
        known = ", ".join(st.query("SELECT run_id FROM transfer_runs ORDER BY created_at DESC LIMIT 5")["run_id"]) or "(none)"
        msg = f"No transfer run {run_id!r} in the store; recent runs: {known}."
        raise InputDataError(msg)
    row = frame.iloc[0]
    if row["status"] != "complete":
        msg = f"Transfer run {run_id} is {row['status']}; only complete runs can be read back."
        raise InputDataError(msg)
    return row


def transfer_latent(store: str | os.PathLike[str] | Store, run_id: str) -> dict[str, np.ndarray]:
    """The latent space of a run, for a UMAP of source and target together.

    Returns
    -------
    dict
        ``target`` (n_target, latent_dim) in dataset row order, ``source`` (n_source,
        latent_dim) and ``source_y`` (n_source,) labels of the source rows.
    """
    from store import open_store

    st = open_store(store)
    row = _run_row(st, run_id)
    with np.load(st.root / row["artifacts_path"] / "latent.npz") as data:
        return {k: data[k] for k in data.files}


def _load_net(st: Store, row: pd.Series) -> Any:
    import torch

    from scdm_classify import _transfer_model as tm

    folder = st.root / row["artifacts_path"]
    meta = json.loads((folder / "run.json").read_text())
    conf = dict(meta["config"])
    for key in ("hidden", "predictor_hidden"):
        conf[key] = tuple(conf[key])
    cfg = tm.TrainConfig(**conf)
    net = tm.TransferNet(meta["n_source_features"], meta["n_target_features"], cfg)
    net.load_state_dict(torch.load(folder / "model.pt", weights_only=True))
    net.adapted = bool(meta["adapted"])
    net.eval()
    return net, meta


# --------------------------------------------------------------------------------------------
# critical genes
# --------------------------------------------------------------------------------------------
def critical_genes(
    store: str | os.PathLike[str] | Store,
    run_id: str,
    *,
    max_cells: int | None = 5000,
    n_steps: int = 64,
    use_abs: bool = True,
    per_cell: bool = True,
    correction: Literal["bh", "bonferroni"] = "bh",
    fdr: float = 0.05,
    min_log2fc: float = 0.1,
    min_pts: float = 0.2,
    plot: bool = True,
    top: int = 20,
    seed: int = 0,
) -> pd.DataFrame:
    """Genes whose attribution differs between predicted sensitive and resistant target cells.

    Integrated gradients (exact up to a checked quadrature error: completeness holds per cell
    within tolerance) of the probability of sensitivity with respect to the MinMax-scaled input
    genes, from an all-zero baseline (every gene at its minimum), for every target cell (or a
    random ``max_cells`` of them). Each cell's attributions are taken as absolute values
    (``use_abs``) and divided by the cell's total (``per_cell``) -- the paper's analysis runs
    ``normalize_total`` on the absolute attributions -- so that a gene is compared by its share of
    the cell's explanation, not by how steep the model is around the cell (confidently predicted
    cells have small gradients on every gene). Per gene, the attributions of predicted-sensitive
    cells are compared with those of
    predicted-resistant cells by a two-sided Wilcoxon rank-sum (Mann-Whitney U) test, corrected
    for the number of genes (Benjamini-Hochberg or Bonferroni). A gene is *critical* when
    ``pvalue_adj <= fdr``, ``|log2fc| > min_log2fc`` (log2 ratio of mean attributions) and more
    than ``min_pts`` of the cells of its direction's group have a non-zero attribution -- the
    thresholds of the scDEAL case studies (0.05, 0.1, 0.2).

    Parameters
    ----------
    store : str, path or Store
    run_id : str
        A complete run with ``features="expr"``.
    max_cells : int or None, default 5000
        Cells attributed (random, seeded); None = all.
    n_steps : int, default 64
        Initial quadrature nodes of the integrated gradients (doubled where needed).
    use_abs, per_cell, correction, fdr, min_log2fc, min_pts
        See above.
    plot : bool, default True
        Write ``critical_genes.png`` (volcano and top genes) to the run's artifacts folder.
    top : int, default 20
        Genes per direction named in the plot.
    seed : int, default 0

    Returns
    -------
    DataFrame
        One row per gene (the ``critical_genes`` table), best first; ``attrs`` holds
        ``plot`` (path or None), ``max_completeness_gap`` and ``n_cells``.
    """
    from scdm_classify import _transfer_model as tm
    from store import open_store

    st = open_store(store)
    if correction not in ("bh", "bonferroni"):
        msg = f"correction={correction!r}: use 'bh' (Benjamini-Hochberg) or 'bonferroni'."
        raise InputDataError(msg)
    row = _run_row(st, run_id)
    if row["features"] != "expr":
        msg = (f"Run {run_id} used embedding features ({row['features']}); critical genes need expression inputs. "
               "Run transfer with features='expr'.")
        raise InputDataError(msg)
    net, meta = _load_net(st, row)
    genes = list(meta["features"])
    target = st.dataset(str(row["target_dataset_id"])).name
    preds = st.query("SELECT \"row\", label FROM transfer_predictions WHERE run_id = ? ORDER BY \"row\"", [run_id])
    rows = _pick_cells(preds["label"].to_numpy(np.int8), max_cells, seed)
    X = dense(read_store_expression(st, target, genes)[rows])
    with np.load(st.root / row["artifacts_path"] / "scalers.npz") as sc:
        X = MinMax(sc["target_low"], sc["target_span"]).transform(X)
    net64 = net.double()
    attr, delta = tm.integrated_gradients(lambda x: net64.target_proba(x), X, n_steps=n_steps)
    labels = preds["label"].to_numpy(np.int8)[rows]  # the stored predictions define the two groups
    values = np.abs(attr) if use_abs else attr
    if per_cell:
        totals = np.abs(values).sum(axis=1, keepdims=True)
        values = values / np.where(totals > 0, totals, 1.0)
    table = _wilcoxon_table(values, labels, genes, correction=correction)
    table = _flag_critical(table, fdr=fdr, min_log2fc=min_log2fc, min_pts=min_pts)
    params = {"max_cells": max_cells, "n_cells": int(rows.size), "n_steps": n_steps, "use_abs": use_abs, "per_cell": per_cell,
              "correction": correction, "fdr": fdr, "min_log2fc": min_log2fc, "min_pts": min_pts, "seed": seed,
              "baseline": "zeros (each gene at its target minimum)", "output": "probability of sensitive",
              "max_completeness_gap": float(np.abs(delta).max()) if delta.size else 0.0}
    table.insert(0, "run_id", run_id)
    table["params"] = json.dumps(params, sort_keys=True)
    table["created_at"] = _now()
    st.execute("DELETE FROM critical_genes WHERE run_id = ?", [run_id])
    st.insert_df("critical_genes", table)
    path = _plot_genes(table, st.root / row["artifacts_path"] / "critical_genes.png", top=top, fdr=fdr) if plot else None
    table.attrs.update({"plot": path, "max_completeness_gap": params["max_completeness_gap"], "n_cells": int(rows.size)})
    logger.info("critical genes of %s: %d of %d genes pass (max completeness gap %.2e)", run_id,
                int(table["critical"].sum()), len(table), params["max_completeness_gap"])
    return table


def _pick_cells(labels: np.ndarray, max_cells: int | None, seed: int) -> np.ndarray:
    if np.unique(labels).size < 2:
        msg = (f"All {labels.size} target cells are predicted {'sensitive' if labels[0] else 'resistant'}; critical "
               "genes compare predicted sensitive with resistant cells, so there is nothing to compare.")
        raise InputDataError(msg)
    if max_cells is None or max_cells >= labels.size:
        return np.arange(labels.size)
    rng = np.random.default_rng(seed)
    picked = np.sort(rng.choice(labels.size, size=max_cells, replace=False))
    if np.unique(labels[picked]).size < 2:  # keep both groups in a tiny sample
        missing = 1 - labels[picked[0]]
        picked = np.sort(np.append(picked[1:], np.flatnonzero(labels == missing)[0]))
    return picked


def _wilcoxon_table(attr: np.ndarray, labels: np.ndarray, genes: list[str], *, correction: str) -> pd.DataFrame:
    from scipy import stats

    sens, res = attr[labels == 1], attr[labels == 0]
    with np.errstate(all="ignore"):
        test = stats.mannwhitneyu(sens, res, axis=0, alternative="two-sided", method="asymptotic")
    p = np.where(np.isfinite(test.pvalue), test.pvalue, 1.0)
    if correction == "bh":
        p_adj = stats.false_discovery_control(p, method="bh")
    else:
        p_adj = np.minimum(p * p.size, 1.0)
    mean_s, mean_r = sens.mean(axis=0), res.mean(axis=0)
    eps = 1e-12
    log2fc = np.log2((np.abs(mean_s) + eps) / (np.abs(mean_r) + eps))
    return pd.DataFrame({
        "gene": genes, "mean_sensitive": mean_s, "mean_resistant": mean_r, "log2fc": log2fc,
        "pts_sensitive": (sens != 0).mean(axis=0), "pts_resistant": (res != 0).mean(axis=0),
        "statistic": np.asarray(test.statistic, np.float64), "pvalue": p, "pvalue_adj": p_adj,
        "direction": np.where(log2fc > 0, "sensitive", "resistant")})


def _flag_critical(table: pd.DataFrame, *, fdr: float, min_log2fc: float, min_pts: float) -> pd.DataFrame:
    pts = np.where(table["direction"] == "sensitive", table["pts_sensitive"], table["pts_resistant"])
    table["critical"] = (table["pvalue_adj"] <= fdr) & (table["log2fc"].abs() > min_log2fc) & (pts > min_pts)
    order = np.lexsort((-table["log2fc"].abs().to_numpy(), table["pvalue"].to_numpy(), ~table["critical"].to_numpy()))
    table = table.iloc[order].reset_index(drop=True)
    table.insert(1, "rank", np.arange(1, len(table) + 1, dtype=np.int32))
    return table


def _plot_genes(table: pd.DataFrame, path: Path, *, top: int, fdr: float) -> Path:
    """Volcano plot (log2 fold change of attribution vs -log10 adjusted p) and the top genes per direction."""
    from scdm_classify._plots import RESPONSE_COLORS, new_figure, style

    with style():
        fig = new_figure(10, 4.5)
        ax_v, ax_b = fig.subplots(1, 2, width_ratios=[1.2, 1])
        y = -np.log10(np.clip(table["pvalue_adj"].to_numpy(np.float64), 1e-300, 1.0))
        colors = np.where(~table["critical"], "#bdbdbd",
                          np.where(table["direction"] == "sensitive", RESPONSE_COLORS["sensitive"], RESPONSE_COLORS["resistant"]))
        ax_v.scatter(table["log2fc"], y, s=6, c=list(colors), linewidths=0)
        ax_v.axhline(-np.log10(fdr), color="#636363", lw=0.6, ls="--")
        ax_v.set_xlabel("log2 fold change of attribution (sensitive / resistant)")
        ax_v.set_ylabel("-log10 adjusted p (Wilcoxon)")
        ax_v.set_title("Integrated-gradient attributions")
        crit = table[table["critical"]]
        picks = pd.concat([crit[crit["direction"] == d].head(top // 2 or 1) for d in ("sensitive", "resistant")])
        if picks.empty:
            ax_b.text(0.5, 0.5, "no gene passes the thresholds", ha="center", va="center", transform=ax_b.transAxes)
            ax_b.set_axis_off()
        else:
            picks = picks.sort_values("log2fc")
            ax_b.barh(np.arange(len(picks)), picks["log2fc"],
                      color=[RESPONSE_COLORS[d] for d in picks["direction"]])
            ax_b.set_yticks(np.arange(len(picks)), labels=list(picks["gene"]))
            ax_b.set_xlabel("log2 fold change")
            ax_b.set_title("Critical genes")
        fig.savefig(path, format="png", dpi=150)
    return path


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("scdm")
    except PackageNotFoundError:
        return "0+unknown"
