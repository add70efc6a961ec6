"""LoRA fine-tuning: a fold-specific tuned variant of any foundation model, cached like an embedding.

For one (split, fold) of the catalog — splits are made by ``scdm evaluate`` (``scdm.classify``)
and read here through :mod:`store.splits` — :func:`finetune`:

1. tokenises the fold's **training** cells through the model's adapter
   (``tokenize`` -> ``collate`` -> ``embed``, the same path as frozen embeddings);
2. wraps the adapter's model with peft LoRA on its target modules (default r=8, alpha=8,
   dropout 0.05, the scDrugMap settings) and adds the scDrugMap MLP head
   (Linear(D,512)-ReLU-Linear(512,512)-ReLU-Linear(512,2)); trains LoRA + head with cross-entropy.
   The base weights are frozen (peft sets ``requires_grad=False``) and never change;
3. checks that the adapter really trains: after the first optimiser steps every LoRA matrix
   must have had a non-zero gradient and every B matrix must have moved from zero. A LoRA layer
   whose output never reaches the embedding (the classic case: ``out_proj`` of a stock
   ``nn.MultiheadAttention``, whose forward reads ``out_proj.weight`` directly) stops the run with
   an error naming the module. After training, LoRA must also change the eval-mode embedding;
4. saves the adapter (peft ``save_pretrained``) and the head under
   ``<store>/artifacts/adapters/<adapter_id>/`` with a row in the ``adapters`` table;
5. embeds the split's datasets with the tuned model through the normal runner
   (:func:`scdm.embedding.runner.embed` with ``lora_dir=``): variant ``lora:<adapter_id>``, the
   adapter's content hash as ``adapter_hash``, and ``params["lora"]`` naming the (split, fold) so the
   evaluation grid evaluates the variant only on that fold's test cells;
6. stores the tuned head's own predictions on the fold's test cells as an evaluation task with
   head ``lora-mlp`` (``eval_tasks``/``eval_results``/``eval_predictions``), next to the frozen
   models' heads in the leaderboard.

Asking again with the same settings reuses the adapter, the embeddings and the results.

This module is the fold job (which cells, which adapter, which results); the training loop
(steps 2-3) is :mod:`scdm.embedding.lora_training` and the adapter folder (step 4) is
:mod:`scdm.embedding.lora_card`. Their public names used outside (:class:`LoraCard`,
:func:`read_lora_card`, :func:`build_head`, :class:`LoraTrainingError`) are re-exported here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from scdm.embedding._adapter import (
    Adapter,
    check_cells_expressed,
    check_cells_known,
    check_counts,
    check_input_kind,
    get_adapter,
    library_progress,
    require_matches,
)
from scdm.embedding.hub import ResolvedCheckpoint, resolve_checkpoint
from scdm.embedding.lora_card import (
    CARD_FILE,
    CARD_VERSION,
    LoraCard,
    canonical_json,
    make_card,
    read_lora_card,
    save_adapter,
)
from scdm.embedding.lora_training import (
    LORA_HEAD,
    LoraTrainingError,
    TrainSettings,
    build_head,
    train_lora,
)
from scdm.store import ARTIFACTS_DIR, Store, open_store
from scdm.store import evaluation as records
from scdm.store.adapters import (
    AdapterRecord,
    adapter_dir,
    adapter_row,
    forget_adapter,
    training_lock,
    write_adapter,
)
from scdm.store.errors import CheckpointError, InputDataError, ScdmWarning
from scdm.store.genes import gene_table_version
from scdm.store.matrix import iter_row_blocks
from scdm.store.metrics import METRICS
from scdm.store.splits import CATEGORY_TYPES, find_splits, load_split, split_datasets, splits_of_same_labels

__all__ = [
    "LORA_HEAD",
    "FinetuneResult",
    "LoraCard",
    "LoraTrainingError",
    "build_head",
    "cells_hash",
    "finetune",
    "read_lora_card",
]

logger = logging.getLogger(__name__)

_READ_BLOCK_ROWS = 4096
_REVISION = records.OUTSIDE_GRID_REVISIONS[LORA_HEAD]
"""The lora-mlp head's revision, part of its task ids: 2 scores the head's softmax in float64; the tasks
an older scdm scored in float32 are scored again from the stored adapter (no training)."""


# --------------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FinetuneResult:
    """One fine-tuned (split, fold): its adapter, tuned embeddings and the head's test metrics."""

    adapter_id: str
    """Id of the adapter (``adapters.adapter_id``)."""
    variant: str
    """``lora:<adapter_id>``: the variant of the tuned embeddings."""
    model: str
    """Base model family."""
    split_id: str
    """The split whose fold's training cells trained the adapter."""
    scenario: str
    category_type: str
    category: str
    scheme: str
    fold: int
    """Test fold: the tuned variant may only be evaluated on these cells."""
    adapter_dir: str
    """Folder with the peft adapter, the head and the card."""
    adapter_hash: str
    """Content hash of the adapter and head files (``embeddings.adapter_hash``)."""
    embedding_ids: tuple[str, ...]
    """Tuned embeddings, one per dataset of the split."""
    task_id: str
    """The ``lora-mlp`` evaluation task of the fold."""
    metrics: dict[str, float | None]
    """The tuned head's metrics on the fold's test cells (None where undefined)."""
    n_train: int
    n_test: int
    reused: bool
    """True when the adapter was found in the store and not trained again."""
    train_curve: tuple[dict[str, float], ...] = field(repr=False, default=())
    """Per epoch: mean training loss, training accuracy, seconds."""
    wall_s: float = 0.0
    """Training wall time (of the original run when reused)."""
    device: str = "cpu"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class _Fold:
    """One fold of a stored split, with its cells."""

    split_id: str
    scenario: str
    category_type: str
    category: str
    scheme: str
    fold: int
    label: str | None
    cells: pd.DataFrame = field(repr=False)
    """dataset_id, row, response, fold (the test fold of every cell of the split)."""
    label_set: str | None = None
    """The label set(s) the split's responses come from."""

    @property
    def test_mask(self) -> np.ndarray:
        return (self.cells["fold"] == self.fold).fillna(False).to_numpy(bool)

    @property
    def train(self) -> pd.DataFrame:
        return self.cells[~self.test_mask].reset_index(drop=True)

    @property
    def test(self) -> pd.DataFrame:
        return self.cells[self.test_mask].reset_index(drop=True)


