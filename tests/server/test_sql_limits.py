"""The SQL console (``scdm sql``, ``POST /api/sql``): reads only, within its time and memory limits."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

from scdm.store import ReadOnlyQueryError, Store, _catalog
from scdm.store.errors import QueryError


def _peak_rss_mb() -> int:
    status = Path(f"/proc/{os.getpid()}/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) // 1024


@pytest.fixture()
def st(tmp_path: Path) -> Store:
    return Store(tmp_path / "store")


@pytest.mark.parametrize("statement", [
    "EXPLAIN ANALYZE CREATE TEMP VIEW datasets AS SELECT 'not the catalog' AS name",  # runs the CREATE
    "EXPLAIN ANALYZE CREATE TEMP TABLE big AS SELECT * FROM range(10)",
    "EXPLAIN ANALYZE SET search_path = 'temp'",
    "EXPLAIN ANALYZE PRAGMA threads = 1",
    "EXPLAIN ANALYZE LOAD parquet",
    "EXPLAIN ANALYZE CHECKPOINT",
    "EXPLAIN (ANALYZE) CREATE TEMP MACRO m() AS 1",
    "/* a comment */ EXPLAIN /* another */ ANALYZE CREATE TEMP VIEW v AS SELECT 1",
])
def test_explain_runs_no_statement_but_a_read(st: Store, statement: str) -> None:
    with pytest.raises(ReadOnlyQueryError, match="Only read queries"):
        st.sql(statement)


def test_explain_of_a_read_still_answers(st: Store) -> None:
    for statement in ("EXPLAIN SELECT name FROM datasets", "EXPLAIN ANALYZE SELECT count(*) FROM cells",
                      "EXPLAIN (FORMAT json) WITH d AS (SELECT * FROM datasets) SELECT * FROM d", "EXPLAIN FROM cells"):
        assert len(st.sql(statement)) >= 1, statement


def test_a_query_past_the_memory_limit_stops_with_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a fresh catalog file: its reads open DuckDB with these settings (the pool holds one instance per file)
    small = {**_catalog.READ_CONFIG, "memory_limit": "64MB", "max_temp_directory_size": "64MB"}
    monkeypatch.setattr(_catalog, "READ_CONFIG", small)
    monkeypatch.setattr(_catalog, "_DEFAULT_READ_KEY", _catalog._config_key(small))
    st = Store(tmp_path / "small")
    assert st.sql("SELECT current_setting('memory_limit') AS m")["m"].item() in ("61.0 MiB", "64.0 MiB", "64.0 MB")
    before = _peak_rss_mb()
    with pytest.raises(QueryError, match="more than the 64MB of memory"):
        st.sql("SELECT length(list(range)) AS n FROM range(50000000)", timeout_s=20)  # a 400 MB list
    assert _peak_rss_mb() - before < 200
    with pytest.raises(ReadOnlyQueryError):  # and no setting lifts it
        st.sql("SET memory_limit = '10GB'")
    assert st.sql("SELECT count(*) AS n FROM datasets")["n"].item() == 0  # later reads are unharmed


def test_an_answer_past_the_memory_limit_is_refused_not_held(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # DuckDB does not count a streamed answer once it is Python values: 100 rows of 1 MB each were answered
    # whole under a 64MB limit (the SQL console's row limit is 1000 rows, not bytes)
    from fastapi.testclient import TestClient

    from scdm.server import create_app

    small = {**_catalog.READ_CONFIG, "memory_limit": "64MB", "max_temp_directory_size": "64MB"}
    monkeypatch.setattr(_catalog, "READ_CONFIG", small)
    monkeypatch.setattr(_catalog, "_DEFAULT_READ_KEY", _catalog._config_key(small))
    st = Store(tmp_path / "small")
    with pytest.raises(QueryError, match="answer needed more than the 64MB of memory"):
        st.sql("SELECT repeat('x', 1000000) AS s FROM range(100)", max_rows=1000)
    with TestClient(create_app(st), base_url="http://127.0.0.1:8000") as api:
        answer: Any = api.post("/api/sql", json={"query": "SELECT repeat('x', 1000000) AS s FROM range(100)"})
        assert answer.status_code == 400 and "answer needed more than the 64MB" in answer.json()["error"]
        # an answer within the limit is whole, and so is a long one of small values
        assert len(api.post("/api/sql", json={"query": "SELECT repeat('x', 1000000) AS s FROM range(20)"}).json()["rows"]) == 20
    assert len(st.sql("SELECT * FROM range(100000000)", max_rows=5000)) == 5000


def test_a_long_query_is_stopped_at_the_servers_time_limit(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from scdm.server import create_app

    with TestClient(create_app(Store(tmp_path / "store"), sql_timeout_s=0.5), base_url="http://127.0.0.1:8000") as api:
        for query in ("SELECT count(*) FROM range(10000000000)",
                      "SELECT count(*) FROM range(100000) a, range(100000) b WHERE a.range + b.range = -1"):
            t0 = time.monotonic()
            answer: Any = api.post("/api/sql", json={"query": query})
            assert answer.status_code == 400 and "longer than 0.5 s" in answer.json()["error"], query
            assert time.monotonic() - t0 < 5.0, query
        answer = api.post("/api/sql", json={"query": "EXPLAIN ANALYZE CREATE TEMP VIEW datasets AS SELECT 1 AS x"})
        assert answer.status_code == 403
        assert api.post("/api/sql", json={"query": "SELECT count(*) AS n FROM datasets"}).json()["rows"] == [{"n": 0}]


def test_catalog_reads_have_a_memory_limit_not_duckdbs_80_percent_of_the_machine(st: Store) -> None:
    import duckdb

    with duckdb.connect(config={"memory_limit": _catalog.READ_MEMORY_LIMIT}) as reference:
        expected = reference.execute("SELECT current_setting('memory_limit')").fetchone()
    assert expected is not None
    shown = st.sql("SELECT current_setting('memory_limit') AS m, current_setting('max_temp_directory_size') AS t")
    assert shown["m"].item() == shown["t"].item() == expected[0]


def test_the_time_limit_error_says_the_limit_and_how_to_raise_it(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from scdm.server import create_app

    with TestClient(create_app(Store(tmp_path / "store"), sql_timeout_s=0.3), base_url="http://127.0.0.1:8000") as api:
        answer: Any = api.post("/api/sql", json={"query": "SELECT levenshtein(repeat('a', 200000), repeat('b', 200000))"})
        assert answer.status_code == 400
        error = answer.json()["error"]
        assert "longer than 0.3 s" in error and "after 0.3 s" in error
        assert "scdm serve --sql-timeout SECONDS" in error and "$SCDM_SQL_TIMEOUT" in error and "scdm sql" in error
        assert api.post("/api/sql", json={"query": "SELECT 42 AS x"}).json()["rows"] == [{"x": 42}]


def test_scdm_serve_reads_its_sql_time_limit_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    import scdm.server
    from scdm.cli import main

    seen: dict[str, Any] = {}
    monkeypatch.setattr(scdm.server, "serve", lambda *args, **kwargs: seen.update(kwargs))
    result = CliRunner().invoke(main, ["--store", str(tmp_path / "store"), "serve"], env={"SCDM_SQL_TIMEOUT": "42.5"})
    assert result.exit_code == 0, result.output
    assert seen["sql_timeout_s"] == 42.5


def test_the_console_refuses_setseed_which_would_change_the_read_connection(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from scdm.server import create_app

    with TestClient(create_app(Store(tmp_path / "store")), base_url="http://127.0.0.1:8000") as api:
        for query in ("SELECT setseed(0.5)", "SELECT * FROM query('SELECT setseed(0.5)')"):
            answer: Any = api.post("/api/sql", json={"query": query})
            assert answer.status_code == 403 and "is not allowed in a read query" in answer.json()["error"], query
        assert "USING SAMPLE 10% (bernoulli, 42)" in api.post("/api/sql", json={"query": "SELECT setseed(0.5)"}).json()["error"]
        assert api.post("/api/sql", json={"query": "SELECT count(*) AS n FROM datasets"}).json()["rows"] == [{"n": 0}]


def test_the_console_answers_an_integer_column_with_a_null_as_integers(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from scdm.server import create_app

    with TestClient(create_app(Store(tmp_path / "store")), base_url="http://127.0.0.1:8000") as api:
        answer: Any = api.post("/api/sql", json={"query": "SELECT * FROM (VALUES (1), (NULL)) AS t(n)"}).json()
    assert answer["rows"] == [{"n": 1}, {"n": None}]  # was 1.0: pandas made the column float
    assert isinstance(answer["rows"][0]["n"], int)
