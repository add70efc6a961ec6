"""The scDEAL network, its losses, its training loop and integrated gradients (torch).

Two denoising autoencoders -- one per domain -- and a predictor on the latent space::

    source x_s --corrupt--> source encoder --> z_s --> predictor --> CE(y_s)
                                             z_s --> source decoder --> MSE(x_s)   (clean input)
    target x_t --corrupt--> target encoder --> z_t --> target decoder --> MSE(x_t)   (clean input)
    alpha * MMD(z_s, z_t)       multi-bandwidth RBF kernel
    beta  * cluster(z_t)        mean within-cluster cosine dissimilarity of target cells

The corruption of the denoising autoencoders is scDEAL's binomial masking noise by default (each
input value set to 0, the domain's minimum after MinMax scaling, with probability ``mask_rate``
= 0.2, as its ``train_DAE_model`` does); additive Gaussian noise (``noise_std``) is the option.

A target cell is predicted as ``predictor(target_encoder(x_t))``. Compared with the public scDEAL
code this fixes: the learning rate is the one passed (every optimiser); the joint optimiser holds
every module (source and target autoencoders and the predictor), so the classification, MMD and
cluster terms all train something; the cluster term is computed in torch on the target latent
and back-propagates into the target encoder; the denoising target is the clean input; and the
epoch kept is chosen on validation data that is not the evaluated target (source validation
cells, or a labelled target-validation set the caller provides).

Training runs in three stages: (1) both autoencoders learn to denoise their domain, (2) the source
encoder and the predictor learn the labels (scDEAL's bulk model), (3) everything trains jointly on
the loss above. ``adapt=False`` replaces stage 3 by the same number of epochs on the source loss
alone and predicts target cells through the source encoder: the same predictor without
adaptation, for comparisons.
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from scdm.classify.head_base import torch_seeded
from scdm.store.errors import InputDataError

logger = logging.getLogger(__name__)

__all__ = [
    "DenoisingAE",
    "LossParts",
    "Predictor",
    "TrainConfig",
    "TransferNet",
    "cluster_loss",
    "corrupt",
    "dae_loss",
    "fit_transfer",
    "integrated_gradients",
    "joint_loss",
    "make_optimizer",
    "mmd_rbf",
]

MMD_SCALES: tuple[float, ...] = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
"""Bandwidth multipliers of the MMD kernel, relative to the median pairwise squared distance."""


# --------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one transfer fit (saved with the run)."""

    alpha: float = 1.0
    """Weight of the MMD term."""
    beta: float = 0.1
    """Weight of the cluster regulariser."""
    rec_weight: float = 1.0
    """Weight of the two denoising reconstruction terms in the joint stage (0 = the paper's three terms)."""
    epochs: int = 50
    """Joint-stage epochs (an epoch = one pass over the larger of the two training sets)."""
    pretrain_epochs: int = 20
    """Epochs of each pre-training stage (autoencoders, then source predictor)."""
    lr: float = 1e-3
    """Adam learning rate of every stage."""
    weight_decay: float = 0.0
    """Adam weight decay."""
    batch_size: int = 128
    """Cells per domain per step."""
    hidden: tuple[int, ...] = (256, 128)
    """Encoder hidden layers (the decoder mirrors them)."""
    latent_dim: int = 32
    """Size of the shared latent space."""
    predictor_hidden: tuple[int, ...] = (16,)
    """Predictor hidden layers."""
    dropout: float = 0.1
    """Dropout after every hidden layer."""
    activation: str = "gelu"
    """Hidden-layer activation: ``gelu`` (smooth, so integrated gradients converge to machine
    precision with a few quadrature nodes) or ``relu`` (scDEAL's; its kinks slow the quadrature)."""
    corruption: str = "mask"
    """How the denoising autoencoders' inputs are corrupted: ``mask`` (scDEAL's binomial masking
    noise: each value set to 0 with probability ``mask_rate``) or ``gaussian`` (``+ N(0, noise_std^2)``)."""
    mask_rate: float = 0.2
    """Probability that an input value is masked (``corruption="mask"``; scDEAL uses 0.2)."""
    noise_std: float = 0.1
    """SD of the Gaussian noise added to the (MinMax-scaled) inputs (``corruption="gaussian"``)."""
    sigmoid_output: bool = True
    """Decoders end in a sigmoid (inputs are scaled to [0, 1])."""
    shared_encoder: bool = False
    """One encoder for both domains (its weights are shared by the two autoencoders, whose decoders
    stay separate); the MMD term then makes that encoder domain-invariant (DAN-style)."""
    target_init: str = "source"
    """``source``: the target autoencoder starts as a copy of the trained source autoencoder (when
    both domains have the same features), so adaptation refines a mapping that already carries
    the predictor's signal; ``random``: it starts from its own denoising pre-training (scDEAL)."""
    seed: int = 0
    """Seed of initialisation, noise and batch order."""

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