# --------------------------------------------------------------------------------------------
# hashing
# --------------------------------------------------------------------------------------------
def _short_hash(*parts: Any, n: int = 16) -> str:
    h = hashlib.blake2b(digest_size=16)
    for part in parts:
        h.update(canonical_json(part).encode())
        h.update(b"\x1f")
    return h.hexdigest()[:n]


def cells_hash(frame: pd.DataFrame) -> str:
    """Hash of the (dataset_id, row) cells of ``frame``, order-free (``adapters.train_cells_hash``)."""
    keys = frame[["dataset_id", "row"]].sort_values(["dataset_id", "row"])
    text = "\n".join(f"{d}:{int(r)}" for d, r in zip(keys["dataset_id"], keys["row"]))
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


# --------------------------------------------------------------------------------------------
# splits, read from the catalog (made by scdm.classify; never imported from there)
# --------------------------------------------------------------------------------------------
def _describe_splits(frame: pd.DataFrame) -> str:
    return "; ".join(f"{r.split_id} (scheme {r.scheme}, {int(r.n_folds)} folds, seed {r.seed})" for r in frame.itertuples())


def _resolve_splits(st: Store, dataset_ids: list[str], names: list[str], *, scenario: str, by: str,
                    category: str | None, split_id: str | None, scheme: str | None,
                    label_set: str | None = None) -> pd.DataFrame:
    """The stored split of each requested category (one row per category)."""
    asked = "" if label_set is None else f" --label-set {label_set}"
    create = (f"Create it with `scdm evaluate --dataset {' --dataset '.join(names)} --scenario {scenario} --by {by}{asked}` "
              "(it stores the splits every model shares), or scdm.classify.splits.save_splits().")
    if split_id is not None:
        frame = st.query("SELECT split_id FROM splits WHERE split_id = ?", [split_id])
        if frame.empty:
            msg = f"No split {split_id!r} in the catalog. List them with `scdm sql \"SELECT * FROM splits\"`. {create}"
            raise InputDataError(msg)
    found = find_splits(st, dataset_ids, scenario=scenario, category_type=by, label_set=label_set)
    if found.empty and label_set is not None:
        _refuse_shared_partition(st, dataset_ids, names, scenario=scenario, by=by, label_set=label_set)
    if found.empty:
        msg = (f"The catalog holds no {scenario} split by {by} of the cells of {', '.join(names)}; fine-tuning trains on "
               f"a stored split's training cells so that every model is compared on the same cells. {create}")
        raise InputDataError(msg)
    if split_id is not None:
        found = found[found["split_id"] == split_id]
        if found.empty:
            msg = f"Split {split_id!r} is not a {scenario} split by {by} of exactly the labelled cells of {', '.join(names)}."
            raise InputDataError(msg)
    if scheme is not None:
        found = found[found["scheme"] == scheme]
        if found.empty:
            msg = f"No {scenario} split by {by} with scheme {scheme!r} for {', '.join(names)}. {create}"
            raise InputDataError(msg)
    categories = sorted(found["category"].unique())
    if by == "all" and category not in (None, "all"):
        msg = f"category={category!r} needs by=<category type> (--by tissue, cancer_type, drug_type or regimen); by='all' has the one category 'all'."
        raise InputDataError(msg)
    if category is not None:
        if category not in categories:
            msg = (f"Category {category!r} has no stored {scenario} split by {by} for {', '.join(names)}. "
                   f"Available categories: {', '.join(categories)}.")
            raise InputDataError(msg)
        found = found[found["category"] == category]
    rows = []
    for cat, group in found.groupby("category", sort=True):
        if len(group) > 1:
            msg = (f"Category {cat!r} has {len(group)} stored {scenario} splits by {by}: {_describe_splits(group)}. "
                   "Pass split_id= (--split-id) to choose one (or scheme= (--split-scheme) where their schemes differ).")
            raise InputDataError(msg)
        rows.append(group.iloc[0])
    return pd.DataFrame(rows).reset_index(drop=True)


