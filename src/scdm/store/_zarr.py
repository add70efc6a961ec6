"""Embedding matrices as Zarr v3 arrays: rows = cells, one chunk = one block of whole rows.

Arrays are plain Zarr v3 that any Zarr client can open. Because the default layout is
uncompressed with full-width row chunks, a chunk file is the chunk's rows as raw little-endian
bytes (the edge chunk padded to full size with the fill value, as zarr-python writes it). Writes
and reads use that directly: a chunk is written to a temporary file next to its key and renamed
into place (atomic, as zarr-python's local store does), with its CRC-32 computed on each piece
just before the piece is written (still in the CPU cache); reads fill one preallocated output
with ``readinto`` per chunk and hash each piece as it arrives (or use a memory map for row
subsets). That is several times faster than the generic codec pipeline and its writer threads.
Arrays with codecs, and remote URLs, go through zarr-python.

An array's location is a local path or an fsspec URL (``file:///shared/x.zarr``,
``s3://bucket/prefix/x.zarr``), so that workers on other machines can write and read the same
array. ``file://`` URLs are local paths (same atomic writes and raw reads); other schemes go
through :class:`zarr.storage.FsspecStore` and are read with zarr-python.

Reads can be *verified*: given the committed checksum of each chunk, every chunk a read touches
is checked against it, and a missing, truncated or altered chunk file raises
:class:`~store.errors.ChunkCorruptError` instead of coming back as data (a deleted chunk file
would otherwise read as zeros, the fill value). A chunk verified once in this process is not
hashed again while its file is unchanged (same inode, size, mtime and ctime).

Reads, verifications and writes can also be given the array's :class:`ArraySpec` (what the
catalog records: rows, dimensions, data type, rows per chunk). The array's own ``zarr.json`` is
then checked against it first, and a missing, unreadable or disagreeing metadata file raises
:class:`~store.errors.ArrayMetadataError`: the checksums cover the chunk bytes, not how they are
interpreted, so an edited shape or data type would otherwise turn good bytes into other rows or
numbers. :func:`write_metadata` rewrites the file from the spec.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import uuid
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import unquote, urlparse

import numpy as np

from scdm.store._constants import (
    ARRAY_FORMAT_VERSION,
    EMBEDDING_ENCODING,
    ENCODING_ATTR,
    TARGET_CHUNK_BYTES,
    VERSION_ATTR,
)
from scdm.store.errors import ArrayMetadataError, ChunkCorruptError, InputDataError, StoreFormatError
from scdm.store.warning_scopes import in_context

if TYPE_CHECKING:
    from zarr.codecs.blosc import CName

__all__ = [
    "ArrayLocation",
    "ArraySpec",
    "metadata_file",
    "metadata_problem",
    "check_metadata",
    "write_metadata",
    "partial_files",
    "remove_partials",
    "default_chunk_rows",
    "create_array",
    "write_rows",
    "RowWriter",
    "read_rows",
    "chunk_checksum",
    "checksum_matches",
    "verify_chunks",
    "open_array",
    "array_exists",
    "chunk_present",
    "chunks_present",
    "NonFiniteError",
    "remove_array",
    "remove_chunk",
    "forget_verified",
    "local_path",
    "check_arrays_url",
]

logger = logging.getLogger(__name__)

DTYPES = ("float32", "float16")

_PIECE = 1 << 20
"""Bytes per ``readinto`` on the raw read path; each piece is hashed while it is in cache (measured
on a 2-core EPYC: 1 MiB pieces verify a full read at ~1.1x np.load, whole-chunk reads then hashing at ~1.4x)."""
_WRITE_PIECE = 512 << 10
"""Bytes per ``write`` on the raw write path: a piece stays in the core's L2 cache from its NaN/inf
check through its CRC-32 to the kernel's copy (1-2 MiB L2 on current x86 cores). On a 2-core Xeon
(2 MiB L2), one thread writing 195 MB of chunk files took 1.44x np.save with 512 KiB pieces against
1.77x with 4 MiB (1.27x against 1.56x for 638 MB on tmpfs); the checks themselves cost ~0.35x."""


def _pick_crc32() -> Callable[..., int]:
    """zlib-ng's CRC-32 (same values as zlib's, ~4x faster with carry-less multiply) when installed."""
    try:
        from zlib_ng import zlib_ng
    except ImportError:
        return zlib.crc32
    return cast("Callable[..., int]", zlib_ng.crc32)


_crc32 = _pick_crc32()


def _pick_fallocate() -> Callable[[int, int], None]:
    """Linux's ``fallocate(fd, 0, 0, n)`` through libc, errors ignored (numpy's ``tofile`` does the same).

    Not ``os.posix_fallocate``: where a filesystem cannot reserve blocks (NFS, some FUSE mounts)
    glibc emulates it by writing into every block, which costs more than it saves.
    """
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        call = libc.fallocate
    except (OSError, AttributeError):  # not glibc/musl (macOS, Windows): nothing to reserve with
        return lambda fd, nbytes: None
    call.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
    call.restype = ctypes.c_int

    def reserve(fd: int, nbytes: int) -> None:
        call(fd, 0, 0, nbytes)  # -1 (EOPNOTSUPP, ...): the writes allocate as they go

    return reserve


_reserve = _pick_fallocate()
"""Reserves a new chunk file's blocks in one extent before it is written: on ext4 the 20 chunk files
of a 326,751 x 512 float32 matrix took 1.65x np.save's time written as they grew, 1.25x reserved
first (``benchmarks/bench_store.py --data-path``; np.save reserves too). A checked read straight
after is no slower there; with another 638 MB written in between (bench_store's full rounds) the
first read measured slower on that 2-core VM (median 1.24x np.load against 0.97x)."""

ArrayLocation = Path | str
"""A local path, or a URL with a scheme (``file://``, ``s3://``, ``gs://``, ``memory://``, ...)."""


def local_path(location: ArrayLocation) -> Path | None:
    """The local path of ``location`` (plain paths and ``file://`` URLs), or None for remote URLs."""
    if isinstance(location, Path):
        return location
    if "://" not in location:
        return Path(location)
    parsed = urlparse(location)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            msg = f"file:// URLs name a path on this machine: use file:///path (three slashes), not {location!r}."
            raise InputDataError(msg)
        return Path(unquote(parsed.path))
    return None


def check_arrays_url(url: str) -> str:
    """Validate a folder URL for embedding arrays; a plain path becomes a ``file://`` URL.

    Raises
    ------
    InputDataError
        If the scheme is unknown to fsspec or its backend package is not installed.
    """
    if "://" not in url:
        return Path(url).expanduser().resolve().as_uri()
    import fsspec

    scheme = url.split("://", 1)[0]
    try:
        fsspec.get_filesystem_class(scheme)
    except ValueError as err:
        msg = f"Unknown storage scheme {scheme!r} in arrays URL {url!r}. Use file:///shared/path, s3://bucket/prefix, gs://..., or a plain path."
        raise InputDataError(msg) from err
    except ImportError as err:
        msg = f"Arrays URL {url!r} needs the fsspec backend for {scheme}:// ({err}). Install it (s3fs for s3://, gcsfs for gs://, adlfs for az://)."
        raise InputDataError(msg) from err
    return url.rstrip("/")


def _fsspec_store(url: str, *, read_only: bool) -> Any:
    from zarr.storage import FsspecStore

    try:
        return FsspecStore.from_url(url, read_only=read_only)
    except ImportError as err:
        msg = f"Cannot open the array at {url!r}: its fsspec backend is missing ({err}). Install it (s3fs for s3://, gcsfs for gs://)."
        raise StoreFormatError(msg) from err


def array_exists(location: ArrayLocation) -> bool:
    """Whether an array (its ``zarr.json``) exists at ``location``."""
    path = local_path(location)
    if path is not None:
        return path.exists()
    import fsspec

    fs, root = fsspec.core.url_to_fs(str(location))
    return bool(fs.exists(f"{root.rstrip('/')}/zarr.json"))


def chunk_present(location: ArrayLocation, chunk: int) -> bool:
    """Whether row-chunk ``chunk`` of the array has a chunk file (absent chunks read as zeros)."""
    return chunks_present(location, [chunk])[0]


def chunks_present(location: ArrayLocation, chunks: Sequence[int]) -> list[bool]:
    """:func:`chunk_present` of each of ``chunks`` (the array's metadata read once)."""
    path = local_path(location)
    if path is not None:
        layout = _RawLayout(path)
        return [layout.chunk_file(c).exists() for c in chunks]
    import fsspec

    fs, root = fsspec.core.url_to_fs(str(location))
    return [bool(fs.exists(f"{root.rstrip('/')}/c/{c}/0")) for c in chunks]


def remove_chunk(location: ArrayLocation, chunk: int) -> None:
    """Delete the file of row-chunk ``chunk`` (no error if it is gone); it then reads as the fill value."""
    path = local_path(location)
    if path is not None:
        try:
            file = _RawLayout(path).chunk_file(chunk)
        except ArrayMetadataError:  # no usable zarr.json: the key scdm writes (default encoding)
            file = path / "c" / str(chunk) / "0"
        file.unlink(missing_ok=True)
        forget_verified(location)
        return
    import fsspec

    fs, root = fsspec.core.url_to_fs(str(location))
    key = f"{root.rstrip('/')}/c/{chunk}/0"
    if fs.exists(key):
        fs.rm(key)


def remove_array(location: ArrayLocation) -> None:
    """Delete the array at ``location`` (no error if it is gone)."""
    import shutil

    path = local_path(location)
    if path is not None:
        shutil.rmtree(path, ignore_errors=True)
        return
    import fsspec

    fs, root = fsspec.core.url_to_fs(str(location))
    if fs.exists(root):
        fs.rm(root, recursive=True)


def default_chunk_rows(dim: int, dtype: str = "float32", target_bytes: int = TARGET_CHUNK_BYTES) -> int:
    """Rows per chunk so that one chunk is about ``target_bytes`` (a power of two, 256..65536)."""
    itemsize = np.dtype(dtype).itemsize
    rows = target_bytes / max(1, dim * itemsize)
    return int(min(65536, max(256, 2 ** round(math.log2(max(rows, 1))))))


def create_array(location: ArrayLocation, *, n_rows: int, dim: int, dtype: str, chunk_rows: int, compressor: str | None = None, attrs: dict[str, Any] | None = None) -> None:
    """Create (or reopen, if its shape matches) the Zarr v3 array of one embedding."""
    import zarr

    if dtype not in DTYPES:
        msg = f"Embedding dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}."
        raise InputDataError(msg)
    if array_exists(location):
        arr = open_array(location)
        if arr.shape != (n_rows, dim) or arr.chunks[0] != chunk_rows:
            msg = (
                f"An array already exists at {str(location)!r} with shape {arr.shape} and chunks {arr.chunks}, "
                f"not ({n_rows}, {dim}) / {chunk_rows} rows. Remove the embedding (scdm rm) and recompute it."
            )
            raise StoreFormatError(msg)
        return
    compressors: Any = None
    if compressor:
        from zarr.codecs import BloscCodec, ZstdCodec

        # BloscCodec itself rejects a name that is not one of its codecs
        compressors = ZstdCodec(level=3) if compressor == "zstd" else BloscCodec(cname=cast("CName", compressor))
    all_attrs = {ENCODING_ATTR: EMBEDDING_ENCODING, VERSION_ATTR: ARRAY_FORMAT_VERSION, **(attrs or {})}
    path = local_path(location)
    zarr.create_array(
        store=str(path) if path is not None else _fsspec_store(str(location), read_only=False),
        shape=(n_rows, dim),
        chunks=(chunk_rows, dim),
        dtype=dtype,
        compressors=compressors,
        filters=None,
        fill_value=0,
        attributes=all_attrs,
        zarr_format=3,
    )


def open_array(location: ArrayLocation, spec: ArraySpec | None = None) -> Any:
    """Open an embedding array (local path or URL), refusing arrays of a newer scdm format.

    With ``spec``, its metadata is checked against the catalog first (:func:`check_metadata`).
    """
    import zarr

    if spec is not None:
        check_metadata(location, spec)
    path = local_path(location)
    if path is not None:
        arr = zarr.open_array(str(path), mode="r+" if os.access(path, os.W_OK) else "r")
    else:
        arr = zarr.open_array(store=_fsspec_store(str(location), read_only=False), mode="r+")
    version: Any = arr.attrs.get(VERSION_ATTR, 1)  # a JSON value: the int scdm wrote
    if int(version) > ARRAY_FORMAT_VERSION:
        msg = (
            f"The array {str(location)!r} has scdm format version {version}; this scdm reads up to "
            f"{ARRAY_FORMAT_VERSION}. Upgrade scdm to read it."
        )
        raise StoreFormatError(msg)
    return arr


# ---- the array's metadata against the catalog ------------------------------------------------
@dataclass(frozen=True)
class ArraySpec:
    """What the catalog records of an embedding array, and so what its ``zarr.json`` must say."""

    n_rows: int
    dim: int
    dtype: str
    chunk_rows: int

    def wanted(self) -> dict[str, Any]:
        """The metadata fields that must match, as :func:`_found_fields` reads them."""
        return {"shape": (self.n_rows, self.dim), "data type": self.dtype, "chunk shape": (self.chunk_rows, self.dim)}


def metadata_file(location: ArrayLocation) -> str:
    """The array's ``zarr.json`` (its path, or its key under a URL)."""
    path = local_path(location)
    return str(path / "zarr.json") if path is not None else f"{str(location).rstrip('/')}/zarr.json"


def _metadata_error(location: ArrayLocation, detail: str) -> ArrayMetadataError:
    key = metadata_file(location)
    return ArrayMetadataError(f"The array metadata file {key!r} {detail}.", path=key, detail=detail)


def _load_metadata(location: ArrayLocation) -> dict[str, Any]:
    """The parsed ``zarr.json`` of the array; a missing or unparsable one is :class:`ArrayMetadataError`."""
    path = local_path(location)
    try:
        if path is not None:
            raw = (path / "zarr.json").read_bytes()
        else:
            import fsspec

            fs, root = fsspec.core.url_to_fs(str(location))
            raw = fs.cat_file(f"{root.rstrip('/')}/zarr.json")
    except FileNotFoundError:
        raise _metadata_error(location, "is missing (without it the chunk files cannot be read)") from None
    try:
        meta = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as err:
        raise _metadata_error(location, f"is not valid JSON ({err})") from None
    if not isinstance(meta, dict):
        raise _metadata_error(location, f"holds a JSON {type(meta).__name__}, not an object")
    return meta


def _found_fields(meta: Mapping[str, Any]) -> dict[str, Any]:
    """Shape, data type and chunk shape as ``zarr.json`` states them (KeyError/TypeError/ValueError if absent)."""
    return {"shape": tuple(int(n) for n in meta["shape"]), "data type": str(meta["data_type"]),
            "chunk shape": tuple(int(n) for n in meta["chunk_grid"]["configuration"]["chunk_shape"])}


def _spec_problem(meta: Mapping[str, Any], spec: ArraySpec) -> str | None:
    """What in ``meta`` disagrees with ``spec`` (None when shape, data type and chunk shape all match)."""
    try:
        found = _found_fields(meta)
    except (KeyError, TypeError, ValueError, IndexError) as err:
        return f"has no readable shape, data type or chunk shape ({type(err).__name__}: {err})"
    want = spec.wanted()
    wrong = [f"{name} {found[name]} where the catalog records {want[name]}" for name in want if found[name] != want[name]]
    if wrong:
        return f"disagrees with the catalog: it says {'; '.join(wrong)}"
    return _codec_problem(meta)


def _codec_problem(meta: Mapping[str, Any]) -> str | None:
    """A codec zarr-python cannot decode (an edited file: scdm writes bytes, zstd or blosc), else None."""
    from zarr.registry import get_codec_class

    codecs = meta.get("codecs", [])
    names = [c.get("name") if isinstance(c, dict) else c for c in codecs] if isinstance(codecs, list) else [codecs]
    for name in names:
        try:
            get_codec_class(str(name))
        except KeyError:
            return f"names a codec {name!r} that this zarr cannot decode"
    return None


def metadata_problem(location: ArrayLocation, spec: ArraySpec) -> str | None:
    """What is wrong with the array's ``zarr.json`` against the catalog's ``spec`` (None when nothing is).

    The answer completes the sentence "The array metadata file ... ": missing, not valid JSON, or
    which of shape, data type and chunk shape disagree.
    """
    try:
        return _spec_problem(_load_metadata(location), spec)
    except ArrayMetadataError as err:
        return err.detail


def check_metadata(location: ArrayLocation, spec: ArraySpec) -> None:
    """Refuse an array whose ``zarr.json`` is missing, unreadable or disagrees with the catalog's ``spec``.

    Raises
    ------
    ArrayMetadataError
        Naming the file and what is wrong with it.
    """
    problem = metadata_problem(location, spec)
    if problem is not None:
        raise _metadata_error(location, problem)


def write_metadata(location: ArrayLocation, spec: ArraySpec, attrs: dict[str, Any] | None = None) -> None:
    """Replace the array's ``zarr.json`` by the one :func:`create_array` writes for ``spec`` (chunk files are kept).

    The rewritten array is uncompressed (the catalog does not record a compressor): the chunk files
    of a compressed array then fail verification and are recomputed like any damaged chunk. The
    new file is written next to the old one and renamed over it, so a reader sees one or the other.
    """
    import tempfile

    with tempfile.TemporaryDirectory(prefix="scdm-meta-") as tmp:
        fresh = Path(tmp) / "array"
        create_array(fresh, n_rows=spec.n_rows, dim=spec.dim, dtype=spec.dtype, chunk_rows=spec.chunk_rows, attrs=attrs)
        data = (fresh / "zarr.json").read_bytes()
    path = local_path(location)
    if path is None:
        import fsspec

        fs, root = fsspec.core.url_to_fs(str(location))
        fs.pipe_file(f"{root.rstrip('/')}/zarr.json", data)
        return
    path.mkdir(parents=True, exist_ok=True)
    tmp_file = path / f"zarr.json.{uuid.uuid4().hex}.partial"
    try:
        tmp_file.write_bytes(data)
        os.replace(tmp_file, path / "zarr.json")
    except BaseException:
        tmp_file.unlink(missing_ok=True)
        raise
    forget_verified(location)


# ---- temporary files of interrupted writes ---------------------------------------------------
def partial_files(location: ArrayLocation) -> list[Path]:
    """The temporary ``*.partial`` files in a local array (none for remote arrays).

    A writer renames its temporary file over the chunk key as soon as the data is written; one
    still there belongs to a write in progress or to a writer that was killed in between. Only
    the caller can tell which (the store looks only while no job writes the embedding).
    """
    path = local_path(location)
    if path is None or not path.is_dir():
        return []
    return sorted([*path.glob("*.partial"), *path.glob("c/*/*.partial")])


def remove_partials(location: ArrayLocation) -> list[Path]:
    """Delete the :func:`partial_files` of a local array, and chunk folders left empty; the files deleted.

    Call it only while no process writes the array (a writer's temporary file would vanish before
    its rename).
    """
    path = local_path(location)
    removed = partial_files(location)
    for file in removed:
        file.unlink(missing_ok=True)
        if file.parent != path:
            with contextlib.suppress(OSError):
                file.parent.rmdir()  # a chunk folder, only when empty: the chunk's own file keeps it
    return removed


def chunk_checksum(block: np.ndarray) -> str:
    """CRC-32 of a block's bytes as stored (C order): detects torn or corrupted chunk files.

    CRC-32 runs at several GB/s (blake2b at ~0.7 GB/s would dominate writing); it guards against
    accidents, not tampering.
    """
    return f"crc32:{_crc32(np.ascontiguousarray(block).data.cast('B')):08x}"


def checksum_matches(data: Any, expected: str) -> bool:
    """Whether the bytes of ``data`` (a C-contiguous buffer) have the committed checksum ``expected``.

    ``crc32:<hex>`` is what :func:`chunk_checksum` writes; a bare hex digest is the blake2b-128 of
    stores written before CRC-32 was adopted.
    """
    view = memoryview(data).cast("B")
    if expected.startswith("crc32:"):
        return f"crc32:{_crc32(view):08x}" == expected
    import hashlib

    return hashlib.blake2b(view, digest_size=16).hexdigest() == expected


@lru_cache(maxsize=64)
def _zeros_crc32(n_bytes: int) -> str:
    """The :func:`chunk_checksum` of ``n_bytes`` zero bytes."""
    return f"crc32:{_crc32(bytes(n_bytes)):08x}"


def _zeros_match(n_bytes: int, expected: str) -> bool:
    """Whether ``n_bytes`` zero bytes have checksum ``expected`` (an all-zero chunk has no file)."""
    if expected.startswith("crc32:"):
        return expected == _zeros_crc32(n_bytes)
    return _zeros_blake2b_match(n_bytes, expected)


@lru_cache(maxsize=64)
def _zeros_blake2b_match(n_bytes: int, expected: str) -> bool:
    return checksum_matches(bytes(n_bytes), expected)


def write_rows(location: ArrayLocation, start: int, block: np.ndarray) -> None:
    """Write ``block`` into rows ``start:start+len(block)`` (each local chunk file is replaced atomically)."""
    arr = open_array(location)
    arr[start:start + block.shape[0]] = block


class RowWriter:
    """Writes whole row-chunks of one array and returns the checksum of each (what is committed).

    Local uncompressed arrays (the default layout) are written directly: the chunk's bytes go to
    a temporary file in the chunk's folder, hashed piece by piece on the way, and the file is
    renamed over the chunk key, so a reader or a crash sees the old chunk or the new one, never
    part of one. The result is the same Zarr v3 chunk zarr-python writes (edge chunk padded with
    the fill value; an all-zero chunk has no file). Other arrays go through zarr-python.
    Safe to use from several threads for different chunks.

    With ``spec`` (the catalog's record of the array), an array whose ``zarr.json`` is missing or
    disagrees with it is refused (:class:`ArrayMetadataError`) before anything is written: chunks
    written in a layout other than the catalog's would not be the rows their checksums claim. An
    ``array`` passed in is taken as opened with that check (:func:`open_array` with ``spec``).
    """

    def __init__(self, location: ArrayLocation, array: Any = None, spec: ArraySpec | None = None) -> None:
        self.location = location
        self._spec = spec
        path = local_path(location)
        layout = _RawLayout(path, spec) if path is not None else None
        self._raw = layout if layout is not None and layout.ok and not layout.fill_value else None
        self._array = array if self._raw is None and array is not None else None

    def write(self, start: int, block: np.ndarray, *, check_finite: bool = False) -> str:
        """Write ``block`` (rows ``start:start+len(block)``, one whole chunk) and return its :func:`chunk_checksum`.

        With ``check_finite``, a block holding NaN or inf raises :class:`NonFiniteError` and nothing
        is written (on the direct path each piece is checked while it is in cache, beside its CRC).
        """
        layout = self._raw
        block = np.ascontiguousarray(block)
        if layout is not None and block.dtype == layout.dtype and block.ndim == 2 and block.shape[1] == layout.shape[1]:
            chunk, offset = divmod(start, layout.chunk_rows)
            if offset == 0 and layout.bounds(chunk) == (start, start + block.shape[0]):
                return _write_raw_chunk(layout, chunk, block, check_finite=check_finite)
        if check_finite and not np.isfinite(block).all():
            raise NonFiniteError(start)
        if self._array is None:
            self._array = open_array(self.location, self._spec)
        checksum = chunk_checksum(block)
        self._array[start:start + block.shape[0]] = block
        return checksum


class NonFiniteError(ValueError):
    """A block to write holds NaN or inf (nothing of it was written)."""

    def __init__(self, start: int) -> None:
        super().__init__(f"the rows from {start} hold NaN or inf")
        self.start = start


def _write_raw_chunk(layout: _RawLayout, chunk: int, block: np.ndarray, *, check_finite: bool = False) -> str:
    """Write one whole chunk's rows as its chunk file (atomic rename); the CRC-32 of the rows."""
    data = memoryview(block.reshape(-1).view(np.uint8).data)  # .data: numpy's stubs lack Buffer
    target = layout.chunk_file(chunk)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.{uuid.uuid4().hex}.partial")  # zarr-python's own temporary names
    crc = 0
    try:
        with open(tmp, "wb", buffering=0) as fh:
            _reserve(fh.fileno(), layout.chunk_nbytes)
            for pos in range(0, len(data), _WRITE_PIECE):
                piece = data[pos:pos + _WRITE_PIECE]
                if check_finite and not np.isfinite(np.frombuffer(piece, dtype=block.dtype)).all():
                    raise NonFiniteError(layout.bounds(chunk)[0])  # before the rename: the chunk file is untouched
                crc = _crc32(piece, crc)  # while the piece is in cache: no second pass over the rows
                while piece:
                    piece = piece[fh.write(piece) or 0:]
            if len(data) < layout.chunk_nbytes:
                fh.truncate(layout.chunk_nbytes)  # the edge chunk's padding: zero bytes, the fill value 0
        checksum = f"crc32:{crc:08x}"
        if _zeros_match(len(data), checksum) and not block.any():
            # an all-zero chunk is not stored (zarr-python's write_empty_chunks=False): it reads as the fill value
            tmp.unlink()
            target.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                target.parent.rmdir()  # the folder too, unless another chunk file or a writer's temporary is in it
        else:
            os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return checksum


class _RawLayout:
    """The raw-bytes layout of an uncompressed, full-width row-chunked Zarr v3 array."""

    def __init__(self, path: Path, spec: ArraySpec | None = None) -> None:
        """The layout ``zarr.json`` states; with ``spec``, an :class:`ArrayMetadataError` where it disagrees with the catalog."""
        meta = _load_metadata(path)
        problem = _spec_problem(meta, spec) if spec is not None else None
        if problem is not None:
            raise _metadata_error(path, problem)
        try:
            self._parse(path, meta)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as err:
            raise _metadata_error(path, f"cannot be read as array metadata ({type(err).__name__}: {err})") from None

    @classmethod
    def from_spec(cls, path: Path, spec: ArraySpec) -> _RawLayout:
        """The layout scdm writes for ``spec`` (uncompressed, little-endian, ``/`` keys), whatever ``zarr.json`` says."""
        layout = cls.__new__(cls)
        layout._parse(path, {"shape": [spec.n_rows, spec.dim], "data_type": spec.dtype, "fill_value": 0,
                             "chunk_grid": {"configuration": {"chunk_shape": [spec.chunk_rows, spec.dim]}},
                             "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}]})
        return layout

    def _parse(self, path: Path, meta: Mapping[str, Any]) -> None:
        self.path = path
        self.shape = tuple(meta["shape"])
        self.chunk_rows = int(meta["chunk_grid"]["configuration"]["chunk_shape"][0])
        chunk_cols = int(meta["chunk_grid"]["configuration"]["chunk_shape"][1])
        codecs = meta.get("codecs", [])
        names = [c["name"] for c in codecs]
        endian = codecs[0].get("configuration", {}).get("endian", "little") if codecs else "little"
        enc = meta.get("chunk_key_encoding", {})
        self.separator = enc.get("configuration", {}).get("separator", "/")
        self.default_keys = enc.get("name", "default") == "default"
        self.dtype = np.dtype(meta["data_type"]).newbyteorder("<")
        self.fill_value = meta.get("fill_value", 0)
        self.ok = names == ["bytes"] and endian == "little" and chunk_cols == self.shape[1] and self.default_keys
        # zarr stores the edge chunk at full size too (padded with the fill value)
        self.chunk_nbytes = self.chunk_rows * chunk_cols * self.dtype.itemsize

    def chunk_file(self, i: int) -> Path:
        return self.path / f"c{self.separator}{i}{self.separator}0"

    def n_chunks(self) -> int:
        return math.ceil(self.shape[0] / self.chunk_rows)

    def bounds(self, i: int) -> tuple[int, int]:
        lo = i * self.chunk_rows
        return lo, min(lo + self.chunk_rows, self.shape[0])


# ---- verified chunks -----------------------------------------------------------------------
Signature = tuple[int, int, int, int]
"""(inode, size, mtime_ns, ctime_ns) of a chunk file: any rewrite or in-place edit changes it."""

_VERIFIED: dict[str, tuple[Signature, str]] = {}
"""Chunk files of this process that matched their checksum, with the file's signature then."""
_VERIFIED_MAX = 1 << 18


def _signature(st: os.stat_result) -> Signature:
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _known_good(path: Path, sig: Signature, expected: str) -> bool:
    return _VERIFIED.get(str(path)) == (sig, expected)


def _remember_good(path: Path, sig: Signature, expected: str) -> None:
    if len(_VERIFIED) >= _VERIFIED_MAX:
        _VERIFIED.clear()  # a bound, not an LRU: re-hashing once more is the only cost
    _VERIFIED[str(path)] = (sig, expected)


def forget_verified(location: ArrayLocation | None = None) -> None:
    """Drop what this process remembers as verified (of one array, or of all)."""
    if location is None:
        _VERIFIED.clear()
        return
    path = local_path(location)
    if path is not None:
        prefix = str(path) + os.sep
        for key in [k for k in _VERIFIED if k.startswith(prefix)]:
            _VERIFIED.pop(key, None)


def _bad_chunk(chunk: int, path: Path | str, reason: str, detail: str) -> ChunkCorruptError:
    msg = f"Chunk {chunk} ({str(path)!r}) failed verification, {reason}: {detail}."
    return ChunkCorruptError(msg, chunk=chunk, path=str(path), reason=reason, detail=detail)


def _load_raw_chunk(layout: _RawLayout, i: int, target: np.ndarray, expected: str | None, *, trust_cache: bool) -> None:
    """Read the rows of chunk ``i`` into ``target`` (their bytes) and check them against ``expected``.

    ``expected=None`` (a chunk not committed yet) reads without checking. With ``trust_cache``,
    a file verified earlier in this process and unchanged since is not hashed again. A CRC-32 is
    computed piece by piece as the bytes arrive (each piece still in cache).

    Raises
    ------
    ChunkCorruptError
        If the chunk file is missing (and the chunk was not all zeros), has the wrong size, or
        its rows do not match the checksum.
    """
    path = layout.chunk_file(i)
    try:
        fh = open(path, "rb", buffering=0)
    except FileNotFoundError:
        target.view(layout.dtype)[:] = layout.fill_value or 0
        if expected is not None and not _zeros_match(target.nbytes, expected):
            raise _bad_chunk(i, path, "missing", "the chunk file is gone (it would read as zeros)") from None
        return
    with fh:
        sig = _signature(os.fstat(fh.fileno()))  # of the file actually read, even if replaced meanwhile
        if expected is not None and sig[1] != layout.chunk_nbytes:
            reason = "truncated" if sig[1] < layout.chunk_nbytes else "wrong size"
            raise _bad_chunk(i, path, reason, f"the file has {sig[1]} bytes, not {layout.chunk_nbytes}")
        check = expected is not None and not (trust_cache and _known_good(path, sig, expected))
        fused = check and expected is not None and expected.startswith("crc32:")
        view = memoryview(target.data).cast("B")  # .data: the array's own buffer (numpy's stubs lack Buffer)
        got, crc = 0, 0
        while got < len(view):
            n = fh.readinto(view[got:got + _PIECE] if fused else view[got:])
            if not n:
                break
            if fused:
                crc = _crc32(view[got:got + n], crc)
            got += n
    if got != target.nbytes:
        raise _bad_chunk(i, path, "truncated", f"read {got} of {target.nbytes} bytes")
    if not check or expected is None:
        return
    if fused and f"crc32:{crc:08x}" == expected:
        _remember_good(path, sig, expected)
        return
    _check_hash(path, i, sig, target, expected)


def _check_hash(path: Path, i: int, sig: Signature, data: np.ndarray, expected: str) -> None:
    if not checksum_matches(data, expected):
        raise _bad_chunk(i, path, "checksum mismatch", f"its bytes do not match the committed checksum {expected}")
    _remember_good(path, sig, expected)


_READERS: tuple[int, Any] | None = None
"""(pid, thread pool): a forked child gets a pool of its own (the parent's threads do not exist there)."""


def _readers() -> Any:
    """Threads that read and hash whole chunks side by side (file reads and CRC-32 release the GIL)."""
    global _READERS
    if _READERS is None or _READERS[0] != os.getpid():
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(max_workers=max(2, min(8, os.cpu_count() or 2)), thread_name_prefix="scdm-read")
        _READERS = (os.getpid(), pool)
    return _READERS[1]


def verify_chunks(location: ArrayLocation, checksums: Mapping[int, str], spec: ArraySpec | None = None) -> list[ChunkCorruptError]:
    """Check every chunk named in ``checksums`` (chunk -> committed checksum); the bad ones, in order.

    Always reads and hashes the files (nothing is taken from what this process verified before).
    With ``spec``, a local array whose ``zarr.json`` is missing or disagrees with it is checked in
    the layout the catalog records (how scdm wrote the chunks), so that the chunks are judged
    apart from their metadata; a remote one raises :class:`ArrayMetadataError`.
    """
    path = local_path(location)
    if path is None and spec is not None:
        check_metadata(location, spec)
    layout = _layout_to_verify(path, spec) if path is not None else None
    if layout is None or not layout.ok:
        return _verify_generic(location, checksums)
    bad = []
    row_bytes = layout.shape[1] * layout.dtype.itemsize
    buffer = np.empty(layout.chunk_rows * row_bytes, dtype=np.uint8)
    for i in sorted(checksums):
        lo, hi = layout.bounds(i)
        try:
            _load_raw_chunk(layout, i, buffer[:(hi - lo) * row_bytes], checksums[i], trust_cache=False)
        except ChunkCorruptError as err:
            bad.append(err)
    return bad


def _layout_to_verify(path: Path, spec: ArraySpec | None) -> _RawLayout:
    """The layout ``zarr.json`` states, or the catalog's (``spec``) where the file is missing or disagrees."""
    if spec is None:
        return _RawLayout(path)
    try:
        return _RawLayout(path, spec)
    except ArrayMetadataError:
        return _RawLayout.from_spec(path, spec)


def _verify_generic(location: ArrayLocation, checksums: Mapping[int, str]) -> list[ChunkCorruptError]:
    arr = open_array(location)
    bad = []
    for i in sorted(checksums):
        try:
            _generic_chunk(location, arr, i, checksums[i])
        except ChunkCorruptError as err:
            bad.append(err)
    return bad


def _generic_chunk(location: ArrayLocation, arr: Any, i: int, expected: str | None) -> np.ndarray:
    """Rows of chunk ``i`` in the stored dtype through zarr-python, checked against ``expected``."""
    chunk_rows = int(arr.chunks[0])
    lo, hi = i * chunk_rows, min((i + 1) * chunk_rows, int(arr.shape[0]))
    key = f"{str(location).rstrip('/')}/c/{i}/0"
    try:
        block = np.ascontiguousarray(arr[lo:hi])
    except Exception as err:  # noqa: BLE001 - any codec or I/O failure of this chunk is damage
        raise _bad_chunk(i, key, "unreadable", f"{type(err).__name__}: {err}") from err
    if expected is not None and not checksum_matches(block, expected):
        if not chunk_present(location, i):
            raise _bad_chunk(i, key, "missing", "the chunk file is gone (it would read as zeros)")
        raise _bad_chunk(i, key, "checksum mismatch", f"its data does not match the committed checksum {expected}")
    return block


# ---- reads ---------------------------------------------------------------------------------
def read_rows(location: ArrayLocation, rows: np.ndarray | None = None, *, out_dtype: str = "float32",
              checksums: Mapping[int, str] | None = None, spec: ArraySpec | None = None) -> np.ndarray:
    """Read all rows (``rows=None``) or the given row indices of an embedding array.

    Parameters
    ----------
    checksums
        Committed checksum per chunk: every chunk the read touches that is named here is
        verified first (see :func:`checksum_matches`); others are read as stored. None reads
        without any check.
    spec
        The catalog's record of the array: its ``zarr.json`` must agree (else nothing is read).

    Raises
    ------
    ChunkCorruptError
        If a verified chunk is missing, truncated or does not match its checksum (no data is returned).
    ArrayMetadataError
        If ``spec`` is given and the array's ``zarr.json`` is missing, unreadable or disagrees with it.
    """
    path = local_path(location)
    if path is None and spec is not None:
        check_metadata(location, spec)
    layout = _RawLayout(path, spec) if path is not None else None
    if layout is None or not layout.ok:
        # remote URLs and arrays with codecs: the generic zarr-python path
        return _read_generic(location, rows, out_dtype, checksums)
    n_rows, dim = layout.shape
    if rows is None:
        return _read_all(layout, n_rows, dim, out_dtype, checksums)
    return _read_subset(layout, np.asarray(rows, dtype=np.int64), dim, out_dtype, checksums)


def _read_all(layout: _RawLayout, n_rows: int, dim: int, out_dtype: str, checksums: Mapping[int, str] | None) -> np.ndarray:
    native = layout.dtype.newbyteorder("=")
    out = np.empty((n_rows, dim), dtype=native)
    flat = out.reshape(-1).view(np.uint8)
    row_bytes = dim * native.itemsize
    # chunks are read and verified on several threads: hashing a chunk costs about as much as
    # reading it from the page cache, so spreading both over the cores keeps verification cheap
    jobs = []
    try:
        for i in range(layout.n_chunks()):
            lo, hi = layout.bounds(i)
            expected = checksums.get(i) if checksums is not None else None
            jobs.append(_readers().submit(in_context(_load_raw_chunk), layout, i, flat[lo * row_bytes:hi * row_bytes], expected,
                                          trust_cache=True))
        for job in jobs:
            job.result()  # raises the first bad chunk's error: no data is returned
    finally:
        for job in jobs:
            job.cancel()
    return out if out.dtype == np.dtype(out_dtype) else out.astype(out_dtype)


def _check_rows(rows: np.ndarray, n_rows: int) -> None:
    if rows.size and (rows.min() < 0 or rows.max() >= n_rows):
        msg = f"Row indices must lie in [0, {n_rows}); got {int(rows.min())}..{int(rows.max())}."
        raise IndexError(msg)


def _read_subset(layout: _RawLayout, rows: np.ndarray, dim: int, out_dtype: str, checksums: Mapping[int, str] | None) -> np.ndarray:
    _check_rows(rows, layout.shape[0])
    out = np.empty((rows.size, dim), dtype=out_dtype)
    chunk_of = rows // layout.chunk_rows
    order = np.argsort(chunk_of, kind="stable")
    bounds = np.flatnonzero(np.diff(chunk_of[order])) + 1
    row_bytes = dim * layout.dtype.itemsize
    scratch: np.ndarray | None = None
    for group in np.split(order, bounds):
        if group.size == 0:
            continue
        c = int(chunk_of[group[0]])
        lo, hi = layout.bounds(c)
        path = layout.chunk_file(c)
        expected = checksums.get(c) if checksums is not None else None
        if expected is not None and not _unchanged_since_verified(path, expected):
            # verify the whole chunk once (it is read anyway to hash it), then pick its rows from memory
            if scratch is None:
                scratch = np.empty(layout.chunk_rows * row_bytes, dtype=np.uint8)
            block = scratch[:(hi - lo) * row_bytes]
            _load_raw_chunk(layout, c, block, expected, trust_cache=False)
            out[group] = block.view(layout.dtype).reshape(hi - lo, dim)[rows[group] - lo]
        elif not path.exists():
            out[group] = layout.fill_value
        else:
            out[group] = _memmap_rows(path, c, layout, hi - lo, rows[group] - lo)
    return out


def _memmap_rows(path: Path, chunk: int, layout: _RawLayout, n_rows: int, local_rows: np.ndarray) -> np.ndarray:
    """Rows of one chunk file through a memory map (only the pages of those rows are read)."""
    try:
        mm = np.memmap(path, dtype=layout.dtype, mode="r", shape=(n_rows, layout.shape[1]))
    except ValueError as err:  # the file is shorter than the rows it must hold
        raise _bad_chunk(chunk, path, "truncated", str(err)) from err
    try:
        return np.asarray(mm[local_rows])
    finally:
        del mm


def _unchanged_since_verified(path: Path, expected: str) -> bool:
    """Whether this process verified ``path`` against ``expected`` and the file is unchanged since."""
    try:
        return _known_good(path, _signature(os.stat(path)), expected)
    except FileNotFoundError:
        return False


def _read_generic(location: ArrayLocation, rows: np.ndarray | None, out_dtype: str, checksums: Mapping[int, str] | None) -> np.ndarray:
    arr = open_array(location)
    if checksums is None:
        data = arr[:] if rows is None else arr.get_orthogonal_selection((np.asarray(rows), slice(None)))
        return np.asarray(data, dtype=out_dtype)
    n_rows, dim = int(arr.shape[0]), int(arr.shape[1])
    chunk_rows = int(arr.chunks[0])
    picked = None if rows is None else np.asarray(rows, dtype=np.int64)
    if picked is not None:
        _check_rows(picked, n_rows)
    out = np.empty((n_rows if picked is None else picked.size, dim), dtype=out_dtype)
    chunks = range(math.ceil(n_rows / chunk_rows)) if picked is None else np.unique(picked // chunk_rows)
    for c in chunks:
        c = int(c)
        block = _generic_chunk(location, arr, c, checksums.get(c))
        lo = c * chunk_rows
        if picked is None:
            out[lo:lo + block.shape[0]] = block
        else:
            where = np.flatnonzero(picked // chunk_rows == c)
            out[where] = block[picked[where] - lo]
    return out
