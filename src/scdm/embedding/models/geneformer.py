"""Geneformer V1 and V2 (ctheodoris/Geneformer): a Hugging Face BERT over rank-value encoded cells.

Reference: ``geneformer/tokenizer.py`` (``TranscriptomeTokenizer``) and ``geneformer/emb_extractor.py``
(``EmbExtractor``) of the Hugging Face repo ``ctheodoris/Geneformer``; MODELS.md section 1.

Checkpoint folder, as a user assembles it from that repo::

    config.json                      # HF BertConfig (BertForMaskedLM)
    model.safetensors                # or the legacy pytorch_model.bin
    token_dictionary_gc30M.pkl       # V1; V2: token_dictionary_gc104M.pkl (old layout: token_dictionary.pkl)
    gene_median_dictionary_gc30M.pkl # non-zero median of each gene over the pretraining corpus
    ensembl_mapping_dict_gc30M.pkl   # optional: collapses Ensembl ids onto the vocabulary (summing duplicates)

The version is read from the token dictionary: V2 dictionaries hold ``<cls>`` and ``<eos>`` and the
model then sees ``<cls> genes... <eos>`` (4096 tokens); V1 sees up to 2048 genes and no special tokens.

Tokenisation (per cell): ``counts / total counts * 10,000 / gene median``, keep non-zero genes,
rank them with ``np.argsort(-x)`` over the genes in the reference's column order (so ties break the
same way), truncate. The cell embedding is, by default, the penultimate hidden state
(``hidden_states[n_layers - 1]``; the reference's ``emb_layer=-1``), averaged over the real gene tokens
(V1) or taken at ``<cls>`` (V2). Layers after the requested one are dropped at load time: they cannot
change the embedding and would only cost time.

The gene dictionaries are pickles. They are read with a restricted unpickler that accepts only plain
dicts of strings and numbers (and numpy scalars): a pickle that names anything else is refused
before it can run code.
"""

from __future__ import annotations

import logging
import pickle
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import scipy.sparse as sp
import torch

from scdm.embedding._adapter import (
    Adapter,
    GeneAudit,
    check_counts,
    check_unused_weights,
    own_load_report,
    readable_weights,
    register_adapter,
    require_matches,
)
from scdm.embedding._safe_load import load_pickle
from scdm.embedding.models._common import (
    PEFT_ADAPTER_FILES,
    aggregation_matrix,
    dtype_argument,
    half_dtype,
    hold_weights_in,
    masked_mean,
    read_hf_config,
    require_int_param,
)
from scdm.store.errors import CheckpointError, InputDataError
from scdm.store.genes import detect_gene_id_kind, gene_table, map_genes

__all__ = ["GeneformerAdapter", "write_tiny_checkpoint", "load_gene_dictionary"]

logger = logging.getLogger(__name__)

TARGET_SUM = 10_000
"""Counts are scaled to this total per cell before the median normalisation (reference default)."""
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
TOKEN_DICT_PREFIX = "token_dictionary"
MEDIAN_DICT_PREFIX = "gene_median_dictionary"
MAPPING_DICT_PREFIX = "ensembl_mapping_dict"
POOLINGS = ("auto", "mean", "cls")
_VERSION_SUFFIX = {1: "_gc30M", 2: "_gc104M"}
HUB_DICT_FOLDER = "geneformer"
"""The official Hub repository keeps its dictionaries in its Python package folder."""
_V1_SPECIALS = ("<pad>", "<mask>")
_V2_SPECIALS = ("<pad>", "<mask>", "<cls>", "<eos>")


# ---- safe reading of the gene dictionaries ------------------------------------------------------


def load_gene_dictionary(path: str | Path) -> dict[str, Any]:
    """Read one of Geneformer's gene dictionary pickles without running code from it.

    Parameters
    ----------
    path
        A ``token_dictionary*.pkl``, ``gene_median_dictionary*.pkl`` or ``ensembl_mapping_dict*.pkl``.

    Returns
    -------
    dict
        Keys are strings; values are Python ``int``, ``float`` or ``str`` (numpy scalars converted).

    Raises
    ------
    CheckpointError
        The file refers to anything but dicts, strings, numbers and numpy scalars (a pickle can run
        arbitrary code when loaded, so it is refused), or it is not a dict of that shape.
    """
    path = Path(path)
    content = load_pickle(path, what="a Geneformer gene dictionary (strings and numbers only)",
                          source="huggingface.co/ctheodoris/Geneformer")
    return _validated_dictionary(content, path)


