"""Who is writing an embedding, and which of its chunks each process is computing.

Several processes may write one embedding at once (two ``scdm embed`` runs of the same command,
one per GPU; a Ray driver next to a local run). They coordinate through advisory file locks
(``flock``) under ``<store>/claims/<embedding_id>/``, which the operating system drops when a
process dies, so a crashed or SIGKILLed writer never blocks anyone:

``job.lock``
    Every process that writes the embedding holds a *shared* lock on it for as long as it
    writes. Removing the embedding (``scdm rm``) takes the *exclusive* lock without waiting, so
    it is refused while any job runs; creating the embedding takes it too, so that two creators
    (or a creator and a remover) never interleave.
``writer-<host>-<pid>-<n>.json``
    Who holds a shared lock (pid, host, since when, command line), so that a refusal can name
    the job. Each is exclusively locked by its writer: a file nobody locks is a dead writer's.
``chunk-<n>.lock``
    Exclusively locked by the process computing chunk ``n`` until its catalog row is committed;
    it holds that process's pid and host. Another process skips the chunk and comes back to it
    at the end: by then it is committed, or its claimer died and the lock is free to take.

A lock file may be deleted by whoever holds its lock (a finished claim, a removal). Whoever
locks a path therefore checks afterwards that the path still names the file it locked, and
tries again if not; a lock on a deleted file protects nothing.

Platforms without ``fcntl`` (Windows) grant every lock: processes do not see each other, so two
jobs each compute every chunk (the result is still correct) and ``scdm rm`` cannot tell that a
job is running. File systems must support ``flock`` across the machines that share a store
(local disks do; NFS does through its lock manager).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import itertools
import json
import logging
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from scdm.store.errors import EmbeddingBusyError, ScdmError, StoreDamagedError

try:
    import fcntl
except ImportError:  # pragma: no cover - exercised on Windows only
    fcntl = None  # type: ignore[assignment]

__all__ = ["CLAIMS_DIR", "WriterInfo", "JobLease", "exclusive", "try_exclusive", "release", "forget", "live_writers", "recorded_writers", "claims_folder",
           "in_use", "can_tell_holders", "safe_name", "lock_waiting", "unlock_and_delete"]

logger = logging.getLogger(__name__)

CLAIMS_DIR = "claims"
"""Folder of the store holding one lock folder per embedding that is being written."""

_JOB_LOCK = "job.lock"
_POLL_S = (0.005, 0.2)
"""First and longest sleep while waiting for a lock."""
_SEQ = itertools.count()
"""Tells apart several leases of one process on one embedding (a writer inside a runner's job)."""


def claims_folder(store_root: Path, embedding_id: str) -> Path:
    """The lock folder of one embedding.

    Raises
    ------
    StoreDamagedError
        The id is no file name (``../../docs``): an edited catalog row, whose lock folder would be
        a folder elsewhere, every file of which :func:`forget` deletes.
    """
    if embedding_id in ("", ".", "..") or Path(embedding_id).name != embedding_id or "\\" in embedding_id:
        msg = (f"The catalog names an embedding {embedding_id!r}, an id scdm never makes (it is no plain file name): "
               "someone edited the catalog. Nothing was locked, removed or written for it. Restore the catalog from a "
               "backup, or delete that row with any DuckDB client.")
        raise StoreDamagedError(msg)
    return Path(store_root) / CLAIMS_DIR / embedding_id


@dataclass(frozen=True)
class WriterInfo:
    """One process that writes (or claims a chunk of) an embedding."""

    pid: int
    host: str
    since: str
    """ISO time (UTC) the process started writing."""
    command: str

    @classmethod
    def here(cls) -> WriterInfo:
        since = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        command = " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))[:300]
        return cls(os.getpid(), platform.node(), since, command)

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host} since {self.since} ({self.command or 'python'})"

    def to_json(self) -> str:
        return json.dumps({"pid": self.pid, "host": self.host, "since": self.since, "command": self.command})

    @classmethod
    def from_text(cls, text: str) -> WriterInfo | None:
        try:
            d = json.loads(text)
            return cls(int(d["pid"]), str(d["host"]), str(d["since"]), str(d.get("command", "")))
        except (ValueError, KeyError, TypeError):
            return None  # written half-way by a writer that is still starting: no name to give


# ---- one lock ------------------------------------------------------------------------------
def _open(path: Path) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except PermissionError as err:
        msg = f"Cannot write the lock file {str(path)!r} ({err.strerror}): the store is read-only here, so nothing can be written to it."
        raise ScdmError(msg) from err