def _refuse_shared_partition(st: Store, dataset_ids: list[str], names: list[str], *, scenario: str, by: str,
                             label_set: str) -> None:
    """Name the label set whose stored split ``label_set``'s splits are: `scdm evaluate --label-set` stores a
    label set with the same labels on the same cells (JHU006's Vorinostat and AR-42) under the first name
    only, so advising it again would never make the split this call looks for."""
    same = splits_of_same_labels(st, dataset_ids, scenario=scenario, category_type=by, label_set=label_set)
    if same.empty:
        return
    stored = sorted({str(v) for v in same["label_set"].dropna()})
    ids = ", ".join(same["split_id"])
    msg = (f"Label set {label_set!r} labels the cells of {', '.join(names)} exactly as {' and '.join(map(repr, stored))} "
           f"does, so their {scenario} splits by {by} are stored once, under that name ({ids}). Fine-tune with "
           f"label_set={stored[0]!r} (--label-set {stored[0]}): the same cells, labels and folds; the tuned head's "
           f"results are recorded under {stored[0]!r}.")
    raise InputDataError(msg)


class _NotEvaluable(InputDataError):
    """A category's split, or its fold asked for, is skipped or absent (another category may still be tuned)."""


def _resolve_folds(st: Store, split: pd.Series, fold: int | None, all_folds: bool) -> list[_Fold]:
    folds = st.query("SELECT * FROM split_folds WHERE split_id = ? ORDER BY fold", [split["split_id"]])
    ok = folds[folds["status"] == "ok"]
    describe = ", ".join(f"{int(r.fold)}" + (f" (held-out {r.label})" if isinstance(r.label, str) else "") for r in ok.itertuples())
    if split["status"] != "ok":
        msg = (f"The {split['scenario']} split {split['split_id']} of category {split['category']!r} is skipped: "
               f"{split['reason']}. Choose another category.")
        raise _NotEvaluable(msg)
    if all_folds:
        for r in folds[folds["status"] != "ok"].itertuples():
            logger.info("split %s fold %d skipped: %s", split["split_id"], int(r.fold), r.reason)
        chosen = [int(f) for f in ok["fold"]]
    else:
        assert fold is not None
        if fold not in {int(f) for f in folds["fold"]}:
            msg = (f"Fold {fold} does not exist in split {split['split_id']} ({split['category_type']}={split['category']!r}, "
                   f"{int(split['n_folds'])} folds). Available folds: {describe or '(none)'}.")
            raise _NotEvaluable(msg)
        row = folds[folds["fold"] == fold].iloc[0]
        if row["status"] != "ok":
            msg = f"Fold {fold} of split {split['split_id']} is skipped: {row['reason']}. Available folds: {describe or '(none)'}."
            raise _NotEvaluable(msg)
        chosen = [fold]
    stored = load_split(st, split["split_id"])
    cells = stored.cells
    labels = {int(r.fold): (r.label if isinstance(r.label, str) else None) for r in folds.itertuples()}
    return [_Fold(split_id=split["split_id"], scenario=split["scenario"], category_type=split["category_type"],
                  category=split["category"], scheme=split["scheme"], fold=f, label=labels.get(f), cells=cells,
                  label_set=stored.label_set)
            for f in chosen]


def _evaluable_folds(st: Store, splits: pd.DataFrame, fold: int | None, all_folds: bool) -> list[_Fold]:
    """The folds to tune, category by category. Over several categories (--by without --category) one whose
    split or fold is skipped (one class, no test cells) is left out with a warning, as the evaluation grid
    leaves it out, instead of refusing the categories that can be tuned; alone, it is refused."""
    folds: list[_Fold] = []
    skipped: list[_NotEvaluable] = []
    for _, split in splits.iterrows():
        try:
            folds += _resolve_folds(st, split, fold, all_folds)
        except _NotEvaluable as err:
            if len(splits) == 1:
                raise
            skipped.append(err)
    if skipped and not folds:
        raise skipped[0]
    for refusal in skipped:
        why = str(refusal).removesuffix(" Choose another category.")
        warnings.warn(f"{why} Left out; the other categories are tuned.", ScdmWarning, stacklevel=3)
    return folds


# --------------------------------------------------------------------------------------------
# tokenising the cells of a fold
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _InputChecks:
    """The runner's input checks, with the same flags as ``scdm embed``: the adapter trains on no cell
    the tuned embedding (made by the runner afterwards) would refuse."""

    min_genes: int = 1
    min_gene_fraction: float = 0.0
    allow_non_counts: bool = False
    allow_empty_cells: bool = False

    def runner_options(self) -> dict[str, Any]:
        return asdict(self)


