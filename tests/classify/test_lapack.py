"""The Cholesky factorisation that ridge solves run side by side (issue 19 point 1)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import scipy.linalg

from scdm.classify._lapack import cholesky_lower, releases_gil


def _spd(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    B = rng.standard_normal((n, n + 8))
    return np.asfortranarray(B @ B.T)


def test_the_factor_is_scipys():
    a = _spd(200)
    want, info_want = scipy.linalg.lapack.dpotrf(a, lower=1, clean=1)
    factor, info = cholesky_lower(a)
    assert info == info_want == 0
    np.testing.assert_allclose(np.tril(factor), want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.tril(factor) @ np.tril(factor).T, a, rtol=1e-10)


def test_only_the_lower_triangle_is_read_and_overwrite_is_in_place():
    a = _spd(50)
    junk = a.copy(order="F")
    junk[np.triu_indices(50, 1)] = np.nan  # the upper triangle is never read
    factor, info = cholesky_lower(junk, overwrite=True)
    assert info == 0 and factor is junk
    np.testing.assert_allclose(np.tril(factor), np.linalg.cholesky(a), rtol=1e-10, atol=1e-12)
    kept = a.copy(order="F")
    factor, _ = cholesky_lower(kept)  # default: a copy, the input untouched
    assert factor is not kept and np.array_equal(kept, a)


@pytest.mark.parametrize("layout", ["C", "float32"])
def test_inputs_it_cannot_factorise_in_place_are_copied(layout):
    a = _spd(30)
    given = np.ascontiguousarray(a) if layout == "C" else a.astype(np.float32, order="F")
    factor, info = cholesky_lower(given, overwrite=True)
    assert info == 0 and factor is not given and factor.dtype == np.float64 and factor.flags.f_contiguous
    np.testing.assert_allclose(np.tril(factor), np.linalg.cholesky(given.astype(np.float64)), rtol=1e-5)


def test_a_matrix_that_is_not_positive_definite_reports_the_failing_minor():
    a = _spd(20)
    a[4, 4] = -1.0
    _, info = cholesky_lower(a)
    assert info == 5  # LAPACK: the leading minor of order 5
    with pytest.raises(ValueError, match="square"):
        cholesky_lower(np.zeros((3, 4)))


def _longest_stall(busy: threading.Event) -> float:
    """The longest time, in seconds, between two turns of a Python loop while ``busy`` is set."""
    longest, last = 0.0, time.perf_counter()
    while busy.is_set():
        now = time.perf_counter()
        longest, last = max(longest, now - last), now
    return longest


def test_factorisations_on_other_threads_leave_the_interpreter_free(factorise=cholesky_lower):
    """A Python loop keeps turning while another thread factorises, as map_solves runs them
    (one BLAS thread). Holding the GIL stalls the loop for a whole factorisation, which is what
    scipy's dpotrf does; releasing it leaves only the scheduler's pauses, a small part of one
    even with every core busy (a loop's pace is no measure there: it shares a core under xdist)."""
    from threadpoolctl import threadpool_limits

    assert releases_gil()
    a = _spd(3072, seed=1)
    seen = []
    with threadpool_limits(1):
        for _ in range(3):  # a scheduler hiccup on a busy machine gets two more tries
            busy, took = threading.Event(), []
            busy.set()

            def work() -> None:
                for _ in range(3):
                    t0 = time.perf_counter()
                    factorise(a)
                    took.append(time.perf_counter() - t0)
                busy.clear()

            worker = threading.Thread(target=work)
            worker.start()
            stall = _longest_stall(busy)
            worker.join()
            seen.append((round(stall, 4), round(min(took), 4)))
            if stall < 0.4 * min(took):
                return
    pytest.fail(f"(longest stall of the loop, shortest factorisation) in seconds: {seen}: the GIL was held")
