"""UCE, Universal Cell Embeddings (snap-stanford/UCE): a transformer over a sampled "cell sentence".

Checkpoint folder, the figshare files ``evaluate.py`` downloads into ``model_files/``::

    4layer_model.torch | 33l_8ep_1024t_1280.torch   state_dict incl. pe_embedding.weight [145469, 5120]
    all_tokens.torch                                  token table: ESM2 protein embeddings of every
                                                      species' genes (+ chromosome tokens)
    species_chrom.csv                                 species, gene_symbol, chromosome, start
    species_offsets.pkl                               species -> first row of its genes in the table
    protein_embeddings/<Species>...ESM2.pt            {gene_symbol: tensor}; its key order gives
                                                      the gene's row (offset + position)

What one cell becomes (``eval_data.py``, ``evaluate.py``; MODELS.md section 4):

1. genes are matched by upper-cased symbol to the species' protein-embedding dict and the
   chromosome table; counts are truncated to integers (the reference stores int64);
2. ``w = log1p(counts) / sum``; 1024 genes are sampled with replacement with probability ``w``;
3. sampled genes are grouped by chromosome; chromosomes come in random order, each as
   ``[chromosome token] + genes sorted by genomic start + [2]``; the sentence starts with CLS
   (token 3), at most 1536 tokens;
4. token -> ``pe_embedding`` row (frozen) -> L2-normalised -> ``encoder`` (Linear, GELU, LayerNorm)
   x sqrt(d) -> + sinusoidal position -> post-LN transformer -> ``decoder`` MLP on the CLS
   position -> L2-normalised (1280-d). The adapter normalises the frozen table's rows once at
   load (:attr:`UCEModel.tokens_normalised`) instead of every looked-up token in every forward.

Where the default differs from the reference, on purpose (``reference_quirks=False``):

* Sampling and chromosome shuffling use ``numpy.random.default_rng([seed, row])`` per cell
  instead of the unseeded global numpy RNG, so embeddings are reproducible and independent of
  chunking; genes within a chromosome are ordered by (start, token) with a stable sort.
* Padding is masked with a boolean key mask. The reference passes ``1 - mask`` as a *float*
  ``src_key_padding_mask``, which PyTorch adds to the attention logits: pads are attended with
  a +1 logit bias, so its embeddings change with the batch's padding (up to ~0.02). Ours do not.
  With no padding (batch size 1, or equal lengths) the two agree.

``reference_quirks=True`` reproduces both: the additive float mask (so the adapter becomes
``batch_dependent``: the runner then embeds fixed batches of consecutive rows, like the
reference's ``DataLoader(shuffle=False)``, and records the batch size), and the draws of one
legacy ``numpy.random.RandomState(seed)`` stream consumed cell by cell in row order
(``np.random.choice`` over the cell's genes with the reference's float32 weights, unstable
``argsort`` by chromosome then by start, ``np.random.shuffle`` of the chromosomes). That is the
reference run after ``np.random.seed(seed)`` (it loads in-process, ``num_workers=0``; it never
seeds, so an unseeded run is a draw from the same distribution) with ``--filter False``. Its
default, ``--filter True``, first drops genes seen in fewer than 10 cells and cells with fewer than
25 genes, which changes every cell's sampling weights: to compare with such a run, ingest the
dataset filtered the same way (``scanpy.pp.filter_genes(adata, min_cells=10)``, then
``filter_cells(adata, min_genes=25)``; on 300 PC9 cells, 25,077 genes become 9,633 and no sentence
is the same without it). Being one stream in row order,
quirk-mode tokenisation must start at row 0 and see every chunk in order in one process
(``workers=0``, no resume of a partial run); :meth:`UCEAdapter.tokenize` refuses anything else.
The reference sums the weights over all the dataset's genes (zeros included); we sum over the
expressed ones, which can change the last bit of a weight and, very rarely, one sampled gene.

In both modes:

* Genes without a chromosome row are dropped (the reference raises a KeyError); the reference's
  dataset-level filters (``filter_genes(min_cells=10)``, ``filter_cells(min_genes=25)``) are not
  applied: scdm embeds every cell of the dataset. A cell without counts in the matched genes is
  refused (the reference divides by zero).

Token table, by ``evaluate.py``'s rule: ``all_tokens.torch`` gets 1,895 chromosome tokens
(``torch.manual_seed(23)`` normals) appended when it holds only the 143,574 ESM2 rows. When it then
has exactly 145,469 rows (the released size: the training species) the table stored in the model
file is kept, so those appended rows are never used; any other size (new species added) replaces
the stored table. A model file whose stored table is not 145,469 rows, or is all zeros, while
``all_tokens.torch`` has the released size is refused: the reference cannot load the first and
would embed with zeros from the second.

Files are read without running code from them: the torch files with ``weights_only=True`` and
``species_offsets.pkl`` with a restricted unpickler (:mod:`scdm.embedding._safe_load`).
"""

from __future__ import annotations

import logging
import math
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from scdm.embedding._adapter import (
    Adapter,
    GeneAudit,
    check_counts,
    register_adapter,
    require_matches,
)
from scdm.embedding._safe_load import load_pickle, load_torch_file
from scdm.embedding.models._common import half_dtype, hold_weights_in, require_int_param
from scdm.store.errors import CheckpointError, InputDataError

