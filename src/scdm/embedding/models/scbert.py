"""scBERT (TencentAILabHealthcare/scBERT): a Performer over all 16,906 PanglaoDB genes.

Checkpoint folder (as users download it, see MODELS.md section 6.1)::

    panglao_pretrained.pth   torch.save({'epoch', 'model_state_dict', 'optimizer_state_dict', ...})
    panglao_10000.h5ad       its var_names are the 16,906 gene symbols, in model order

``gene2vec_16906.npy`` is not needed: the reference copies it into ``pos_emb.emb.weight``, which
the checkpoint holds (float64).

Input, as ``preprocess.py`` + ``predict.py`` build it: counts aligned to the gene list (missing
genes are 0; the first dataset column wins for duplicated symbols), ``normalize_total(1e4)`` over
the aligned genes, ``log1p(base=2)``, then per gene ``floor(min(x, 5))`` → tokens 0..5, plus one
token 0 appended at position 16,906 → 16,907 tokens with gene2vec positions ``0..16906``.
The reference drops cells with fewer than 200 expressed genes (``filter_cells``); scdm embeds
every cell (one row per cell) and leaves filtering to the user.

Embedding (MODELS.md 6.4; no official one): ``pooling="cls"`` (default) is the hidden state of
the appended last token after the final LayerNorm (BioLLM's ``cell_emb_type='cls'``),
``"mean"`` averages the 16,906 gene positions.

Batch independence: scBERT has no padding, but the fork's FAVOR+ key stabiliser is one max over
the batch tensor, so a batched reference run leaks batch composition through the kernel's
``+1e-4``. By default (``key_max="cell"``) the max is taken per cell, which is exactly the
reference run one cell at a time (its own ``predict.py``) and makes every embedding independent
of the batch. ``reference_quirks=True`` (or ``key_max="batch"``) takes one max over the whole
batch tensor and copies a batched reference forward (``finetune.py``, BioLLM) exactly; the
adapter is then ``batch_dependent``, so the runner embeds fixed batches of consecutive rows and
records the batch size. Its batch effect is not negligible in general (up to 3e-4 on the tiny
random-weight test model, where the ``+1e-4`` is comparable to the kernel values; see
``docs/reference-differences.md``).
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
    random_state_dict,
    resolve_key_max,
)
from scdm.store.errors import CheckpointError, InputDataError

if TYPE_CHECKING:
    import scipy.sparse as sp

__all__ = ["ScBERTAdapter", "write_tiny_checkpoint"]

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "panglao_pretrained.pth"
GENES_FILE = "panglao_10000.h5ad"
N_BINS = 5
"""Highest expression token (``bin_num``); values above are capped, the reference's ``CLASS - 2``."""
TARGET_SUM = 1e4
POOLINGS = ("cls", "mean")


def read_gene_list(path: Path) -> list[str]:
    """The model's gene order: ``var_names`` of ``panglao_10000.h5ad`` (read without loading X)."""
    import anndata

    try:
        adata = anndata.read_h5ad(path, backed="r")
    except Exception as err:  # h5py/anndata raise many types for a broken file
        msg = f"Cannot read the scBERT gene list from {str(path)!r}: {err}. Use the official panglao_10000.h5ad."
        raise CheckpointError(msg) from err
    try:
        return [str(g) for g in adata.var_names]
    finally:
        adata.file.close()


