"""Zero-shot requests are composed from the cells alone: a task's numbers never depend on the other splits asked.

A language model answers a cell in the context of its batch-mates. Until 2026-12-07 zero-shot cells
were put into requests in the order of the first fold of the run's splits that tested them, so the
same task (same id) got accuracy [0.5, 0.5] with ``--scenario cross`` and [0.625, 0.5625] with
``--scenario pooled,cross``, and a second run with more splits asked every cell again.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pandas as pd

import scdm.prompt.evaluate as evaluate
from scdm.classify.results import leaderboard
from scdm.prompt import prompt
from scdm.prompt.backends import Backend, Reply
from scdm.prompt.plan import load_cells, plan_requests
from scdm.prompt.templates import load_template
from scdm.store import Store
from scdm.store.prompts import ANSWER_PARSER_VERSION
from scdm.store.splits import make_splits
from tests.prompt.conftest import marker_adata

_CELL_LINE = re.compile(r"^Cell \d+: (.*)$", re.MULTILINE)


class BatchMates(Backend):
    """Context-dependent like a real model: a cell is 'sensitive' when its gene line sorts before the next
    cell's line in the same request (the last cell compares with the first)."""

    kind, model = "test", "batch-mates"

    def __init__(self) -> None:
        self.sent = 0

    def decoding(self) -> dict[str, Any]:
        return {}

    def send(self, messages: list[dict[str, Any]], n_cells: int) -> Reply:
        self.sent += 1
        lines = _CELL_LINE.findall(messages[-1]["content"])
        labels = ["sensitive" if line < lines[(i + 1) % len(lines)] else "resistant" for i, line in enumerate(lines)]
        return Reply(text=json.dumps({"cells": [{"cell": i, "response": y} for i, y in enumerate(labels, 1)]}), raw={})


def _store(path: Path, symbols: list[str], names: tuple[str, ...] = ("marker",)) -> Store:
    st = Store(path)
    for seed, name in enumerate(names):
        st.ingest(marker_adata(symbols, seed=seed), name=name, label_key="response", study_key="study",
                  sample_key="patient", tissue="lung", cancer_type="NSCLC", drug="Erlotinib", drug_type="targeted",
                  regimen="mono")
    return st


def _run(st: Store, backend: Backend, scenarios: list[str], datasets: tuple[str, ...] = ("marker",), folds: int = 2) -> Any:
    return prompt(st, list(datasets), backend=backend, scenarios=scenarios, by=["all"], folds=folds, silent=True)


def _scores(st: Store) -> pd.DataFrame:
    """Every task's metrics by task id."""
    return st.query("SELECT task_id, metric, value FROM eval_results ORDER BY task_id, metric").reset_index(drop=True)


def test_a_tasks_numbers_do_not_depend_on_the_other_splits_asked(tmp_path, symbols) -> None:
    alone, together = _store(tmp_path / "alone", symbols), _store(tmp_path / "together", symbols)
    _run(alone, BatchMates(), ["cross"])
    _run(together, BatchMates(), ["pooled", "cross"])
    cross = _scores(alone)
    assert len(set(cross["task_id"])) == 2
    both = _scores(together)
    pd.testing.assert_frame_equal(both[both["task_id"].isin(cross["task_id"])].reset_index(drop=True), cross)
    # the same requests, whatever was asked with them
    sent = [set(st.query("SELECT request_id FROM prompt_requests")["request_id"]) for st in (alone, together)]
    assert sent[0] == sent[1]


def test_each_cell_is_asked_once_whatever_splits_a_later_run_asks(tmp_path, symbols) -> None:
    st = _store(tmp_path / "store", symbols)
    first = _run(st, BatchMates(), ["cross"])
    more = BatchMates()
    second = _run(st, more, ["pooled", "cross"], folds=4)
    assert first.n_sent == 8 and more.sent == 0 and (second.n_cached, second.n_sent) == (8, 0)
    assert (second.n_reused, second.n_tasks) == (2, 4)  # cross reused, pooled scored from the same answers
    fresh = _store(tmp_path / "fresh", symbols)
    _run(fresh, BatchMates(), ["pooled"], folds=4)
    pooled = _scores(fresh)
    mine = _scores(st)
    pd.testing.assert_frame_equal(mine[mine["task_id"].isin(pooled["task_id"])].reset_index(drop=True), pooled)


