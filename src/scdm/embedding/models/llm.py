"""A general-purpose causal language model (e.g. LLaMA-3-8B) reading a "cell sentence".

There is no official single-cell recipe for LLaMA (MODELS.md section 9); this follows the
Cell2Sentence idea used by scDrugMap-style baselines: a cell becomes the symbols of its top-k
expressed genes, in descending order, joined by a separator and put into a text template. The
folder's own tokenizer turns that text into tokens (adding its BOS as it is configured to), the base
model (``AutoModel``: no LM head) runs over it, and the embedding is the mean of the last hidden state
over the real (non-pad) tokens.

Checkpoint folder: any local Hugging Face causal-LM folder, e.g. ``meta-llama/Meta-Llama-3-8B`` as
downloaded::

    config.json
    model.safetensors | model-0000x-of-0000n.safetensors + model.safetensors.index.json | pytorch_model*.bin
    tokenizer.json (+ tokenizer_config.json, special_tokens_map.json)

Only genes the shipped human gene table knows are written into sentences, under their official
symbol (a previous symbol or alias resolved, see :mod:`scdm.store.genes`): the LLM knows genes by
their official names, and other identifiers would spend tokens on noise. Genes of equal expression
are ranked by that official symbol (which of them make the top-k and their order in the sentence),
never by the dataset's column order, which differs between studies: the same cell gives the same
sentence whatever the order of its columns, as the prompting stage's sentences do. Batches are padded on the right by default; ``padding_side="left"``
gives the same embeddings (position ids are computed from the attention mask). With right padding the
model runs without an attention mask: under causal attention a real token never sees the pads after
it, so its output is the same (bit for bit on the CPU), and SDPA can use its causal flash kernel; the
pads' outputs are left out of the mean. A model whose attention is not causal in every layer keeps
the mask.

On CUDA the weights are loaded in bfloat16 (an 8B model would need 32 GB in float32); elsewhere in
float32. The runner's autocast decides the compute precision.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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
from scdm.store.checkpoints import no_custom_code
from scdm.store.errors import CheckpointError, InputDataError
from scdm.store.genes import as_gene_id_kind, detect_gene_id_kind, gene_table, map_genes

__all__ = ["LLMAdapter", "write_tiny_checkpoint", "DEFAULT_TEMPLATE"]

logger = logging.getLogger(__name__)

WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")
GENES_FIELD = "{genes}"
DEFAULT_TEMPLATE = "{genes}"
"""The bare cell sentence; e.g. ``"Top expressed genes of this cell: {genes}."`` adds a prompt."""
PADDING_SIDES = ("right", "left")
TIE_BREAK = "descending value, then official symbol"
"""How genes of equal expression are ranked (recorded in ``params()``): never by the dataset's column order."""


def _official_symbols(names: Sequence[str]) -> list[str | None]:
    """The official symbol of each dataset symbol (a previous symbol or alias resolved), None where unknown.

    The sentence names genes as the literature does now, so ``GNB2L1`` in a matrix annotated before
    its rename is written ``RACK1`` rather than dropped with the cell's most expressed genes.
    """
    known = map_genes(list(names), src="symbol", dst="entrez")
    official = map_genes([k or "" for k in known], src="entrez", dst="symbol")
    return [o if k is not None else None for o, k in zip(official, known)]


def cell_sentence(symbols: Sequence[str], *, separator: str = " ", template: str = DEFAULT_TEMPLATE) -> str:
    """The text one cell becomes: ``template`` with ``{genes}`` replaced by the joined symbols."""
    return template.replace(GENES_FIELD, separator.join(symbols))