# --------------------------------------------------------------------------------------------
# networks
# --------------------------------------------------------------------------------------------
_ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU}


def _mlp(sizes: Sequence[int], dropout: float, activation: str = "gelu") -> list[nn.Module]:
    if activation not in _ACTIVATIONS:
        msg = f"activation={activation!r}: use one of {', '.join(_ACTIVATIONS)}."
        raise ValueError(msg)
    layers: list[nn.Module] = []
    for n_in, n_out in itertools.pairwise(sizes):
        layers += [nn.Linear(n_in, n_out), nn.BatchNorm1d(n_out), _ACTIVATIONS[activation](), nn.Dropout(dropout)]
    return layers


class DenoisingAE(nn.Module):
    """Encoder ``n_in -> hidden... -> latent`` and a mirrored decoder back to ``n_in``."""

    def __init__(self, n_in: int, hidden: Sequence[int], latent_dim: int, *, dropout: float = 0.1,
                 sigmoid_output: bool = True, activation: str = "gelu") -> None:
        super().__init__()
        hidden = list(hidden)
        self.encoder = nn.Sequential(*_mlp([n_in, *hidden], dropout, activation),
                                     nn.Linear(hidden[-1] if hidden else n_in, latent_dim))
        back = hidden[::-1]
        out: list[nn.Module] = [nn.Linear(back[-1] if back else latent_dim, n_in)]
        if sigmoid_output:
            out.append(nn.Sigmoid())
        self.decoder = nn.Sequential(*_mlp([latent_dim, *back], dropout, activation), *out)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


class Predictor(nn.Module):
    """Latent -> two logits (resistant, sensitive)."""

    def __init__(self, latent_dim: int, hidden: Sequence[int], *, dropout: float = 0.1, activation: str = "gelu") -> None:
        super().__init__()
        hidden = list(hidden)
        self.net = nn.Sequential(*_mlp([latent_dim, *hidden], dropout, activation), nn.Linear(hidden[-1] if hidden else latent_dim, 2))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class TransferNet(nn.Module):
    """Source and target denoising autoencoders and the predictor on the latent space."""

    def __init__(self, n_source: int, n_target: int, cfg: TrainConfig) -> None:
        super().__init__()
        self.source_ae = DenoisingAE(n_source, cfg.hidden, cfg.latent_dim, dropout=cfg.dropout,
                                     sigmoid_output=cfg.sigmoid_output, activation=cfg.activation)
        self.target_ae = DenoisingAE(n_target, cfg.hidden, cfg.latent_dim, dropout=cfg.dropout,
                                     sigmoid_output=cfg.sigmoid_output, activation=cfg.activation)
        if cfg.shared_encoder:
            if n_source != n_target:
                msg = f"shared_encoder needs the same features in both domains; got {n_source} and {n_target}."
                raise ValueError(msg)
            self.target_ae.encoder = self.source_ae.encoder
        self.shared = cfg.shared_encoder
        self.predictor = Predictor(cfg.latent_dim, cfg.predictor_hidden, dropout=cfg.dropout, activation=cfg.activation)
        self.adapted = True  # False: target cells go through the source encoder (no adaptation)

    def source_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.predictor(self.source_ae.encode(x))

    def target_encode(self, x: torch.Tensor) -> torch.Tensor:
        return (self.target_ae if self.adapted else self.source_ae).encode(x)

    def target_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.predictor(self.target_encode(x))

    def target_proba(self, x: torch.Tensor) -> torch.Tensor:
        """Probability that each target cell is sensitive (the output attributed to genes)."""
        return torch.softmax(self.target_logits(x), dim=1)[:, 1]


