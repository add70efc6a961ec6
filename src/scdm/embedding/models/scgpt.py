"""scGPT (bowang-lab/scGPT): a post-LN transformer over (gene, binned expression) tokens.

Checkpoint folder, exactly as the scGPT "Model Zoo" Google Drive folders ship it::

    best_model.pt   plain state_dict (official files use flash-attn ``self_attn.Wqkv`` keys)
    args.json       training arguments (embsize, nheads, d_hid, nlayers, pad_token, pad_value, ...)
    vocab.json      {gene_symbol: id}; ``<pad>``, ``<cls>``, ``<eoc>`` are appended when missing

What one cell becomes (``scgpt.tasks.embed_data``, MODELS.md section 2):

1. the dataset's genes are matched to the vocabulary by HGNC symbol; the values of ``X`` are
   used as given (no normalisation). Raw counts and log-normalised values (the reference's
   fine-tuning ``Preprocessor``: ``normalize_total`` + ``log1p``) give the same tokens, because
   the per-cell quantile binning below sees only each cell's order of values; scaled (negative)
   values are refused;
2. the cell's non-zero genes, prefixed by ``<cls>`` whose value is ``pad_value`` (-2);
3. the non-zero values are binned per cell into 51 bins: ``bins = quantile(values,
   linspace(0, 1, 50))`` and each value gets a uniformly random bin between
   ``digitize(v, bins)`` and ``digitize(v, bins, right=True)`` (rounded up), so tied values are
   spread over the bins they span;
4. at most ``max_length`` tokens (``<cls>`` + 1199 genes by default): larger cells keep a random
   subset of genes, drawn after binning;
5. gene embedding (+ LayerNorm) + continuous value embedding -> post-LN transformer ->
   the last layer's ``<cls>`` vector, L2-normalised (512-d for whole-human).

Where the default differs from the reference, on purpose (``reference_quirks=False``):

* Random draws (bin tie-breaks, gene subsample) come from ``numpy.random.default_rng([seed,
  row])``, one generator per cell, so a cell's tokens do not depend on chunking, batching,
  resuming or DataLoader workers; they are a draw from the same distribution as the reference's.
* A subsampled cell keeps its genes in dataset order (the reference shuffles them). scGPT has no
  positional encoding, so the order changes the embedding only by float rounding.

``reference_quirks=True`` draws the way the reference's collator does: bin tie-breaks from one
legacy ``numpy.random.RandomState(seed)`` stream (``np.random.rand``) and the subsample from one
``torch.Generator`` seeded with ``seed`` (``torch.randperm``, genes kept in permutation order,
after the one int64 draw a DataLoader iterator takes), both consumed cell by cell in row order.
That is bit-for-bit the reference collator run in one process after ``np.random.seed(seed);
torch.manual_seed(seed)``. ``embed_data`` itself collates in ``min(#CPUs, batch_size)`` DataLoader
worker processes, each re-seeded from a base seed, so its exact draws depend on the machine's
CPU count and are not replayed. Even in one process, ``embed_data`` builds the model before its
DataLoader, and the model's initialisation draws from the global torch RNG (how much depends on
the architecture): after ``torch.manual_seed(seed)`` its gene subsample of cells with more genes
than ``max_length`` starts at another point of the torch stream, so quirk mode does not replay it.
Its bin tie-breaks (the numpy stream, which building the model does not touch) are replayed. Because the stream runs in row order, quirk-mode tokenisation
must start at row 0 and see every chunk in order in one process (``workers=0``, no resume of a
partial run): :meth:`ScGPTAdapter.tokenize` refuses anything else rather than draw wrong numbers.

In both modes a cell with no counts over the vocabulary is refused (the reference crashes in
``binning``), and padding is a boolean key mask, as in the reference.

``best_model.pt`` is read with ``torch.load(weights_only=True)`` (:mod:`scdm.embedding._safe_load`):
a file that asks to unpickle anything but tensors and plain values is refused, never run.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from scdm.embedding._adapter import (
    Adapter,
    GeneAudit,
    register_adapter,
    require_matches,
)
from scdm.embedding._safe_load import load_torch_file
from scdm.embedding.models._common import check_expression, half_dtype, hold_weights_in, require_int_param
from scdm.store.errors import CheckpointError, InputDataError

if TYPE_CHECKING:
    import scipy.sparse as sp

__all__ = ["ReferenceStream", "ScGPTAdapter", "ScGPTModel", "write_tiny_checkpoint"]

logger = logging.getLogger(__name__)

MODEL_FILE = "best_model.pt"
ARGS_FILE = "args.json"
VOCAB_FILE = "vocab.json"
SPECIAL_TOKENS = ("<pad>", "<cls>", "<eoc>")
N_BINS = 51  # hard-coded in scGPT's DataCollator, whatever args.json says
MAX_VALUE = 512  # ContinuousValueEncoder clamps its input to this
_USED_PREFIXES = ("encoder.", "value_encoder.", "transformer_encoder.")
_WQKV_RENAMES = (  # flash-attn v1 FlashMHA -> torch MultiheadAttention names (same [3d, d] layout)
    ("self_attn._impl.Wqkv.", "self_attn.in_proj_"),
    ("self_attn.Wqkv.", "self_attn.in_proj_"),
    ("self_attn._impl.out_proj.", "self_attn.out_proj."),
)


# ---- model -------------------------------------------------------------------------------------
class SelfAttention(nn.Module):
    """Multi-head self-attention with ``nn.MultiheadAttention``'s parameter names, run by SDPA.

    ``out_proj`` is a real ``nn.Linear`` called through its ``forward``, so LoRA can target it
    (a stock ``nn.MultiheadAttention`` reads ``out_proj.weight`` directly and would bypass it).
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if d_model % n_heads:
            msg = f"d_model={d_model} is not divisible by n_heads={n_heads}."
            raise CheckpointError(msg)
        self.n_heads = n_heads
        self.dropout = dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * d_model, d_model))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * d_model))
        self.out_proj = nn.Linear(d_model, d_model)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor:
        n, length, d_model = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.view(n, length, 3, self.n_heads, d_model // self.n_heads).permute(2, 0, 3, 1, 4)
        # boolean mask: True = attend; padded keys are excluded exactly (no additive bias)
        keep = None if padding_mask is None else ~padding_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).reshape(n, length, d_model))