@register_adapter
class LLMAdapter(Adapter):
    """Cell embeddings from a local Hugging Face causal language model.

    Parameters
    ----------
    checkpoint
        A Hugging Face model folder (config, weights, ``tokenizer.json``).
    seed
        Unused: the cell sentence is deterministic.
    top_k
        Genes per cell sentence (the most expressed ones).
    separator
        Between gene symbols.
    template
        Text around the genes; must contain ``{genes}`` once.
    max_length
        Truncate the tokenised text to this many tokens (``None``: no truncation).
    padding_side
        ``"right"`` or ``"left"``; the embeddings do not depend on it.
    """

    name = "llm"
    description = "Local Hugging Face causal LM (e.g. LLaMA-3-8B): cell sentence of top-k genes, mean of the last hidden state."
    gene_id_kind = "symbol"
    requires_counts = False
    ranks_expression = True
    checkpoint_files = ("config.json", "tokenizer.json")
    # --checkpoint org/name: what AutoTokenizer/AutoModel read, the weights in one format (and their shard index)
    hub_patterns = (*checkpoint_files, "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "generation_config.json",
                    "model.safetensors.index.json|pytorch_model.bin.index.json", "|".join(WEIGHT_PATTERNS))
    read_if_present = PEFT_ADAPTER_FILES  # AutoModel.from_pretrained applies a PEFT adapter saved beside the weights
    lora_target_modules = ("q_proj", "k_proj", "v_proj", "o_proj")
    default_batch_size = 8

    def __init__(
        self,
        checkpoint: str | Path | None = None,
        *,
        seed: int = 0,
        top_k: int = 100,
        separator: str = " ",
        template: str = DEFAULT_TEMPLATE,
        max_length: int | None = None,
        padding_side: str = "right",
    ) -> None:
        super().__init__(checkpoint, seed=seed)
        # ints whatever they are given as: params() keys the embedding, where numpy.int64(100) was "100", another id
        self.top_k = require_int_param("llm", "top_k", top_k, minimum=1)
        self.separator = separator
        self.template = template
        self.max_length = None if max_length is None else require_int_param("llm", "max_length", max_length, minimum=1)
        self.padding_side = padding_side

    # ---- checkpoint -----------------------------------------------------------------------------
    def check_checkpoint(self) -> None:
        super().check_checkpoint()
        assert self.checkpoint is not None
        if not any(any(self.checkpoint.glob(p)) for p in WEIGHT_PATTERNS):
            msg = (
                f"Checkpoint folder {str(self.checkpoint)!r} is missing the weights: expected "
                f"{' or '.join(WEIGHT_PATTERNS)} (a Hugging Face model save)."
            )
            raise CheckpointError(msg)

    def _check_options(self) -> None:
        if self.template.count(GENES_FIELD) != 1:
            msg = f"template={self.template!r} must contain {GENES_FIELD!r} exactly once (where the gene symbols go)."
            raise InputDataError(msg)
        if self.top_k < 1:
            msg = f"top_k={self.top_k}; it must be at least 1."
            raise InputDataError(msg)
        if self.padding_side not in PADDING_SIDES:
            msg = f"padding_side={self.padding_side!r} is not one of {', '.join(PADDING_SIDES)}."
            raise InputDataError(msg)
        if self.max_length is not None and self.max_length < 1:
            msg = f"max_length={self.max_length}; use a positive number of tokens or None."
            raise InputDataError(msg)

    def _config(self) -> dict[str, Any]:
        if getattr(self, "config_", None) is None:
            assert self.checkpoint is not None
            self.config_ = read_hf_config(self.checkpoint, "model")
        return self.config_

    def _load_tokenizer(self) -> None:
        if getattr(self, "tokenizer_", None) is not None:
            return
        from transformers import AutoTokenizer

        self._check_options()
        self.check_checkpoint()
        positions = self.max_positions()
        if self.max_length is not None and positions is not None and self.max_length > positions:
            msg = (f"max_length={self.max_length} is longer than the {positions} positions this model was trained on "
                   f"(max_position_embeddings in {str(self.checkpoint)!r}); use --param max_length={positions} or less.")
            raise InputDataError(msg)
        assert self.checkpoint is not None
        with no_custom_code(self.checkpoint, "its tokenizer"):
            tokenizer = AutoTokenizer.from_pretrained(self.checkpoint, local_files_only=True, trust_remote_code=False)
        pad = tokenizer.pad_token_id
        if pad is None:  # LLaMA-3 has no pad token; the value is masked out anyway
            pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        self.pad_id_ = int(pad)
        self.tokenizer_ = tokenizer

    def max_positions(self) -> int | None:
        """Token positions the model was trained on (``max_position_embeddings``, GPT-2's ``n_positions``); None if unstated."""
        config = self._config()
        for section in (config, config.get("text_config") or {}):
            for key in ("max_position_embeddings", "n_positions"):
                value = section.get(key)
                if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                    return value
        return None

    def configure_precision(self, device: str | torch.device, precision: str) -> dict[str, Any]:
        """On CUDA the weights are bfloat16 whatever the autocast (an 8B model in float32 is 32 GB).

        An fp32 or fp16 run there is therefore not the CPU's fp32 run: it records ``weights: bf16``
        and gets an embedding of its own. (A bf16 run records nothing, as it always did.)
        """
        out = super().configure_precision(device, precision)
        if str(device).startswith("cuda") and precision != "bf16":
            self.weight_precision = "bf16"
            return {"weights": "bf16"}
        return out

    def load(self, device: str | torch.device = "cpu") -> None:
        from transformers import AutoModel

        self._load_tokenizer()
        assert self.checkpoint is not None
        self.device = torch.device(device)
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        with own_load_report(), readable_weights(self.checkpoint, "a Hugging Face language model"), \
                no_custom_code(self.checkpoint, "the model"):
            model, info = AutoModel.from_pretrained(
                self.checkpoint,
                attn_implementation="sdpa",
                output_loading_info=True,
                local_files_only=True,
                trust_remote_code=False,
                **dtype_argument(dtype),
            )
        if info["missing_keys"]:
            missing = sorted(info["missing_keys"])
            msg = (
                f"The weights in {str(self.checkpoint)!r} lack {len(missing)} tensors of the "
                f"{type(model).__name__} (e.g. {', '.join(missing[:3])}); the folder is incomplete."
            )
            raise CheckpointError(msg)
        check_unused_weights(info, self.checkpoint, heads=("lm_head.",))  # the causal LM's output head
        self.model = model.to(self.device).eval()
        logger.info("Loaded %s from %s (%s, %s).", type(model).__name__, self.checkpoint, dtype, self.device)

    # ---- description ----------------------------------------------------------------------------
    @property
    def emb_dim(self) -> int:
        config = self._config()
        if "hidden_size" in config:
            return int(config["hidden_size"])
        return int(config.get("text_config", {})["hidden_size"])

    def params(self) -> dict[str, Any]:
        # tie_break is part of the identity: embeddings made before broke ties by the dataset's column order
        return {"top_k": self.top_k, "separator": self.separator, "template": self.template, "max_length": self.max_length,
                "tie_break": TIE_BREAK}

    # ---- data -----------------------------------------------------------------------------------
    def prepare(self, var_genes: Sequence[str], *, gene_id_kind: str) -> GeneAudit:
        self._load_tokenizer()
        names = [str(g) for g in var_genes]
        if gene_id_kind == "symbol":
            symbols = _official_symbols(names)
        else:
            symbols = list(map_genes(names, src=as_gene_id_kind(gene_id_kind), dst="symbol"))
        column_symbols = list(dict.fromkeys(s for s in symbols if s is not None))
        index = {s: i for i, s in enumerate(column_symbols)}
        column_of_gene = np.array([index[s] if s is not None else -1 for s in symbols], dtype=np.int64)
        used = column_of_gene >= 0
        audit = GeneAudit(
            n_input_genes=len(names),
            n_matched=int(used.sum()),
            unmatched_examples=tuple(n for n, u in zip(names, used) if not u)[:20],
            id_kind_used="symbol",
            # columns of one symbol (two Ensembl ids of one gene) are summed into one gene of the sentence
            extra={"n_symbols": len(column_symbols), "n_collapsed_duplicates": int(used.sum()) - len(column_symbols)},
        )
        require_matches(audit, self.name)
        self.aggregator_ = aggregation_matrix(column_of_gene, len(column_symbols))
        self.column_symbols_ = np.array(column_symbols, dtype=object)
        # a cell without them becomes the bare template (BOS + prompt): one constant, non-zero vector
        self.known_columns_ = np.flatnonzero(used)
        logger.info("llm: %d of %d genes have an official symbol.", audit.n_matched, audit.n_input_genes)
        return audit

    def tokenize(self, x: sp.csr_matrix, rows: np.ndarray) -> list[dict[str, np.ndarray]]:
        if getattr(self, "aggregator_", None) is None:
            msg = "Call prepare(var_genes, gene_id_kind=...) before tokenize()."
            raise RuntimeError(msg)
        check_expression(x, self.name)
        columns = sp.csr_matrix(x, dtype=np.float64) @ self.aggregator_
        texts = [
            cell_sentence(list(self.column_symbols_[cols]), separator=self.separator, template=self.template)
            for cols in top_expressed(columns, self.top_k, self.column_symbols_)
        ]
        truncate = self.max_length is not None
        encoded = self.tokenizer_(texts, add_special_tokens=True, truncation=truncate, max_length=self.max_length)
        cells = [{"input_ids": np.asarray(ids, dtype=np.int64)} for ids in encoded["input_ids"]]
        self._check_within_positions(cells, rows)
        return cells

    def _check_within_positions(self, cells: list[dict[str, np.ndarray]], rows: np.ndarray) -> None:
        """Refuse cell sentences longer than the model's positions.

        A rotary model (LLaMA) reads positions past the ones it was trained on without an error and
        returns vectors that look like any other; a GPT-2-style one fails with an index error.
        """
        positions = self.max_positions()
        if positions is None:
            return
        lengths = np.array([len(c["input_ids"]) for c in cells], dtype=np.int64)
        over = np.flatnonzero(lengths > positions)
        if not over.size:
            return
        shown = ", ".join(str(int(r)) for r in np.asarray(rows)[over][:10])
        msg = (f"The cell sentences of {over.size} cell(s) (rows {shown}{', ...' if over.size > 10 else ''}) take up to "
               f"{int(lengths.max())} tokens, more than the {positions} positions this model was trained on, so their "
               f"embeddings would not be the model's. Lower --param top_k (now {self.top_k}), or pass --param "
               f"max_length={positions} to cut each sentence there (the lowest-ranked genes and the template's end are dropped).")
        raise InputDataError(msg)

    def collate(self, cells: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
        length = max(len(c["input_ids"]) for c in cells)
        input_ids = torch.full((len(cells), length), self.pad_id_, dtype=torch.long)
        attention_mask = torch.zeros((len(cells), length), dtype=torch.long)
        for i, cell in enumerate(cells):
            n = len(cell["input_ids"])
            where = slice(length - n, length) if self.padding_side == "left" else slice(0, n)
            input_ids[i, where] = torch.from_numpy(cell["input_ids"])
            attention_mask[i, where] = 1
        # positions count real tokens only, so left padding does not shift them
        position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}

    def embed(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.model is None:
            msg = "Call load(device) before embed()."
            raise RuntimeError(msg)
        mask = batch["attention_mask"]
        # right padding + causal attention: real tokens never attend to the pads behind them, so the
        # model needs no mask (explicit position ids); the mask still selects what is averaged
        model_mask = None if self.padding_side == "right" and _causal(self.model) else mask
        out = self.model(input_ids=batch["input_ids"], attention_mask=model_mask, position_ids=batch["position_ids"], use_cache=False)
        return masked_mean(out.last_hidden_state, mask.bool())


def _causal(model: torch.nn.Module) -> bool:
    """Whether every attention module of a Hugging Face model declares ``is_causal`` (and there is one)."""
    flags = [bool(m.is_causal) for m in model.modules() if isinstance(getattr(m, "is_causal", None), bool)]
    return bool(flags) and all(flags)


# ---- tiny checkpoints for tests and the demo ----------------------------------------------------

BOS, EOS, UNK = "<|begin_of_text|>", "<|end_of_text|>", "<unk>"


def _default_symbols(n: int = 200) -> list[str]:
    return list(dict.fromkeys(gene_table()["symbol"]))[:n]


def write_tokenizer(folder: Path, texts: Sequence[str]) -> None:
    """Write a LLaMA-3-style ``tokenizer.json`` (WordLevel over the words of ``texts``, BOS template)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    pre = pre_tokenizers.Whitespace()
    vocab = {token: i for i, token in enumerate((BOS, EOS, UNK))}
    for text in texts:
        for word, _ in pre.pre_tokenize_str(text):
            vocab.setdefault(word, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tokenizer.pre_tokenizer = pre
    # like LLaMA-3's tokenizer.json: the post-processor prepends <|begin_of_text|>
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B:1", special_tokens=[(BOS, 0)]
    )
    tokenizer.add_special_tokens([BOS, EOS, UNK])
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS, "model_max_length": 8192,
              "model_input_names": ["input_ids", "attention_mask"], "clean_up_tokenization_spaces": True}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "special_tokens_map.json").write_text(json.dumps({"bos_token": BOS, "eos_token": EOS}))


def write_tiny_checkpoint(
    folder: str | Path,
    *,
    genes: Sequence[str] | None = None,
    seed: int = 0,
    extra_text: Sequence[str] = ("Top expressed genes of this cell: .",),
    **config_overrides: Any,
) -> Path:
    """Write a small random-initialised LLaMA checkpoint and tokenizer in the Hugging Face format.

    Parameters
    ----------
    folder
        Created if missing.
    genes
        Symbols (or Ensembl ids, mapped with the shipped table) the vocabulary covers; default: 200
        symbols of the table. Symbols are split by the Whitespace pre-tokenizer (``HLA-B`` ->
        ``HLA``, ``-``, ``B``), as a real tokenizer would split them into several tokens.
    seed
        Seeds the weights.
    extra_text
        Template text whose words the vocabulary should also hold.
    **config_overrides
        Passed to ``LlamaConfig`` (e.g. ``num_hidden_layers=3``).

    Returns
    -------
    Path
        The folder.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if genes is None:
        symbols = _default_symbols()
    else:
        genes = [str(g) for g in genes]
        kind = detect_gene_id_kind(genes)
        symbols = ([*genes, *(s for s in _official_symbols(genes) if s is not None)] if kind == "symbol"
                   else [s for s in map_genes(genes, src=kind, dst="symbol") if s is not None])
        symbols = list(dict.fromkeys(symbols))
    write_tokenizer(folder, [*symbols, *extra_text])
    from tokenizers import Tokenizer

    vocab_size = Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab_size()
    settings: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 64,
        "max_position_embeddings": 1024,
        "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5,
        "hidden_act": "silu",
        "bos_token_id": 0,
        "eos_token_id": 1,
        "tie_word_embeddings": False,
    }
    settings.update(config_overrides)
    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig(**settings)).eval().save_pretrained(folder)
    return folder