def _validated_dictionary(content: Any, path: Path) -> dict[str, Any]:
    if not isinstance(content, dict):
        msg = f"{str(path)!r} holds a {type(content).__name__}, expected a dict of gene id -> value."
        raise CheckpointError(msg)
    out: dict[str, Any] = {}
    for key, value in content.items():
        if not isinstance(key, str):
            msg = f"{str(path)!r} has a non-string key {key!r}; expected Ensembl gene ids."
            raise CheckpointError(msg)
        if isinstance(value, (np.integer, np.floating, np.bool_)):
            value = value.item()
        if not isinstance(value, (int, float, str)):
            msg = f"{str(path)!r} maps {key!r} to a {type(value).__name__}; expected a number or a string."
            raise CheckpointError(msg)
        out[key] = value
    return out


# ---- checkpoint files ---------------------------------------------------------------------------


@dataclass(frozen=True)
class GeneformerFiles:
    """The files of one Geneformer checkpoint folder."""

    config: Path
    """``config.json`` (HF BertConfig)."""
    weights: Path
    """``model.safetensors`` or ``pytorch_model.bin``."""
    token_dictionary: Path
    """Ensembl id (and special tokens) -> token id."""
    median_dictionary: Path
    """Ensembl id -> non-zero median expression over the pretraining corpus."""
    mapping_dictionary: Path | None
    """Ensembl id -> collapsed vocabulary id; ``None`` means identity (as the reference allows)."""


def _read_config(folder: Path) -> dict[str, Any]:
    return read_hf_config(folder, "BERT")


def _pick_token_dictionary(folder: Path, vocab_size: int) -> Path:
    candidates = sorted(folder.glob(f"{TOKEN_DICT_PREFIX}*.pkl"))
    if not candidates:
        msg = f"Checkpoint folder {str(folder)!r} is missing {TOKEN_DICT_PREFIX}*.pkl (e.g. token_dictionary_gc104M.pkl)."
        raise CheckpointError(msg)
    if len(candidates) == 1:
        return candidates[0]
    # several dictionaries side by side (V1 and V2 files copied together): the model's vocab size decides
    fitting = [path for path in candidates if len(load_gene_dictionary(path)) == vocab_size]
    if len(fitting) == 1:
        return fitting[0]
    names = ", ".join(path.name for path in candidates)
    msg = (
        f"Checkpoint folder {str(folder)!r} holds several token dictionaries ({names}) and "
        f"{len(fitting)} of them match the model's vocab_size={vocab_size}. Keep only the one that belongs to this model."
    )
    raise CheckpointError(msg)


def _companion(folder: Path, prefix: str, suffix: str, *, required: bool) -> Path | None:
    # the median/mapping dictionaries carry the same suffix as the token dictionary (_gc30M, _gc104M, none)
    exact = folder / f"{prefix}{suffix}"
    if exact.is_file():
        return exact
    candidates = sorted(folder.glob(f"{prefix}*.pkl"))
    if len(candidates) == 1:
        return candidates[0]
    if not required and not candidates:
        return None
    found = ", ".join(path.name for path in candidates) or "none"
    msg = (
        f"Checkpoint folder {str(folder)!r} needs {prefix}{suffix} next to the token dictionary "
        f"(found: {found}). Copy it from the official Geneformer repository."
    )
    raise CheckpointError(msg)


def _dictionary_folder(folder: Path) -> Path:
    """Where the gene dictionaries are: beside the weights, or in geneformer/ (ctheodoris/Geneformer's layout)."""
    if not any(folder.glob(f"{TOKEN_DICT_PREFIX}*.pkl")) and any((folder / HUB_DICT_FOLDER).glob(f"{TOKEN_DICT_PREFIX}*.pkl")):
        return folder / HUB_DICT_FOLDER
    return folder


