"""A store written by an older scdm holds answers its parser read: they are read again, never shown as read then.

Until 2026-12-07 the parser read an answer numbering its cells from 0 onto the prompt's numbering
(each cell got its neighbour's answer), 'Cell 1: 0.7' as the label 0, and more. A store prompted
then holds those readings and the scores made from them; an upgraded scdm must not reuse them.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

import scdm.prompt.evaluate as evaluate
import scdm.prompt.runner as runner
from scdm.classify.results import leaderboard
from scdm.prompt import prompt
from scdm.prompt.answers import ParsedAnswer, parse_answer
from scdm.prompt.backends import Backend, Reply
from scdm.store import Store
from scdm.store.prompts import PromptAnswer


class ZeroBased(Backend):
    """Numbers its cells from 0 (its cell 0 is the prompt's cell 1) and says sensitive for every even one."""

    kind, model = "test", "zero-based"

    def decoding(self) -> dict[str, Any]:
        return {}

    def send(self, messages: list[dict[str, Any]], n_cells: int) -> Reply:
        body = {"cells": [{"cell": i, "response": "sensitive" if i % 2 == 0 else "resistant"} for i in range(n_cells)]}
        return Reply(text=json.dumps(body), raw={})


def old_parse(text: str | None, n_cells: int) -> ParsedAnswer:
    """The version-1 reading of ZeroBased's answers: cell i read as the prompt's cell i (shifted by one)."""
    labels = {c["cell"]: 1 if c["response"] == "sensitive" else 0 for c in json.loads(text or "")["cells"]}
    answers = tuple(PromptAnswer(i, "ok", labels[i]) if i in labels else PromptAnswer(i, "missing")
                    for i in range(1, n_cells + 1))
    return ParsedAnswer("answered", answers, ())


def run(st: Store) -> Any:
    return prompt(st, ["marker"], backend=ZeroBased(), scenarios=["pooled"], by=["all"], folds=2, cells_per_request=4,
                  silent=True)


def test_answers_of_an_older_parser_are_read_again_and_their_scores_not_shown(marker_store: Store, monkeypatch,
                                                                               caplog) -> None:
    st = marker_store
    with monkeypatch.context() as m:  # the older scdm: its parser, and its tasks without a parser version
        m.setattr(runner, "parse_answer", old_parse)
        m.setattr(evaluate, "ANSWER_PARSER_VERSION", 1, raising=False)  # other task ids, as the older scdm's
        m.setattr(evaluate, "forget_older_prompt_tasks", lambda *a, **k: 0, raising=False)
        first = run(st)
    assert first.n_tasks == 2 and first.n_sent == 16
    # requests composed as this scdm composes them (test_zero_shot_batching.py): the parser alone is older
    with st.catalog.transaction() as con:
        for table in ("eval_tasks", "eval_results"):
            con.execute(f"UPDATE {table} SET head_params = '{{\"batching\": 2, \"seed\": 0, \"shots\": 0}}'")
    assert (st.query("SELECT status FROM prompt_answers")["status"] != "invalid").all()

    # upgraded: the misread scores are not on the leaderboard, and the warning says how to rescore
    with caplog.at_level("WARNING"):
        assert leaderboard(st).empty
    assert "2 prompting tasks were scored from answers read by an older scdm's answer parser" in caplog.text

    # the rerun sends nothing, reads the stored texts again (a cell 0: no answer is readable) and
    # replaces the old tasks instead of reusing them
    again = run(st)
    assert (again.n_sent, again.n_cached, again.n_reused, again.n_tasks, again.n_skipped) == (0, 16, 0, 0, 2)
    assert set(st.query("SELECT status FROM prompt_answers")["status"]) == {"invalid"}
    assert st.query("SELECT count(*) AS n FROM eval_tasks")["n"][0] == 0
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert leaderboard(st).empty
    assert "older scdm" not in caplog.text


def test_answers_read_alike_keep_their_scores() -> None:
    text = json.dumps({"cells": [{"cell": 1, "response": "sensitive"}, {"cell": 2, "response": "resistant"}]})
    parsed = parse_answer(text, 2)
    record = runner.PromptRecord(
        request_id="r", backend="test", model="m", checkpoint_hash=None, endpoint=None, template_hash="t", decoding={},
        messages=[], n_cells=2, status=parsed.status, answer_text=text, response={}, prompt_tokens=None,
        completion_tokens=None, attempts=1, seconds=None,
        answers=(PromptAnswer(1, "ok", 1, 0.9), PromptAnswer(2, "ok", 0, 0.2)))
    assert runner.read_again(record) is record


@pytest.mark.parametrize("decisions", [[{"cell": 1, "p_sensitive": 0.8}, {"cell": 2, "p_sensitive": 0.3}]])
def test_a_changed_reading_takes_the_local_models_scores_from_the_stored_response(decisions) -> None:
    text = "Cell 1: 0.7\nCell 2: resistant"  # version 1 read cell 1 as resistant
    record = runner.PromptRecord(
        request_id="r", backend="hf", model="m", checkpoint_hash=None, endpoint=None, template_hash="t", decoding={},
        messages=[], n_cells=2, status="answered", answer_text=text, response={"decisions": decisions},
        prompt_tokens=None, completion_tokens=None, attempts=1, seconds=None,
        answers=(PromptAnswer(1, "ok", 0, 0.8), PromptAnswer(2, "ok", 0, 0.3)))
    now = runner.read_again(record)
    assert [(a.status, a.label, a.p_sensitive) for a in now.answers] == [("missing", None, None), ("ok", 0, 0.3)]
