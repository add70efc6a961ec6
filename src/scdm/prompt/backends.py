"""Language-model backends: an OpenAI-compatible chat-completions endpoint, or a local model.

A backend sends one request (chat messages holding up to 10 cells) and returns a :class:`Reply`:
the answer text, the raw response body, token counts, and what it knows about P(sensitive) —
token log-probabilities (OpenAI-style endpoints that return them) or per-cell scores (the local
model, :mod:`scdm.prompt.local`). Errors worth retrying (HTTP 429, 5xx, timeouts, dropped
connections) raise :class:`TransientError`; the runner retries those with exponential back-off.
Anything else raises :class:`PromptRequestError` with what to change.

:class:`OpenAIBackend` uses the official ``openai`` client (imported when the backend is made), so
the same code talks to OpenAI, vLLM (``vllm serve``), llama.cpp's server and Ollama
(``http://localhost:11434/v1``; but Ollama cuts a prompt longer than its context silently there:
:mod:`scdm.prompt.ollama` uses its own API and refuses such prompts). Decoding is deterministic by
default: temperature 0 and a seed.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from scdm.store.errors import InputDataError, ScdmError

__all__ = ["Reply", "Backend", "OpenAIBackend", "TransientError", "PromptRequestError", "RESPONSE_FORMATS",
           "answer_schema", "resolve_api_key", "estimate_tokens", "without_password"]

RESPONSE_FORMATS = ("json_object", "json_schema", "text")
"""json_object: JSON mode; json_schema: structured output with :func:`answer_schema`; text: no constraint."""


class PromptRequestError(ScdmError):
    """A request the endpoint refused or that failed after every retry."""


class TransientError(Exception):
    """A failure worth retrying (rate limit, server error, timeout)."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class Reply:
    """What a backend returns for one request."""

    text: str | None
    """The model's message content (None: no content came back)."""
    raw: dict[str, Any] | None
    """The response body as JSON (stored in the catalog)."""
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    tokens: list[dict[str, Any]] | None = None
    """OpenAI-style ``logprobs.content`` entries, when the endpoint returned them."""
    scores: dict[int, float] = field(default_factory=dict)
    """P(sensitive) per cell number given directly by the backend (the local model)."""


class Backend:
    """What the runner needs from a language model."""

    kind: str = ""
    """``openai``, ``ollama`` or ``hf`` (part of every request's identity)."""
    model: str = ""
    checkpoint_hash: str | None = None
    endpoint: str | None = None
    max_concurrency: int | None = None
    """Requests this backend can serve at once (None: no limit of its own)."""

    def decoding(self) -> dict[str, Any]:
        """The decoding parameters (part of every request's identity)."""
        raise NotImplementedError

    def send(self, messages: list[dict[str, Any]], n_cells: int) -> Reply:
        raise NotImplementedError

    def count_tokens(self, text: str) -> int:
        """Tokens of ``text``: an estimate unless the backend has the model's tokenizer (see :func:`estimate_tokens`)."""
        return estimate_tokens(text)

    def close(self) -> None:
        """Release what the backend holds (clients, model weights)."""


def estimate_tokens(text: str) -> int:
    """A tokenizer-free estimate of a prompt's tokens (BPE tokenisers such as GPT-4o's or LLaMA-3's).

    English words take about one token per 4 letters; gene symbols (capitals and digits, e.g.
    ``SULT1E1``) split into more pieces, about one per 2.5 characters; punctuation is one token.
    Not checked against the real tokenisers (not available offline); treat it as +-30 %.
    """
    total = 0.0
    for piece in re.findall(r"[A-Za-z0-9]+|[^\sA-Za-z0-9]", text):
        if not piece[0].isalnum():
            total += 1
        elif piece.islower() or (piece[0].isupper() and piece[1:].islower()):
            total += max(1.0, len(piece) / 4)
        else:
            total += max(1.0, len(piece) / 2.5)
    return max(1, round(total))


def answer_schema() -> dict[str, Any]:
    """JSON schema of the answer (structured output): ``{"cells": [{"cell": int, "response": label}]}``."""
    item = {"type": "object", "properties": {"cell": {"type": "integer"},
                                             "response": {"type": "string", "enum": ["sensitive", "resistant"]}},
            "required": ["cell", "response"], "additionalProperties": False}
    return {"type": "object", "properties": {"cells": {"type": "array", "items": item}}, "required": ["cells"],
            "additionalProperties": False}


