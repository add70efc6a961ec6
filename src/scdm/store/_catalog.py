"""The DuckDB catalog: connections with lock retry, migrations, and the read-only SQL gate.

DuckDB lets one process write a database file at a time, and a process that has the file open
read-write also blocks readers in other processes. So scdm never keeps a read-write connection
open: every write attaches the file, runs one short transaction and detaches it, retrying while
another process holds the lock (reads share one pooled connection that gives way to writers, see
below). Writes attach the file to one in-memory DuckDB instance that the process keeps
(:class:`_WriteHost`): opening an instance costs ~10 ms whatever the file, attaching ~1.5 ms.

Inside one process DuckDB shares one database instance per file and configuration, and refuses
to open a file with a second configuration (read-only and read-write count as two) while any
connection to it is open. A :class:`_Gate` per catalog file therefore admits, at any time, either
any number of read-only connections with one configuration or one thread's read-write connections
(that thread may nest them). Waiting for another process's lock happens outside the gate, so one
thread's back-off never holds up the others.

Readers that overlap keep the file's shared lock held for as long as any of them is open, which
would starve a writer in another process that polls for the lock. A writer that finds the file
locked raises a flag, an advisory lock on ``<catalog>.turnstile`` that the operating system drops
when the process dies; readers in every scdm process start no new connection while it is raised,
so the file drains and the writer gets in within one read's time.

Opening a file is the expensive part of a connection (DuckDB reads its header and catalog: 10-100
ms), so a :class:`_ReadPool` per catalog file keeps one read-only connection open while reads come
and hands each read a cursor of it (well under 1 ms). It lets go of the file, so that a writer can
take it, whenever that writer shows up: a write in this process closes it once the gate has admitted
the write (no read is open then); a writer in another process raises its flag, which the next read,
or the pool's watcher within :data:`_POOL_POLL_S`, sees. It also lets go after :data:`_POOL_IDLE_S`
without reads (a DuckDB client that raises no flag waits at most that long) and reopens the file when
it was replaced on disk. So a read never sees a state older than the last commit of any process: no
commit can happen while the pooled connection is open.

A catalog opened read-only (a store the user may read but not write) never opens a read-write
connection: writes raise :class:`~store.errors.StoreReadOnlyError` before touching the file, and
migrations are refused (the schema is only checked). A catalog file that DuckDB cannot read
(truncated, overwritten, corrupted) raises :class:`~store.errors.CatalogDamagedError` naming the
file and what to do, instead of DuckDB's own error.
"""

from __future__ import annotations

import abc
import atexit
import collections
import contextlib
import ctypes
import functools
import hashlib
import itertools
import logging
import math
import numbers
import os
import random
import re
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd

from scdm.store._constants import LOCK_RETRY_SECONDS
from scdm.store.errors import (
    CatalogDamagedError,
    InputDataError,
    QueryError,
    QueryTimeoutError,
    ReadOnlyQueryError,
    ScdmError,
    StoreFormatError,
    StoreLockedError,
    StoreReadOnlyError,
)

try:  # advisory file locks for the writer flag; without them (Windows) writers rely on retry alone
    import fcntl
except ImportError:  # pragma: no cover - exercised on Windows only
    fcntl = None  # type: ignore[assignment]

__all__ = ["READ_CONFIG", "SCHEMA_VERSION", "Catalog"]

logger = logging.getLogger(__name__)

_LOCK_MARKERS = ("could not set lock", "conflicting lock", "lock on file", "database is locked")
_DAMAGE_MARKERS = (
    "not a valid duckdb database file", "could not read enough bytes", "corrupt database file",
    "does not match stored checksum", "database has been invalidated", "failed to read database header",
)
"""DuckDB error texts that mean the catalog file itself is damaged (not a lock, not a bad query)."""
_READ_STATEMENTS = {"SELECT", "EXPLAIN"}

READ_MEMORY_LIMIT: str = os.environ.get("SCDM_CATALOG_READ_MEMORY", "4GB")
"""Memory (and as much again of spill files beside the catalog) that this process's catalog reads may use
together: DuckDB's default is 80% of the machine, which one user query (``scdm sql``, the server's
SQL console) could take from the server. Catalog reads are metadata and results; the embeddings are
read from Zarr, outside it. ``$SCDM_CATALOG_READ_MEMORY`` (DuckDB units: ``512MB``, ``8GB``) sets it."""

READ_CONFIG: dict[str, Any] = {"enable_external_access": False, "lock_configuration": True,
                               "memory_limit": READ_MEMORY_LIMIT, "max_temp_directory_size": READ_MEMORY_LIMIT}
"""DuckDB settings of every read-only catalog connection.

One configuration for internal reads and user SQL alike, so that they share one database instance
and run side by side (DuckDB refuses a second configuration of an open file). It is the user SQL
sandbox: no file or network access, a memory limit, and ``SET`` cannot lift them.
"""

_LOCK_BACKOFF_S = (0.005, 0.1)
"""First and longest sleep while another process holds the file (a failed connect costs well under 1 ms)."""
_FLAG_BACKOFF_S = (0.001, 0.01)
"""First and longest sleep while a writer's flag is raised: it is lowered when that writer's transaction closes."""
_POOL_IDLE_S = 1.0
"""A pooled read connection unused this long is closed (the file's shared lock goes with it)."""
_POOL_POLL_S = 0.02
"""How often an open pooled connection looks for a raised writer flag while no read asks."""
_FLAG_PATIENCE_S = 5.0
"""How long a reader holds back for a raised flag; after that the writer is evidently waiting for
someone else (a long lock elsewhere), and the reader tries the file as if no flag were raised."""


def _migrations() -> list[tuple[int, str, str]]:
    """(version, name, sql) of every migration file shipped with the package, in order."""
    folder = resources.files("scdm.store").joinpath("_migrations")
    found = []
    for entry in folder.iterdir():
        stem = entry.name.removesuffix(".sql")
        if entry.name.endswith(".sql") and stem[:4].isdigit():
            found.append((int(stem[:4]), stem[5:], entry.read_text()))
    return sorted(found)


_MIGRATIONS = _migrations()  # read once, so one process never sees two schema versions
SCHEMA_VERSION: int = _MIGRATIONS[-1][0]
"""Newest catalog schema this scdm can read and write."""


def _migrated_memory_catalog() -> duckdb.DuckDBPyConnection:
    """An in-memory catalog with every shipped migration applied, with no file or network access."""
    con = duckdb.connect(config={"enable_external_access": False})
    for _, _, sql in _MIGRATIONS:
        con.execute(sql)
    return con


_VIEWS_SQL = ("SELECT schema_name || '.' || view_name, sql FROM duckdb_views() "
              "WHERE database_name = current_database() AND NOT internal ORDER BY ALL")


@functools.cache
def _expected_views() -> dict[str, str]:
    """``schema.view`` -> definition of every view the shipped migrations create, as this DuckDB writes it."""
    with contextlib.closing(_migrated_memory_catalog()) as con:
        return dict(con.execute(_VIEWS_SQL).fetchall())


def _or_replace(view_sql: str) -> str:
    """A ``CREATE VIEW`` statement as ``CREATE OR REPLACE VIEW`` (however it is worded)."""
    return re.sub(r"^\s*CREATE\s+(OR\s+REPLACE\s+)?VIEW", "CREATE OR REPLACE VIEW", view_sql, flags=re.I)


def _same_view(name: str, sql: str) -> bool:
    """Whether a catalog's definition of scdm's view ``name`` is the migrations' own.

    DuckDB writes a view's definition back from its parse tree, and versions word it differently;
    so a definition that differs in text is defined again in an in-memory catalog by this DuckDB and
    compared as it writes it (defining a view binds it but runs nothing).
    """
    expected = _expected_views()[name]
    if sql == expected:
        return True
    with contextlib.closing(_migrated_memory_catalog()) as con:
        try:
            con.execute(_or_replace(sql))
        except duckdb.Error:
            return False
        return dict(con.execute(_VIEWS_SQL).fetchall()).get(name) == expected