class EncoderLayer(nn.Module):
    """Post-LN transformer layer with ReLU, named like ``nn.TransformerEncoderLayer``."""

    def __init__(self, d_model: int, n_heads: int, d_hid: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = SelfAttention(d_model, n_heads, dropout)
        self.linear1 = nn.Linear(d_model, d_hid)
        self.linear2 = nn.Linear(d_hid, d_model)
        self.norm1 = nn.LayerNorm(d_model, eps=1e-5)
        self.norm2 = nn.LayerNorm(d_model, eps=1e-5)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor:
        x = self.norm1(x + self.dropout(self.self_attn(x, padding_mask)))
        return self.norm2(x + self.dropout(self.linear2(self.dropout(F.relu(self.linear1(x))))))


class TransformerEncoder(nn.Module):
    """Stack of layers at ``transformer_encoder.layers.{i}`` (the official key prefix)."""

    def __init__(self, n_layers: int, d_model: int, n_heads: int, d_hid: int, dropout: float) -> None:
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(d_model, n_heads, d_hid, dropout) for _ in range(n_layers))

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, padding_mask)
        return x


class GeneEncoder(nn.Module):
    """Gene-id embedding followed by LayerNorm (``encoder.embedding``, ``encoder.enc_norm``)."""

    def __init__(self, n_tokens: int, d_model: int, padding_idx: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(n_tokens, d_model, padding_idx=padding_idx)
        self.enc_norm = nn.LayerNorm(d_model)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.enc_norm(self.embedding(ids))


class ContinuousValueEncoder(nn.Module):
    """Expression value -> vector: clamp(max=512) -> Linear(1, d) -> ReLU -> Linear -> LayerNorm."""

    def __init__(self, d_model: int, dropout: float) -> None:
        super().__init__()
        self.linear1 = nn.Linear(1, d_model)
        self.linear2 = nn.Linear(d_model, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        x = torch.clamp(values.unsqueeze(-1), max=MAX_VALUE)
        return self.dropout(self.norm(self.linear2(F.relu(self.linear1(x)))))


class ScGPTModel(nn.Module):
    """The embedding part of scGPT's ``TransformerModel`` (heads are not built).

    Parameters
    ----------
    n_tokens, d_model, n_heads, d_hid, n_layers
        Vocabulary size and ``args.json``'s ``embsize``, ``nheads``, ``d_hid``, ``nlayers``.
    pad_id
        Vocabulary id of ``<pad>`` (the embedding's ``padding_idx``).
    dropout
        ``args.json``'s ``dropout`` (only active in training mode).
    """

    def __init__(self, *, n_tokens: int, d_model: int, n_heads: int, d_hid: int, n_layers: int, pad_id: int, dropout: float = 0.2) -> None:
        super().__init__()
        self.encoder = GeneEncoder(n_tokens, d_model, pad_id)
        self.value_encoder = ContinuousValueEncoder(d_model, dropout)
        self.transformer_encoder = TransformerEncoder(n_layers, d_model, n_heads, d_hid, dropout)

    def forward(self, input_ids: torch.Tensor, values: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor:
        """Hidden states of the last layer, shape (n_cells, n_tokens, d_model)."""
        x = self.encoder(input_ids) + self.value_encoder(values)
        return self.transformer_encoder(x, padding_mask)


# ---- tokenisation ------------------------------------------------------------------------------
def bin_values(values: np.ndarray, rng: np.random.Generator | np.random.RandomState, n_bins: int = N_BINS) -> np.ndarray:
    """scGPT's per-cell quantile binning of positive values into bins 1..n_bins-1.

    Parameters
    ----------
    values
        ndarray of shape (n_genes,): the cell's non-zero expression values (float32).
    rng
        Source of the uniform numbers that break ties between equal bin edges.
    n_bins
        51 in scGPT (bin 0 is reserved for zero expression).

    Returns
    -------
    ndarray of float32, shape (n_genes,)
    """
    bins = np.quantile(values, np.linspace(0, 1, n_bins - 1))
    left = np.digitize(values, bins)
    right = np.digitize(values, bins, right=True)
    spread = rng.random(len(values)) * (right - left) + left
    return np.ceil(spread).astype(np.int64).astype(np.float32)


class ReferenceStream:
    """The reference's global RNGs, replayed: seeded once, then consumed cell by cell in row order.

    ``numpy`` holds ``np.random.RandomState(seed)`` (what ``np.random.rand`` draws from after
    ``np.random.seed(seed)``); ``torch`` a generator seeded with ``seed`` that has already made the
    one int64 draw a ``DataLoader`` iterator takes for its base seed.
    """

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)
        self.numpy: np.random.RandomState | None = None
        self.torch: torch.Generator | None = None
        self.next_row: int | None = None

    def advance_to(self, rows: np.ndarray, model: str) -> None:
        """Check that ``rows`` continue the stream (row 0 restarts it), then claim them.

        Raises
        ------
        InputDataError
            If the rows do not start at 0 or right after the last rows drawn for, or are not
            consecutive: the draws for them would differ from the reference's.
        """
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) == 0:
            return
        first = int(rows[0])
        if first == 0:
            self.numpy = np.random.RandomState(self.seed)
            self.torch = torch.Generator().manual_seed(self.seed)
            torch.empty((), dtype=torch.int64).random_(generator=self.torch)  # the DataLoader's base-seed draw
        elif first != self.next_row:
            msg = (
                f"{model} with reference_quirks=True draws its random numbers from one stream in cell order, as the "
                f"reference does, so cells must be tokenised in row order from row 0 in one process; got rows from "
                f"{first} after {'nothing' if self.next_row is None else f'row {self.next_row - 1}'}. Embed with "
                "workers=0 and from scratch (delete the partial embedding), or use the default mode, which can resume."
            )
            raise InputDataError(msg)
        if len(rows) > 1 and not np.all(np.diff(rows) == 1):
            msg = f"{model} with reference_quirks=True needs consecutive rows in one call; got {rows[:5].tolist()}..."
            raise InputDataError(msg)
        self.next_row = int(rows[-1]) + 1


# ---- adapter -----------------------------------------------------------------------------------
def _read_json_object(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from a checkpoint folder, or a CheckpointError naming the file (a truncated or
    edited file would otherwise surface as a bare JSONDecodeError or AttributeError)."""
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        msg = f"Cannot read {str(path)!r} as {what} ({err}); re-download the model folder."
        raise CheckpointError(msg) from None
    if not isinstance(value, dict):
        msg = f"{str(path)!r} holds a JSON {type(value).__name__}, not the object {what} is; re-download the model folder."
        raise CheckpointError(msg)
    return value


@register_adapter
class ScGPTAdapter(Adapter):
    """scGPT cell embeddings: CLS token of the last layer, L2-normalised.

    Parameters
    ----------
    checkpoint
        Folder with ``best_model.pt``, ``args.json`` and ``vocab.json``.
    seed
        Seeds the per-cell bin tie-breaks and gene subsample (with the cell's row index).
    max_length
        Tokens per cell including ``<cls>`` (``embed_data``'s ``max_length``; 1200 = CLS + 1199
        genes).
    reference_quirks
        Draw tie-breaks and subsamples from one RNG stream in cell order, as the reference does
        (see the module docstring); default: per-cell generators seeded by ``(seed, row)``.
    """

    name = "scgpt"
    description = "scGPT (bowang-lab): CLS of the last layer, L2-normalised; binned non-zero genes, <=1200 tokens"
    gene_id_kind = "symbol"
    # binning keeps only each cell's order of values: counts and log-normalised values are the same input
    requires_counts = False
    ranks_expression = True
    checkpoint_files = (MODEL_FILE, ARGS_FILE, VOCAB_FILE)
    # a regex (peft full-match): `linear1`/`linear2` alone would also hit value_encoder.linear1/2
    lora_target_modules = (r".*transformer_encoder\.layers\.\d+\.(self_attn\.out_proj|linear1|linear2)",)
    default_batch_size = 32
    half_precision_weights = True

    def __init__(
        self, checkpoint: str | Path | None = None, *, seed: int = 0, max_length: int = 1200, reference_quirks: bool = False
    ) -> None:
        super().__init__(checkpoint, seed=seed)
        if require_int_param("scgpt", "max_length", max_length) < 2:
            msg = f"max_length={max_length} leaves no room for genes after <cls>; use at least 2 (scGPT default 1200)."
            raise InputDataError(msg)
        if not isinstance(reference_quirks, bool):
            msg = f"scgpt reference_quirks={reference_quirks!r} must be True or False."
            raise InputDataError(msg)
        self.max_length = int(max_length)
        self.reference_quirks = reference_quirks
        # quirk mode draws from one stream in row order: chunks must be tokenised in order, in one process
        self.sequential_tokenize = reference_quirks
        self._stream = ReferenceStream(seed)
        self._args: dict[str, Any] | None = None
        self._vocab: dict[str, int] | None = None
        self._gene_ids: np.ndarray | None = None  # vocab id per dataset column, -1 = unknown

    # ---- checkpoint files -----------------------------------------------------------------
    def _folder(self) -> Path:
        self.check_checkpoint()
        assert self.checkpoint is not None
        return self.checkpoint

    def model_args(self) -> dict[str, Any]:
        """``args.json``, checked for the keys the embedding needs."""
        if self._args is None:
            path = self._folder() / ARGS_FILE
            args = _read_json_object(path, "scGPT's args.json")
            missing = [k for k in ("embsize", "nheads", "d_hid", "nlayers") if k not in args]
            if missing:
                msg = f"{str(path)!r} lacks {', '.join(missing)}; it is not an scGPT args.json. Re-download the model folder."
                raise CheckpointError(msg)
            style = args.get("input_emb_style", "continuous")
            if style != "continuous":
                msg = f"{str(path)!r} has input_emb_style={style!r}; only 'continuous' scGPT models (all released ones) are supported."
                raise CheckpointError(msg)
            self._args = args
        return self._args

    def vocab(self) -> dict[str, int]:
        """``vocab.json`` with the special tokens appended as ``embed_data`` does."""
        if self._vocab is None:
            path = self._folder() / VOCAB_FILE
            raw = _read_json_object(path, "scGPT's vocab.json (gene -> token id)")
            try:
                vocab = {str(k): int(v) for k, v in raw.items()}
            except (TypeError, ValueError) as err:
                msg = f"{str(path)!r} maps a gene to something other than a token id ({err}); re-download the model folder."
                raise CheckpointError(msg) from None
            pad_token = self.model_args().get("pad_token", "<pad>")
            for token in dict.fromkeys((pad_token, *SPECIAL_TOKENS)):
                if token not in vocab:
                    vocab[token] = len(vocab)  # GeneVocab.append_token gives the next id
            self._vocab = vocab
        return self._vocab

    def _special_id(self, token: str) -> int:
        return self.vocab()[token]

    @property
    def pad_id(self) -> int:
        """Vocabulary id of the padding token."""
        return self._special_id(self.model_args().get("pad_token", "<pad>"))

    @property
    def pad_value(self) -> float:
        """Expression value of ``<cls>`` and of padding (``args.json`` ``pad_value``, -2)."""
        return float(self.model_args().get("pad_value", -2))

    # ---- model ----------------------------------------------------------------------------
    def load(self, device: str | torch.device = "cpu") -> None:
        args = self.model_args()
        with torch.device("meta"):  # no random init: every tensor comes from the file
            model = ScGPTModel(
                n_tokens=len(self.vocab()),
                d_model=int(args["embsize"]),
                n_heads=int(args["nheads"]),
                d_hid=int(args["d_hid"]),
                n_layers=int(args["nlayers"]),
                pad_id=self.pad_id,
                dropout=float(args.get("dropout", 0.2)),
            )
        self._load_weights(model)
        hold_weights_in(model, half_dtype(self.weight_precision))  # before the copy to the device: half the bytes
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        logger.info("Loaded scGPT from %s (%d layers, d=%d, vocab %d).", self.checkpoint, int(args["nlayers"]), int(args["embsize"]), len(self.vocab()))

    def _load_weights(self, model: ScGPTModel) -> None:
        """Read ``best_model.pt``: rename flash-attn keys, drop the heads, load strictly."""
        path = self._folder() / MODEL_FILE
        state = load_torch_file(path, what=f"scGPT's {MODEL_FILE} (a state_dict)", mmap=True)
        if not isinstance(state, dict):
            msg = f"{str(path)!r} holds a {type(state).__name__}, not a state_dict. Re-download best_model.pt."
            raise CheckpointError(msg)
        renamed: dict[str, torch.Tensor] = {}
        for key, value in state.items():
            for old, new in _WQKV_RENAMES:
                key = key.replace(old, new)
            renamed[key] = value
        kept = {k: v.float() for k, v in renamed.items() if k.startswith(_USED_PREFIXES)}
        dropped = sorted({k.split(".", 1)[0] for k in renamed if k not in kept})
        if dropped:
            logger.info("scGPT: not loading heads unused for embeddings: %s", ", ".join(dropped))
        try:
            model.load_state_dict(kept, strict=True, assign=True)
        except RuntimeError as err:
            msg = f"{str(path)!r} does not match args.json/vocab.json ({len(self.vocab())} tokens): {err}"
            raise CheckpointError(msg) from err

    @property
    def emb_dim(self) -> int:
        return int(self.model_args()["embsize"])

    def params(self) -> dict[str, Any]:
        return {
            "pooling": "cls",
            "layer": "last",
            "normalize": "l2",
            "max_length": self.max_length,
            "n_bins": N_BINS,
            "binning": "per-cell quantile, tie-break "
            + ("from one RandomState(seed) stream in cell order" if self.reference_quirks else "seeded by (seed, row)"),
            "subsample": "torch.randperm stream in cell order" if self.reference_quirks else "seeded by (seed, row), dataset order",
            "reference_quirks": self.reference_quirks,
            "seed": self.seed,
        }

    # ---- data -----------------------------------------------------------------------------
    def prepare(self, var_genes: Sequence[str], *, gene_id_kind: str) -> GeneAudit:
        symbols = _as_symbols(var_genes, gene_id_kind)
        vocab = self.vocab()
        specials = set(SPECIAL_TOKENS) | {self.model_args().get("pad_token", "<pad>")}
        ids = np.array([vocab[s] if s is not None and s in vocab and s not in specials else -1 for s in symbols], dtype=np.int64)
        unmatched = tuple(str(g) for g, i in zip(var_genes, ids) if i < 0)[:20]
        # two columns of one vocabulary gene (two Ensembl ids of one symbol) are two tokens of that gene, as in
        # the reference (it maps the columns one by one); n_matched counts both, so say how many repeat one
        n_duplicates = int((ids >= 0).sum()) - len(np.unique(ids[ids >= 0]))
        audit = GeneAudit(
            n_input_genes=len(ids),
            n_matched=int((ids >= 0).sum()),
            unmatched_examples=unmatched,
            id_kind_used="symbol",
            extra={"vocab_size": len(vocab), "n_duplicate_columns_kept": n_duplicates},
        )
        require_matches(audit, self.name)
        if n_duplicates:
            logger.info("scGPT: %d dataset columns repeat a vocabulary gene already matched; each is a token of its own "
                        "(as in the reference).", n_duplicates)
        self._gene_ids = ids
        return audit

    def tokenize(self, x: sp.csr_matrix, rows: np.ndarray) -> list[dict[str, np.ndarray]]:
        if self._gene_ids is None:
            msg = "Call prepare(var_genes, gene_id_kind=...) before tokenize()."
            raise RuntimeError(msg)
        check_expression(x, self.name)
        cls_id = self._special_id("<cls>")
        if self.reference_quirks:
            self._stream.advance_to(rows, self.name)
        cells: list[dict[str, np.ndarray]] = []
        for i, row in enumerate(rows):
            start, end = x.indptr[i], x.indptr[i + 1]
            cols, vals = x.indices[start:end], x.data[start:end].astype(np.float32)
            order = np.argsort(cols, kind="stable")  # dataset column order, whatever the CSR layout
            cols, vals = cols[order], vals[order]
            genes = self._gene_ids[cols]
            keep = (genes >= 0) & (vals != 0)
            genes, vals = genes[keep], vals[keep]
            if len(genes) == 0:
                msg = (
                    f"Cell at row {int(row)} has no counts in any of the scGPT vocabulary genes, so it has "
                    "nothing to embed (--allow-empty-cells cannot keep it: scGPT would return its <cls> token alone, "
                    "the same vector for every such cell). Remove such cells before ingest (e.g. keep the cells with "
                    "counts in the vocabulary genes; scanpy.pp.filter_cells(adata, min_genes=1) removes empty ones)."
                )
                raise InputDataError(msg)
            genes, binned = self._bin_and_subsample(genes, vals, int(row))
            cells.append(
                {
                    "input_ids": np.concatenate([[cls_id], genes]).astype(np.int64),
                    "values": np.concatenate([[self.pad_value], binned]).astype(np.float32),
                }
            )
        return cells

    def _bin_and_subsample(self, genes: np.ndarray, values: np.ndarray, row: int) -> tuple[np.ndarray, np.ndarray]:
        """Bin one cell's values and keep at most ``max_length - 1`` genes (sampled after binning)."""
        n_keep = self.max_length - 1
        if self.reference_quirks:
            assert self._stream.numpy is not None and self._stream.torch is not None
            binned = bin_values(values, self._stream.numpy)
            if len(genes) > n_keep:  # DataCollator._sample: randperm order, CLS kept in front
                chosen = torch.randperm(len(genes), generator=self._stream.torch)[:n_keep].numpy()
                genes, binned = genes[chosen], binned[chosen]
            return genes, binned
        rng = np.random.default_rng([self.seed, row])
        binned = bin_values(values, rng)
        if len(genes) > n_keep:
            chosen = np.sort(rng.choice(len(genes), size=n_keep, replace=False))
            genes, binned = genes[chosen], binned[chosen]
        return genes, binned

    def collate(self, cells: list[dict[str, np.ndarray]]) -> dict[str, Any]:
        """Right-padded ``input_ids`` and ``values``; ``padding_mask`` (True = pad) is None when no cell is padded."""
        length = max(len(c["input_ids"]) for c in cells)
        ids = np.full((len(cells), length), self.pad_id, dtype=np.int64)
        values = np.full((len(cells), length), self.pad_value, dtype=np.float32)
        padding = np.ones((len(cells), length), dtype=bool)
        for i, cell in enumerate(cells):
            n = len(cell["input_ids"])
            ids[i, :n], values[i, :n], padding[i, :n] = cell["input_ids"], cell["values"], False
        # decided here, on the CPU: without a mask SDPA may use its flash kernel, and nothing on the device is inspected
        mask = torch.from_numpy(padding) if padding.any() else None
        return {"input_ids": torch.from_numpy(ids), "values": torch.from_numpy(values), "padding_mask": mask}

    def embed(self, batch: dict[str, Any]) -> torch.Tensor:
        if self.model is None:
            msg = "Call load() before embed()."
            raise RuntimeError(msg)
        hidden = self.model(batch["input_ids"], batch["values"], batch.get("padding_mask"))
        return F.normalize(hidden[:, 0].float(), dim=-1)


def _as_symbols(var_genes: Sequence[str], gene_id_kind: str) -> np.ndarray:
    """The dataset's genes as HGNC symbols (``None`` where the shipped table has no symbol)."""
    from scdm.store.genes import map_genes

    return map_genes([str(g) for g in var_genes], src=gene_id_kind, dst="symbol")  # type: ignore[arg-type]


# ---- tiny official-format checkpoint -----------------------------------------------------------
def _default_genes(n: int = 2000) -> list[str]:
    from scdm.store.genes import gene_table

    table = gene_table()
    symbols = sorted(set(table.loc[table["ensembl"] != "", "symbol"]))
    return symbols[:n]


def _randomise_(model: nn.Module, generator: torch.Generator) -> None:
    """Give every parameter (LayerNorms included) random values, so tests can tell them apart."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if "norm" in name and name.endswith("weight"):
                param.copy_(1.0 + 0.1 * noise)
            else:
                param.copy_(noise / math.sqrt(max(param.shape[-1], 1)) if param.dim() > 1 else 0.1 * noise)


def write_tiny_checkpoint(
    folder: str | Path,
    *,
    genes: list[str] | None = None,
    seed: int = 0,
    flash_keys: bool = True,
    **config_overrides: Any,
) -> Path:
    """Write a small random scGPT model folder in the official format.

    Parameters
    ----------
    folder
        Created if missing; receives ``best_model.pt``, ``args.json``, ``vocab.json``.
    genes
        Gene symbols of the vocabulary (default: 2000 symbols from the shipped gene table).
    seed
        Seeds the random weights.
    flash_keys
        Save attention as flash-attn ``self_attn.Wqkv.*`` keys, like the released checkpoints.
    **config_overrides
        ``args.json`` values to change (``embsize``, ``nheads``, ``d_hid``, ``nlayers``, ...).

    Returns
    -------
    Path
        The folder.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    genes = list(dict.fromkeys(genes if genes is not None else _default_genes()))
    args: dict[str, Any] = {
        "embsize": 32, "nheads": 4, "d_hid": 64, "nlayers": 2, "n_layers_cls": 3, "dropout": 0.2,
        "pad_token": "<pad>", "pad_value": -2, "mask_value": -1, "n_bins": N_BINS, "max_seq_len": 1200,
        "input_style": "binned", "input_emb_style": "continuous", "fast_transformer": True, "MVC": True,
    }  # fmt: skip
    args.update(config_overrides)
    vocab = {g: i for i, g in enumerate(genes)}
    for token in SPECIAL_TOKENS:  # whole-human style: specials after the genes
        vocab[token] = len(vocab)

    generator = torch.Generator().manual_seed(seed)
    model = ScGPTModel(
        n_tokens=len(vocab), d_model=args["embsize"], n_heads=args["nheads"], d_hid=args["d_hid"],
        n_layers=args["nlayers"], pad_id=vocab["<pad>"], dropout=args["dropout"],
    )  # fmt: skip
    _randomise_(model, generator)
    state = dict(model.state_dict())
    if flash_keys:
        state = {k.replace("self_attn.in_proj_", "self_attn.Wqkv."): v for k, v in state.items()}
    d = args["embsize"]
    # heads the released files also carry (ExprDecoder, ClsDecoder, MVCDecoder): loaders must skip them
    for key, shape in {
        "decoder.fc.0.weight": (d, d), "decoder.fc.0.bias": (d,), "decoder.fc.2.weight": (d, d),
        "decoder.fc.2.bias": (d,), "decoder.fc.4.weight": (1, d), "decoder.fc.4.bias": (1,),
        "cls_decoder._decoder.0.weight": (d, d), "cls_decoder._decoder.0.bias": (d,),
        "cls_decoder._decoder.2.weight": (d,), "cls_decoder._decoder.2.bias": (d,),
        "cls_decoder.out_layer.weight": (1, d), "cls_decoder.out_layer.bias": (1,),
        "mvc_decoder.gene2query.weight": (d, d), "mvc_decoder.gene2query.bias": (d,), "mvc_decoder.W.weight": (d, d),
    }.items():  # fmt: skip
        state[key] = torch.randn(shape, generator=generator)
    torch.save(state, folder / MODEL_FILE)
    (folder / ARGS_FILE).write_text(json.dumps(args, indent=2))
    (folder / VOCAB_FILE).write_text(json.dumps(vocab))
    return folder
