"""FAVOR+ Performer encoder as vendored (and modified) by scBERT and CellLM.

scBERT (``performer_pytorch/`` in TencentAILabHealthcare/scBERT) and CellLM
(``open_biomed/models/cell/performer_celllm.py`` in PharMolix/OpenBioMed) ship the same fork of
lucidrains' performer-pytorch. It differs from the PyPI package (see MODELS.md section 10); the
semantics kept here are:

* pre-LayerNorm blocks ``x + attn(norm(x))``, ``x + ff(norm(x))``; GELU feed-forward;
  ``to_q/to_k/to_v`` without bias, ``to_out`` with bias; no rotary or local attention;
* gene2vec positions stored as a frozen **float64** embedding and added to the float32 token
  embedding (the sum is formed in float64 and rounded to float32, as ``x += pos_emb(x)`` does);
* the softmax kernel ``ratio * (exp(x·P·d^-1/4 - |x|²/2·d^-1/2 - stab) + 1e-4)`` where the query
  stabiliser is the row max and the **key stabiliser is one max over the whole key tensor**;
* non-causal linear attention ``D^-1 · q'(k'ᵀv)`` with ``D = q'·Σk'``;
* projection matrices are buffers read from the checkpoint and never redrawn (the reference only
  redraws in train mode; fine-tuning here keeps the pretrained features fixed).

The key stabiliser cancels in ``D^-1 · q'(k'ᵀv)`` except through the ``+1e-4`` term, so it decides
how a cell's numbers depend on its batch mates. ``key_max="cell"`` takes the max over one cell's
tensor (what the reference computes when it runs one cell at a time, as scBERT's ``predict.py``
does) and makes every embedding independent of the batch. ``key_max="batch"`` takes it over the
whole batch tensor, reproducing a batched reference run exactly, at the price of a
dependence on the batch mates (through the eps term; 3e-4 on a tiny random model). The adapters'
``reference_quirks=True`` selects ``"batch"`` (:func:`resolve_key_max`).

Padding is described by two per-position tensors instead of one mask, so that CellLM's reference
behaviour (every cell padded to ``max_seq_len`` with pad keys inside the normaliser) can be
emulated exactly with a single weighted pad row: ``key_weight`` (how many keys a row stands for;
0 = batch padding, excluded everywhere) and ``value_mask`` (False = value zeroed, like the
reference's ``v.masked_fill_(~mask, 0)``).

Parameter and buffer names match the official checkpoints (``token_emb``, ``pos_emb.emb``,
``performer.net.layers.{i}.0.fn.to_q`` ..., ``performer.net.layers.{i}.1.fn.fn.w1`` ..., ``norm``).
The LM head ``to_out`` is not part of the encoder (fine-tuned checkpoints replace it with a
classifier); :func:`encoder_state_dict` drops it.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import numpy as np
import torch
from torch import nn

from scdm.embedding._adapter import GeneAudit, require_matches
from scdm.embedding._safe_load import damaged_torch_file
from scdm.store.errors import CheckpointError, InputDataError
from scdm.store.genes import as_gene_id_kind, map_genes

if TYPE_CHECKING:
    import scipy.sparse as sp

__all__ = [
    "KeyMax",
    "KEY_MAX_CHOICES",
    "PerformerConfig",
    "PerformerEncoder",
    "config_from_state_dict",
    "encoder_state_dict",
    "favor_attention",
    "load_state_dict_file",
    "random_state_dict",
    "load_encoder",
    "default_nb_features",
    "pooled",
    "align_to_gene_list",
    "log2_normalised_rows",
    "resolve_key_max",
]

logger = logging.getLogger(__name__)

KeyMax = Literal["cell", "batch"]
KEY_MAX_CHOICES: tuple[str, ...] = ("cell", "batch")

_KERNEL_EPS = 1e-4
"""The ``eps`` of the fork's ``softmax_kernel`` (added after the exponential)."""