if TYPE_CHECKING:
    import scipy.sparse as sp

__all__ = ["UCEAdapter", "UCEModel", "write_tiny_checkpoint"]

logger = logging.getLogger(__name__)

MODEL_FILES = {"4layer": "4layer_model.torch", "33layer": "33l_8ep_1024t_1280.torch"}
TOKEN_FILE = "all_tokens.torch"
CHROM_FILE = "species_chrom.csv"
OFFSETS_FILE = "species_offsets.pkl"
PROTEIN_DIR = "protein_embeddings"
SPECIES_FILES = {  # data_proc/gene_embeddings.py
    "human": "Homo_sapiens.GRCh38.gene_symbol_to_embedding_ESM2.pt",
    "mouse": "Mus_musculus.GRCm39.gene_symbol_to_embedding_ESM2.pt",
    "frog": "Xenopus_tropicalis.Xenopus_tropicalis_v9.1.gene_symbol_to_embedding_ESM2.pt",
    "zebrafish": "Danio_rerio.GRCz11.gene_symbol_to_embedding_ESM2.pt",
    "mouse_lemur": "Microcebus_murinus.Mmur_3.0.gene_symbol_to_embedding_ESM2.pt",
    "pig": "Sus_scrofa.Sscrofa11.1.gene_symbol_to_embedding_ESM2.pt",
    "macaca_fascicularis": "Macaca_fascicularis.Macaca_fascicularis_6.0.gene_symbol_to_embedding_ESM2.pt",
    "macaca_mulatta": "Macaca_mulatta.Mmul_10.gene_symbol_to_embedding_ESM2.pt",
}
PAD_TOKEN, CHROM_CLOSE_TOKEN, CLS_TOKEN = 0, 2, 3  # eval_single_anndata.py defaults
N_ESM2_TOKENS = 143_574  # rows of the ESM2-only token table (= CHROM_TOKEN_OFFSET)
N_CHROM_TOKENS = 1_895  # chromosome tokens after them
N_RELEASED_TOKENS = N_ESM2_TOKENS + N_CHROM_TOKENS  # 145,469: the token table of the released models
N_HEADS = 20  # hard-coded in evaluate.py; not recoverable from the weights
_USED_PREFIXES = ("pe_embedding.", "encoder.", "pos_encoder.", "transformer_encoder.", "decoder.")


# ---- model -------------------------------------------------------------------------------------
class SelfAttention(nn.Module):
    """Multi-head self-attention with ``nn.MultiheadAttention``'s parameter names, run by SDPA.

    ``out_proj`` is a real ``nn.Linear`` called through its ``forward``, so LoRA can target it.
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if d_model % n_heads:
            msg = f"d_model={d_model} is not divisible by nhead={n_heads}."
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
        if padding_mask is None:
            mask = None
        elif padding_mask.dtype == torch.bool:
            mask = ~padding_mask[:, None, None, :]  # True = attend
        else:  # the reference's float mask: added to the logits (pads get +1, they are not masked)
            mask = padding_mask[:, None, None, :].to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).reshape(n, length, d_model))


class EncoderLayer(nn.Module):
    """Post-LN layer with ReLU: ``nn.TransformerEncoderLayer``'s names and maths (batch-first here)."""

    def __init__(self, d_model: int, n_heads: int, d_hid: int, dropout: float = 0.05) -> None:
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
    """Layers at ``transformer_encoder.layers.{i}`` (the official key prefix)."""

    def __init__(self, n_layers: int, d_model: int, n_heads: int, d_hid: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(d_model, n_heads, d_hid) for _ in range(n_layers))

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, padding_mask)
        return x


class PositionalEncoding(nn.Module):
    """Sinusoidal positions; the ``pe`` buffer [max_len, 1, d] is part of the official state_dict."""

    def __init__(self, d_model: int, max_len: int = 1536) -> None:
        super().__init__()
        position = torch.arange(max_len).unsqueeze(1)
        div_term = torch.exp(torch.arange(0, d_model, 2) * (-math.log(10000.0) / d_model))
        pe = torch.zeros(max_len, 1, d_model)
        pe[:, 0, 0::2] = torch.sin(position * div_term)
        pe[:, 0, 1::2] = torch.cos(position * div_term)
        self.register_buffer("pe", pe)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pe = cast(torch.Tensor, self.pe)  # a registered buffer (mypy types Module attributes as Tensor | Module)
        return x + pe[: x.shape[1], 0].to(x.dtype)


def _full_block(d_in: int, d_out: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_out), nn.LayerNorm(d_out), nn.GELU(), nn.Dropout(dropout))


