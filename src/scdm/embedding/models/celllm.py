"""CellLM (PharMolix/OpenBioMed ``PerformerLM_CellLM``): a Performer over a cell's expressed genes.

Checkpoint folder (MODELS.md section 7.1; files from the OpenBioMed Baidu-pan release)::

    checkpoint4_fixed.pth        torch.save({... 'model_state_dict': ...}) (configs/ctc/cellLM.json)
    gene2vec_19379_512.npy       gene2vec table; its rows are the model's genes, in order
    gene_list.txt                the 19,379 gene symbols in gene2vec row order, one per line

The gene list is not part of the OpenBioMed repository (the model only sees gene indices);
scdm needs it as ``gene_list.txt`` next to the other two files. The positions the model uses
come from ``pos_emb.emb.weight`` in the checkpoint (gene2vec + a CLS row of ones + a PAD row of
zeros, float64); the ``.npy`` is only checked against the gene list.

Input (``PerformerLM_CellLM.forward``, fed like scBERT with ``normalize_total(1e4)`` +
``log1p(base=2)`` of counts aligned to the gene list): the genes with x > 0 **in gene-list
order**, token ``floor(min(x, 5))``, position = gene index; a CLS token (6) at position 19,379
in front; truncation to ``max_length`` = 6000 tokens keeps the *first genes by index*, not the
most expressed (as the reference does).

Padding. The reference pads every cell to ``max_seq_len`` (6000, whatever the batch) with token 7
at position 19,380, and its mask only zeroes the pad *values*: the pad keys stay inside the
FAVOR+ normaliser (and the key stabiliser). ``pad_masking="reference"`` (default, in both modes)
reproduces this exactly and cheaply: all pad rows of a cell are identical through every layer, so
one pad row whose key counts ``max_length - n_tokens`` times stands for all of them. The result
equals the reference forward of that cell (to float rounding of the sums: ~1e-7, see
``docs/reference-differences.md``) and, unlike UCE's float mask, does not depend on the batch,
because the reference pads to a fixed length; it is how the model was trained, so it is kept.
``pad_masking="masked"`` removes pads from attention altogether (a cell sees only its own tokens,
as a cell of exactly ``max_length`` tokens would); the numbers then differ from the reference for
every cell shorter than ``max_length``.

Batch dependence: as in scBERT, the fork's key stabiliser is one max over the batch tensor (pads
included). By default (``key_max="cell"``) it is taken per cell (= the reference run one cell at
a time), so embeddings do not depend on the batch. ``reference_quirks=True`` (or
``key_max="batch"``) takes the global max and reproduces a batched reference forward exactly;
the adapter is then ``batch_dependent`` (fixed batches of consecutive rows, batch size recorded).

Embedding (MODELS.md 7.4, not defined in code): ``pooling="cls"`` (default) is the CLS hidden
state after the final LayerNorm (CellLM was pretrained contrastively on CLS); ``"mean"`` averages
the gene tokens (CLS and pads excluded).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from scdm.embedding._adapter import Adapter, GeneAudit, check_counts, register_adapter
from scdm.embedding.models._performer import (
    PerformerConfig,
    PerformerEncoder,
    align_to_gene_list,
    config_from_state_dict,
    default_nb_features,
    encoder_state_dict,
    load_encoder,
    load_state_dict_file,
    log2_normalised_rows,
    pooled,
    random_state_dict,
    resolve_key_max,
)
from scdm.store.errors import CheckpointError, InputDataError

if TYPE_CHECKING:
    import scipy.sparse as sp

__all__ = ["CellLMAdapter", "write_tiny_checkpoint"]

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "checkpoint4_fixed.pth"
GENE2VEC_GLOB = "gene2vec_*.npy"
GENES_FILE = "gene_list.txt"
TARGET_SUM = 1e4
MAX_LENGTH = 6000
"""``max_seq_len`` of the official config: CLS + at most 5,999 genes."""
POOLINGS = ("cls", "mean")
PAD_MASKINGS = ("reference", "masked")


def read_gene_list(path: Path) -> list[str]:
    """Gene symbols, one per line (blank lines ignored)."""
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


@register_adapter
class CellLMAdapter(Adapter):
    """CellLM cell embeddings from the official OpenBioMed checkpoint.

    Parameters
    ----------
    checkpoint
        Folder with ``checkpoint4_fixed.pth``, ``gene2vec_19379_512.npy`` and ``gene_list.txt``.
    seed
        Unused (the input is deterministic); kept for the common interface.
    pooling
        ``"cls"`` (CLS token) or ``"mean"`` (mean over gene tokens).
    pad_masking
        ``"reference"`` (default): pad keys of the fixed 6000-token sequence stay in the
        normaliser, as in the reference; ``"masked"``: pads are excluded. Both are
        batch-independent; ``reference_quirks`` needs ``"reference"``.
    key_max
        FAVOR+ key stabiliser: ``"cell"`` (batch-independent) or ``"batch"`` (= a batched
        reference run). Default: ``"batch"`` with ``reference_quirks``, else ``"cell"``.
    max_length
        Tokens per cell including CLS (reference 6000).
    reference_quirks
        Reproduce a batched reference forward exactly (global key max over the batch, pads in
        the normaliser); the embedding then depends on the batch.
    """

    name = "celllm"
    description = "CellLM Performer (OpenBioMed, 19,379 genes, 512-d CLS)"
    gene_id_kind = "symbol"
    requires_counts = True
    checkpoint_files = (WEIGHTS_FILE, GENE2VEC_GLOB, GENES_FILE)
    lora_target_modules = ("fn.to_q", "fn.to_k", "fn.to_v", "fn.to_out", "fn.fn.w1", "fn.fn.w2")
    default_batch_size = 8

    def __init__(
        self,
        checkpoint: str | Path | None = None,
        *,
        seed: int = 0,
        pooling: str = "cls",
        pad_masking: str = "reference",
        key_max: str | None = None,
        max_length: int = MAX_LENGTH,
        reference_quirks: bool = False,
        **params: Any,
    ) -> None:
        super().__init__(checkpoint, seed=seed)
        if params:
            msg = (
                f"Unknown celllm parameter(s) {sorted(params)}; "
                "celllm accepts pooling, pad_masking, key_max, max_length, reference_quirks."
            )
            raise InputDataError(msg)
        for label, value, choices in (("pooling", pooling, POOLINGS), ("pad_masking", pad_masking, PAD_MASKINGS)):
            if value not in choices:
                msg = f"celllm {label}={value!r} is not supported; use one of {', '.join(choices)}."
                raise InputDataError(msg)
        if int(max_length) < 2:
            msg = f"celllm max_length={max_length!r} must be at least 2 (CLS + one gene); the reference uses 6000."
            raise InputDataError(msg)
        self.key_max = resolve_key_max(key_max, reference_quirks, self.name)
        if reference_quirks and pad_masking != "reference":
            msg = (
                f"celllm: pad_masking={pad_masking!r} contradicts reference_quirks=True, which keeps the reference's pad "
                "keys in the normaliser. Drop pad_masking, or drop reference_quirks."
            )
            raise InputDataError(msg)
        self.pooling = pooling
        self.pad_masking = pad_masking
        self.reference_quirks = reference_quirks
        # a key max over the batch lets batch mates into every cell: batches must be fixed row ranges
        self.batch_dependent = self.key_max == "batch"
        self.max_length = int(max_length)
        self._genes: list[str] | None = None
        self._cols: np.ndarray | None = None
        self._model_idx: np.ndarray | None = None
        self._config: PerformerConfig | None = None

    # ---- checkpoint -----------------------------------------------------------------------
    def _gene2vec_path(self) -> Path:
        assert self.checkpoint is not None
        found = sorted(self.checkpoint.glob(GENE2VEC_GLOB))
        if len(found) != 1:
            msg = (
                f"Checkpoint folder {str(self.checkpoint)!r} holds {len(found)} files matching {GENE2VEC_GLOB!r} "
                f"({', '.join(p.name for p in found)}); keep exactly one (gene2vec_19379_512.npy)."
            )
            raise CheckpointError(msg)
        return found[0]

    def _gene_list(self) -> list[str]:
        if self._genes is None:
            self.check_checkpoint()
            assert self.checkpoint is not None
            genes = read_gene_list(self.checkpoint / GENES_FILE)
            gene2vec_path = self._gene2vec_path()
            n_rows = np.load(gene2vec_path, mmap_mode="r").shape[0]
            if n_rows != len(genes):
                msg = (
                    f"{GENES_FILE} lists {len(genes)} genes but {gene2vec_path.name} has {n_rows} rows; the gene "
                    "list must name the gene2vec rows in order (19,379 for the official model)."
                )
                raise CheckpointError(msg)
            self._genes = genes
        return self._genes

    def _load_weights(self) -> tuple[PerformerConfig, dict[str, torch.Tensor]]:
        """Official state dict -> encoder state dict (drops the ``to_out`` head) and its config."""
        assert self.checkpoint is not None
        path = self.checkpoint / WEIGHTS_FILE
        state = load_state_dict_file(path)
        config = config_from_state_dict(state, str(path))
        n_genes = len(self._gene_list())
        if config.n_positions != n_genes + 2:
            msg = (
                f"{str(path)!r} has {config.n_positions} gene2vec positions but {GENES_FILE} lists {n_genes} genes "
                "(expected genes + 2: CLS and PAD rows). Use the gene list that belongs to this checkpoint."
            )
            raise CheckpointError(msg)
        if config.num_tokens < 4:
            msg = f"{str(path)!r} has {config.num_tokens} expression tokens; CellLM needs bins + CLS + PAD (8)."
            raise CheckpointError(msg)
        return config, encoder_state_dict(state)

    def load(self, device: str | torch.device = "cpu") -> None:
        """Read the checkpoint folder and build the encoder on ``device`` in eval mode."""
        self.check_checkpoint()
        config, state = self._load_weights()
        model = PerformerEncoder(config)
        load_encoder(model, state, str(self.checkpoint))
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self._config = config
        logger.info(
            "Loaded celllm: %d layers, dim %d, %d genes, %.1fM parameters",
            config.depth, config.dim, config.n_positions - 2, self.n_parameters() / 1e6,
        )

    @property
    def _special(self) -> tuple[int, int, int, int]:
        """(pad token, cls token, pad position, cls position), as the reference derives them."""
        if self._config is not None:
            num_tokens = self._config.num_tokens
        else:
            num_tokens = 8
        n_genes = len(self._gene_list())
        return num_tokens - 1, num_tokens - 2, n_genes + 1, n_genes

    # ---- description ----------------------------------------------------------------------
    @property
    def emb_dim(self) -> int:
        """Model width (512 for the official checkpoint); known after :meth:`load`."""
        if self._config is None:
            msg = "celllm's embedding size is read from the checkpoint: call load() first."
            raise RuntimeError(msg)
        return self._config.dim

    def params(self) -> dict[str, Any]:
        return {
            "pooling": self.pooling,
            "pad_masking": self.pad_masking,
            "key_max": self.key_max,
            "reference_quirks": self.reference_quirks,
            "max_length": self.max_length,
            "truncation": "gene_order",
            "target_sum": TARGET_SUM,
            "log_base": 2,
        }

    # ---- data -----------------------------------------------------------------------------
    def prepare(self, var_genes: Sequence[str], *, gene_id_kind: str) -> GeneAudit:
        """Align the dataset's genes to the model's gene list (symbols, exact match)."""
        self._cols, self._model_idx, audit = align_to_gene_list(
            var_genes, gene_id_kind, self._gene_list(), self.name
        )
        self.known_columns_ = np.asarray(self._cols, dtype=np.int64)  # a cell without them embeds as bins of zero
        return audit

    def tokenize(self, x: sp.csr_matrix, rows: np.ndarray) -> list[dict[str, np.ndarray]]:
        """Per cell: CLS + expressed genes in gene order (tokens, positions) and the pad count."""
        if self._cols is None or self._model_idx is None:
            msg = "Call prepare(var_genes, gene_id_kind=...) before tokenize()."
            raise RuntimeError(msg)
        check_counts(x, self.name)
        _, cls_token, _, cls_pos = self._special
        n_bins = cls_token - 1
        cells: list[dict[str, np.ndarray]] = []
        for genes, values in log2_normalised_rows(x, self._cols, self._model_idx, target_sum=TARGET_SUM):
            tokens = np.floor(np.minimum(values, n_bins)).astype(np.int64)
            input_ids = np.concatenate([[cls_token], tokens])[: self.max_length]
            positions = np.concatenate([[cls_pos], genes])[: self.max_length]
            n_pad = np.asarray([self.max_length - len(input_ids)], dtype=np.int64)
            cells.append(
                {"input_ids": input_ids.astype(np.int16), "gene_pos": positions.astype(np.int32), "n_pad": n_pad}
            )
        return cells

    def collate(self, cells: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
        """Pad to the longest cell; in ``"reference"`` mode append one weighted pad row per cell."""
        pad_token, _, pad_pos, _ = self._special
        extra = 1 if self.pad_masking == "reference" else 0
        width = max(len(c["input_ids"]) for c in cells) + extra
        n = len(cells)
        input_ids = torch.full((n, width), pad_token, dtype=torch.long)
        gene_pos = torch.full((n, width), pad_pos, dtype=torch.long)
        key_weight = torch.zeros((n, width), dtype=torch.float32)
        value_mask = torch.zeros((n, width), dtype=torch.bool)
        for i, cell in enumerate(cells):
            length = len(cell["input_ids"])
            input_ids[i, :length] = torch.from_numpy(cell["input_ids"].astype(np.int64))
            gene_pos[i, :length] = torch.from_numpy(cell["gene_pos"].astype(np.int64))
            key_weight[i, :length] = 1.0
            value_mask[i, :length] = True
            if extra:
                # one row for the reference's max_length - length identical pad tokens (0 = none)
                key_weight[i, length] = float(cell["n_pad"][0])
        return {"input_ids": input_ids, "gene_pos": gene_pos, "key_weight": key_weight, "value_mask": value_mask}

    def token_length(self, cell: dict[str, np.ndarray]) -> int:
        return int(len(cell["input_ids"]))

    def embed(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Forward and pool: Tensor of shape (n_cells, emb_dim), float32."""
        assert self.model is not None, "call load() first"
        hidden = self.model(
            batch["input_ids"],
            batch["gene_pos"],
            key_weight=batch["key_weight"],
            value_mask=batch["value_mask"],
            key_max=self.key_max,
        )
        if self.pooling == "cls":
            return hidden[:, 0].float()
        genes = batch["value_mask"].clone()
        genes[:, 0] = False
        return pooled(hidden, genes)


