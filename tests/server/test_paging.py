"""Paging of /api/results, /api/predictions and /api/leaderboard (``limit``, ``offset``, ``X-Total-Count``).

What is guaranteed: every page and its X-Total-Count come from one read of the catalog (one SQL
statement), the order is total (ties broken by the table's key), so the pages of one state of the
store are a partition of its rows in that order; a write between two page requests shows as a
changed X-Total-Count. Before, /api/results and /api/predictions had no X-Total-Count (a client
could not tell a short last page from the end), and /api/results sorted results that differ only by
their split, space or head parameters as ties (two evaluations of one model and head with other
seeds), which DuckDB may cut into pages in any order.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from scdm.store import Store

from .conftest import build_store


@pytest.fixture(scope="module")
def paged(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Store, dict[str, str]]]:
    from fastapi.testclient import TestClient

    from scdm.classify.grid import evaluate
    from scdm.classify.trained_heads import predict
    from scdm.server import create_app

    root = tmp_path_factory.mktemp("paging") / "store"
    info = build_store(root)
    st = Store(root)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # the same model, head, scenario, category and folds with another seed: rows that tie on every column
        # the route used to sort by
        evaluate(st, scenarios=["pooled"], by=["all"], heads=["ridge"], folds=3, seed=7, silent=True)
        predict(st, info["head_id"], "a375")
    with TestClient(create_app(st), base_url="http://127.0.0.1:8000") as client:
        yield client, st, info


def _walk(client: Any, path: str, limit: int, key: tuple[str, ...]) -> tuple[list[tuple[Any, ...]], set[int]]:
    rows: list[tuple[Any, ...]] = []
    totals: set[int] = set()
    offset = 0
    while True:
        answer = client.get(f"{path}&limit={limit}&offset={offset}")
        assert answer.status_code == 200, answer.text
        totals.add(int(answer.headers["X-Total-Count"]))
        page = answer.json()
        if not page:
            return rows, totals
        assert len(page) <= limit
        rows += [tuple(r[k] for k in key) for r in page]
        offset += limit


@pytest.mark.parametrize("limit", [1, 2, 5])
def test_result_pages_partition_the_results_in_one_total_order(paged: tuple[Any, Store, dict[str, str]], limit: int) -> None:
    client, st, _ = paged
    path = "/api/results?metric=auroc&category_type=all&head=ridge"
    key = ("task_id", "metric")
    full = [tuple(r[k] for k in key) for r in client.get(path).json()]
    stored = st.query("SELECT count(*) AS n FROM eval_results WHERE metric = 'auroc' AND category_type = 'all' "
                     "AND head = 'ridge'")["n"][0]
    assert len(full) == stored == 6  # two seeds x 3 folds, tying on model, head, scenario, category, metric and fold
    rows, totals = _walk(client, path, limit, key)
    assert rows == full and len(set(rows)) == len(rows) and totals == {len(full)}


def test_prediction_pages_carry_the_total(paged: tuple[Any, Store, dict[str, str]]) -> None:
    client, _, info = paged
    path = f"/api/predictions?head_id={info['head_id']}&dataset=a375"
    rows, totals = _walk(client, path, 40, ("row",))
    assert rows == [(i,) for i in range(108)] and totals == {108}


def test_a_page_past_the_end_is_empty_and_says_how_many_there_are(paged: tuple[Any, Store, dict[str, str]]) -> None:
    client, _, info = paged
    for path in ("/api/results?metric=auroc&category_type=all", f"/api/predictions?head_id={info['head_id']}",
                 "/api/leaderboard?metric=auroc"):
        answer = client.get(f"{path}&offset=1000")
        assert answer.status_code == 200 and answer.json() == [] and int(answer.headers["X-Total-Count"]) > 0, path
    answer = client.get("/api/results?model=nosuchmodel")
    assert answer.json() == [] and answer.headers["X-Total-Count"] == "0"


def test_a_write_between_pages_shows_in_the_total(paged: tuple[Any, Store, dict[str, str]], tmp_path: Path) -> None:
    """The documented way to notice that later pages may have shifted: the total changed."""
    from scdm.classify.grid import evaluate

    client, st, _ = paged
    path = "/api/results?metric=auroc&category_type=all&limit=2"
    first = client.get(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        evaluate(st, scenarios=["pooled"], by=["all"], heads=["logreg"], folds=3, silent=True)
    second = client.get(path + "&offset=2")
    assert int(second.headers["X-Total-Count"]) == int(first.headers["X-Total-Count"]) + 3