def test_requests_follow_datasets_and_sources_only(tmp_path, symbols) -> None:
    st = _store(tmp_path / "store", symbols, names=("marker", "other"))
    one = _run(st, BatchMates(), ["cross"])
    # the same study (source) in a second dataset: its cells get requests of their own, and the first
    # dataset's requests are those it had alone
    both = _run(st, BatchMates(), ["cross"], datasets=("marker", "other"))
    assert (one.n_sent, both.n_cached, both.n_sent) == (8, 8, 8)
    table = load_cells(st, sorted(st.query("SELECT dataset_id FROM datasets")["dataset_id"]), label_set=None, top_k=10)
    for scenarios, folds in ((["pooled"], 2), (["cross"], 2), (["pooled", "cross"], 4)):
        splits = make_splits(table.frame, scenarios=scenarios, by=["all"], n_folds=folds)
        plan = plan_requests(splits, table, template=load_template(), backend=BatchMates(), top_k=10,
                             cells_per_request=10, shots=0, seed=0)
        assert {r.request_id for r in plan.requests} == set(st.query("SELECT request_id FROM prompt_requests")["request_id"])
        for request in plan.requests:
            assert len({(d, table.source((d, r))) for d, r in request.cells}) == 1


def test_k_shot_requests_of_a_fold_do_not_depend_on_the_other_splits_asked(marker_store) -> None:
    table = load_cells(marker_store, [marker_store.dataset("marker").dataset_id], label_set=None, top_k=10)

    def requests(scenarios: list[str]) -> dict[tuple[str, int], set[str]]:
        splits = make_splits(table.frame, scenarios=scenarios, by=["all"], n_folds=2)
        plan = plan_requests(splits, table, template=load_template(), backend=BatchMates(), top_k=10,
                             cells_per_request=10, shots=2, seed=0)
        out: dict[tuple[str, int], set[str]] = {}
        for unit, cells in plan.where.items():
            assert unit is not None
            out[unit] = {rid for rid, _ in cells.values()}
        return out

    cross, both = requests(["cross"]), requests(["pooled", "cross"])
    assert cross and all(both[unit] == ids for unit, ids in cross.items())


def test_zero_shot_tasks_of_the_older_batching_are_left_out_then_replaced(marker_store, monkeypatch, caplog) -> None:
    st = marker_store
    with monkeypatch.context() as m:  # the older scdm: its task ids, without a batching version
        m.setattr(evaluate, "ZERO_SHOT_BATCHING", 1)
        m.setattr(evaluate, "forget_older_prompt_tasks", lambda *a, **k: 0)
        _run(st, BatchMates(), ["cross"])
    with st.catalog.transaction() as con:
        for table in ("eval_tasks", "eval_results"):
            con.execute(f"UPDATE {table} SET head_params = '{{\"answer_parser\": {ANSWER_PARSER_VERSION}, \"seed\": 0, \"shots\": 0}}'")
    with caplog.at_level("WARNING"):
        assert leaderboard(st).empty
    assert "2 zero-shot prompting tasks were scored from requests that an older scdm composed" in caplog.text
    assert "answer parser" not in caplog.text
    again = _run(st, BatchMates(), ["cross"])
    assert (again.n_reused, again.n_tasks) == (0, 2)  # not reused as if current, but replaced
    assert st.query("SELECT count(*) AS n FROM eval_tasks")["n"][0] == 2
    params = st.query("SELECT DISTINCT CAST(head_params AS VARCHAR) AS p FROM eval_tasks")["p"]
    assert [json.loads(p) for p in params] == [{"answer_parser": ANSWER_PARSER_VERSION, "batching": 2, "seed": 0, "shots": 0}]
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert not leaderboard(st).empty
    assert "older scdm" not in caplog.text
