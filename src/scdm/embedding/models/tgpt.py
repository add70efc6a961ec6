"""tGPT (deeplearningplus/tGPT): a Hugging Face GPT-2 over each cell's top expressed gene symbols.

Reference: the README's feature-extraction recipe for ``lixiangchun/transcriptome-gpt-1024-8-16-64``;
MODELS.md section 5.

Checkpoint folder (the Hugging Face repo as downloaded)::

    config.json                   # GPT2Config (GPT2LMHeadModel)
    pytorch_model.bin             # or model.safetensors
    tokenizer.json                # WordLevel vocabulary of gene symbols, Whitespace pre-tokenizer,
                                  # template "</b> $A </s>"
    tokenizer_config.json, special_tokens_map.json   # optional here

Input: one line of text per cell, the gene symbols ranked by expression (descending), with ``-`` and
``.`` replaced by ``_`` (the vocabulary spells ``HLA-B`` as ``HLA_B``), tokenised with
``max_length=64`` and truncation, so a cell is ``</b>`` + up to 62 genes + ``</s>``. The embedding is
the mean of the last hidden state over the gene tokens, excluding ``</b>`` and ``</s>``.

Choices the reference leaves open (it starts from pre-computed ranking files): genes missing from the
vocabulary are dropped before ranking (rather than becoming ``<unk>``), genes with zero expression
are never listed, and genes of equal expression are ranked by their vocabulary word (``HLA_B`` before
``HLA_C``), both for which of them make the 62 and for their order in the line. Ties are common (most
counts of a Drop-seq cell are 1 or 2: on real PC9 counts 245 of 300 cells change their 62 genes when
the columns are shuffled and tied genes follow column order), and the column order differs between
datasets (alphabetical in one, genomic position in a 10x ``features.tsv``), so it must not decide
them: the same cell gives the same tokens whatever its column order. The ranking is invariant to
per-cell scaling, so raw counts and log-normalised values give the same tokens.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import scipy.sparse as sp
import torch

from scdm.embedding._adapter import (
    Adapter,
    GeneAudit,
    check_unused_weights,
    own_load_report,
    readable_weights,
    register_adapter,
    require_matches,
)
from scdm.embedding.models._common import (
    PEFT_ADAPTER_FILES,
    aggregation_matrix,
    check_expression,
    dtype_argument,
    masked_mean,
    read_hf_config,
    require_int_param,
    top_expressed,
)
from scdm.store.errors import CheckpointError, InputDataError
from scdm.store.genes import as_gene_id_kind, detect_gene_id_kind, gene_table, map_genes

__all__ = ["TGPTAdapter", "write_tiny_checkpoint", "vocabulary_word"]

logger = logging.getLogger(__name__)

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
SPECIAL_TOKENS = ("<pad>", "</b>", "</s>", "<unk>")
"""The reference tokenizer's specials, ids 0..3: pad, BOS, EOS, unknown."""
_SYMBOL_PUNCTUATION = re.compile(r"[-.]")
TIE_BREAK = "descending value, then vocabulary word"
"""How genes of equal expression are ranked (recorded in ``params()``): never by the dataset's column order."""


def vocabulary_word(symbol: str) -> str:
    """A gene symbol as tGPT's vocabulary spells it (reference ``LineDataset``: ``-``/``.`` -> ``_``)."""
    return _SYMBOL_PUNCTUATION.sub("_", symbol)