def check_model_and_format(backend: str, model: str, what: str, response_format: str) -> None:
    """Refuse a missing model name or an unknown response format, as every API backend does."""
    if not model:
        msg = f"--model is required with the {backend} backend: {what}."
        raise InputDataError(msg)
    if response_format not in RESPONSE_FORMATS:
        msg = f"response_format={response_format!r} is not one of {', '.join(RESPONSE_FORMATS)}."
        raise InputDataError(msg)


def without_password(url: str) -> str:
    """``url`` with the password of its user part masked (``http://user:***@host/v1``).

    The endpoint is recorded in the catalog (prompt_requests, the run's config), which ``scdm sql``,
    the server's SQL console and its results show; a password in the URL must not go there.
    """
    parts = urlsplit(url)
    if parts.password is None:
        return url
    userinfo, _, host = parts.netloc.rpartition("@")
    return urlunsplit(parts._replace(netloc=f"{userinfo.split(':', 1)[0]}:***@{host}"))


def resolve_api_key(api_key_env: str, base_url: str | None) -> str:
    """The API key from ``$api_key_env``; local endpoints (a ``base_url``) work without one."""
    key = os.environ.get(api_key_env)
    if key:
        return key
    if base_url:
        return "not-needed"  # vLLM, llama.cpp and Ollama ignore the key; the client insists on one
    msg = (f"No API key: set ${api_key_env} (or name another variable with --api-key-env), or point --base-url at a "
           "local OpenAI-compatible server such as Ollama (http://localhost:11434/v1) or vLLM (http://localhost:8000/v1).")
    raise InputDataError(msg)


