"""LoRA fine-tuning: a fold-specific tuned variant of any foundation model, cached like an embedding.

For one (split, fold) of the catalog — splits are made by ``scdm evaluate`` (``scdm_classify``)
and read here with plain SQL — :func:`finetune`:

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
   (:func:`scdm_embed.runner.embed` with ``lora_dir=``): variant ``lora:<adapter_id>``, the
   adapter's content hash as ``adapter_hash``, and ``params["lora"]`` naming the (split, fold) so the
   evaluation grid evaluates the variant only on that fold's test cells;
6. stores the tuned head's own predictions on the fold's test cells as an evaluation task with
   head ``lora-mlp`` (``eval_tasks``/``eval_results``/``eval_predictions``), next to the frozen
   models' heads in the leaderboard.

Asking again with the same settings reuses the adapter, the embeddings and the results.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import shutil
import time
import uuid
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from scdm_embed._adapter import Adapter, check_counts, get_adapter, require_matches
from store import Store, open_store
from store._constants import ARTIFACTS_DIR
from store._ingest import iter_row_blocks
from store.errors import CheckpointError, InputDataError, ScdmError, ScdmWarning
from store.genes import gene_table_version

if TYPE_CHECKING:
    import torch

__all__ = [
    "LORA_HEAD",
    "FinetuneResult",
    "LoraCard",
    "LoraTrainingError",
    "build_head",
    "finetune",
    "read_lora_card",
]

logger = logging.getLogger(__name__)

LORA_HEAD = "lora-mlp"
"""Head name of the fine-tuned classifier's own results in ``eval_results``."""
ADAPTERS_DIR = "adapters"
"""Folder under ``<store>/artifacts`` holding one ``<adapter_id>/`` folder per adapter."""
CARD_FILE = "scdm_adapter.json"
"""What the adapter was trained from and on (read before loading, to refuse mismatches)."""
HEAD_FILE = "head.safetensors"
"""The MLP head's weights."""
CARD_FORMAT = "scdm-lora"
CARD_VERSION = 1
"""Version of the adapter folder layout; part of every adapter's identity."""
CATEGORY_TYPES = ("all", "tissue", "cancer_type", "drug_type", "regimen")
"""Columns of the ``cells`` table a split can be made by (mirrors ``scdm_classify.splits``)."""
METRICS = ("accuracy", "precision", "recall", "f1", "f1_macro", "f1_weighted", "auroc", "ap", "mcc", "ami", "ari")
"""Metric names of ``eval_results`` (mirrors ``scdm_classify.metrics.METRICS``)."""
_CHECK_STEPS = 2
"""Optimiser steps after which the LoRA gradients are checked (B starts at zero, so A first gets a
gradient on the second step)."""
_HASHED_FILES = ("adapter_config.json", "adapter_model.safetensors", HEAD_FILE)
_READ_BLOCK_ROWS = 4096


class LoraTrainingError(ScdmError, RuntimeError):
    """LoRA is not training (a module gets no gradient, or LoRA does not change the embedding)."""


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
class _Settings:
    """Everything about one fine-tuning protocol except the fold (its hash is the tuning id)."""

    rank: int
    alpha: float
    dropout: float
    target_modules: tuple[str, ...]
    epochs: int
    lr: float
    weight_decay: float
    batch_size: int
    precision: str
    seed: int
    hidden: int = 512

    def lora_json(self) -> dict[str, Any]:
        return {"r": self.rank, "alpha": self.alpha, "dropout": self.dropout, "target_modules": list(self.target_modules)}

    def train_json(self) -> dict[str, Any]:
        return {"epochs": self.epochs, "lr": self.lr, "weight_decay": self.weight_decay, "batch_size": self.batch_size,
                "precision": self.precision, "seed": self.seed, "optimizer": "AdamW", "loss": "cross_entropy",
                "head": {"name": LORA_HEAD, "layers": "Linear(D,h)-ReLU-Linear(h,h)-ReLU-Linear(h,2)", "hidden": self.hidden}}


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
def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def _short_hash(*parts: Any, n: int = 16) -> str:
    h = hashlib.blake2b(digest_size=16)
    for part in parts:
        h.update(_canonical(part).encode())
        h.update(b"\x1f")
    return h.hexdigest()[:n]


def _cells_hash(frame: pd.DataFrame) -> str:
    keys = frame[["dataset_id", "row"]].sort_values(["dataset_id", "row"])
    text = "\n".join(f"{d}:{int(r)}" for d, r in zip(keys["dataset_id"], keys["row"]))
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def _files_hash(folder: Path) -> str:
    total = hashlib.blake2b(digest_size=16)
    for name in _HASHED_FILES:
        path = folder / name
        if not path.is_file():
            msg = f"Adapter folder {str(folder)!r} is missing {name!r}; it is not a complete scdm LoRA adapter."
            raise CheckpointError(msg)
        h = hashlib.blake2b(digest_size=16)
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
        total.update(name.encode() + b"\x1f" + h.hexdigest().encode())
    return total.hexdigest()


# --------------------------------------------------------------------------------------------
# splits, read from the catalog (made by scdm_classify; never imported from there)
# --------------------------------------------------------------------------------------------
def _labelled_counts(st: Store, dataset_ids: list[str], by: str) -> dict[str, int]:
    column = "'all'" if by == "all" else f"CAST({by} AS VARCHAR)"  # `by` is checked against CATEGORY_TYPES
    frame = st.query(
        f"SELECT {column} AS category, count(*) AS n FROM cells "
        "WHERE list_contains(?, dataset_id) AND response IS NOT NULL GROUP BY 1", [dataset_ids])
    return {str(c): int(n) for c, n in zip(frame["category"], frame["n"]) if c is not None}