@register_adapter
class ScBERTAdapter(Adapter):
    """scBERT cell embeddings from the official ``panglao_pretrained.pth``.

    Parameters
    ----------
    checkpoint
        Folder with ``panglao_pretrained.pth`` and ``panglao_10000.h5ad``.
    seed
        Unused (scBERT's input is deterministic); kept for the common interface.
    pooling
        ``"cls"``: the appended last token; ``"mean"``: mean over the gene positions.
    key_max
        FAVOR+ key stabiliser: ``"cell"`` (batch-independent, = reference run one cell at a
        time) or ``"batch"`` (= a batched reference run). Default: ``"batch"`` with
        ``reference_quirks``, else ``"cell"``.
    reference_quirks
        Reproduce a batched reference forward (global key max over the batch); the embedding
        then depends on the batch (fixed row ranges of ``--batch-size``).
    """

    name = "scbert"
    description = "scBERT Performer (16,906 genes, 200-d, panglao_pretrained.pth)"
    gene_id_kind = "symbol"
    requires_counts = True
    checkpoint_files = (WEIGHTS_FILE, GENES_FILE)
    # dotted suffixes (peft matches ``name.endswith('.' + target)``) pick the attention and
    # feed-forward Linears of every layer but not an LM/classifier head named ``to_out``
    lora_target_modules = ("fn.to_q", "fn.to_k", "fn.to_v", "fn.to_out", "fn.fn.w1", "fn.fn.w2")
    default_batch_size = 4

    def __init__(
        self,
        checkpoint: str | Path | None = None,
        *,
        seed: int = 0,
        pooling: str = "cls",
        key_max: str | None = None,
        reference_quirks: bool = False,
        **params: Any,
    ) -> None:
        super().__init__(checkpoint, seed=seed)
        if params:
            msg = f"Unknown scbert parameter(s) {sorted(params)}; scbert accepts pooling, key_max and reference_quirks."
            raise InputDataError(msg)
        if pooling not in POOLINGS:
            msg = f"scbert pooling={pooling!r} is not supported; use one of {', '.join(POOLINGS)}."
            raise InputDataError(msg)
        self.pooling = pooling
        self.reference_quirks = reference_quirks
        self.key_max = resolve_key_max(key_max, reference_quirks, self.name)
        # a key max over the batch lets batch mates into every cell: batches must be fixed row ranges
        self.batch_dependent = self.key_max == "batch"
        self._genes: list[str] | None = None
        self._cols: np.ndarray | None = None
        self._model_idx: np.ndarray | None = None
        self._config: PerformerConfig | None = None

    # ---- checkpoint -----------------------------------------------------------------------
    def _gene_list(self) -> list[str]:
        if self._genes is None:
            self.check_checkpoint()
            assert self.checkpoint is not None
            self._genes = read_gene_list(self.checkpoint / GENES_FILE)
        return self._genes

    def _load_weights(self) -> tuple[PerformerConfig, dict[str, torch.Tensor]]:
        """Official state dict -> encoder state dict (drops the ``to_out`` head) and its config."""
        assert self.checkpoint is not None
        path = self.checkpoint / WEIGHTS_FILE
        state = load_state_dict_file(path)
        config = config_from_state_dict(state, str(path))
        n_genes = len(self._gene_list())
        if config.n_positions != n_genes + 1:
            msg = (
                f"{str(path)!r} has {config.n_positions} gene2vec positions but {GENES_FILE} lists {n_genes} genes "
                f"(expected genes + 1). The two files come from different models; use the matching pair."
            )
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
            "Loaded scbert: %d layers, dim %d, %d genes, %.1fM parameters",
            config.depth, config.dim, config.n_positions - 1, self.n_parameters() / 1e6,
        )

    # ---- description ----------------------------------------------------------------------
    @property
    def emb_dim(self) -> int:
        """Model width (200 for the official checkpoint); known after :meth:`load`."""
        if self._config is None:
            msg = "scbert's embedding size is read from the checkpoint: call load() first."
            raise RuntimeError(msg)
        return self._config.dim

    def params(self) -> dict[str, Any]:
        return {
            "pooling": self.pooling,
            "key_max": self.key_max,
            "reference_quirks": self.reference_quirks,
            "n_bins": N_BINS,
            "target_sum": TARGET_SUM,
            "log_base": 2,
            "filter_min_genes": None,
        }

    # ---- data -----------------------------------------------------------------------------
    def prepare(self, var_genes: Sequence[str], *, gene_id_kind: str) -> GeneAudit:
        """Align the dataset's genes to the 16,906-gene list (symbols, exact match)."""
        self._cols, self._model_idx, audit = align_to_gene_list(
            var_genes, gene_id_kind, self._gene_list(), self.name
        )
        self.known_columns_ = np.asarray(self._cols, dtype=np.int64)  # a cell without them embeds as bins of zero
        return audit

    def tokenize(self, x: sp.csr_matrix, rows: np.ndarray) -> list[dict[str, np.ndarray]]:
        """One 16,907-long uint8 token vector per cell (tokens 0..5, last token 0)."""
        if self._cols is None or self._model_idx is None:
            msg = "Call prepare(var_genes, gene_id_kind=...) before tokenize()."
            raise RuntimeError(msg)
        check_counts(x, self.name)
        n_genes = len(self._gene_list())
        cells = []
        for genes, values in log2_normalised_rows(x, self._cols, self._model_idx, target_sum=TARGET_SUM):
            tokens = np.zeros(n_genes + 1, dtype=np.uint8)
            tokens[genes] = np.floor(np.minimum(values, N_BINS)).astype(np.uint8)
            cells.append({"input_ids": tokens})
        return cells

    def collate(self, cells: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
        """Stack token vectors (all cells have the same length) into a long tensor."""
        ids = torch.from_numpy(np.stack([c["input_ids"] for c in cells])).long()
        return {"input_ids": ids}

    def embed(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Forward and pool: Tensor of shape (n_cells, emb_dim), float32."""
        assert self.model is not None, "call load() first"
        ids = batch["input_ids"]
        positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        hidden = self.model(ids, positions, key_max=self.key_max)
        if self.pooling == "cls":
            return hidden[:, -1].float()
        return hidden[:, :-1].float().mean(dim=1)


def write_tiny_checkpoint(
    folder: str | Path,
    *,
    genes: list[str] | None = None,
    seed: int = 0,
    **config_overrides: Any,
) -> Path:
    """Write a random-initialised scBERT folder in the official format (tests and ``scdm demo``).

    Parameters
    ----------
    folder
        Created if needed; receives ``panglao_pretrained.pth`` and ``panglao_10000.h5ad``.
    genes
        Gene symbols of the vocabulary, in model order; default: the first 256 symbols of the
        shipped gene table.
    seed
        Seed of the random weights.
    **config_overrides
        ``dim`` (32), ``depth`` (2), ``heads`` (2), ``dim_head`` (16), ``ff_mult`` (2),
        ``nb_features`` (``int(dim_head ln dim_head)``).

    Returns
    -------
    Path of the folder.
    """
    import anndata
    import scipy.sparse as sp

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    genes = list(genes) if genes is not None else _default_genes(256)
    shape = {"dim": 32, "depth": 2, "heads": 2, "dim_head": 16, "ff_mult": 2}
    unknown = set(config_overrides) - {*shape, "nb_features"}
    if unknown:
        msg = f"Unknown tiny scBERT config field(s) {sorted(unknown)}; use {sorted([*shape, 'nb_features'])}."
        raise InputDataError(msg)
    shape.update({k: v for k, v in config_overrides.items() if k in shape})
    nb_features = config_overrides.get("nb_features", default_nb_features(shape["dim_head"]))
    cfg = PerformerConfig(num_tokens=N_BINS + 2, nb_features=nb_features, n_positions=len(genes) + 1, **shape)
    rng = np.random.default_rng(seed)
    gene2vec = rng.standard_normal((len(genes), cfg.dim))
    positions = np.concatenate([gene2vec, np.zeros((1, cfg.dim))])  # the reference's extra zero row
    state = random_state_dict(cfg, positions, seed=seed)
    torch.save(
        {"epoch": 0, "model_state_dict": state, "optimizer_state_dict": {}, "scheduler_state_dict": {}, "losses": []},
        folder / WEIGHTS_FILE,
    )
    ref = anndata.AnnData(X=sp.csr_matrix((2, len(genes)), dtype=np.float32))
    ref.var_names = genes
    ref.write_h5ad(folder / GENES_FILE)
    return folder


def _default_genes(n: int) -> list[str]:
    from scdm.store.genes import gene_table

    symbols = gene_table()["symbol"]
    return list(dict.fromkeys(s for s in symbols if s))[:n]