# --------------------------------------------------------------------------------------------
# losses
# --------------------------------------------------------------------------------------------
CORRUPTIONS: tuple[str, ...] = ("mask", "gaussian")
"""Corruptions of the denoising autoencoders' inputs (see :class:`TrainConfig`)."""


def corrupt(x: torch.Tensor, cfg: TrainConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """A corrupted copy of ``x``: binomial masking (``mask``) or additive Gaussian noise (``gaussian``).

    ``mask`` sets each value to 0 with probability ``cfg.mask_rate``; inputs are MinMax-scaled, so
    0 is the gene's lowest value in its domain (scDEAL's masking noise). ``gaussian`` adds
    N(0, ``cfg.noise_std``^2) to every value.
    """
    if cfg.corruption == "mask":
        keep = torch.rand(x.shape, generator=generator, dtype=x.dtype) >= cfg.mask_rate
        return x * keep
    if cfg.corruption == "gaussian":
        return x + torch.randn(x.shape, generator=generator, dtype=x.dtype) * cfg.noise_std
    msg = f"corruption={cfg.corruption!r}: use one of {', '.join(CORRUPTIONS)}."
    raise ValueError(msg)


def dae_loss(ae: DenoisingAE, x: torch.Tensor, cfg: TrainConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """Denoising loss: reconstruct the *clean* ``x`` from its corrupted copy (:func:`corrupt`).

    (scDEAL's ``train_DAE_model`` masks its input tensor in place, so it compares the output with
    the masked input; here the target is the clean input, which is what a denoising autoencoder learns.)
    """
    return F.mse_loss(ae(corrupt(x, cfg, generator)), x)


def mmd_rbf(zs: torch.Tensor, zt: torch.Tensor, scales: Sequence[float] = MMD_SCALES) -> torch.Tensor:
    """Squared MMD between two samples with a sum of RBF kernels (biased V-statistic, >= 0).

    The bandwidths are ``scales`` times the median pairwise squared distance of the pooled
    batch (detached, so the bandwidth adapts to the latent scale without being a shortcut for
    the gradient). Sample sizes may differ.
    """
    z = torch.cat([zs, zt], dim=0)
    d2 = torch.cdist(z, z).pow(2)
    n = z.shape[0]
    off = d2.detach()[~torch.eye(n, dtype=torch.bool)]
    base = torch.median(off) if off.numel() else torch.tensor(1.0)
    base = torch.clamp(base, min=1e-6)
    k = torch.stack([torch.exp(-d2 / (base * s)) for s in scales]).sum(dim=0)
    m = zs.shape[0]
    return k[:m, :m].mean() + k[m:, m:].mean() - 2.0 * k[:m, m:].mean()


def cluster_loss(z: torch.Tensor, clusters: torch.Tensor) -> torch.Tensor:
    """Mean within-cluster cosine dissimilarity of target latents (differentiable).

    For every cluster with at least two cells in the batch: the mean of ``1 - cos(z_i, z_j)``
    over its pairs ``i != j``; the loss is the mean over those clusters (0 if there is none).
    Minimising it pulls the cells of one cluster towards a common direction.
    """
    zn = F.normalize(z, dim=1, eps=1e-8)
    dissim = 1.0 - zn @ zn.T
    onehot = F.one_hot(clusters.long()).to(z.dtype)  # (b, k)
    same = (onehot @ onehot.T) * (1.0 - torch.eye(z.shape[0], dtype=z.dtype))
    sizes = onehot.sum(dim=0)
    pairs = sizes * (sizes - 1.0)
    per_cluster = onehot.T @ (dissim * same) @ onehot  # (k, k); the diagonal holds each cluster's sum
    present = pairs > 0
    if not bool(present.any()):
        return z.sum() * 0.0
    return (torch.diagonal(per_cluster)[present] / pairs[present]).mean()


@dataclass
class LossParts:
    """The terms of the joint loss of one step."""

    ce: torch.Tensor
    mmd: torch.Tensor
    cluster: torch.Tensor
    rec_source: torch.Tensor
    rec_target: torch.Tensor
    total: torch.Tensor

    def floats(self) -> dict[str, float]:
        return {k: float(getattr(self, k).detach()) for k in ("ce", "mmd", "cluster", "rec_source", "rec_target", "total")}


def joint_loss(net: TransferNet, xs: torch.Tensor, ys: torch.Tensor, xt: torch.Tensor, ct: torch.Tensor,
               cfg: TrainConfig, generator: torch.Generator | None = None) -> LossParts:
    """CE(source) + alpha * MMD(z_s, z_t) + beta * cluster(z_t) + rec_weight * (DAE_s + DAE_t).

    The encoders see the clean inputs for the CE, MMD and cluster terms and noisy inputs for the
    denoising terms (which reconstruct the clean inputs).
    """
    if net.shared:  # one pass: batch normalisation sees both domains, as its running statistics will
        z = net.source_ae.encode(torch.cat([xs, xt], dim=0))
        zs, zt = z[:xs.shape[0]], z[xs.shape[0]:]
    else:
        zs = net.source_ae.encode(xs)
        zt = net.target_ae.encode(xt)
    ce = F.cross_entropy(net.predictor(zs), ys)
    mmd = mmd_rbf(zs, zt)
    clu = cluster_loss(zt, ct)
    rec_s = dae_loss(net.source_ae, xs, cfg, generator)
    rec_t = dae_loss(net.target_ae, xt, cfg, generator)
    total = ce + cfg.alpha * mmd + cfg.beta * clu + cfg.rec_weight * (rec_s + rec_t)
    return LossParts(ce, mmd, clu, rec_s, rec_t, total)


def make_optimizer(modules: nn.Module | Sequence[nn.Module], cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam over every trainable parameter of ``modules`` with the configured learning rate."""
    mods = [modules] if isinstance(modules, nn.Module) else list(modules)
    params = [p for m in mods for p in m.parameters() if p.requires_grad]
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------
@dataclass
class Validation:
    """Labelled cells the kept epoch is chosen on: never the evaluated target cells."""

    X: np.ndarray
    y: np.ndarray
    domain: str  # "source" (source encoder) or "target" (target encoder)


@dataclass
class FitOutcome:
    """A trained network and how it got there."""

    net: TransferNet
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = -1
    best_score: float = math.nan


class _Batches:
    """Random mini-batches of row indices, reshuffled on every pass."""

    def __init__(self, n: int, batch_size: int, generator: torch.Generator) -> None:
        self.n, self.bs, self.gen = n, min(batch_size, n), generator
        self.order = torch.randperm(n, generator=generator)
        self.pos = 0

    def next(self) -> torch.Tensor:
        if self.pos + self.bs > self.n:
            self.order = torch.randperm(self.n, generator=self.gen)
            self.pos = 0
        rows = self.order[self.pos:self.pos + self.bs]
        self.pos += self.bs
        return rows


def _steps(n_a: int, n_b: int, bs: int) -> int:
    return max(1, math.ceil(max(n_a, n_b) / bs))


def fit_transfer(Xs: np.ndarray, ys: np.ndarray, Xt: np.ndarray, clusters: np.ndarray, cfg: TrainConfig, *,
                 validation: Validation | None, adapt: bool = True, progress: bool = False) -> FitOutcome:
    """Train the network (three stages, see the module docstring).

    Parameters
    ----------
    Xs, ys
        Source training cells (scaled, balanced) and labels.
    Xt
        Target cells (scaled); unlabelled.
    clusters
        Cluster of every target cell (for the cluster term).
    validation
        Labelled held-out cells the kept epoch is chosen on (lowest cross-entropy); None keeps
        the last epoch.
    adapt
        False: no target encoder training and no MMD/cluster term; target cells are predicted
        through the source encoder (the same predictor without adaptation).
    progress
        A bar over the epochs of all three stages (stderr; terminal or Jupyter).
    """
    from scdm.store.progress import progress_bar

    _check_batchable(Xs.shape[0], Xt.shape[0] if adapt else None)
    with torch_seeded(cfg.seed):  # dropout draws from the global generator: the whole fit holds it
        gen = torch.Generator().manual_seed(cfg.seed)
        net = TransferNet(Xs.shape[1], Xt.shape[1], cfg)
        xs, xt = torch.from_numpy(np.ascontiguousarray(Xs, np.float32)), torch.from_numpy(np.ascontiguousarray(Xt, np.float32))
        ys_t = torch.from_numpy(np.asarray(ys, np.int64))
        ct = torch.from_numpy(np.asarray(clusters, np.int64))
        out = FitOutcome(net)
        warm = cfg.target_init == "source" and Xs.shape[1] == Xt.shape[1] and not cfg.shared_encoder
        n_ae = 2 if adapt and not warm else 1
        with progress_bar(n_ae * cfg.pretrain_epochs + cfg.pretrain_epochs + cfg.epochs, desc="transfer", unit="epoch",
                          silent=not progress, leave=False) as bar:
            _pretrain_autoencoders(net, xs, xt, cfg, gen, out.history, n_ae == 2, bar)
            _pretrain_predictor(net, xs, ys_t, cfg, gen, out.history, validation, bar)
            if warm:
                net.target_ae.load_state_dict(net.source_ae.state_dict())
            _joint(net, xs, ys_t, xt, ct, cfg, gen, out, validation, adapt, bar)
    net.adapted = adapt
    net.eval()
    return out


def _check_batchable(n_source: int, n_target: int | None) -> None:
    """Refuse a side of one cell: its every batch would be that cell, and batch normalisation cannot train
    on one value per channel (torch raises a bare ValueError mid-fit)."""
    sides = [("source training", n_source)] + ([("target", n_target)] if n_target is not None else [])
    for side, n in sides:
        if n < 2:
            msg = (f"The transfer network needs at least 2 {side} cells to train (its layers normalise each batch); "
                   f"got {n}. Give more cells, or a fold / dataset with more than one cell.")
            raise InputDataError(msg)


def _pretrain_autoencoders(net: TransferNet, xs: torch.Tensor, xt: torch.Tensor, cfg: TrainConfig,
                           gen: torch.Generator, history: list[dict[str, Any]], with_target: bool, bar: Any) -> None:
    pairs = [("source", net.source_ae, xs)] + ([("target", net.target_ae, xt)] if with_target else [])
    for name, ae, x in pairs:
        opt = make_optimizer(ae, cfg)
        batches = _Batches(x.shape[0], cfg.batch_size, gen)
        for epoch in range(cfg.pretrain_epochs):
            ae.train()
            total = 0.0
            n_steps = _steps(x.shape[0], 0, cfg.batch_size)
            for _ in range(n_steps):
                loss = dae_loss(ae, x[batches.next()], cfg, gen)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach())
            history.append({"stage": f"pretrain_{name}_ae", "epoch": epoch, "rec": total / n_steps})
            bar.update(1)


def _pretrain_predictor(net: TransferNet, xs: torch.Tensor, ys: torch.Tensor, cfg: TrainConfig, gen: torch.Generator,
                        history: list[dict[str, Any]], validation: Validation | None, bar: Any) -> None:
    modules = [net.source_ae.encoder, net.predictor]
    opt = make_optimizer(modules, cfg)
    batches = _Batches(xs.shape[0], cfg.batch_size, gen)
    best, best_state = math.inf, None
    source_val = validation if validation is not None and validation.domain == "source" else None
    for epoch in range(cfg.pretrain_epochs):
        net.train()
        total = 0.0
        n_steps = _steps(xs.shape[0], 0, cfg.batch_size)
        for _ in range(n_steps):
            rows = batches.next()
            loss = F.cross_entropy(net.source_logits(xs[rows]), ys[rows])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach())
        record: dict[str, Any] = {"stage": "pretrain_predictor", "epoch": epoch, "ce": total / n_steps}
        if source_val is not None:
            record["val_ce"] = _val_ce(net, source_val, adapted=True)
            if record["val_ce"] < best:
                best, best_state = record["val_ce"], copy.deepcopy(net.state_dict())
        history.append(record)
        bar.update(1)
    if best_state is not None:
        net.load_state_dict(best_state)


def _joint(net: TransferNet, xs: torch.Tensor, ys: torch.Tensor, xt: torch.Tensor, ct: torch.Tensor, cfg: TrainConfig,
           gen: torch.Generator, out: FitOutcome, validation: Validation | None, adapt: bool, bar: Any) -> None:
    opt = make_optimizer(net, cfg)
    bs_s = _Batches(xs.shape[0], cfg.batch_size, gen)
    bs_t = _Batches(xt.shape[0], cfg.batch_size, gen)
    best, best_state = math.inf, None
    n_steps = _steps(xs.shape[0], xt.shape[0] if adapt else 0, cfg.batch_size)
    for epoch in range(cfg.epochs):
        net.train()
        sums: dict[str, float] = {}
        for _ in range(n_steps):
            rs = bs_s.next()
            if adapt:
                rt = bs_t.next()
                parts = joint_loss(net, xs[rs], ys[rs], xt[rt], ct[rt], cfg, gen)
                loss, values = parts.total, parts.floats()
            else:
                ce = F.cross_entropy(net.source_logits(xs[rs]), ys[rs])
                rec = dae_loss(net.source_ae, xs[rs], cfg, gen)
                loss = ce + cfg.rec_weight * rec
                values = {"ce": float(ce.detach()), "rec_source": float(rec.detach()), "total": float(loss.detach())}
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            for k, v in values.items():
                sums[k] = sums.get(k, 0.0) + v
        record: dict[str, Any] = {"stage": "joint" if adapt else "source_only", "epoch": epoch,
                                  **{k: v / n_steps for k, v in sums.items()}}
        if validation is not None:
            score = _val_ce(net, validation, adapted=adapt)
            record["val_ce"] = score
            if score < best:
                best, best_state, out.best_epoch = score, copy.deepcopy(net.state_dict()), epoch
        out.history.append(record)
        bar.update(1)
    if best_state is not None:
        net.load_state_dict(best_state)
        out.best_score = best
    else:
        out.best_epoch = cfg.epochs - 1


def _val_ce(net: TransferNet, val: Validation, *, adapted: bool) -> float:
    net.eval()
    x = torch.from_numpy(np.ascontiguousarray(val.X, np.float32))
    y = torch.from_numpy(np.asarray(val.y, np.int64))
    with torch.no_grad():
        if val.domain == "source":
            logits = net.source_logits(x)
        else:
            before = net.adapted
            net.adapted = adapted
            logits = net.target_logits(x)
            net.adapted = before
    return float(F.cross_entropy(logits, y))


# --------------------------------------------------------------------------------------------
# inference
# --------------------------------------------------------------------------------------------
def predict_target(net: TransferNet, X: np.ndarray, *, batch: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """Probability of sensitivity (float64) and latent vectors (float32) of target cells."""
    net.eval()
    logits, latents = [], []
    with torch.no_grad():
        for lo in range(0, X.shape[0], batch):
            x = torch.from_numpy(np.ascontiguousarray(X[lo:lo + batch], np.float32))
            z = net.target_encode(x)
            latents.append(z.numpy())
            logits.append(net.predictor(z).float())
    if not logits:
        latent_dim = int(net.predictor.net[0].in_features)  # type: ignore[arg-type]
        return np.zeros(0), np.zeros((0, latent_dim), np.float32)
    # the softmax in float64, from the logits: in float32 every cell past a logit gap of ~16.6 reads
    # exactly 1.0, tying an overconfident model's most sensitive cells in the target AUROC/AP (float64: ~36.7)
    proba = torch.softmax(torch.cat(logits).double(), dim=1)[:, 1].numpy()
    return proba, np.concatenate(latents).astype(np.float32)


def encode_source(net: TransferNet, X: np.ndarray, *, batch: int = 8192) -> np.ndarray:
    """Latent vectors of source cells."""
    net.eval()
    with torch.no_grad():
        out = [net.source_ae.encode(torch.from_numpy(np.ascontiguousarray(X[lo:lo + batch], np.float32))).numpy()
               for lo in range(0, X.shape[0], batch)]
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, 0), np.float32)


# --------------------------------------------------------------------------------------------
# integrated gradients
# --------------------------------------------------------------------------------------------
def integrated_gradients(f: Callable[[torch.Tensor], torch.Tensor], X: np.ndarray, *,
                         baseline: np.ndarray | None = None, n_steps: int = 64, max_steps: int = 1024,
                         rtol: float = 1e-3, atol: float = 1e-5, batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Integrated gradients of a scalar-per-row function, with a completeness guarantee.

    ``attr_ij = (x_ij - b_j) * integral_0^1 df/dx_j(b + a (x - b)) da``, the integral by
    Gauss-Legendre quadrature on ``n_steps`` nodes (Captum's default rule). Completeness --
    ``sum_j attr_ij = f(x_i) - f(b)`` -- holds exactly for the exact integral; the quadrature
    error is checked per row, and rows whose gap exceeds ``atol + rtol * |f(x_i) - f(b)|`` are
    recomputed with twice the nodes, up to ``max_steps``. For smooth networks (GELU, sigmoid)
    Gauss-Legendre converges exponentially, so the gap is at rounding level; ReLU kinks along
    the path slow it to O(1/n) (a warning names the rows left above tolerance).

    Parameters
    ----------
    f
        Maps a float64 tensor (n, n_features) to (n,); evaluated in float64 for accuracy.
    X : ndarray of shape (n, n_features)
    baseline : ndarray of shape (n_features,), optional
        Default zeros (Captum's default; for MinMax-scaled genes: every gene at its minimum).

    Returns
    -------
    attributions : ndarray of shape (n, n_features)
    delta : ndarray of shape (n,)
        ``sum(attributions) - (f(x) - f(baseline))`` per row: the remaining quadrature error.
    """
    X64 = np.asarray(X, np.float64)
    b = np.zeros(X64.shape[1]) if baseline is None else np.asarray(baseline, np.float64).ravel()
    attr = np.zeros_like(X64)
    delta = np.full(X64.shape[0], np.inf)
    with torch.no_grad():
        fx = _eval(f, X64, batch)
        fb = float(_eval(f, b[None, :], 1)[0])
    todo = np.arange(X64.shape[0])
    steps = int(n_steps)
    while todo.size:
        a, sums = _ig_fixed(f, X64[todo], b, steps, batch)
        attr[todo], delta[todo] = a, sums - (fx[todo] - fb)
        tol = atol + rtol * np.abs(fx[todo] - fb)
        todo = todo[np.abs(delta[todo]) > tol]
        if steps >= max_steps:
            break
        steps *= 2
    if todo.size:
        logger.warning("integrated gradients: %d rows keep a completeness gap above tolerance at %d steps (max %.2e)",
                       todo.size, steps, float(np.abs(delta[todo]).max()))
    return attr, delta


def _eval(f: Callable[[torch.Tensor], torch.Tensor], X: np.ndarray, batch: int) -> np.ndarray:
    out = [f(torch.from_numpy(X[lo:lo + batch])).detach().numpy().astype(np.float64).ravel()
           for lo in range(0, X.shape[0], batch)]
    return np.concatenate(out) if out else np.zeros(0)


def _ig_fixed(f: Callable[[torch.Tensor], torch.Tensor], X: np.ndarray, b: np.ndarray, steps: int,
              batch: int) -> tuple[np.ndarray, np.ndarray]:
    nodes, weights = np.polynomial.legendre.leggauss(steps)
    alphas = torch.from_numpy((nodes + 1.0) / 2.0)  # map [-1, 1] -> [0, 1]
    w = torch.from_numpy(weights / 2.0)
    diff = X - b
    grads = np.zeros_like(X)
    rows_per = max(1, (16 * batch) // steps)  # path points per backward pass ~ 16 * batch
    base = torch.from_numpy(b)[None, None, :]
    for lo in range(0, X.shape[0], rows_per):
        d = torch.from_numpy(diff[lo:lo + rows_per])[None, :, :]  # (1, rows, genes)
        points = (base + alphas[:, None, None] * d).reshape(-1, X.shape[1]).requires_grad_(True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(f(points).sum(), points)
        g = g.reshape(steps, d.shape[1], X.shape[1])
        grads[lo:lo + rows_per] = torch.einsum("s,srg->rg", w, g).numpy()
    attr = diff * grads
    return attr, attr.sum(axis=1)