def _stored_splits(st: Store, dataset_ids: list[str], scenario: str, by: str) -> pd.DataFrame:
    """Splits of ``scenario``/``by`` made from exactly the labelled cells of these datasets' categories."""
    frame = st.query(
        "SELECT s.split_id, s.scenario, s.category_type, s.category, s.scheme, s.n_folds, s.seed, s.status, s.reason, "
        "s.n_cells, s.created_at, list_sort(list(DISTINCT a.dataset_id)) AS datasets "
        "FROM splits s JOIN split_assignments a USING (split_id) "
        "WHERE s.scenario = ? AND s.category_type = ? GROUP BY ALL ORDER BY s.category, s.created_at",
        [scenario, by])
    if frame.empty:
        return frame
    wanted = set(dataset_ids)
    counts = _labelled_counts(st, dataset_ids, by)
    # a split of these datasets covers every labelled cell of its category in them (and no other dataset)
    keep = [set(ds) <= wanted and int(n) == counts.get(str(cat), -1)
            for ds, n, cat in zip(frame["datasets"], frame["n_cells"], frame["category"])]
    return frame[keep].reset_index(drop=True)


def _split_cells(st: Store, split_id: str) -> pd.DataFrame:
    cells = st.query(
        'SELECT a.dataset_id, a."row", c.response, a.fold FROM split_assignments a '
        'JOIN cells c ON c.dataset_id = a.dataset_id AND c."row" = a."row" '
        'WHERE a.split_id = ? ORDER BY a.dataset_id, a."row"', [split_id])
    cells["row"] = cells["row"].astype(np.int64)
    cells["response"] = cells["response"].astype(np.int8)
    cells["fold"] = cells["fold"].astype("Int64")
    return cells


def _describe_splits(frame: pd.DataFrame) -> str:
    return "; ".join(f"{r.split_id} (scheme {r.scheme}, {int(r.n_folds)} folds, seed {r.seed})" for r in frame.itertuples())


def _resolve_splits(st: Store, dataset_ids: list[str], names: list[str], *, scenario: str, by: str,
                    category: str | None, split_id: str | None, scheme: str | None) -> pd.DataFrame:
    """The stored split of each requested category (one row per category)."""
    create = (f"Create it with `scdm evaluate --dataset {' --dataset '.join(names)} --scenario {scenario} --by {by}` "
              "(it stores the splits every model shares), or scdm_classify.splits.save_splits().")
    if split_id is not None:
        frame = st.query("SELECT split_id FROM splits WHERE split_id = ?", [split_id])
        if frame.empty:
            msg = f"No split {split_id!r} in the catalog. List them with `scdm sql \"SELECT * FROM splits\"`. {create}"
            raise InputDataError(msg)
    found = _stored_splits(st, dataset_ids, scenario, by)
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
                   "Pass split_id= (--split-id) to choose one (or scheme= (--scheme) where their schemes differ).")
            raise InputDataError(msg)
        rows.append(group.iloc[0])
    return pd.DataFrame(rows).reset_index(drop=True)


def _resolve_folds(st: Store, split: pd.Series, fold: int | None, all_folds: bool) -> list[_Fold]:
    folds = st.query("SELECT * FROM split_folds WHERE split_id = ? ORDER BY fold", [split["split_id"]])
    ok = folds[folds["status"] == "ok"]
    describe = ", ".join(f"{int(r.fold)}" + (f" (held-out {r.label})" if isinstance(r.label, str) else "") for r in ok.itertuples())
    if split["status"] != "ok":
        msg = (f"The {split['scenario']} split {split['split_id']} of category {split['category']!r} is skipped: "
               f"{split['reason']}. Choose another category.")
        raise InputDataError(msg)
    if all_folds:
        for r in folds[folds["status"] != "ok"].itertuples():
            logger.info("split %s fold %d skipped: %s", split["split_id"], int(r.fold), r.reason)
        chosen = [int(f) for f in ok["fold"]]
    else:
        assert fold is not None
        if fold not in {int(f) for f in folds["fold"]}:
            msg = (f"Fold {fold} does not exist in split {split['split_id']} ({split['category_type']}={split['category']!r}, "
                   f"{int(split['n_folds'])} folds). Available folds: {describe or '(none)'}.")
            raise InputDataError(msg)
        row = folds[folds["fold"] == fold].iloc[0]
        if row["status"] != "ok":
            msg = f"Fold {fold} of split {split['split_id']} is skipped: {row['reason']}. Available folds: {describe or '(none)'}."
            raise InputDataError(msg)
        chosen = [fold]
    cells = _split_cells(st, split["split_id"])
    labels = {int(r.fold): (r.label if isinstance(r.label, str) else None) for r in folds.itertuples()}
    return [_Fold(split_id=split["split_id"], scenario=split["scenario"], category_type=split["category_type"],
                  category=split["category"], scheme=split["scheme"], fold=f, label=labels.get(f), cells=cells)
            for f in chosen]


# --------------------------------------------------------------------------------------------
# tokenising the cells of a fold
# --------------------------------------------------------------------------------------------
def _tokenize_cells(st: Store, adapter: Adapter, frame: pd.DataFrame) -> list[dict[str, np.ndarray]]:
    """Tokenise the cells (dataset_id, row) of ``frame`` through ``adapter``, in ``frame``'s order.

    ``prepare`` maps each dataset's genes, so the cells are tokenised dataset by dataset, in
    row blocks of the backed AnnData (memory grows with the tokens kept, not with the dataset).
    """
    frame = frame.reset_index(drop=True)
    out: list[dict[str, np.ndarray] | None] = [None] * len(frame)
    for dataset_id, group in frame.groupby("dataset_id", sort=True):
        ds = st.dataset(str(dataset_id))
        if adapter.requires_counts and ds.x_kind == "scaled":
            msg = (f"{adapter.name} needs raw counts, but dataset {ds.name!r} holds negative (scaled) values. Ingest the "
                   "raw counts (e.g. adata.layers['counts'] saved as X) to fine-tune on it.")
            raise InputDataError(msg)
        genes = st.genes(ds.dataset_id)["gene_id"].astype(str).tolist()
        require_matches(adapter.prepare(genes, gene_id_kind=ds.gene_id_kind), adapter.name)
        rows = group["row"].to_numpy(np.int64)
        where = group.index.to_numpy()  # positions in frame
        order = np.argsort(rows, kind="stable")
        rows, where = rows[order], where[order]
        adata = st.open_anndata(ds.dataset_id, backed=True)
        try:
            for lo, block in iter_row_blocks(adata, _READ_BLOCK_ROWS, start=int(rows[0]), stop=int(rows[-1]) + 1):
                sel = (rows >= lo) & (rows < lo + block.shape[0])
                if not sel.any():
                    continue
                x = block[rows[sel] - lo]
                if adapter.requires_counts:
                    check_counts(x, adapter.name)
                for i, cell in zip(where[sel], adapter.tokenize(x, rows[sel])):
                    out[i] = cell
        finally:
            if getattr(adata, "file", None) is not None:
                adata.file.close()
    return out  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# LoRA targets