def locate_files(folder: Path) -> GeneformerFiles:
    """Find the files of a Geneformer checkpoint folder, raising :class:`CheckpointError` on gaps."""
    config = _read_config(folder)
    weights = next((folder / name for name in WEIGHT_FILES if (folder / name).is_file()), None)
    if weights is None:
        msg = f"Checkpoint folder {str(folder)!r} has no weights: expected {' or '.join(WEIGHT_FILES)}."
        raise CheckpointError(msg)
    dictionaries = _dictionary_folder(folder)
    token_dictionary = _pick_token_dictionary(dictionaries, int(config.get("vocab_size", -1)))
    suffix = token_dictionary.name[len(TOKEN_DICT_PREFIX) :]
    median = _companion(dictionaries, MEDIAN_DICT_PREFIX, suffix, required=True)
    mapping = _companion(dictionaries, MAPPING_DICT_PREFIX, suffix, required=False)
    assert median is not None
    return GeneformerFiles(folder / "config.json", weights, token_dictionary, median, mapping)


# ---- the reference's gene layout ----------------------------------------------------------------


@dataclass(frozen=True)
class GeneLayout:
    """Where each dataset gene goes in the reference tokenizer's column order."""

    column_of_gene: np.ndarray
    """int64 (n_dataset_genes,): output column of each dataset gene, -1 if it is not used."""
    column_ids: list[str]
    """Vocabulary Ensembl id of each output column."""
    collapsed: bool
    """Whether the reference would take its ``sum_ensembl_ids`` collapse path."""
    n_duplicates: int
    """Vocabulary ids fed by more than one dataset gene (their counts are summed)."""


def reference_gene_layout(ensembl_ids: Sequence[str | None], token_ids: dict[str, int], mapping: dict[str, str]) -> GeneLayout:
    """Reproduce the column layout of ``TranscriptomeTokenizer.tokenize_anndata`` (V1/V2 release).

    The reference maps every id through the mapping dictionary (upper-cased) on both of its
    paths and drops unmapped genes. It takes its collapse path when two dataset ids map onto one
    vocabulary gene (``len(set(ids in the mapping)) != len(set(their targets))``): genes that
    occur once keep dataset order and each shared id is appended (counts summed) in order of first
    occurrence. The order matters: it decides how ``np.argsort`` breaks ties between equal
    normalised values. One deliberate difference: the same id twice in the dataset is summed too
    (the reference's other path would put its token into the cell twice).
    """
    in_mapping = [g for g in ensembl_ids if g is not None and g in mapping]
    collapsed = len(set(in_mapping)) != len({mapping[g] for g in in_mapping})
    mapped = [mapping.get(g.upper()) if g is not None else None for g in ensembl_ids]
    names = [g if (g is not None and g in token_ids) else None for g in mapped]
    counts = Counter(g for g in names if g is not None)
    duplicated = [g for g, n in counts.items() if n > 1]
    column_ids = [g for g in names if g is not None and counts[g] == 1] + duplicated
    column_index = {g: i for i, g in enumerate(column_ids)}
    column_of_gene = np.array([column_index[g] if g is not None else -1 for g in names], dtype=np.int64)
    return GeneLayout(column_of_gene, column_ids, collapsed or bool(duplicated), len(duplicated))


def rank_value_encoding(
    counts: sp.csr_matrix, totals: np.ndarray, medians: np.ndarray, column_tokens: np.ndarray, max_genes: int
) -> list[np.ndarray]:
    """Token ids of each cell's genes ranked by median-normalised expression (reference semantics).

    Parameters
    ----------
    counts
        csr_matrix of shape (n_cells, n_columns), float64, in the reference column order.
    totals
        ndarray of shape (n_cells,): each cell's total counts over all dataset genes.
    medians, column_tokens
        ndarray of shape (n_columns,): the gene medians and token ids of the columns.
    max_genes
        Keep at most this many top-ranked genes.
    """
    counts = counts.tocsr()
    counts.sort_indices()
    counts.eliminate_zeros()
    cells = []
    for i in range(counts.shape[0]):
        start, end = counts.indptr[i], counts.indptr[i + 1]
        columns = counts.indices[start:end]
        # same operations, same order as the reference: X / n_counts * target_sum / norm_factor
        normalised = counts.data[start:end] / totals[i] * TARGET_SUM / medians[columns]
        order = np.argsort(-normalised)
        cells.append(column_tokens[columns[order]][:max_genes].astype(np.int64))
    return cells


