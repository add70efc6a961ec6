"""Concurrent catalog access: readers overlap, writers interleave with them, processes share the file.

Overlap is asserted with barriers and timestamps taken while connections are open, never with wall
time, so the tests hold on a loaded 2-core machine; every wait has a timeout, so a regression to
serialised access fails (broken barrier, timeout) instead of hanging.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from scdm.store import Store
from scdm.store._catalog import Catalog

ROOT = Path(__file__).resolve().parents[2]
SLOW_SUM = "SELECT sum(i % 7) AS s FROM range(?) t(i)"
SLOW_ROWS = 5_000_000
"""About 50 ms of DuckDB work on one core of the test machine."""
WAIT_S = 20.0


@pytest.fixture()
def cat(tmp_path: Path) -> Catalog:
    catalog = Catalog(tmp_path / "catalog.duckdb", retry_seconds=30)
    catalog.execute("CREATE TABLE t (i INTEGER PRIMARY KEY, pair INTEGER)")
    return catalog


def run_threads(target: Callable[[int], None], n: int) -> list[BaseException]:
    """Run ``target(k)`` for k in range(n) in threads; return what they raised."""
    errors: list[BaseException] = []

    def guarded(k: int) -> None:
        try:
            target(k)
        except BaseException as err:  # noqa: BLE001 - collected and asserted by the test
            errors.append(err)

    threads = [threading.Thread(target=guarded, args=(k,), daemon=True) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT_S * 2)
    assert not any(t.is_alive() for t in threads), "a thread is still waiting for the catalog"
    return errors


def spawn(script: str, *args: str) -> subprocess.Popen[str]:
    code = f"import sys; sys.path.insert(0, {str(ROOT)!r})\n" + textwrap.dedent(script)
    return subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(ready: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not ready():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.005)


# ---- readers overlap -----------------------------------------------------------------------
def test_read_connections_are_open_at_the_same_time(cat: Catalog) -> None:
    n = 8
    barrier = threading.Barrier(n, timeout=WAIT_S)
    spans: list[tuple[float, float]] = [(0.0, 0.0)] * n

    def read(k: int) -> None:
        with cat.connect(read_only=True) as con:
            opened = time.perf_counter()
            barrier.wait()  # passes only once all n threads hold an open connection
            con.execute(SLOW_SUM, [SLOW_ROWS]).fetchone()
            spans[k] = (opened, time.perf_counter())

    assert run_threads(read, n) == []
    assert max(o for o, _ in spans) < min(c for _, c in spans), "every connection was opened before any closed"


def test_queries_run_while_another_thread_holds_a_read(cat: Catalog) -> None:
    cat.execute("INSERT INTO t SELECT range, 0 FROM range(5)")
    held, release = threading.Event(), threading.Event()
    span: dict[str, float] = {}

    def hold() -> None:
        with cat.connect(read_only=True):
            span["opened"] = time.perf_counter()
            held.set()
            release.wait(WAIT_S)
            span["closed"] = time.perf_counter()

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    assert held.wait(WAIT_S)
    ends: list[float] = []
    counts: list[int] = []

    def query(k: int) -> None:
        assert int(cat.query(SLOW_SUM, [SLOW_ROWS])["s"].iloc[0]) == 21 * (SLOW_ROWS // 7) + sum(range(SLOW_ROWS % 7))
        counts.append(int(cat.query("SELECT count(*) AS n FROM t")["n"].iloc[0]))
        ends.append(time.perf_counter())

    errors = run_threads(query, 4)
    release.set()
    holder.join(WAIT_S)
    assert errors == []
    assert counts == [5] * 4
    assert max(ends) < span["closed"], "the queries finished while the other read was still open"


def test_query_reads_on_the_sandboxed_read_only_connection(cat: Catalog) -> None:
    setting = "SELECT current_setting('enable_external_access') AS on"
    assert not bool(cat.query(setting)["on"].iloc[0])  # plain reads: read-only, no file access
    with cat.connect() as con:
        assert con.execute(setting).fetchone()[0]  # writers keep the default settings
    inserted = cat.query("INSERT INTO t VALUES (1, 1) RETURNING i")  # a write through query still works
    assert inserted["i"].tolist() == [1]
    assert cat.query("SELECT i FROM t")["i"].tolist() == [1]


def test_store_reads_do_not_block_each_other(tmp_path: Path) -> None:
    st = Store(tmp_path / "store")
    n = 4
    barrier = threading.Barrier(n + 1, timeout=WAIT_S)
    names: list[list[str]] = []

    def hold(k: int) -> None:
        if k == n:  # one thread keeps a read open until every Store.query has answered
            with st.catalog.connect(read_only=True):
                barrier.wait()
                barrier.wait()
            return
        barrier.wait()
        names.append(st.query("SELECT name FROM datasets")["name"].tolist())
        barrier.wait()

    assert run_threads(hold, n + 1) == []
    assert names == [[]] * n


# ---- a writer thread and reader threads ----------------------------------------------------
def test_writer_and_readers_interleave_without_lost_rows(cat: Catalog) -> None:
    n_tx = 30
    seen: dict[int, list[int]] = {}
    writing = threading.Event()
    writing.set()

    def write(_: int) -> None:
        try:
            for k in range(n_tx):
                with cat.transaction() as con:  # two rows per transaction: readers must never see one alone
                    con.execute("INSERT INTO t VALUES (?, ?), (?, ?)", [2 * k, k, 2 * k + 1, k])
                if k % 10 == 9:  # go on only once a reader has seen this far: readers get in between writes
                    rows = 2 * (k + 1)
                    wait_for(lambda rows=rows: any(c and c[-1] >= rows for c in seen.values()), f"a reader saw {rows} rows")
        finally:
            writing.clear()

    def read(k: int) -> None:
        seen[k] = []
        while writing.is_set():
            frame = cat.query("SELECT count(*) AS n, count(DISTINCT pair) AS pairs FROM t")
            n, pairs = int(frame["n"].iloc[0]), int(frame["pairs"].iloc[0])
            assert n == 2 * pairs, f"a reader saw {n} rows of {pairs} transactions: half a transaction"
            seen[k].append(n)

    errors = run_threads(lambda k: write(k) if k == 0 else read(k), 4)
    assert errors == []
    assert cat.query("SELECT i FROM t ORDER BY i")["i"].tolist() == list(range(2 * n_tx))
    for counts in seen.values():
        assert counts == sorted(counts), "a reader's counts went backwards"
    assert any(0 < c < 2 * n_tx for counts in seen.values() for c in counts), "reads happened between writes"


# ---- nesting -------------------------------------------------------------------------------
def test_nested_use_in_one_thread(cat: Catalog) -> None:
    with cat.transaction() as con:
        con.execute("INSERT INTO t VALUES (1, 0)")
        cat.execute("INSERT INTO t VALUES (2, 0)")  # its own short transaction, committed at once
        assert cat.query("SELECT i FROM t")["i"].tolist() == [2]  # the outer insert is not committed yet
        with cat.transaction() as inner:
            inner.execute("INSERT INTO t VALUES (3, 0)")
    assert cat.query("SELECT i FROM t ORDER BY i")["i"].tolist() == [1, 2, 3]
    with cat.connect(read_only=True) as outer:
        assert cat.query("SELECT count(*) AS n FROM t")["n"].iloc[0] == 3
        with cat.connect(read_only=True) as inner:
            assert inner.execute("SELECT count(*) FROM t").fetchone()[0] == outer.execute("SELECT count(*) FROM t").fetchone()[0]


def test_nested_read_is_not_held_up_by_a_queued_writer(cat: Catalog) -> None:
    done = threading.Event()
    with cat.connect(read_only=True):
        writer = threading.Thread(target=lambda: (cat.execute("INSERT INTO t VALUES (7, 0)"), done.set()), daemon=True)
        writer.start()
        wait_for(lambda: len(cat._gate._queue) == 1, "the writer queued behind this read")
        assert cat.query("SELECT count(*) AS n FROM t")["n"].iloc[0] == 0  # nested: no wait for the writer
        assert not done.is_set()
    assert done.wait(WAIT_S)
    writer.join(WAIT_S)
    assert cat.query("SELECT i FROM t")["i"].tolist() == [7]


def test_nesting_that_would_wait_for_itself_raises(cat: Catalog) -> None:
    with cat.connect(read_only=True), pytest.raises(RuntimeError, match="close the read connection first"):
        cat.execute("INSERT INTO t VALUES (1, 0)")
    with cat.transaction(), pytest.raises(RuntimeError, match="inside this thread's own write transaction"), \
            cat.connect(read_only=True):
        pass
    cat.execute("INSERT INTO t VALUES (1, 0)")  # the gate is free again
    assert cat.query("SELECT count(*) AS n FROM t")["n"].iloc[0] == 1


# ---- two processes -------------------------------------------------------------------------
READER = """
from scdm.store._catalog import Catalog
cat, target, seen = Catalog(sys.argv[1], retry_seconds=30), int(sys.argv[2]), []
print("ready", flush=True)
while not seen or seen[-1] < target:
    seen.append(int(cat.query("SELECT count(*) AS n FROM t")["n"].iloc[0]))
