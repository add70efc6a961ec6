"""The read-connection pool: reads in one process share one open connection, and it gives way to writers.

Every wait has a timeout, so a pool that never lets go of the file fails instead of hanging.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import duckdb
import pytest

from scdm.store import _catalog
from scdm.store._catalog import Catalog
from scdm.store.errors import CatalogDamagedError, ReadOnlyQueryError

ROOT = Path(__file__).resolve().parents[2]
WAIT_S = 20.0


@pytest.fixture()
def cat(tmp_path: Path) -> Iterator[Catalog]:
    catalog = Catalog(tmp_path / "catalog.duckdb", retry_seconds=30)
    catalog.execute("CREATE TABLE t (i INTEGER PRIMARY KEY)")
    yield catalog
    catalog._pool.close()


@pytest.fixture()
def connects(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """read_only flag of every duckdb.connect call made from now on."""
    calls: list[bool] = []
    real = duckdb.connect

    def counting(*args: Any, **kwargs: Any) -> duckdb.DuckDBPyConnection:
        calls.append(bool(kwargs.get("read_only", False)))
        return real(*args, **kwargs)

    monkeypatch.setattr(_catalog.duckdb, "connect", counting)
    return calls


def wait_for(ready: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not ready():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.005)


def count(cat: Catalog) -> int:
    return int(cat.query("SELECT count(*) AS n FROM t")["n"].iloc[0])


def test_many_reads_open_one_connection(cat: Catalog, connects: list[bool]) -> None:
    for _ in range(50):
        assert count(cat) == 0
    assert cat.read_only_query("SELECT 1 AS one")["one"].tolist() == [1]  # user SQL shares it too
    errors: list[BaseException] = []

    def reads() -> None:
        try:
            for _ in range(20):
                count(cat)
        except BaseException as err:  # noqa: BLE001 - asserted below
            errors.append(err)

    threads = [threading.Thread(target=reads) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT_S)
    assert errors == []
    assert connects == [True]  # 131 reads, one connection


def test_a_write_here_is_seen_by_the_next_read(cat: Catalog, connects: list[bool]) -> None:
    assert count(cat) == 0
    cat.execute("INSERT INTO t VALUES (1)")  # closes the pooled connection first (DuckDB needs that)
    assert count(cat) == 1
    # the write attached the file to the process's write host (open since the fixture's write): no connect
    assert connects == [True, True]


def test_reads_with_other_settings_take_the_file_in_turn(cat: Catalog) -> None:
    assert count(cat) == 0
    with cat.connect(read_only=True, config={"enable_external_access": False}) as con:
        assert con.execute("SELECT count(*) FROM t").fetchone() == (0,)
    assert count(cat) == 0


WRITER = """
import sys
sys.path.insert(0, {root!r})
from scdm.store._catalog import Catalog
Catalog(sys.argv[1], retry_seconds=20).execute("INSERT INTO t VALUES (42)")
"""


def test_a_write_from_another_process_is_seen_by_the_next_read(cat: Catalog, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_catalog, "_POOL_IDLE_S", 60.0)  # only the writer's flag can make the pool let go
    assert count(cat) == 0
    assert cat._pool._con is not None  # the pooled connection holds the file's shared lock
    code = textwrap.dedent(WRITER.format(root=str(ROOT / "src")))
    started = time.monotonic()
    writer = subprocess.run([sys.executable, "-c", code, str(cat.path)], capture_output=True, text=True, timeout=WAIT_S * 2)
    assert writer.returncode == 0, writer.stderr
    assert time.monotonic() - started < 15  # it got the file long before its retry budget ran out
    assert count(cat) == 1
    assert cat.query("SELECT i FROM t")["i"].tolist() == [42]


def test_an_idle_pool_lets_go_of_the_file(cat: Catalog, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_catalog, "_POOL_IDLE_S", 0.05)
    assert count(cat) == 0
    wait_for(lambda: cat._pool._con is None, "the idle pooled connection closed")
    con = duckdb.connect(str(cat.path))  # a plain DuckDB client raises no flag: it only needs the file free
    con.execute("INSERT INTO t VALUES (5)")
    con.close()
    assert count(cat) == 1


def test_a_replaced_catalog_file_is_reopened(cat: Catalog, tmp_path: Path) -> None:
    other = Catalog(tmp_path / "other.duckdb")
    other.execute("CREATE TABLE t (i INTEGER PRIMARY KEY)")
    other.execute("INSERT INTO t VALUES (1), (2)")
    assert count(cat) == 0  # pooled connection open on the old file
    assert cat._pool._con is not None
    staged = tmp_path / "staged.duckdb"
    shutil.copyfile(other.path, staged)
    staged.replace(cat.path)  # a restore from backup: a new file under the old name
    assert count(cat) == 2


def test_a_forked_child_reads_and_writes_the_catalog_its_parent_pooled(tmp_path: Path) -> None:
    # DataLoader workers and multiprocessing's fork start inherit the parent's memory: an open pooled
    # database would sit in the child's DuckDB instance cache and refuse a connection with other settings
    code = textwrap.dedent(f"""
        import multiprocessing as mp
        from scdm.store import Store

        def child(root):
            st = Store(root)                      # opens the catalog to write (migrate check)
            return len(st.query("SELECT * FROM datasets"))

        if __name__ == "__main__":
            st = Store({str(tmp_path / "st")!r})
            st.query("SELECT * FROM datasets")    # the parent's read pool is open now
            with mp.get_context("fork").Pool(1) as pool:
                assert pool.apply(child, ({str(tmp_path / "st")!r},)) == 0
            assert len(st.query("SELECT * FROM datasets")) == 0
    """)
    script = tmp_path / "fork_child.py"
    script.write_text(code)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


# ---- the write host: writes attach the file to one in-memory DuckDB instance per process ----
def attached(cat: Catalog) -> list[str]:
    """Database files attached to the process's write host right now."""
    host = _catalog._WRITE_HOST._con
    if host is None:
        return []
    rows = host.cursor().execute("SELECT path FROM duckdb_databases() WHERE path IS NOT NULL").fetchall()
    return [str(r[0]) for r in rows]