def _pending_migrations(done: dict[int, str]) -> list[tuple[int, str, str]]:
    """The shipped migrations a catalog that recorded ``done`` (version -> name) still needs, in order.

    A version is done only under its own name: 0011_one_fit_per_task was shipped as 0010 before
    0010_split_label_sets was put ahead of it, so a store that an scdm of that time opened has
    version 10 recorded and never got its splits renamed. From a version recorded under another
    name on, every migration runs (again): a later one may depend on it (11 removes the copies of one
    fit that 10's renaming makes alike), and 10 to 14 are written to run twice safely.
    """
    pending = []
    renumbered = False
    for version, name, sql in _MIGRATIONS:
        recorded = done.get(version)
        renumbered = renumbered or (recorded is not None and recorded != name)
        if renumbered or recorded != name:
            pending.append((version, name, sql))
    return pending


@contextlib.contextmanager
def registered(con: duckdb.DuckDBPyConnection, name: str, frame: pd.DataFrame) -> Iterator[None]:
    """``frame`` readable by SQL as ``name`` inside the block.

    When a statement of the block fails inside a transaction (a constraint, a Ctrl-C that DuckDB
    turns into an interrupted query), DuckDB refuses the unregister ("Current transaction is
    aborted"); that refusal must not replace the error or the KeyboardInterrupt that caused it
    (the rollback discards the view with the rest).
    """
    con.register(name, frame)
    try:
        yield
    except BaseException:
        with contextlib.suppress(Exception):
            con.unregister(name)
        raise
    con.unregister(name)


def _is_lock_error(err: Exception) -> bool:
    text = str(err).lower()
    return any(m in text for m in _LOCK_MARKERS)


def _is_damage(err: BaseException) -> bool:
    text = str(err).lower()
    return isinstance(err, duckdb.Error) and any(m in text for m in _DAMAGE_MARKERS)


@functools.lru_cache(maxsize=512)
def _only_reads(sql: str) -> bool:
    """Whether every statement of ``sql`` is a plain read (cached: the same queries recur)."""
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error:
        return False  # let the read-write path run it and report DuckDB's own error
    return bool(statements) and all(st.type.name in _READ_STATEMENTS for st in statements)


def _config_key(config: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((str(k), repr(v)) for k, v in config.items()))


_DEFAULT_READ_KEY = _config_key(READ_CONFIG)
"""Reads with these settings (every internal read and user SQL) share the pooled connection."""


# ---- in-process gate ------------------------------------------------------------------------
class _Ticket:
    """One thread's place in a gate's queue."""

    __slots__ = ("key", "writes")

    def __init__(self, writes: bool, key: tuple[tuple[str, str], ...] | None) -> None:
        self.writes, self.key = writes, key


class _Gate:
    """Who in this process may have connections to one catalog file open right now.

    Either readers (any number of threads, all with one DuckDB configuration) or one writer
    thread, never both. Threads that must wait queue in arrival order; the readers at the front
    of the queue enter together. So a writer waits only for the reads already open (new readers
    queue behind it), and readers waiting behind a writer enter together after it, before the
    next writer: neither side can starve the other. A thread may nest connections of the kind it
    holds (reads in a read, anything in a write) without queueing; a thread that holds a read and
    asks for a write, or for a read with other settings, would wait for itself, so that raises.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._queue: collections.deque[_Ticket] = collections.deque()
        self._read_key: tuple[tuple[str, str], ...] | None = None
        self._readers = 0
        self._reads_of: dict[int, int] = {}
        self._writer: int | None = None
        self._write_depth = 0

    def writing_here(self) -> bool:
        """Whether the calling thread holds the write side."""
        return self._writer == threading.get_ident()

    def reading_here(self) -> bool:
        """Whether the calling thread holds a read."""
        return self._reads_of.get(threading.get_ident(), 0) > 0

    def enter_read(self, key: tuple[tuple[str, str], ...], deadline: float, where: str) -> None:
        me = threading.get_ident()
        with self._cond:
            if self._writer == me:
                msg = (f"A read-only connection to {where} was asked for inside this thread's own write "
                       "transaction; run the read after the transaction, or on the transaction's connection.")
                raise RuntimeError(msg)
            if self._reads_of.get(me, 0):
                if key != self._read_key:
                    msg = (f"A read-only connection to {where} with other settings was asked for while this "
                           "thread holds one; close the first connection before opening the second.")
                    raise RuntimeError(msg)
            else:  # a nested read never queues: a writer in the queue is waiting for this very thread
                self._wait_turn(_Ticket(False, key), deadline, where)
            self._read_key = key
            self._readers += 1
            self._reads_of[me] = self._reads_of.get(me, 0) + 1

    def leave_read(self) -> None:
        me = threading.get_ident()
        with self._cond:
            self._reads_of[me] -= 1
            if not self._reads_of[me]:
                del self._reads_of[me]
            self._readers -= 1
            if not self._readers:
                self._read_key = None
                self._cond.notify_all()

    def enter_write(self, deadline: float, where: str) -> None:
        me = threading.get_ident()
        with self._cond:
            if self._reads_of.get(me, 0):
                msg = (f"A write to {where} was asked for while this thread holds a read-only connection to it; "
                       "close the read connection first (the write would wait for it forever).")
                raise RuntimeError(msg)
            if self._writer != me:
                self._wait_turn(_Ticket(True, None), deadline, where)
                self._writer = me
            self._write_depth += 1

    def leave_write(self) -> None:
        with self._cond:
            self._write_depth -= 1
            if not self._write_depth:
                self._writer = None
                self._cond.notify_all()

    def _may_enter(self, ticket: _Ticket) -> bool:
        if self._writer is not None:
            return False
        if ticket.writes:
            return self._readers == 0 and self._queue[0] is ticket
        if self._readers and self._read_key != ticket.key:
            return False
        for ahead in self._queue:  # only readers with the same settings may be ahead of a reader
            if ahead is ticket:
                return True
            if ahead.writes or ahead.key != ticket.key:
                return False
        return False

    def _wait_turn(self, ticket: _Ticket, deadline: float, where: str) -> None:
        self._queue.append(ticket)
        try:
            admitted = self._cond.wait_for(lambda: self._may_enter(ticket), timeout=max(0.0, deadline - time.monotonic()))
        finally:
            self._queue.remove(ticket)
            self._cond.notify_all()  # the ticket behind may be next
        if not admitted:
            msg = (f"The catalog {where} stayed busy in this process past the retry budget: other threads "
                   "held connections to it the whole time. Look for a long transaction in this process.")
            raise StoreLockedError(msg)


_GATES: dict[str, _Gate] = {}
_GATES_LOCK = threading.Lock()


def _gate_for(path: str) -> _Gate:
    """The one gate of a catalog file in this process (every Catalog of that file shares it)."""
    with _GATES_LOCK:
        return _GATES.setdefault(path, _Gate())


# ---- read-connection pool --------------------------------------------------------------------
def _file_state(path: str) -> tuple[int, int, int, int] | None:
    """What tells a replaced or rewritten file apart: device, inode, size, modification time."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


class _ProcessLocal(abc.ABC):
    """What one process holds open (DuckDB objects) under a lock: a forked child must neither use nor close it."""

    _lock: threading.Lock
    _pid: int

    @abc.abstractmethod
    def _idle(self) -> bool:
        """Something is open and nothing uses it (called under the lock)."""

    @abc.abstractmethod
    def _close_locked(self) -> None:
        """Close what is open (called under the lock)."""

    @abc.abstractmethod
    def _forget_after_fork(self) -> None:
        """In a forked child: drop the parent's objects without closing them."""

    def close_if_idle(self) -> None:
        """Close what is open when nothing uses it (without waiting for a lock another thread holds)."""
        if self._lock.acquire(blocking=False):
            try:
                if self._pid == os.getpid() and self._idle():
                    self._close_locked()
            finally:
                self._lock.release()

    def after_fork_in_child(self) -> None:
        """A forked child (a DataLoader worker, ...): a fresh lock, and the parent's objects left untouched."""
        self._lock = threading.Lock()  # another thread of the parent may have held it at the fork
        self._forget_after_fork()


