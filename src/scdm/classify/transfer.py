"""scDEAL transfer learning: from labelled bulk (or labelled studies) to unlabelled single cells.

:func:`transfer` trains the scDEAL network (see :mod:`scdm.classify._transfer_model`) from a
labelled *source* to an unlabelled *target* dataset of the store and writes every target cell's
probability of sensitivity to the catalog; :func:`critical_genes` explains a run with integrated
gradients and a Wilcoxon test between predicted sensitive and resistant cells.

Sources
    * bulk cell lines: an AnnData / ``.h5ad`` (``obs[drug]`` = response) or a pair of CSV paths
      ``(expression.csv, response.csv)``; a continuous response (IC50, AUC, activity area) is
      binarised per drug with the waterfall method (:func:`waterfall_cutoff`);
    * labelled single-cell studies of the store: a dataset name or a list of names.

Features
    * ``"expr"``: log-normalised expression (counts: ``normalize_total`` 1e4 + ``log1p``;
      normalised values that are not log-scale, above 50: ``log1p``, with a warning) on the
      genes shared by source and target, restricted to the target's ``n_hvg`` most variable
      ones, MinMax-scaled to [0, 1] per domain as in the paper (the source scaler fitted on all its
      labelled cells, the held-out validation part included, as scDEAL's code does);
    * an embedding id of the target dataset: its cached embedding (any model), with the source
      datasets' embeddings of the same space (or ``source_features``), MinMax-scaled per domain.

No peeking
    The epoch kept is the one with the lowest cross-entropy on held-out *source* cells
    (``validation_fraction``), or on a labelled target-validation dataset passed as
    ``validation`` (neither the target nor a source). A grid of ``alpha``/``beta`` values
    needs such a target-validation set: source cross-entropy cannot measure adaptation. Target
    labels are read only after the predictions are made, to compute metrics.

Labels
    Each store dataset's labels come from one of its label sets (:mod:`scdm.store.labels`): the
    one named (``source_label_set``, ``validation_label_set``, ``target_label_set``), else its
    label set of ``drug``, else its default. All must be of one drug; the run records them. A
    target whose label sets are all of other drugs than ``drug`` is predicted, not scored.

Examples
--------
>>> res = transfer("scdm-store", source=("gdsc_expr.csv", "gdsc_ic50.csv"), target="GSE110894",
...                drug="I-BET-762", response="ic50")           # doctest: +SKIP
>>> res.metrics["auroc"]                                        # doctest: +SKIP
>>> genes = critical_genes("scdm-store", res.run_id)             # doctest: +SKIP
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import math
import os
import time
import uuid
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from scdm.classify._row_keys import row_keys
from scdm.classify._transfer_data import (
    MinMax,
    ResponseKind,
    TransferWarning,
    WaterfallCut,
    balance_classes,
    binarize_response,
    bulk_drug,
    bulk_kind,
    cluster_cells,
    column_index,
    dense,
    gene_keys_of,
    log_normalize,
    read_bulk,
    read_store_expression,
    select_hvg,
    shared_genes,
    spelled_as_target,
    split_source,
    store_gene_keys,
    store_symbols,
    waterfall_cutoff,
)
from scdm.classify.metrics import METRICS, compute_metrics
from scdm.store.adapters import tuned_training_rows
from scdm.store.errors import (
    EmbeddingIncompleteError,
    EmbeddingNotFoundError,
    InputDataError,
    ScdmError,
)
from scdm.store.genes import GENE_MATCH
from scdm.store.labels import LabelSet, label_sets
from scdm.store.matrix import copied_cells
from scdm.store.transfer import (
    CriticalGenes,
    TransferMetrics,
    TransferOutputs,
    TransferRunRecord,
    TransferRunResult,
    TransferRunStart,
    complete_transfer_run,
    fail_transfer_run,
    replace_critical_genes,
    start_transfer_run,
    transfer_artifacts_dir,
    transfer_predictions,
    transfer_run,
)

if TYPE_CHECKING:
    import anndata as ad

    from scdm.store import Store

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
    """Drug name: the one given (the response column of a bulk source), else the drug of the label sets read."""
    source_label_set: str | None
    """Label set(s) of the source datasets trained on (comma-separated, sorted); None for a bulk source."""
    target_label_set: str | None
    """Label set of the target the metrics are computed against; None when the target has no labels."""
    validation_label_set: str | None
    """Label set of the validation dataset; None without one."""
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
@dataclass(frozen=True)
class _Block:
    """Consecutive rows of one domain's matrix that come from one dataset (or from the bulk source)."""

    dataset: str | None
    """Store dataset name; None for the bulk source."""
    ids: np.ndarray
    """Each row's dataset row, or bulk sample id."""
    zeros_are_values: bool = False
    """True where a row of zeros is still a profile (z-scored or log-ratio values)."""


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
    source_blocks: list[_Block] = field(default_factory=list)
    """Where the rows of ``Xs`` come from, in order (to name source samples without expression)."""
    validation_block: _Block | None = None
    copies: dict[str, np.ndarray] = field(default_factory=dict)
    """``target_of_source``, ``target_of_validation``, ``validation_of_source``: rows (of the target, or of the
    validation cells) that are a cell of the other side under another dataset name, found by cell id and expression
    values (:func:`_copies_by_cell`); absent where the rows are compared by their features only."""


def _refuse_repeated_sources(given: Sequence[str], names: list[str]) -> None:
    """A dataset listed twice (by name, id or id prefix) would stack its cells twice: the source
    validation carve-out would then hold copies of training cells (the kept epoch chosen on cells
    trained on) and n_source would count each cell twice."""
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        msg = (f"source={list(given)!r} names the dataset(s) {', '.join(map(repr, repeated))} more than once (by name "
               "or id): their cells would be trained on twice and also held out as validation copies of training "
               "cells. List each source dataset once.")
        raise InputDataError(msg)


def _in_dataset_order(st: Store, names: list[str],
                      source_features: Sequence[str] | None) -> tuple[list[str], Sequence[str] | None]:
    """Store sources (and their ``source_features``, one per source) sorted by dataset id.

    The sources' cells are stacked in this order, and the seeded validation carve-out and batches
    draw row positions: listed as [A, B] or [B, A], one seed held out other cells and gave other
    predictions (probabilities up to 0.30 apart, AUROC 0.639 vs 0.634) for one experiment.
    """
    order = sorted(range(len(names)), key=lambda i: st.dataset(names[i]).dataset_id)
    if source_features is not None and len(list(source_features)) == len(names):  # else refused later, as given
        source_features = [list(source_features)[i] for i in order]
    return [names[i] for i in order], source_features


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
        names = [st.dataset(s).name for s in source]
        _refuse_repeated_sources(source, names)
        return "store", names
    msg = (f"source={source!r} is not understood: pass a bulk AnnData or .h5ad path, a pair "
           "(expression.csv, response.csv), or the name(s) of labelled datasets in the store.")
    raise InputDataError(msg)


# --------------------------------------------------------------------------------------------
# label sets
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _LabelChoice:
    """The label set a run reads from one store dataset, and why it was that one."""

    role: str
    """``source``, ``target`` or ``validation``."""
    dataset: str
    label_set: LabelSet
    chosen_by: str
    """``given`` (named by the caller), ``drug`` (the dataset's label set of ``drug``) or ``default``."""

    def describe(self) -> str:
        drug = f", drug {self.label_set.drug}" if self.label_set.drug else ""
        return f"{self.role} {self.dataset!r}: label set {self.label_set.name!r}{drug}"

    def record(self) -> dict[str, Any]:
        ls = self.label_set
        return {"dataset": self.dataset, "label_set": ls.name, "label_set_id": ls.label_set_id, "drug": ls.drug,
                "labels_hash": ls.labels_hash, "chosen_by": self.chosen_by}


@dataclass(frozen=True)
class _RunLabels:
    """The label sets one run reads: of each store source, of the validation dataset and of the target."""

    sources: tuple[_LabelChoice, ...] = ()
    target: _LabelChoice | None = None
    validation: _LabelChoice | None = None

    def source(self, dataset: str) -> str:
        return next(c.label_set.name for c in self.sources if c.dataset == dataset)

    def names(self, role: str) -> str | None:
        """Label set names of a role, comma-separated and sorted (None: none read)."""
        chosen = {"source": self.sources, "target": (self.target,), "validation": (self.validation,)}[role]
        names = sorted({c.label_set.name for c in chosen if c is not None})
        return ",".join(names) or None

    def all(self) -> list[_LabelChoice]:
        return [c for c in (*self.sources, self.validation, self.target) if c is not None]

    def drugs(self) -> set[str]:
        return {c.label_set.drug for c in self.all() if c.label_set.drug}

    def source_drug(self) -> str | None:
        """The drug of the source label sets (the run's drug when none is given), if they record one."""
        return next((c.label_set.drug for c in self.sources if c.label_set.drug), None)

    def record(self) -> dict[str, Any]:
        return {"source": [c.record() for c in self.sources], "target": self.target.record() if self.target else None,
                "validation": self.validation.record() if self.validation else None}