@register_adapter
class TGPTAdapter(Adapter):
    """tGPT cell embeddings.

    Parameters
    ----------
    checkpoint
        Folder with ``config.json``, weights and ``tokenizer.json``.
    seed
        Unused: tGPT's input is deterministic.
    max_length
        Tokens per cell including ``</b>`` and ``</s>`` (reference: 64, i.e. 62 genes; the
        ``-1024-8-16-128`` variant uses 128).
    """

    name = "tgpt"
    description = "tGPT (HF GPT-2): top expressed gene symbols, mean of the last hidden state over genes."
    gene_id_kind = "symbol"
    requires_counts = False
    ranks_expression = True
    checkpoint_files = ("config.json", "tokenizer.json")
    hub_patterns = (*checkpoint_files, "|".join(WEIGHT_FILES))  # --checkpoint org/name: the weights in one format
    read_if_present = PEFT_ADAPTER_FILES  # GPT2Model.from_pretrained applies a PEFT adapter saved beside the weights
    # GPT-2 uses Conv1D layers: peft needs LoraConfig(fan_in_fan_out=True) for these
    lora_target_modules = ("c_attn", "c_proj", "c_fc")
    default_batch_size = 64

    def __init__(self, checkpoint: str | Path | None = None, *, seed: int = 0, max_length: int = 64) -> None:
        super().__init__(checkpoint, seed=seed)
        # an int whatever it is given as: params() keys the embedding, where numpy.int64(64) was "64", another id
        self.max_length = require_int_param("tgpt", "max_length", max_length, minimum=1)

    # ---- checkpoint -----------------------------------------------------------------------------
    def check_checkpoint(self) -> None:
        super().check_checkpoint()
        assert self.checkpoint is not None
        if not any((self.checkpoint / name).is_file() for name in WEIGHT_FILES):
            msg = (
                f"Checkpoint folder {str(self.checkpoint)!r} is missing the weights: expected "
                f"{' or '.join(WEIGHT_FILES)} (a Hugging Face GPT2LMHeadModel save)."
            )
            raise CheckpointError(msg)

    def _config(self) -> dict[str, Any]:
        if getattr(self, "config_", None) is None:
            assert self.checkpoint is not None
            self.config_ = read_hf_config(self.checkpoint, "GPT-2")
        return self.config_

    def _load_tokenizer(self) -> None:
        if getattr(self, "tokenizer_", None) is not None:
            return
        from tokenizers import Tokenizer

        self.check_checkpoint()
        assert self.checkpoint is not None
        path = self.checkpoint / "tokenizer.json"
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as err:  # the tokenizers library raises a bare Exception on bad files
            msg = f"Cannot read {str(path)!r} as a Hugging Face tokenizers file ({err})."
            raise CheckpointError(msg) from None
        n_positions = int(self._config().get("n_positions", 1024))
        if not 3 <= self.max_length <= n_positions:
            msg = f"max_length={self.max_length} must be in 3..{n_positions} (the model's n_positions)."
            raise InputDataError(msg)
        tokenizer.no_padding()
        tokenizer.enable_truncation(max_length=self.max_length)
        specials = {str(t.content) for t in tokenizer.get_added_tokens_decoder().values() if t.special}
        self.vocabulary_ = {w: i for w, i in tokenizer.get_vocab(with_added_tokens=False).items() if w not in specials}
        pad = self._config().get("pad_token_id")
        self.pad_id_ = int(pad) if pad is not None else int(tokenizer.token_to_id("<pad>") or 0)
        self.tokenizer_ = tokenizer

    def load(self, device: str | torch.device = "cpu") -> None:
        from transformers import GPT2Model

        self._load_tokenizer()
        assert self.checkpoint is not None
        # output_loading_info=True returns (model, info); transformers' annotations only know the model
        with own_load_report(), readable_weights(self.checkpoint, "a tGPT GPT-2"):
            model, info = cast(
                "tuple[GPT2Model, dict[str, list[str]]]",
                GPT2Model.from_pretrained(
                    self.checkpoint,
                    attn_implementation="sdpa",
                    output_loading_info=True,
                    local_files_only=True,
                    **dtype_argument(torch.float32),
                ),
            )
        if info["missing_keys"]:
            missing = sorted(info["missing_keys"])
            msg = (
                f"The weights in {str(self.checkpoint)!r} lack {len(missing)} GPT-2 tensors (e.g. "
                f"{', '.join(missing[:3])}); it is not a tGPT GPT2LMHeadModel checkpoint."
            )
            raise CheckpointError(msg)
        check_unused_weights(info, self.checkpoint, heads=("lm_head.",))  # the language-model head of pretraining
        self.device = torch.device(device)
        # transformers wraps PreTrainedModel.to with functools.wraps(nn.Module.to), which mypy reads as unbound
        self.model = model.to(self.device).eval()  # type: ignore[arg-type]
        logger.info("Loaded tGPT from %s: %d layers, %d-d, %d tokens per cell.", self.checkpoint, model.config.n_layer, model.config.n_embd, self.max_length)

    # ---- description ----------------------------------------------------------------------------
    @property
    def emb_dim(self) -> int:
        return int(self._config()["n_embd"])

    def params(self) -> dict[str, Any]:
        # part of the identity: embeddings made before broke ties by the dataset's column order
        return {"max_length": self.max_length, "tie_break": TIE_BREAK}

    # ---- data -----------------------------------------------------------------------------------
    def prepare(self, var_genes: Sequence[str], *, gene_id_kind: str) -> GeneAudit:
        self._load_tokenizer()
        names = [str(g) for g in var_genes]
        symbols = names if gene_id_kind == "symbol" else list(map_genes(names, src=as_gene_id_kind(gene_id_kind), dst="symbol"))
        words = [vocabulary_word(s) if s is not None else None for s in symbols]
        known = [w if (w is not None and w in self.vocabulary_) else None for w in words]
        column_words = list(dict.fromkeys(w for w in known if w is not None))
        index = {w: i for i, w in enumerate(column_words)}
        column_of_gene = np.array([index[w] if w is not None else -1 for w in known], dtype=np.int64)
        used = column_of_gene >= 0
        audit = GeneAudit(
            n_input_genes=len(names),
            n_matched=int(used.sum()),
            unmatched_examples=tuple(n for n, u in zip(names, used) if not u)[:20],
            id_kind_used="symbol",
            extra={"n_vocabulary_columns": len(column_words), "n_collapsed_duplicates": int(used.sum()) - len(column_words)},
        )
        require_matches(audit, self.name)
        self.aggregator_ = aggregation_matrix(column_of_gene, len(column_words))
        self.column_words_ = np.array(column_words, dtype=object)
        logger.info("tGPT: %d of %d genes in the vocabulary.", audit.n_matched, audit.n_input_genes)
        return audit

    def tokenize(self, x: sp.csr_matrix, rows: np.ndarray) -> list[dict[str, np.ndarray]]:
        if getattr(self, "aggregator_", None) is None:
            msg = "Call prepare(var_genes, gene_id_kind=...) before tokenize()."
            raise RuntimeError(msg)
        check_expression(x, self.name)
        columns = sp.csr_matrix(x, dtype=np.float64) @ self.aggregator_
        top = top_expressed(columns, self.max_length - 2, self.column_words_)
        lines = [" ".join(self.column_words_[cols]) for cols in top]
        n_empty = sum(1 for cols in top if cols.size == 0)
        if n_empty:
            logger.warning("tGPT: %d cell(s) express no vocabulary gene; their embedding is all zeros.", n_empty)
        encodings = self.tokenizer_.encode_batch(lines)
        return [{"input_ids": np.asarray(enc.ids, dtype=np.int64)} for enc in encodings]

    def collate(self, cells: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
        length = max(len(c["input_ids"]) for c in cells)
        input_ids = torch.full((len(cells), length), self.pad_id_, dtype=torch.long)
        attention_mask = torch.zeros((len(cells), length), dtype=torch.long)
        for i, cell in enumerate(cells):
            n = len(cell["input_ids"])
            input_ids[i, :n] = torch.from_numpy(cell["input_ids"])
            attention_mask[i, :n] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def embed(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.model is None:
            msg = "Call load(device) before embed()."
            raise RuntimeError(msg)
        attention_mask = batch["attention_mask"]
        # right padding + causal attention: real tokens never see the pads, positions start at 0
        hidden = self.model(input_ids=batch["input_ids"], attention_mask=attention_mask).last_hidden_state
        lengths = attention_mask.sum(dim=1, keepdim=True)
        positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)[None, :]
        keep = (positions >= 1) & (positions < lengths - 1)  # genes only: not </b>, not </s>
        return masked_mean(hidden, keep)


# ---- tiny checkpoints for tests and the demo ----------------------------------------------------


def _default_symbols(n: int = 200) -> list[str]:
    return list(dict.fromkeys(gene_table()["symbol"]))[:n]


def write_tokenizer(folder: Path, words: Sequence[str]) -> None:
    """Write tGPT's tokenizer files (WordLevel, Whitespace, ``</b> $A </s>``) for ``words``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for word in words:
        vocab.setdefault(word, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="</b> $A </s>", pair="$A $B:1", special_tokens=[("</b>", 1), ("</s>", 2)]
    )
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer.save(str(folder / "tokenizer.json"))
    specials = {"bos_token": "</b>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(specials))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"model_max_length": 1024, **{k: specials[k] for k in ("pad_token", "eos_token", "bos_token", "unk_token")}, "tokenizer_class": "PreTrainedTokenizerFast"})
    )


def write_tiny_checkpoint(
    folder: str | Path,
    *,
    genes: Sequence[str] | None = None,
    seed: int = 0,
    legacy_bin: bool = False,
    **config_overrides: Any,
) -> Path:
    """Write a small random-initialised tGPT checkpoint in the official Hugging Face format.

    Parameters
    ----------
    folder
        Created if missing.
    genes
        Symbols (or Ensembl ids, mapped with the shipped table) the vocabulary covers; default:
        200 symbols of the table.
    seed
        Seeds the weights.
    legacy_bin
        Write ``pytorch_model.bin`` with the legacy ``attn.bias``/``attn.masked_bias`` buffers of
        the real checkpoint instead of ``model.safetensors``.
    **config_overrides
        Passed to ``GPT2Config`` (e.g. ``n_layer=3``).

    Returns
    -------
    Path
        The folder.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if genes is None:
        symbols = _default_symbols()
    else:
        genes = [str(g) for g in genes]
        kind = detect_gene_id_kind(genes)
        symbols = [s for s in map_genes(genes, src=kind, dst="symbol") if s is not None]
    words = list(dict.fromkeys(vocabulary_word(s) for s in symbols))
    write_tokenizer(folder, words)
    settings: dict[str, Any] = {
        "vocab_size": len(SPECIAL_TOKENS) + len(words),
        "n_embd": 32,
        "n_layer": 2,
        "n_head": 4,
        "n_positions": 128,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
    }
    settings.update(config_overrides)
    config = GPT2Config(**settings)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config).eval()
    if legacy_bin:
        state = dict(model.state_dict())
        n = config.n_positions
        for i in range(config.n_layer):
            state[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(n, n, dtype=torch.uint8)).view(1, 1, n, n)
            state[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
        config.architectures = ["GPT2LMHeadModel"]
        config.save_pretrained(folder)
        torch.save(state, folder / "pytorch_model.bin")
    else:
        model.save_pretrained(folder)
    return folder
