"""Answers the endpoint stopped at the token limit are said to be so, with what to change."""

from __future__ import annotations

import json
from typing import Any

from scdm.prompt import prompt
from scdm.prompt.backends import Backend, Reply


class TokenLimited(Backend):
    """Answers in JSON, stopped after ``room`` characters as an endpoint stops at max_tokens."""

    kind, model = "test", "token-limited"

    def __init__(self, room: int) -> None:
        self.room = room

    def decoding(self) -> dict[str, Any]:
        return {"max_tokens": self.room}

    def send(self, messages: list[dict[str, Any]], n_cells: int) -> Reply:
        text = json.dumps({"cells": [{"cell": i, "response": "resistant"} for i in range(1, n_cells + 1)]})
        cut = text[:self.room]
        body = {"choices": [{"index": 0, "message": {"role": "assistant", "content": cut},
                             "finish_reason": "length" if cut != text else "stop"}]}
        return Reply(text=cut, raw=body)


def test_answers_cut_at_the_token_limit_are_reported(marker_store, caplog) -> None:
    # 8 requests of 8 cells, each JSON answer cut before its end: every cell unanswered, every fold
    # skipped ("no test cell got a readable answer"), and nothing said that --max-tokens was the cause
    options = {"scenarios": ["pooled"], "by": ["all"], "folds": 2, "cells_per_request": 8, "silent": True}
    with caplog.at_level("WARNING"):
        summary = prompt(marker_store, ["marker"], backend=TokenLimited(200), **options)
    assert summary.n_unanswered == 64 and summary.n_skipped == 2
    assert "8 of 8 answers stopped at the token limit (--max-tokens 200)" in caplog.text
    assert "leaving 64 cells of them without a readable answer" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):  # room for every answer: nothing to say
        summary = prompt(marker_store, ["marker"], backend=TokenLimited(10_000), **options)
    assert summary.n_unanswered == 0 and "token limit" not in caplog.text