def _same_drug(a: str | None, b: str | None) -> bool:
    return a is not None and b is not None and a.casefold() == b.casefold()


def _is_for(ls: LabelSet, drug: str) -> bool:
    """True when ``ls`` holds responses to ``drug`` (its recorded drug; without one, its name)."""
    return _same_drug(ls.drug, drug) or (ls.drug is None and _same_drug(ls.name, drug))


def _listing(have: Sequence[LabelSet]) -> str:
    return ", ".join(f"{ls.name!r}" + (f" (drug {ls.drug})" if ls.drug else "") for ls in have)


def _pick_label_set(have: list[LabelSet], dataset: str, given: str | None, drug: str | None,
                    option: str) -> tuple[LabelSet, str]:
    """The label set named ``given``; else the dataset's label set of ``drug``; else its default."""
    if given is not None:
        match = [ls for ls in have if ls.name == given]
        if not match:
            msg = (f"Dataset {dataset!r} has no label set {given!r}; its label sets: {_listing(have)}. "
                   f"Choose one with {option} (`scdm ls --what labels` lists them all).")
            raise InputDataError(msg)
        return match[0], "given"
    if drug is not None:
        match = [ls for ls in have if _is_for(ls, drug)]
        if len(match) > 1 and not any(ls.is_default for ls in match):
            msg = (f"Dataset {dataset!r} has {len(match)} label sets of drug {drug!r}: {_listing(match)}. "
                   f"Name the one to use with {option}.")
            raise InputDataError(msg)
        if match:
            return next((ls for ls in match if ls.is_default), match[0]), "drug"
    return next((ls for ls in have if ls.is_default), have[0]), "default"


def _choose_labels(st: Store, dataset: str, role: str, given: str | None, drug: str | None) -> _LabelChoice | None:
    """The label set ``role`` reads from ``dataset`` (None: an unlabelled target)."""
    have = label_sets(st, dataset)
    option = f"{role}_label_set=... (--{role}-label-set)"
    if not have:
        if role == "target" and given is None:
            return None
        what = "a source" if role == "source" else f"the {role} dataset"
        msg = (f"Dataset {dataset!r} ({what}) has no response labels. Add them with "
               f"`scdm ingest FILE.h5ad --label-key COLUMN --drug DRUG`.")
        raise InputDataError(msg)
    ls, how = _pick_label_set(have, dataset, given, drug, option)
    if role == "target" and how == "default" and drug is not None and ls.drug and not _same_drug(ls.drug, drug):
        # responses to other drugs cannot score this one: the target is unlabelled for this run, and is predicted
        warnings.warn(f"The target {dataset!r} has no label set of drug {drug!r} (its label sets: {_listing(have)}): "
                      "its cells are predicted but not scored. If one of its label sets holds responses to this drug, "
                      "name it with target_label_set=... (--target-label-set).", TransferWarning, stacklevel=4)
        return None
    return _LabelChoice(role, dataset, ls, how)


def _run_labels(st: Store, kind: str, sources: Any, target: str, validation: str | None, drug: str | None,
                given: Mapping[str, str | None]) -> _RunLabels:
    """The label sets of a run (``given``: role -> label set name or None), checked to be of one drug."""
    if kind == "bulk" and given.get("source") is not None:
        msg = (f"source_label_set={given['source']!r}: a bulk source has no label sets; its responses are the "
               "drug column (drug=..., --drug). Name label sets of store datasets only.")
        raise InputDataError(msg)
    labels = _RunLabels(
        sources=tuple(_require(_choose_labels(st, n, "source", given.get("source"), drug)) for n in sources)
        if kind == "store" else (),
        target=_choose_labels(st, target, "target", given.get("target"), drug),
        validation=(_choose_labels(st, validation, "validation", given.get("validation"), drug)
                    if validation is not None else None))
    _check_one_drug(labels, drug)
    return labels


def _warn_of_scoring_another_drug(target: _LabelChoice | None) -> None:
    """Warn when a bulk source of no named drug (its ``obs["response"]``) is scored against a label set of a drug.

    The target's default label set was read whatever its drug: a target with label sets of two drugs was scored
    against the first one's responses, silently, whichever drug the bulk responses were to.
    """
    if target is None or target.chosen_by == "given" or not target.label_set.drug:
        return
    warnings.warn(f"The bulk source names no drug (its responses are obs['response']), so its predictions are scored "
                  f"against the {target.describe()} (its default label set), as if the bulk responses were to "
                  f"{target.label_set.drug}. Put the responses in obs['<drug>'] and pass drug='<drug>' (--drug), or name "
                  "the target's label set (target_label_set=..., --target-label-set).", TransferWarning, stacklevel=3)


def _require(choice: _LabelChoice | None) -> _LabelChoice:
    assert choice is not None  # only an unlabelled target has no label set
    return choice


def _check_one_drug(labels: _RunLabels, drug: str | None) -> None:
    """Refuse label sets that are responses to another drug than ``drug``, or to different drugs."""
    if drug is not None:
        wrong = [c for c in labels.all() if c.label_set.drug and not _same_drug(c.label_set.drug, drug)]
        if wrong:
            msg = (f"drug={drug!r} contradicts the labels this run would read: "
                   + "; ".join(_contradiction(c, drug) for c in wrong)
                   + ". Pass the label sets of one drug (source_label_set=/target_label_set=/validation_label_set=, "
                   "--source-label-set/--target-label-set/--validation-label-set; `scdm ls --what labels` lists them), "
                   "or ingest the responses to this drug as a label set (`scdm ingest FILE --label-key COLUMN "
                   "--drug DRUG`).")
            raise InputDataError(msg)
        return
    if len(labels.drugs()) > 1:
        msg = ("The label sets this run would read are responses to different drugs: "
               + "; ".join(c.describe() for c in labels.all())
               + ". Training on one drug's responses and scoring against another's measures nothing. Pass drug=... "
               "(--drug) to read each dataset's label set of that drug, or name label sets of one drug "
               "(--source-label-set/--target-label-set/--validation-label-set).")
        raise InputDataError(msg)


def _contradiction(choice: _LabelChoice, drug: str) -> str:
    if choice.chosen_by == "given":
        return f"{choice.describe()} (named)"
    return f"{choice.describe()} (its default; it has no label set of {drug})"


def _store_source_desc(st: Store, source: Sequence[str], labels: Sequence[np.ndarray]) -> dict[str, Any]:
    """The ``source`` record of store datasets: which, and how many of their cells had no label (left out).

    ``n_missing_response`` as a bulk source records its samples without a response: without it the
    run did not say how many source cells it did not train on.
    """
    infos = [st.dataset(n) for n in source]
    missing = [info.n_cells - y.size for info, y in zip(infos, labels)]
    if sum(missing):
        logger.info("transfer source: %d of the %d cells have no label in their label set and are left out (%s)",
                    sum(missing), sum(info.n_cells for info in infos),
                    ", ".join(f"{info.name} {m}" for info, m in zip(infos, missing)))
    return {"kind": "store", "datasets": [info.dataset_id for info in infos], "names": list(source),
            "n_cells": int(sum(y.size for y in labels)), "n_missing_response": int(sum(missing)),
            "n_missing_response_per_dataset": [int(m) for m in missing]}


def _labelled_rows(st: Store, name: str, label_set: str) -> tuple[np.ndarray, np.ndarray]:
    """Rows and labels (int8) of the cells of ``name`` labelled in its label set ``label_set``."""
    cells = st.cells(name, label_set=label_set)
    keep = cells["response"].notna().to_numpy()
    if not keep.any():
        msg = f"Dataset {name!r} has no labelled cell in label set {label_set!r}; ingest it with label_key=<obs column>."
        raise InputDataError(msg)
    return cells["row"].to_numpy(np.int64)[keep], cells["response"].to_numpy(np.float64)[keep].astype(np.int8)


