"""The DuckDB catalog: connections with lock retry, migrations, and the read-only SQL gate.

DuckDB lets one process write a database file at a time, and a process that has the file open
read-write also blocks readers in other processes. So scdm never keeps a connection open: every
operation connects, runs one short transaction and closes, retrying while another process holds
the lock. Within one process a re-entrant lock serialises catalog access between threads.
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
from importlib import resources
from pathlib import Path
from typing import Any, Iterator, Sequence

import duckdb
import pandas as pd

from store._constants import LOCK_RETRY_SECONDS
from store.errors import QueryError, ReadOnlyQueryError, StoreFormatError, StoreLockedError

__all__ = ["Catalog", "SCHEMA_VERSION"]

logger = logging.getLogger(__name__)

_PROCESS_LOCK = threading.RLock()
_LOCK_MARKERS = ("could not set lock", "conflicting lock", "lock on file", "database is locked")
_READ_STATEMENTS = {"SELECT", "EXPLAIN"}


def _migrations() -> list[tuple[int, str, str]]:
    """(version, name, sql) of every migration file shipped with the package, in order."""
    folder = resources.files("store").joinpath("_migrations")
    found = []
    for entry in folder.iterdir():
        stem = entry.name.removesuffix(".sql")
        if entry.name.endswith(".sql") and stem[:4].isdigit():
            found.append((int(stem[:4]), stem[5:], entry.read_text()))
    return sorted(found)


_MIGRATIONS = _migrations()  # read once, so one process never sees two schema versions
SCHEMA_VERSION: int = _MIGRATIONS[-1][0]
"""Newest catalog schema this scdm can read and write."""


def _is_lock_error(err: Exception) -> bool:
    text = str(err).lower()
    return any(m in text for m in _LOCK_MARKERS)


class Catalog:
    """Short-lived DuckDB connections to ``path``, with retry on lock conflicts."""

    def __init__(self, path: Path, *, retry_seconds: float = LOCK_RETRY_SECONDS) -> None:
        self.path = Path(path)
        self.retry_seconds = retry_seconds

    # ---- connections ------------------------------------------------------------------------
    @contextlib.contextmanager
    def connect(self, *, read_only: bool = False, config: dict[str, Any] | None = None) -> Iterator[duckdb.DuckDBPyConnection]:
        """A connection that is closed on exit; waits while another process holds the file lock."""
        deadline = time.monotonic() + self.retry_seconds
        delay = 0.005
        with _PROCESS_LOCK:
            while True:
                try:
                    con = duckdb.connect(str(self.path), read_only=read_only, config=config or {})
                    break
                except (duckdb.IOException, duckdb.ConnectionException) as err:
                    if not _is_lock_error(err) or time.monotonic() > deadline:
                        if _is_lock_error(err):
                            msg = (
                                f"The catalog {str(self.path)!r} stayed locked by another process for "
                                f"{self.retry_seconds:.0f} s. Another scdm process (or a duckdb client) "
                                "holds it open; close it and retry."
                            )
                            raise StoreLockedError(msg) from err
                        raise
                    time.sleep(delay * (1 + random.random()))
                    delay = min(delay * 2, 0.25)
            try:
                yield con
            finally:
                con.close()

    def query(self, sql: str, params: Sequence[Any] | None = None) -> pd.DataFrame:
        """Run one read query and return its rows as a DataFrame."""
        with self.connect() as con:
            return con.execute(sql, params or []).df()

    def execute(self, sql: str, params: Sequence[Any] | None = None) -> None:
        """Run one write statement in its own transaction."""
        with self.connect() as con:
            con.execute(sql, params or [])

    def transaction(self) -> contextlib.AbstractContextManager[duckdb.DuckDBPyConnection]:
        """A connection inside ``BEGIN``/``COMMIT`` (rolled back on error)."""
        return self._transaction()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        with self.connect() as con:
            con.execute("BEGIN TRANSACTION")
            try:
                yield con
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")

    def insert_df(self, table: str, frame: pd.DataFrame, con: duckdb.DuckDBPyConnection | None = None) -> None:
        """Insert a DataFrame's rows into ``table``, matching columns by name."""
        if frame.empty:
            return
        cols = ", ".join(f'"{c}"' for c in frame.columns)
        sql = f'INSERT INTO "{table}" ({cols}) SELECT {cols} FROM _scdm_frame'
        if con is not None:
            con.register("_scdm_frame", frame)
            try:
                con.execute(sql)
            finally:
                con.unregister("_scdm_frame")
            return
        with self.transaction() as tx:
            self.insert_df(table, frame, tx)

    # ---- schema -----------------------------------------------------------------------------
    def migrate(self, scdm_version: str) -> None:
        """Create the catalog or bring it to :data:`SCHEMA_VERSION`; refuse a newer one."""
        with self.transaction() as con:
            con.execute(
                "CREATE TABLE IF NOT EXISTS migrations (version INTEGER PRIMARY KEY, name VARCHAR, "
                "applied_at TIMESTAMP, scdm_version VARCHAR)"
            )
            done = {r[0] for r in con.execute("SELECT version FROM migrations").fetchall()}
            newest = max(done, default=0)
            if newest > SCHEMA_VERSION:
                writer = con.execute(
                    "SELECT scdm_version FROM migrations WHERE version = ?", [newest]
                ).fetchone()
                msg = (
                    f"The catalog {str(self.path)!r} has schema version {newest}, written by scdm "
                    f"{writer[0] if writer else '?'}; this scdm ({scdm_version}) reads up to version "
                    f"{SCHEMA_VERSION}. Upgrade scdm (pip install -U scdm) to open this store."
                )
                raise StoreFormatError(msg)
            for version, name, sql in _MIGRATIONS:
                if version in done:
                    continue
                logger.debug("catalog %s: applying migration %04d_%s", self.path, version, name)
                con.execute(sql)
                con.execute(
                    "INSERT INTO migrations VALUES (?, ?, now(), ?)", [version, name, scdm_version]
                )
            con.execute(
                "INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", [str(SCHEMA_VERSION)]
            )

    # ---- user SQL ---------------------------------------------------------------------------
    def read_only_query(self, sql: str, *, max_rows: int | None = None, timeout_s: float | None = None) -> pd.DataFrame:
        """Run user SQL on a read-only connection with no file or network access.

        Only ``SELECT``/``EXPLAIN`` statements (``WITH ... SELECT`` included) are accepted; the
        connection itself is read-only and cannot reach files, so ``COPY ... TO``, ``ATTACH``,
        ``INSTALL`` and writes fail twice over.

        Raises
        ------
        ReadOnlyQueryError
            If a statement is not a read.
        """
        check_read_only(sql)
        config = {"enable_external_access": False, "lock_configuration": True}
        with self.connect(read_only=True, config=config) as con:
            try:
                if timeout_s is None:
                    return _fetch(con.execute(sql), max_rows)
                return _run_with_timeout(con, sql, max_rows, timeout_s)
            except duckdb.PermissionException as err:
                msg = f"The query tried to reach files or settings, which the read-only SQL interface does not allow: {err}"
                raise ReadOnlyQueryError(msg) from err
            except duckdb.Error as err:
                msg = f"The query failed: {err}"
                raise QueryError(msg) from err


