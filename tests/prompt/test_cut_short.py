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


class EveryOtherRefused(TokenLimited):
    """Refuses every second request it is sent; answers the others in full."""

    model = "every-other-refused"

    def __init__(self) -> None:
        super().__init__(10_000)
        self.sent = 0

    def send(self, messages: list[dict[str, Any]], n_cells: int) -> Reply:
        self.sent += 1
        return Reply(text="I cannot help with that.", raw={}) if self.sent % 2 == 0 else super().send(messages, n_cells)


def test_unreadable_answers_are_counted_per_ask_not_per_cell(marker_store) -> None:
    # few-shot asks a test cell once per (split, fold) that tests it; the summary counted one ask per
    # cell (the last unit's), so 64 unreadable answers of 128 read "32 of 64 cells"
    summary = prompt(marker_store, ["marker"], backend=EveryOtherRefused(), scenarios=["pooled", "cross"], by=["all"],
                     folds=2, shots=2, cells_per_request=8, silent=True)
    records = summary.n_sent + summary.n_cached
    assert summary.n_cells == 64 and summary.n_asks == 8 * records == 128
    refused = records // 2
    assert summary.n_unanswered == 8 * refused == 64