def test_a_write_lets_go_of_the_file_when_it_ends(cat: Catalog) -> None:
    cat.execute("INSERT INTO t VALUES (1)")
    assert attached(cat) == []
    assert _catalog._WRITE_HOST._of == {}
    con = duckdb.connect(str(cat.path))  # no lock left behind: a plain client can write the file at once
    con.execute("INSERT INTO t VALUES (2)")
    con.close()
    assert count(cat) == 2


def test_nested_writes_share_one_attachment_and_the_outer_one_detaches(cat: Catalog) -> None:
    cat.execute("CREATE TABLE u (i INTEGER)")
    with cat.transaction() as con:
        con.execute("INSERT INTO t VALUES (1)")
        assert attached(cat) == [cat._file]
        cat.execute("INSERT INTO u VALUES (7)")  # a connection of its own, committed on its own
        assert _catalog._WRITE_HOST._of[cat._file][1] == 1  # the inner one came back; the outer holds the file
        assert attached(cat) == [cat._file]
    assert attached(cat) == []
    assert count(cat) == 1
    assert cat.query("SELECT i FROM u")["i"].tolist() == [7]


def test_a_failed_write_rolls_back_and_lets_go_of_the_file(cat: Catalog) -> None:
    with pytest.raises(duckdb.ConstraintException), cat.transaction() as con:
        con.execute("INSERT INTO t VALUES (1)")
        con.execute("INSERT INTO t VALUES (1)")  # the primary key refuses it: the whole transaction goes
    assert attached(cat) == []
    assert count(cat) == 0
    cat.execute("INSERT INTO t VALUES (3)")
    assert count(cat) == 1


def test_two_threads_write_two_catalogs_at_once(tmp_path: Path) -> None:
    cats = [Catalog(tmp_path / f"c{i}.duckdb", retry_seconds=30) for i in range(2)]
    for c in cats:
        c.execute("CREATE TABLE t (i INTEGER PRIMARY KEY)")
    errors: list[BaseException] = []

    def writes(c: Catalog) -> None:
        try:
            for i in range(40):
                with c.transaction() as con:
                    con.execute("INSERT INTO t VALUES (?)", [i])
        except BaseException as err:  # noqa: BLE001 - asserted below
            errors.append(err)

    threads = [threading.Thread(target=writes, args=(c,)) for c in cats]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT_S)
    assert errors == []
    assert [count(c) for c in cats] == [40, 40]
    assert _catalog._WRITE_HOST._of == {}
    for c in cats:
        c._pool.close()


def test_a_damaged_catalog_does_not_break_writes_to_another(tmp_path: Path) -> None:
    good, bad = Catalog(tmp_path / "good.duckdb"), Catalog(tmp_path / "bad.duckdb")
    for c in (good, bad):
        c.execute("CREATE TABLE t (i INTEGER PRIMARY KEY)")
    bad.path.write_bytes(b"not a database" * 4096)
    with pytest.raises(CatalogDamagedError):
        bad.execute("INSERT INTO t VALUES (1)")
    assert _catalog._WRITE_HOST._of == {}
    good.execute("INSERT INTO t VALUES (1)")
    assert count(good) == 1
    good._pool.close()


