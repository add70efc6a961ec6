"""LAPACK's Cholesky factorisation (dpotrf) that threads can run side by side.

``scipy.linalg.lapack.dpotrf`` is an f2py wrapper that holds the GIL for the whole factorisation,
so the ridge solves that :func:`scdm.classify._threads.map_solves` runs on several threads ran one
after the other. Measured with scipy 1.17.1 on a 2-core EPYC, D = 3072: a Python thread made
129,000 loop iterations during one 0.17 s factorisation against 5.3 million in 0.2 s of sleep;
four factorisations took 0.67 s on one thread and 0.66 s on two (in two processes they do run
side by side: 0.74 s each for four).

scipy also exports the routine through its Cython LAPACK API (``scipy.linalg.cython_lapack``, a
public and stable ABI: the same OpenBLAS routine). Called through a ctypes function pointer, which
releases the GIL for the duration of the call, the factorisations of several threads run at once.
Where that pointer cannot be had, the f2py wrapper is used (correct, only not parallel).
"""

from __future__ import annotations

import ctypes
import functools
from typing import Any

import numpy as np
import scipy.linalg

__all__ = ["cholesky_lower", "releases_gil"]

_INT_P = ctypes.POINTER(ctypes.c_int)
_DPOTRF = ctypes.CFUNCTYPE(None, ctypes.c_char_p, _INT_P, ctypes.c_void_p, _INT_P, _INT_P)
"""``void dpotrf(char *uplo, int *n, double *a, int *lda, int *info)``: cython_lapack's signature.
CFUNCTYPE, not PYFUNCTYPE: ctypes drops the GIL around the call."""


@functools.lru_cache(maxsize=1)
def _cython_dpotrf() -> Any | None:
    """dpotrf from scipy's Cython LAPACK as a ctypes function, or None where it is not exported."""
    try:
        from scipy.linalg import cython_lapack

        capsule = cython_lapack.__pyx_capi__["dpotrf"]
        # own prototypes of the C-API calls: setting restype on ctypes.pythonapi's would change them process-wide
        get_name = ctypes.PYFUNCTYPE(ctypes.c_char_p, ctypes.py_object)(("PyCapsule_GetName", ctypes.pythonapi))
        get_pointer = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.py_object, ctypes.c_char_p)(
            ("PyCapsule_GetPointer", ctypes.pythonapi))
        address = get_pointer(capsule, get_name(capsule))
    except (ImportError, KeyError, AttributeError, ValueError, TypeError):
        return None
    return _DPOTRF(address) if address else None


def releases_gil() -> bool:
    """Whether :func:`cholesky_lower` runs without holding the GIL here."""
    return _cython_dpotrf() is not None


def cholesky_lower(a: np.ndarray, *, overwrite: bool = False) -> tuple[np.ndarray, int]:
    """Cholesky factor ``L`` (``a = L L^T``) of the symmetric matrix whose lower triangle ``a`` holds.

    Parameters
    ----------
    a : ndarray of shape (n, n)
        Only the lower triangle is read. Float64 and Fortran-ordered to be factorised in place.
    overwrite : bool, default False
        Factorise ``a`` itself (when it is float64, Fortran-ordered and writeable) instead of a copy.

    Returns
    -------
    factor : ndarray of shape (n, n), float64, Fortran order
        ``L`` in its lower triangle; the strict upper triangle is left as it was (LAPACK's ``clean=0``).
    info : int
        LAPACK's: 0 on success; ``k > 0`` if the leading minor of order ``k`` is not positive definite.
    """
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        msg = f"cholesky_lower needs a square matrix, got shape {a.shape}"
        raise ValueError(msg)
    in_place = overwrite and a.dtype == np.float64 and a.flags.f_contiguous and a.flags.writeable
    factor = a if in_place else np.array(a, dtype=np.float64, order="F", copy=True)
    dpotrf = _cython_dpotrf()
    if dpotrf is None:
        out, info = scipy.linalg.lapack.dpotrf(factor, lower=1, overwrite_a=1, clean=0)
        return out, int(info)
    n, lda, info_c = ctypes.c_int(factor.shape[0]), ctypes.c_int(max(1, factor.shape[0])), ctypes.c_int(0)
    dpotrf(b"L", ctypes.byref(n), factor.ctypes.data, ctypes.byref(lda), ctypes.byref(info_c))
    return factor, int(info_c.value)