def _fetch(result: duckdb.DuckDBPyConnection, max_rows: int | None) -> pd.DataFrame:
    if max_rows is None:
        return result.fetch_df()
    rows = result.fetchmany(max_rows)
    columns = [d[0] for d in result.description or []]
    return pd.DataFrame.from_records(rows, columns=columns)


def _run_with_timeout(con: duckdb.DuckDBPyConnection, sql: str, max_rows: int | None, timeout_s: float) -> pd.DataFrame:
    timer = threading.Timer(timeout_s, con.interrupt)
    timer.start()
    try:
        return _fetch(con.execute(sql), max_rows)
    except duckdb.InterruptException as err:
        msg = f"The query ran longer than {timeout_s:g} s and was stopped; add a LIMIT or a WHERE clause."
        raise ReadOnlyQueryError(msg) from err
    finally:
        timer.cancel()


def check_read_only(sql: str) -> None:
    """Raise :class:`ReadOnlyQueryError` unless every statement in ``sql`` only reads."""
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as err:
        msg = f"Could not parse the query: {err}"
        raise ReadOnlyQueryError(msg) from err
    if not statements:
        msg = "The query is empty; give a SELECT statement, e.g. scdm sql \"SELECT * FROM datasets\"."
        raise ReadOnlyQueryError(msg)
    for st in statements:
        kind = st.type.name
        if kind not in _READ_STATEMENTS:
            msg = (
                f"Only read queries are allowed here (SELECT, WITH ... SELECT, EXPLAIN); got a {kind} "
                "statement. The catalog is changed only through scdm commands."
            )
            raise ReadOnlyQueryError(msg)
