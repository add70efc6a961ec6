"""A local Hugging Face causal language model as a prompting backend (no server, no API key).

The model reads the same prompt as an endpoint would (through the tokenizer's chat template when it
has one, else the message text followed by ``Answer:``) and answers in the JSON form the prompt asks
for. It does not sample free text: it writes the answer's fixed parts itself and, at each cell's
label, compares the next-token probabilities of the two label words, takes the more likely one
(greedy decoding restricted to valid answers) and records

    P(sensitive) = p(first token of "sensitive") / (p(first token of "sensitive") + p(first token of "resistant"))

at that position, so AUROC/AP always have scores. The first token is the first one at which the
two continuations' tokenisations differ, so tokenisers that merge the quote with the word work too.
The key/value cache is reused from one label to the next (cropped where the text's tokenisation
changed), so a request costs about one forward pass over the prompt.

Weights are loaded with ``transformers`` (safetensors, or ``.bin`` through its weights-only loader)
in float32 on CPU and bfloat16 on CUDA; the checkpoint's content hash is part of every request's
identity.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from scdm.prompt.backends import Backend, PromptRequestError, Reply
from scdm.prompt.templates import LABELS
from scdm.store.checkpoints import checkpoint_content_hash, no_custom_code
from scdm.store.errors import CheckpointError, InputDataError

__all__ = ["HFBackend", "checkpoint_hash"]

logger = logging.getLogger(__name__)

ANSWER_VERSION = "json-cells-v1"
"""Version of the answer the local model writes (part of its decoding parameters)."""


def checkpoint_hash(folder: str | Path) -> str:
    """Content hash of every file of a checkpoint folder (names and bytes), as the embedding stage hashes it."""
    return checkpoint_content_hash(folder)


class HFBackend(Backend):
    """A local causal LM folder (``config.json``, weights, ``tokenizer.json``) in the Hugging Face format.

    Parameters
    ----------
    checkpoint : str or Path
        The model folder, e.g. a downloaded ``meta-llama/Meta-Llama-3-8B-Instruct``.
    model : str, optional
        Name shown in results (default: the folder name).
    device : str, default "auto"
        ``auto`` (CUDA if available, else CPU), ``cpu``, ``cuda``, ``cuda:1``, ...
    """

    kind = "hf"
    max_concurrency = 1

    def __init__(self, checkpoint: str | Path, *, model: str | None = None, device: str = "auto") -> None:
        folder = Path(checkpoint)
        if not (folder / "config.json").is_file():
            msg = (f"{str(folder)!r} is not a Hugging Face model folder (no config.json). Pass the folder holding "
                   "config.json, the weights and tokenizer.json (e.g. a downloaded Meta-Llama-3-8B-Instruct).")
            raise CheckpointError(msg)
        self.folder = folder
        self.model = model or folder.resolve().name
        self.device_name = device
        self.checkpoint_hash = checkpoint_hash(folder)
        self.endpoint = f"local:{folder.resolve()}"
        self._tokenizer: Any = None
        self._model: Any = None
        self._device: Any = None

    # ---- loading -----------------------------------------------------------------------------
    @property
    def precision(self) -> str:
        return "bfloat16" if self._device_str().startswith("cuda") else "float32"

    def _device_str(self) -> str:
        if self.device_name != "auto":
            return self.device_name
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            try:
                with no_custom_code(self.folder, "its tokenizer"):
                    self._tokenizer = AutoTokenizer.from_pretrained(self.folder, local_files_only=True, trust_remote_code=False)
            except (OSError, ValueError) as err:
                msg = f"Cannot load the tokenizer of {str(self.folder)!r}: {err}"
                raise CheckpointError(msg) from err
        return self._tokenizer

    def _load(self) -> None:
        if self._model is not None:
            return
        import torch
        import transformers
        from transformers import AutoModelForCausalLM

        device = self._device_str()
        dtype = torch.bfloat16 if self.precision == "bfloat16" else torch.float32
        # transformers 5 renamed torch_dtype; without it, weights load in the dtype they were saved in
        dtype_arg = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
        try:
            with no_custom_code(self.folder, "the model"):
                loaded: Any = AutoModelForCausalLM.from_pretrained(self.folder, local_files_only=True, output_loading_info=True,
                                                                   trust_remote_code=False, **{dtype_arg: dtype})
        except (OSError, ValueError) as err:
            msg = f"Cannot load a causal language model from {str(self.folder)!r}: {err}"
            raise CheckpointError(msg) from err
        model, info = loaded
        missing = sorted(k for k in info["missing_keys"] if not k.endswith("rotary_emb.inv_freq"))
        if missing:  # transformers would fill them with random values and answer anyway
            msg = (f"The weights in {str(self.folder)!r} lack {len(missing)} tensors of the model (e.g. "
                   f"{', '.join(missing[:3])}); the folder is incomplete.")
            raise CheckpointError(msg)
        self._device = torch.device(device)
        self._model = model.to(self._device).eval()
        logger.info("prompt: loaded %s on %s (%s)", self.model, device, self.precision)

    def decoding(self) -> dict[str, Any]:
        return {"decoding": "greedy over the two labels", "answer": ANSWER_VERSION, "precision": self.precision}

    # ---- one request ---------------------------------------------------------------------------
    def prompt_text(self, messages: list[dict[str, Any]]) -> tuple[str, bool]:
        """The text the model reads and whether the tokenizer should add its special tokens."""
        tok = self.tokenizer()
        if getattr(tok, "chat_template", None):
            return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), False
        return "\n\n".join(str(m["content"]).strip() for m in messages) + "\n\nAnswer:\n", True

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer()(text, add_special_tokens=False)["input_ids"])

    def send(self, messages: list[dict[str, Any]], n_cells: int) -> Reply:
        self._load()
        import torch

        text, special = self.prompt_text(messages)
        self._check_context(text, special, n_cells)
        state = _CachedForward(self._model, self._device)
        answer, scores, decisions = '{"cells": [', {}, []
        with torch.inference_mode():
            for i in range(1, n_cells + 1):
                answer += ("" if i == 1 else ", ") + f'{{"cell": {i}, "response": "'
                p, tokens = self._p_sensitive(state, text + answer, special)
                label = LABELS[1] if p >= 0.5 else LABELS[0]
                scores[i] = p
                decisions.append({"cell": i, "p_sensitive": p, "label_tokens": tokens})
                answer += label + '"}'
        answer += "]}"
        encode = self.tokenizer()
        n_prompt = len(encode(text, add_special_tokens=special)["input_ids"])
        n_total = len(encode(text + answer, add_special_tokens=special)["input_ids"])
        raw = {"backend": "hf", "model": self.model, "text": answer, "decisions": decisions}
        return Reply(text=answer, raw=raw, prompt_tokens=n_prompt, completion_tokens=n_total - n_prompt, scores=scores)

    def _check_context(self, text: str, special: bool, n_cells: int) -> None:
        """Refuse a request longer than the model's context (prompt and the longest possible answer).

        Past its trained positions a rotary model (LLaMA) still answers, with degraded attention, and
        an absolute-position one (GPT-2) fails with an index error: either way the answer would not
        be the model's answer to the prompt.
        """
        config = self._model.config
        limit = next((int(v) for v in (getattr(config, k, None) for k in ("max_position_embeddings", "n_positions"))
                      if isinstance(v, int) and v > 0), None)
        if limit is None:
            return
        longest = max(LABELS.values(), key=lambda w: len(self.tokenizer()(w, add_special_tokens=False)["input_ids"]))
        answer = '{"cells": [' + ", ".join(f'{{"cell": {i}, "response": "{longest}"}}' for i in range(1, n_cells + 1)) + "]}"
        n = len(self.tokenizer()(text + answer, add_special_tokens=special)["input_ids"])
        if n > limit:
            msg = (f"A request of {n_cells} cells takes {n} tokens with its answer, more than the {limit} positions of "
                   f"{self.model!r}: past them the model does not read the prompt as it was trained to. Lower "
                   "--cells-per-request, --shots or --genes, or use a model with a longer context.")
            raise PromptRequestError(msg)

    def _p_sensitive(self, state: _CachedForward, context: str, special: bool) -> tuple[float, list[int]]:
        import torch

        tok = self.tokenizer()
        ids = {label: tok(context + word, add_special_tokens=special)["input_ids"] for label, word in LABELS.items()}
        a, b = ids[1], ids[0]
        c = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        if c == 0 or c >= min(len(a), len(b)):
            msg = (f"The tokenizer of {self.model!r} does not tell 'sensitive' from 'resistant' after the prompt "
                   "(identical or empty tokenisations); this model cannot be prompted with these labels.")
            raise InputDataError(msg)
        logits = state.next_logits(a[:c]).float()
        two = torch.log_softmax(logits, dim=-1)[[a[c], b[c]]]
        p = float(torch.softmax(two, dim=0)[0])
        return p, [int(a[c]), int(b[c])]

    def close(self) -> None:
        self._model = None


class _CachedForward:
    """Next-token logits of a growing token sequence, reusing the key/value cache of its prefix."""

    def __init__(self, model: Any, device: Any) -> None:
        import inspect

        self.model, self.device = model, device
        self.ids: list[int] = []
        self.cache: Any = None
        # transformers 5 calls the key/value cache ``cache``; 4.x ``past_key_values``
        self.cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def next_logits(self, ids: list[int]) -> Any:
        import torch

        keep = 0
        for x, y in zip(self.ids, ids):
            if x != y:
                break
            keep += 1
        keep = min(keep, len(ids) - 1)  # at least one new token gives the logits
        if self.cache is not None and keep < self.cache.get_seq_length():
            self.cache.crop(keep)
        if self.cache is None:
            keep = 0
        new = torch.tensor([ids[keep:]], dtype=torch.long, device=self.device)
        out = self.model(input_ids=new, use_cache=True, **{self.cache_arg: self.cache})
        self.cache, self.ids = getattr(out, self.cache_arg), list(ids)
        return out.logits[0, -1]
