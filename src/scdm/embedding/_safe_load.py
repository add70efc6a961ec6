"""Reading pickled files from a checkpoint folder without running code from them.

Official checkpoints are pickles (``torch.save``), and some reference repositories ship plain
pickles next to them (Geneformer's gene dictionaries, UCE's ``species_offsets.pkl``). Unpickling
calls whatever function the file names, so a crafted file dropped into a checkpoint folder would
run code during ``scdm embed``. Every loader reads such files through this module, which admits
only an allow-list of types and refuses anything else with a :class:`CheckpointError` naming it:

* :func:`load_torch_file`: ``torch.load(weights_only=True)`` (torch's restricted unpickler:
  tensors, containers, numbers, strings) plus :func:`checkpoint_globals`, the few other types
  official checkpoints may carry: numpy arrays, scalars and dtypes, ``argparse.Namespace``;
* :func:`load_pickle`: a :class:`RestrictedUnpickler` that resolves only the globals the caller
  allows (default :func:`plain_data_globals`: dicts of strings and numbers, numpy scalars).
"""

from __future__ import annotations

import argparse
import contextlib
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np

from scdm.store.errors import CheckpointError

__all__ = ["RestrictedUnpickler", "checkpoint_globals", "damaged_torch_file", "load_pickle", "load_torch_file", "plain_data_globals"]


def _numpy_multiarray() -> Any:
    """numpy 2's ``numpy._core.multiarray`` (numpy 1: ``numpy.core.multiarray``)."""
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray  # type: ignore[no-redef]
    return multiarray


def checkpoint_globals() -> list[Any]:
    """Non-tensor types a model checkpoint may hold, allowed on top of torch's weights-only set.

    Training scripts leave numpy values (losses, configs read with numpy) and ``argparse``
    namespaces (saved arguments) in checkpoints; building either runs no code of the file's
    choosing. Nothing else is admitted.
    """
    multiarray = _numpy_multiarray()
    dtype_classes = [type(np.dtype(t)) for t in ("float16", "float32", "float64", "int8", "int16", "int32", "int64",
                                                  "uint8", "bool")]
    return [multiarray._reconstruct, multiarray.scalar, np.ndarray, np.dtype, *dtype_classes, argparse.Namespace]


_PLAIN_KINDS = "biufcSU"
"""numpy kinds of a plain scalar: booleans, integers, floats, complex numbers, bytes and strings."""


def _plain_scalar(dtype: Any, data: Any) -> Any:
    """numpy's ``scalar(dtype, bytes)`` for numbers and strings only, on a fresh copy of ``dtype``.

    A pickle may rebuild a dtype's state (its BUILD opcode calls ``dtype.__setstate__``), and numpy
    then takes the fields and flags it is given: a ``V16`` dtype given two object fields and no
    object flag makes ``scalar`` copy the file's bytes in as object pointers, which ``str()`` of the
    scalar (a call the pickle can make) follows to any address: a crash, or worse. So only plain
    kinds are made, each from a dtype built again from its type string (nothing the file set on the
    dtype object, now or by a later BUILD of it, reaches the scalar).
    """
    if not isinstance(dtype, np.dtype) or dtype.kind not in _PLAIN_KINDS or dtype.fields is not None or dtype.subdtype is not None:
        raise pickle.UnpicklingError(f"a numpy scalar of dtype {dtype!r}")
    return _numpy_multiarray().scalar(np.dtype(dtype.str), data)