# --------------------------------------------------------------------------------------------
def _peft_targets(mods: Sequence[str]) -> str | list[str]:
    """peft ``target_modules``: a one-element regex is given as a string (peft full-matches it)."""
    mods = list(mods)
    if len(mods) == 1 and re.search(r"[\\*()|\[\]+?^$]", mods[0]):
        return mods[0]
    return mods


def _wrappable(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Modules LoRA can be put on: leaf Linear-like layers and attention modules."""
    from torch import nn

    kinds = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.MultiheadAttention)
    return {name: m for name, m in model.named_modules()
            if name and (isinstance(m, kinds) or type(m).__name__ == "Conv1D")}


def _pattern(name: str) -> str:
    # collapse the layer index (the first numeric part) so the list stays short
    return re.sub(r"\.\d+(?=\.)", ".{i}", name, count=1)


def _matched_modules(model: torch.nn.Module, targets: Sequence[str], model_name: str) -> list[str]:
    """Names of the modules peft will wrap; an error listing the available ones if a target matches none."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    candidates = _wrappable(model)
    names = [n for n, _ in model.named_modules() if n]
    available = ", ".join(dict.fromkeys(_pattern(n) for n in candidates))
    spec = _peft_targets(targets)
    unmatched = []
    for target in ([spec] if isinstance(spec, str) else spec):
        config = LoraConfig(target_modules=target if isinstance(spec, str) else [target])
        if not any(check_target_module_exists(config, n) for n in names):
            unmatched.append(target)
    if unmatched:
        msg = (f"LoRA target module(s) {unmatched} are not in the {model_name} architecture loaded from this checkpoint. "
               f"Modules LoRA can target: {available}. Pass target_modules= (--target-modules) with names or name "
               "suffixes from that list (or one regex that full-matches module names).")
        raise CheckpointError(msg)
    config = LoraConfig(target_modules=spec)
    matched = [n for n in names if check_target_module_exists(config, n)]
    wrong = [n for n in matched if n not in candidates]
    if wrong:
        msg = (f"LoRA targets {list(targets)} match {wrong[:5]}, which peft cannot wrap (not a Linear-like layer). "
               f"Modules LoRA can target: {available}.")
        raise CheckpointError(msg)
    return matched


def _lora_matrices(model: torch.nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(A, B) of every LoRA layer, by module name."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            for key in module.lora_A:
                out[name] = (module.lora_A[key].weight, module.lora_B[key].weight)
            for key in module.lora_embedding_A:
                out[name] = (module.lora_embedding_A[key], module.lora_embedding_B[key])
    return out


class _GradientAudit:
    """Records which LoRA matrices got a gradient in the first steps; refuses a LoRA that does not train."""

    def __init__(self, model: torch.nn.Module, model_name: str) -> None:
        self.model_name = model_name
        self.matrices = _lora_matrices(model)
        self.a_seen = dict.fromkeys(self.matrices, False)
        self.b_seen = dict.fromkeys(self.matrices, False)
        self.steps = 0
        self.done = False

    def observe(self) -> None:
        """Call after backward, before the optimiser step, for the first steps."""
        for name, (a, b) in self.matrices.items():
            self.a_seen[name] |= a.grad is not None and bool(a.grad.detach().abs().max() > 0)
            self.b_seen[name] |= b.grad is not None and bool(b.grad.detach().abs().max() > 0)
        self.steps += 1

    def verify(self) -> None:
        """Raise :class:`LoraTrainingError` naming every LoRA layer that did not train."""
        self.done = True
        dead = []
        for name, (_, b) in self.matrices.items():
            moved = bool(b.detach().abs().max() > 0)
            # A's gradient is B^T(...): zero on the first step, when B is still zero
            a_ok = self.a_seen[name] or self.steps < 2
            if not (self.b_seen[name] and moved and a_ok):
                dead.append(name)
        if dead:
            shown = ", ".join(dead[:10]) + (f" (+{len(dead) - 10} more)" if len(dead) > 10 else "")
            msg = (f"LoRA is not training {len(dead)} of {len(self.matrices)} {self.model_name} modules: {shown} received no "
                   f"gradient in the first {self.steps} steps (or its B matrix stayed zero). Their output does not reach the "
                   "embedding: e.g. the out_proj of a stock torch nn.MultiheadAttention, whose forward reads out_proj.weight "
                   "directly and bypasses the LoRA layer, or a layer after the pooled one. Leave these modules out of "
                   "target_modules (--target-modules), or give the model an attention whose projections are called as modules.")
            raise LoraTrainingError(msg)


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------
def build_head(emb_dim: int, hidden: int = 512) -> torch.nn.Module:
    """The scDrugMap MLP head: Linear(D,512)-ReLU-Linear(512,512)-ReLU-Linear(512,2)."""
    from torch import nn

    return nn.Sequential(nn.Linear(emb_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 2))


def _autocast(device: str, precision: str) -> Any:
    import contextlib

    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type="cuda" if device.startswith("cuda") else "cpu", dtype=dtype)


def _to_device(batch: dict[str, Any], device: str) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if hasattr(v, "to") else v for k, v in batch.items()}


@dataclass
class _Trained:
    """A LoRA-wrapped adapter and its head after training (in eval mode)."""

    adapter: Adapter
    peft_model: Any
    head: Any
    lora_modules: list[str]
    curve: list[dict[str, float]]
    wall_s: float
    telemetry: dict[str, Any]