def test_write_connections_take_no_settings(cat: Catalog) -> None:
    with pytest.raises(ValueError, match="read-only"), cat.connect(config={"threads": 1}):
        pass


@pytest.mark.parametrize("query", [
    "SELECT setseed(0.5)", "SELECT main.setseed /* the seed */ (0.5)", 'SELECT "SetSeed"(0.5)', "SELECT (0.5).setseed()",
    "SELECT setseed(0.5); SELECT random()", "EXPLAIN ANALYZE SELECT setseed(0.5)",
    "SELECT * FROM query('SELECT setseed(0.5)')",  # SQL as text: the check cannot read it
    "SELECT * FROM json_execute_serialized_sql(json_serialize_sql('SELECT setseed(0.5)'))",
    "SELECT write_log('x')", "SELECT * FROM truncate_duckdb_logs()", "SELECT * FROM checkpoint()",
    "SELECT * FROM enable_logging()",
])
def test_a_read_query_may_not_change_the_connections_state(cat: Catalog, query: str) -> None:
    # setseed() was answered on a cursor of the pooled read connection, whose instance every read of the process shares
    with pytest.raises(ReadOnlyQueryError, match=r"is not allowed in a read query: it "):
        cat.read_only_query(query)


def test_a_function_name_that_is_no_call_still_reads(cat: Catalog) -> None:
    query = "SELECT 'setseed(0.5)' AS text, 1 AS setseed /* query( */, count(*) AS n FROM t USING SAMPLE 50% (bernoulli, 42)"
    assert cat.read_only_query(query).columns.tolist() == ["text", "setseed", "n"]


def test_every_side_effecting_function_is_refused_or_known_harmless() -> None:
    """A DuckDB upgrade that brings a new function with side effects fails here until it is judged."""
    harmless = {  # they draw a value or read state; they change none a later read sees
        "random", "uuid", "uuidv4", "uuidv7", "gen_random_uuid", "current_query", "current_query_id",
        "current_transaction_id", "current_connection_id", "currval", "error", "sleep_ms", "stats", "vector_type",
    }
    con = duckdb.connect()
    side_effects = {name for (name,) in con.execute(
        "SELECT DISTINCT function_name FROM duckdb_functions() WHERE has_side_effects").fetchall()}
    assert "setseed" in side_effects  # the check below reads the flag DuckDB sets
    assert side_effects - harmless - set(_catalog._STATE_CHANGING_FUNCTIONS) == set()


def test_read_only_batches_hand_over_the_answer_in_parts(cat: Catalog) -> None:
    from scdm.store.errors import InputDataError, QueryTimeoutError

    cat.execute("INSERT INTO t (i) SELECT range FROM range(5)")
    parts = list(cat.read_only_batches("SELECT i FROM t ORDER BY i", batch_rows=2))
    assert [p["i"].tolist() for p in parts] == [[0, 1], [2, 3], [4]]
    (empty,) = cat.read_only_batches("SELECT i FROM t WHERE false", batch_rows=2)  # the columns, without rows
    assert empty.columns.tolist() == ["i"] and empty.empty
    with pytest.raises(InputDataError, match=r"row limit \(batch_rows\) must be a whole number >= 1; got 0"):
        cat.read_only_batches("SELECT 1", batch_rows=0)  # at once, not at the first part
    with pytest.raises(ReadOnlyQueryError):
        cat.read_only_batches("SELECT setseed(0.5)")
    parts = cat.read_only_batches("SELECT * FROM range(10)", batch_rows=2)
    assert len(next(parts)) == 2
    parts.close()  # the read connection is given back: a write here goes ahead
    cat.execute("INSERT INTO t (i) VALUES (5)")
    assert count(cat) == 6
    with pytest.raises(QueryTimeoutError, match="longer than 0.3 s"):
        list(cat.read_only_batches("SELECT count(*) FROM range(10000000000)", timeout_s=0.3))


def test_a_row_limited_answer_has_the_types_of_the_whole_answer(cat: Catalog) -> None:
    # pandas made an integer column holding a NULL float: 1.0 where the whole answer said 1
    query = ("SELECT * FROM (VALUES (1, 2::BIGINT, true, 1.5::DECIMAL(4, 2), 7::HUGEINT, [1, NULL]), "
             "(NULL, 3::BIGINT, NULL, NULL, NULL, NULL)) AS v(n, m, b, d, h, l)")
    whole, limited = cat.read_only_query(query), cat.read_only_query(query, max_rows=5)
    assert limited.dtypes.tolist() == whole.dtypes.tolist()
    assert limited.drop(columns="l").astype(object).where(limited.notna(), None).values.tolist() == [
        [1, 2, True, 1.5, 7], [None, 3, None, None, None]]