def _expr_domains(st: Store, kind: str, source: Any, target: str, *, drug: str | None, response: ResponseKind,
                  linear_r: float, source_transform: str, n_hvg: int | None, validation: str | None,
                  chosen: _RunLabels) -> _Domains:
    """Log-normalised expression of source, target (and target-validation) on shared HVGs."""
    # every domain's genes are named as the target names the gene they resolve to: matched by gene, not by
    # spelling (an outdated symbol in one domain and the Ensembl id of its gene in another are one gene)
    target_keys = store_gene_keys(st, target)
    spelled = functools.partial(spelled_as_target, target_names=store_symbols(st, target), target_keys=target_keys)
    target_symbols = spelled(target_keys)
    if kind == "bulk":
        bulk = read_bulk(source, drug=drug, response=response, linear_r=linear_r)
        lists = [spelled(gene_keys_of(bulk.genes))]
    else:
        lists = [spelled(store_gene_keys(st, name)) for name in source]
    if validation is not None:
        lists.append(spelled(store_gene_keys(st, validation)))
    names = ["bulk source" if kind == "bulk" else f"source {n!r}" for n in ([None] if kind == "bulk" else source)]
    names += [f"validation {validation!r}"] * (validation is not None) + [f"target {target!r}"]
    genes = shared_genes([*lists, target_symbols], names)
    target_all = read_store_expression(st, target, genes, names=target_symbols)
    features = select_hvg(target_all, genes, n_hvg, scaled=st.dataset(target).x_kind == "scaled")
    Xt = dense(target_all[:, column_index(np.asarray(genes, dtype=object), features)])
    del target_all
    if kind == "bulk":
        how = bulk_kind(bulk.X, source_transform)
        Xs = dense(log_normalize(bulk.X, how, columns=column_index(lists[0], features, name="bulk source")))
        desc = {**bulk.description, "transform": how}
        dom = _Domains(Xs, bulk.y, Xt, features, desc["kind"], desc, cut=bulk.cut,
                       source_blocks=[_Block(None, bulk.sample_ids, how == "log" and bool((bulk.X < 0).any()))])
    else:
        blocks, labels, parts = [], [], []
        for name, spelling in zip(source, lists):
            rows, y = _labelled_rows(st, name, chosen.source(name))
            blocks.append(dense(read_store_expression(st, name, features, names=spelling)[rows]))
            labels.append(y)
            parts.append(_Block(name, rows, st.dataset(name).x_kind == "scaled"))
        desc = _store_source_desc(st, source, labels)
        dom = _Domains(np.vstack(blocks), np.concatenate(labels), Xt, features, "store", desc, source_blocks=parts)
    dom.source_desc["n_shared_genes"] = len(genes)
    dom.source_desc["gene_match"] = GENE_MATCH  # runs before it matched symbols as spelled, losing renamed genes
    if validation is not None and chosen.validation is not None:
        rows, dom.yv = _labelled_rows(st, validation, chosen.validation.label_set.name)
        dom.Xv = dense(read_store_expression(st, validation, features, names=lists[-1])[rows])
        dom.validation_block = _Block(validation, rows, st.dataset(validation).x_kind == "scaled")
    logger.info("transfer features: %d genes shared, %d kept (target HVGs)", len(genes), len(features))
    return dom


def _embedding_domains(st: Store, kind: str, source: Any, target: str, features: str,
                       source_features: Sequence[str] | None, validation: str | None, chosen: _RunLabels) -> _Domains:
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
    _refuse_tuned_on_target(st, features, target)
    space = row["space_id"].iloc[0]
    names = list(source) + ([validation] if validation is not None else [])
    ids = _source_embedding_ids(st, table, names, space, source_features, len(source))
    Xt = st.read_embedding(features)
    blocks, labels, sources = [], [], []
    for name, emb_id in zip(source, ids):
        rows, y = _labelled_rows(st, name, chosen.source(name))
        blocks.append(st.read_embedding(emb_id, rows))
        labels.append(y)
        sources.append(_cells_at(st, name, rows))
    dims = {b.shape[1] for b in blocks}
    if len(dims) != 1:
        msg = f"The source embeddings have different dims {sorted(dims)}; pick embeddings of one space (source_features)."
        raise InputDataError(msg)
    desc = _store_source_desc(st, source, labels)
    dom = _Domains(np.vstack(blocks).astype(np.float32), np.concatenate(labels), Xt.astype(np.float32),
                   [f"dim_{i}" for i in range(Xt.shape[1])], "store", desc, source_features=ids[:len(source)])
    targets = _cells_at(st, target, np.arange(Xt.shape[0]))
    dom.copies["target_of_source"] = _copies_by_cell(st, pd.concat(sources), targets)
    if validation is not None and chosen.validation is not None:
        # the validation labels select the model: cells that tuned the embedding would flatter it
        _refuse_tuned_on_target(st, ids[-1], validation, role="validation")
        rows, dom.yv = _labelled_rows(st, validation, chosen.validation.label_set.name)
        dom.Xv = st.read_embedding(ids[-1], rows).astype(np.float32)
        validating = _cells_at(st, validation, rows)
        dom.copies["target_of_validation"] = _copies_by_cell(st, validating, targets)
        dom.copies["validation_of_source"] = _copies_by_cell(st, pd.concat(sources), validating)
    return dom


def _cells_at(st: Store, name: str, rows: np.ndarray) -> pd.DataFrame:
    """``dataset_id``, ``row``, ``cell_id`` of rows ``rows`` of a store dataset."""
    cells = st.cells(name).set_index("row", drop=False)
    return cells.loc[rows, ["dataset_id", "row", "cell_id"]].reset_index(drop=True)


def _copies_by_cell(st: Store, of: pd.DataFrame, cells: pd.DataFrame) -> np.ndarray:
    """Which of ``cells`` are a cell of ``of`` under another dataset name (cell id and expression values).

    An embedding misses the copies a model embeds apart: UCE and scGPT draw a cell's genes with a seed of
    its row, so a copy at another row gets another vector.
    """
    try:
        return copied_cells(st, pd.concat([of, cells], ignore_index=True))[len(of):]
    except ScdmError as err:  # a dataset's file is gone: the features are still compared
        logger.info("copies of cells looked for by their features only (%s)", err)
        return np.zeros(len(cells), bool)


def _refuse_tuned_on_target(st: Store, embedding_id: str, target: str, *, role: str = "target") -> None:
    """A LoRA-tuned target (or validation) embedding whose adapter trained on that dataset's cells would score
    (or select the model on) them as held-out."""
    seen = tuned_training_rows(st, embedding_id)
    if seen is None or seen.size == 0:
        return
    variant = st.query("SELECT variant FROM embeddings WHERE embedding_id = ?", [embedding_id])["variant"].iloc[0]
    use = ("the transfer's target metrics would score cells the embedding was tuned on" if role == "target" else
           "the transfer would select its model on cells the embedding was tuned on")
    msg = (f"Embedding {embedding_id} of the {role} {target!r} is {variant}, a LoRA adapter tuned with the labels of "
           f"{seen.size} of its cells: {use}. Use the {role}'s frozen embedding, or a tuned variant whose test fold "
           f"holds out all of the {role}'s cells (e.g. a cross split that holds out its study).")
    raise InputDataError(msg)


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


def _whole(value: Any) -> bool:
    """An integer (numpy's included), not a bool."""
    return not isinstance(value, bool) and isinstance(value, (int, np.integer))


def _number(value: Any) -> bool:
    """A real number (numpy's included), not a bool."""
    return not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating))


def _check_params(epochs: int, pretrain_epochs: int, lr: float, batch_size: int, validation_fraction: float,
                  threshold: float, hidden: Sequence[int] = (1,), latent_dim: int = 1,
                  predictor_hidden: Sequence[int] = (1,), *, n_hvg: Any = None, dropout: Any = 0.0,
                  rec_weight: Any = 1.0, n_clusters: Any = None, resolution: Any = 1.0, linear_r: Any = 0.5,
                  seed: Any = 0) -> None:
    """Refuse every setting out of range before a run starts, in one message.

    n_hvg=0 kept 108 of 120 genes and rec_weight=-1 rewarded bad reconstructions, silently;
    dropout=1.5 and n_clusters=0 failed deep in torch/sklearn after the run had started.
    """
    problems = []
    for name, sizes in (("hidden", hidden), ("predictor_hidden", predictor_hidden), ("latent_dim", [latent_dim])):
        if not all(_whole(v) and v >= 1 for v in sizes):
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
    if n_hvg is not None and not (_whole(n_hvg) and n_hvg >= 1):
        problems.append(f"n_hvg={n_hvg!r} (a number of genes >= 1, or None for every shared gene)")
    if not (_number(dropout) and 0 <= dropout < 1):
        problems.append(f"dropout={dropout!r} (a probability in [0, 1))")
    if not (_number(rec_weight) and rec_weight >= 0):
        problems.append(f"rec_weight={rec_weight!r} (a number >= 0)")
    if n_clusters is not None and not (_whole(n_clusters) and n_clusters >= 1):
        problems.append(f"n_clusters={n_clusters!r} (a number of clusters >= 1, or None to choose it)")
    if not (_number(resolution) and resolution > 0):
        problems.append(f"resolution={resolution!r} (a number > 0)")
    if not (_number(linear_r) and 0 < linear_r <= 1):
        problems.append(f"linear_r={linear_r!r} (a Pearson r in (0, 1])")
    if not (_whole(seed) and seed >= 0):  # numpy's generators refuse a negative seed, after the data is read
        problems.append(f"seed={seed!r} (a whole number >= 0)")
    if problems:
        msg = "Invalid transfer parameters: " + "; ".join(problems) + "."
        raise InputDataError(msg)