def _set_checkpointing(model: Any, model_name: str, on: bool) -> bool:
    """Switch Hugging Face activation (gradient) checkpointing; warn and return False where there is none."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        if on:
            msg = (f"gradient_checkpointing=True is not supported by the {model_name} model ({type(model).__name__} is not a "
                   "Hugging Face model with gradient checkpointing); training without it. Lower --batch-size if memory is short.")
            warnings.warn(msg, ScdmWarning, stacklevel=6)  # points at the finetune() call
        return False
    # transformers 5 renamed gradient_checkpointing_* to activation_checkpointing_*
    if not on:
        (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()
        return False
    kwargs = {"use_reentrant": False}  # token ids need no gradient; the LoRA weights inside get theirs
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return True


@contextlib.contextmanager
def _quiet_peft() -> Iterator[None]:
    """peft asks transformers 5 models for a deprecated property; that FutureWarning is not the user's to fix."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def _wrap(adapter: Adapter, settings: _Settings, device: str) -> tuple[Any, Any, list[str]]:
    """Put LoRA on the adapter's target modules (in place) and build the head: (peft model, head, matched names)."""
    import torch
    from peft import LoraConfig, get_peft_model

    assert adapter.model is not None
    matched = _matched_modules(adapter.model, settings.target_modules, adapter.name)
    modules = dict(adapter.model.named_modules())
    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout, bias="none",
                        target_modules=_peft_targets(settings.target_modules),
                        # GPT-2 style Conv1D stores its weight transposed
                        fan_in_fan_out=any(type(modules[n]).__name__ == "Conv1D" for n in matched))
    torch.manual_seed(settings.seed)
    with _quiet_peft():
        peft_model = get_peft_model(adapter.model, config)  # injects LoRA into adapter.model in place
    head = build_head(adapter.emb_dim, settings.hidden)
    return peft_model.to(device), head.to(device), matched


def _train(adapter: Adapter, cells: list[dict[str, np.ndarray]], labels: np.ndarray, settings: _Settings, *,
           device: str, precision: str, gradient_checkpointing: bool, progress: bool) -> _Trained:
    """Wrap ``adapter.model`` (loaded) with LoRA, train LoRA + head on the cells, return both in eval mode."""
    import torch

    cuda = device.startswith("cuda")
    with torch.random.fork_rng(devices=[torch.device(device)] if cuda else []):  # the caller's RNG is left as it was
        peft_model, head, matched = _wrap(adapter, settings, device)
        checkpointing = gradient_checkpointing and _set_checkpointing(adapter.model, adapter.name, True)
        trainable = [p for p in adapter.model.parameters() if p.requires_grad]  # type: ignore[union-attr]
        n_trainable = sum(p.numel() for p in trainable)
        logger.info("%s LoRA: %d modules, %d trainable parameters (+ head %d); %d training cells, %d epochs",
                    adapter.name, len(matched), n_trainable, sum(p.numel() for p in head.parameters()), len(cells), settings.epochs)
        opt = torch.optim.AdamW([*trainable, *head.parameters()], lr=settings.lr, weight_decay=settings.weight_decay)
        state: dict[str, Any] = {"micro": settings.batch_size, "oom_backoffs": 0}
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        curve = _fit(adapter, head, cells, labels, settings, opt, state, device, precision, progress)
        wall = time.perf_counter() - t0
        if checkpointing:
            _set_checkpointing(adapter.model, adapter.name, False)
        adapter.model.eval()  # type: ignore[union-attr]
        head.eval()
    _check_lora_changes_embedding(adapter, peft_model, cells[: min(8, state["micro"])], device, precision)
    lengths = [adapter.token_length(c) for c in cells]
    telemetry: dict[str, Any] = {"n_trainable": n_trainable, "n_lora_modules": len(matched), "oom_backoffs": state["oom_backoffs"],
                                 "final_micro_batch": state["micro"], "gradient_checkpointing": checkpointing,
                                 "tokens_per_cell_median": float(np.median(lengths)) if lengths else 0.0}
    if cuda:
        telemetry["peak_gpu_mem_bytes"] = int(torch.cuda.max_memory_allocated())
        telemetry["gpu"] = torch.cuda.get_device_name(0)
    return _Trained(adapter, peft_model, head, matched, curve, wall, telemetry)


def _fit(adapter: Adapter, head: Any, cells: list[dict[str, np.ndarray]], labels: np.ndarray, settings: _Settings, opt: Any,
         state: dict[str, Any], device: str, precision: str, progress: bool) -> list[dict[str, float]]:
    """The epochs: shuffled batches, one optimiser step each; the LoRA check after the first steps."""
    import torch

    from store.progress import progress_bar

    assert adapter.model is not None
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16" and device.startswith("cuda"))
    audit = _GradientAudit(adapter.model, adapter.name)
    y_all = torch.from_numpy(labels.astype(np.int64))
    lengths = np.array([adapter.token_length(c) for c in cells])
    bs = settings.batch_size
    bar = progress_bar(total=settings.epochs * math.ceil(len(cells) / bs), desc=f"finetune {adapter.name}", unit="batch",
                       silent=not progress)
    curve: list[dict[str, float]] = []
    adapter.model.train()
    head.train()
    try:
        for epoch in range(settings.epochs):
            t_epoch = time.perf_counter()
            order = np.random.default_rng([settings.seed, epoch]).permutation(len(cells))
            loss_sum = correct = 0.0
            for start in range(0, len(order), bs):
                loss, hits = _step(adapter, head, cells, y_all, order[start:start + bs], lengths, opt, scaler, state, device, precision)
                if not audit.done:
                    audit.observe()  # gradients are still on the parameters here
                scaler.step(opt)
                scaler.update()
                opt.zero_grad(set_to_none=True)
                if not audit.done and audit.steps >= _CHECK_STEPS:
                    audit.verify()
                loss_sum, correct = loss_sum + loss, correct + hits
                bar.update(1)
            curve.append({"epoch": epoch + 1, "loss": loss_sum / len(cells), "accuracy": correct / len(cells),
                          "seconds": time.perf_counter() - t_epoch})
            bar.set_postfix(loss=f"{curve[-1]['loss']:.4f}")
            logger.info("%s LoRA epoch %d: loss %.4f, training accuracy %.3f", adapter.name, epoch + 1, curve[-1]["loss"],
                        curve[-1]["accuracy"])
        if not audit.done:  # fewer steps than the check wants: check what there was
            audit.verify()
    finally:
        bar.close()
    return curve