def _check_datasets(st: Store, model: str, infos: Sequence[Any], checks: _InputChecks) -> None:
    """Before any checkpoint is loaded: refuse a value kind the model cannot take and cells that express no
    gene, in every dataset of the split, as ``scdm embed`` does (it embeds all their cells after training)."""
    from scdm.embedding.runner import count_empty_cells

    cls = get_adapter(model)
    for ds in {i.dataset_id: i for i in infos}.values():
        check_input_kind(model, cls.requires_counts, ds.x_kind, ds.name, allow_non_counts=checks.allow_non_counts,
                         ranks_expression=getattr(cls, "ranks_expression", False))
        count_empty_cells(st, ds.dataset_id, model, allow_empty_cells=checks.allow_empty_cells)


def _check_block(adapter: Adapter, x: Any, rows: np.ndarray, checks: _InputChecks) -> None:
    """The runner's per-chunk checks (:class:`scdm.embedding.chunks.ChunkTokens`) on a block of cells."""
    if adapter.requires_counts:
        check_counts(x, adapter.name)
    check_cells_expressed(x, rows, adapter.name, allow_empty_cells=checks.allow_empty_cells)
    check_cells_known(x, adapter.known_columns_, rows, adapter.name, allow_empty_cells=checks.allow_empty_cells)


def _tokenize_cells(st: Store, adapter: Adapter, frame: pd.DataFrame, checks: _InputChecks) -> list[dict[str, np.ndarray]]:
    """Tokenise the cells (dataset_id, row) of ``frame`` through ``adapter``, in ``frame``'s order.

    ``prepare`` maps each dataset's genes, so the cells are tokenised dataset by dataset, in
    row blocks of the backed AnnData (memory grows with the tokens kept, not with the dataset).
    The gene thresholds and the empty-cell checks are the runner's (``checks``); the value kind was
    checked by :func:`_check_datasets`.
    """
    frame = frame.reset_index(drop=True)
    out: list[dict[str, np.ndarray] | None] = [None] * len(frame)
    for dataset_id, group in frame.groupby("dataset_id", sort=True):
        ds = st.dataset(str(dataset_id))
        genes = st.genes(ds.dataset_id)["gene_id"].astype(str).tolist()
        require_matches(adapter.prepare(genes, gene_id_kind=ds.gene_id_kind), adapter.name, min_genes=checks.min_genes,
                        min_fraction=checks.min_gene_fraction)
        rows = group["row"].to_numpy(np.int64)
        where = group.index.to_numpy()  # positions in frame
        order = np.argsort(rows, kind="stable")
        rows, where = rows[order], where[order]
        adata = st.open_anndata(ds.dataset_id, backed=True)
        try:
            # every cell is checked, the test cells too: the tuned model embeds them all after training,
            # and the runner's refusal would come only once the adapter is trained and stored
            for lo, block in iter_row_blocks(adata, _READ_BLOCK_ROWS):
                _check_block(adapter, block, np.arange(lo, lo + block.shape[0]), checks)
                sel = (rows >= lo) & (rows < lo + block.shape[0])
                if not sel.any():
                    continue
                x = block[rows[sel] - lo]
                for i, cell in zip(where[sel], adapter.tokenize(x, rows[sel])):
                    out[i] = cell
        finally:
            if getattr(adata, "file", None) is not None:
                adata.file.close()
    return out  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# results of the tuned head: scored and written by the store's evaluation records, like every head
# --------------------------------------------------------------------------------------------
def _head_predictions(st: Store, card: LoraCard, head: Any, embeddings: dict[str, str], test: pd.DataFrame) -> np.ndarray:
    """The tuned head's P(sensitive) for the test cells, from the stored tuned embeddings."""
    import torch

    proba = np.empty(len(test), np.float64)
    for dataset_id, group in test.groupby("dataset_id", sort=True):
        x = st.read_embedding(embeddings[str(dataset_id)], rows=group["row"].to_numpy(np.int64))
        device = next(head.parameters()).device
        with torch.inference_mode():
            logits = head(torch.from_numpy(x).to(device)).float().cpu()
        # softmax in float64 on the CPU (MPS has no float64): in float32 every cell past a logit gap of
        # ~16.6 reads exactly 1.0, tying them where eval_predictions and AUROC read them (as the mlp head)
        proba[group.index.to_numpy()] = torch.softmax(logits.double(), dim=1)[:, 1].numpy()
    return proba


def _task_key(st: Store, fold: _Fold, card: LoraCard, embeddings: dict[str, str], space_id: str, model: str) -> records.TaskKey:
    split = load_split(st, fold.split_id)
    names = dict(st.query("SELECT dataset_id, name FROM datasets").itertuples(index=False, name=None))
    return records.TaskKey(space_id, model, card.variant, tuple(sorted(embeddings.values())), split,
                           split_datasets(split, names), fold.fold, LORA_HEAD, _head_params_key(card), _REVISION)