# ---- the adapter --------------------------------------------------------------------------------


@register_adapter
class GeneformerAdapter(Adapter):
    """Geneformer V1/V2 cell embeddings.

    Parameters
    ----------
    checkpoint
        Folder with ``config.json``, weights and the gene dictionaries (see the module docstring).
    seed
        Unused: Geneformer's tokenisation is deterministic.
    layer
        Index into the model's hidden states (0 = embedding output, ``n_layers`` = last layer;
        negative counts from the end). Default -2: the penultimate layer, the reference default.
    pooling
        ``"auto"`` (reference: mean for V1, ``<cls>`` for V2), ``"mean"`` (over gene tokens; V2
        excludes ``<cls>``/``<eos>``) or ``"cls"`` (V2 only).
    max_length
        Model input size in tokens (special tokens included); default: ``max_position_embeddings``
        of the config (2048 for V1, 4096 for V2).
    """

    name = "geneformer"
    description = "Geneformer V1/V2 (HF BERT): rank-value encoding of median-normalised counts, penultimate layer."
    gene_id_kind = "ensembl"
    requires_counts = True
    # the dictionaries sit next to the weights, or in geneformer/ as in the official Hub repository
    checkpoint_files = ("config.json", f"{TOKEN_DICT_PREFIX}*.pkl|{HUB_DICT_FOLDER}/{TOKEN_DICT_PREFIX}*.pkl",
                        f"{MEDIAN_DICT_PREFIX}*.pkl|{HUB_DICT_FOLDER}/{MEDIAN_DICT_PREFIX}*.pkl")
    # --checkpoint org/name: the weights in one format, and the optional mapping dictionary
    hub_patterns = (*checkpoint_files, "|".join(WEIGHT_FILES),
                    f"{MAPPING_DICT_PREFIX}*.pkl|{HUB_DICT_FOLDER}/{MAPPING_DICT_PREFIX}*.pkl")
    # BertModel.from_pretrained applies a PEFT adapter saved beside the weights; and the median and mapping dictionaries
    # are read from the token dictionary's folder (_dictionary_folder), not from the first alternative that holds one: a
    # copy at the top level beside geneformer/'s three dictionaries would be counted in place of the one read
    read_if_present = (*PEFT_ADAPTER_FILES, *(f"{folder}{prefix}*.pkl" for prefix in (MEDIAN_DICT_PREFIX, MAPPING_DICT_PREFIX)
                                              for folder in ("", f"{HUB_DICT_FOLDER}/")))
    # peft matches by name suffix; "output.dense" covers attention.output.dense and the FFN output
    lora_target_modules = ("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense")
    default_batch_size = 16
    half_precision_weights = True

    def __init__(
        self,
        checkpoint: str | Path | None = None,
        *,
        seed: int = 0,
        layer: int = -2,
        pooling: str = "auto",
        max_length: int | None = None,
    ) -> None:
        super().__init__(checkpoint, seed=seed)
        self.layer = require_int_param("geneformer", "layer", layer)
        self.pooling = pooling
        self.max_length = None if max_length is None else require_int_param("geneformer", "max_length", max_length, minimum=1)

    # ---- checkpoint -----------------------------------------------------------------------------
    def check_checkpoint(self) -> None:
        super().check_checkpoint()
        assert self.checkpoint is not None
        if not any((self.checkpoint / name).is_file() for name in WEIGHT_FILES):
            msg = (
                f"Checkpoint folder {str(self.checkpoint)!r} is missing the weights: expected "
                f"{' or '.join(WEIGHT_FILES)} (a Hugging Face BertForMaskedLM save)."
            )
            raise CheckpointError(msg)

    def _load_dictionaries(self) -> None:
        """Read config and gene dictionaries once; sets the version and the resolved options."""
        if getattr(self, "token_ids_", None) is not None:
            return
        self.check_checkpoint()
        assert self.checkpoint is not None
        files = locate_files(self.checkpoint)
        self.files_ = files
        self.config_ = _read_config(self.checkpoint)
        raw_tokens = load_gene_dictionary(files.token_dictionary)
        medians = load_gene_dictionary(files.median_dictionary)
        mapping = load_gene_dictionary(files.mapping_dictionary) if files.mapping_dictionary else None
        self.special_ids_ = {k: int(v) for k, v in raw_tokens.items() if k.startswith("<")}
        if "<pad>" not in self.special_ids_:
            msg = f"{str(files.token_dictionary)!r} has no '<pad>' token; it is not a Geneformer token dictionary."
            raise CheckpointError(msg)
        has_cls, has_eos = "<cls>" in self.special_ids_, "<eos>" in self.special_ids_
        if has_cls != has_eos:
            msg = f"{str(files.token_dictionary)!r} has only one of '<cls>' and '<eos>'; a V2 dictionary has both."
            raise CheckpointError(msg)
        self.version_ = 2 if has_cls else 1
        # genes without a median cannot be normalised; the official files give every gene one
        self.token_ids_ = {k: int(v) for k, v in raw_tokens.items() if not k.startswith("<") and k in medians}
        self.medians_ = {k: float(medians[k]) for k in self.token_ids_}
        if mapping is None:
            logger.info("No %s*.pkl in %s: using Ensembl ids unchanged (reference behaviour without a mapping file).", MAPPING_DICT_PREFIX, self.checkpoint)
            mapping = {k: k for k in self.token_ids_}
        # as the reference: only mapping targets that are in the vocabulary count
        self.mapping_ = {k: str(v) for k, v in mapping.items() if v in self.token_ids_}
        self._check_vocab_fits_model(files)
        self._resolve_options()

    def _check_vocab_fits_model(self, files: GeneformerFiles) -> None:
        vocab_size = int(self.config_.get("vocab_size", 0))
        largest = max([*self.token_ids_.values(), *self.special_ids_.values()])
        if largest >= vocab_size:
            msg = (
                f"{str(files.token_dictionary)!r} uses token id {largest}, but the model in {str(files.config)!r} "
                f"has vocab_size={vocab_size}: the dictionary belongs to a different Geneformer model "
                "(V1 models use the *_gc30M files, V2 models the *_gc104M files)."
            )
            raise CheckpointError(msg)

    def _resolve_options(self) -> None:
        n_layers = int(self.config_["num_hidden_layers"])
        index = self.layer if self.layer >= 0 else n_layers + 1 + self.layer
        if not 0 <= index <= n_layers:
            msg = f"layer={self.layer} is outside this {n_layers}-layer model; use 0..{n_layers} or -1..-{n_layers + 1}."
            raise InputDataError(msg)
        self.hidden_state_index_ = index
        if self.pooling not in POOLINGS:
            msg = f"pooling={self.pooling!r} is not one of {', '.join(POOLINGS)}."
            raise InputDataError(msg)
        if self.pooling == "cls" and self.version_ == 1:
            msg = "pooling='cls' needs a V2 Geneformer (its dictionary has '<cls>'); this is a V1 model: use pooling='mean'."
            raise InputDataError(msg)
        self.pooling_ = ("cls" if self.version_ == 2 else "mean") if self.pooling == "auto" else self.pooling
        max_positions = int(self.config_["max_position_embeddings"])
        input_size = self.max_length if self.max_length is not None else max_positions
        n_special = 2 if self.version_ == 2 else 0
        if not n_special < input_size <= max_positions:
            msg = f"max_length={input_size} must be in {n_special + 1}..{max_positions} (the model's max_position_embeddings)."
            raise InputDataError(msg)
        self.input_size_ = input_size

    def load(self, device: str | torch.device = "cpu") -> None:
        from transformers import BertModel

        self._load_dictionaries()
        assert self.checkpoint is not None
        with own_load_report(), readable_weights(self.checkpoint, "a Geneformer BERT"):
            model, info = cast(Any, BertModel.from_pretrained(  # (model, loading info) with output_loading_info
                self.checkpoint,
                add_pooling_layer=False,
                attn_implementation="sdpa",
                **dtype_argument(torch.float32),
                output_loading_info=True,
                local_files_only=True,
            ))
        if info["missing_keys"]:
            missing = sorted(info["missing_keys"])
            msg = (
                f"{str(self.files_.weights)!r} lacks {len(missing)} BERT weights (e.g. {', '.join(missing[:3])}); "
                "it is not a Geneformer BertForMaskedLM checkpoint."
            )
            raise CheckpointError(msg)
        check_unused_weights(info, self.checkpoint, heads=("cls.",))  # the masked-LM head of pretraining
        # the embedding is hidden_states[k]: layers after k cannot change it
        kept = self.hidden_state_index_
        if kept < len(model.encoder.layer):
            model.encoder.layer = model.encoder.layer[:kept]
            model.config.num_hidden_layers = kept
        hold_weights_in(model, half_dtype(self.weight_precision))  # before the copy to the device: half the bytes
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.key_mask_ = _takes_key_mask(model)
        logger.info(
            "Loaded Geneformer V%d from %s: %d of %d layers used (hidden_states[%d]), pooling=%s, input size %d.",
            self.version_, self.checkpoint, kept, int(self.config_["num_hidden_layers"]), kept, self.pooling_, self.input_size_,
        )

    # ---- description ----------------------------------------------------------------------------
    @property
    def emb_dim(self) -> int:
        if getattr(self, "config_", None) is None:
            assert self.checkpoint is not None
            return int(_read_config(self.checkpoint)["hidden_size"])
        return int(self.config_["hidden_size"])

    def params(self) -> dict[str, Any]:
        # part of the identity: embeddings made before aliases were summed (see reference_gene_layout) differ
        return {"layer": self.layer, "pooling": self.pooling, "max_length": self.max_length,
                "gene_collapse": "mapping dictionary on both paths (aliases of present genes summed)"}

    def identity_spellings(self) -> dict[str, list[Any]]:
        # keyed as given, pooling='auto' and the pooling it resolves to (layer -2 and n_layers - 1, max_length None
        # and max_position_embeddings) were two embeddings and spaces of one computation: each is keyed by what it
        # resolves to, and the spellings an older scdm keyed it by (the defaults among them) are still found
        if self.checkpoint is None:  # scdm embed's command rebuilt from a stored embedding: nothing to resolve on
            return {}
        self._load_dictionaries()
        n_layers, max_positions = int(self.config_["num_hidden_layers"]), int(self.config_["max_position_embeddings"])
        auto = "cls" if self.version_ == 2 else "mean"
        return {"pooling": [self.pooling_, *(["auto"] if self.pooling_ == auto else [])],
                "layer": [self.hidden_state_index_, self.hidden_state_index_ - n_layers - 1],
                "max_length": [self.input_size_, *([None] if self.input_size_ == max_positions else [])]}

    # ---- data -----------------------------------------------------------------------------------
    def prepare(self, var_genes: Sequence[str], *, gene_id_kind: str) -> GeneAudit:
        self._load_dictionaries()
        names = [str(g) for g in var_genes]
        if gene_id_kind == "ensembl":
            ensembl = list(map_genes(names, src="ensembl", dst="ensembl"))
        else:
            # a symbol with several Ensembl ids takes the one the vocabulary has
            ensembl = list(map_genes(names, src=gene_id_kind, dst="ensembl", prefer=self.token_ids_))  # type: ignore[arg-type]
        layout = reference_gene_layout(ensembl, self.token_ids_, self.mapping_)
        used = layout.column_of_gene >= 0
        audit = GeneAudit(
            n_input_genes=len(names),
            n_matched=int(used.sum()),
            unmatched_examples=tuple(n for n, u in zip(names, used) if not u)[:20],
            id_kind_used="ensembl",
            extra={
                "n_vocabulary_columns": len(layout.column_ids),
                "n_collapsed_duplicates": layout.n_duplicates,
                "collapse_path": layout.collapsed,
                "geneformer_version": self.version_,
            },
        )
        require_matches(audit, self.name)
        self.known_columns_ = np.flatnonzero(used)  # V2 would pool <cls>/<eos> alone for a cell without them
        self.aggregator_ = aggregation_matrix(layout.column_of_gene, len(layout.column_ids))
        self.column_tokens_ = np.array([self.token_ids_[g] for g in layout.column_ids], dtype=np.int64)
        self.column_medians_ = np.array([self.medians_[g] for g in layout.column_ids], dtype=np.float64)
        logger.info("Geneformer: %d of %d genes in the vocabulary (%d columns).", audit.n_matched, audit.n_input_genes, len(layout.column_ids))
        return audit

    def tokenize(self, x: sp.csr_matrix, rows: np.ndarray) -> list[dict[str, np.ndarray]]:
        if getattr(self, "aggregator_", None) is None:
            msg = "Call prepare(var_genes, gene_id_kind=...) before tokenize()."
            raise RuntimeError(msg)
        check_counts(x, self.name)
        counts = sp.csr_matrix(x, dtype=np.float64)
        totals = np.asarray(counts.sum(axis=1), dtype=np.float64).ravel()
        columns = counts @ self.aggregator_
        n_genes = self.input_size_ - (2 if self.version_ == 2 else 0)
        ranked = rank_value_encoding(columns, totals, self.column_medians_, self.column_tokens_, n_genes)
        if self.version_ == 2:
            cls, eos = self.special_ids_["<cls>"], self.special_ids_["<eos>"]
            ranked = [np.concatenate([[cls], genes, [eos]]).astype(np.int64) for genes in ranked]
        return [{"input_ids": genes} for genes in ranked]

    def collate(self, cells: list[dict[str, np.ndarray]]) -> dict[str, Any]:
        """Right-padded ``input_ids``; ``attention_mask`` (1 = real token) is None when no cell is padded."""
        length = max(1, max(len(c["input_ids"]) for c in cells))
        input_ids = torch.full((len(cells), length), self.special_ids_["<pad>"], dtype=torch.long)
        attention_mask = torch.zeros((len(cells), length), dtype=torch.long)
        for i, cell in enumerate(cells):
            n = len(cell["input_ids"])
            input_ids[i, :n] = torch.from_numpy(cell["input_ids"])
            attention_mask[i, :n] = 1
        # decided here, on the CPU: transformers would otherwise inspect the mask on the device to drop it
        padded = any(len(c["input_ids"]) < length for c in cells)
        return {"input_ids": input_ids, "attention_mask": attention_mask if padded else None}

    def embed(self, batch: dict[str, Any]) -> torch.Tensor:
        if self.model is None:
            msg = "Call load(device) before embed()."
            raise RuntimeError(msg)
        attention_mask = batch.get("attention_mask")  # None: no cell of the batch is padded
        hidden = self.model(input_ids=batch["input_ids"], attention_mask=self._model_mask(attention_mask)).last_hidden_state
        if self.pooling_ == "cls":
            return hidden[:, 0].float()
        if attention_mask is None:
            lengths = torch.full((hidden.shape[0], 1), hidden.shape[1], dtype=torch.long, device=hidden.device)
        else:
            lengths = attention_mask.sum(dim=1, keepdim=True)
        positions = torch.arange(hidden.shape[1], device=hidden.device)[None, :]
        if self.version_ == 2:  # mean over genes only: drop <cls> (first) and <eos> (last real token)
            keep = (positions >= 1) & (positions < lengths - 1)
        else:
            keep = positions < lengths
        return masked_mean(hidden, keep)

    def _model_mask(self, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        """The padding mask as the model takes it: [B, 1, 1, L] booleans (True = a real token) where it can.

        transformers (5.x) hands a 4-D mask to SDPA as it is. Given the 2-D one, it first checks on
        the device whether any token is masked (the host waits for the device) and then expands it
        to [B, 1, L, L] (512 MB for 128 cells x 2048 tokens), which also keeps SDPA off its fastest
        kernels. The same numbers either way; on the CPU a padded batch of 16 x 2048 ran 19 % faster
        (4 layers x 256) and ``bench_embed.py --models geneformer --cells 300`` 13 % (18.5 -> 20.9 cells/s).
        """
        if attention_mask is None or not getattr(self, "key_mask_", False):
            return attention_mask
        return attention_mask.bool()[:, None, None, :]


def _takes_key_mask(model: Any) -> bool:
    """Whether ``model`` takes a [B, 1, 1, L] boolean padding mask as it is: SDPA attention, and a
    transformers BERT that builds its masks with ``masking_utils`` (4.x BERT refuses 4-D masks, and
    eager attention would add the booleans to the scores)."""
    from transformers.models.bert import modeling_bert

    return hasattr(modeling_bert, "create_bidirectional_mask") and getattr(model.config, "_attn_implementation", None) == "sdpa"


# ---- tiny checkpoints for tests and the demo ----------------------------------------------------


def _default_genes(n: int = 200) -> list[str]:
    table = gene_table()
    return list(dict.fromkeys(table.loc[table["ensembl"] != "", "ensembl"]))[:n]


def _as_ensembl(genes: Sequence[str]) -> list[str]:
    genes = [str(g) for g in genes]
    kind = detect_gene_id_kind(genes)
    mapped = map_genes(genes, src=kind, dst="ensembl")
    return list(dict.fromkeys(g for g in mapped if g is not None))


def _dump_pickle(obj: dict[str, Any], path: Path) -> None:
    with path.open("wb") as handle:
        pickle.dump(obj, handle, protocol=4)


def write_tiny_checkpoint(
    folder: str | Path,
    *,
    genes: Sequence[str] | None = None,
    seed: int = 0,
    version: int = 1,
    legacy_bin: bool = False,
    **config_overrides: Any,
) -> Path:
    """Write a small random-initialised Geneformer checkpoint in the official format.

    Parameters
    ----------
    folder
        Created if missing.
    genes
        Symbols or Ensembl ids the vocabulary should cover (symbols are mapped with the shipped
        table); default: 200 genes of the table.
    seed
        Seeds the weights and the random gene medians.
    version
        1 (``*_gc30M`` dictionaries, 2048 positions, no special tokens) or 2 (``*_gc104M``,
        ``<cls>``/``<eos>``, 4096 positions).
    legacy_bin
        Write ``pytorch_model.bin`` (with the legacy ``position_ids`` buffer) instead of
        ``model.safetensors``.
    **config_overrides
        Passed to ``BertConfig`` (e.g. ``num_hidden_layers=3``, ``initializer_range=0.5``).

    Returns
    -------
    Path
        The folder.
    """
    from transformers import BertConfig, BertForMaskedLM

    if version not in _VERSION_SUFFIX:
        msg = f"version={version!r}; Geneformer has versions 1 and 2."
        raise ValueError(msg)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ensembl = _as_ensembl(genes) if genes is not None else _default_genes()
    specials = _V1_SPECIALS if version == 1 else _V2_SPECIALS
    vocab_size = len(specials) + len(ensembl)
    id_type = np.int16 if vocab_size < np.iinfo(np.int16).max else np.int32  # the real files use int16
    token_dictionary: dict[str, Any] = {token: i for i, token in enumerate(specials)}
    token_dictionary.update({gene: id_type(len(specials) + i) for i, gene in enumerate(ensembl)})
    rng = np.random.default_rng(seed)
    medians = {gene: np.float64(m) for gene, m in zip(ensembl, rng.lognormal(0.0, 1.0, len(ensembl)))}
    suffix = _VERSION_SUFFIX[version]
    _dump_pickle(token_dictionary, folder / f"{TOKEN_DICT_PREFIX}{suffix}.pkl")
    _dump_pickle(medians, folder / f"{MEDIAN_DICT_PREFIX}{suffix}.pkl")
    _dump_pickle({gene: gene for gene in ensembl}, folder / f"{MAPPING_DICT_PREFIX}{suffix}.pkl")

    settings: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 64,
        "max_position_embeddings": 2048 if version == 1 else 4096,
        "hidden_act": "relu",
        "hidden_dropout_prob": 0.02 if version == 1 else 0.1,
        "attention_probs_dropout_prob": 0.02 if version == 1 else 0.1,
        "layer_norm_eps": 1e-12,
        "type_vocab_size": 2,
        "pad_token_id": 0,
    }
    settings.update(config_overrides)
    config = BertConfig(**settings)
    torch.manual_seed(seed)
    model = BertForMaskedLM(config).eval()
    if legacy_bin:
        state = dict(model.state_dict())
        state["bert.embeddings.position_ids"] = torch.arange(config.max_position_embeddings)[None, :]
        config.architectures = ["BertForMaskedLM"]
        config.save_pretrained(folder)
        torch.save(state, folder / "pytorch_model.bin")
    else:
        model.save_pretrained(folder)
    return folder