class UCEModel(nn.Module):
    """UCE's ``TransformerModel`` without the pretraining heads (``binary_decoder``, ``gene_embedding_layer``).

    Parameters
    ----------
    n_tokens, token_dim
        Shape of the token table (145,469 x 5120 when released).
    d_model, n_heads, d_hid, n_layers
        1280, 20, 5120, 4 or 33.
    decoder_hidden, output_dim
        Decoder widths (1024, 1280).
    max_len
        Rows of the positional table (``pad_length``, 1536).
    """

    def __init__(
        self, *, n_tokens: int, token_dim: int, d_model: int, n_heads: int, d_hid: int, n_layers: int,
        decoder_hidden: int = 1024, output_dim: int = 1280, max_len: int = 1536, dropout: float = 0.05,
    ) -> None:  # fmt: skip
        super().__init__()
        self.d_model = d_model
        self.pe_embedding = nn.Embedding(n_tokens, token_dim)
        self.pe_embedding.weight.requires_grad_(False)  # frozen ESM2 table
        self.encoder = nn.Sequential(nn.Linear(token_dim, d_model), nn.GELU(), nn.LayerNorm(d_model))
        self.pos_encoder = PositionalEncoding(d_model, max_len)
        self.transformer_encoder = TransformerEncoder(n_layers, d_model, n_heads, d_hid)
        self.decoder = nn.Sequential(
            _full_block(d_model, decoder_hidden, dropout),
            _full_block(decoder_hidden, output_dim, dropout),
            _full_block(output_dim, output_dim, dropout),
            nn.Linear(output_dim, output_dim),
        )
        self.dropout = nn.Dropout(dropout)
        # True once pe_embedding holds L2-normalised rows (normalised_rows): the forward then skips that step
        self.tokens_normalised = False

    def forward(self, input_ids: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor:
        """L2-normalised cell embeddings from the CLS position, shape (n_cells, output_dim).

        ``padding_mask`` (n_cells, n_tokens): boolean (True = pad, excluded from attention) or
        float (added to the attention logits, the reference's ``1 - mask``); None: no padding.
        """
        tokens = self.pe_embedding(input_ids)
        if not self.tokens_normalised:
            tokens = F.normalize(tokens.float(), dim=-1)
        x = self.encoder(tokens) * math.sqrt(self.d_model)
        x = self.dropout(self.pos_encoder(x))
        hidden = self.transformer_encoder(x, padding_mask)
        return F.normalize(self.decoder(hidden[:, 0]).float(), dim=-1)


def normalised_rows(table: torch.Tensor, device: torch.device, dtype: torch.dtype, block: int = 8192) -> torch.Tensor:
    """``F.normalize(table, dim=-1)`` computed in float32 block by block, stored on ``device`` in ``dtype``.

    The same row-wise operation the forward applied to every looked-up token, done once per row;
    block by block so that a 145,469 x 5,120 table needs no second full-size float32 copy.
    """
    out = torch.empty(table.shape, dtype=dtype, device=device)
    for lo in range(0, table.shape[0], block):
        out[lo:lo + block] = F.normalize(table[lo:lo + block].to(device=device, dtype=torch.float32), dim=-1)
    return out


def read_species_offsets(path: Path) -> dict[str, int]:
    """``species_offsets.pkl`` (species -> first row of its genes in the token table), read safely.

    The file is a pickle; it is read with a restricted unpickler that admits only a dict of
    strings and (numpy) integers, so a crafted file cannot run code.
    """
    offsets = load_pickle(path, what=f"UCE's {OFFSETS_FILE} (species -> row offset)",
                          source="the figshare files UCE's evaluate.py downloads into model_files/")
    if not isinstance(offsets, dict) or not all(
        isinstance(k, str) and isinstance(v, (int, np.integer)) and not isinstance(v, bool) for k, v in offsets.items()
    ):
        msg = f"{str(path)!r} is not a dict of species name -> integer row offset; re-download {OFFSETS_FILE}."
        raise CheckpointError(msg)
    return {k: int(v) for k, v in offsets.items()}


# ---- adapter -----------------------------------------------------------------------------------
@register_adapter
class UCEAdapter(Adapter):
    """UCE cell embeddings: CLS -> decoder -> L2-norm, from a seeded cell sentence.

    Parameters
    ----------
    checkpoint
        Folder with the model file, ``all_tokens.torch``, ``species_chrom.csv``,
        ``species_offsets.pkl`` and ``protein_embeddings/``.
    seed
        Seeds each cell's gene sampling and chromosome order (with the cell's row index).
    variant
        ``"4layer"`` (``4layer_model.torch``) or ``"33layer"`` (``33l_8ep_1024t_1280.torch``).
    species
        Species of the dataset (a key of ``species_offsets.pkl`` with a protein-embedding file).
    sample_size
        Genes sampled per cell (1024).
    nhead
        Attention heads (20 in every released model; the weights do not record it).
    reference_quirks
        Reproduce the reference's additive float padding mask (batch-dependent) and its RNG
        stream in cell order (see the module docstring); default: boolean mask, per-cell seeds.
    """

    name = "uce"
    description = "UCE 4-layer / 33-layer (snap-stanford): CLS -> decoder -> L2-norm of a 1024-gene chromosome-ordered cell sentence"
    gene_id_kind = "symbol"
    requires_counts = True
    checkpoint_files = ("*.torch", TOKEN_FILE, CHROM_FILE, OFFSETS_FILE, f"{PROTEIN_DIR}/*.pt")
    lora_target_modules = ("self_attn.out_proj", "linear1", "linear2")
    default_batch_size = 25
    half_precision_weights = True

    def __init__(
        self,
        checkpoint: str | Path | None = None,
        *,
        seed: int = 0,
        variant: str = "4layer",
        species: str = "human",
        sample_size: int = 1024,
        nhead: int = N_HEADS,
        reference_quirks: bool = False,
    ) -> None:
        super().__init__(checkpoint, seed=seed)
        if not isinstance(reference_quirks, bool):
            msg = f"uce reference_quirks={reference_quirks!r} must be True or False."
            raise InputDataError(msg)
        self.reference_quirks = reference_quirks
        # the float mask lets a batch's padding into every cell: batches must be fixed row ranges
        self.batch_dependent = reference_quirks
        # quirk mode draws from one stream in row order: chunks must be tokenised in order, in one process
        self.sequential_tokenize = reference_quirks
        self._stream = _ReferenceStream(seed)
        if variant not in MODEL_FILES:
            msg = f"variant={variant!r} is unknown; use one of {', '.join(MODEL_FILES)} (files {', '.join(MODEL_FILES.values())})."
            raise InputDataError(msg)
        if species not in SPECIES_FILES:
            msg = f"species={species!r} has no UCE protein embeddings; use one of {', '.join(SPECIES_FILES)}."
            raise InputDataError(msg)
        if require_int_param("uce", "sample_size", sample_size) < 1:
            msg = f"sample_size={sample_size} must be at least 1 (UCE default 1024)."
            raise InputDataError(msg)
        self.variant = variant
        self.species = species
        self.sample_size = int(sample_size)
        self.nhead = require_int_param("uce", "nhead", nhead, minimum=1)
        self._shapes: dict[str, tuple[int, ...]] | None = None
        self._vocab: pd.DataFrame | None = None
        self._genes: dict[str, np.ndarray] | None = None  # per dataset column: token, chrom, start, matched

    # ---- checkpoint files -----------------------------------------------------------------
    @property
    def model_file(self) -> str:
        """File name of the chosen variant's weights."""
        return MODEL_FILES[self.variant]

    def check_checkpoint(self) -> None:
        super().check_checkpoint()
        assert self.checkpoint is not None
        for name in (self.model_file, f"{PROTEIN_DIR}/{SPECIES_FILES[self.species]}"):
            if not (self.checkpoint / name).is_file():
                msg = (
                    f"Checkpoint folder {str(self.checkpoint)!r} is missing {name!r} "
                    f"(needed for variant={self.variant!r}, species={self.species!r})."
                )
                raise CheckpointError(msg)

    def _folder(self) -> Path:
        self.check_checkpoint()
        assert self.checkpoint is not None
        return self.checkpoint

    def _read_state(self) -> dict[str, torch.Tensor]:
        path = self._folder() / self.model_file
        state = load_torch_file(path, what=f"UCE's {self.model_file} (a state_dict)", mmap=True)
        if not isinstance(state, dict):
            msg = f"{str(path)!r} holds a {type(state).__name__}, not a state_dict. Re-download it."
            raise CheckpointError(msg)
        if state and all(k.startswith("module.") for k in state):  # saved from DataParallel/DDP
            state = {k.removeprefix("module."): v for k, v in state.items()}
        return state

    def architecture(self) -> dict[str, int]:
        """Sizes read from the weights' shapes (the model file has no config)."""
        if self._shapes is None:
            self._shapes = {k: tuple(v.shape) for k, v in self._read_state().items()}
        shapes = self._shapes
        try:
            d_model, token_dim = shapes["encoder.0.weight"]
            layers = {int(k.split(".")[2]) for k in shapes if k.startswith("transformer_encoder.layers.")}
            return {
                "n_tokens": shapes["pe_embedding.weight"][0],
                "token_dim": token_dim,
                "d_model": d_model,
                "d_hid": shapes["transformer_encoder.layers.0.linear1.weight"][0],
                "n_layers": len(layers),
                "decoder_hidden": shapes["decoder.0.0.weight"][0],
                "output_dim": shapes["decoder.3.weight"][0],
                "max_len": shapes["pos_encoder.pe"][0],
            }
        except (KeyError, ValueError) as err:
            msg = f"{self.model_file} is not a UCE state_dict (missing or odd {err})."
            raise CheckpointError(msg) from err

    def token_table(self, stored: torch.Tensor) -> torch.Tensor:
        """The token table ``evaluate.run_eval`` ends up with (see the module docstring)."""
        tokens = load_torch_file(self._folder() / TOKEN_FILE, what=f"UCE's {TOKEN_FILE} (one tensor)", mmap=True)
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2:
            msg = f"{TOKEN_FILE} must hold one 2-D tensor (tokens x {stored.shape[1]}); re-download it."
            raise CheckpointError(msg)
        if tokens.shape[1] != stored.shape[1]:
            msg = f"{TOKEN_FILE} has {tokens.shape[1]}-d tokens but {self.model_file} expects {stored.shape[1]}-d."
            raise CheckpointError(msg)
        # evaluate.py appends 1,895 seeded chromosome tokens to an ESM2-only table: that makes the
        # released size, so the appended rows are never used and need not be drawn here
        n_rows = tokens.shape[0] + (N_CHROM_TOKENS if tokens.shape[0] == N_ESM2_TOKENS else 0)
        if n_rows != N_RELEASED_TOKENS:  # other species added: evaluate.py swaps the file's table in
            return tokens.float()
        # Exactly the released size: evaluate.py keeps the table stored in the model file.
        if stored.shape[0] != N_RELEASED_TOKENS:
            msg = (f"{self.model_file} stores a {stored.shape[0]:,}-row token table, but released UCE models store "
                   f"{N_RELEASED_TOKENS:,} rows, the size {TOKEN_FILE} here has (with chromosome tokens), and the reference "
                   f"(evaluate.py) cannot load any other size. Re-download {self.model_file}.")
            raise CheckpointError(msg)
        if not bool(stored[:4096].any()):
            msg = (f"The token table stored in {self.model_file} is all zeros. With a {N_RELEASED_TOKENS:,}-row "
                   f"{TOKEN_FILE} the reference keeps the model file's table, so every embedding would be meaningless. "
                   f"Re-download {self.model_file} (the released files store the real table).")
            raise CheckpointError(msg)
        logger.info("UCE: using the token table stored in %s (%s has the released %d rows).", self.model_file,
                    TOKEN_FILE, N_RELEASED_TOKENS)
        return stored.float()

    def chrom_token_offset(self) -> int:
        """First chromosome token row (``CHROM_TOKEN_OFFSET``, 143,574 when released).

        The model file's table has the ESM2 rows followed by the 1,895 chromosome tokens.
        """
        return self.architecture()["n_tokens"] - N_CHROM_TOKENS

    # ---- model ----------------------------------------------------------------------------
    def load(self, device: str | torch.device = "cpu") -> None:
        arch = self.architecture()
        with torch.device("meta"):  # no random init: every tensor comes from the files
            model = UCEModel(n_heads=self.nhead, **arch)
        self._load_weights(model)
        self.device = torch.device(device)
        dtype = half_dtype(self.weight_precision)
        # the frozen token table, L2-normalised once here rather than per token per forward (a
        # (cells, tokens, 5120) float32 tensor twice per batch); autocast would round those rows
        # to the compute dtype at the encoder anyway, so they can be stored in it
        table = normalised_rows(model.pe_embedding.weight.detach(), self.device, dtype or torch.float32)
        model.pe_embedding.weight = nn.Parameter(table, requires_grad=False)
        model.tokens_normalised = True
        hold_weights_in(model, dtype)  # before the copy to the device: half the bytes
        self.model = model.to(self.device).eval()
        logger.info("Loaded UCE %s from %s (%d layers, d=%d).", self.variant, self.checkpoint, arch["n_layers"], arch["d_model"])

    def _load_weights(self, model: UCEModel) -> None:
        """Drop the pretraining heads, swap in the token table, load strictly."""
        state = self._read_state()
        kept = {k: v.float() for k, v in state.items() if k.startswith(_USED_PREFIXES) and k != "pe_embedding.weight"}
        dropped = sorted({k.split(".", 1)[0] for k in state if not k.startswith(_USED_PREFIXES)})
        if dropped:
            logger.info("UCE: not loading pretraining heads: %s", ", ".join(dropped))
        if "pe_embedding.weight" not in state:
            msg = f"{self.model_file} has no pe_embedding.weight; it is not a UCE state_dict."
            raise CheckpointError(msg)
        table = self.token_table(state["pe_embedding.weight"])
        if table.shape[0] != model.pe_embedding.num_embeddings:  # a token file with extra species
            with torch.device("meta"):
                model.pe_embedding = nn.Embedding(table.shape[0], table.shape[1])
            model.pe_embedding.weight.requires_grad_(False)
        kept["pe_embedding.weight"] = table
        try:
            model.load_state_dict(kept, strict=True, assign=True)
        except RuntimeError as err:
            msg = f"{self.model_file} does not match a UCE model with nhead={self.nhead}: {err}"
            raise CheckpointError(msg) from err

    @property
    def emb_dim(self) -> int:
        return self.architecture()["output_dim"]

    def params(self) -> dict[str, Any]:
        return {
            "variant": self.variant,
            "species": self.species,
            "sample_size": self.sample_size,
            "pooling": "cls -> decoder -> l2",
            "padding_mask": "additive float (reference)" if self.reference_quirks else "boolean",
            "sampling": "RandomState(seed) stream in cell order" if self.reference_quirks else "seeded by (seed, row)",
            "reference_quirks": self.reference_quirks,
            "nhead": self.nhead,
            "seed": self.seed,
        }

    # ---- data -----------------------------------------------------------------------------
    def _species_vocab(self) -> pd.DataFrame:
        """Upper-cased symbol -> token row, chromosome code, start for the species' genes."""
        if self._vocab is not None:
            return self._vocab
        folder = self._folder()
        offsets = read_species_offsets(folder / OFFSETS_FILE)
        if self.species not in offsets:
            msg = f"{OFFSETS_FILE} has no offset for species {self.species!r} (it has: {', '.join(map(str, offsets))})."
            raise CheckpointError(msg)
        proteins = load_torch_file(folder / PROTEIN_DIR / SPECIES_FILES[self.species], what="a UCE protein-embedding file (gene -> tensor)",
                                   mmap=True)  # only the key order is needed
        # dict order is the token order; upper-casing keeps the first position of a repeated key
        symbols = list(dict.fromkeys(str(k).upper() for k in proteins))
        tokens = pd.DataFrame({"symbol": symbols, "token": np.arange(len(symbols), dtype=np.int64) + int(offsets[self.species])})
        chroms = pd.read_csv(folder / CHROM_FILE, dtype={"species": str, "gene_symbol": str, "chromosome": str})
        missing = {"species", "gene_symbol", "chromosome", "start"} - set(chroms.columns)
        if missing:
            msg = f"{CHROM_FILE} lacks the column(s) {', '.join(sorted(missing))}; re-download it."
            raise CheckpointError(msg)
        # codes over the whole file, as get_spec_chrom_csv does (categories sorted)
        chroms["chrom_code"] = pd.Categorical(chroms["species"] + "_" + chroms["chromosome"]).codes.astype(np.int64)
        spec = chroms[chroms["species"] == self.species].drop_duplicates("gene_symbol", keep="first")
        vocab = tokens.merge(spec[["gene_symbol", "chrom_code", "start"]], left_on="symbol", right_on="gene_symbol", how="left")
        self._vocab = vocab.drop(columns="gene_symbol").set_index("symbol")
        return self._vocab

    def prepare(self, var_genes: Sequence[str], *, gene_id_kind: str) -> GeneAudit:
        from scdm.store.genes import map_genes

        symbols = map_genes([str(g) for g in var_genes], src=gene_id_kind, dst="symbol")  # type: ignore[arg-type]
        vocab = self._species_vocab()
        upper = pd.Index([s.upper() if s is not None else "" for s in symbols])
        found = vocab.reindex(upper)
        has_protein = found["token"].notna().to_numpy()
        matched = has_protein & found["chrom_code"].notna().to_numpy()
        unmatched = tuple(str(g) for g, m in zip(var_genes, matched) if not m)[:20]
        # two columns of one protein-embedding gene (TP53 and tp53, two Ensembl ids of one symbol) are sampled
        # as two genes, as in the reference; n_matched counts both, so say how many repeat one
        n_duplicates = int(matched.sum()) - len(set(upper[matched]))
        audit = GeneAudit(
            n_input_genes=len(symbols),
            n_matched=int(matched.sum()),
            unmatched_examples=unmatched,
            id_kind_used="symbol",
            extra={"species": self.species, "n_without_chromosome": int((has_protein & ~matched).sum()),
                   "n_duplicate_columns_kept": n_duplicates},
        )
        require_matches(audit, self.name)
        if n_duplicates:
            logger.info("UCE: %d dataset columns repeat a gene already matched; each is sampled as a gene of its own "
                        "(as in the reference).", n_duplicates)
        self._genes = {
            "matched": matched,
            "token": np.where(matched, found["token"].fillna(-1).to_numpy(), -1).astype(np.int64),
            "chrom": np.where(matched, found["chrom_code"].fillna(-1).to_numpy(), -1).astype(np.int64),
            "start": np.where(matched, found["start"].fillna(0).to_numpy(), 0).astype(np.float64),
        }
        return audit

    def tokenize(self, x: sp.csr_matrix, rows: np.ndarray) -> list[dict[str, np.ndarray]]:
        if self._genes is None:
            msg = "Call prepare(var_genes, gene_id_kind=...) before tokenize()."
            raise RuntimeError(msg)
        check_counts(x, self.name)
        genes = self._genes
        chrom_offset = self.chrom_token_offset()
        max_len = self.architecture()["max_len"]
        if self.reference_quirks:
            self._stream.advance_to(rows, self.name)
        cells = []
        for i, row in enumerate(rows):
            start, end = x.indptr[i], x.indptr[i + 1]
            cols = x.indices[start:end]
            counts = np.trunc(x.data[start:end].astype(np.float64))  # the reference stores int64 counts
            keep = genes["matched"][cols] & (counts > 0)
            cols, counts = cols[keep], counts[keep]
            if len(cols) == 0:
                msg = (
                    f"Cell at row {int(row)} has no counts in any UCE gene of species {self.species!r}, so no "
                    "genes can be sampled (--allow-empty-cells cannot keep it: UCE has no sentence to embed). Remove such "
                    "cells before ingest (e.g. keep the cells with counts in UCE's genes; scanpy.pp.filter_cells(adata, "
                    "min_genes=1) removes empty ones)."
                )
                raise InputDataError(msg)
            if self.reference_quirks:
                assert self._stream.numpy is not None
                sentence = _reference_cell_sentence(cols, counts, genes, self._stream.numpy, self.sample_size, chrom_offset)
            else:
                rng = np.random.default_rng([self.seed, int(row)])
                weights = np.log1p(counts)
                sampled = cols[rng.choice(len(cols), size=self.sample_size, replace=True, p=weights / weights.sum())]
                sentence = _cell_sentence(sampled, genes, rng, chrom_offset)
            if len(sentence) > max_len:
                msg = f"Cell at row {int(row)} makes a {len(sentence)}-token sentence, longer than the model's {max_len} positions; lower sample_size."
                raise InputDataError(msg)
            cells.append({"input_ids": sentence})
        return cells

    def collate(self, cells: list[dict[str, np.ndarray]]) -> dict[str, Any]:
        """Right-padded ``input_ids``; ``padding_mask`` (True = pad) is None when no cell is padded."""
        length = max(len(c["input_ids"]) for c in cells)
        ids = np.full((len(cells), length), PAD_TOKEN, dtype=np.int64)
        padding = np.ones((len(cells), length), dtype=bool)
        for i, cell in enumerate(cells):
            n = len(cell["input_ids"])
            ids[i, :n], padding[i, :n] = cell["input_ids"], False
        # decided here, on the CPU: without a mask SDPA may use its flash kernel, and nothing on the device is inspected
        mask = torch.from_numpy(padding) if padding.any() else None
        return {"input_ids": torch.from_numpy(ids), "padding_mask": mask}

    def embed(self, batch: dict[str, Any]) -> torch.Tensor:
        if self.model is None:
            msg = "Call load() before embed()."
            raise RuntimeError(msg)
        padding = batch.get("padding_mask")  # None: no cell of the batch is padded (the float mask would add 0)
        if self.reference_quirks and padding is not None:
            padding = padding.float()  # the reference's src_key_padding_mask = 1 - mask: +1 on pads
        return self.model(batch["input_ids"], padding).float()


def _reference_cell_sentence(
    cols: np.ndarray, counts: np.ndarray, genes: dict[str, np.ndarray], rng: np.random.RandomState, sample_size: int, chrom_offset: int
) -> np.ndarray:
    """``sample_cell_sentences`` of the reference for one cell, drawing from ``rng`` as it does.

    Same calls in the same order: float32 weights ``log1p(counts) / sum``, renormalised with
    Python's ``sum``; ``choice`` with replacement; unstable ``argsort`` by chromosome; ``shuffle``
    of the unique chromosomes; per chromosome an unstable ``argsort`` by start.
    """
    order = np.argsort(cols, kind="stable")  # the cumulative weights run in dataset column order
    cols, counts = cols[order], counts[order]
    weights = torch.log1p(torch.from_numpy(counts.astype(np.int64))[None])  # int64 -> float32, as the reference
    probs = (weights / torch.sum(weights))[0].numpy()
    probs = probs / sum(probs)
    choice = rng.choice(np.arange(len(probs)), size=sample_size, p=probs, replace=True)
    chrom_of = genes["chrom"][cols]
    start_of = genes["start"][cols].astype(np.int64)
    choice = choice[np.argsort(chrom_of[choice])]
    new_chrom, starts = chrom_of[choice], start_of[choice]
    chrom_order = np.unique(new_chrom)
    rng.shuffle(chrom_order)
    parts = [np.array([CLS_TOKEN], dtype=np.int64)]
    for code in chrom_order:
        loc = np.where(new_chrom == code)[0]
        picked = cols[choice[loc[np.argsort(starts[loc])]]]
        parts.append(np.concatenate([[code + chrom_offset], genes["token"][picked], [CHROM_CLOSE_TOKEN]]).astype(np.int64))
    return np.concatenate(parts)


class _ReferenceStream:
    """The reference's global numpy RNG, replayed: ``RandomState(seed)`` consumed in row order."""

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)
        self.numpy: np.random.RandomState | None = None
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