# ---- FAVOR+ attention -----------------------------------------------------------------------
def _query_features(q: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    normalizer = q.shape[-1] ** -0.25
    ratio = projection.shape[0] ** -0.5
    dash = torch.einsum("...id,...jd->...ij", normalizer * q, projection)
    diag = (q**2).sum(dim=-1)
    diag = ((diag / 2.0) * (normalizer**2)).unsqueeze(-1)
    return ratio * (torch.exp(dash - diag - dash.amax(dim=-1, keepdim=True)) + _KERNEL_EPS)


def _key_features(
    k: torch.Tensor, projection: torch.Tensor, valid: torch.Tensor | None, key_max: KeyMax
) -> torch.Tensor:
    normalizer = k.shape[-1] ** -0.25
    ratio = projection.shape[0] ** -0.5
    dash = torch.einsum("...id,...jd->...ij", normalizer * k, projection)
    diag = (k**2).sum(dim=-1)
    diag = ((diag / 2.0) * (normalizer**2)).unsqueeze(-1)
    invalid = None if valid is None else ~valid[:, None, :, None]
    # the stabiliser is the max of the projections (before subtracting diag), as in the fork
    candidates = dash if invalid is None else dash.masked_fill(invalid, float("-inf"))
    stab = candidates.amax(dim=(1, 2, 3), keepdim=True) if key_max == "cell" else candidates.amax()
    exponent = dash - diag - stab
    if invalid is not None:
        # -inf before exp keeps batch padding finite in both the forward and the backward pass
        exponent = exponent.masked_fill(invalid, float("-inf"))
    return ratio * (torch.exp(exponent) + _KERNEL_EPS)


def favor_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    projection: torch.Tensor,
    *,
    key_weight: torch.Tensor | None = None,
    key_max: KeyMax = "cell",
) -> torch.Tensor:
    """Non-causal FAVOR+ attention with the scBERT/CellLM fork's softmax kernel.

    Parameters
    ----------
    q, k, v
        Tensors of shape (batch, heads, n, dim_head); values at masked positions must already
        be zero.
    projection
        Random-feature matrix of shape (nb_features, dim_head).
    key_weight
        Tensor of shape (batch, n): how many keys each row stands for (1 for a token, 0 for batch
        padding, ``m`` for one row standing for ``m`` identical pad tokens). None = all 1.
    key_max
        ``"cell"``: key stabiliser per cell; ``"batch"``: one stabiliser for the whole tensor.

    Returns
    -------
    Tensor of shape (batch, heads, n, dim_head), float32.
    """
    # exp/normaliser in reduced precision would swamp the 1e-4 kernel eps: always float32
    with torch.autocast(device_type=q.device.type, enabled=False):
        q, k, v, projection = q.float(), k.float(), v.float(), projection.float()
        valid = None if key_weight is None else key_weight > 0
        q_prime = _query_features(q, projection)
        k_prime = _key_features(k, projection, valid, key_max)
        if key_weight is not None:
            k_prime = k_prime * key_weight.float()[:, None, :, None]
        k_sum = k_prime.sum(dim=-2)
        d_inv = 1.0 / torch.einsum("...nd,...d->...n", q_prime, k_sum)
        context = torch.einsum("...nd,...ne->...de", k_prime, v)
        return torch.einsum("...de,...nd,...n->...ne", context, q_prime, d_inv)


# ---- modules (names follow the checkpoints) -------------------------------------------------
class FastAttention(nn.Module):
    """Holds the fixed random-feature ``projection_matrix`` buffer of one attention layer."""

    projection_matrix: torch.Tensor  # a registered buffer

    def __init__(self, dim_head: int, nb_features: int) -> None:
        super().__init__()
        self.register_buffer("projection_matrix", torch.zeros(nb_features, dim_head))

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, key_weight: torch.Tensor | None, key_max: KeyMax
    ) -> torch.Tensor:
        return favor_attention(q, k, v, self.projection_matrix, key_weight=key_weight, key_max=key_max)