print(" ".join(map(str, seen)), flush=True)
"""


def test_reader_process_reads_while_this_process_writes(cat: Catalog) -> None:
    n_rows = 20
    reader = spawn(READER, str(cat.path), str(n_rows))
    assert reader.stdout is not None and reader.stdout.readline().strip() == "ready"
    for i in range(n_rows):  # short transactions, as scdm writers make them
        cat.execute("INSERT INTO t VALUES (?, ?)", [i, i])
    out, err = reader.communicate(timeout=WAIT_S * 3)
    assert reader.returncode == 0, err
    counts = [int(c) for c in out.split()]
    assert counts == sorted(counts) and counts[-1] == n_rows


WRITER = """
from scdm.store._catalog import Catalog
cat, n = Catalog(sys.argv[1], retry_seconds=float(sys.argv[3])), int(sys.argv[2])
print("ready", flush=True)
for i in range(n):
    cat.execute("INSERT INTO t VALUES (?, ?)", [1000 + i, i])
"""


def test_overlapping_readers_here_let_a_writer_process_in(cat: Catalog) -> None:
    """Readers that hand over to each other keep the file open, and its shared lock held, without a
    gap; the writer's flag makes them pause so that each of its short transactions gets in before
    its retry budget runs out."""
    n_tx, budget_s = 3, 10.0
    writer = spawn(WRITER, str(cat.path), str(n_tx), str(budget_s))
    assert writer.stdout is not None and writer.stdout.readline().strip() == "ready"
    reads: list[int] = []
    handover = threading.Condition()
    n_open = [0]
    deadline = time.monotonic() + budget_s * 2

    def read(_: int) -> None:
        while (not reads or reads[-1] < n_tx) and time.monotonic() < deadline:
            with cat.connect(read_only=True) as con:
                with handover:
                    n_open[0] += 1
                    handover.notify_all()
                reads.append(con.execute("SELECT count(*) FROM t").fetchone()[0])
                with handover:  # close only once the other reader is open, or after 0.1 s
                    handover.wait_for(lambda: n_open[0] >= 2, timeout=0.1)
                    n_open[0] -= 1

    errors = run_threads(read, 2)
    _, err = writer.communicate(timeout=WAIT_S)
    assert writer.returncode == 0, err
    assert errors == []
    assert cat.query("SELECT count(*) AS n FROM t")["n"].iloc[0] == n_tx
    assert reads and reads == sorted(reads)