def _cell_sentence(sampled: np.ndarray, genes: dict[str, np.ndarray], rng: np.random.Generator, chrom_offset: int) -> np.ndarray:
    """CLS, then per chromosome (random order): chromosome token, genes by start, closing token."""
    chrom = genes["chrom"][sampled]
    chrom_order = rng.permutation(np.unique(chrom))
    parts = [np.array([CLS_TOKEN], dtype=np.int64)]
    for code in chrom_order:
        here = sampled[chrom == code]
        tokens = genes["token"][here]
        by_start = np.lexsort((tokens, genes["start"][here]))  # start, then token: deterministic ties
        parts.append(np.concatenate([[code + chrom_offset], tokens[by_start], [CHROM_CLOSE_TOKEN]]).astype(np.int64))
    return np.concatenate(parts)


# ---- tiny official-format checkpoint -----------------------------------------------------------
def _default_genes(n: int = 2000) -> list[str]:
    from scdm.store.genes import gene_table

    table = gene_table()
    return sorted(set(table.loc[table["ensembl"] != "", "symbol"]))[:n]


def _randomise_(model: nn.Module, generator: torch.Generator) -> None:
    """Random values for every trainable parameter (LayerNorms included) so tests can tell them apart."""
    with torch.no_grad():
        for module in model.modules():
            for name, param in module.named_parameters(recurse=False):
                if not param.requires_grad:  # the frozen token table is written separately
                    continue
                noise = torch.randn(param.shape, generator=generator)
                if isinstance(module, nn.LayerNorm) and name == "weight":
                    param.copy_(1.0 + 0.1 * noise)
                else:
                    param.copy_(noise / math.sqrt(param.shape[-1]) if param.dim() > 1 else 0.1 * noise)


