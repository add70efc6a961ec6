"""Background jobs of the server (predictions, uploads, the report): a bounded queue with visible positions.

A job runs in a thread of the server process, so it goes on when the client that started it
disconnects; clients poll ``GET /api/jobs/{id}``. At most ``max_jobs`` jobs run at once, across
all uvicorn workers of one ``scdm serve``: a job takes one of ``max_jobs`` slot files under an
exclusive ``flock`` (released by the kernel if a worker dies) and the rest wait in FIFO order,
their position in the queue shown in their status. Each job's status is a small JSON file in the
server's job folder (not in the store, which may be read-only), so every worker answers for every
job. The folder belongs to one server run and is removed when it stops. Each worker holds a lock of
its own there while it lives: a queued or running job of a worker that died (killed for memory,
restarted) is answered as failed, not as running forever.

A job's record also carries the warnings its work gave, as ``scdm`` prints them on the command
line: scdm's warnings (``warning: ...``) and its logged warnings. They are told apart by the job
whose context gave them (its thread, and the threads its work starts through scdm's pools), so a
job never shows another's; the blocks of scdm's own code that silence or collect warnings act in
their job's context only (:mod:`scdm.store.warning_scopes`), never on a job running beside it.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import json
import logging
import os
import queue
import re
import shutil
import tempfile
import threading
import time
import traceback
import uuid
import warnings
import weakref
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from scdm.store.errors import ScdmError, ScdmWarning
from scdm.store.progress import warning_line
from scdm.store.warning_scopes import receiving

try:  # POSIX: slots shared by the worker processes; elsewhere one process, threads only
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

__all__ = ["JobBoard", "JobFolder", "JobHandle", "JobRecord", "JobNotFoundError", "new_job_id", "remove_abandoned_folders"]

ACTIVE_STATES = ("queued", "running")
_SLOT_POLL_S = 0.1
_JOB_ID = re.compile(r"^[0-9a-f]{12}$")
_KEEP_FINISHED_S = 24 * 3600.0
"""Finished jobs are forgotten after a day (their status files are removed on the next submit)."""


class JobNotFoundError(ScdmError, KeyError):
    """No job with this id in this server run."""


@dataclass(frozen=True)
class JobRecord:
    """The state of one job, as stored and as answered (plus its queue position)."""

    job_id: str
    kind: str
    """predict | upload | report"""
    state: str = "queued"
    """queued | running | done | failed | needs_embedding"""
    stage: str = "queued"
    """What it is doing now, in words."""
    progress: float = 0.0
    """0 to 1."""
    message: str = ""
    """Why it failed, or what to do next."""
    result: dict[str, Any] = field(default_factory=dict)
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    warnings: list[str] = field(default_factory=list)
    """What the job warned of, each line as the ``scdm`` command doing the same work prints it."""
    worker: str = ""
    """The board (one per server worker process) that queued and runs the job: ``<pid>-<hex>``."""
    position: int | None = None
    """1-based place in the queue while queued, else None (computed when read, never stored)."""

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES


class JobHandle:
    """What a job's work function gets: report progress and results (each update is saved at once)."""

    def __init__(self, board: JobBoard, record: JobRecord) -> None:
        self._board = board
        self._record = record
        self._lock = threading.RLock()

    @property
    def job_id(self) -> str:
        return self._record.job_id

    @property
    def record(self) -> JobRecord:
        return self._record

    def update(self, **changes: Any) -> None:
        """Change fields of the job's record (``stage``, ``progress``, ``message``, ``result``, ``state``)."""
        with self._lock:
            self._record = replace(self._record, **changes)
            self._board.save(self._record)

    def warn(self, line: str) -> None:
        """Add a warning to the job's record (once: the command line prints each one once)."""
        with self._lock:
            if line not in self._record.warnings:
                self.update(warnings=[*self._record.warnings, line])


@dataclass
class _Queued:
    handle: JobHandle
    work: Callable[[JobHandle], None]
    on_failure: Callable[[], None] | None