class SelfAttention(nn.Module):
    """Multi-head FAVOR+ self-attention (``to_q/to_k/to_v`` without bias, ``to_out`` with bias)."""

    def __init__(self, dim: int, heads: int, dim_head: int, nb_features: int) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.fast_attention = FastAttention(dim_head, nb_features)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.Linear(inner, dim)

    def _split_heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.reshape(b, n, self.heads, -1).transpose(1, 2)

    def forward(
        self,
        x: torch.Tensor,
        *,
        key_weight: torch.Tensor | None = None,
        value_mask: torch.Tensor | None = None,
        key_max: KeyMax = "cell",
    ) -> torch.Tensor:
        q, k, v = (self._split_heads(f(x)) for f in (self.to_q, self.to_k, self.to_v))
        if value_mask is not None:
            v = v.masked_fill(~value_mask[:, None, :, None], 0.0)
        out = self.fast_attention(q, k, v, key_weight=key_weight, key_max=key_max)
        b, _, n, _ = out.shape
        out = out.transpose(1, 2).reshape(b, n, -1).to(x.dtype)
        return self.to_out(out)


class FeedForward(nn.Module):
    """``w2(gelu(w1(x)))``."""

    def __init__(self, dim: int, mult: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, dim * mult)
        self.act = nn.GELU()
        self.w2 = nn.Linear(dim * mult, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.act(self.w1(x)))


class Chunk(nn.Module):
    """The fork's ``Chunk(1, fn)`` wrapper; kept only for the ``.fn.fn.`` key names."""

    def __init__(self, fn: nn.Module) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