def write_tiny_checkpoint(
    folder: str | Path,
    *,
    genes: list[str] | None = None,
    seed: int = 0,
    variant: str = "4layer",
    store_token_table: bool = False,
    released_token_rows: bool = False,
    **config_overrides: Any,
) -> Path:
    """Write a small random UCE folder in the official format.

    The token table has the official layout: mouse genes first, then human genes (so the human
    offset is not 0), then 1,895 chromosome tokens. ``species_chrom.csv`` gives every gene a
    chromosome among 1..22, X, Y (human) and 1..3 (mouse). The model file holds every key of the
    reference ``TransformerModel``, pretraining heads included (``binary_decoder`` with its
    hard-coded 2048/512/128 widths and ``output_dim + 1280`` inputs, ``gene_embedding_layer``).

    Parameters
    ----------
    folder
        Created if missing.
    genes
        Human gene symbols (default: 2000 symbols from the shipped gene table).
    seed
        Seeds weights, token vectors and gene positions.
    variant
        Which official model file name to write (``"4layer"`` or ``"33layer"``).
    store_token_table
        Store the real token table in the model file's ``pe_embedding.weight`` instead of zeros.
        The loader keeps it only when ``all_tokens.torch`` has the released 145,469 rows.
    released_token_rows
        Pad the token table with zero rows after the genes to the released 145,469 rows (the
        chromosome tokens start at row 143,574, as in the real files), so the loader keeps the
        model file's table, as ``evaluate.py`` does.
    **config_overrides
        ``token_dim`` (16), ``d_model`` (40), ``n_heads`` (20), ``d_hid`` (48), ``n_layers`` (2),
        ``decoder_hidden`` (24), ``output_dim`` (24), ``max_len`` (1536).

    Returns
    -------
    Path
        The folder.
    """
    folder = Path(folder)
    (folder / PROTEIN_DIR).mkdir(parents=True, exist_ok=True)
    human = list(dict.fromkeys(genes if genes is not None else _default_genes()))
    mouse = [f"Mmgene{i}" for i in range(7)]
    cfg: dict[str, Any] = {"token_dim": 16, "d_model": 40, "n_heads": N_HEADS, "d_hid": 48, "n_layers": 2, "decoder_hidden": 24, "output_dim": 24, "max_len": 1536}
    cfg.update(config_overrides)
    generator = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)

    n_genes = len(mouse) + len(human)
    table = torch.randn((n_genes + N_CHROM_TOKENS, cfg["token_dim"]), generator=generator)
    if released_token_rows:
        if n_genes > N_ESM2_TOKENS:
            msg = f"released_token_rows: {n_genes} genes do not fit in the {N_ESM2_TOKENS:,} ESM2 rows."
            raise InputDataError(msg)
        padding = torch.zeros((N_ESM2_TOKENS - n_genes, cfg["token_dim"]))
        table = torch.cat([table[:n_genes], padding, table[n_genes:]])
    n_tokens = table.shape[0]
    # protein dicts: insertion order (not alphabetical) defines token rows
    human_order = rng.permutation(len(human))
    human_dict = {human[j]: table[len(mouse) + k].clone() for k, j in enumerate(human_order)}
    mouse_dict = {g: table[k].clone() for k, g in enumerate(mouse)}
    torch.save(human_dict, folder / PROTEIN_DIR / SPECIES_FILES["human"])
    torch.save(mouse_dict, folder / PROTEIN_DIR / SPECIES_FILES["mouse"])
    with open(folder / OFFSETS_FILE, "wb") as f:
        pickle.dump({"mouse": 0, "human": len(mouse)}, f)
    torch.save(table, folder / TOKEN_FILE)

    human_chroms = [str(c) for c in range(1, 23)] + ["X", "Y"]
    rows = [("human", g.upper(), human_chroms[rng.integers(len(human_chroms))], int(rng.integers(1, 10**8))) for g in human]
    rows += [("mouse", g.upper(), str(rng.integers(1, 4)), int(rng.integers(1, 10**8))) for g in mouse]
    pd.DataFrame(rows, columns=["species", "gene_symbol", "chromosome", "start"]).to_csv(folder / CHROM_FILE, index=False)

    model = UCEModel(n_tokens=n_tokens, **{k: cfg[k] for k in ("token_dim", "d_model", "n_heads", "d_hid", "n_layers", "decoder_hidden", "output_dim", "max_len")})
    _randomise_(model, generator)
    state = dict(model.state_dict())
    state["pe_embedding.weight"] = table.clone() if store_token_table else torch.zeros_like(table)
    d, out = cfg["d_model"], cfg["output_dim"]
    # Pretraining heads, laid out as the reference builds them: binary_decoder = three full blocks
    # (Linear, LayerNorm, GELU, Dropout) of widths 2048, 512, 128 whose input is output_dim + 1280
    # (a literal in model.py, the released d_model), then Linear(128, 1); gene_embedding_layer =
    # Linear(token_dim, d_model), GELU, LayerNorm.
    heads: dict[str, tuple[int, ...]] = {}
    widths = [out + 1280, 2048, 512, 128]
    for j, (width_in, width_out) in enumerate(zip(widths[:-1], widths[1:])):
        heads |= {f"binary_decoder.{j}.0.weight": (width_out, width_in), f"binary_decoder.{j}.0.bias": (width_out,),
                  f"binary_decoder.{j}.1.weight": (width_out,), f"binary_decoder.{j}.1.bias": (width_out,)}
    heads |= {
        "binary_decoder.3.weight": (1, widths[-1]), "binary_decoder.3.bias": (1,),
        "gene_embedding_layer.0.weight": (d, cfg["token_dim"]), "gene_embedding_layer.0.bias": (d,),
        "gene_embedding_layer.2.weight": (d,), "gene_embedding_layer.2.bias": (d,),
    }  # fmt: skip
    for key, shape in heads.items():
        state[key] = torch.randn(shape, generator=generator) / math.sqrt(shape[-1])
    torch.save(state, folder / MODEL_FILES[variant])
    return folder
