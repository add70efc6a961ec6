"""scFoundation / xTrimoGene (biomap-research/scFoundation): an MAE whose encoder sees non-zero genes.

Checkpoint folder (MODELS.md section 3.1)::

    models.ckpt                      from the SharePoint link in model/models/download.txt: a dict
                                     {'cell': ..., 'rde': ..., 'gene': ...}, each
                                     {'config': {...}, 'state_dict': {'model.token_emb...': ...}}
    OS_scRNA_gene_index.19264.tsv    from the GitHub repo (model/): columns gene_name, index -- the
                                     fixed gene order; it is NOT inside models.ckpt, so it must be
                                     copied next to it

What one cell becomes (``model/get_embedding.py``, ``--input_type singlecell --output_type cell
--pre_normalized F``):

1. reindex the counts to the 19,264 genes of the index file; genes the dataset lacks are zero;
2. ``x = log1p(counts / counts.sum() * 1e4)`` (sum over those 19,264 genes);
3. append T (target resolution; ``tgthighres='t4'`` -> 4) and S = ``log10(total count)``;
4. keep only positions whose value is > 0, in gene-index order; position ids are gene indices
   (T = 19264, S = 19265);
5. ``token_emb`` (auto-discretisation over 100 bins) + ``pos_emb`` -> post-LN transformer encoder
   + final LayerNorm;
6. embedding = concat(h[S], h[T], max over genes, mean over genes) -> 4 x 768 = 3072-d.

The reference embeds one cell at a time; we batch with right padding and exclude pads from
attention (boolean key mask) and from the max/mean, so a cell's embedding does not depend on its
batch (in both modes: the reference has no batch effect to reproduce).

Difference, on purpose (``reference_quirks=False``): T and S are always kept. The reference's
``gatherData`` keeps only tokens whose value is > 0, T and S included, and then pools by position
(``h[:, -1]`` as S, ``h[:, -2]`` as T, max/mean over ``h[:, :-2]``): when S = log10(total) is 0
(total count 1) or T is <= 0 (``tgthighres`` such as ``"a-3"`` or ``"f0.001"`` on small cells),
it drops the token and then pools the wrong positions (a gene as T, T as S, one gene fewer in
the max/mean). ``reference_quirks=True`` does exactly that; a cell left with fewer than three
tokens is refused, where the reference crashes on an empty max. With the default ``"t4"`` this
concerns only cells with total count 1.

In both modes a cell without counts in the 19,264 genes is refused (the reference divides by
zero), and a dataset gene listed twice keeps its first column (the reference would misalign its
columns).

``models.ckpt`` is read with ``torch.load(weights_only=True)`` plus numpy values and
``argparse.Namespace`` (:mod:`scdm.embedding._safe_load`): a file that asks to unpickle anything else
is refused, never run.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
from scdm.embedding._safe_load import load_torch_file
from scdm.embedding.models._common import half_dtype, hold_weights_in
from scdm.store.errors import CheckpointError, InputDataError

if TYPE_CHECKING:
    import scipy.sparse as sp

__all__ = ["ScFoundationAdapter", "ScFoundationModel", "write_tiny_checkpoint"]

logger = logging.getLogger(__name__)

MODEL_FILE = "models.ckpt"
GENE_INDEX_GLOB = "OS_scRNA_gene_index.*.tsv"
SUB_MODELS = ("cell", "rde", "gene")
_USED_PREFIXES = ("token_emb.", "pos_emb.", "encoder.")


# ---- model -------------------------------------------------------------------------------------
class SelfAttention(nn.Module):
    """Multi-head self-attention with ``nn.MultiheadAttention``'s parameter names, run by SDPA.

    ``out_proj`` is a real ``nn.Linear`` called through its ``forward``, so LoRA can target it.
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if d_model % n_heads:
            msg = f"hidden_dim={d_model} is not divisible by heads={n_heads}."
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
        keep = None if padding_mask is None else ~padding_mask[:, None, None, :]  # True = attend
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).reshape(n, length, d_model))


class EncoderLayer(nn.Module):
    """Post-LN layer, ReLU, feed-forward 4 x d: ``nn.TransformerEncoderLayer``'s names and maths."""

    def __init__(self, d_model: int, n_heads: int, d_hid: int, dropout: float = 0.1) -> None:
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