class JobBoard:
    """Runs jobs in at most ``max_jobs`` threads at once and answers their status.

    Parameters
    ----------
    folder : path, optional
        Where status files and slot locks live; shared by the workers of one server. Default: a
        new temporary folder, removed when the board is garbage-collected.
    max_jobs : int, default 1
        Jobs running at once (across every process that shares ``folder``).
    on_dead : callable, optional
        Called with the record of a job found failed because its worker process died (it cleans up
        what that job left: its ``on_failure`` died with the worker).
    """

    def __init__(self, folder: str | os.PathLike[str] | None = None, *, max_jobs: int = 1,
                 on_dead: Callable[[JobRecord], object] | None = None) -> None:
        if max_jobs < 1:
            msg = f"max_jobs={max_jobs} must be at least 1 (jobs running at once)."
            raise ValueError(msg)
        if folder is None:
            folder = tempfile.mkdtemp(prefix="scdm-jobs-")
            weakref.finalize(self, shutil.rmtree, folder, True)
        self.folder = Path(folder)
        (self.folder / "status").mkdir(parents=True, exist_ok=True)
        (self.folder / "slots").mkdir(exist_ok=True)
        (self.folder / "workers").mkdir(exist_ok=True)
        self.max_jobs = max_jobs
        self._on_dead = on_dead
        self.worker = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._alive = self._hold_worker_lock()
        self._queue: queue.Queue[_Queued | None] = queue.Queue()
        self._local_slots = threading.Semaphore(max_jobs)
        self._closed = False
        self._threads = [threading.Thread(target=self._worker, name=f"scdm-job-{i}", daemon=True) for i in range(max_jobs)]
        for thread in self._threads:
            thread.start()

    # ---- submitting and reading ------------------------------------------------------------
    def submit(self, kind: str, work: Callable[[JobHandle], None], *, on_failure: Callable[[], None] | None = None,
               job_id: str | None = None) -> JobRecord:
        """Queue ``work``; ``on_failure`` cleans up after it if it fails or never runs (server stopped)."""
        if self._closed:
            msg = "The server is stopping; submit the job again once it is back."
            raise ScdmError(msg)
        self._forget_old()
        record = JobRecord(job_id or new_job_id(), kind, worker=self.worker)
        handle = JobHandle(self, record)
        self.save(record)
        self._queue.put(_Queued(handle, work, on_failure))
        logger.info("job %s (%s) queued", record.job_id, kind)
        return self.get(record.job_id)

    def get(self, job_id: str) -> JobRecord:
        """The job's current record, with its queue position while queued.

        Raises
        ------
        JobNotFoundError
            No such job in this server run.
        """
        record = self._load(job_id) if _JOB_ID.match(job_id) else None
        if record is None:
            msg = f"No job {job_id!r} in this server run; GET /api/jobs lists them."
            raise JobNotFoundError(msg)
        if record.state == "queued":
            record = replace(record, position=self._position(record))
        return record

    def all(self) -> list[JobRecord]:
        """Every job of this server run, newest first."""
        records = [r for r in (self._load(p.stem) for p in self._status_files()) if r is not None]
        records.sort(key=lambda r: (r.created_at, r.job_id), reverse=True)
        queued = sorted((r for r in records if r.state == "queued"), key=lambda r: (r.created_at, r.job_id))
        place = {r.job_id: i + 1 for i, r in enumerate(queued)}
        return [replace(r, position=place.get(r.job_id)) for r in records]

    def shutdown(self) -> None:
        """Stop taking jobs; jobs that never started are failed and cleaned up. Running jobs are not waited for."""
        self._closed = True
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                self._fail(item, "The server stopped before the job started; submit it again.")
        for _ in self._threads:
            self._queue.put(None)

    # ---- persistence -----------------------------------------------------------------------
    def save(self, record: JobRecord) -> None:
        """Write the record atomically (readers in other workers see the old or the new one)."""
        data = asdict(record)
        data.pop("position")
        path = self._path(record.job_id)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
        tmp.write_text(json.dumps(data, default=str))
        os.replace(tmp, path)

    def _load(self, job_id: str) -> JobRecord | None:
        record = self._read_record(job_id)
        if record is None or not record.active or record.worker == self.worker or not self._worker_died(record.worker):
            return record
        # read again: the worker may have finished the job after the first read and stopped before its lock was tried
        record = self._read_record(job_id)
        if record is not None and record.active:
            # its thread died with its process: nothing will ever finish it, nor take it off the queue
            record = replace(record, state="failed", finished_at=time.time(), message=(
                f"The server worker that {'ran' if record.state == 'running' else 'queued'} this job (process "
                f"{record.worker.split('-')[0]}) stopped before the job finished (killed, or restarted); submit it again."))
            self.save(record)
            if self._on_dead is not None:
                try:
                    self._on_dead(record)
                except Exception:  # noqa: BLE001 - the job reads failed either way
                    logger.exception("job %s: cleaning up after its dead worker failed", record.job_id)
        return record

    def _read_record(self, job_id: str) -> JobRecord | None:
        try:
            data = json.loads(self._path(job_id).read_text())
        except (FileNotFoundError, ValueError):
            return None
        return JobRecord(**data)

    def _hold_worker_lock(self) -> Any:
        """Lock this board's file for as long as the board lives (the kernel releases it when the process dies)."""
        if fcntl is None:
            return None
        fh = open(self.folder / "workers" / f"{self.worker}.lock", "a+")  # noqa: SIM115 - held for the board's life
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        weakref.finalize(self, fh.close)
        return fh

    def _worker_died(self, worker: str) -> bool:
        """Whether the board ``worker`` is gone: its lock file is free (False where it cannot be told)."""
        path = self.folder / "workers" / f"{worker}.lock"
        if fcntl is None or not re.fullmatch(r"[0-9]+-[0-9a-f]{8}", worker) or not path.is_file():
            return False
        with open(path, "a+") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return False
            fcntl.flock(fh, fcntl.LOCK_UN)
        return True

    def _path(self, job_id: str) -> Path:
        return self.folder / "status" / f"{job_id}.json"

    def _status_files(self) -> list[Path]:
        return [p for p in (self.folder / "status").glob("*.json") if _JOB_ID.match(p.stem)]

    def _position(self, record: JobRecord) -> int:
        ahead = 0
        for other in (self._load(p.stem) for p in self._status_files()):
            if other is not None and other.state == "queued" and (other.created_at, other.job_id) < (record.created_at, record.job_id):
                ahead += 1
        return ahead + 1

    def _forget_old(self) -> None:
        cutoff = time.time() - _KEEP_FINISHED_S
        for path in self._status_files():
            record = self._load(path.stem)
            if record is not None and not record.active and (record.finished_at or 0) < cutoff:
                path.unlink(missing_ok=True)

    # ---- running ---------------------------------------------------------------------------
    def _worker(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._closed:
                self._fail(item, "The server stopped before the job started; submit it again.")
                continue
            with self._slot():
                self._run(item)

    @contextlib.contextmanager
    def _slot(self) -> Iterator[None]:
        """Hold one of the ``max_jobs`` slots shared by the server's processes until the job ends."""
        with self._local_slots:
            if fcntl is None:
                yield
                return
            while True:
                for i in range(self.max_jobs):
                    fh = open(self.folder / "slots" / f"slot-{i}.lock", "a+")  # noqa: SIM115 - held while the job runs
                    try:
                        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except OSError:
                        fh.close()
                        continue
                    try:
                        yield
                    finally:
                        fcntl.flock(fh, fcntl.LOCK_UN)
                        fh.close()
                    return
                time.sleep(_SLOT_POLL_S)  # every slot is held by another worker process

    def _run(self, item: _Queued) -> None:
        handle = item.handle
        handle.update(state="running", stage="started", started_at=time.time())
        logger.info("job %s (%s) started", handle.job_id, handle.record.kind)
        _capture_job_warnings()
        running = _RUNNING.set(handle)
        try:
            with receiving(functools.partial(_job_warning, handle)):
                self._work(item)
        finally:
            _RUNNING.reset(running)

    def _work(self, item: _Queued) -> None:
        handle = item.handle
        try:
            item.work(handle)
        except Exception as err:  # noqa: BLE001 - a job's failure is reported in its status, never raised
            message = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
            if not isinstance(err, ScdmError):
                message = f"{type(err).__name__}: {message}"
            logger.warning("job %s (%s) failed: %s", handle.job_id, handle.record.kind, message)
            logger.debug("job traceback:\n%s", traceback.format_exc())
            self._fail(item, message)
            return
        if handle.record.state == "running":
            handle.update(state="done", progress=1.0, finished_at=time.time())
        else:
            handle.update(finished_at=time.time())
        logger.info("job %s (%s) finished: %s", handle.job_id, handle.record.kind, handle.record.state)

    @staticmethod
    def _fail(item: _Queued, message: str) -> None:
        if item.on_failure is not None:
            try:
                item.on_failure()
            except Exception:  # noqa: BLE001 - the job is reported failed either way
                logger.exception("job %s: cleaning up after the failure failed", item.handle.job_id)
        item.handle.update(state="failed", message=message, finished_at=time.time())


def new_job_id() -> str:
    return uuid.uuid4().hex[:12]


# ---- each job's warnings ---------------------------------------------------------------------
_RUNNING: contextvars.ContextVar[JobHandle | None] = contextvars.ContextVar("scdm_job", default=None)
"""The job whose work runs in this thread (each job thread has its own context)."""


class _JobLogHandler(logging.Handler):
    """Adds scdm's logged warnings to the record of the job that logged them (the CLI prints the message alone)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        job = _RUNNING.get()
        if job is not None and record.name != __name__:  # "job ... failed" is the job's message already
            job.warn(self.format(record))
        if not _handled_elsewhere(record, self):
            # this handler must not silence Python's last resort (stderr) in a process that configured no logging
            last = logging.lastResort
            if last is not None and record.levelno >= last.level:
                last.handle(record)


def _handled_elsewhere(record: logging.LogRecord, mine: logging.Handler) -> bool:
    """Whether a handler other than ``mine`` takes ``record`` on its logger's way up."""
    log: logging.Logger | None = logging.getLogger(record.name)
    while log is not None:
        if any(h is not mine for h in log.handlers):
            return True
        log = log.parent if log.propagate else None
    return False


_LOG_HANDLER = _JobLogHandler()


def _job_warning(job: JobHandle, shown: warnings.WarningMessage) -> None:
    """The job's record gets the scdm warnings its work shows, in the words ``scdm`` prints them."""
    if issubclass(shown.category, ScdmWarning):
        job.warn(warning_line(shown.message))


def _capture_job_warnings() -> None:
    """Route the logged warnings of a job's work to its record (:func:`receiving` routes its warnings); the
    server's log still gets them.

    Checked at every job's start rather than once: the server runs in whatever state its host
    (``scdm serve``, a test, a notebook) left. ``always``, as ``scdm`` commands do: Python's
    default shows a warning once per code line and process, so a second job on the same data
    would not get it.
    """
    if warnings.filters[:1] != [("always", None, ScdmWarning, None, 0)]:
        warnings.filterwarnings("always", category=ScdmWarning)
    scdm_logger = logging.getLogger("scdm")
    if _LOG_HANDLER not in scdm_logger.handlers:
        scdm_logger.addHandler(_LOG_HANDLER)


# ---- folders a job owns (an upload's file) ---------------------------------------------------
class JobFolder:
    """``<parent>/<job id>/``, held by this process under the lock ``<parent>/.<job id>.lock`` until :meth:`remove`.

    The lock is taken before the folder exists and the kernel releases it when the process dies, so
    :func:`remove_abandoned_folders` tells a running job's folder (locked) from a dead worker's (free).
    """

    def __init__(self, parent: str | os.PathLike[str], job_id: str) -> None:
        if not _JOB_ID.match(job_id):
            msg = f"Job id {job_id!r} is not one of this server's (12 hex digits)."
            raise ValueError(msg)
        self.path = Path(parent) / job_id
        self._lock_path = Path(parent) / f".{job_id}.lock"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = _lock_exclusively(self._lock_path, wait=True)

    def remove(self) -> None:
        """Remove the folder and its lock (again: nothing)."""
        shutil.rmtree(self.path, ignore_errors=True)
        if self._lock is not None:
            self._lock_path.unlink(missing_ok=True)
            self._lock.close()  # releases the lock
            self._lock = None


def remove_abandoned_folders(parent: str | os.PathLike[str], job_ids: list[str] | None = None) -> list[Path]:
    """Remove the job folders under ``parent`` (those of ``job_ids`` only, when given) that no living process holds.

    A job's folder outlives it when its worker process died (killed, restarted) before the job
    ended; a folder that a running job holds (:class:`JobFolder`) is never removed. Returns the
    removed folders. Without ``fcntl`` (Windows) nothing can be told apart and nothing is removed.
    """
    parent = Path(parent)
    if fcntl is None or not parent.is_dir():
        return []
    names = job_ids if job_ids is not None else [p.name for p in parent.iterdir() if p.is_dir() and _JOB_ID.match(p.name)]
    removed = []
    for name in names:
        folder, lock_path = parent / name, parent / f".{name}.lock"
        if not _JOB_ID.match(name) or not folder.is_dir():
            continue
        lock = _lock_exclusively(lock_path, wait=False)
        if lock is None:  # held: its job is running
            continue
        with lock:
            shutil.rmtree(folder, ignore_errors=True)
            lock_path.unlink(missing_ok=True)
        removed.append(folder)
        logger.info("removed %s: its job's server worker stopped before the job ended", folder)
    if job_ids is None:  # locks left without their folder (a worker died between the two): a creator re-opens a removed one
        for lock_path in parent.glob(".*.lock"):
            name = lock_path.name[1:-len(".lock")]
            if _JOB_ID.match(name) and not (parent / name).exists() and (lock := _lock_exclusively(lock_path, wait=False)):
                with lock:
                    lock_path.unlink(missing_ok=True)
    return removed


def _lock_exclusively(path: Path, *, wait: bool) -> Any:
    """``path`` opened and locked (``flock``), re-opened while another process removed it meanwhile; None if it
    is held (``wait=False``) or where files cannot be locked."""
    if fcntl is None:
        return None
    while True:
        fh = open(path, "a+")  # noqa: SIM115 - held by the caller
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except OSError:
            fh.close()
            return None
        try:
            same = os.stat(path).st_ino == os.fstat(fh.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fh
        fh.close()  # the lock of a file another process removed after our open: lock the new one