def _write_results(st: Store, key: records.TaskKey, fold: _Fold, card: LoraCard, head: Any, embeddings: dict[str, str],
                   run_config: dict[str, Any], fit_seconds: float) -> None:
    """Store the tuned head's test predictions and metrics as a ``lora-mlp`` task (one run, one transaction)."""
    test, train = fold.test, fold.train
    t0 = time.perf_counter()
    proba = _head_predictions(st, card, head, embeddings, test)
    outcome = records.TaskOutcome(key, test["response"].to_numpy(np.int8), proba, test["dataset_id"].to_numpy(),
                                  test["row"].to_numpy(np.int64), len(train), fit_seconds, time.perf_counter() - t0)
    # the revision, as the grid records its heads': a row of an earlier one is left out by the results
    records.record_tasks(st, [outcome], {"finetune": run_config, "head_revisions": {LORA_HEAD: _REVISION}},
                         scdm_version=_version(), seconds=fit_seconds)


def _head_params_key(card: LoraCard) -> str:
    """``eval_tasks.head_params`` of the tuned head: every training setting, the same for all folds of a protocol."""
    return canonical_json({"tuning_id": card.tuning_id, **card.lora, **card.train})


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("scdm")
    except PackageNotFoundError:
        return "0+unknown"


# --------------------------------------------------------------------------------------------
# one fold
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Job:
    """What stays the same over the folds of one :func:`finetune` call."""

    st: Store
    model: str
    checkpoint: ResolvedCheckpoint
    checkpoint_hash: str
    model_params: dict[str, Any]
    settings: TrainSettings
    device: str
    precision: str
    gradient_checkpointing: bool
    embed_batch_size: int | None
    progress: bool
    checks: _InputChecks = field(default_factory=_InputChecks)

    def adapter(self) -> Adapter:
        return get_adapter(self.model)(checkpoint=self.checkpoint.path, seed=self.settings.seed, **self.model_params)


def _identity(job: _Job, adapter: Adapter, fold: _Fold) -> tuple[str, str]:
    """(tuning_id, adapter_id): hashes of everything that decides the adapter's weights."""
    tuning_id = _short_hash("lora", CARD_VERSION, job.model, job.checkpoint_hash, adapter.params(), job.settings.seed,
                            fold.split_id, job.settings.lora_json(), job.settings.train_json(), gene_table_version())
    return tuning_id, _short_hash("adapter", tuning_id, fold.fold)


def _cached_card(st: Store, adapter_id: str, folder: Path) -> LoraCard | None:
    """The stored adapter's card when its folder is intact; None (row forgotten) when it must be trained again.

    A folder missing a file, or whose files are not the bytes the catalog recorded, is trained again
    like a lost one: reused as it is, the tuned embeddings could never be made again from it (the
    runner refuses its hash) and ``scdm finetune`` would keep pointing at it.
    """
    row = adapter_row(st, adapter_id)
    if row is None:
        return None
    problem = None
    if not (folder / CARD_FILE).is_file():
        problem = f"its folder {folder} is gone"
    else:
        try:
            card = read_lora_card(folder)
        except CheckpointError as err:
            problem = str(err)
        else:
            if card.adapter_hash != row["adapter_hash"]:
                problem = f"its card in {folder} names weights {card.adapter_hash}, not the catalog's {row['adapter_hash']}"
            else:
                problem = card.damage()
    if problem is None:
        return card
    logger.warning("adapter %s is in the catalog but %s; training it again", adapter_id, problem)
    forget_adapter(st, adapter_id)
    return None


def _train_fold(job: _Job, fold: _Fold, adapter_id: str, tuning_id: str, folder: Path) -> LoraCard:
    st, settings = job.st, job.settings
    train = fold.train
    adapter = job.adapter()
    with library_progress(job.progress):
        adapter.load(job.device)
    cells = _tokenize_cells(st, adapter, train, job.checks)
    labels = train["response"].to_numpy(np.int64)
    if np.unique(labels).size < 2:
        msg = f"The training cells of fold {fold.fold} of split {fold.split_id} hold one class only; LoRA fine-tuning needs both."
        raise InputDataError(msg)
    trained = train_lora(adapter, cells, labels, settings, device=job.device, precision=job.precision,
                         gradient_checkpointing=job.gradient_checkpointing, progress=job.progress)
    card = make_card(trained, settings, adapter_id=adapter_id, tuning_id=tuning_id, checkpoint_hash=job.checkpoint_hash,
                     split_id=fold.split_id, fold=fold.fold, scenario=fold.scenario, category_type=fold.category_type,
                     category=fold.category)
    adapter_hash = save_adapter(trained, folder, card)
    write_adapter(st, AdapterRecord(  # the row goes in once the files are in place
        adapter_id=adapter_id, tuning_id=tuning_id, adapter_hash=adapter_hash, model=job.model,
        checkpoint_hash=job.checkpoint_hash, model_params=card["model_params"], split_id=fold.split_id, fold=fold.fold,
        scenario=fold.scenario, category_type=fold.category_type, category=fold.category, scheme=fold.scheme,
        label_set=fold.label_set, lora_config={**settings.lora_json(), "matched_modules": trained.lora_modules},
        train_config=settings.train_json(), n_train=len(train), train_cells_hash=cells_hash(train),
        train_curve=list(trained.curve), wall_seconds=trained.wall_s, device=job.device, telemetry=trained.telemetry,
        path=str(folder.relative_to(st.root))))
    logger.info("saved adapter %s (%s, split %s fold %d) in %.1f s", adapter_id, job.model, fold.split_id, fold.fold, trained.wall_s)
    del trained, adapter
    _free_memory(job.device)
    return read_lora_card(folder)


