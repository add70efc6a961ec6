"""Content hashes of files, as scdm records them: one owner for every stage that hashes a file it stores or loads.

The digests are stored (a trained head's ``file_hash``, an adapter's ``adapter_hash``, a checkpoint's
content hash inside every embedding's identity, a report's manifest), and a store written by an older
scdm is checked against them; so each function here hashes exactly as the code it replaced did, and
``tests/store/test_hashing.py`` pins a digest of known bytes for each. The chunk size only bounds the
memory a hash takes: it never changes a digest.

No torch, no numpy: the stages import this without loading either.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from typing import Protocol

__all__ = ["CHUNK_SIZE", "digests_hash", "file_blake2b", "file_sha256"]

CHUNK_SIZE = 1 << 22
"""Bytes read at a time (4 MiB): large enough that a multi-GB checkpoint is not read in tiny calls."""


class _Digest(Protocol):
    def update(self, data: bytes, /) -> None: ...

    def hexdigest(self) -> str: ...


def _file_digest(digest: _Digest, path: str | os.PathLike[str], chunk_size: int) -> str:
    if chunk_size < 1:
        msg = f"chunk_size must be a positive number of bytes, got {chunk_size!r}."
        raise ValueError(msg)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk_size), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: str | os.PathLike[str], *, chunk_size: int = CHUNK_SIZE) -> str:
    """SHA-256 (64 hex digits) of a file's bytes, read in chunks (a report's manifest records these)."""
    return _file_digest(hashlib.sha256(), path, chunk_size)


def file_blake2b(path: str | os.PathLike[str], *, chunk_size: int = CHUNK_SIZE) -> str:
    """blake2b-128 (32 hex digits) of a file's bytes, read in chunks.

    A trained head's ``file_hash``, and each file's digest inside :func:`digests_hash` (an adapter's
    ``adapter_hash``, a checkpoint's content hash).
    """
    return _file_digest(hashlib.blake2b(digest_size=16), path, chunk_size)


def digests_hash(named: Iterable[tuple[str, str]]) -> str:
    """blake2b-128 over ``name\\x1fdigest`` of each (name, hex digest) in the order given: a hash of several
    files (names and contents) from each file's own digest (:func:`file_blake2b`), so a file's digest can
    be cached apart. The caller fixes the order (sorted paths, a fixed list of names)."""
    total = hashlib.blake2b(digest_size=16)
    for name, digest in named:
        total.update(name.encode() + b"\x1f" + digest.encode())
    return total.hexdigest()