class Encoder(nn.Module):
    """``pytorchTransformerModule``: layers at ``transformer_encoder.{i}``, then ``norm``."""

    def __init__(self, d_model: int, depth: int, n_heads: int) -> None:
        super().__init__()
        self.transformer_encoder = nn.ModuleList(EncoderLayer(d_model, n_heads, 4 * d_model) for _ in range(depth))
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor:
        for layer in self.transformer_encoder:
            x = layer(x, padding_mask)
        return self.norm(x)


class AutoDiscretizationEmbedding(nn.Module):
    """Scalar value -> soft mixture of ``bin_num`` learned bin vectors (``AutoDiscretizationEmbedding2``).

    Values equal to ``mask_token_id`` / ``pad_token_id`` get the ``emb_mask`` / ``emb_pad``
    vectors instead: the reference recognises them by value.
    """

    def __init__(self, d_model: int, bin_num: int, bin_alpha: float, mask_token_id: int, pad_token_id: int) -> None:
        super().__init__()
        self.bin_alpha = bin_alpha
        self.mask_token_id = mask_token_id
        self.pad_token_id = pad_token_id
        self.mlp = nn.Linear(1, bin_num)
        self.mlp2 = nn.Linear(bin_num, bin_num)
        self.emb = nn.Embedding(bin_num, d_model)
        self.emb_mask = nn.Embedding(1, d_model)
        self.emb_pad = nn.Embedding(1, d_model)

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        v = values.unsqueeze(-1).float()
        # value -> bin weights in float32 whatever the autocast: bf16 would round the expression value
        # to 8 mantissa bits (log1p 5.30 and 5.31 alike) before mlp, whose sharp bins amplify that
        # (8 % relative error of the embedding instead of 0.4 %); the reference runs float32
        with torch.autocast(device_type=v.device.type, enabled=False):
            hidden = F.leaky_relu(self.mlp(v), negative_slope=0.1)
            weights = torch.softmax(self.bin_alpha * hidden + self.mlp2(hidden), dim=-1)
        x = weights @ self.emb.weight.to(weights.dtype)
        x = torch.where(v == self.mask_token_id, self.emb_mask.weight[0].to(x.dtype), x)
        return torch.where(v == self.pad_token_id, self.emb_pad.weight[0].to(x.dtype), x)


