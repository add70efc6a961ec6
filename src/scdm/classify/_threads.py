"""How many BLAS threads each kind of linear algebra gets: solves one, large products every core.

Measured on the project's 2-core machine (OpenBLAS, issue #19; ``benchmarks/bench_heads.py``):

=============================  ===========  ==========================
operation                      1 thread     2 threads
=============================  ===========  ==========================
Cholesky (dpotrf) D = 512      1.2-34 ms    161-810 ms
Cholesky (dpotrf) D = 3072     0.5-2.2 s    3.3-6.5 s
Gram ssyrk 8192 x 3072         4.0 s        2.3 s
(50000 x 3072) @ (3072 x 10)   0.74 s       0.40 s
logreg, 10 folds, 40000 x 3072 1.77 s       3.29 s
logreg, 10 folds, 20000 x 512  0.11 s       0.41 s
=============================  ===========  ==========================

A factorisation is a chain of small dependent steps: a second OpenBLAS thread spins waiting for
the first and, on a busy machine, for a core, so solves (ridge's Cholesky and triangular solves)
run with one thread and go side by side across folds instead (:func:`map_solves`; the Cholesky
through :mod:`scdm.classify._lapack`, because scipy's f2py wrapper holds the GIL and the "side by
side" solves then ran one at a time: 10 ridge solves at D = 3072 on 2 threads took 1.86 s, 1.0 s
with the GIL released). Logistic
regression's lockstep L-BFGS (:mod:`scdm.classify._logreg_batch`) is many short products and
vector steps per iteration: measured, it too runs faster on one thread. One large product over
many rows (a fold's Gram matrix) is split into independent blocks and does use every core; below
:data:`GEMM_MIN_ENTRIES` matrix entries per thread the split costs more than it saves.

"Every core" is :func:`cpu_budget`: the smallest of the CPUs this process may run on
(``os.sched_getaffinity``), the cgroup CPU quota (``cpu.max`` of cgroup v2, ``cpu.cfs_quota_us`` of
v1) and ``OMP_NUM_THREADS`` when set; the grid's ``jobs`` parallel fits share it.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from scdm.store.warning_scopes import in_context

__all__ = [
    "GEMM_MIN_ENTRIES", "cgroup_cpu_quota", "cpu_budget", "current_blas_threads", "gemm_threads", "map_solves", "product_threads",
    "solve_threads",
]

T = TypeVar("T")
R = TypeVar("R")

GEMM_MIN_ENTRIES = 1_000_000
"""Entries of the row matrix a product needs per extra thread before that thread pays (a 8192 x
3072 Gram block is 25 M entries: every core; a 2000 x 128 one: one thread)."""

CGROUP_V2 = Path("/sys/fs/cgroup/cpu.max")
CGROUP_V1 = (Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"), Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us"))


def cgroup_cpu_quota(v2: Path | None = None, v1: tuple[Path, Path] | None = None) -> float | None:
    """CPUs the cgroup quota allows (``200000 100000`` is 2.0); None when there is no quota.

    Reads cgroup v2's ``cpu.max`` (``"<quota> <period>"`` or ``"max <period>"``), else v1's
    ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (quota -1: none). Unreadable files mean no quota.
    """
    v2 = CGROUP_V2 if v2 is None else v2
    v1 = CGROUP_V1 if v1 is None else v1
    try:
        fields = v2.read_text().split()
    except OSError:
        fields = []
    if fields:
        if fields[0] == "max":
            return None
        try:
            quota, period = float(fields[0]), float(fields[1]) if len(fields) > 1 else 100_000.0
        except ValueError:
            return None
        return quota / period if quota > 0 and period > 0 else None
    try:
        quota, period = float(v1[0].read_text().strip()), float(v1[1].read_text().strip())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def _omp_num_threads() -> int | None:
    value = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    try:
        n = int(value)
    except ValueError:
        return None
    return n if n >= 1 else None


def cpu_budget() -> int:
    """Threads this process should use in all: affinity, cgroup quota and ``OMP_NUM_THREADS``, the least."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - macOS / Windows
        cpus = os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    if quota is not None:
        cpus = min(cpus, max(1, math.floor(quota)))
    omp = _omp_num_threads()
    if omp is not None:
        cpus = min(cpus, omp)
    return max(1, cpus)


def product_threads(entries: int, *, jobs: int = 1) -> int:
    """BLAS threads for a product over a matrix of ``entries`` values, with ``jobs`` fits in parallel."""
    share = max(1, cpu_budget() // max(1, jobs))
    return max(1, min(share, entries // GEMM_MIN_ENTRIES))


@functools.lru_cache(maxsize=1)
def _controller() -> Any:
    """One threadpoolctl controller per process (finding the libraries costs ms; limiting it µs)."""
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


@contextlib.contextmanager
def _blas_threads(n: int) -> Iterator[None]:
    controller = _controller()
    with controller.limit(limits=n, user_api="blas"):
        yield


def current_blas_threads() -> int:
    """BLAS threads allowed now (what an enclosing :func:`gemm_threads` or :func:`solve_threads` set)."""
    return max([int(lib.get("num_threads") or 1) for lib in _controller().info() if lib.get("user_api") == "blas"] or [1])


def solve_threads() -> contextlib.AbstractContextManager[None]:
    """One BLAS thread for the block: factorisations, triangular solves, small fits."""
    return _blas_threads(1)


def gemm_threads(entries: int, *, jobs: int = 1) -> contextlib.AbstractContextManager[None]:
    """:func:`product_threads` BLAS threads for the block (a large product over ``entries`` values)."""
    return _blas_threads(product_threads(entries, jobs=jobs))


def map_solves(fn: Callable[[T], R], items: Iterable[T], *, jobs: int = 1) -> list[R]:
    """``[fn(item) for item in items]``, one BLAS thread each, ``cpu_budget() // jobs`` at a time.

    For solves that share no scratch memory; results are in the order of ``items``.
    """
    items = list(items)
    width = min(len(items), max(1, cpu_budget() // max(1, jobs)))
    with solve_threads():
        if width <= 1:
            return [fn(item) for item in items]
        with ThreadPoolExecutor(max_workers=width, thread_name_prefix="scdm-solve") as pool:
            return list(pool.map(in_context(fn), items))  # the caller's warning blocks and job cover the threads