def _drop_lost_adapter_outputs(st: Store, card: LoraCard) -> None:
    """Remove the tuned embeddings and results of an adapter whose files were lost and that trained
    again into other weights: they are another space under the same variant, and the leaderboard
    would average them with the new results as extra folds of one tuning."""
    stale = st.query("SELECT embedding_id FROM embeddings WHERE variant = ? AND adapter_hash IS DISTINCT FROM ?",
                     [card.variant, card.adapter_hash])["embedding_id"].tolist()
    n_tasks = records.forget_variant_tasks(st, card.variant)
    for embedding_id in stale:
        st.remove_embedding(embedding_id)
    if stale or n_tasks:
        logger.warning("adapter %s was trained again into other weights (its files were gone): removed %d tuned "
                       "embeddings and %d evaluation results of the lost weights; run `scdm evaluate` again on the "
                       "new tuned embeddings for the other heads", card.adapter_id, len(stale), n_tasks)


def _free_memory(device: str) -> None:
    if device.startswith("cuda"):  # give the training memory back before the runner loads the model again
        import gc

        import torch

        gc.collect()
        torch.cuda.empty_cache()


def _finetune_fold(job: _Job, fold: _Fold) -> FinetuneResult:
    """Train (or reuse) the fold's adapter, embed the split's datasets with it, score its head."""
    st = job.st
    tuning_id, adapter_id = _identity(job, job.adapter(), fold)
    folder = adapter_dir(st, adapter_id)
    with training_lock(st, adapter_id):  # a second run of the same fold waits here, then reuses this one's adapter
        lost = adapter_row(st, adapter_id)  # still the row of the old weights when their folder is gone
        card = _cached_card(st, adapter_id, folder)
        reused = card is not None
        if card is None:
            card = _train_fold(job, fold, adapter_id, tuning_id, folder)
            if lost is not None and lost["adapter_hash"] != card.adapter_hash:
                _drop_lost_adapter_outputs(st, card)
        else:
            logger.info("adapter %s (%s, split %s fold %d) exists; not training again", adapter_id, job.model, fold.split_id, fold.fold)
    embeddings = _embed_tuned(job, fold, folder)
    row = adapter_row(st, adapter_id)
    assert row is not None
    task_id, metrics = _head_results(job, fold, card, embeddings, float(row["wall_seconds"]))
    return FinetuneResult(
        adapter_id=adapter_id, variant=card.variant, model=job.model, split_id=fold.split_id, scenario=fold.scenario,
        category_type=fold.category_type, category=fold.category, scheme=fold.scheme, fold=fold.fold,
        adapter_dir=str(folder), adapter_hash=card.adapter_hash, embedding_ids=tuple(embeddings.values()), task_id=task_id,
        metrics=metrics, n_train=len(fold.train), n_test=len(fold.test), reused=reused,
        train_curve=tuple(json.loads(row["train_curve"])), wall_s=float(row["wall_seconds"]), device=str(row["device"]))


def _embed_tuned(job: _Job, fold: _Fold, folder: Path) -> dict[str, str]:
    """Tuned embeddings of every dataset of the split, through the normal runner: dataset_id -> embedding_id."""
    from scdm.embedding.runner import embed as run_embed

    embeddings = {}
    for dataset_id in sorted(fold.cells["dataset_id"].unique()):
        result = run_embed(job.st, str(dataset_id), job.model, job.checkpoint, batch_size=job.embed_batch_size,
                           device=job.device, precision=job.precision, seed=job.settings.seed, progress=job.progress,
                           lora_dir=folder, **job.checks.runner_options(), **job.model_params)
        embeddings[str(dataset_id)] = result.embedding_id
    return embeddings


def _head_results(job: _Job, fold: _Fold, card: LoraCard, embeddings: dict[str, str], fit_seconds: float) -> tuple[str, dict[str, float | None]]:
    """The ``lora-mlp`` task of the fold (written once): its id and metrics."""
    st = job.st
    space_id = str(st.embedding(next(iter(embeddings.values()))).space_id)  # one space: same model, adapter, params
    key = _task_key(st, fold, card, embeddings, space_id, job.model)
    task_id = key.task_id
    if not records.finished_tasks(st, [task_id]):
        run_config = {"model": job.model, "checkpoint_hash": job.checkpoint_hash, "adapter_id": card.adapter_id,
                      "split_id": fold.split_id, "fold": fold.fold, **card.lora, **card.train}
        _write_results(st, key, fold, card, card.load_head(), embeddings, run_config, fit_seconds)
    # the fold's result of an earlier revision (an older scdm's float32 softmax) is replaced, not kept beside it
    records.forget_older_revisions(st, {LORA_HEAD: _REVISION})
    frame = records.task_results(st, [task_id])
    values = {m: (None if pd.isna(v) else float(v)) for m, v in zip(frame["metric"], frame["value"])}
    return task_id, {m: values.get(m) for m in METRICS}