def transfer(
    store: str | os.PathLike[str] | Store,
    *,
    source: str | Sequence[str] | tuple[str, str] | ad.AnnData,
    target: str,
    drug: str | None = None,
    source_label_set: str | None = None,
    target_label_set: str | None = None,
    validation_label_set: str | None = None,
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
    corruption: Literal["mask", "gaussian"] = "mask",
    mask_rate: float = 0.2,
    noise_std: float = 0.1,
    shared_encoder: bool = False,
    cluster_method: Literal["auto", "leiden", "louvain", "kmeans"] = "auto",
    resolution: float = 0.3,
    n_clusters: int | None = None,
    adapt: bool = True,
    threshold: float = 0.5,
    seed: int = 0,
    progress: bool = True,
    allow_empty_cells: bool = False,
) -> TransferResult:
    """Train scDEAL from a labelled source to an unlabelled target dataset and store the predictions.

    Parameters
    ----------
    store : str, path or Store
    source
        Bulk: an AnnData or ``.h5ad`` path (response in ``obs[drug]``) or ``(expression.csv,
        response.csv)``. Single cell: a store dataset name or a list of names (labelled cells),
        each listed once; they are taken in dataset-id order, so the order they are listed in
        does not change the run.
    target : str
        Store dataset to predict (its labels, if any, are used only for the metrics).
    drug : str, optional
        The response column of a bulk source (default: the only column of a response CSV, else
        ``obs["response"]``); recorded with the run. With store datasets it picks
        each one's label set of this drug (by default), and label sets of another drug are refused.
    source_label_set, target_label_set, validation_label_set : str, optional
        The label set (``scdm ls --what labels``) read from every store source dataset (training
        labels), from the target (metrics only) and from the validation dataset. Default: the
        dataset's label set of ``drug`` when it has one, else its default label set. Every label
        set read must be of one drug (``drug`` when given); the run records which were read. A
        target with label sets of other drugs only is unlabelled for ``drug``: predicted, not scored.
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
        lists of ``alpha``/``beta``, the hyper-parameters). Must be neither ``target`` nor a source
        dataset. Default: ``validation_fraction`` of the source, held out.
    validation_fraction : float, default 0.2
    alpha, beta : float or list of float, default 1.0 and 0.1
        Weights of the MMD and cluster terms; lists form a grid (needs ``validation``).
    rec_weight : float, default 1.0
        Weight of the denoising reconstruction terms in the joint stage (0: CE + MMD + cluster only).
    epochs, pretrain_epochs : int, default 50 and 20
    lr : float, default 1e-3
        Adam learning rate of every stage.
    batch_size, hidden, latent_dim, predictor_hidden, dropout
        Network and training settings (:class:`scdm.classify._transfer_model.TrainConfig`).
    corruption : {"mask", "gaussian"}, default "mask"
        How the denoising autoencoders corrupt their inputs: scDEAL's binomial masking noise (each
        MinMax-scaled value set to 0 with probability ``mask_rate``) or additive Gaussian noise
        with standard deviation ``noise_std``.
    mask_rate, noise_std : float, default 0.2 and 0.1
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
    progress : bool, default True
        A progress bar over the training epochs (stderr; terminal or Jupyter).
    allow_empty_cells : bool, default False
        With expression features, use source samples, validation cells and target cells that express
        none of the run's genes (refused otherwise, naming them, as ``scdm embed`` refuses cells without
        a gene the model knows); a warning names those kept.

    Returns
    -------
    TransferResult

    Raises
    ------
    InputDataError, GeneMappingError, DatasetNotFoundError, EmbeddingNotFoundError
    """
    from scdm.classify._transfer_model import TrainConfig
    from scdm.store import open_store

    started = time.perf_counter()
    st = open_store(store)
    _check_params(epochs, pretrain_epochs, lr, batch_size, validation_fraction, threshold, tuple(hidden), latent_dim,
                  tuple(predictor_hidden), n_hvg=n_hvg, dropout=dropout, rec_weight=rec_weight, n_clusters=n_clusters,
                  resolution=resolution, linear_r=linear_r, seed=seed)
    _check_corruption(corruption, mask_rate, noise_std)
    alphas, betas = _as_list(alpha, "alpha"), _as_list(beta, "beta")
    target_info = st.dataset(target)
    kind, src = _resolve_source(st, source)
    if kind == "store":
        src, source_features = _in_dataset_order(st, src, source_features)
    else:
        drug = bulk_drug(src, drug)
    if kind == "store" and target_info.name in src:
        msg = f"The target {target_info.name!r} is also a source; transfer would train on the cells it evaluates."
        raise InputDataError(msg)
    validation = _resolve_validation(st, validation, target_info.name, src if kind == "store" else [])
    labels = _run_labels(st, kind, src, target_info.name, validation, drug,
                         {"source": source_label_set, "target": target_label_set, "validation": validation_label_set})
    run_drug = drug or labels.source_drug()
    if kind == "bulk" and drug is None:
        _warn_of_scoring_another_drug(labels.target)
    grid = list(itertools.product(alphas, betas))
    if len(grid) > 1 and validation is None:
        msg = (f"alpha={alphas} and beta={betas} form a grid of {len(grid)} settings; choosing among them needs a "
               "labelled target-validation dataset (validation=...). Source validation cells cannot measure "
               "adaptation, and the target's own labels must not be used.")
        raise InputDataError(msg)
    if features == "expr":
        dom = _expr_domains(st, kind, src, target_info.name, drug=drug, response=response, linear_r=linear_r,
                            source_transform=source_transform, n_hvg=n_hvg, validation=validation, chosen=labels)
        _check_empty_cells(dom, _Block(target_info.name, np.arange(dom.Xt.shape[0]), target_info.x_kind == "scaled"),
                           allow_empty_cells)
    else:
        dom = _embedding_domains(st, kind, src, target_info.name, features, source_features, validation, labels)
    if labels.sources:
        dom.source_desc["label_sets"] = [c.record() for c in labels.sources]
        _check_source_classes(dom.ys, labels)
    cfg = TrainConfig(alpha=alphas[0], beta=betas[0], rec_weight=float(rec_weight), epochs=epochs,
                      pretrain_epochs=pretrain_epochs, lr=float(lr), batch_size=batch_size, hidden=tuple(hidden),
                      latent_dim=latent_dim, predictor_hidden=tuple(predictor_hidden), dropout=float(dropout),
                      corruption=corruption, mask_rate=float(mask_rate), noise_std=float(noise_std),
                      shared_encoder=bool(shared_encoder), seed=seed)
    run_id = uuid.uuid4().hex[:16]
    start_transfer_run(st, TransferRunStart(
        run_id=run_id, drug=run_drug, source_kind=dom.source_kind, source=dom.source_desc,
        target_dataset_id=target_info.dataset_id, features=features, source_features=dom.source_features, adapt=adapt,
        selection="target_val" if validation else "source_val", config={**cfg.to_dict(), "label_sets": labels.record()},
        scdm_version=_version(), source_label_set=labels.names("source"), target_label_set=labels.names("target"),
        validation_label_set=labels.names("validation")))
    try:
        result = _run(st, run_id, dom, target_info, cfg, grid, validation, validation_fraction, balance, adapt,
                      threshold, cluster_method, resolution, n_clusters, features, run_drug, started, progress,
                      labels=labels)
    except BaseException as err:
        fail_transfer_run(st, run_id, f"{type(err).__name__}: {err}")
        raise
    return result


_EMPTY_CONSEQUENCE = {
    "source": "the predictor is trained to give their labels to 'no expression'",
    "validation": "they count in the validation loss that chooses the kept epoch (and alpha/beta)",
    "target": "its prediction for them, one and the same for all, is stored and scored like any cell's",
}


