"""--backend ollama: Ollama's own API, a prompt longer than the context refused instead of answered from its tail.

The fake server below does what Ollama does: it counts the prompt's tokens, and when they exceed
``options.num_ctx`` it either refuses (a server honouring ``truncate: false``) or, as Ollama's
OpenAI-compatible route and older servers do, keeps the prompt's last ``num_ctx`` tokens, answers
from them with HTTP 200 and reports their count as ``prompt_eval_count``.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from scdm.prompt import prompt
from scdm.prompt.backends import PromptRequestError, estimate_tokens
from scdm.prompt.ollama import OllamaBackend
from scdm.prompt.runner import cut_short
from scdm.store.prompts import PromptAnswer, PromptRecord
from tests.prompt.fake_llm import _logprobs, cell_genes, p_sensitive

OPTIONS: dict[str, Any] = {"scenarios": ["pooled"], "by": ["all"], "folds": 2, "cells_per_request": 8, "silent": True}


class FakeOllama:
    """``POST /api/chat`` answered like Ollama, the marker read as in tests/prompt/fake_llm.py."""

    def __init__(self, marker: str, *, honours_truncate: bool) -> None:
        self.marker, self.honours_truncate = marker, honours_truncate
        self.bodies: list[dict[str, Any]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/api/chat"
        body = json.loads(request.content)
        self.bodies.append(body)
        text = "\n".join(str(m["content"]) for m in body["messages"])
        n_prompt, num_ctx = estimate_tokens(text), body["options"]["num_ctx"]
        if n_prompt > num_ctx:
            if self.honours_truncate and body.get("truncate") is False:
                return httpx.Response(400, json={"error": f"input length ({n_prompt} tokens) exceeds the model's "
                                                          f"context length ({num_ctx} tokens)"})
            n_prompt = num_ctx  # cut from the start: the instructions and the first cells are gone
            cells: list[list[str]] = []
        else:
            cells = cell_genes(text)
        scores = [p_sensitive(g, self.marker) for g in cells] or [0.2] * len(cell_genes(text))
        labels = ["sensitive" if p >= 0.5 else "resistant" for p in scores]
        content = json.dumps({"cells": [{"cell": i, "response": lab} for i, lab in enumerate(labels, 1)]})
        return httpx.Response(200, json={"model": body["model"], "message": {"role": "assistant", "content": content},
                                         "done": True, "done_reason": "stop", "prompt_eval_count": n_prompt,
                                         "eval_count": len(content.split()),
                                         "logprobs": _logprobs(content, scores, int(body.get("top_logprobs") or 0))})


def backend(fake: FakeOllama, num_ctx: int, max_tokens: int = 200) -> OllamaBackend:
    return OllamaBackend("llama3.1:8b", num_ctx=num_ctx, max_tokens=max_tokens, transport=httpx.MockTransport(fake))


def test_a_prompt_that_fits_is_answered_with_its_context_asked_for(marker_store, marker) -> None:
    fake = FakeOllama(marker, honours_truncate=True)
    summary = prompt(marker_store, ["marker"], backend=backend(fake, num_ctx=8192), **OPTIONS)
    assert summary.n_unanswered == 0 and summary.n_tasks == 2
    assert summary.results.query("metric == 'auroc'")["value"].notna().all()  # P(sensitive) from Ollama's logprobs
    body = fake.bodies[0]
    assert body["options"]["num_ctx"] == 8192 and body["truncate"] is False and body["shift"] is False
    assert body["format"] == "json" and body["stream"] is False and body["options"]["num_predict"] == 200


@pytest.mark.parametrize("honours_truncate", [True, False])
def test_a_prompt_longer_than_the_context_is_refused_not_scored(marker_store, marker, honours_truncate: bool) -> None:
    # each 8-cell request takes ~250 tokens: with num_ctx 300 and room for a 200-token answer none fits. Through
    # Ollama's /v1 route (the only way before) the answers to the cut prompts were scored like the others
    fake = FakeOllama(marker, honours_truncate=honours_truncate)
    with pytest.raises(PromptRequestError, match="--num-ctx") as err:
        prompt(marker_store, ["marker"], backend=backend(fake, num_ctx=300), **OPTIONS)
    assert "--cells-per-request" in str(err.value)
    assert marker_store.query("SELECT count(*) AS n FROM eval_results")["n"].iloc[0] == 0


def test_the_backend_by_name_and_ollama_through_v1_warned_of(caplog) -> None:
    from scdm.prompt.evaluate import make_backend

    with caplog.at_level("WARNING"):
        make_backend("openai", model="llama3.1:8b", base_url="http://localhost:11434/v1").close()
    assert "--backend ollama refuses such prompts" in caplog.text

    made = make_backend("ollama", model="llama3.1:8b", base_url="http://localhost:11434/v1", num_ctx=16384)
    assert made.endpoint == "http://localhost:11434" and made.decoding()["num_ctx"] == 16384
    with pytest.raises(Exception, match="--num-ctx is for --backend ollama"):
        make_backend("openai", model="m", base_url="http://localhost:8000/v1", num_ctx=4096)


def test_an_ollama_answer_stopped_at_max_tokens_counts_as_cut_short() -> None:
    record = PromptRecord(request_id="r", backend="ollama", model="m", checkpoint_hash=None, endpoint=None,
                          template_hash="t", decoding={}, messages=[], n_cells=2, status="answered",
                          answer_text='{"cells": [{"cell": 1, "response": "sensitive"}', response={"done_reason": "length"},
                          prompt_tokens=10, completion_tokens=5, attempts=1, seconds=0.1,
                          answers=(PromptAnswer(1, "ok", 1, None), PromptAnswer(2, "missing", None, None)))
    assert cut_short(record)