class _ReadPool(_ProcessLocal):
    """One open read-only connection to a catalog file, shared by this process's reads as cursors.

    Every read borrows a cursor inside the gate's read side, so a write in this process finds no
    cursor out when the gate admits it and calls :meth:`close`. ``drain`` (a writer's flag seen)
    closes the connection now if no cursor is out, else when the last one comes back. A daemon
    watcher runs while the connection is open and closes it when the flag rises or after
    :data:`_POOL_IDLE_S` without reads. A forked child forgets its parent's connection.
    """

    def __init__(self, file: str, flag: _WriterFlag) -> None:
        self._file, self._flag = file, flag
        self._lock = threading.Lock()
        self._con: duckdb.DuckDBPyConnection | None = None
        self._key: tuple[tuple[str, str], ...] | None = None
        self._state: tuple[int, int, int, int] | None = None
        self._pid = os.getpid()
        self._out = 0
        self._closing = False
        self._generation = 0  # which open connection a watcher watches (it holds no DuckDB object)
        self._last_use = 0.0
        self.opened = 0
        """Connections this pool opened (what the pool saves: reads minus this)."""

    def cursor(self, settings: dict[str, Any], key: tuple[tuple[str, str], ...]) -> duckdb.DuckDBPyConnection:
        """A cursor of the pooled connection with ``settings`` (opened now if none is open)."""
        with self._lock:
            self._forget_after_fork()
            if self._con is not None and not self._out and (self._key != key or _file_state(self._file) != self._state):
                self._close_locked()  # other settings asked (the gate let no other reader in), or the file changed
            if self._con is None:
                state = _file_state(self._file)
                self._con = duckdb.connect(self._file, read_only=True, config=settings)
                self._key, self._state, self._closing = key, state, False
                self._last_use = time.monotonic()
                self.opened += 1
                self._generation += 1
                threading.Thread(target=self._watch, args=(self._generation,), name="scdm-catalog-pool",
                                 daemon=True).start()
            try:
                cur = self._con.cursor()
            except BaseException:
                if not self._out:  # a connection DuckDB invalidated (damaged file): the next read opens the file again
                    self._close_locked()
                raise
            self._out += 1
            return cur

    def give_back(self, cur: duckdb.DuckDBPyConnection) -> None:
        with self._lock:
            try:
                cur.close()
            finally:
                self._out -= 1
                self._last_use = time.monotonic()
                if not self._out and self._closing:
                    self._close_locked()

    def drain(self) -> None:
        """A writer waits for the file: close the connection as soon as no cursor is out."""
        with self._lock:
            if self._con is None:
                return
            if self._out:
                self._closing = True
            else:
                self._close_locked()

    def close(self) -> None:
        """Close the connection; the caller makes sure no cursor is out (it holds the gate's write side)."""
        with self._lock:
            self._forget_after_fork()
            if self._con is not None and not self._out:
                self._close_locked()

    def _close_locked(self) -> None:
        if self._con is not None:
            with contextlib.suppress(duckdb.Error):  # an invalidated connection may refuse even that
                self._con.close()
        # cleared after the close: whoever sees no connection (without the lock) finds the file free
        self._con, self._key, self._state, self._closing = None, None, None, False

    def _forget_after_fork(self) -> None:
        if self._pid != os.getpid():  # the parent's connection and cursors are not this process's
            _keep_forever(self._con)
            self._pid, self._con, self._out, self._closing = os.getpid(), None, 0, False

    def _idle(self) -> bool:
        return self._con is not None and not self._out

    def _watch(self, generation: int) -> None:
        # no reference to a DuckDB object lives in this frame: a daemon thread that drops one while
        # the interpreter shuts down would run DuckDB's destructor then, and abort the process
        while True:
            time.sleep(_POOL_POLL_S)
            raised = self._flag.is_raised()
            with self._lock:
                if _EXITING or self._con is None or self._generation != generation or self._pid != os.getpid():
                    return  # closed (or reopened: that connection has its own watcher)
                if self._out:
                    if raised:
                        self._closing = True
                    continue
                if raised or time.monotonic() - self._last_use > _POOL_IDLE_S or _file_state(self._file) != self._state:
                    self._close_locked()
                    return


_POOLS: dict[str, _ReadPool] = {}
_EXITING = False


def _keep_forever(con: duckdb.DuckDBPyConnection | None) -> None:
    """Never close or free a connection a forked child inherited: DuckDB's destructor would run on
    the parent's database in this process (its threads are not here) and crash it."""
    if con is not None:
        ctypes.pythonapi.Py_IncRef(ctypes.py_object(con))


# ---- write host -------------------------------------------------------------------------------
def _utc_instance() -> duckdb.DuckDBPyConnection:
    """An in-memory instance whose ``now()`` is stored in UTC, as the Python-side writers store their timestamps.

    DuckDB casts ``now()`` to a TIMESTAMP column in the machine's time zone: on a machine in Tokyo the
    datasets, label sets and embeddings said 21:50 beside the runs and splits (``pd.Timestamp.now(tz="UTC")``)
    that said 12:50 for the same minute, and two machines filling one store disagreed by their offsets.
    """
    con = duckdb.connect(":memory:")
    try:
        con.execute("SET GLOBAL TimeZone = 'UTC'")  # GLOBAL: the cursors each write opens inherit it
    except duckdb.Error:  # a DuckDB without the ICU extension has no time zones: its now() is UTC already
        logger.debug("DuckDB has no TimeZone setting; now() is UTC")
    return con