@dataclass(frozen=True)
class _EmptyRows:
    """Rows of one block with no value on any of the run's genes."""

    role: str
    block: _Block
    ids: np.ndarray
    n_rows: int

    def describe(self) -> str:
        shown = ", ".join(str(i) for i in self.ids[:10]) + (", ..." if self.ids.size > 10 else "")
        if self.block.dataset is None:
            return f"the bulk source samples {shown} ({self.ids.size} of {self.n_rows})"
        return f"the {self.role} cells at rows {shown} ({self.ids.size} in all) of dataset {self.block.dataset!r}"


def _empty_rows(dom: _Domains, target: _Block) -> list[_EmptyRows]:
    """The source, validation and target rows with no value on any of the run's genes, block by block.

    Blocks whose zeros are values (z-scored or log-ratio expression) have none.
    """
    found = []
    for role, X, blocks in (("source", dom.Xs, dom.source_blocks),
                            ("validation", dom.Xv, [dom.validation_block] if dom.validation_block else []),
                            ("target", dom.Xt, [target])):
        lo = 0
        for block in blocks:
            assert X is not None
            part = X[lo:lo + block.ids.size]
            lo += block.ids.size
            empty = np.flatnonzero(~part.any(axis=1))
            if empty.size and not block.zeros_are_values:
                found.append(_EmptyRows(role, block, block.ids[empty], part.shape[0]))
    return found


def _check_empty_cells(dom: _Domains, target: _Block, allow_empty_cells: bool) -> None:
    """Refuse source, validation and target cells with no value on any of the run's genes unless
    ``allow_empty_cells``, as ``scdm embed`` refuses cells that express no gene the model knows.

    The network sees nothing of such a cell. An all-zero bulk sample trained the predictor with its label and an
    all-zero validation cell counted in the choice of the kept epoch, silently, where the same target cell was refused.
    """
    found = _empty_rows(dom, target)
    if not found:
        return
    n_genes = dom.Xt.shape[1]
    if allow_empty_cells:
        for rows in found:
            logger.warning("transfer: kept %s, which express none of the run's %d genes: %s (allow_empty_cells)",
                           rows.describe(), n_genes, _EMPTY_CONSEQUENCE[rows.role])
        return
    what = [rows.describe() for rows in found]
    listed = what[0] if len(what) == 1 else ", ".join(what[:-1]) + " and " + what[-1]
    roles = list(dict.fromkeys(rows.role for rows in found))
    consequences = "; ".join(f"{role}: {_EMPTY_CONSEQUENCE[role]}" for role in roles)
    msg = (f"{listed[0].upper()}{listed[1:]} express none of the {n_genes} genes the run takes (shared with the source, "
           f"then the target's highly variable ones), so the network sees nothing of them ({consequences}). Filter such "
           "cells out before ingesting (e.g. scanpy.pp.filter_cells(adata, min_genes=200)) and drop such samples from a "
           "bulk source, take more genes (--n-hvg), or pass --allow-empty-cells (allow_empty_cells=True) to use them as "
           "they are.")
    raise InputDataError(msg)


def _check_source_classes(ys: np.ndarray, labels: _RunLabels) -> None:
    """Refuse store sources whose labelled cells hold one class: the predictor could learn nothing.

    (A bulk source is checked by :func:`read_bulk`.) Without this the run trained a one-class
    predictor, wrote its predictions and scored them against the target as if it had learned.
    """
    if np.unique(ys).size >= 2:
        return
    read = "; ".join(c.describe() for c in labels.sources)
    msg = (f"All {ys.size} labelled source cells are {'sensitive' if ys.size and ys[0] == 1 else 'resistant'} "
           f"({read}): a predictor of response needs both classes. Add a source dataset with the other class, or "
           "name a label set that has both (source_label_set=..., --source-label-set; `scdm ls --what labels`).")
    raise InputDataError(msg)


def _resolve_validation(st: Store, validation: str | None, target: str, sources: Sequence[str]) -> str | None:
    """The validation dataset's name, refused when it is the target or one of the source datasets."""
    if validation is None:
        return None
    name = st.dataset(validation).name
    if name == target:
        msg = ("validation must be a labelled dataset other than the target: choosing epochs or alpha/beta on "
               "the evaluated target cells is the leak this tool avoids.")
        raise InputDataError(msg)
    if name in sources:
        msg = (f"validation={name!r} is one of the source datasets: the run trains on all of its labelled cells, so "
               "choosing epochs or alpha/beta on them would score the model on its own training cells. Pass a "
               "labelled dataset that is neither a source nor the target, or leave validation out to hold out "
               "validation_fraction of the source cells.")
        raise InputDataError(msg)
    return name


def _check_corruption(corruption: str, mask_rate: float, noise_std: float) -> None:
    problems = []
    if corruption not in ("mask", "gaussian"):
        problems.append(f"corruption={corruption!r} (mask or gaussian)")
    if isinstance(mask_rate, bool) or not isinstance(mask_rate, (int, float)) or not 0 <= mask_rate < 1:
        problems.append(f"mask_rate={mask_rate!r} (a probability in [0, 1))")
    if isinstance(noise_std, bool) or not isinstance(noise_std, (int, float)) or not noise_std >= 0:
        problems.append(f"noise_std={noise_std!r} (a number >= 0)")
    if problems:
        msg = "Invalid transfer parameters: " + "; ".join(problems) + "."
        raise InputDataError(msg)


def shared_cells(source: np.ndarray, target: np.ndarray) -> int:
    """How many target rows equal a source row exactly (the same cells on both sides of a transfer)."""
    return int(_shared_rows(source, target).sum())


