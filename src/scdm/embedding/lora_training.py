"""The LoRA training loop: put LoRA on a foundation model, train it with the scDrugMap MLP head.

:func:`train_lora` wraps a loaded adapter's model with peft LoRA on its target modules and adds
the scDrugMap MLP head (:func:`build_head`); it trains LoRA + head with cross-entropy (AdamW),
with the base weights frozen. It checks that LoRA really trains: after the first optimiser steps
every LoRA matrix must have had a non-zero gradient and every B matrix must have moved from zero
(a LoRA layer whose output never reaches the embedding stops the run with an error naming the
module), and after training LoRA must change the eval-mode embedding.

Where the trained adapter is saved is :mod:`scdm.embedding.lora_card`; which cells it trains on is
:mod:`scdm.embedding.finetune`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from scdm.embedding._adapter import Adapter
from scdm.store.errors import CheckpointError, ScdmError, ScdmWarning
from scdm.store.warning_scopes import ignoring

if TYPE_CHECKING:
    import torch

__all__ = [
    "LORA_HEAD",
    "LoraTrainingError",
    "TrainSettings",
    "TrainedLora",
    "build_head",
    "lora_matrices",
    "quiet_peft",
    "train_lora",
]

logger = logging.getLogger(__name__)

LORA_HEAD = "lora-mlp"
"""Head name of the fine-tuned classifier's own results in ``eval_results``."""
_CHECK_STEPS = 2
"""Optimiser steps after which the LoRA gradients are checked (B starts at zero, so A first gets a
gradient on the second step)."""


class LoraTrainingError(ScdmError, RuntimeError):
    """LoRA is not training (a module gets no gradient, or LoRA does not change the embedding)."""


@dataclass(frozen=True)
class TrainSettings:
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
        """The LoRA settings as recorded in the adapter's card and catalog row."""
        return {"r": self.rank, "alpha": self.alpha, "dropout": self.dropout, "target_modules": list(self.target_modules)}

    def train_json(self) -> dict[str, Any]:
        """The training settings (optimiser, loss, head) as recorded in the card and catalog row."""
        return {"epochs": self.epochs, "lr": self.lr, "weight_decay": self.weight_decay, "batch_size": self.batch_size,
                "precision": self.precision, "seed": self.seed, "optimizer": "AdamW", "loss": "cross_entropy",
                "head": {"name": LORA_HEAD, "layers": "Linear(D,h)-ReLU-Linear(h,h)-ReLU-Linear(h,2)", "hidden": self.hidden}}


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


def lora_matrices(model: torch.nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(A, B) of every LoRA layer, by module name."""
    from peft.tuners.lora import LoraLayer

    out: dict[str, tuple[Any, Any]] = {}
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
        self.matrices = lora_matrices(model)
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
class TrainedLora:
    """A LoRA-wrapped adapter and its head after training (in eval mode), as :func:`train_lora` returns them."""

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
def quiet_peft() -> Iterator[None]:
    """peft asks transformers 5 models for a deprecated property; that FutureWarning is not the user's to fix."""
    with ignoring(FutureWarning, message=".*is_gradient_checkpointing.*"):
        yield


def _wrap(adapter: Adapter, settings: TrainSettings, device: str) -> tuple[Any, Any, list[str]]:
    """Put LoRA on the adapter's target modules (in place) and build the head: (peft model, head, matched names)."""
    import torch
    from peft import LoraConfig, get_peft_model

    assert adapter.model is not None
    matched = _matched_modules(adapter.model, settings.target_modules, adapter.name)
    modules = dict(adapter.model.named_modules())
    # peft annotates lora_alpha as int but only divides by r: a float alpha scales as given
    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout, bias="none",  # type: ignore[arg-type]
                        target_modules=_peft_targets(settings.target_modules),
                        # GPT-2 style Conv1D stores its weight transposed
                        fan_in_fan_out=any(type(modules[n]).__name__ == "Conv1D" for n in matched))
    torch.manual_seed(settings.seed)
    with quiet_peft():
        peft_model = get_peft_model(adapter.model, config)  # injects LoRA into adapter.model in place
    head = build_head(adapter.emb_dim, settings.hidden)
    return peft_model.to(device), head.to(device), matched


def train_lora(adapter: Adapter, cells: list[dict[str, np.ndarray]], labels: np.ndarray, settings: TrainSettings, *,
               device: str, precision: str, gradient_checkpointing: bool, progress: bool) -> TrainedLora:
    """Wrap ``adapter.model`` (loaded) with LoRA, train LoRA + head on the cells, return both in eval mode.

    Parameters
    ----------
    adapter : Adapter
        A loaded adapter; LoRA is injected into its model in place.
    cells : list of dict
        The training cells, tokenised by ``adapter.tokenize``.
    labels : numpy.ndarray
        Their responses (1 = sensitive, 0 = resistant).
    settings : TrainSettings
        LoRA and training settings.
    device, precision : str
        A resolved device (``cpu``, ``cuda:0``) and precision (``fp32``, ``bf16``, ``fp16``).
    gradient_checkpointing : bool
        Trade compute for memory where the model supports it (others warn).
    progress : bool
        Show a progress bar.

    Returns
    -------
    TrainedLora
        The wrapped model and head in eval mode, the matched LoRA modules, the training curve,
        wall time and telemetry.

    Raises
    ------
    CheckpointError
        A target module is not in the architecture, or cannot be wrapped.
    LoraTrainingError
        A LoRA module receives no gradient, or LoRA does not change the embedding.
    """
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
    return TrainedLora(adapter, peft_model, head, matched, curve, wall, telemetry)


def _fit(adapter: Adapter, head: Any, cells: list[dict[str, np.ndarray]], labels: np.ndarray, settings: TrainSettings, opt: Any,
         state: dict[str, Any], device: str, precision: str, progress: bool) -> list[dict[str, float]]:
    """The epochs: shuffled batches, one optimiser step each; the LoRA check after the first steps."""
    import torch

    from scdm.store.progress import progress_bar

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