# --------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------
def _check_settings(rank: int, alpha: float, dropout: float, epochs: int, lr: float, weight_decay: float,
                    batch_size: int | None, fold: int | None, all_folds: bool, scenario: str, by: str) -> None:
    checks = [
        (isinstance(rank, int) and not isinstance(rank, bool) and rank >= 1, f"rank={rank!r} must be an integer >= 1"),
        (isinstance(alpha, (int, float)) and alpha > 0, f"alpha={alpha!r} must be > 0"),
        (isinstance(dropout, (int, float)) and 0 <= dropout < 1, f"dropout={dropout!r} must be in [0, 1)"),
        (isinstance(epochs, int) and not isinstance(epochs, bool) and epochs >= 1, f"epochs={epochs!r} must be an integer >= 1"),
        (isinstance(lr, (int, float)) and lr > 0, f"lr={lr!r} must be > 0"),
        (isinstance(weight_decay, (int, float)) and weight_decay >= 0, f"weight_decay={weight_decay!r} must be >= 0"),
        (batch_size is None or (isinstance(batch_size, int) and batch_size >= 1), f"batch_size={batch_size!r} must be an integer >= 1"),
        (scenario in ("pooled", "cross", "custom"), f"scenario={scenario!r} must be one of pooled, cross, custom"),
        (by in CATEGORY_TYPES, f"by={by!r} must be one of {', '.join(CATEGORY_TYPES)}"),
    ]
    for ok, msg in checks:
        if not ok:
            raise InputDataError(msg + ".")
    if (fold is None) == (not all_folds):
        msg = ("Pass exactly one of fold=k (--fold k) and all_folds=True (--all-folds): an adapter is trained on one "
               "fold's training cells and may only be evaluated on that fold's test cells.")
        raise InputDataError(msg)
    if fold is not None and (isinstance(fold, bool) or not isinstance(fold, int) or fold < 0):
        msg = f"fold={fold!r} must be an integer >= 0."
        raise InputDataError(msg)