class ScFoundationModel(nn.Module):
    """The encoder half of ``MaeAutobin`` (the Performer decoder is not built).

    Parameters
    ----------
    config
        The merged ``mae_autobin`` + ``rnaseq`` config of the checkpoint (``seq_len``,
        ``encoder``, ``bin_num``, ``bin_alpha``, ``pad_token_id``, ``mask_token_id``).
    """

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        enc = config["encoder"]
        d_model = int(enc["hidden_dim"])
        self.token_emb = AutoDiscretizationEmbedding(
            d_model, int(config["bin_num"]), float(config["bin_alpha"]), int(config["mask_token_id"]), int(config["pad_token_id"])
        )
        self.pos_emb = nn.Embedding(int(config["seq_len"]) + 1, d_model)
        self.encoder = Encoder(d_model, int(enc["depth"]), int(enc["heads"]))

    def forward(self, input_ids: torch.Tensor, values: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor:
        """Encoder output, shape (n_cells, n_tokens, hidden_dim)."""
        # the sum enters the first residual stream in float32 also when the tables are half precision
        x = self.token_emb(values).float() + self.pos_emb(input_ids).float()
        return self.encoder(x, padding_mask)


def _merged_config(entry: dict[str, Any], where: str) -> dict[str, Any]:
    """``load.convertconfig``: merge ``model_config[model]`` and ``dataset_config['rnaseq']``."""
    try:
        raw = entry["config"]
        model_type = raw["model"]
        config = dict(raw["model_config"][model_type])
        config.update(raw["dataset_config"]["rnaseq"])
    except (KeyError, TypeError) as err:
        msg = f"{where} has no scFoundation config (config.model_config / config.dataset_config.rnaseq): missing {err}."
        raise CheckpointError(msg) from err
    if model_type != "mae_autobin":
        msg = f"{where} is a {model_type!r} model; only 'mae_autobin' (the released scFoundation) is supported."
        raise CheckpointError(msg)
    if config.get("encoder", {}).get("module_type", "transformer") != "transformer":
        msg = f"{where} has a {config['encoder']['module_type']!r} encoder; only 'transformer' encoders are supported."
        raise CheckpointError(msg)
    return config


# ---- adapter -----------------------------------------------------------------------------------
@register_adapter
class ScFoundationAdapter(Adapter):
    """scFoundation cell embeddings: concat(S, T, max, mean) of the encoder output.

    Parameters
    ----------
    checkpoint
        Folder with ``models.ckpt`` and ``OS_scRNA_gene_index.19264.tsv``.
    seed
        Unused (tokenisation is deterministic); kept for the common interface.
    sub_model
        Which model of ``models.ckpt``: ``"cell"`` (``--version ce``, default), ``"rde"`` (read-depth
        enhancement) or ``"gene"``.
    tgthighres
        Target resolution token: ``"tX"`` -> T = X; ``"fX"`` -> T = log10(total * X);
        ``"aX"`` -> T = log10(total) + X (reference default ``"t4"``).
    pool_type
        ``"all"``: concat(S, T, max, mean) (4 x hidden); ``"max"``: max over all tokens (hidden).
    reference_quirks
        Drop T/S tokens whose value is not > 0 and pool by position, as the reference does
        (see the module docstring); default: T and S always kept.
    """

    name = "scfoundation"
    description = "scFoundation / xTrimoGene 100M (biomap): concat(S, T, max, mean) of the encoder on non-zero genes"
    gene_id_kind = "symbol"
    requires_counts = True
    checkpoint_files = (MODEL_FILE, GENE_INDEX_GLOB)
    lora_target_modules = ("self_attn.out_proj", "linear1", "linear2")
    default_batch_size = 8
    half_precision_weights = True

    def __init__(
        self,
        checkpoint: str | Path | None = None,
        *,
        seed: int = 0,
        sub_model: str = "cell",
        tgthighres: str = "t4",
        pool_type: str = "all",
        reference_quirks: bool = False,
    ) -> None:
        super().__init__(checkpoint, seed=seed)
        if not isinstance(reference_quirks, bool):
            msg = f"scfoundation reference_quirks={reference_quirks!r} must be True or False."
            raise InputDataError(msg)
        self.reference_quirks = reference_quirks
        if sub_model not in SUB_MODELS:
            msg = f"sub_model={sub_model!r} is not in models.ckpt; choose one of {', '.join(SUB_MODELS)} ('cell' for cell embeddings)."
            raise InputDataError(msg)
        if pool_type not in ("all", "max"):
            msg = f"pool_type={pool_type!r} is unknown; use 'all' (concat S, T, max, mean) or 'max'."
            raise InputDataError(msg)
        self.sub_model = sub_model
        self.tgthighres = tgthighres
        self.pool_type = pool_type
        self._target = _parse_tgthighres(tgthighres)
        self._config: dict[str, Any] | None = None
        self._genes: list[str] | None = None
        self._gene_index: np.ndarray | None = None  # model gene index per dataset column, -1 = unused

    # ---- checkpoint files -----------------------------------------------------------------
    def _folder(self) -> Path:
        self.check_checkpoint()
        assert self.checkpoint is not None
        return self.checkpoint

    def _read_entry(self, *, mmap: bool = True) -> dict[str, Any]:
        path = self._folder() / MODEL_FILE
        ckpt = load_torch_file(path, what=f"scFoundation's {MODEL_FILE} (configs and state_dicts)", mmap=mmap)
        if not isinstance(ckpt, dict) or self.sub_model not in ckpt:
            keys = ", ".join(map(str, ckpt)) if isinstance(ckpt, dict) else type(ckpt).__name__
            msg = f"{str(path)!r} has no {self.sub_model!r} model (it holds: {keys}). Use the official models.ckpt or another sub_model."
            raise CheckpointError(msg)
        return ckpt[self.sub_model]

    def model_config(self) -> dict[str, Any]:
        """The chosen sub-model's merged config (read without loading the weights into memory)."""
        if self._config is None:
            self._config = _merged_config(self._read_entry(), f"{MODEL_FILE}[{self.sub_model!r}]")
        return self._config

    def genes(self) -> list[str]:
        """The model's gene order from ``OS_scRNA_gene_index.*.tsv``."""
        if self._genes is None:
            paths = sorted(self._folder().glob(GENE_INDEX_GLOB))
            if len(paths) > 1:
                msg = f"Checkpoint folder holds several gene index files ({', '.join(p.name for p in paths)}); keep only the one that came with the model."
                raise CheckpointError(msg)
            table = pd.read_csv(paths[0], sep="\t", header=0, dtype={"gene_name": str}, keep_default_na=False)
            if "gene_name" not in table.columns:
                msg = f"{str(paths[0])!r} has no 'gene_name' column; it is not scFoundation's gene index."
                raise CheckpointError(msg)
            if "index" in table.columns and not np.array_equal(table["index"].to_numpy(), np.arange(len(table))):
                msg = f"{str(paths[0])!r} is not sorted by its 'index' column 0..{len(table) - 1}; restore the original file."
                raise CheckpointError(msg)
            self._genes = table["gene_name"].tolist()
        return self._genes

    # ---- model ----------------------------------------------------------------------------
    def load(self, device: str | torch.device = "cpu") -> None:
        config = self.model_config()
        n_genes = len(self.genes())
        if int(config["seq_len"]) != n_genes + 2:
            msg = (
                f"{MODEL_FILE} expects seq_len={config['seq_len']} (= genes + T + S) but the gene index lists "
                f"{n_genes} genes; use the gene index file that came with this model."
            )
            raise CheckpointError(msg)
        with torch.device("meta"):  # no random init: every tensor comes from the file
            model = ScFoundationModel(config)
        self._load_weights(model)
        # mlp/mlp2 stay float32 (10k weights): they take the expression value in float32 (see AutoDiscretizationEmbedding)
        hold_weights_in(model, half_dtype(self.weight_precision), keep=(model.token_emb.mlp, model.token_emb.mlp2))
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        enc = config["encoder"]
        logger.info("Loaded scFoundation %r from %s (%s layers, d=%s).", self.sub_model, self.checkpoint, enc["depth"], enc["hidden_dim"])

    def _load_weights(self, model: ScFoundationModel) -> None:
        """Strip Lightning's ``model.`` prefix, drop the decoder, load strictly."""
        entry = self._read_entry()
        state = entry.get("state_dict") if isinstance(entry, dict) else None
        if not isinstance(state, dict):
            msg = f"{MODEL_FILE}[{self.sub_model!r}] has no 'state_dict'. Re-download models.ckpt."
            raise CheckpointError(msg)
        stripped = {k.removeprefix("model."): v for k, v in state.items()}
        kept = {k: v.float() for k, v in stripped.items() if k.startswith(_USED_PREFIXES)}
        dropped = sorted({k.split(".", 1)[0] for k in stripped if k not in kept})
        if dropped:
            logger.info("scFoundation: not loading parts unused for cell embeddings: %s", ", ".join(dropped))
        try:
            model.load_state_dict(kept, strict=True, assign=True)
        except RuntimeError as err:
            msg = f"{MODEL_FILE}[{self.sub_model!r}] weights do not match its config: {err}"
            raise CheckpointError(msg) from err

    @property
    def emb_dim(self) -> int:
        hidden = int(self.model_config()["encoder"]["hidden_dim"])
        return 4 * hidden if self.pool_type == "all" else hidden

    def configure_precision(self, device: str | torch.device, precision: str) -> dict[str, Any]:
        """As every adapter, plus ``value_bins: float32`` for a half-precision run.

        The value -> bin weights once ran under the autocast (bf16 rounded the expression value
        first); they now run in float32, so a bf16/fp16 embedding gets an identity of its own and
        an old one made the other way is never reused as if it were this one.
        """
        out = super().configure_precision(device, precision)
        if precision in ("bf16", "fp16"):
            out["value_bins"] = "float32"
        return out

    def params(self) -> dict[str, Any]:
        return {
            "sub_model": self.sub_model,
            "tgthighres": _tgthighres_key(self.tgthighres),
            "pool_type": self.pool_type,
            "reference_quirks": self.reference_quirks,
            "tail_tokens": "kept when > 0, pooled by position (reference)" if self.reference_quirks else "T and S always kept",
            "pre_normalized": "F",
            "normalize": "log1p(x / sum * 1e4) over the model's genes",
        }

    # ---- data -----------------------------------------------------------------------------
    def prepare(self, var_genes: Sequence[str], *, gene_id_kind: str) -> GeneAudit:
        from scdm.store.genes import map_genes

        symbols = map_genes([str(g) for g in var_genes], src=gene_id_kind, dst="symbol")  # type: ignore[arg-type]
        model_genes = self.genes()
        position = {g: i for i, g in enumerate(model_genes)}
        index = np.full(len(symbols), -1, dtype=np.int64)
        seen: set[int] = set()
        n_duplicates = 0
        for col, symbol in enumerate(symbols):
            i = position.get(symbol) if symbol is not None else None
            if i is None:
                continue
            if i in seen:  # a second column for the same gene: keep the first
                n_duplicates += 1
                continue
            seen.add(i)
            index[col] = i
        unmatched = tuple(str(g) for g, s in zip(var_genes, symbols) if s is None or s not in position)[:20]
        audit = GeneAudit(
            n_input_genes=len(symbols),
            n_matched=int((index >= 0).sum()),
            unmatched_examples=unmatched,
            id_kind_used="symbol",
            extra={"n_model_genes": len(model_genes), "n_zero_filled": len(model_genes) - len(seen), "n_duplicate_columns_dropped": n_duplicates},
        )
        require_matches(audit, self.name)
        if n_duplicates:
            logger.info("scFoundation: %d dataset columns repeat a gene already matched; the first column is used.", n_duplicates)
        self._gene_index = index
        return audit

    def tokenize(self, x: sp.csr_matrix, rows: np.ndarray) -> list[dict[str, np.ndarray]]:
        if self._gene_index is None:
            msg = "Call prepare(var_genes, gene_id_kind=...) before tokenize()."
            raise RuntimeError(msg)
        check_counts(x, self.name)
        n_genes = len(self.genes())
        cells: list[dict[str, np.ndarray]] = []
        for i, row in enumerate(rows):
            start, end = x.indptr[i], x.indptr[i + 1]
            genes = self._gene_index[x.indices[start:end]]
            counts = x.data[start:end].astype(np.float64)
            keep = genes >= 0
            genes, counts = genes[keep], counts[keep]
            total = counts.sum()
            if not total > 0:
                msg = (
                    f"Cell at row {int(row)} has no counts in any of the {n_genes} scFoundation genes, so its "
                    "total count (and S token) is undefined (--allow-empty-cells cannot keep it: scFoundation has no "
                    "input for it). Remove such cells before ingest (e.g. keep the cells with counts in its gene panel; "
                    "scanpy.pp.filter_cells(adata, min_counts=1) removes empty ones)."
                )
                raise InputDataError(msg)
            # float64 maths, then float32 as the reference's torch.tensor(list) does
            values = np.log1p(counts / total * 1e4).astype(np.float32)
            order = np.argsort(genes, kind="stable")
            genes, values = genes[order], values[order]
            nonzero = values > 0
            tail_ids = np.array([n_genes, n_genes + 1], dtype=np.int64)
            tail = np.array([self._target(total), math.log10(total)], dtype=np.float32)
            if self.reference_quirks:  # gatherData keeps only values > 0, T and S included
                tail_ids, tail = tail_ids[tail > 0], tail[tail > 0]
            input_ids = np.concatenate([genes[nonzero], tail_ids]).astype(np.int64)
            if self.reference_quirks and self.pool_type == "all" and len(input_ids) < 3:
                msg = (
                    f"Cell at row {int(row)} keeps only {len(input_ids)} token(s) once T/S values <= 0 are dropped "
                    f"(total count {total:g}, tgthighres={self.tgthighres!r}); the reference crashes on it. Remove the "
                    "cell, or embed without reference_quirks."
                )
                raise InputDataError(msg)
            cells.append({"input_ids": input_ids, "values": np.concatenate([values[nonzero], tail]).astype(np.float32)})
        return cells

    def collate(self, cells: list[dict[str, np.ndarray]]) -> dict[str, Any]:
        """Right-padded ``input_ids`` and ``values``; ``padding_mask`` (True = pad) is None when no cell is padded."""
        pad_value = float(self.model_config()["pad_token_id"])  # recognised by value, as in gatherData
        length = max(len(c["input_ids"]) for c in cells)
        ids = np.zeros((len(cells), length), dtype=np.int64)
        values = np.full((len(cells), length), pad_value, dtype=np.float32)
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
        padding = batch.get("padding_mask")  # None: no cell of the batch is padded
        hidden = self.model(batch["input_ids"], batch["values"], padding).float()
        if self.pool_type == "max":
            return hidden.amax(dim=1) if padding is None else hidden.masked_fill(padding[..., None], float("-inf")).amax(dim=1)
        if padding is None:
            lengths = torch.full((hidden.shape[0],), hidden.shape[1], dtype=torch.long, device=hidden.device)
        else:
            lengths = (~padding).sum(dim=1)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        # by position, like the reference: in quirk mode a dropped T/S shifts what these pick
        source, target = hidden[rows, lengths - 1], hidden[rows, lengths - 2]
        positions = torch.arange(hidden.shape[1], device=hidden.device)
        is_gene = positions[None, :] < (lengths - 2)[:, None]  # excludes T, S and pads
        gene_max = hidden.masked_fill(~is_gene[..., None], float("-inf")).amax(dim=1)
        gene_mean = (hidden * is_gene[..., None]).sum(dim=1) / is_gene.sum(dim=1, keepdim=True)
        return torch.cat([source, target, gene_max, gene_mean], dim=1)


def _tgthighres_key(tgthighres: str) -> str:
    """``tgthighres`` spelled one way per target (``'t4.0'`` and ``'t04'`` are ``'t4'``): an embedding's identity.

    The spellings set the same T, so keyed as given they were two embeddings (and spaces) of one computation;
    ``'t4'``, the default, keeps its spelling and so its stored ids.
    """
    amount = float(tgthighres[1:])
    return tgthighres[:1] + (str(int(amount)) if amount.is_integer() else repr(amount))


def _parse_tgthighres(tgthighres: str) -> Any:
    """``'t4'`` -> total -> 4.0; ``'f1'`` -> log10(total * 1); ``'a5'`` -> log10(total) + 5."""
    kind, number = (tgthighres[:1], tgthighres[1:]) if isinstance(tgthighres, str) else ("", "")
    try:
        amount = float(number)
    except ValueError:
        amount = None
    if kind not in ("t", "f", "a") or amount is None or not math.isfinite(amount):
        msg = (f"tgthighres={tgthighres!r} must be 't<value>', 'f<fold>' or 'a<addition>' with a finite number "
               "(e.g. 't4', the default for cell embeddings).")
        raise InputDataError(msg)
    if kind == "f" and amount <= 0:  # T = log10(total * fold): undefined for a fold <= 0
        msg = f"tgthighres={tgthighres!r}: the fold of 'f<fold>' must be > 0 (T = log10(total count x fold)), e.g. 'f1'."
        raise InputDataError(msg)
    if kind == "t":
        return lambda total: amount
    if kind == "f":
        return lambda total: math.log10(total * amount)
    return lambda total: math.log10(total) + amount


# ---- tiny official-format checkpoint -----------------------------------------------------------
def _default_genes(n: int = 2000) -> list[str]:
    from scdm.store.genes import gene_table

    table = gene_table()
    return sorted(set(table.loc[table["ensembl"] != "", "symbol"]))[:n]


def _random_tensor(shape: tuple[int, ...], generator: torch.Generator, *, norm_weight: bool = False) -> torch.Tensor:
    noise = torch.randn(shape, generator=generator)
    if norm_weight:
        return 1.0 + 0.1 * noise
    return noise / math.sqrt(shape[-1]) if len(shape) > 1 else 0.1 * noise


def write_tiny_checkpoint(folder: str | Path, *, genes: list[str] | None = None, seed: int = 0, **config_overrides: Any) -> Path:
    """Write a small random scFoundation folder in the official format.

    ``models.ckpt`` holds ``cell``, ``rde`` and ``gene`` entries (different random weights), each
    ``{'config': {'model': 'mae_autobin', 'model_config': {'mae_autobin': {'model': 'mae_autobin',
    ...}}, 'dataset_config': {'rnaseq': {...}}}, 'state_dict': {'model.<key>': tensor}}`` including
    a small Performer decoder, and ``OS_scRNA_gene_index.<n>.tsv`` lists the genes. Only plain
    containers, strings, numbers and tensors: the file loads with ``weights_only=True``.

    Parameters
    ----------
    folder
        Created if missing.
    genes
        Gene symbols of the model's gene index (default: 2000 symbols from the shipped gene table).
    seed
        Seeds the random weights.
    **config_overrides
        Top-level ``mae_autobin`` config values to change (``encoder``, ``decoder``, ``bin_num``, ...).

    Returns
    -------
    Path
        The folder.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    genes = list(dict.fromkeys(genes if genes is not None else _default_genes()))
    seq_len = len(genes) + 2
    model_config: dict[str, Any] = {
        # the reference's load_model_frommmf reads ``model`` from the merged config (select_model)
        "model": "mae_autobin",
        "encoder": {"hidden_dim": 32, "depth": 2, "heads": 4, "dim_head": 8, "module_type": "transformer", "norm_first": False},
        "decoder": {"hidden_dim": 16, "depth": 1, "heads": 2, "dim_head": 8, "module_type": "performer"},
        "n_class": 104, "pad_token_id": 103, "mask_token_id": 102, "bin_num": 10, "bin_alpha": 1.0,
        "mae_encoder_max_seq_len": 15000,
    }  # fmt: skip
    model_config.update(config_overrides)
    config = {
        "model": "mae_autobin",
        "model_config": {"mae_autobin": model_config},
        "dataset_config": {"rnaseq": {"gene_num": seq_len, "seq_len": seq_len}},
    }
    ckpt = {}
    for offset, key in enumerate(SUB_MODELS):
        generator = torch.Generator().manual_seed(seed * 10 + offset)
        ckpt[key] = {"config": config, "state_dict": _tiny_state(_merged_config({"config": config}, "tiny"), generator)}
    torch.save(ckpt, folder / MODEL_FILE)
    pd.DataFrame({"gene_name": genes, "index": np.arange(len(genes))}).to_csv(folder / f"OS_scRNA_gene_index.{len(genes)}.tsv", sep="\t", index=False)
    return folder


def _tiny_state(config: dict[str, Any], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random weights for every key of ``MaeAutobin`` (encoder, decoder and heads), Lightning-prefixed."""
    encoder = ScFoundationModel(config)
    state: dict[str, torch.Tensor] = {}
    for name, tensor in encoder.state_dict().items():
        is_norm_weight = "norm" in name and name.endswith("weight")
        state[name] = _random_tensor(tuple(tensor.shape), generator, norm_weight=is_norm_weight)
    d_enc, dec = int(config["encoder"]["hidden_dim"]), config["decoder"]
    d_dec, inner = int(dec["hidden_dim"]), int(dec["heads"]) * int(dec["dim_head"])
    n_features = int(int(dec["dim_head"]) * math.log(int(dec["dim_head"])))
    shapes: dict[str, tuple[int, ...]] = {
        "decoder_embed.weight": (d_dec, d_enc), "decoder_embed.bias": (d_dec,),
        "norm.weight": (d_dec,), "norm.bias": (d_dec,), "to_final.weight": (1, d_dec), "to_final.bias": (1,),
        "decoder.norm.weight": (d_dec,), "decoder.norm.bias": (d_dec,),
    }  # fmt: skip
    for i in range(int(dec["depth"])):
        attn, ff = f"decoder.performer.net.layers.{i}.0", f"decoder.performer.net.layers.{i}.1"
        shapes.update({
            f"{attn}.norm.weight": (d_dec,), f"{attn}.norm.bias": (d_dec,),
            f"{attn}.fn.fast_attention.projection_matrix": (n_features, int(dec["dim_head"])),
            f"{attn}.fn.to_q.weight": (inner, d_dec), f"{attn}.fn.to_q.bias": (inner,),
            f"{attn}.fn.to_k.weight": (inner, d_dec), f"{attn}.fn.to_k.bias": (inner,),
            f"{attn}.fn.to_v.weight": (inner, d_dec), f"{attn}.fn.to_v.bias": (inner,),
            f"{attn}.fn.to_out.weight": (d_dec, inner), f"{attn}.fn.to_out.bias": (d_dec,),
            f"{ff}.norm.weight": (d_dec,), f"{ff}.norm.bias": (d_dec,),
            f"{ff}.fn.fn.w1.weight": (4 * d_dec, d_dec), f"{ff}.fn.fn.w1.bias": (4 * d_dec,),
            f"{ff}.fn.fn.w2.weight": (d_dec, 4 * d_dec), f"{ff}.fn.fn.w2.bias": (d_dec,),
        })  # fmt: skip
    for name, shape in shapes.items():
        state[name] = _random_tensor(shape, generator, norm_weight="norm" in name and name.endswith("weight"))
    state["decoder.performer.calls_since_last_redraw"] = torch.tensor(0)
    return {f"model.{k}": v for k, v in state.items()}