class _WriteHost(_ProcessLocal):
    """The process's in-memory DuckDB instance that a catalog file is attached to for each write.

    Opening a DuckDB database instance costs ~10 ms whatever the file, even ``:memory:`` (it
    builds the catalog of built-in functions); attaching a file to an instance already open costs
    ~1.5 ms and detaching it ~0.5 ms (a 3 MB catalog, DuckDB 2.0, 2-core VM). The file is locked
    from the ``ATTACH`` to the ``DETACH``, exactly as long as a read-write connection was open
    before, so other processes see the same locking. The gate lets one thread write a file at a
    time; that thread's nested connections share the attachment, and the outermost one detaches.
    An instance that cannot detach a file (DuckDB invalidated it: a damaged file) is retired and
    closed once nothing is attached to it; the next write opens a fresh one.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._con: duckdb.DuckDBPyConnection | None = None
        self._of: dict[str, tuple[duckdb.DuckDBPyConnection, int]] = {}  # file -> (instance, connections out)

    def connect(self, file: str) -> duckdb.DuckDBPyConnection:
        """A read-write connection to ``file`` (attached now unless this thread's outer connection holds it)."""
        with self._lock:
            self._forget_after_fork()
            host, out = self._of.get(file, (None, 0))
            if host is None:
                host = self._con = self._con if self._con is not None else _utc_instance()
                host.execute(f"ATTACH {_sql_text(file)} AS {_alias(file)} (TYPE duckdb)")
            self._of[file] = (host, out + 1)
            try:
                cur = host.cursor()
                cur.execute(f"USE {_alias(file)}")
            except BaseException:
                self._release_locked(file, None)
                raise
            return cur

    def release(self, file: str, cur: duckdb.DuckDBPyConnection) -> None:
        """Close a connection from :meth:`connect`; the last one out detaches the file (releasing its lock)."""
        with self._lock:
            self._release_locked(file, cur)

    def _release_locked(self, file: str, cur: duckdb.DuckDBPyConnection | None) -> None:
        host, out = self._of[file]
        try:
            if cur is not None:
                cur.close()
        finally:
            if out > 1:
                self._of[file] = (host, out - 1)
            else:
                del self._of[file]
                self._detach_locked(host, file)

    def _detach_locked(self, host: duckdb.DuckDBPyConnection, file: str) -> None:
        try:
            host.execute(f"DETACH {_alias(file)}")
        except duckdb.Error:
            logger.debug("catalog %s: DuckDB could not detach it; its in-memory instance is retired", file)
            if host is self._con:
                self._con = None  # the next write opens a fresh instance
        if host is not self._con and not any(h is host for h, _ in self._of.values()):
            with contextlib.suppress(duckdb.Error):  # a retired instance: closing it lets go of its files
                host.close()

    def _forget_after_fork(self) -> None:
        if self._pid != os.getpid():  # the parent's instance and attachments are not this process's
            _keep_forever(self._con)
            for host, _ in self._of.values():
                _keep_forever(host)
            self._pid, self._con, self._of = os.getpid(), None, {}

    def _idle(self) -> bool:
        return self._con is not None and not self._of

    def _close_locked(self) -> None:
        con, self._con = self._con, None
        if con is not None:
            with contextlib.suppress(duckdb.Error):
                con.close()


def _sql_text(text: str) -> str:
    """``text`` as an SQL string literal (ATTACH takes no parameters)."""
    return "'" + text.replace("'", "''") + "'"


def _alias(file: str) -> str:
    """The name a catalog file is attached under: one per file, a valid identifier whatever the path."""
    return '"scdm_catalog_' + hashlib.sha256(file.encode()).hexdigest()[:16] + '"'


_WRITE_HOST = _WriteHost()


def _before_fork() -> None:
    # a child inheriting an open database would find it in DuckDB's instance cache and could not open
    # the file with other settings: idle pooled connections are closed first (the next read reopens)
    for pool in list(_POOLS.values()):
        pool.close_if_idle()
    _WRITE_HOST.close_if_idle()


def _after_fork_in_child() -> None:
    global _GATES_LOCK
    _GATES_LOCK = threading.Lock()
    for pool in _POOLS.values():
        pool.after_fork_in_child()
    _WRITE_HOST.after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)


def _pool_for(path: str, flag: _WriterFlag) -> _ReadPool:
    """The one read pool of a catalog file in this process."""
    with _GATES_LOCK:
        return _POOLS.setdefault(path, _ReadPool(path, flag))


@atexit.register
def _close_pools() -> None:
    """Close idle pooled connections before the interpreter shuts down.

    Afterwards no watcher calls into DuckDB: a daemon thread stopped inside DuckDB's C++ code while
    the interpreter finalises aborts the process.
    """
    global _EXITING
    with _GATES_LOCK:
        pools = list(_POOLS.values())
    for pool in pools:
        with pool._lock:
            pool._closing = True
            if not pool._out:
                pool._close_locked()
    _WRITE_HOST.close_if_idle()
    _EXITING = True  # watchers stop without touching DuckDB


# ---- cross-process writer flag ---------------------------------------------------------------
class _WriterFlag:
    """"A writer is waiting for this catalog": an exclusive advisory lock on ``<catalog>.turnstile``.

    Readers only look (a non-blocking shared lock that fails while the flag is raised); the file
    is created on the first contended write and the lock vanishes with the process that held it.
    """

    def __init__(self, catalog: str) -> None:
        self.path = catalog + ".turnstile"

    def is_raised(self) -> bool:
        if fcntl is None:
            return False
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return False  # no flag file: no writer has waited yet
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return True
        finally:
            os.close(fd)  # also drops the shared lock just taken
        return False

    def try_raise(self) -> int | None:
        """The file descriptor that holds the raised flag, or None when it cannot be raised now."""
        if fcntl is None:
            return None
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError:
            try:  # a read-only store directory: the flag works as long as the file exists
                fd = os.open(self.path, os.O_RDONLY)
            except OSError:
                return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # another writer raised it first
            os.close(fd)
            return None
        return fd

    @staticmethod
    def lower(fd: int | None) -> None:
        if fd is not None:
            os.close(fd)


class _Backoff:
    """Jittered exponential sleeps between connection attempts, bounded by a deadline."""

    def __init__(self, deadline: float, first_and_cap: tuple[float, float]) -> None:
        self.deadline = deadline
        self._delay, self._cap = first_and_cap

    def sleep(self) -> bool:
        """Sleep once; False (without sleeping) when the deadline has passed."""
        now = time.monotonic()
        if now > self.deadline:
            return False
        time.sleep(min(self._delay * (1 + random.random()), max(0.0, self.deadline - now)))
        self._delay = min(self._delay * 2, self._cap)
        return True