def _still_there(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file open as ``fd`` (not deleted or replaced meanwhile)."""
    try:
        here, there = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (here.st_ino, here.st_dev) == (there.st_ino, there.st_dev)


def _lock(path: Path, *, exclusive: bool, wait_s: float) -> int | None:
    """File descriptor holding a lock on ``path`` (created if missing), or None after ``wait_s``."""
    if fcntl is None:
        return _open(path)
    mode = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB
    deadline = time.monotonic() + wait_s
    delay = _POLL_S[0]
    while True:
        fd = _open(path)
        try:
            fcntl.flock(fd, mode)
        except OSError:  # held by another open file (process, or another lease here)
            os.close(fd)
            now = time.monotonic()
            if now >= deadline:
                return None
            time.sleep(min(delay, deadline - now))
            delay = min(delay * 2, _POLL_S[1])
            continue
        if _still_there(fd, path):
            return fd
        os.close(fd)  # locked a file that was deleted meanwhile: lock the new one


def _is_locked(path: Path, *, exclusive: bool = False) -> bool:
    """Whether another open file holds a lock on ``path`` that a probe's shared lock (or, ``exclusive``,
    its exclusive lock: then shared holders count too) cannot join; a file that does not exist is not."""
    if fcntl is None:
        return False
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # also drops the probe's lock
    return False


def _write_info(fd: int, info: WriterInfo) -> None:
    data = info.to_json().encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)


def _read_info(path: Path) -> WriterInfo | None:
    try:
        return WriterInfo.from_text(path.read_text())
    except OSError:
        return None


# ---- writers and removers ------------------------------------------------------------------
def live_writers(folder: Path) -> list[WriterInfo]:
    """The processes writing the embedding of ``folder`` now (dead writers' files are skipped)."""
    found = []
    for path in sorted(folder.glob("writer-*.json")):
        if _is_locked(path):
            info = _read_info(path)
            if info is not None:
                found.append(info)
    return found


def recorded_writers(folder: Path) -> list[WriterInfo]:
    """Every process named in ``folder``'s writer and chunk-claim files, alive or dead (for a listing)."""
    found = [_read_info(path) for path in sorted([*folder.glob("writer-*.json"), *folder.glob("chunk-*.lock")])]
    return [info for info in found if info is not None]


def can_tell_holders() -> bool:
    """Whether this platform's file locks tell a held lock folder from an abandoned one (not on Windows)."""
    return fcntl is not None


@contextlib.contextmanager
def exclusive(folder: Path, embedding_id: str, *, wait_s: float, doing: str) -> Iterator[None]:
    """Hold the embedding's job lock exclusively: no job writes it meanwhile.

    Raises
    ------
    EmbeddingBusyError
        A job kept writing it for ``wait_s`` seconds; the message names the jobs.
    """
    path = folder / _JOB_LOCK
    fd = _lock(path, exclusive=True, wait_s=wait_s)
    if fd is None:
        writers = live_writers(folder)
        who = "; ".join(w.describe() for w in writers) or "a process that is just starting or finishing"
        waited = f" (waited {wait_s:g} s)" if wait_s > 0 else ""
        msg = (f"Cannot {doing} embedding {embedding_id}: a job is writing it{waited}: {who}. Wait for it to finish, "
               f"or stop it first (kill PID); to wait here instead, pass --wait SECONDS (wait_s= in Python).")
        raise EmbeddingBusyError(msg, writers)
    try:
        yield
    finally:
        os.close(fd)


def try_exclusive(folder: Path) -> int | None:
    """The job lock held exclusively (a file descriptor for :func:`release`), or None when a job holds it now."""
    return _lock(folder / _JOB_LOCK, exclusive=True, wait_s=0.0)


def lock_waiting(path: Path, *, note_every_s: float, note: Callable[[WriterInfo | None], None]) -> int:
    """Lock ``path`` exclusively, waiting as long as it takes; ``note(holder)`` every ``note_every_s`` seconds of waiting.

    The lock file holds this process's :class:`WriterInfo`, which the notes of other waiters name.
    Returns the file descriptor for :func:`unlock_and_delete`.
    """
    while True:
        fd = _lock(path, exclusive=True, wait_s=note_every_s)
        if fd is not None:
            _write_info(fd, WriterInfo.here())
            return fd
        note(_read_info(path))


def unlock_and_delete(path: Path, fd: int) -> None:
    """Delete a lock file taken with :func:`lock_waiting` and release it (a waiter then locks a fresh one)."""
    path.unlink(missing_ok=True)
    os.close(fd)


def in_use(folder: Path) -> bool:
    """Whether a process holds the job lock of ``folder`` now (a job, a creator or a remover); creates nothing."""
    return _is_locked(folder / _JOB_LOCK, exclusive=True)


def release(fd: int) -> None:
    """Release a lock taken with :func:`try_exclusive`."""
    os.close(fd)


def forget(folder: Path) -> None:
    """Delete an embedding's lock folder; call it while holding :func:`exclusive`."""
    for path in folder.glob("*"):
        if path.name != _JOB_LOCK:
            path.unlink(missing_ok=True)
    (folder / _JOB_LOCK).unlink(missing_ok=True)  # a job waiting for it locks a fresh file, see _lock
    with contextlib.suppress(OSError):
        folder.rmdir()


class JobLease:
    """This process writes one embedding: the shared job lock, its writer file and its chunk claims.

    Close it (or use it as a context manager) when the job ends; a process that dies drops
    everything it held.
    """

    def __init__(self, folder: Path, embedding_id: str, *, wait_s: float) -> None:
        self.folder = folder
        self.embedding_id = embedding_id
        self.info = WriterInfo.here()
        self._claims: dict[int, int] = {}
        fd = _lock(folder / _JOB_LOCK, exclusive=False, wait_s=wait_s)
        if fd is None:
            msg = (f"Embedding {embedding_id} is being created or removed by another process and stayed so for "
                   f"{wait_s:g} s; run the command again.")
            raise EmbeddingBusyError(msg, [])
        self._job_fd: int | None = fd
        name = f"writer-{_safe(self.info.host)}-{self.info.pid}-{next(_SEQ)}.json"
        self._writer_path = folder / name
        self._writer_fd: int | None = _lock(self._writer_path, exclusive=True, wait_s=0.0)
        if self._writer_fd is not None:
            _write_info(self._writer_fd, self.info)

    def __enter__(self) -> JobLease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._job_fd is None

    # ---- chunk claims ----------------------------------------------------------------------
    def _chunk_path(self, chunk: int) -> Path:
        return self.folder / f"chunk-{int(chunk)}.lock"

    def holds(self, chunk: int) -> bool:
        return int(chunk) in self._claims

    def try_claim(self, chunk: int) -> bool:
        """Claim ``chunk`` for this process unless a live process holds it (never waits)."""
        chunk = int(chunk)
        if chunk in self._claims:
            return True
        if self._job_fd is None:
            msg = f"The job lease on embedding {self.embedding_id} is closed; open a new one to claim chunks."
            raise ScdmError(msg)
        fd = _lock(self._chunk_path(chunk), exclusive=True, wait_s=0.0)
        if fd is None:
            return False
        _write_info(fd, self.info)
        self._claims[chunk] = fd
        return True

    def release(self, chunk: int) -> None:
        """Give up the claim on ``chunk`` (no-op if not held); its lock file goes with it."""
        fd = self._claims.pop(int(chunk), None)
        if fd is None:
            return
        self._chunk_path(chunk).unlink(missing_ok=True)  # while locked: see the module notes
        os.close(fd)

    def holder(self, chunk: int) -> WriterInfo | None:
        """Who holds the claim on ``chunk`` now (None when nobody does, or it cannot be told)."""
        path = self._chunk_path(chunk)
        if int(chunk) in self._claims or not _is_locked(path):
            return None
        return _read_info(path)

    # ---- end -------------------------------------------------------------------------------
    def close(self) -> None:
        """Release every claim and the job lock; tidy the lock folder when no other job uses it."""
        for chunk in list(self._claims):
            self.release(chunk)
        if self._writer_fd is not None:
            self._writer_path.unlink(missing_ok=True)
            os.close(self._writer_fd)
            self._writer_fd = None
        if self._job_fd is None:
            return
        os.close(self._job_fd)
        self._job_fd = None
        tidy = _lock(self.folder / _JOB_LOCK, exclusive=True, wait_s=0.0) if fcntl is not None else None
        if tidy is not None:  # no other job (and no remover) uses the folder: leave nothing behind
            try:
                forget(self.folder)
            finally:
                os.close(tidy)


def safe_name(text: str) -> str:
    """``text`` (a host name) with only letters, digits and ``-_.``, for a file name."""
    return _safe(text)


def _safe(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in text)[:64] or "host"