def _shared_rows(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Which target rows equal a source row exactly."""
    shared = np.zeros(target.shape[0], bool)
    if source.shape[0] == 0 or target.shape[0] == 0 or source.shape[1] != target.shape[1]:
        return shared
    (source_keys, _), (target_keys, informative) = row_keys(source), row_keys(target)
    candidates = np.flatnonzero(np.isin(target_keys, source_keys) & informative)  # all-zero rows: no evidence of a copy
    rows_of: dict[float, list[int]] = {}
    for i in np.flatnonzero(np.isin(source_keys, target_keys[candidates])):
        rows_of.setdefault(float(source_keys[i]), []).append(int(i))
    for t in candidates:
        shared[t] = any(np.array_equal(target[t], source[s]) for s in rows_of[float(target_keys[t])])
    return shared


def _n_copies(dom: _Domains, kind: str, of: np.ndarray | None, rows: np.ndarray | None) -> int:
    """Rows of ``rows`` equal to a row of ``of``, or a copy of one of its cells (``dom.copies[kind]``)."""
    if of is None or rows is None:
        return 0
    shared = _shared_rows(of, rows)
    return int((shared | dom.copies[kind]).sum()) if kind in dom.copies else int(shared.sum())


def _run(st: Store, run_id: str, dom: _Domains, target_info: Any, cfg: Any, grid: list[tuple[float, float]],
         validation: str | None, validation_fraction: float, balance: str, adapt: bool, threshold: float,
         cluster_method: str, resolution: float, n_clusters: int | None, features: str, drug: str | None,
         started: float, progress: bool = False, *, labels: _RunLabels) -> TransferResult:
    from scdm.classify._transfer_model import Validation, encode_source, fit_transfer, predict_target

    shared = _n_copies(dom, "target_of_source", dom.Xs, dom.Xt)
    if shared:
        logger.warning("transfer %s: %d of the %d target cells have the features (or the cell id and expression values) of a "
                       "labelled source cell, most "
                       "likely the same cells in a source dataset under another name: the run trains on them with "
                       "their labels, so the target's metrics are inflated. Leave that dataset out of the sources.",
                       run_id, shared, dom.Xt.shape[0])
    shared = _n_copies(dom, "target_of_validation", dom.Xv, dom.Xt)
    if shared:
        logger.warning("transfer %s: %d of the %d target cells have the features (or the cell id and expression values) of a "
                       "cell of the validation "
                       "dataset, most likely the same cells under another name: the kept epoch (and alpha/beta) is "
                       "chosen on the target's own labels. Pass another validation dataset.", run_id, shared,
                       dom.Xt.shape[0])
    shared = _n_copies(dom, "validation_of_source", dom.Xs, dom.Xv)
    if shared and dom.Xv is not None:
        logger.warning("transfer %s: %d of the %d validation cells have the features (or the cell id and expression values) "
                       "of a labelled source "
                       "cell, most likely the same cells under another name: the kept epoch (and alpha/beta) is chosen "
                       "on cells the run trains on. Pass a validation dataset that holds none of the source's cells.",
                       run_id, shared, dom.Xv.shape[0])
    # The source scaler is fitted on every labelled source cell, the held-out validation part included, as
    # scDEAL does (scmodel.py and bulkmodel.py call MinMaxScaler().fit_transform on all labelled bulk samples
    # before train_test_split): it reads features, never labels, and keeps our numbers those of the reference.
    # The per-feature range of the validation cells thus shapes the training inputs (a transductive fit, like
    # the target's).
    source_scaler, target_scaler = MinMax.fit(dom.Xs), MinMax.fit(dom.Xt)
    Xs, Xt = source_scaler.transform(dom.Xs), target_scaler.transform(dom.Xt)
    if validation is None:
        train_idx, val_idx = split_source(dom.ys, validation_fraction, cfg.seed)
        val = Validation(Xs[val_idx], dom.ys[val_idx], "source") if val_idx.size else None
    else:
        assert dom.Xv is not None and dom.yv is not None
        train_idx = np.arange(dom.ys.size)
        val = Validation(MinMax.fit(dom.Xv).transform(dom.Xv), dom.yv, "target")
    X_train, y_train = balance_classes(Xs[train_idx], dom.ys[train_idx], balance, seed=cfg.seed)
    clusters = cluster_cells(Xt, method=cluster_method, resolution=resolution, n_clusters=n_clusters, seed=cfg.seed)  # type: ignore[arg-type]
    logger.info("transfer %s: %d source (%d train), %d target cells, %d features; clusters: %s", run_id, dom.ys.size,
                y_train.size, Xt.shape[0], Xt.shape[1], clusters.note)
    fits = []
    for a, b in grid:
        run_cfg = replace(cfg, alpha=a, beta=b)
        fits.append((fit_transfer(X_train, y_train, Xt, clusters.labels, run_cfg, validation=val, adapt=adapt,
                                  progress=progress), run_cfg))
    outcome, cfg = min(fits, key=lambda f: (f[0].best_score if not math.isnan(f[0].best_score) else math.inf))
    proba, latent = predict_target(outcome.net, Xt)
    # labels and metrics from the probabilities exactly as transfer_predictions stores them (DOUBLE since
    # migration 16), so the stored label, probability and metrics agree; float32 (REAL) tied every cell
    # past a logit gap of ~16.6 at 1.0 and moved the target AUROC/AP
    proba = np.asarray(proba, np.float64)
    label = (proba >= threshold).astype(np.int8)
    # Target labels are read only now, after the model is fixed: they feed the metrics alone.
    metrics, flags = _target_metrics(st, target_info.name, labels.target, proba, threshold)
    art = _save_artifacts(st, run_id, outcome.net, cfg, dom, source_scaler, target_scaler, latent,
                          encode_source(outcome.net, Xs), grid, fits)
    outputs = TransferOutputs(dataset_id=target_info.dataset_id, proba=proba, label=label, cluster=clusters.labels,
                              history=outcome.history, features=dom.features, metrics=metrics)
    seconds = time.perf_counter() - started
    selection = ("target_val" if validation else "source_val") if val is not None else "last"
    complete_transfer_run(st, run_id, TransferRunResult(
        selection=selection, selected_epoch=int(outcome.best_epoch),
        val_score=None if math.isnan(outcome.best_score) else float(outcome.best_score),
        cluster_method=clusters.method, n_clusters=clusters.n_clusters, waterfall=dom.cut.to_dict() if dom.cut else None,
        n_source=int(dom.ys.size), n_target=int(Xt.shape[0]), n_features=int(Xt.shape[1]),
        config={**_config_record(cfg, grid, fits, clusters, threshold, balance, validation, validation_fraction),
                "label_sets": labels.record()},
        metric_flags=flags, artifacts_path=str(art.relative_to(st.root)), seconds=seconds), outputs)
    logger.info("transfer %s done in %.1f s (epoch %d kept on %s)", run_id, seconds, outcome.best_epoch, selection)
    return TransferResult(
        run_id=run_id, target=target_info.name, drug=drug, source_label_set=labels.names("source"),
        target_label_set=labels.names("target"), validation_label_set=labels.names("validation"), features=features,
        adapt=adapt, proba=proba, label=label,
        metrics=dict(metrics.values) if metrics else None, metric_flags=flags or (), selection=selection,
        selected_epoch=int(outcome.best_epoch), val_score=float(outcome.best_score), alpha=cfg.alpha, beta=cfg.beta,
        cluster_method=clusters.method, n_clusters=clusters.n_clusters, waterfall=dom.cut, n_source=int(dom.ys.size),
        n_features=int(Xt.shape[1]), feature_names=tuple(dom.features), history=outputs.history_frame(run_id),
        artifacts=art,
        seconds=seconds)


def _config_record(cfg: Any, grid: list[tuple[float, float]], fits: list[Any], clusters: Any, threshold: float,
                   balance: str, validation: str | None, validation_fraction: float) -> dict[str, Any]:
    return {**cfg.to_dict(), "grid": [{"alpha": a, "beta": b, "val_ce": None if math.isnan(f[0].best_score) else f[0].best_score}
                                      for (a, b), f in zip(grid, fits)],
            "cluster_note": clusters.note, "threshold": threshold, "balance": balance, "validation": validation,
            "validation_fraction": None if validation else validation_fraction}


def _target_metrics(st: Store, target: str, labels: _LabelChoice | None, proba: np.ndarray,
                    threshold: float) -> tuple[TransferMetrics | None, tuple[str, ...] | None]:
    """Metrics on the target cells labelled in the chosen label set, and their flags ((None, None) when none is)."""
    if labels is None:
        return None, None
    cells = st.cells(target, label_set=labels.label_set.name)
    labelled = cells["response"].notna().to_numpy()
    if not labelled.any():
        return None, None
    rows = cells["row"].to_numpy(np.int64)[labelled]
    y = cells["response"].to_numpy(np.float64)[labelled].astype(np.int8)
    m = compute_metrics(y, proba[rows], threshold=threshold)
    return TransferMetrics({k: m.values[k] for k in METRICS}, int(m.n), int(m.n_pos)), tuple(m.flags)


def _save_artifacts(st: Store, run_id: str, net: Any, cfg: Any, dom: _Domains, source_scaler: MinMax,
                    target_scaler: MinMax, latent_target: np.ndarray, latent_source: np.ndarray,
                    grid: list[tuple[float, float]], fits: list[Any]) -> Path:
    from safetensors.torch import save_file

    folder = transfer_artifacts_dir(st, run_id)
    folder.mkdir(parents=True, exist_ok=True)
    # Copies: with a shared encoder two keys hold one tensor, which safetensors stores only once per key.
    save_file({k: v.detach().clone().contiguous() for k, v in net.state_dict().items()}, str(folder / "model.safetensors"))
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
def transfer_latent(store: str | os.PathLike[str] | Store, run_id: str) -> dict[str, np.ndarray]:
    """The latent space of a run, for a UMAP of source and target together.

    Returns
    -------
    dict
        ``target`` (n_target, latent_dim) in dataset row order, ``source`` (n_source,
        latent_dim) and ``source_y`` (n_source,) labels of the source rows.
    """
    from scdm.store import open_store

    st = open_store(store)
    run = transfer_run(st, run_id, complete=True)
    with np.load(st.root / str(run.artifacts_path) / "latent.npz", allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def _load_net(st: Store, run: TransferRunRecord) -> tuple[Any, dict[str, Any]]:
    import torch

    from scdm.classify._transfer_model import TrainConfig, TransferNet

    folder = st.root / str(run.artifacts_path)
    meta = json.loads((folder / "run.json").read_text())
    conf = dict(meta["config"])
    for key in ("hidden", "predictor_hidden"):
        conf[key] = tuple(conf[key])
    cfg = TrainConfig(**conf)
    net = TransferNet(meta["n_source_features"], meta["n_target_features"], cfg)
    if (folder / "model.safetensors").exists():
        from safetensors.torch import load_file

        state = load_file(str(folder / "model.safetensors"))
    else:  # runs written before the safetensors artifact: a state_dict, read without unpickling code
        state = torch.load(folder / "model.pt", weights_only=True)
    net.load_state_dict(state)
    net.adapted = bool(meta["adapted"])
    net.eval()
    return net, meta


# --------------------------------------------------------------------------------------------
# critical genes
# --------------------------------------------------------------------------------------------
GENE_PROFILES: dict[str, dict[str, Any]] = {
    # Signed attributions in the test, Benjamini-Hochberg: the false-discovery rate among genes
    # called critical stays at ``fdr`` while keeping power when hundreds of genes differ.
    "default": {"use_abs": False, "correction": "bh"},
    # scDEAL's analysis: absolute attributions (their share of each cell's total), Bonferroni.
    "paper": {"use_abs": True, "correction": "bonferroni"},
}
"""Defaults of :func:`critical_genes`' two profiles; ``use_abs`` and ``correction`` passed explicitly win."""


def critical_genes(
    store: str | os.PathLike[str] | Store,
    run_id: str,
    *,
    profile: Literal["default", "paper"] = "default",
    max_cells: int | None = 5000,
    n_steps: int = 64,
    use_abs: bool | None = None,
    per_cell: bool = True,
    correction: Literal["bh", "bonferroni"] | None = None,
    fdr: float = 0.05,
    min_log2fc: float = 0.1,
    min_pts: float = 0.2,
    pseudocount: float = 0.1,
    plot: bool = True,
    top: int = 20,
    seed: int = 0,
) -> pd.DataFrame:
    """Genes whose attribution differs between predicted sensitive and resistant target cells.

    Integrated gradients (exact up to a checked quadrature error: completeness holds per cell
    within tolerance) of the probability of sensitivity with respect to the MinMax-scaled input
    genes, from an all-zero baseline (every gene at its minimum), for every target cell (or a
    random ``max_cells`` of them). An attribution is *signed*: positive where the gene's expression
    pushes the cell towards "sensitive", negative where it pushes towards "resistant". With
    ``per_cell`` each cell's attributions are divided by the cell's total absolute attribution
    (signs kept), so that a gene is compared by its share of the cell's explanation, not by how
    steep the model is around the cell (confidently predicted cells have small gradients on every
    gene) -- scDEAL runs ``normalize_total`` on its attributions for the same reason.

    Per gene, the attributions of predicted-sensitive cells are compared with those of
    predicted-resistant cells by a two-sided Wilcoxon rank-sum (Mann-Whitney U) test, on the
    signed values (default) or on their absolute values (``use_abs``, scDEAL's choice, which
    cannot tell a gene that pushes sensitive cells towards "sensitive" from one that pushes them
    towards "resistant"), with a multiple-testing correction over the genes. Reported per gene:

    - ``mean_sensitive``, ``mean_resistant``: mean *signed* attribution of each group (always
      signed, whatever ``use_abs``); ``mean_abs_sensitive``, ``mean_abs_resistant``: mean absolute
      attribution;
    - ``log2fc = log2((mean_abs_sensitive + c) / (mean_abs_resistant + c))``, where the
      pseudocount ``c = pseudocount x`` (mean absolute attribution over all attributed cells and
      genes): scale-free, and a gene with no attribution in one group gets a bounded fold change
      instead of log2(x / 1e-12) ~ 30. ``direction`` is its sign: the group in which the gene
      carries more of the explanation;
    - ``effect_size``: rank-biserial correlation ``2U / (n_sensitive n_resistant) - 1`` of the
      tested values (in [-1, 1]; positive when they are larger in sensitive cells) and
      ``cohens_d``: the difference of their means over the pooled standard deviation;
    - ``pts_*``: share of the group's cells with a non-zero attribution; ``detect_*``: share
      of the group's cells that express the gene (above its minimum among the target cells);
    - ``statistic`` (U of the sensitive group), ``pvalue``, ``pvalue_adj``.

    A gene is *critical* when ``pvalue_adj <= fdr``, ``|log2fc| > min_log2fc`` and more than
    ``min_pts`` of the cells of its direction's group have a non-zero attribution -- the
    thresholds of the scDEAL case studies (0.05, 0.1, 0.2).

    Parameters
    ----------
    store : str, path or Store
    run_id : str
        A complete run with ``features="expr"``.
    profile : {"default", "paper"}, default "default"
        ``default``: signed attributions, Benjamini-Hochberg (controls the false-discovery rate,
        the usual choice when many genes are tested and a list of candidates is wanted).
        ``paper``: reproduces scDEAL's analysis -- absolute attributions and Bonferroni (controls
        the chance of any false call; conservative). scDEAL's published notebook calls scanpy's
        ``rank_genes_groups``, whose default is Benjamini-Hochberg: pass ``correction="bh"`` to
        match that code rather than the paper.
    max_cells : int or None, default 5000
        Cells attributed (random, seeded); None = all.
    n_steps : int, default 64
        Initial quadrature nodes of the integrated gradients (doubled where needed).
    use_abs : bool, optional
        Test absolute instead of signed attributions (default: the profile's).
    per_cell : bool, default True
        Divide each cell's attributions by its total absolute attribution.
    correction : {"bh", "bonferroni"}, optional
        Multiple-testing correction over genes (default: the profile's).
    fdr, min_log2fc, min_pts : float, default 0.05, 0.1 and 0.2
        Thresholds of a critical gene (see above).
    pseudocount : float, default 0.1
        Pseudocount of the fold change, in units of the mean absolute attribution.
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
    from scdm.classify._transfer_model import integrated_gradients
    from scdm.store import open_store

    st = open_store(store)
    settings = _gene_settings(profile, use_abs, correction, pseudocount)
    _check_thresholds(fdr, min_pts)
    _check_sampling(max_cells, n_steps)
    if not (_whole(top) and top >= 1):  # a negative top cut rows off the end of the printed table (head(-2))
        msg = f"top={top!r}: pass a whole number of genes >= 1 to plot per direction (default 20)."
        raise InputDataError(msg)
    if not (_whole(seed) and seed >= 0):
        msg = f"seed={seed!r}: pass a whole number >= 0 (it draws the max_cells subsample)."
        raise InputDataError(msg)
    run = transfer_run(st, run_id, complete=True)
    if run.features != "expr":
        msg = (f"Run {run_id} used embedding features ({run.features}); critical genes need expression inputs. "
               "Run transfer with features='expr'.")
        raise InputDataError(msg)
    net, meta = _load_net(st, run)
    genes = list(meta["features"])
    target = st.dataset(run.target_dataset_id).name
    preds = transfer_predictions(st, run_id)
    rows = _pick_cells(preds["label"].to_numpy(np.int8), max_cells, seed)
    X = dense(read_store_expression(st, target, genes)[rows])
    with np.load(st.root / str(run.artifacts_path) / "scalers.npz", allow_pickle=False) as sc:
        X = MinMax(sc["target_low"], sc["target_span"]).transform(X)
    net64 = net.double()
    _check_reproduces(net64, X, preds["proba"].to_numpy(np.float64)[rows], target)
    attr, delta = integrated_gradients(lambda x: net64.target_proba(x), X, n_steps=n_steps)
    labels = preds["label"].to_numpy(np.int8)[rows]  # the stored predictions define the two groups
    if per_cell:
        totals = np.abs(attr).sum(axis=1, keepdims=True)
        attr = attr / np.where(totals > 0, totals, 1.0)
    table = attribution_table(attr, labels, genes, expressed=X > 0, use_abs=settings["use_abs"],
                              correction=settings["correction"], pseudocount=settings["pseudocount"])
    table = flag_critical(table, fdr=fdr, min_log2fc=min_log2fc, min_pts=min_pts)
    params = {"profile": profile, "max_cells": max_cells, "n_cells": int(rows.size), "n_steps": n_steps,
              "use_abs": settings["use_abs"], "per_cell": per_cell, "correction": settings["correction"], "fdr": fdr,
              "min_log2fc": min_log2fc, "min_pts": min_pts, "pseudocount": pseudocount,
              "pseudocount_value": float(table.attrs["pseudocount_value"]), "seed": seed,
              "baseline": "zeros (each gene at its target minimum)", "output": "probability of sensitive",
              "max_completeness_gap": float(np.abs(delta).max()) if delta.size else 0.0}
    replace_critical_genes(st, CriticalGenes(run_id, table, params))
    table.insert(0, "run_id", run_id)
    path = _plot_genes(table, st.root / str(run.artifacts_path) / "critical_genes.png", top=top, fdr=fdr) if plot else None
    table.attrs.update({"plot": path, "max_completeness_gap": params["max_completeness_gap"], "n_cells": int(rows.size),
                        "params": params})
    logger.info("critical genes of %s: %d of %d genes pass (max completeness gap %.2e)", run_id,
                int(table["critical"].sum()), len(table), params["max_completeness_gap"])
    return table


REPRODUCE_ATOL = 1e-3
"""Largest gap between the stored probabilities and those of the inputs read again (the run's float32 network
against its float64 copy here differ by ~1e-6)."""


def _check_reproduces(net: Any, X: np.ndarray, stored: np.ndarray, target: str) -> None:
    """Refuse to explain a run whose inputs, read again, no longer give its stored predictions.

    The attributions explain the network at the target's expression as read now; when the dataset
    was re-ingested with another value kind (or read differently since) they would explain inputs the
    run never saw, under the stored sensitive/resistant groups -- a table that looks right and is not.
    """
    import torch

    with torch.no_grad():
        now = net.target_proba(torch.from_numpy(np.asarray(X, np.float64))).numpy()
    gap = float(np.abs(now - stored).max()) if stored.size else 0.0
    if gap > REPRODUCE_ATOL:
        msg = (f"The expression of {target!r} as read now does not give the run's stored predictions (largest "
               f"difference {gap:.3g} in the probability of sensitive): the dataset or its value kind changed since "
               "the run. Run transfer again on it, then compute its critical genes.")
        raise InputDataError(msg)


def _check_thresholds(fdr: Any, min_pts: Any) -> None:
    """Refuse thresholds given as percentages (``fdr=5``, ``min_pts=20``): they are fractions."""
    if isinstance(fdr, bool) or not isinstance(fdr, (int, float)) or not 0 < fdr <= 1:
        msg = f"fdr={fdr!r}: pass a fraction in (0, 1], e.g. 0.05 for 5 % (fdr=5 would call every gene with an effect critical)."
        raise InputDataError(msg)
    if isinstance(min_pts, bool) or not isinstance(min_pts, (int, float)) or not 0 <= min_pts < 1:
        msg = f"min_pts={min_pts!r}: pass a share of cells in [0, 1), e.g. 0.2 for 20 % (min_pts=20 would call no gene critical)."
        raise InputDataError(msg)


def _check_sampling(max_cells: Any, n_steps: Any) -> None:
    """Refuse a cell sample that cannot hold both groups and a quadrature without nodes.

    ``max_cells=1`` stored a table of NaN means and p-values of 1 over the run's earlier table
    (one cell is one group); ``0``, negatives and fractions were numpy tracebacks.
    """
    if max_cells is not None and not (_whole(max_cells) and max_cells >= 2):
        msg = (f"max_cells={max_cells!r}: pass a whole number of cells >= 2 (both predicted groups must be sampled), "
               "or None (--max-cells 0) for all cells.")
        raise InputDataError(msg)
    if not (_whole(n_steps) and n_steps >= 1):
        msg = f"n_steps={n_steps!r}: pass a whole number of integrated-gradient steps >= 1 (default 64)."
        raise InputDataError(msg)


def _gene_settings(profile: str, use_abs: bool | None, correction: str | None, pseudocount: float) -> dict[str, Any]:
    if profile not in GENE_PROFILES:
        msg = f"profile={profile!r}: use one of {', '.join(GENE_PROFILES)}."
        raise InputDataError(msg)
    settings = dict(GENE_PROFILES[profile])
    if use_abs is not None:
        settings["use_abs"] = bool(use_abs)
    if correction is not None:
        settings["correction"] = correction
    if settings["correction"] not in ("bh", "bonferroni"):
        msg = f"correction={settings['correction']!r}: use 'bh' (Benjamini-Hochberg) or 'bonferroni'."
        raise InputDataError(msg)
    if isinstance(pseudocount, bool) or not isinstance(pseudocount, (int, float)) or not pseudocount > 0:
        msg = f"pseudocount={pseudocount!r}: pass a number > 0 (in units of the mean absolute attribution)."
        raise InputDataError(msg)
    settings["pseudocount"] = float(pseudocount)
    return settings


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


def attribution_table(attr: np.ndarray, labels: np.ndarray, genes: Sequence[str], *, expressed: np.ndarray | None = None,
                      use_abs: bool = False, correction: str = "bh", pseudocount: float = 0.1) -> pd.DataFrame:
    """Per-gene comparison of attributions between cells labelled 1 (sensitive) and 0 (resistant).

    Parameters
    ----------
    attr : ndarray of shape (n_cells, n_genes)
        Signed attributions.
    labels : ndarray of shape (n_cells,)
        1 sensitive, 0 resistant (both present).
    genes : sequence of str
    expressed : bool ndarray of shape (n_cells, n_genes), optional
        Whether each cell expresses each gene (for ``detect_*``); default: non-zero attribution.
    use_abs : bool, default False
        Test absolute instead of signed attributions.
    correction : {"bh", "bonferroni"}, default "bh"
    pseudocount : float, default 0.1
        Of the fold change, in units of the mean absolute attribution (see :func:`critical_genes`).

    Returns
    -------
    DataFrame
        One row per gene (see :func:`critical_genes` for the columns); ``attrs["pseudocount_value"]``
        is the pseudocount in attribution units.
    """
    from scipy import stats

    labels = np.asarray(labels)
    signed = np.asarray(attr, np.float64)
    magnitude = np.abs(signed)
    tested = magnitude if use_abs else signed
    is_s, is_r = labels == 1, labels == 0
    n_s, n_r = int(is_s.sum()), int(is_r.sum())
    with np.errstate(all="ignore"):
        test = stats.mannwhitneyu(tested[is_s], tested[is_r], axis=0, alternative="two-sided", method="asymptotic")
    p = np.where(np.isfinite(test.pvalue), test.pvalue, 1.0)
    p_adj = stats.false_discovery_control(p, method="bh") if correction == "bh" else np.minimum(p * p.size, 1.0)
    u = np.asarray(test.statistic, np.float64)
    rank_biserial = np.where(np.isfinite(u), 2.0 * u / (n_s * n_r) - 1.0, 0.0)
    c = pseudocount * float(magnitude.mean()) if magnitude.size else pseudocount
    c = c if c > 0 else pseudocount  # all attributions zero: any positive pseudocount gives log2fc 0
    abs_s, abs_r = magnitude[is_s].mean(axis=0), magnitude[is_r].mean(axis=0)
    log2fc = np.log2((abs_s + c) / (abs_r + c))
    present = magnitude > 0
    detected = present if expressed is None else np.asarray(expressed, bool)
    table = pd.DataFrame({
        "gene": list(genes), "mean_sensitive": signed[is_s].mean(axis=0), "mean_resistant": signed[is_r].mean(axis=0),
        "mean_abs_sensitive": abs_s, "mean_abs_resistant": abs_r, "log2fc": log2fc, "effect_size": rank_biserial,
        "cohens_d": _cohens_d(tested[is_s], tested[is_r]),
        "pts_sensitive": present[is_s].mean(axis=0), "pts_resistant": present[is_r].mean(axis=0),
        "detect_sensitive": detected[is_s].mean(axis=0), "detect_resistant": detected[is_r].mean(axis=0),
        "statistic": u, "pvalue": p, "pvalue_adj": p_adj,
        "direction": np.where(log2fc > 0, "sensitive", "resistant")})
    table.attrs["pseudocount_value"] = c
    return table


def _cohens_d(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(mean a - mean b) / pooled sd per column; 0 where both groups are constant and equal, NaN if constant and not."""
    na, nb = a.shape[0], b.shape[0]
    diff = a.mean(axis=0) - b.mean(axis=0)
    dof = max(na + nb - 2, 1)
    pooled = np.sqrt(((na - 1) * a.var(axis=0, ddof=1 if na > 1 else 0) + (nb - 1) * b.var(axis=0, ddof=1 if nb > 1 else 0)) / dof)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(pooled > 0, diff / np.where(pooled > 0, pooled, 1.0), np.where(diff == 0, 0.0, np.nan))


def flag_critical(table: pd.DataFrame, *, fdr: float, min_log2fc: float, min_pts: float) -> pd.DataFrame:
    """Mark critical genes (see :func:`critical_genes`) and rank the table: critical first, then by p and |log2fc|."""
    pts = np.where(table["direction"] == "sensitive", table["pts_sensitive"], table["pts_resistant"])
    table["critical"] = (table["pvalue_adj"] <= fdr) & (table["log2fc"].abs() > min_log2fc) & (pts > min_pts)
    order = np.lexsort((-table["log2fc"].abs().to_numpy(), table["pvalue"].to_numpy(), ~table["critical"].to_numpy()))
    attrs = dict(table.attrs)
    table = table.iloc[order].reset_index(drop=True)
    table.insert(1, "rank", np.arange(1, len(table) + 1, dtype=np.int32))
    table.attrs.update(attrs)
    return table


def _plot_genes(table: pd.DataFrame, path: Path, *, top: int, fdr: float) -> Path:
    """Volcano plot (log2 fold change of attribution vs -log10 adjusted p) and the top genes per direction."""
    from scdm.classify._plots import RESPONSE_COLORS, new_figure, style

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