def plain_data_globals() -> dict[tuple[str, str], Any]:
    """Globals a pickled dict of strings and numbers (numpy scalars included) refers to."""
    import _codecs

    scalar = _plain_scalar
    # numpy scalars pickle as ``scalar(dtype, bytes)``; protocol 2 stores the bytes through
    # ``_codecs.encode``. numpy 1 writes ``numpy.core``, numpy 2 ``numpy._core``.
    return {
        ("numpy.core.multiarray", "scalar"): scalar,
        ("numpy._core.multiarray", "scalar"): scalar,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _codecs.encode,
        ("builtins", "dict"): dict,
        ("builtins", "str"): str,
        ("builtins", "int"): int,
        ("builtins", "float"): float,
    }


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only allow-listed globals: a file naming any other is refused.

    Parameters
    ----------
    file
        Binary file object.
    allowed
        ``(module, name) -> object`` the pickle may refer to (default :func:`plain_data_globals`).
    """

    def __init__(self, file: IO[bytes], allowed: Mapping[tuple[str, str], Any] | None = None) -> None:
        super().__init__(file)
        self.allowed = dict(plain_data_globals() if allowed is None else allowed)

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.allowed:
            return self.allowed[(module, name)]
        raise pickle.UnpicklingError(f"{module}.{name}")


def load_pickle(path: str | Path, *, what: str, source: str,
                allowed: Mapping[tuple[str, str], Any] | None = None) -> Any:
    """Read a plain pickle with :class:`RestrictedUnpickler`.

    Parameters
    ----------
    path
        The file.
    what
        What the file should be, for messages (``"a Geneformer gene dictionary"``).
    source
        Where the official file comes from, for messages.
    allowed
        Globals the file may refer to (default :func:`plain_data_globals`).

    Raises
    ------
    CheckpointError
        The file refers to anything else (loading it could run code), or is not a pickle (truncated,
        damaged or another format).
    """
    path = Path(path)
    try:
        with path.open("rb") as handle:
            return RestrictedUnpickler(handle, allowed).load()
    except pickle.UnpicklingError as err:
        msg = (f"Refusing to load {str(path)!r}: the pickle refers to {err}, which {what} does not hold; "
               f"loading it could run code. Replace the file with the official one ({source}).")
        raise CheckpointError(msg) from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, OverflowError, MemoryError) as err:
        # a damaged file can claim a string or bytearray of absurd length: OverflowError or MemoryError
        msg = f"Cannot read {str(path)!r} as {what} ({type(err).__name__}: {err}). Replace it with the official file ({source})."
        raise CheckpointError(msg) from None


_GLOBAL = re.compile(r"GLOBAL ([\w.]+)|but got <class '([\w.]+)'>")
"""How torch names a refused type: a GLOBAL it may not import, or a class (a numpy object dtype) it may not build."""


def damaged_torch_file(path: str | Path, err: BaseException, what: str) -> CheckpointError | None:
    """The error for a file ``torch.load`` could not parse at all, or None when torch refused a type in it.

    A truncated download, or a web page saved under the checkpoint's name (a gated or moved URL),
    fails as an UnpicklingError ("Unsupported operand") like a refused type does: only the latter
    names a GLOBAL. Saving such a file again with ``weights_only=False`` cannot help.
    """
    if isinstance(err, pickle.UnpicklingError) and _GLOBAL.search(str(err)):
        return None
    lines = [line for line in str(err).splitlines() if line.strip() and "weights_only" not in line]
    detail = f"{type(err).__name__}: {lines[-1][:200]}" if lines else type(err).__name__
    with contextlib.suppress(OSError):
        head = Path(path).read_bytes()[:64].lstrip().lower()
        if head.startswith((b"<!doctype html", b"<html", b"<?xml")):
            detail = "it is a web page (HTML), not the checkpoint: the download saved an error or login page"
    return CheckpointError(f"Cannot read {str(path)!r} as a torch file: it is truncated, damaged or not a torch.save file "
                           f"({detail}). Re-download {what}.")


def load_torch_file(path: str | Path, *, what: str, mmap: bool = False) -> Any:
    """``torch.load`` on CPU that never runs code from the file.

    Parameters
    ----------
    path
        A ``torch.save`` file.
    what
        What the file is, for messages (``"scGPT's best_model.pt"``).
    mmap
        Memory-map the tensors (zip format only; legacy files are read whole).

    Raises
    ------
    CheckpointError
        The file refers to a type outside torch's weights-only set and :func:`checkpoint_globals`
        (it could run code, so it is refused), or it is not a readable torch file.
    """
    import torch

    path = Path(path)
    # torch < 2.5 has no safe_globals: there only torch's own weights-only set is admitted
    allow = getattr(torch.serialization, "safe_globals", None)
    try:
        with allow(checkpoint_globals()) if allow is not None else contextlib.nullcontext():
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        damaged = damaged_torch_file(path, err, what)
        if damaged is not None:  # not a refused type: bytes that are no pickle at all
            raise damaged from None
        found = _GLOBAL.search(str(err))
        msg = (f"Refusing to load {str(path)!r}: it asks to unpickle {(found.group(1) or found.group(2)) if found else err}, which {what} does not hold; "
               "loading it could run code stored in the file. Re-download the official file. If you made it yourself "
               "from a file you trust, save only its tensors again (a state_dict or dict of tensors) with torch.save.")
        raise CheckpointError(msg) from None
    except RuntimeError as err:
        if mmap and "mmap" in str(err):  # legacy (non-zip) torch.save format
            return load_torch_file(path, what=what, mmap=False)
        raise damaged_torch_file(path, err, what) or CheckpointError(str(err)) from err
    except (EOFError, ValueError) as err:
        raise damaged_torch_file(path, err, what) or CheckpointError(str(err)) from err