class Catalog:
    """Short-lived DuckDB connections to ``path``, with retry on lock conflicts.

    ``read_only_reason``: open the catalog read-only (only read-only connections; every write
    raises :class:`StoreReadOnlyError`, whose message gives this reason).
    """

    def __init__(self, path: Path, *, retry_seconds: float = LOCK_RETRY_SECONDS, read_only_reason: str | None = None) -> None:
        self.path = Path(path)
        self.retry_seconds = retry_seconds
        self.read_only_reason = read_only_reason
        # one name per file, so that every Catalog of it shares DuckDB's instance and our gate
        self._file = os.path.realpath(self.path)
        self._gate = _gate_for(self._file)
        self._flag = _WriterFlag(self._file)
        self._pool = _pool_for(self._file, self._flag)

    # ---- connections ------------------------------------------------------------------------
    @contextlib.contextmanager
    def connect(self, *, read_only: bool = False, config: dict[str, Any] | None = None) -> Iterator[duckdb.DuckDBPyConnection]:
        """A connection that is closed on exit; waits while another process holds the file lock.

        Parameters
        ----------
        read_only : bool, default False
            Read-only connections run side by side (threads of this process and other processes);
            a read-write one excludes every other connection to the file.
        config : dict, optional
            DuckDB settings of a read-only connection, default :data:`READ_CONFIG` (no file or
            network access); a different one waits until the readers with the default are done.
            Write connections take none (``ValueError``): they share the process's write host.

        Raises
        ------
        StoreLockedError
            If the file stayed locked for ``retry_seconds``.
        """
        if not read_only and self.read_only:
            raise StoreReadOnlyError(self.read_only_message())
        deadline = time.monotonic() + self.retry_seconds
        if read_only:
            settings = dict(READ_CONFIG if config is None else config)
            con, pooled = self._open_read(settings, deadline)
            flag, leave = None, self._gate.leave_read
        else:
            con, flag = self._open_write(dict(config or {}), deadline)
            pooled, leave = False, self._gate.leave_write
        try:
            yield con
        except duckdb.Error as err:
            if _is_damage(err):
                raise self._damaged_error(err) from err
            raise
        finally:
            try:
                if pooled:
                    self._pool.give_back(con)
                elif read_only:
                    con.close()
                else:
                    _WRITE_HOST.release(self._file, con)
            finally:
                _WriterFlag.lower(flag)
                leave()

    def _open_read(self, settings: dict[str, Any], deadline: float) -> tuple[duckdb.DuckDBPyConnection, bool]:
        """A read connection and whether it is a cursor of the pool (default settings) or its own."""
        if not self.path.exists():
            msg = (f"The catalog {str(self.path)!r} does not exist, so it cannot be opened read-only. Open the "
                   "store with store.Store(path) (or any scdm command) first: that creates it.")
            raise ScdmError(msg)
        key = _config_key(settings)
        lock_wait, flag_wait = _Backoff(deadline, _LOCK_BACKOFF_S), _Backoff(deadline, _FLAG_BACKOFF_S)
        # a thread inside its own read or write skips the flag: it may be this thread's own, and
        # the gate admits a nested read at once or refuses it
        nested = self._gate.reading_here() or self._gate.writing_here()
        patience = min(time.monotonic() + _FLAG_PATIENCE_S, deadline)
        while True:
            if not nested and time.monotonic() < patience and self._flag.is_raised():
                self._pool.drain()  # a writer waits for the file: open nothing new, so that it drains
                flag_wait.sleep()
                continue
            self._gate.enter_read(key, deadline, repr(str(self.path)))
            try:
                if key == _DEFAULT_READ_KEY:
                    return self._pool.cursor(settings, key), True
                self._pool.close()  # other settings: the gate admitted no default reader, so none is out
                return duckdb.connect(self._file, read_only=True, config=settings), False
            except (duckdb.IOException, duckdb.ConnectionException) as err:
                self._gate.leave_read()
                if not _is_lock_error(err):
                    raise self._damaged_error(err) if _is_damage(err) else err
                if not lock_wait.sleep():
                    raise self._locked_error() from err
            except duckdb.Error as err:
                self._gate.leave_read()
                raise self._damaged_error(err) if _is_damage(err) else err
            except BaseException:
                self._gate.leave_read()
                raise

    def _open_write(self, settings: dict[str, Any], deadline: float) -> tuple[duckdb.DuckDBPyConnection, int | None]:
        if settings:
            msg = ("DuckDB settings apply to read-only catalog connections; every write connection of a process "
                   "shares one DuckDB instance with its own settings.")
            raise ValueError(msg)
        where = repr(str(self.path))
        if self._gate.writing_here():  # nested in this thread's write: it shares the attachment
            self._gate.enter_write(deadline, where)
            try:
                return _WRITE_HOST.connect(self._file), None
            except duckdb.Error as err:
                self._gate.leave_write()
                raise self._damaged_error(err) if _is_damage(err) else err
            except BaseException:
                self._gate.leave_write()
                raise
        flag: int | None = None
        lock_wait, flag_wait = _Backoff(deadline, _LOCK_BACKOFF_S), _Backoff(deadline, _FLAG_BACKOFF_S)
        while True:
            self._gate.enter_write(deadline, where)
            try:
                self._pool.close()  # the gate admitted the write: no read is open, the pooled connection is idle
                return _WRITE_HOST.connect(self._file), flag
            except (duckdb.IOException, duckdb.ConnectionException) as err:
                self._gate.leave_write()
                if not _is_lock_error(err):
                    _WriterFlag.lower(flag)
                    raise self._damaged_error(err) if _is_damage(err) else err
                if flag is None:  # readers elsewhere keep the file open: ask them to drain
                    flag = self._flag.try_raise()
                if not (flag_wait if flag is not None else lock_wait).sleep():
                    _WriterFlag.lower(flag)
                    raise self._locked_error() from err
            except duckdb.Error as err:
                self._gate.leave_write()
                _WriterFlag.lower(flag)
                raise self._damaged_error(err) if _is_damage(err) else err
            except BaseException:
                self._gate.leave_write()
                _WriterFlag.lower(flag)
                raise

    @property
    def read_only(self) -> bool:
        """Whether this catalog was opened read-only (see the class docstring)."""
        return self.read_only_reason is not None

    def read_only_message(self, action: str = "write to it") -> str:
        """Why a write is refused, and how to get write access."""
        store = self.path.parent
        return (
            f"The store {str(store)!r} is open read-only ({self.read_only_reason}), so scdm cannot {action}. "
            f"Reading works (ls, sql, results, export, report --out DIR, verify, serve); to write, run as a user who "
            f"may write {str(store)!r}, without --read-only / SCDM_READ_ONLY, or work on a copy of the store."
        )

    def _damaged_error(self, err: BaseException) -> CatalogDamagedError:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        store = self.path.parent
        msg = (
            f"The catalog {str(self.path)!r} is damaged and cannot be read (DuckDB: {first}). It was truncated, "
            f"overwritten or corrupted on disk. Restore {self.path.name} from a backup or a copy of the store "
            f"(stop every scdm process on {str(store)!r} first). The Zarr arrays under {str(store / 'embeddings')!r} "
            f"and the datasets under {str(store / 'datasets')!r} are separate files that any Zarr/AnnData client can still open; "
            "without a backup, move the store aside and ingest and embed the data again in a new one."
        )
        return CatalogDamagedError(msg)

    def _locked_error(self) -> StoreLockedError:
        msg = (
            f"The catalog {str(self.path)!r} stayed locked by another process for {self.retry_seconds:.0f} s. "
            "Another scdm process (or a duckdb client) holds it open; close it and retry."
        )
        return StoreLockedError(msg)

    def query(self, sql: str, params: Sequence[Any] | None = None) -> pd.DataFrame:
        """Run one query and return its rows as a DataFrame.

        Reads (``SELECT``, ``WITH ... SELECT``, ``EXPLAIN``) go through a read-only connection, so
        they run alongside other readers; anything else, and any query inside this thread's own
        write transaction, through a read-write one.
        """
        read_only = _only_reads(sql) and not self._gate.writing_here() and self.path.exists()
        if self.read_only and not read_only:
            read_only = True  # DESCRIBE, SHOW, PRAGMA...: DuckDB itself refuses writes on this connection
        with self.connect(read_only=read_only) as con:
            try:
                return con.execute(sql, params or []).df()
            except duckdb.Error as err:
                if self.read_only and "read-only" in str(err).lower():
                    raise StoreReadOnlyError(self.read_only_message()) from err
                raise

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

    @staticmethod
    def insert_rows(con: duckdb.DuckDBPyConnection, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], *,
                    verb: str = "INSERT", computed: Mapping[str, str] | None = None) -> None:
        """Insert ``rows`` (tuples in ``columns`` order) in one statement, inside ``con``'s transaction.

        DuckDB's ``executemany`` runs one statement per row (~2.5 ms each); this sends each column
        as one list and unnests them: ~3 ms for a few hundred rows. ``computed``: more columns, each
        set to an SQL expression (e.g. ``{"written_at": "now()"}``). None stays NULL.
        """
        if not rows:
            return
        computed = dict(computed or {})
        names = [f"v{i}" for i in range(len(columns))]
        unnest = ", ".join(f"unnest(?) AS {n}" for n in names)
        target = ", ".join(f'"{c}"' for c in [*columns, *computed])
        values = ", ".join([*names, *computed.values()])
        con.execute(f'{verb} INTO "{table}" ({target}) SELECT {values} FROM (SELECT {unnest})',
                    [[row[i] for row in rows] for i in range(len(columns))])

    def insert_df(self, table: str, frame: pd.DataFrame, con: duckdb.DuckDBPyConnection | None = None, *,
                  or_ignore: bool = False) -> None:
        """Insert a DataFrame's rows into ``table``, matching columns by name.

        ``or_ignore`` skips rows whose primary key is already there (two processes storing the
        same content at once both succeed).
        """
        if frame.empty:
            return
        cols = ", ".join(f'"{c}"' for c in frame.columns)
        verb = "INSERT OR IGNORE" if or_ignore else "INSERT"
        sql = f'{verb} INTO "{table}" ({cols}) SELECT {cols} FROM _scdm_frame'
        if con is not None:
            with registered(con, "_scdm_frame", frame):
                con.execute(sql)
            return
        with self.transaction() as tx:
            self.insert_df(table, frame, tx, or_ignore=or_ignore)

    # ---- schema -----------------------------------------------------------------------------
    def migrate(self, scdm_version: str) -> None:
        """Create the catalog or bring it to :data:`SCHEMA_VERSION`; refuse a newer one."""
        if self.read_only:
            self.check_schema(scdm_version)
            return
        with self.transaction() as con:
            self._refuse_macros(con)  # first: the migrations' own statements call now()
            has_migrations = con.execute(
                "SELECT count(*) FROM information_schema.tables WHERE table_catalog = current_database() "
                "AND table_schema = 'main' AND table_name = 'migrations'").fetchall()[0][0]
            done = dict(con.execute("SELECT version, name FROM migrations").fetchall()) if has_migrations else {}
            self._refuse_newer(con, set(done), scdm_version)  # before the views: a newer scdm may define others
            self._refuse_foreign_views(con, check_definitions=False)
            con.execute(
                "CREATE TABLE IF NOT EXISTS migrations (version INTEGER PRIMARY KEY, name VARCHAR, "
                "applied_at TIMESTAMP, scdm_version VARCHAR)"
            )
            for version, name, sql in _pending_migrations(done):
                logger.debug("catalog %s: applying migration %04d_%s", self.path, version, name)
                con.execute(sql)
                con.execute(
                    "INSERT OR REPLACE INTO migrations VALUES (?, ?, now(), ?)", [version, name, scdm_version]
                )
            self._restore_edited_views(con)
            con.execute(
                "INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", [str(SCHEMA_VERSION)]
            )

    def check_schema(self, scdm_version: str) -> None:
        """For a read-only catalog: refuse one that is newer than this scdm or needs a migration."""
        with self.connect(read_only=True) as con:
            self._refuse_macros(con)
            try:
                done = dict(con.execute("SELECT version, name FROM migrations").fetchall())
            except duckdb.CatalogException:
                done = {}
            self._refuse_newer(con, set(done), scdm_version)  # before the views: a newer scdm may define others
            pending = _pending_migrations(done)
            # an older scdm's catalog holds its own (older) definition of a view a pending migration
            # replaces (results before migration 12): that is the pending migration, refused below
            self._refuse_foreign_views(con, check_definitions=not pending)
        if pending:
            store = self.path.parent
            names = ", ".join(f"{version:04d}_{name}" for version, name, _ in pending)
            msg = (
                f"The catalog {str(self.path)!r} has schema version {max(done, default=0)} and lacks migration(s) "
                f"{names}; this scdm "
                f"({scdm_version}) needs version {SCHEMA_VERSION}, and a store opened read-only cannot be migrated. "
                f"Open it once with write access (e.g. `scdm --store {str(store)} ls` as a user who may write it), "
                "then read-only use works."
            )
            raise StoreReadOnlyError(msg)

    def _refuse_macros(self, con: duckdb.DuckDBPyConnection) -> None:
        """Refuse a catalog holding SQL macros: scdm never creates one, and a macro named like a built-in
        (``now``, ``avg``) replaces it in every statement scdm runs on the file.

        A store may be shared: a macro planted by anyone who may write the file would run in every
        other user's write connections, which can read their files (and the network); in reads it
        would change the numbers shown.
        """
        found = con.execute("SELECT schema_name, function_name FROM duckdb_functions() "
                            "WHERE database_name = current_database() AND NOT internal ORDER BY ALL").fetchall()
        if found:
            names = ", ".join(f"{schema}.{name}" for schema, name in found)
            msg = (f"The catalog {str(self.path)!r} holds SQL macros ({names}), which scdm never creates: someone who "
                   "may write this store added them, and scdm would run them in its own statements. Nothing was "
                   "read or written. Have the store's owner remove them (DROP MACRO ...) or restore the catalog "
                   "from a backup.")
            raise StoreFormatError(msg)

    def _refuse_foreign_views(self, con: duckdb.DuckDBPyConnection, *, check_definitions: bool) -> None:
        """Refuse a catalog holding views that scdm's migrations do not create; with ``check_definitions``
        (a read-only catalog with every migration applied), also a view of scdm's whose definition was
        changed (a writable open restores it, see :meth:`_restore_edited_views`).

        A view can stand in for a table scdm reads (drop ``datasets``, create a view of that name)
        or redefine ``results``: a planted one would change the numbers every user of a shared store
        is shown, and in write connections (which may read files) could read theirs.
        """
        expected = _expected_views()
        found = dict(con.execute(_VIEWS_SQL).fetchall())
        foreign = sorted(set(found) - set(expected))
        if foreign:
            msg = (f"The catalog {str(self.path)!r} holds views that scdm never creates ({', '.join(foreign)}): someone "
                   "who may write this store added them, and a view named like a table scdm reads would replace its "
                   "rows. Nothing was read or written. Have the store's owner remove them (DROP VIEW ...) or restore "
                   "the catalog from a backup.")
            raise StoreFormatError(msg)
        if not check_definitions:
            return
        self._refuse_tables_in_place_of_views(con)
        edited = sorted(name for name in expected if name not in found or not _same_view(name, found[name]))
        if edited:
            msg = (f"The catalog {str(self.path)!r} defines the view(s) {', '.join(edited)} otherwise than this scdm "
                   "does (edited by someone who may write the store, or written by another DuckDB version), so the "
                   "results read through them could be other numbers. Nothing was read. Open the store once with "
                   f"write access (e.g. `scdm --store {str(self.path.parent)} ls` as a user who may write it), which "
                   "restores scdm's definitions.")
            raise StoreFormatError(msg)

    def _refuse_tables_in_place_of_views(self, con: duckdb.DuckDBPyConnection) -> None:
        """Refuse a catalog where a table stands in for one of scdm's views (``results`` dropped and a
        table of that name made): its rows, whatever they hold, would be read as scdm's own."""
        tables = {schema + "." + name for schema, name in con.execute(
            "SELECT schema_name, table_name FROM duckdb_tables() WHERE database_name = current_database()").fetchall()}
        replaced = sorted(tables & set(_expected_views()))
        if replaced:
            msg = (f"The catalog {str(self.path)!r} holds the table(s) {', '.join(replaced)} where scdm defines a view: "
                   "someone who may write this store replaced it, and its rows would be read as scdm's results. Nothing "
                   "was read or written. Have the store's owner remove it (DROP TABLE ...; scdm's own rows are in "
                   "eval_results) and open the store once with write access, which defines the view again, or restore "
                   "the catalog from a backup.")
            raise StoreFormatError(msg)

    def _restore_edited_views(self, con: duckdb.DuckDBPyConnection) -> None:
        """Define scdm's views again where the catalog's definition differs from the migrations' own (or
        the view was dropped)."""
        self._refuse_tables_in_place_of_views(con)
        found = dict(con.execute(_VIEWS_SQL).fetchall())
        for name, sql in _expected_views().items():
            if name not in found or not _same_view(name, found[name]):
                logger.warning("catalog %s: the view %s was defined otherwise than scdm defines it; restored "
                               "scdm's definition", self.path, name)
                con.execute(_or_replace(sql))

    def _refuse_newer(self, con: duckdb.DuckDBPyConnection, done: set[int], scdm_version: str) -> None:
        newest = max(done, default=0)
        if newest <= SCHEMA_VERSION:
            return
        writer = con.execute("SELECT scdm_version FROM migrations WHERE version = ?", [newest]).fetchone()
        msg = (
            f"The catalog {str(self.path)!r} has schema version {newest}, written by scdm "
            f"{writer[0] if writer else '?'}; this scdm ({scdm_version}) reads up to version "
            f"{SCHEMA_VERSION}. Upgrade scdm (pip install -U scdm) to open this store."
        )
        raise StoreFormatError(msg)

    # ---- user SQL ---------------------------------------------------------------------------
    def read_only_query(self, sql: str, *, max_rows: int | None = None, timeout_s: float | None = None) -> pd.DataFrame:
        """Run user SQL on a read-only connection with no file or network access.

        Only ``SELECT``/``EXPLAIN`` statements (``WITH ... SELECT`` included) are accepted; the
        connection itself is read-only and cannot reach files, so ``COPY ... TO``, ``ATTACH``,
        ``INSTALL`` and writes fail twice over. ``max_rows=None`` answers every row, held in memory
        at once (:meth:`read_only_batches` hands a long answer over in parts).

        Raises
        ------
        InputDataError
            If ``max_rows`` is not a whole number >= 1 or ``timeout_s`` not a finite number > 0.
        QueryError
            If the query cannot be parsed, is empty, or fails in DuckDB.
        ReadOnlyQueryError
            If a statement is not a read.
        """
        _check_limits(max_rows, timeout_s)
        check_read_only(sql)
        with self.connect(read_only=True) as con, self._answering(con, timeout_s):  # READ_CONFIG: no file access
            return _fetch(con.execute(sql), max_rows)

    def read_only_batches(self, sql: str, *, batch_rows: int = 10_000, timeout_s: float | None = None) -> Iterator[pd.DataFrame]:
        """:meth:`read_only_query`'s whole answer in parts of at most ``batch_rows`` rows, read from DuckDB as asked.

        The first part comes even when the answer is empty (it has the columns); parts have the same
        columns and types. Only the part being read is held, so an export of a long answer does not
        hold it all. The read connection stays borrowed until the iterator is exhausted or closed
        (``contextlib.closing``); ``timeout_s`` counts from the query's start to its last part.

        Raises
        ------
        InputDataError
            At once, if ``batch_rows`` is not a whole number >= 1 or ``timeout_s`` not a finite number > 0.
        QueryError, ReadOnlyQueryError
            As :meth:`read_only_query` (a refused or unparsable query at once, others while reading).
        """
        _check_limits(batch_rows, timeout_s, rows_name="batch_rows")
        check_read_only(sql)
        return self._batches(sql, int(batch_rows), timeout_s)

    def _batches(self, sql: str, batch_rows: int, timeout_s: float | None) -> Iterator[pd.DataFrame]:
        with self.connect(read_only=True) as con, self._answering(con, timeout_s):
            result = con.execute(sql)
            while True:
                part = _fetch(result, batch_rows)
                yield part
                if len(part) < batch_rows:
                    return

    @contextlib.contextmanager
    def _answering(self, con: duckdb.DuckDBPyConnection, timeout_s: float | None) -> Iterator[None]:
        """User SQL run on ``con`` within: stopped after ``timeout_s``, and DuckDB's errors said as scdm errors."""
        timer = None if timeout_s is None else threading.Timer(timeout_s, con.interrupt)
        if timer is not None:
            timer.start()
        try:
            yield
        except duckdb.InterruptException as err:
            if timeout_s is None:
                msg = f"The query failed: {err}"
                raise QueryError(msg) from err
            msg = f"The query ran longer than {timeout_s:g} s and was stopped; add a LIMIT or a WHERE clause."
            raise QueryTimeoutError(msg, timeout_s) from err  # too slow, not refused: the server answers 400, not 403
        except duckdb.PermissionException as err:
            msg = f"The query tried to reach files or settings, which the read-only SQL interface does not allow: {err}"
            raise ReadOnlyQueryError(msg) from err
        except duckdb.OutOfMemoryException as err:  # not a crash of the process: the limit held
            msg = (f"The query needed more than the {READ_CONFIG['memory_limit']} of memory that catalog reads may "
                   "use and was stopped; aggregate first, or add a LIMIT or a WHERE clause.")
            raise QueryError(msg) from err
        except duckdb.Error as err:
            if _is_damage(err):
                raise self._damaged_error(err) from err
            msg = f"The query failed: {err}"
            raise QueryError(msg) from err
        finally:
            if timer is not None:
                timer.cancel()


