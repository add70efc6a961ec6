"""What interrupted or half-undone work leaves in a store folder, and when it is safe to delete.

Two kinds of leftovers:

temporaries
    Writers put a file or folder in place by writing it under a hidden temporary name, then
    renaming it: an ingest's copy of the data (``datasets/``), a LoRA adapter folder
    (``artifacts/adapters/``), a trained head's folder (``artifacts/heads/``). A writer killed
    before the rename (kill -9, a full disk, a lost node) leaves the temporary behind. Its name
    says who writes it, ``.<id>.tmp-<pid>-<host>-<tag>`` (:func:`temp_prefix`), so that a
    leftover can be told from a temporary that a live process is still writing.
orphans
    Files or folders in a store's own places that no catalog row names: a dataset copy, an
    embedding array, an adapter, head or transfer-run folder whose row is gone (a process killed
    between placing the files and writing the row, or between deleting the row and the files).
    Nothing reads them; they only take disk.
stale locks
    An embedding's lock folder (``claims/<embedding_id>/``, :mod:`store._claims`) that no process
    holds: its last job was killed before it tidied up (a finished job deletes it). And the empty
    probe file ``.scdm-write-probe-<pid>-<host>-...`` that opening a store writes and deletes at once
    to learn whether the folder is writable, left by a process killed in between.

When a leftover may go (:func:`scan` with ``remove=True``, run by ``scdm verify --repair``):

* a temporary whose writer ran on this host is deleted once that process is gone, and left
  alone while it runs (its pid exists);
* a temporary of another host (a store on a shared disk), or one named before names carried the
  writer, is deleted once it has not changed for :data:`GRACE_S`: every writer keeps writing to
  its temporary until the rename, so one untouched that long has no writer;
* an embedding array without a row is deleted unless a process holds the embedding's job lock
  (a creator makes the array before its row, under that lock; see :mod:`store._claims`);
* any other orphan is deleted once it has not changed for :data:`GRACE_S`: a writer registers
  its row right after placing its files (waiting at most a few minutes for the catalog lock),
  so a younger one may be about to get its row;
* a lock folder is deleted while holding its job lock exclusively, which proves that no job,
  creator or remover uses it (the operating system drops a dead process's locks); a folder a
  process holds is not listed. Where there are no file locks (Windows) it is deleted only when
  every writer it names ran on this host and is gone;
* a write probe is deleted once its process (on this host) is gone, and one of another host, or
  named before names carried the host, once untouched for :data:`GRACE_S` (it lives microseconds).
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from scdm.store import _claims
from scdm.store._constants import ARTIFACTS_DIR, DATASETS_DIR, EMBEDDINGS_DIR
from scdm.store.errors import ScdmError

if TYPE_CHECKING:
    from scdm.store._store import Store

__all__ = ["GRACE_S", "Leftover", "temp_prefix", "write_probe_name", "place_folder", "scan", "describe_size"]

GRACE_S = 3600.0
"""How long a leftover whose writer cannot be asked stays untouched before it counts as abandoned."""
_TEMP = re.compile(r"^\.(?P<id>[0-9a-f]{8,64})\.tmp-(?P<pid>\d+)-(?P<host>[A-Za-z0-9_.-]+)-(?P<tag>[A-Za-z0-9_]+)$")
"""A temporary named by :func:`temp_prefix`."""
_OLD_TEMP = re.compile(r"^\.[0-9a-f]{8,64}(\.tmp-[0-9a-f]{8}|-[A-Za-z0-9_]{8}(\.h5ad\.tmp)?)$")
"""Temporaries of scdm versions whose names did not carry the writer (``.<id>-XXXXXXXX.h5ad.tmp``,
``.<id>.tmp-<hex>``, ``.<id>-XXXXXXXX``)."""
_ARTIFACT_TABLES = {"adapters": ("adapters", "adapter_id", "adapter folder"),
                    "heads": ("trained_heads", "head_id", "trained-head folder"),
                    "transfer": ("transfer_runs", "run_id", "transfer-run folder")}
"""Sub-folder of ``artifacts/`` -> (table, id column, what one folder is)."""
_ORPHAN_ARRAY = "embedding array without a catalog row"
_STALE_CLAIMS = "lock folder of embedding"
_PROBE_PREFIX = ".scdm-write-probe-"
_PROBE = re.compile(r"^\.scdm-write-probe-(?P<pid>\d+)-(?P<host>[A-Za-z0-9_.-]+)-(?P<thread>\d+)-(?P<tag>[0-9a-f]{8})$")
"""A write probe named by :func:`write_probe_name`; older ones were ``.scdm-write-probe-<pid>-<thread>-<tag>``."""


def _host() -> str:
    return _claims.safe_name(platform.node())


def temp_prefix(stem: str) -> str:
    """Name prefix of a temporary that will become ``stem``: ``.<stem>.tmp-<pid>-<host>-`` (a tag follows)."""
    return f".{stem}.tmp-{os.getpid()}-{_host()}-"


def write_probe_name(thread: int) -> str:
    """Name of the empty file that opening a store writes and deletes to learn whether it is writable.

    It names the process and host, so that one left by a killed process can be told from one
    being written now (:func:`scan`).
    """
    return f"{_PROBE_PREFIX}{os.getpid()}-{_host()}-{int(thread)}-{uuid.uuid4().hex[:8]}"


_PLACE_TRIES = 5


def place_folder(tmp: Path, folder: Path, *, same: Callable[[Path], bool], what: str,
                 remedy: str = "Run the command again once they are done.", error: type[ScdmError] = ScdmError) -> bool:
    """Rename the finished temporary ``tmp`` to ``folder``; False where an equal folder was there already.

    The rename is atomic and never lands on a folder with files, so a reader sees the old folder or
    the new one, never a mix. A folder already at ``folder`` is kept when ``same(folder)`` says it
    holds what ``tmp`` holds (another run placed it first; ``tmp`` is then the caller's to drop),
    and otherwise (left by a run that died before its catalog row, or damaged) moved aside under a
    temporary name, atomically too, and replaced.

    Raises
    ------
    OSError
        The rename failed for another reason than a folder in the way (a full disk, a read-only store).
    ScdmError
        (``error``) Other processes kept putting other folders there meanwhile; the message ends with ``remedy``.
    """
    for _ in range(_PLACE_TRIES):
        try:
            os.rename(tmp, folder)
        except OSError:
            if not folder.exists():
                raise
        else:
            return True
        if same(folder):
            return False
        aside = folder.parent / f"{temp_prefix(folder.name)}{uuid.uuid4().hex[:8]}"
        try:
            os.rename(folder, aside)
        except FileNotFoundError:
            continue  # moved by another process meanwhile: try again
        shutil.rmtree(aside, ignore_errors=True)
    msg = f"Could not put {what} in place at {str(folder)!r}: other processes kept putting other files there meanwhile. {remedy}"
    raise error(msg)


@dataclass(frozen=True)
class Leftover:
    """One leftover file or folder, and whether it may be deleted."""

    path: Path
    what: str
    """What it is, in words (``temporary copy of an interrupted ingest``, ``adapter folder without a catalog row``)."""
    size: int
    """Bytes on disk (all files of a folder)."""
    kept: str | None = None
    """Why it is left alone (its writer may be alive); None when it may be deleted."""
    removed: bool = False

    def line(self) -> str:
        state = "deleted" if self.removed else f"left alone: {self.kept}" if self.kept else "`scdm verify --repair` deletes it"
        return f"{self.path}  {self.what}, {describe_size(self.size)} ({state})"


def describe_size(n: int) -> str:
    """Bytes in the largest unit that keeps a number >= 1 (``12.3 MB``)."""
    size = float(n)
    for unit in ("bytes", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{int(size)} bytes" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError  # pragma: no cover


def scan(st: Store, *, remove: bool = False, now: float | None = None) -> list[Leftover]:
    """Every leftover of the store (see the module notes); with ``remove``, delete those that may go."""
    now = time.time() if now is None else now
    arrays = list(_orphan_arrays(st))
    found = [*_temporaries(st.root, now), *_orphan_datasets(st, now), *arrays, *_orphan_artifacts(st, now),
             *_stale_claims(st.root, {a.path.stem for a in arrays}), *_write_probes(st.root, now)]
    found = [_kept_outside(item, st.root) for item in found]
    if not remove:
        return found
    return [_remove(st, item) if item.kept is None else item for item in found]


def _kept_outside(item: Leftover, root: Path) -> Leftover:
    """Keep a leftover whose folder links outside the store: ``--repair`` deletes inside the store only.

    A shared store's ``artifacts/heads`` (or any of its folders) replaced by a link to a home folder
    would otherwise have every folder there deleted as a head without a catalog row.
    """
    where = item.path.parent.resolve()
    if item.kept is not None or where.is_relative_to(root.resolve()):
        return item
    return replace(item, kept=f"its folder links outside the store (to {str(where)!r}); scdm verify --repair deletes "
                              "only inside the store folder")


# ---- temporaries ------------------------------------------------------------------------------
def _temp_folders(root: Path) -> Iterator[tuple[Path, str]]:
    yield root / DATASETS_DIR, "temporary copy of an interrupted ingest"
    yield root / ARTIFACTS_DIR / "adapters", "temporary folder of an interrupted LoRA adapter save"
    yield root / ARTIFACTS_DIR / "heads", "temporary folder of an interrupted trained-head save"


def _temporaries(root: Path, now: float) -> Iterator[Leftover]:
    for folder, what in _temp_folders(root):
        for path in _entries(folder):
            if _TEMP.match(path.name) or _OLD_TEMP.match(path.name):
                yield Leftover(path, what, _size(path), _temp_kept(path, now))


def _temp_kept(path: Path, now: float) -> str | None:
    """Why a temporary must stay (its writer may still write it), or None."""
    return _kept_by_writer(_TEMP.match(path.name), path, now, "that writes it")


def _kept_by_writer(named: re.Match[str] | None, path: Path, now: float, role: str) -> str | None:
    """Why a file named by its writer's host and pid must stay (that writer runs here, or, on another host
    or unnamed, it is too recent to tell), or None."""
    if named and named["host"] == _host():
        pid = int(named["pid"])
        return f"pid {pid} {role} is running" if _alive(pid) else None
    return _too_recent(path, now, f"written by pid {named['pid']} on {named['host']}" if named else "its writer is not named")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except OSError:  # pragma: no cover - a platform that cannot tell: assume it runs
        return True
    return True


def _too_recent(path: Path, now: float, who: str) -> str | None:
    age = now - _newest_change(path)
    if age >= GRACE_S:
        return None
    return f"{who}, changed {age:.0f} s ago; deleted once untouched for {GRACE_S / 3600:g} h"


# ---- orphans ----------------------------------------------------------------------------------
def _orphan_datasets(st: Store, now: float) -> Iterator[Leftover]:
    named = set(st.query("SELECT stored_path FROM datasets")["stored_path"].astype(str))
    for path in _entries(st.root / DATASETS_DIR):
        if path.suffix == ".h5ad" and not path.name.startswith(".") and f"{DATASETS_DIR}/{path.name}" not in named:
            yield Leftover(path, "dataset copy without a catalog row", _size(path),
                           _too_recent(path, now, "an ingest may be about to register it"))


def _orphan_arrays(st: Store) -> Iterator[Leftover]:
    named = set(st.query("SELECT array_path FROM embeddings")["array_path"].astype(str))
    for path in _entries(st.root / EMBEDDINGS_DIR):
        if path.suffix == ".zarr" and not path.name.startswith(".") and f"{EMBEDDINGS_DIR}/{path.name}" not in named:
            busy = _claims.in_use(_claims.claims_folder(st.root, path.stem))
            yield Leftover(path, _ORPHAN_ARRAY, _size(path),
                           "a process holds its embedding (creating or removing it)" if busy else None)


def _orphan_artifacts(st: Store, now: float) -> Iterator[Leftover]:
    for sub, (table, column, what) in _ARTIFACT_TABLES.items():
        folders = [p for p in _entries(st.root / ARTIFACTS_DIR / sub) if p.is_dir() and not p.name.startswith(".")]
        if not folders:
            continue
        named = set(st.query(f"SELECT {column} FROM {table}")[column].astype(str))
        for path in folders:
            if path.name not in named:
                yield Leftover(path, f"{what} without a catalog row", _size(path),
                               _too_recent(path, now, "its job may be about to register it"))


# ---- stale locks ------------------------------------------------------------------------------
def _stale_claims(root: Path, orphan_arrays: set[str]) -> Iterator[Leftover]:
    """Lock folders that no process holds (those of orphan arrays go with their array)."""
    for folder in _entries(root / _claims.CLAIMS_DIR):
        if not folder.is_dir() or folder.name in orphan_arrays or _claims.in_use(folder):
            continue
        writers = _claims.recorded_writers(folder)
        who = "; ".join(sorted({f"pid {w.pid} on {w.host}" for w in writers}))
        what = f"{_STALE_CLAIMS} {folder.name} that no running job holds" + (f" (left by {who})" if who else "")
        yield Leftover(folder, what, _size(folder), _claims_kept(writers))


def _claims_kept(writers: list[_claims.WriterInfo]) -> str | None:
    """Why an unheld-looking lock folder must stay: only where file locks cannot tell (no ``fcntl``)."""
    if _claims.can_tell_holders():
        return None  # in_use() saw no holder, and _remove_claims checks again under the lock
    alive = [w for w in writers if w.host != _host() or _alive(w.pid)]
    if writers and not alive:
        return None
    return "this platform has no file locks to tell whether its job still runs" + (
        f" ({'; '.join(w.describe() for w in alive)})" if alive else "")


def _write_probes(root: Path, now: float) -> Iterator[Leftover]:
    for path in _entries(root):
        if path.name.startswith(_PROBE_PREFIX) and path.is_file():
            yield Leftover(path, "write probe of a process killed while opening the store", _size(path), _probe_kept(path, now))


def _probe_kept(path: Path, now: float) -> str | None:
    return _kept_by_writer(_PROBE.match(path.name), path, now, "that wrote it")


def _remove_claims(item: Leftover) -> Leftover:
    """Delete a lock folder while holding its job lock exclusively: no job, creator or remover holds it then."""
    held = _claims.try_exclusive(item.path) if _claims.can_tell_holders() else None
    if held is None and _claims.can_tell_holders():
        return replace(item, kept="a job took it meanwhile")
    try:
        _claims.forget(item.path)
    finally:
        if held is not None:
            _claims.release(held)
    return replace(item, removed=True)


# ---- deleting ---------------------------------------------------------------------------------
def _remove(st: Store, item: Leftover) -> Leftover:
    """Delete one leftover that may go, checking again just before (a row may have appeared meanwhile)."""
    if item.what == _ORPHAN_ARRAY:
        return _remove_array(st, item)
    if item.what.startswith(_STALE_CLAIMS):
        return _remove_claims(item)
    again = next((x for x in scan(st) if x.path == item.path), None)
    if again is None or again.kept is not None:
        return again or item
    _delete(item.path)
    return replace(item, removed=True)


def _remove_array(st: Store, item: Leftover) -> Leftover:
    """Delete an orphan array while holding its embedding's job lock: no creator or job can start meanwhile."""
    folder = _claims.claims_folder(st.root, item.path.stem)
    held = _claims.try_exclusive(folder)
    if held is None:
        return replace(item, kept="a process holds its embedding (creating or removing it)")
    try:
        rel = f"{EMBEDDINGS_DIR}/{item.path.name}"
        if not st.query("SELECT 1 FROM embeddings WHERE array_path = ?", [rel]).empty:
            return replace(item, kept="its embedding was created meanwhile")
        _delete(item.path)
        _claims.forget(folder)
    finally:
        _claims.release(held)
    return replace(item, removed=True)


def _delete(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


# ---- files ------------------------------------------------------------------------------------
def _entries(folder: Path) -> list[Path]:
    try:
        return sorted(folder.iterdir())
    except OSError:  # missing (a store made before the folder existed) or unreadable
        return []


def _walk(path: Path) -> Iterator[os.stat_result]:
    with contextlib.suppress(OSError):
        yield path.lstat()
    if path.is_dir() and not path.is_symlink():
        for base, _dirs, files in os.walk(path):
            for name in files:
                with contextlib.suppress(OSError):
                    yield os.lstat(os.path.join(base, name))


def _size(path: Path) -> int:
    """Bytes of a file, or of every file in a folder."""
    stats = list(_walk(path))
    return sum(s.st_size for s in (stats[1:] if path.is_dir() else stats))


def _newest_change(path: Path) -> float:
    """Latest modification time of the path and, for a folder, of every file in it."""
    return max((s.st_mtime for s in _walk(path)), default=0.0)