class OpenAIBackend(Backend):
    """Any OpenAI-compatible chat-completions endpoint, through the official ``openai`` client.

    Parameters
    ----------
    model : str
        Model name as the endpoint knows it (``gpt-4o-mini``, ``llama3.1:8b``, ...).
    base_url : str, optional
        Endpoint, e.g. ``http://localhost:11434/v1``; default: OpenAI's.
    api_key : str, optional
        Default: from ``$api_key_env`` (see :func:`resolve_api_key`).
    api_key_env : str, default "OPENAI_API_KEY"
    temperature : float, default 0.0
    seed : int or None, default 0
        Sent to the endpoint (OpenAI and vLLM honour it; a best effort elsewhere).
    max_tokens : int, default 512
        Longest answer (10 cells in JSON take about 150 tokens).
    response_format : {"json_object", "json_schema", "text"}, default "json_object"
    logprobs : bool, default True
        Ask for token log-probabilities (P(sensitive), hence AUROC/AP). Without them AUROC and
        AP are NULL with the flag ``no_scores``.
    top_logprobs : int, default 5
        Alternatives per token (OpenAI allows up to 20).
    timeout_s : float, default 120
        Per attempt.
    """

    kind = "openai"

    def __init__(self, model: str, *, base_url: str | None = None, api_key: str | None = None,
                 api_key_env: str = "OPENAI_API_KEY", temperature: float = 0.0, seed: int | None = 0,
                 max_tokens: int = 512, response_format: str = "json_object", logprobs: bool = True,
                 top_logprobs: int = 5, timeout_s: float = 120.0) -> None:
        check_model_and_format("openai", model, "the model name the endpoint serves (e.g. gpt-4o-mini)", response_format)
        if not 0 <= top_logprobs <= 20:
            msg = f"top_logprobs={top_logprobs!r} must be between 0 and 20."
            raise InputDataError(msg)
        if max_tokens < 1 or timeout_s <= 0 or temperature < 0:
            msg = f"max_tokens ({max_tokens}) must be >= 1, timeout ({timeout_s}) > 0 and temperature ({temperature}) >= 0."
            raise InputDataError(msg)
        try:
            import openai
        except ImportError as err:  # pragma: no cover - the test extra installs it
            msg = "The openai backend needs the official client: pip install 'scdm[prompt]' (or pip install openai)."
            raise InputDataError(msg) from err
        self.model = model
        self.endpoint = without_password(base_url or "https://api.openai.com/v1")  # recorded in the catalog
        self.temperature, self.seed, self.max_tokens = float(temperature), seed, int(max_tokens)
        self.response_format, self.logprobs, self.top_logprobs = response_format, bool(logprobs), int(top_logprobs)
        key = api_key or resolve_api_key(api_key_env, base_url)
        # retries are the runner's (one policy for every backend, counted and recorded)
        self._openai = openai
        self._client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=timeout_s)

    def decoding(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "seed": self.seed, "max_tokens": self.max_tokens,
                "response_format": self.response_format, "logprobs": self.logprobs,
                "top_logprobs": self.top_logprobs if self.logprobs else None}

    def _arguments(self, messages: list[dict[str, Any]]) -> dict[str, Any]:
        args: dict[str, Any] = {"model": self.model, "messages": messages, "temperature": self.temperature,
                                "max_tokens": self.max_tokens}
        if self.seed is not None:
            args["seed"] = self.seed
        if self.logprobs:
            args["logprobs"] = True
            args["top_logprobs"] = self.top_logprobs
        if self.response_format == "json_object":
            args["response_format"] = {"type": "json_object"}
        elif self.response_format == "json_schema":
            args["response_format"] = {"type": "json_schema",
                                       "json_schema": {"name": "cell_responses", "strict": True, "schema": answer_schema()}}
        return args

    def send(self, messages: list[dict[str, Any]], n_cells: int) -> Reply:
        try:
            completion = self._client.chat.completions.create(**self._arguments(messages))
        except self._openai.APIError as err:
            raise self._translate(err) from err
        except ValueError as err:  # HTTP 200 whose body is not JSON (a proxy's error page, ...): try again
            raise TransientError(f"unreadable response body: {err}") from err
        raw = completion.model_dump(mode="json")
        choice = completion.choices[0] if completion.choices else None
        tokens = None
        if choice is not None and choice.logprobs is not None and choice.logprobs.content:
            tokens = [t.model_dump(mode="json") for t in choice.logprobs.content]
        usage = completion.usage
        return Reply(text=None if choice is None else choice.message.content, raw=raw,
                     prompt_tokens=None if usage is None else usage.prompt_tokens,
                     completion_tokens=None if usage is None else usage.completion_tokens, tokens=tokens)

    def _translate(self, err: Exception) -> Exception:
        """TransientError for what a retry may fix, else PromptRequestError saying what to change."""
        openai = self._openai
        if isinstance(err, openai.APITimeoutError):
            return TransientError(f"timed out: {err}")
        if isinstance(err, openai.APIConnectionError):
            return TransientError(f"connection failed: {err}")
        if isinstance(err, openai.APIStatusError):
            status = err.status_code
            retry_after = _retry_after(err.response.headers)
            if status == 429 or status >= 500 or status == 408:
                return TransientError(f"HTTP {status}: {_body(err)}", retry_after=retry_after)
            return PromptRequestError(self._refusal(status, _body(err)))
        # a body that is not a chat completion (APIResponseValidationError, ...): try again
        return TransientError(f"unreadable response: {err}")

    def _refusal(self, status: int, body: str) -> str:
        text = f"The endpoint {self.endpoint} refused the request for model {self.model!r} (HTTP {status}): {body[:400]}"
        lower = body.lower()
        if status in (401, 403):
            return text + " Check the API key (--api-key-env names the variable holding it)."
        if status == 404:
            return text + f" Is {self.model!r} served there? List the models with: curl {(self.endpoint or '').rstrip('/')}/models"
        if "logprob" in lower:
            return text + " This endpoint does not give token log-probabilities: rerun with --no-logprobs (AUROC/AP will be NULL)."
        if "response_format" in lower or "json" in lower:
            return text + " Try another --response-format (json_object, json_schema or text)."
        return text

    def close(self) -> None:
        self._client.close()


def _retry_after(headers: Any) -> float | None:
    value = headers.get("retry-after") if headers is not None else None
    try:
        return None if value is None else max(0.0, float(value))
    except ValueError:
        return None


def _body(err: Any) -> str:
    body = getattr(err, "body", None)
    if body is None:
        return str(getattr(err, "message", err))
    return body if isinstance(body, str) else json.dumps(body)[:1000]