class PreLayerNorm(nn.Module):
    """``fn(norm(x))``."""

    def __init__(self, dim: int, fn: nn.Module) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fn = fn

    def forward(self, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return self.fn(self.norm(x), **kwargs)


class SequentialSequence(nn.Module):
    """Residual stack: ``x + attn(x)``, then ``x + ff(x)`` per layer."""

    def __init__(self, layers: nn.ModuleList) -> None:
        super().__init__()
        self.layers = layers

    def forward(self, x: torch.Tensor, **attn_kwargs: Any) -> torch.Tensor:
        for layer in self.layers:
            attn, ff = cast(nn.ModuleList, layer)  # each layer is ModuleList([attn, ff])
            x = x + attn(x, **attn_kwargs)
            x = x + ff(x)
        return x


class Performer(nn.Module):
    """Layer stack; ``calls_since_last_redraw`` is kept only because checkpoints hold it."""

    def __init__(self, cfg: PerformerConfig) -> None:
        super().__init__()
        layers = nn.ModuleList(
            nn.ModuleList(
                [
                    PreLayerNorm(cfg.dim, SelfAttention(cfg.dim, cfg.heads, cfg.dim_head, cfg.nb_features)),
                    PreLayerNorm(cfg.dim, Chunk(FeedForward(cfg.dim, cfg.ff_mult))),
                ]
            )
            for _ in range(cfg.depth)
        )
        self.net = SequentialSequence(layers)
        self.register_buffer("calls_since_last_redraw", torch.tensor(0))

    def forward(self, x: torch.Tensor, **attn_kwargs: Any) -> torch.Tensor:
        return self.net(x, **attn_kwargs)


class Gene2VecPositionalEmbedding(nn.Module):
    """Frozen float64 gene2vec table (plus the model's extra rows), looked up by position."""

    def __init__(self, n_positions: int, dim: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(n_positions, dim, dtype=torch.float64)
        self.emb.weight.requires_grad_(False)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return self.emb(positions)


@dataclass(frozen=True)
class PerformerConfig:
    """Shape of a scBERT/CellLM Performer (all read from the state dict)."""

    num_tokens: int
    """Rows of ``token_emb`` (scBERT 7, CellLM 8)."""
    dim: int
    """Model width (scBERT 200, CellLM 512)."""
    depth: int
    """Number of layers."""
    heads: int
    """Attention heads."""
    dim_head: int
    """Width of one head (64 in both models)."""
    nb_features: int
    """Random features per head (``int(dim_head * ln(dim_head))`` = 266)."""
    ff_mult: int
    """Feed-forward expansion (4)."""
    n_positions: int
    """Rows of the gene2vec position table."""


class PerformerEncoder(nn.Module):
    """``PerformerLM`` without its LM head: token + gene2vec embedding, layers, final norm."""

    def __init__(self, cfg: PerformerConfig) -> None:
        super().__init__()
        self.config = cfg
        self.token_emb = nn.Embedding(cfg.num_tokens, cfg.dim)
        self.pos_emb = Gene2VecPositionalEmbedding(cfg.n_positions, cfg.dim)
        self.performer = Performer(cfg)
        self.norm = nn.LayerNorm(cfg.dim)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        *,
        key_weight: torch.Tensor | None = None,
        value_mask: torch.Tensor | None = None,
        key_max: KeyMax = "cell",
    ) -> torch.Tensor:
        """Hidden states of shape (batch, n, dim) after the final LayerNorm.

        Parameters
        ----------
        input_ids, positions
            Long tensors of shape (batch, n): expression tokens and gene2vec rows.
        key_weight, value_mask, key_max
            See :func:`favor_attention` and the module docstring.
        """
        x = self.token_emb(input_ids)
        # the reference adds the float64 table in place into the float32 embedding
        x = (x.double() + self.pos_emb(positions)).to(x.dtype)
        x = self.performer(x, key_weight=key_weight, value_mask=value_mask, key_max=key_max)
        return self.norm(x)


# ---- checkpoint helpers ---------------------------------------------------------------------
def config_from_state_dict(state: dict[str, torch.Tensor], source: str) -> PerformerConfig:
    """Read the architecture from an official state dict.

    Raises
    ------
    CheckpointError
        If a key the architecture needs is absent (not a scBERT/CellLM Performer state dict).
    """
    needed = (
        "token_emb.weight",
        "pos_emb.emb.weight",
        "performer.net.layers.0.0.fn.to_q.weight",
        "performer.net.layers.0.0.fn.fast_attention.projection_matrix",
        "performer.net.layers.0.1.fn.fn.w1.weight",
    )
    for key in needed:
        if key not in state:
            msg = (
                f"{source} does not look like a scBERT/CellLM Performer checkpoint: key {key!r} is missing "
                f"(found e.g. {', '.join(list(state)[:5])}). Use the official file, unchanged."
            )
            raise CheckpointError(msg)
    num_tokens, dim = state["token_emb.weight"].shape
    depth = 1 + max(int(k.split(".")[3]) for k in state if k.startswith("performer.net.layers."))
    nb_features, dim_head = state["performer.net.layers.0.0.fn.fast_attention.projection_matrix"].shape
    inner = state["performer.net.layers.0.0.fn.to_q.weight"].shape[0]
    hidden = state["performer.net.layers.0.1.fn.fn.w1.weight"].shape[0]
    return PerformerConfig(
        num_tokens=int(num_tokens),
        dim=int(dim),
        depth=depth,
        heads=int(inner // dim_head),
        dim_head=int(dim_head),
        nb_features=int(nb_features),
        ff_mult=int(hidden // dim),
        n_positions=int(state["pos_emb.emb.weight"].shape[0]),
    )


def encoder_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The official state dict minus the LM/classifier head ``to_out.*`` (unused for embeddings)."""
    return {k: v for k, v in state.items() if not k.startswith("to_out.")}


def load_state_dict_file(path: Path, key: str = "model_state_dict") -> dict[str, torch.Tensor]:
    """Read ``torch.load(path)[key]`` without executing arbitrary pickled code.

    The official files also hold optimizer/scheduler state and a loss history; numpy scalars in
    them are allowed, anything else that needs code execution is refused with a way out.

    Raises
    ------
    CheckpointError
        If the file cannot be read safely or has no ``key``.
    """
    safe: list[Any] = [np.dtype, np.ndarray]
    for core in ("_core", "core"):  # numpy 2 / numpy 1 location of the scalar unpickler
        multiarray = getattr(getattr(np, core, None), "multiarray", None)
        if multiarray is not None and hasattr(multiarray, "scalar"):
            safe.append(multiarray.scalar)
            break
    safe.extend(type(np.dtype(t)) for t in ("float32", "float64", "int64", "int32", "bool"))
    # torch < 2.5 has no safe_globals: only its own weights-only set is admitted there (numpy scalars are refused)
    allow = getattr(torch.serialization, "safe_globals", None)
    try:
        with allow(safe) if allow is not None else contextlib.nullcontext():
            blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError/RuntimeError variants
        damaged = damaged_torch_file(path, err, "the official checkpoint file")
        if damaged is not None:
            raise damaged from err
        msg = (
            f"Cannot read {str(path)!r} safely ({type(err).__name__}: {str(err)[:300]}). If you trust the file, "
            f"re-save only its weights: torch.save({{'{key}': torch.load(p, weights_only=False)['{key}']}}, p)."
        )
        raise CheckpointError(msg) from err
    if not isinstance(blob, dict) or key not in blob:
        found = list(blob)[:8] if isinstance(blob, dict) else type(blob).__name__
        msg = f"{str(path)!r} has no {key!r} entry (found {found}); expected the official checkpoint file."
        raise CheckpointError(msg)
    return blob[key]


def load_encoder(model: PerformerEncoder, state: dict[str, torch.Tensor], source: str) -> None:
    """Strictly load an (official, ``to_out``-stripped) state dict into ``model``.

    Raises
    ------
    CheckpointError
        Naming missing or unexpected keys, or shape mismatches.
    """
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        msg = f"{source} does not match the Performer architecture it describes: {str(err)[:600]}"
        raise CheckpointError(msg) from err


def resolve_key_max(key_max: str | None, reference_quirks: bool, model: str) -> KeyMax:
    """The key stabiliser for an adapter: ``"batch"`` with ``reference_quirks``, else ``"cell"``.

    Raises
    ------
    InputDataError
        An unknown choice, a non-boolean ``reference_quirks``, or ``key_max="cell"`` together
        with ``reference_quirks=True`` (the reference's key max is over the batch).
    """
    if not isinstance(reference_quirks, bool):
        msg = f"{model} reference_quirks={reference_quirks!r} must be True or False."
        raise InputDataError(msg)
    if key_max is None:
        return "batch" if reference_quirks else "cell"
    if key_max not in KEY_MAX_CHOICES:
        msg = f"{model} key_max={key_max!r} is not supported; use one of {', '.join(KEY_MAX_CHOICES)}."
        raise InputDataError(msg)
    if reference_quirks and key_max != "batch":
        msg = (
            f"{model}: key_max={key_max!r} contradicts reference_quirks=True, which takes the reference's key max over "
            "the whole batch. Drop key_max, or drop reference_quirks for the batch-independent per-cell max."
        )
        raise InputDataError(msg)
    return key_max  # type: ignore[return-value]


# ---- tiny random checkpoints (tests and demo) -----------------------------------------------
def _gaussian_orthogonal(nb_rows: int, nb_cols: int, gen: torch.Generator) -> torch.Tensor:
    # the fork's gaussian_orthogonal_random_matrix (scaling 0): orthogonal blocks, chi row norms
    blocks = []
    for _ in range(math.ceil(nb_rows / nb_cols)):
        q, _ = torch.linalg.qr(torch.randn(nb_cols, nb_cols, generator=gen))
        blocks.append(q.T)
    matrix = torch.cat(blocks)[:nb_rows]
    norms = torch.randn(nb_rows, nb_cols, generator=gen).norm(dim=1)
    return norms[:, None] * matrix


def random_state_dict(cfg: PerformerConfig, position_table: np.ndarray, *, seed: int) -> dict[str, torch.Tensor]:
    """A random-initialised state dict with every key of the official ``PerformerLM``.

    ``position_table`` (float64, ``(n_positions, dim)``) becomes ``pos_emb.emb.weight``; the LM head
    ``to_out`` and ``performer.calls_since_last_redraw`` are included as in the real files.
    """
    with torch.random.fork_rng():  # leave the caller's global RNG untouched
        torch.manual_seed(seed)
        model = PerformerEncoder(cfg)
        head = nn.Linear(cfg.dim, cfg.num_tokens)
    gen = torch.Generator().manual_seed(seed + 1)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for i in range(cfg.depth):
        key = f"performer.net.layers.{i}.0.fn.fast_attention.projection_matrix"
        state[key] = _gaussian_orthogonal(cfg.nb_features, cfg.dim_head, gen)
    state["pos_emb.emb.weight"] = torch.from_numpy(np.asarray(position_table, dtype=np.float64).copy())
    state["to_out.weight"] = head.weight.detach().clone()
    state["to_out.bias"] = head.bias.detach().clone()
    return state


def default_nb_features(dim_head: int) -> int:
    """The fork's default number of random features, ``int(dim_head * ln(dim_head))``."""
    return int(dim_head * math.log(dim_head))


def pooled(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden`` (batch, n, dim) over positions where ``mask`` (batch, n) is True, in float32."""
    weights = mask.to(torch.float32).unsqueeze(-1)
    return (hidden.float() * weights).sum(1) / weights.sum(1).clamp(min=1.0)



# ---- preprocessing shared by scBERT and CellLM ----------------------------------------------
def align_to_gene_list(
    var_genes: Sequence[str], gene_id_kind: str, model_genes: Sequence[str], model: str
) -> tuple[np.ndarray, np.ndarray, GeneAudit]:
    """Match a dataset's genes to a model's symbol list, as scBERT's ``preprocess.py`` does.

    Symbols are matched exactly; other id kinds are first mapped to symbols with the shipped
    table. When several dataset columns carry the same model gene the first one is used (the
    reference takes ``obj.index(gene)``).

    Returns
    -------
    cols, model_idx, audit
        ``x[:, cols]`` holds model genes ``model_idx`` (both int64 arrays), and the audit.

    Raises
    ------
    GeneMappingError
        If no dataset gene is in the model's list.
    """
    ids = [str(g) for g in var_genes]
    symbols = list(ids) if gene_id_kind == "symbol" else list(map_genes(ids, src=as_gene_id_kind(gene_id_kind), dst="symbol"))
    index = {g: i for i, g in enumerate(model_genes)}
    cols: list[int] = []
    model_idx: list[int] = []
    seen: set[int] = set()
    unmatched: list[str] = []
    n_duplicates = 0
    for col, symbol in enumerate(symbols):
        pos = index.get(symbol) if symbol is not None else None
        if pos is None:
            if len(unmatched) < 20:
                unmatched.append(ids[col])
        elif pos in seen:
            n_duplicates += 1
        else:
            seen.add(pos)
            cols.append(col)
            model_idx.append(pos)
    audit = GeneAudit(
        n_input_genes=len(ids),
        n_matched=len(cols),
        unmatched_examples=tuple(unmatched),
        id_kind_used="symbol",
        extra={
            "n_model_genes": len(model_genes),
            "fraction_model_genes_covered": round(len(cols) / max(len(model_genes), 1), 6),
            "n_duplicate_columns_ignored": n_duplicates,
        },
    )
    require_matches(audit, model, min_genes=1)
    return np.asarray(cols, dtype=np.int64), np.asarray(model_idx, dtype=np.int64), audit


def log2_normalised_rows(
    x: sp.csr_matrix, cols: np.ndarray, model_idx: np.ndarray, *, target_sum: float
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per cell: model gene indices (ascending) and ``log2(1 + counts / total * target_sum)`` > 0.

    ``total`` is the cell's count over the matched genes only: the reference aligns the matrix to
    the model's gene list first and then runs ``normalize_total`` and ``log1p(base=2)``. Computed in
    float64, so a token boundary (``x`` = 1, 3, 7, 15, 31 after scaling) is not blurred by float32
    rounding the way scanpy's float32 pipeline may blur it.
    """
    sub = x[:, cols].tocsr()
    sub.sort_indices()
    out = []
    for row in range(sub.shape[0]):
        start, end = sub.indptr[row], sub.indptr[row + 1]
        values = sub.data[start:end].astype(np.float64)
        genes = model_idx[sub.indices[start:end]]
        keep = values > 0
        values, genes = values[keep], genes[keep]
        total = values.sum()
        if total > 0:
            values = np.log1p(values / total * target_sum) / np.log(2.0)
        order = np.argsort(genes, kind="stable")
        out.append((genes[order], values[order]))
    return out