def _check_limits(max_rows: int | None, timeout_s: float | None, *, rows_name: str = "max_rows") -> None:
    """Refuse a row limit or time limit that cannot be meant (``fetchmany(-1)`` is a TypeError, ``0`` an empty answer)."""
    if max_rows is not None and (isinstance(max_rows, bool) or not isinstance(max_rows, numbers.Integral) or max_rows < 1):
        every = ", or None for every row" if rows_name == "max_rows" else ""
        msg = f"The row limit ({rows_name}) must be a whole number >= 1{every}; got {max_rows!r}."
        raise InputDataError(msg)
    if timeout_s is not None and (isinstance(timeout_s, bool) or not isinstance(timeout_s, numbers.Real)
                                  or not math.isfinite(timeout_s) or timeout_s <= 0):
        msg = f"The time limit (timeout_s) must be a finite number of seconds > 0, or None for none; got {timeout_s!r}."
        raise InputDataError(msg)


_FETCH_BATCH_ROWS = 16
"""Rows of a row-limited answer read from DuckDB at a time, each batch measured before the next."""

_SIZE_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12,
               "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def _fetch(result: duckdb.DuckDBPyConnection, max_rows: int | None) -> pd.DataFrame:
    """The answer, at most ``max_rows`` rows of it; a row-limited answer larger than the read memory limit is refused.

    DuckDB's memory limit does not count a streamed answer's values once they are Python objects:
    ``SELECT repeat('x', 10000000) FROM range(150)`` answered 150 rows (1.5 GB) under a 300MB limit and
    the process grew to 3.1 GB, which the server's SQL console (row-limited) could be made to repeat.
    """
    if max_rows is None:
        return _whole_hugeints(result.fetch_df(), result.description or [])
    limit = _size_bytes(str(READ_CONFIG["memory_limit"]))
    rows: list[tuple[Any, ...]] = []
    size = 0
    while len(rows) < max_rows:
        batch = result.fetchmany(min(_FETCH_BATCH_ROWS, int(max_rows) - len(rows)))
        if not batch:
            break
        size += sum(_value_bytes(v) for row in batch for v in row)
        if limit is not None and size > limit:
            msg = (f"The query's answer needed more than the {READ_CONFIG['memory_limit']} of memory that catalog reads "
                   "may use and was stopped; select fewer or shorter values, or fewer rows.")
            raise QueryError(msg)
        rows += batch
    return _typed_frame(rows, result.description or [])


