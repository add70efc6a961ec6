"""The BLAS thread policy: the CPU budget, one thread per solve, solves side by side."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from threadpoolctl import threadpool_info, threadpool_limits

from scdm.classify import _threads
from scdm.classify import heads as heads_module
from scdm.classify._threads import cgroup_cpu_quota, cpu_budget, map_solves, product_threads, solve_threads
from scdm.classify.heads import GramStats, ridge_from_stats


def blas_threads() -> set[int]:
    return {int(i["num_threads"]) for i in threadpool_info() if i["user_api"] == "blas"}


@pytest.fixture()
def two_cpus(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A machine of 2 CPUs, no cgroup quota, no OMP_NUM_THREADS."""
    monkeypatch.setattr(_threads.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(_threads, "CGROUP_V2", tmp_path / "absent")
    monkeypatch.setattr(_threads, "CGROUP_V1", (tmp_path / "absent_q", tmp_path / "absent_p"))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)


@pytest.mark.parametrize(("text", "cpus"), [("max 100000\n", None), ("200000 100000\n", 2.0), ("150000 100000", 1.5),
                                           ("50000 100000", 0.5), ("", None), ("garbage", None)])
def test_cgroup_v2_quota(tmp_path: Path, text: str, cpus: float | None) -> None:
    (tmp_path / "cpu.max").write_text(text)
    assert cgroup_cpu_quota(tmp_path / "cpu.max", (tmp_path / "q", tmp_path / "p")) == cpus


def test_cgroup_v1_quota(tmp_path: Path) -> None:
    (tmp_path / "q").write_text("300000\n")
    (tmp_path / "p").write_text("100000\n")
    assert cgroup_cpu_quota(tmp_path / "absent", (tmp_path / "q", tmp_path / "p")) == 3.0
    (tmp_path / "q").write_text("-1\n")
    assert cgroup_cpu_quota(tmp_path / "absent", (tmp_path / "q", tmp_path / "p")) is None


def test_budget_is_the_least_of_affinity_quota_and_omp(two_cpus: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert cpu_budget() == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert cpu_budget() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "8")  # more than the CPUs: the CPUs win
    assert cpu_budget() == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "not a number")
    assert cpu_budget() == 2
    (tmp_path / "cpu.max").write_text("50000 100000")  # half a CPU: still one thread
    monkeypatch.setattr(_threads, "CGROUP_V2", tmp_path / "cpu.max")
    assert cpu_budget() == 1


def test_products_share_the_budget_between_jobs_and_small_ones_get_one_thread(two_cpus: None) -> None:
    assert product_threads(25_000_000) == 2
    assert product_threads(25_000_000, jobs=2) == 1
    assert product_threads(200_000) == 1


def test_a_solve_runs_on_one_blas_thread_and_restores_the_limit() -> None:
    with threadpool_limits(limits=2, user_api="blas"):
        before = blas_threads()
        with solve_threads():
            assert blas_threads() == {1}
        assert blas_threads() == before


def test_ridge_solves_with_one_blas_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """Observed inside the factorisation itself, under an outer limit of two threads."""
    seen: list[set[int]] = []
    real = heads_module._solve_lower_spd

    def spy(*args: object, **kwargs: object) -> np.ndarray:
        seen.append(blas_threads())
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(heads_module, "_solve_lower_spd", spy)
    rng = np.random.default_rng(0)
    X = rng.standard_normal((200, 16)).astype(np.float32)
    y = (X[:, 0] > 0).astype(np.float32)
    with threadpool_limits(limits=2, user_api="blas"):
        coef, _ = ridge_from_stats(GramStats.from_rows(X, y), 1.0, standardize=False)
    assert seen == [{1}]
    Xc = X.astype(np.float64) - X.mean(axis=0)  # the closed form, for the record
    expected = np.linalg.solve(Xc.T @ Xc + np.eye(16), Xc.T @ (y - y.mean()))
    np.testing.assert_allclose(coef, expected, rtol=1e-4, atol=1e-6)


def test_map_solves_runs_side_by_side_in_order_with_one_thread_each(two_cpus: None) -> None:
    barrier = threading.Barrier(2, timeout=20)
    seen: list[set[int]] = []

    def solve(k: int) -> int:
        if k < 2:
            barrier.wait()  # both first items run at once, or this times out
        seen.append(blas_threads())
        return k * k

    assert map_solves(solve, range(5)) == [0, 1, 4, 9, 16]
    assert all(s == {1} for s in seen) and len(seen) == 5


def test_map_solves_with_jobs_taking_the_budget_runs_one_at_a_time(two_cpus: None) -> None:
    names: set[str] = set()

    def solve(k: int) -> int:
        names.add(threading.current_thread().name)
        return -k

    assert map_solves(solve, range(3), jobs=2) == [0, -1, -2]
    assert names == {threading.current_thread().name}