def finetune(
    store: Store | str | os.PathLike[str] | None,
    *,
    model: str,
    checkpoint: str | os.PathLike[str],
    dataset: str | Sequence[str],
    scenario: Literal["pooled", "cross", "custom"] = "pooled",
    by: str = "all",
    category: str | None = None,
    fold: int | None = None,
    all_folds: bool = False,
    split_id: str | None = None,
    scheme: str | None = None,
    label_set: str | None = None,
    rank: int = 8,
    alpha: float = 8,
    dropout: float = 0.05,
    target_modules: Iterable[str] | None = None,
    epochs: int = 5,
    lr: float = 1e-4,
    weight_decay: float = 0.01,
    batch_size: int | None = None,
    precision: str = "auto",
    gradient_checkpointing: bool = False,
    seed: int = 0,
    device: str = "auto",
    progress: bool = True,
    min_genes: int = 1,
    min_gene_fraction: float = 0.0,
    allow_non_counts: bool = False,
    allow_empty_cells: bool = False,
    **model_params: Any,
) -> list[FinetuneResult]:
    """LoRA-fine-tune ``model`` on the training cells of stored (split, fold)s; embed and score the tuned model.

    Parameters
    ----------
    store : Store or path
    model : str
        A registered foundation model (``scdm models``).
    checkpoint : path or str
        The model's checkpoint folder (official format), or a Hugging Face model id ``org/name`` /
        ``org/name@revision`` (see :mod:`scdm.embedding.hub`; an existing local path wins).
    dataset : str or list of str
        The datasets whose cells the split covers (names or ids).
    scenario : {"pooled", "cross", "custom"}, default "pooled"
    by : {"all", "tissue", "cancer_type", "drug_type", "regimen"}, default "all"
        Category type of the split.
    category : str, optional
        The category (default: every category of ``by`` that has a stored split).
    fold : int, optional
        The test fold; the adapter trains on every other cell of the split. Exclusive with ``all_folds``.
    all_folds : bool, default False
        One adapter per evaluable fold.
    split_id, scheme : str, optional
        Choose among several stored splits of the category (e.g. scheme ``cell`` vs ``sample``).
    label_set : str, optional
        The label set whose stored splits to tune on (default: each dataset's default label set).
    rank, alpha, dropout : default 8, 8, 0.05
        LoRA settings (the scDrugMap paper's).
    target_modules : list of str, optional
        peft target modules (default: the adapter's ``lora_target_modules``; a one-element list
        holding a regex is full-matched against module names).
    epochs, lr, weight_decay : default 5, 1e-4, 0.01
        AdamW over LoRA and head parameters, cross-entropy.
    batch_size : int, optional
        Cells per optimiser step (default: the adapter's). On CUDA out-of-memory the batch is
        computed in halved micro-batches with gradient accumulation, so the update is unchanged.
    precision : {"auto", "fp32", "bf16", "fp16"}, default "auto"
        ``auto``: bf16 autocast on CUDA, fp32 on CPU.
    gradient_checkpointing : bool, default False
        Trade compute for memory (Hugging Face models: geneformer, tgpt, llm); others warn.
    seed : int, default 0
        Seeds the adapter's tokenisation, LoRA/head initialisation, dropout and shuffling.
    device : str, default "auto"
    progress : bool, default True
    min_genes, min_gene_fraction, allow_non_counts, allow_empty_cells
        The input checks of :func:`scdm.embedding.runner.embed`, applied to the training cells before any
        training and to every cell when the tuned model embeds the split's datasets: too few genes in the
        vocabulary, normalised values for a model that expects raw counts, cells that express no gene (or
        none the model knows) are refused unless allowed, as ``scdm embed`` refuses them.
    **model_params
        Adapter parameters (``layer``, ``pooling``, ``max_genes``, ...), as for ``scdm embed``.

    Returns
    -------
    list of FinetuneResult
        One per (category, fold), in category then fold order.

    Raises
    ------
    InputDataError
        Bad settings; no stored split (the message names the ``scdm evaluate`` command that makes
        it); a category or fold that does not exist (the message lists the available ones).
    CheckpointError
        LoRA targets that are not in the architecture (the message lists the modules), or a
        cached adapter that does not fit the checkpoint.
    LoraTrainingError
        A LoRA module receives no gradient, or LoRA does not change the embedding.

    Notes
    -----
    The fold's training cells are tokenised once and their tokens kept in memory for the epochs.
    r, alpha and dropout follow the scDrugMap paper; ``epochs``, ``lr`` and ``weight_decay`` are
    scdm defaults (AdamW, as the scDrugMap MLP head). The runner embeds every cell of each
    dataset of the split; the tuned variant may still only be evaluated on the fold's test cells,
    which ``params["lora"]`` of its embeddings records.

    Examples
    --------
    >>> finetune("scdm-store", model="geneformer", checkpoint="ckpt/gf-6L", dataset="a375",
    ...          scenario="pooled", by="all", fold=0)  # doctest: +SKIP
    """
    from scdm.embedding.runner import check_embed_options, checkpoint_hash, resolve_device, resolve_precision

    st = open_store(store)
    _check_settings(rank, alpha, dropout, epochs, lr, weight_decay, batch_size, fold, all_folds, scenario, by)
    check_embed_options(seed=seed, min_genes=min_genes, min_gene_fraction=min_gene_fraction)
    seed = int(seed)  # keyed into the tuning id, where numpy.int64(0) was the string "0": another adapter of one tuning
    checks = _InputChecks(min_genes=min_genes, min_gene_fraction=min_gene_fraction, allow_non_counts=allow_non_counts,
                          allow_empty_cells=allow_empty_cells)
    names = [dataset] if isinstance(dataset, str) else list(dataset)
    if not names:
        msg = "No dataset given: pass dataset= (--dataset, repeatable) with the datasets the split covers."
        raise InputDataError(msg)
    infos = [st.dataset(n) for n in names]
    dataset_ids = sorted({i.dataset_id for i in infos})
    splits = _resolve_splits(st, dataset_ids, [i.name for i in infos], scenario=scenario, by=by, category=category,
                             split_id=split_id, scheme=scheme, label_set=label_set)
    folds = _evaluable_folds(st, splits, fold, all_folds)
    _check_datasets(st, model, infos, checks)  # before the checkpoint is read: refused as scdm embed refuses them

    with library_progress(progress):
        source = resolve_checkpoint(checkpoint, model, params=model_params)
    probe = get_adapter(model)(checkpoint=source.path, seed=seed, **model_params)
    probe.check_checkpoint()
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    if isinstance(target_modules, str):  # one name or one regex
        target_modules = [target_modules]
    targets = tuple(target_modules) if target_modules is not None else tuple(probe.lora_target_modules)
    if not targets:
        msg = f"{model} names no LoRA target modules; pass target_modules= (--target-modules)."
        raise InputDataError(msg)
    settings = TrainSettings(rank=rank, alpha=float(alpha), dropout=float(dropout), target_modules=targets, epochs=epochs,
                         lr=float(lr), weight_decay=float(weight_decay), batch_size=batch_size or probe.default_batch_size,
                         precision=prec, seed=seed)
    job = _Job(st=st, model=model, checkpoint=source, model_params=dict(model_params), settings=settings,
               checkpoint_hash=checkpoint_hash(source, cache_dir=st.root / ARTIFACTS_DIR), device=dev,
               precision=prec, gradient_checkpointing=gradient_checkpointing, embed_batch_size=batch_size, progress=progress,
               checks=checks)
    results = []
    for f in folds:
        logger.info("fine-tuning %s on split %s (%s %s=%s) fold %d", model, f.split_id, f.scenario, f.category_type, f.category, f.fold)
        results.append(_finetune_fold(job, f))
    return results