_PANDAS_DTYPES = {"TINYINT": "Int8", "SMALLINT": "Int16", "INTEGER": "Int32", "BIGINT": "Int64", "UTINYINT": "UInt8",
                  "USMALLINT": "UInt16", "UINTEGER": "UInt32", "UBIGINT": "UInt64", "BOOLEAN": "boolean", "FLOAT": "float32"}
"""The pandas dtype DuckDB's own ``fetch_df`` gives a column of these types (nullable: NULLs stay NULL)."""
_NUMPY_DTYPES = {"Int8": "int8", "Int16": "int16", "Int32": "int32", "Int64": "int64", "UInt8": "uint8", "UInt16": "uint16",
                 "UInt32": "uint32", "UInt64": "uint64", "boolean": "bool"}
"""The dtype ``fetch_df`` gives such a column without a NULL."""


def _typed_frame(rows: list[tuple[Any, ...]], description: Sequence[Any]) -> pd.DataFrame:
    """Fetched rows as a DataFrame whose columns have the types ``fetch_df`` gives the same answer.

    pandas makes an integer column holding a NULL float: a row-limited answer printed 1.0 where the
    whole answer printed 1, in the CLI's CSV and JSON and the server's console alike. DECIMAL is float
    there too; HUGEINT is Int64 where its values fit (as :func:`_whole_hugeints` makes it), else exact
    Python ints. Other types keep the Python values DuckDB fetched.
    """
    frame = pd.DataFrame.from_records(rows, columns=[d[0] for d in description])
    for i, (_, kind, *_) in enumerate(description):  # by position: pandas renames a repeated column name
        kind = str(kind)
        values = [row[i] for row in rows]  # as fetched: the frame's column may already be float
        dtype = _PANDAS_DTYPES.get(kind)
        if re.fullmatch(r"DECIMAL\(\d+, ?\d+\)", kind):  # not DECIMAL(2,1)[], a list
            frame.isetitem(i, pd.Series([np.nan if v is None else float(v) for v in values], index=frame.index, dtype="float64"))
        elif kind in ("HUGEINT", "UHUGEINT") and all(v is None or -(2**63) <= v < 2**63 for v in values):
            frame.isetitem(i, pd.array(values, dtype="Int64"))
        elif dtype is not None:  # numpy's own type where no value is NULL, as fetch_df
            frame.isetitem(i, pd.array(values, dtype=dtype if None in values else _NUMPY_DTYPES.get(dtype, dtype)))
    return frame


