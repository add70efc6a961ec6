"""Ollama's own chat API (``/api/chat``) as a prompting backend, with its context length checked.

Ollama cuts a prompt longer than the model's context from the start, server-side, and answers with
HTTP 200 as if it had read all of it; its OpenAI-compatible route (``/v1``) takes no context length
and says nothing of the cut (``usage.prompt_tokens`` counts what was left). An answer to the tail
of a prompt, without its instructions or the first cells' genes, would be scored like any other.
This backend asks for the context itself (``options.num_ctx``), for an error instead of the cut
(``truncate: false``, ``shift: false``; Ollama refuses with HTTP 400 when the prompt does not fit),
and, for a server that ignores those, refuses an answer whose prompt took so much of the context
that the longest answer had no room (``prompt_eval_count + max_tokens > num_ctx``: where Ollama
cut, the count is that of the cut prompt, which fills the context), as the local backend refuses
a request longer than the model's positions.
"""

from __future__ import annotations

from typing import Any

from scdm.prompt.backends import (
    Backend,
    PromptRequestError,
    Reply,
    TransientError,
    answer_schema,
    check_model_and_format,
    without_password,
)
from scdm.store.errors import InputDataError

__all__ = ["OllamaBackend", "DEFAULT_NUM_CTX"]

DEFAULT_NUM_CTX = 8192
"""Context asked for by default: a 10-cell request with 4 examples of 10 genes takes about 1,500 tokens."""


class OllamaBackend(Backend):
    """A model served by Ollama, through its ``/api/chat`` route.

    Parameters
    ----------
    model : str
        The model's Ollama name (``llama3.1:8b``).
    base_url : str, default "http://localhost:11434"
        The server (a trailing ``/v1`` or ``/api`` is dropped).
    num_ctx : int, default 8192
        Context length the model is run with (prompt and answer); a request that does not fit is refused.
    temperature, seed, max_tokens, response_format, logprobs, top_logprobs, timeout_s :
        As for :class:`scdm.prompt.backends.OpenAIBackend`.
    transport : httpx.BaseTransport, optional
        For tests.
    """

    kind = "ollama"

    def __init__(self, model: str, *, base_url: str | None = None, num_ctx: int = DEFAULT_NUM_CTX,
                 temperature: float = 0.0, seed: int | None = 0, max_tokens: int = 512,
                 response_format: str = "json_object", logprobs: bool = True, top_logprobs: int = 5,
                 timeout_s: float = 120.0, transport: Any = None) -> None:
        import httpx

        check_model_and_format("ollama", model, "the model name Ollama serves (e.g. llama3.1:8b)", response_format)
        if num_ctx <= max_tokens or max_tokens < 1 or timeout_s <= 0 or temperature < 0 or not 0 <= top_logprobs <= 20:
            msg = (f"num_ctx ({num_ctx}) must exceed max_tokens ({max_tokens}) >= 1, the timeout ({timeout_s}) be > 0, "
                   f"temperature ({temperature}) >= 0 and top_logprobs ({top_logprobs}) between 0 and 20.")
            raise InputDataError(msg)
        root = (base_url or "http://localhost:11434").rstrip("/")
        for suffix in ("/v1", "/api"):
            root = root.removesuffix(suffix)
        self.model, self.endpoint = model, without_password(root)
        self.num_ctx, self.temperature, self.seed, self.max_tokens = int(num_ctx), float(temperature), seed, int(max_tokens)
        self.response_format, self.logprobs, self.top_logprobs = response_format, bool(logprobs), int(top_logprobs)
        self._httpx = httpx
        self._client = httpx.Client(base_url=root, timeout=timeout_s, transport=transport)

    def decoding(self) -> dict[str, Any]:
        # num_ctx is part of the identity: an answer read with another context is another answer
        return {"temperature": self.temperature, "seed": self.seed, "max_tokens": self.max_tokens,
                "response_format": self.response_format, "logprobs": self.logprobs,
                "top_logprobs": self.top_logprobs if self.logprobs else None, "num_ctx": self.num_ctx}

    def _body(self, messages: list[dict[str, Any]]) -> dict[str, Any]:
        options: dict[str, Any] = {"temperature": self.temperature, "num_predict": self.max_tokens, "num_ctx": self.num_ctx}
        if self.seed is not None:
            options["seed"] = self.seed
        body: dict[str, Any] = {"model": self.model, "messages": messages, "stream": False, "options": options,
                                "truncate": False, "shift": False}
        if self.logprobs:
            body["logprobs"], body["top_logprobs"] = True, self.top_logprobs
        if self.response_format == "json_object":
            body["format"] = "json"
        elif self.response_format == "json_schema":
            body["format"] = answer_schema()
        return body

    def send(self, messages: list[dict[str, Any]], n_cells: int) -> Reply:
        httpx = self._httpx
        try:
            response = self._client.post("/api/chat", json=self._body(messages))
        except httpx.TimeoutException as err:
            raise TransientError(f"timed out: {err}") from err
        except httpx.TransportError as err:
            raise TransientError(f"connection failed: {err}") from err
        status = response.status_code
        if status == 429 or status == 408 or status >= 500:
            raise TransientError(f"HTTP {status}: {response.text[:400]}")
        if status != 200:
            raise PromptRequestError(self._refusal(status, response.text))
        try:
            raw = response.json()
        except ValueError as err:  # a proxy's error page: try again
            raise TransientError(f"unreadable response body: {err}") from err
        if not isinstance(raw, dict):
            raise TransientError(f"unreadable response body: {response.text[:200]}")
        prompt_tokens = _count(raw.get("prompt_eval_count"))
        self._check_context(prompt_tokens, n_cells)
        message = raw["message"] if isinstance(raw.get("message"), dict) else {}
        tokens = raw.get("logprobs") if isinstance(raw.get("logprobs"), list) and raw.get("logprobs") else None
        return Reply(text=message.get("content"), raw=raw, prompt_tokens=prompt_tokens,
                     completion_tokens=_count(raw.get("eval_count")), tokens=tokens)

    def _check_context(self, prompt_tokens: int | None, n_cells: int) -> None:
        """Refuse an answer whose prompt left the answer no room: Ollama cut the prompt, or would cut the answer."""
        if prompt_tokens is None or prompt_tokens + self.max_tokens <= self.num_ctx:
            return
        msg = (f"Ollama read {prompt_tokens} prompt tokens of a request of {n_cells} cells with num_ctx {self.num_ctx} and "
               f"--max-tokens {self.max_tokens}: the prompt and its answer do not fit the context, so Ollama cut the "
               "prompt from its start (or would cut the answer); the answer is not the model's answer to the prompt. "
               "Raise --num-ctx (within the model's context length), or lower --cells-per-request, --shots or --genes.")
        raise PromptRequestError(msg)

    def _refusal(self, status: int, body: str) -> str:
        text = f"Ollama at {self.endpoint} refused the request for model {self.model!r} (HTTP {status}): {body[:400]}"
        lower = body.lower()
        if status == 404:
            return text + f" Is {self.model!r} pulled there? Pull it with: ollama pull {self.model}"
        if "context" in lower or "exceeds" in lower:
            return (text + f" The prompt does not fit num_ctx {self.num_ctx} with its answer: raise --num-ctx (within "
                    "the model's context length), or lower --cells-per-request, --shots or --genes.")
        if "logprob" in lower:
            return text + " This Ollama does not give token log-probabilities: update it, or rerun with --no-logprobs."
        return text

    def close(self) -> None:
        self._client.close()


def _count(value: Any) -> int | None:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