def write_tiny_checkpoint(
    folder: str | Path,
    *,
    genes: list[str] | None = None,
    seed: int = 0,
    **config_overrides: Any,
) -> Path:
    """Write a random-initialised CellLM folder in the official format (tests and ``scdm demo``).

    Parameters
    ----------
    folder
        Created if needed; receives ``checkpoint4_fixed.pth``, ``gene2vec_<n>_<dim>.npy`` and
        ``gene_list.txt``.
    genes
        Gene symbols, in model order; default: the first 256 symbols of the shipped gene table.
    seed
        Seed of the random weights.
    **config_overrides
        ``dim`` (32), ``depth`` (2), ``heads`` (2), ``dim_head`` (16), ``ff_mult`` (2),
        ``nb_features`` (``int(dim_head ln dim_head)``).

    Returns
    -------
    Path of the folder.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    genes = list(genes) if genes is not None else _default_genes(256)
    shape = {"dim": 32, "depth": 2, "heads": 2, "dim_head": 16, "ff_mult": 2}
    unknown = set(config_overrides) - {*shape, "nb_features"}
    if unknown:
        msg = f"Unknown tiny CellLM config field(s) {sorted(unknown)}; use {sorted([*shape, 'nb_features'])}."
        raise InputDataError(msg)
    shape.update({k: v for k, v in config_overrides.items() if k in shape})
    nb_features = config_overrides.get("nb_features", default_nb_features(shape["dim_head"]))
    cfg = PerformerConfig(num_tokens=8, nb_features=nb_features, n_positions=len(genes) + 2, **shape)
    rng = np.random.default_rng(seed)
    gene2vec = rng.standard_normal((len(genes), cfg.dim)).astype(np.float32)
    # the reference appends a CLS row of ones and a PAD row of zeros to the gene2vec table
    positions = np.concatenate([gene2vec.astype(np.float64), np.ones((1, cfg.dim)), np.zeros((1, cfg.dim))])
    state = random_state_dict(cfg, positions, seed=seed)
    torch.save({"epoch": 4, "model_state_dict": state}, folder / WEIGHTS_FILE)
    np.save(folder / f"gene2vec_{len(genes)}_{cfg.dim}.npy", gene2vec)
    (folder / GENES_FILE).write_text("".join(f"{g}\n" for g in genes))
    return folder


def _default_genes(n: int) -> list[str]:
    from scdm.store.genes import gene_table

    symbols = gene_table()["symbol"]
    return list(dict.fromkeys(s for s in symbols if s))[:n]