def _size_bytes(text: str) -> int | None:
    """Bytes of a DuckDB size setting (``4GB``, ``512MB``, ``1.5GiB``); None for one this cannot read."""
    found = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", text)
    if found is None or found.group(2).lower() not in _SIZE_UNITS:
        return None
    return int(float(found.group(1)) * _SIZE_UNITS[found.group(2).lower()])


def _value_bytes(value: Any) -> int:
    """About the memory a fetched value holds: its characters or bytes, nested values counted through."""
    if isinstance(value, (str, bytes, bytearray)):
        return len(value)
    if isinstance(value, (list, tuple)):
        return 8 + sum(_value_bytes(v) for v in value)
    if isinstance(value, dict):
        return 8 + sum(_value_bytes(k) + _value_bytes(v) for k, v in value.items())
    return 8


_EXACT_FLOAT_INT = 2**53
"""Integers up to this size read back from a float64 exactly."""


def _whole_hugeints(frame: pd.DataFrame, description: Sequence[Any]) -> pd.DataFrame:
    """HUGEINT columns as integers: DuckDB hands them to pandas as float64.

    ``sum()`` of an integer column is a HUGEINT: ``SELECT sum(n_cells) FROM datasets`` printed 66.0
    (66 with ``--max-rows``, which reads Python ints). A column whose values are all exact whole
    floats becomes nullable Int64; larger ones were already rounded by DuckDB and stay float.
    """
    if len(description) != frame.shape[1]:
        return frame
    for i, (_, kind, *_) in enumerate(description):  # by position: pandas renames a repeated column name
        column = frame.iloc[:, i]
        if str(kind) in ("HUGEINT", "UHUGEINT") and column.dtype.kind == "f" and (column.dropna().abs() <= _EXACT_FLOAT_INT).all():
            frame.isetitem(i, column.astype("Int64"))
    return frame


def check_read_only(sql: str) -> None:
    """Raise :class:`ReadOnlyQueryError` unless every statement in ``sql`` only reads.

    A query that cannot be parsed (or holds no statement) raises :class:`QueryError` with the
    parser's message: it is a mistake to fix, not a write to refuse.
    """
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as err:
        msg = f"Could not parse the query: {err}"
        raise QueryError(msg) from err
    if not statements:
        msg = "The query is empty; give a SELECT statement, e.g. scdm sql \"SELECT * FROM datasets\"."
        raise QueryError(msg)
    for st in statements:
        kind = st.type.name
        if kind == "EXPLAIN":  # EXPLAIN ANALYZE runs its statement: CREATE TEMP, SET, PRAGMA, LOAD, CHECKPOINT
            kind = _explained_kind(st.query)
        if kind not in _READ_STATEMENTS:
            msg = (
                f"Only read queries are allowed here (SELECT, WITH ... SELECT, EXPLAIN of one); got a {kind} "
                "statement. The catalog is changed only through scdm commands."
            )
            raise ReadOnlyQueryError(msg)
    _refuse_state_changing_calls(sql)


_STATE_CHANGING_FUNCTIONS: dict[str, str] = {
    "setseed": ("sets the seed of random() and of USING SAMPLE for the connection; for a repeatable sample give the "
                "seed in the query: USING SAMPLE 10% (bernoulli, 42)"),
    "nextval": "advances a sequence",
    "setval": "sets a sequence",
    "write_log": "writes to the database's log",
    "truncate_duckdb_logs": "empties the database's log",
    "checkpoint": "checkpoints the database",
    "force_checkpoint": "checkpoints the database",
    "add_grammar_extension": "changes the SQL parser of the database",
    "remove_grammar_extension": "changes the SQL parser of the database",
    "register_external_resource": "changes the database's registry of external resources",
    "register_external_resource_type": "changes the database's registry of external resources",
    "deregister_external_resource": "changes the database's registry of external resources",
    "create_external_resource": "creates an external resource",
    "destroy_external_resource": "destroys an external resource",
    "query": "runs SQL given as text, which this check cannot read; write that query itself instead",
    "json_execute_serialized_sql": "runs SQL given as text, which this check cannot read; write that query itself instead",
}
"""DuckDB functions a read query may not call, with what each does (installed DuckDB's ``duckdb_functions()``
marks the scalar ones ``has_side_effects``; a test keeps this list in step with it). They change the state
of the connection or of the database instance, which every read of this process shares (one pooled
instance per catalog file), or they run SQL this check cannot read. In DuckDB 2.0.1 a seed set by
setseed() stays with the cursor of its read, which the pool closes; refusing it does not rely on that."""

_STATE_CHANGING_PREFIXES = ("enable_", "disable_")
"""Functions named so (enable_logging, disable_profiling, enable_optimizer, ...) switch a setting on or off."""


def _refuse_state_changing_calls(sql: str) -> None:
    """Raise :class:`ReadOnlyQueryError` when ``sql`` calls a function that changes connection or database state.

    A call is a name followed by ``(``, in any spelling DuckDB accepts: ``setseed(0.5)``,
    ``main.setseed (0.5)``, ``"SetSeed"(0.5)`` and ``(0.5).setseed()``. Names inside string literals and
    comments are not calls.
    """
    every = duckdb.tokenize(sql)
    ends = [pos for pos, _ in every[1:]] + [len(sql)]
    tokens = [(sql[pos:end].strip(), kind) for (pos, kind), end in zip(every, ends, strict=True)
              if kind != duckdb.token_type.comment]
    for (word, kind), (after, _) in itertools.pairwise(tokens):
        if kind not in (duckdb.token_type.identifier, duckdb.token_type.keyword) or not after.startswith("("):
            continue
        name = word.strip('"').lower()
        if name in _STATE_CHANGING_FUNCTIONS or name.startswith(_STATE_CHANGING_PREFIXES):
            what = _STATE_CHANGING_FUNCTIONS.get(name, "switches a setting of the database on or off")
            msg = (f"{word}() is not allowed in a read query: it {what}. Read queries (scdm sql, the server's SQL "
                   "console) change nothing; the catalog is changed only through scdm commands.")
            raise ReadOnlyQueryError(msg)


def _explained_kind(sql: str) -> str:
    """The statement type an ``EXPLAIN [ANALYZE] [(options)] ...`` statement explains (and, with ANALYZE, runs).

    ``SELECT`` for a read; ``EXPLAIN`` of an EXPLAIN, or anything that does not parse, counts as
    a write (refused): only an explained SELECT is let through.
    """
    every = duckdb.tokenize(sql)
    ends = [pos for pos, _ in every[1:]] + [len(sql)]
    tokens = [(pos, end) for (pos, kind), end in zip(every, ends, strict=True) if kind != duckdb.token_type.comment]
    words = [sql[pos:end].strip() for pos, end in tokens]
    at = 1 if words[:1] and words[0].upper() == "EXPLAIN" else len(words)
    if at < len(words) and words[at].upper() in ("ANALYZE", "ANALYSE"):
        at += 1
    if at < len(words) and words[at].startswith("("):  # (FORMAT json, ...): up to the closing parenthesis
        depth = 0
        while at < len(words):
            depth += words[at].count("(") - words[at].count(")")
            at += 1
            if depth <= 0:
                break
    if at >= len(words):
        return "EXPLAIN"
    try:
        inner = duckdb.extract_statements(sql[tokens[at][0]:])
    except duckdb.Error:
        return "EXPLAIN"
    return inner[0].type.name if len(inner) == 1 else "EXPLAIN"