def _step(adapter: Adapter, head: Any, cells: list[dict[str, np.ndarray]], y_all: Any, idx: np.ndarray, lengths: np.ndarray,
          opt: Any, scaler: Any, state: dict[str, Any], device: str, precision: str) -> tuple[float, float]:
    """Gradients of one batch, in micro-batches; on CUDA out-of-memory the micro-batch is halved.

    The loss is summed over micro-batches and divided by the whole batch, so the update does not
    depend on the micro-batch size (a batch-dependent model, whose cells attend to each other, is
    never split: that would change what it computes).
    """
    import torch
    from torch.nn import functional as F

    batch_dependent = getattr(adapter, "batch_dependent", False)
    idx = idx[np.argsort(-lengths[idx], kind="stable")]  # micro-batches of similar length pad less
    while True:
        micro = len(idx) if batch_dependent else min(state["micro"], len(idx))
        try:
            loss_total = hits = 0.0
            for lo in range(0, len(idx), micro):
                part = idx[lo:lo + micro]
                batch = _to_device(adapter.collate([cells[i] for i in part]), device)
                y = y_all[part].to(device)
                with _autocast(device, precision):
                    logits = head(adapter.embed(batch).float())
                loss = F.cross_entropy(logits.float(), y, reduction="sum")
                scaler.scale(loss / len(idx)).backward()
                loss_total += float(loss.detach())
                hits += float((logits.detach().argmax(1) == y).sum())
            return loss_total, hits
        except torch.cuda.OutOfMemoryError as err:
            opt.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            if batch_dependent or micro == 1:
                why = ("its cells attend to each other, so the batch is part of the model and is not split"
                       if batch_dependent else "even one cell does not fit")
                msg = f"CUDA out of memory fine-tuning {adapter.name} at micro-batch {micro} ({why}). Rerun with a smaller --batch-size or gradient_checkpointing=True."
                raise ScdmError(msg) from err
            state["micro"] = max(1, micro // 2)
            state["oom_backoffs"] += 1
            logger.warning("CUDA out of memory at micro-batch %d; retrying the batch with %d (gradients accumulate)", micro, state["micro"])


def _check_lora_changes_embedding(adapter: Adapter, peft_model: Any, cells: list[dict[str, np.ndarray]], device: str, precision: str) -> None:
    """In eval mode, LoRA must change the embedding (a fused inference path could bypass it)."""
    import torch

    batch = _to_device(adapter.collate(cells), device)
    with torch.inference_mode(), _autocast(device, precision):
        tuned = adapter.embed(batch).float()
        with peft_model.disable_adapter():
            frozen = adapter.embed(batch).float()
    if torch.equal(tuned, frozen):
        msg = (f"The trained LoRA layers do not change the {adapter.name} embedding in eval mode: the model's inference path "
               "bypasses them (e.g. a fused fast path of torch.nn.TransformerEncoderLayer reads the layers' weights "
               "directly). Target modules that are called through their forward in eval mode too.")
        raise LoraTrainingError(msg)


# --------------------------------------------------------------------------------------------
# the adapter folder
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LoraCard:
    """What an adapter folder holds and what it was trained from (``scdm_adapter.json``)."""

    path: Path
    adapter_id: str
    tuning_id: str
    adapter_hash: str
    """blake2b of the adapter and head files."""
    model: str
    checkpoint_hash: str
    model_params: dict[str, Any]
    seed: int
    split_id: str
    fold: int
    scenario: str
    category_type: str
    category: str
    lora: dict[str, Any]
    train: dict[str, Any]
    lora_modules: tuple[str, ...]
    emb_dim: int

    @property
    def variant(self) -> str:
        """``lora:<adapter_id>``."""
        return f"lora:{self.adapter_id}"

    def embedding_params(self) -> dict[str, Any]:
        """What the tuned embeddings record in ``params["lora"]``: the (split, fold) they belong to."""
        return {"adapter_id": self.adapter_id, "tuning_id": self.tuning_id, "split_id": self.split_id, "fold": self.fold,
                "scenario": self.scenario, "category_type": self.category_type, "category": self.category}

    def check_base(self, adapter: Adapter, checkpoint_hash: str | None) -> None:
        """Refuse to put this adapter on another model, checkpoint or parameter set."""
        if adapter.name != self.model:
            msg = f"Adapter {self.adapter_id} ({self.path}) was trained on {self.model!r}, not {adapter.name!r}; use --model {self.model}."
            raise CheckpointError(msg)
        if checkpoint_hash != self.checkpoint_hash:
            msg = (f"Adapter {self.adapter_id} was trained on the {self.model} checkpoint with content hash {self.checkpoint_hash}, "
                   f"but {str(adapter.checkpoint)!r} has hash {checkpoint_hash}: LoRA weights only fit the exact checkpoint "
                   "they were trained on. Pass that checkpoint, or fine-tune again on this one.")
            raise CheckpointError(msg)
        params = {**adapter.params(), "seed": adapter.seed}
        if _canonical(params) != _canonical(self.model_params):
            msg = (f"Adapter {self.adapter_id} was trained with {self.model} parameters {self.model_params}, but the model is "
                   f"set up with {params}. Use the same parameters (they decide which layers exist and what is pooled).")
            raise CheckpointError(msg)

    def apply(self, adapter: Adapter) -> Any:
        """Load the LoRA weights into ``adapter.model`` (loaded, eval mode); returns the head (eval mode)."""
        from peft import PeftModel

        assert adapter.model is not None and adapter.device is not None
        if _files_hash(self.path) != self.adapter_hash:
            msg = f"The files of adapter {self.adapter_id} in {str(self.path)!r} do not match their recorded hash; they were changed or damaged. Fine-tune again."
            raise CheckpointError(msg)
        with _quiet_peft():
            PeftModel.from_pretrained(adapter.model, str(self.path), is_trainable=False)  # injects in place
        adapter.model.to(adapter.device).eval()
        found = sorted(_lora_matrices(adapter.model))
        if found != sorted(self.lora_modules):
            msg = (f"Adapter {self.adapter_id} has LoRA weights for {len(self.lora_modules)} modules, but they landed on "
                   f"{len(found)} modules of this {self.model} model: the checkpoint's architecture differs from the one it was trained on.")
            raise CheckpointError(msg)
        return _load_head(self).to(adapter.device)


def read_lora_card(lora_dir: str | os.PathLike[str]) -> LoraCard:
    """Read an adapter folder's card (no weights are loaded).

    Raises
    ------
    CheckpointError
        The folder is missing or is not an scdm LoRA adapter.
    """
    path = Path(lora_dir)
    card_path = path / CARD_FILE
    if not card_path.is_file():
        msg = f"{str(path)!r} is not an scdm LoRA adapter folder (no {CARD_FILE}); fine-tune with `scdm finetune` to make one."
        raise CheckpointError(msg)
    raw = json.loads(card_path.read_text())
    if raw.get("format") != CARD_FORMAT or int(raw.get("version", 0)) > CARD_VERSION:
        msg = f"{str(card_path)!r} has format {raw.get('format')!r} version {raw.get('version')}; this scdm reads {CARD_FORMAT} up to version {CARD_VERSION}."
        raise CheckpointError(msg)
    return LoraCard(path=path, adapter_id=raw["adapter_id"], tuning_id=raw["tuning_id"], adapter_hash=raw["adapter_hash"],
                    model=raw["model"], checkpoint_hash=raw["checkpoint_hash"], model_params=raw["model_params"],
                    seed=int(raw["seed"]), split_id=raw["split_id"], fold=int(raw["fold"]), scenario=raw["scenario"],
                    category_type=raw["category_type"], category=raw["category"], lora=raw["lora"], train=raw["train"],
                    lora_modules=tuple(raw["lora_modules"]), emb_dim=int(raw["emb_dim"]))


def _card(trained: _Trained, settings: _Settings, *, adapter_id: str, tuning_id: str, checkpoint_hash: str, split_id: str,
          fold: int, scenario: str, category_type: str, category: str) -> dict[str, Any]:
    """The card of a trained adapter (``scdm_adapter.json``, less the files' hash)."""
    adapter = trained.adapter
    return {"format": CARD_FORMAT, "version": CARD_VERSION, "adapter_id": adapter_id, "tuning_id": tuning_id,
            "model": adapter.name, "checkpoint_hash": checkpoint_hash, "model_params": {**adapter.params(), "seed": adapter.seed},
            "seed": settings.seed, "split_id": split_id, "fold": fold, "scenario": scenario, "category_type": category_type,
            "category": category, "lora": settings.lora_json(), "train": settings.train_json(),
            "lora_modules": trained.lora_modules, "emb_dim": adapter.emb_dim, "train_curve": trained.curve}


def _save(trained: _Trained, folder: Path, card: dict[str, Any]) -> str:
    """Write adapter, head and card to a temporary folder, then rename it into place; returns the hash."""
    from safetensors.torch import save_file

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        trained.peft_model.save_pretrained(str(tmp))
        save_file({k: v.detach().contiguous().cpu() for k, v in trained.head.state_dict().items()}, str(tmp / HEAD_FILE))
        adapter_hash = _files_hash(tmp)
        (tmp / CARD_FILE).write_text(json.dumps({**card, "adapter_hash": adapter_hash}, indent=1, sort_keys=True, default=str))
        if folder.exists():  # left by a run that died before its catalog row
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return adapter_hash


# --------------------------------------------------------------------------------------------
# metrics of the tuned head (the definitions of scdm_classify.metrics, which scdm_embed cannot import)
# --------------------------------------------------------------------------------------------
def _fold_metrics(y: np.ndarray, proba: np.ndarray, threshold: float = 0.5) -> tuple[dict[str, float | None], list[str]]:
    from sklearn import metrics as skm

    pred = (proba >= threshold).astype(np.int8)
    n, n_pos = int(y.size), int(y.sum())
    tp = int(((pred == 1) & (y == 1)).sum())
    fp = int(((pred == 1) & (y == 0)).sum())
    fn = int(((pred == 0) & (y == 1)).sum())
    values: dict[str, float | None] = dict.fromkeys(METRICS)
    flags: list[str] = []
    values["accuracy"] = float((pred == y).mean())
    if tp + fp > 0:
        values["precision"] = tp / (tp + fp)
    else:
        flags.append("no_predicted_positive")
    if n_pos > 0:
        values["recall"] = tp / n_pos
        values["f1"] = 2 * tp / (2 * tp + fp + fn)
    if n_pos in (0, n):
        return values, ["single_class_test", *flags]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        values["f1_macro"] = float(skm.f1_score(y, pred, average="macro", zero_division=0))
        values["f1_weighted"] = float(skm.f1_score(y, pred, average="weighted", zero_division=0))
        values["auroc"] = float(skm.roc_auc_score(y, proba))
        values["ap"] = float(skm.average_precision_score(y, proba))
        values["mcc"] = float(skm.matthews_corrcoef(y, pred))
        values["ami"] = float(skm.adjusted_mutual_info_score(y, pred))
        values["ari"] = float(skm.adjusted_rand_score(y, pred))
    if np.unique(pred).size == 1:
        flags.append("constant_prediction")
    return values, flags


def _now() -> pd.Timestamp:
    return pd.Timestamp.now(tz="UTC").tz_localize(None)


def _task_id(space_id: str, embedding_ids: list[str], split_id: str, fold: int, params_key: str) -> str:
    # the evaluation grid's task identity, with this head's name
    text = json.dumps([space_id, sorted(embedding_ids), split_id, fold, LORA_HEAD, params_key])
    return hashlib.blake2b(text.encode(), digest_size=10).hexdigest()


def _head_predictions(st: Store, card: LoraCard, head: Any, embeddings: dict[str, str], test: pd.DataFrame) -> np.ndarray:
    """The tuned head's P(sensitive) for the test cells, from the stored tuned embeddings."""
    import torch

    proba = np.empty(len(test), np.float32)
    for dataset_id, group in test.groupby("dataset_id", sort=True):
        x = st.read_embedding(embeddings[str(dataset_id)], rows=group["row"].to_numpy(np.int64))
        device = next(head.parameters()).device
        with torch.inference_mode():
            p = torch.softmax(head(torch.from_numpy(x).to(device)).float(), dim=1)[:, 1]
        proba[group.index.to_numpy()] = p.cpu().numpy()
    return proba


def _write_results(st: Store, fold: _Fold, card: LoraCard, head: Any, embeddings: dict[str, str], space_id: str,
                   model: str, run_config: dict[str, Any], fit_seconds: float) -> None:
    """Store the tuned head's test predictions and metrics as a ``lora-mlp`` task (once)."""
    params_key = _head_params_key(card)
    emb_ids = sorted(embeddings.values())
    task_id = _task_id(space_id, emb_ids, fold.split_id, fold.fold, params_key)
    test, train = fold.test, fold.train
    t0 = time.perf_counter()
    proba = _head_predictions(st, card, head, embeddings, test)
    predict_s = time.perf_counter() - t0
    y = test["response"].to_numpy(np.int8)
    values, flags = _fold_metrics(y, proba)
    run_id = uuid.uuid4().hex[:16]
    common = {"task_id": task_id, "run_id": run_id, "space_id": space_id, "model": model, "variant": card.variant,
              "split_id": fold.split_id, "scenario": fold.scenario, "category_type": fold.category_type,
              "category": fold.category, "scheme": fold.scheme, "fold": fold.fold, "head": LORA_HEAD}
    tables = {
        "eval_runs": pd.DataFrame([{"run_id": run_id, "created_at": _now(), "finished_at": _now(), "status": "complete",
                                    "config": _canonical({"finetune": run_config}), "scdm_version": _version(), "n_tasks": 1,
                                    "n_done": 1, "n_reused": 0, "n_skipped": 0, "seconds": fit_seconds}]),
        "eval_predictions": pd.DataFrame({"task_id": task_id, "dataset_id": test["dataset_id"].to_numpy(),
                                          "row": test["row"].to_numpy(np.int32), "y_true": y, "proba": proba}),
        "eval_results": pd.DataFrame([{**common, "metric": m, "value": values[m], "n_train": len(train), "n_test": len(test),
                                       "fit_seconds": fit_seconds} for m in METRICS]),
        "eval_tasks": pd.DataFrame([{**common, "embedding_ids": json.dumps(emb_ids), "head_params": params_key,
                                     "n_train": len(train), "n_test": len(test), "n_test_pos": int(y.sum()),
                                     "fit_seconds": fit_seconds, "predict_seconds": predict_s,
                                     "flags": ",".join(flags) or None, "created_at": _now()}]),
    }
    with st.catalog.transaction() as con:  # one transaction: a task is stored whole or not at all
        con.execute("DELETE FROM eval_predictions WHERE task_id = ?", [task_id])
        con.execute("DELETE FROM eval_results WHERE task_id = ?", [task_id])
        for table, frame in tables.items():
            st.catalog.insert_df(table, frame, con)


def _head_params_key(card: LoraCard) -> str:
    """``eval_tasks.head_params`` of the tuned head: every training setting, the same for all folds of a protocol."""
    return _canonical({"tuning_id": card.tuning_id, **card.lora, **card.train})


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
    checkpoint: Path
    checkpoint_hash: str
    model_params: dict[str, Any]
    settings: _Settings
    device: str
    precision: str
    gradient_checkpointing: bool
    embed_batch_size: int | None
    progress: bool

    def adapter(self) -> Adapter:
        return get_adapter(self.model)(checkpoint=self.checkpoint, seed=self.settings.seed, **self.model_params)


def _identity(job: _Job, adapter: Adapter, fold: _Fold) -> tuple[str, str]:
    """(tuning_id, adapter_id): hashes of everything that decides the adapter's weights."""
    tuning_id = _short_hash("lora", CARD_VERSION, job.model, job.checkpoint_hash, adapter.params(), job.settings.seed,
                            fold.split_id, job.settings.lora_json(), job.settings.train_json(), gene_table_version())
    return tuning_id, _short_hash("adapter", tuning_id, fold.fold)


def _cached_card(st: Store, adapter_id: str, folder: Path) -> LoraCard | None:
    row = st.query("SELECT path FROM adapters WHERE adapter_id = ?", [adapter_id])
    if row.empty:
        return None
    if not (folder / CARD_FILE).is_file():
        logger.warning("adapter %s is in the catalog but its folder %s is gone; training it again", adapter_id, folder)
        st.execute("DELETE FROM adapters WHERE adapter_id = ?", [adapter_id])
        return None
    return read_lora_card(folder)


def _train_fold(job: _Job, fold: _Fold, adapter_id: str, tuning_id: str, folder: Path) -> LoraCard:
    st, settings = job.st, job.settings
    train = fold.train
    adapter = job.adapter()
    adapter.load(job.device)
    cells = _tokenize_cells(st, adapter, train)
    labels = train["response"].to_numpy(np.int64)
    if np.unique(labels).size < 2:
        msg = f"The training cells of fold {fold.fold} of split {fold.split_id} hold one class only; LoRA fine-tuning needs both."
        raise InputDataError(msg)
    trained = _train(adapter, cells, labels, settings, device=job.device, precision=job.precision,
                     gradient_checkpointing=job.gradient_checkpointing, progress=job.progress)
    where = {"split_id": fold.split_id, "fold": fold.fold, "scenario": fold.scenario, "category_type": fold.category_type,
             "category": fold.category}
    card = _card(trained, settings, adapter_id=adapter_id, tuning_id=tuning_id, checkpoint_hash=job.checkpoint_hash, **where)
    adapter_hash = _save(trained, folder, card)
    row = pd.DataFrame([{
        "adapter_id": adapter_id, "tuning_id": tuning_id, "adapter_hash": adapter_hash, "model": job.model,
        "checkpoint_hash": job.checkpoint_hash, "model_params": _canonical(card["model_params"]), "split_id": fold.split_id,
        "fold": fold.fold, "scenario": fold.scenario, "category_type": fold.category_type, "category": fold.category,
        "scheme": fold.scheme, "lora_config": _canonical({**settings.lora_json(), "matched_modules": trained.lora_modules}),
        "train_config": _canonical(settings.train_json()), "n_train": len(train), "train_cells_hash": _cells_hash(train),
        "train_curve": _canonical(trained.curve), "wall_seconds": trained.wall_s, "device": job.device,
        "telemetry": _canonical(trained.telemetry), "path": str(folder.relative_to(st.root)), "created_at": _now()}])
    with st.catalog.transaction() as con:  # the row goes in once the files are in place
        con.execute("DELETE FROM adapters WHERE adapter_id = ?", [adapter_id])
        st.catalog.insert_df("adapters", row, con)
    logger.info("saved adapter %s (%s, split %s fold %d) in %.1f s", adapter_id, job.model, fold.split_id, fold.fold, trained.wall_s)
    del trained, adapter
    _free_memory(job.device)
    return read_lora_card(folder)


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
    folder = st.root / ARTIFACTS_DIR / ADAPTERS_DIR / adapter_id
    card = _cached_card(st, adapter_id, folder)
    reused = card is not None
    if card is None:
        card = _train_fold(job, fold, adapter_id, tuning_id, folder)
    else:
        logger.info("adapter %s (%s, split %s fold %d) exists; not training again", adapter_id, job.model, fold.split_id, fold.fold)
    embeddings = _embed_tuned(job, fold, folder)
    row = st.query("SELECT train_curve, wall_seconds, device FROM adapters WHERE adapter_id = ?", [adapter_id]).iloc[0]
    task_id, metrics = _head_results(job, fold, card, embeddings, float(row["wall_seconds"]))
    return FinetuneResult(
        adapter_id=adapter_id, variant=card.variant, model=job.model, split_id=fold.split_id, scenario=fold.scenario,
        category_type=fold.category_type, category=fold.category, scheme=fold.scheme, fold=fold.fold,
        adapter_dir=str(folder), adapter_hash=card.adapter_hash, embedding_ids=tuple(embeddings.values()), task_id=task_id,
        metrics=metrics, n_train=len(fold.train), n_test=len(fold.test), reused=reused,
        train_curve=tuple(json.loads(row["train_curve"])), wall_s=float(row["wall_seconds"]), device=str(row["device"]))


def _embed_tuned(job: _Job, fold: _Fold, folder: Path) -> dict[str, str]:
    """Tuned embeddings of every dataset of the split, through the normal runner: dataset_id -> embedding_id."""
    from scdm_embed.runner import embed as run_embed

    embeddings = {}
    for dataset_id in sorted(fold.cells["dataset_id"].unique()):
        result = run_embed(job.st, str(dataset_id), job.model, job.checkpoint, batch_size=job.embed_batch_size,
                           device=job.device, precision=job.precision, seed=job.settings.seed, progress=job.progress,
                           lora_dir=folder, **job.model_params)
        embeddings[str(dataset_id)] = result.embedding_id
    return embeddings


def _head_results(job: _Job, fold: _Fold, card: LoraCard, embeddings: dict[str, str], fit_seconds: float) -> tuple[str, dict[str, float | None]]:
    """The ``lora-mlp`` task of the fold (written once): its id and metrics."""
    st = job.st
    space_id = str(st.embedding(next(iter(embeddings.values()))).space_id)  # one space: same model, adapter, params
    task_id = _task_id(space_id, list(embeddings.values()), fold.split_id, fold.fold, _head_params_key(card))
    if not len(st.query("SELECT 1 FROM eval_tasks WHERE task_id = ?", [task_id])):
        run_config = {"model": job.model, "checkpoint_hash": job.checkpoint_hash, "adapter_id": card.adapter_id,
                      "split_id": fold.split_id, "fold": fold.fold, **card.lora, **card.train}
        _write_results(st, fold, card, _load_head(card), embeddings, space_id, job.model, run_config, fit_seconds)
    frame = st.query("SELECT metric, value FROM eval_results WHERE task_id = ?", [task_id])
    values = {m: (None if pd.isna(v) else float(v)) for m, v in zip(frame["metric"], frame["value"])}
    return task_id, {m: values.get(m) for m in METRICS}


def _load_head(card: LoraCard) -> Any:
    from safetensors.torch import load_file

    head = build_head(card.emb_dim, int(card.train["head"]["hidden"]))
    head.load_state_dict(load_file(str(card.path / HEAD_FILE)))
    return head.eval().requires_grad_(False)


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
    **model_params: Any,
) -> list[FinetuneResult]:
    """LoRA-fine-tune ``model`` on the training cells of stored (split, fold)s; embed and score the tuned model.

    Parameters
    ----------
    store : Store or path
    model : str
        A registered foundation model (``scdm models``).
    checkpoint : path
        The model's checkpoint folder (official format).
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
    from scdm_embed.runner import checkpoint_hash, resolve_device, resolve_precision

    st = open_store(store)
    _check_settings(rank, alpha, dropout, epochs, lr, weight_decay, batch_size, fold, all_folds, scenario, by)
    names = [dataset] if isinstance(dataset, str) else list(dataset)
    if not names:
        msg = "No dataset given: pass dataset= (--dataset, repeatable) with the datasets the split covers."
        raise InputDataError(msg)
    infos = [st.dataset(n) for n in names]
    dataset_ids = sorted({i.dataset_id for i in infos})
    splits = _resolve_splits(st, dataset_ids, [i.name for i in infos], scenario=scenario, by=by, category=category,
                             split_id=split_id, scheme=scheme)
    folds = [f for _, split in splits.iterrows() for f in _resolve_folds(st, split, fold, all_folds)]

    probe = get_adapter(model)(checkpoint=checkpoint, seed=seed, **model_params)
    probe.check_checkpoint()
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    if isinstance(target_modules, str):  # one name or one regex
        target_modules = [target_modules]
    targets = tuple(target_modules) if target_modules is not None else tuple(probe.lora_target_modules)
    if not targets:
        msg = f"{model} names no LoRA target modules; pass target_modules= (--target-modules)."
        raise InputDataError(msg)
    settings = _Settings(rank=rank, alpha=float(alpha), dropout=float(dropout), target_modules=targets, epochs=epochs,
                         lr=float(lr), weight_decay=float(weight_decay), batch_size=batch_size or probe.default_batch_size,
                         precision=prec, seed=seed)
    job = _Job(st=st, model=model, checkpoint=Path(checkpoint), model_params=dict(model_params), settings=settings,
               checkpoint_hash=checkpoint_hash(Path(checkpoint), cache_dir=st.root / ARTIFACTS_DIR), device=dev,
               precision=prec, gradient_checkpointing=gradient_checkpointing, embed_batch_size=batch_size, progress=progress)
    results = []
    for f in folds:
        logger.info("fine-tuning %s on split %s (%s %s=%s) fold %d", model, f.split_id, f.scenario, f.category_type, f.category, f.fold)
        results.append(_finetune_fold(job, f))
    return results
