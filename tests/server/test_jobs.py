"""The job queue: at most ``max_jobs`` at once, the others queued with their position; failures clean up;
several worker processes share one queue."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from scdm.server.jobs import JobBoard, JobHandle, JobNotFoundError
from tests.server.conftest import TOKEN, server_at, start_server, stop_server


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def blocking(gate: threading.Event, ran: list[str], name: str) -> Callable[[JobHandle], None]:
    def work(job: JobHandle) -> None:
        ran.append(name)
        job.update(stage=f"{name} waiting", progress=0.5)
        assert gate.wait(30)
        job.update(result={"name": name})

    return work


def test_at_most_max_jobs_run_and_the_rest_queue_in_order(tmp_path: Path) -> None:
    board = JobBoard(tmp_path / "jobs", max_jobs=2)
    gate, ran = threading.Event(), []
    jobs = [board.submit("predict", blocking(gate, ran, f"j{i}")) for i in range(5)]
    wait_until(lambda: len(ran) == 2, "two jobs to start")
    time.sleep(0.2)  # time for a third to start, if the limit did not hold
    states = [board.get(j.job_id) for j in jobs]
    assert [s.state for s in states] == ["running", "running", "queued", "queued", "queued"]
    assert [s.position for s in states] == [None, None, 1, 2, 3] and sorted(ran) == ["j0", "j1"]  # two threads: either may start first
    assert states[0].stage == "j0 waiting" and states[0].progress == 0.5
    assert [r.position for r in board.all()] == [3, 2, 1, None, None]  # newest first
    gate.set()
    wait_until(lambda: all(board.get(j.job_id).state == "done" for j in jobs), "every job")
    assert sorted(ran) == [f"j{i}" for i in range(5)]
    done = board.get(jobs[4].job_id)
    assert done.progress == 1.0 and done.result == {"name": "j4"} and done.finished_at >= done.started_at


def test_one_job_at_a_time_runs_them_first_in_first_out(tmp_path: Path) -> None:
    board = JobBoard(tmp_path / "jobs", max_jobs=1)
    gate, ran = threading.Event(), []
    jobs = [board.submit("predict", blocking(gate, ran, f"j{i}")) for i in range(4)]
    wait_until(lambda: ran == ["j0"], "the first job")
    assert [board.get(j.job_id).position for j in jobs] == [None, 1, 2, 3]
    gate.set()
    wait_until(lambda: all(board.get(j.job_id).state == "done" for j in jobs), "every job")
    assert ran == ["j0", "j1", "j2", "j3"]


def test_a_failing_job_is_reported_and_cleaned_up(tmp_path: Path) -> None:
    board = JobBoard(tmp_path / "jobs")
    left = tmp_path / "upload.h5ad"
    left.write_bytes(b"x")

    def work(job: JobHandle) -> None:
        job.update(stage="ingesting")
        raise ValueError("not an h5ad file")

    record = board.submit("upload", work, on_failure=left.unlink)
    wait_until(lambda: board.get(record.job_id).state == "failed", "the failure")
    failed = board.get(record.job_id)
    assert failed.message == "ValueError: not an h5ad file" and failed.finished_at is not None
    assert not left.exists()
    with pytest.raises(JobNotFoundError, match="GET /api/jobs"):
        board.get("../../etc/passwd")
    # the board still runs jobs after a failure
    ok = board.submit("predict", lambda job: None)
    wait_until(lambda: board.get(ok.job_id).state == "done", "the next job")


def test_stopping_the_server_fails_queued_jobs_and_cleans_them_up(tmp_path: Path) -> None:
    board = JobBoard(tmp_path / "jobs", max_jobs=1)
    gate, ran, cleaned = threading.Event(), [], []
    first = board.submit("predict", blocking(gate, ran, "first"))
    queued = board.submit("upload", blocking(gate, ran, "queued"), on_failure=lambda: cleaned.append("queued"))
    wait_until(lambda: ran == ["first"], "the first job")
    board.shutdown()
    gate.set()
    assert board.get(queued.job_id).state == "failed" and "server stopped" in board.get(queued.job_id).message
    assert cleaned == ["queued"]
    wait_until(lambda: board.get(first.job_id).state == "done", "the running job to finish")
    assert ran == ["first"]


def test_boards_sharing_a_folder_share_the_limit(tmp_path: Path) -> None:
    """Two boards on one folder stand for two uvicorn workers: one slot between them."""
    a, b = JobBoard(tmp_path / "jobs", max_jobs=1), JobBoard(tmp_path / "jobs", max_jobs=1)
    gate, ran = threading.Event(), []
    first = a.submit("predict", blocking(gate, ran, "a"))
    wait_until(lambda: ran == ["a"], "a's job")
    second = b.submit("predict", blocking(gate, ran, "b"))
    time.sleep(0.5)
    assert ran == ["a"] and b.get(second.job_id).state == "queued"
    assert a.get(second.job_id).position == 1  # every worker answers for every job
    gate.set()
    wait_until(lambda: a.get(first.job_id).state == b.get(second.job_id).state == "done", "both jobs")


def test_the_api_shows_the_queue_position(built_store: tuple[Path, dict[str, str]], monkeypatch: pytest.MonkeyPatch) -> None:
    from fastapi.testclient import TestClient

    import scdm.classify.trained_heads
    from scdm.server import create_app
    from scdm.store import Store

    gate = threading.Event()
    real_predict = scdm.classify.trained_heads.predict

    def slow_predict(*args: Any, **kwargs: Any) -> Any:
        assert gate.wait(30)
        return real_predict(*args, **kwargs)

    monkeypatch.setattr(scdm.classify.trained_heads, "predict", slow_predict)
    path, info = built_store
    with TestClient(create_app(Store(path), max_jobs=1), base_url="http://localhost") as client:
        body = {"head_id": info["head_id"], "dataset": "a375"}
        jobs = [client.post("/api/jobs/predict", json=body).json() for _ in range(3)]
        wait_until(lambda: client.get(jobs[0]["status_url"]).json()["state"] == "running", "the first job")
        status = [client.get(j["status_url"]).json() for j in jobs]
        assert [(s["state"], s["position"]) for s in status] == [("running", None), ("queued", 1), ("queued", 2)]
        gate.set()
        wait_until(lambda: all(client.get(j["status_url"]).json()["state"] == "done" for j in jobs), "the jobs")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_several_workers_share_jobs_and_sessions(built_store: tuple[Path, dict[str, str]]) -> None:
    """``--workers 2``: whichever worker answers knows every job and accepts every session cookie."""
    path, info = built_store
    proc, url = start_server(path, token=TOKEN, extra=["--workers", "2", "--port", str(_free_port())],
                             log=path.with_name("workers.serve.log"))
    try:
        api = server_at(url, TOKEN, path, info)
        wait_until(lambda: _answers(api), "both workers", timeout=60)
        status, headers, _ = api.request("GET", f"/?token={TOKEN}", token=None)
        cookie = headers["set-cookie"].split(";")[0]
        status, job = api.json("POST", "/api/jobs/predict", {"head_id": info["head_id"], "dataset": "a375"})
        assert status == 202
        done = api.wait_job(job["job_id"])
        assert done["state"] == "done"
        # new connections spread over the workers: each must answer the same
        for _ in range(20):
            assert api.json("GET", f"/api/jobs/{job['job_id']}")[1]["state"] == "done"
            assert api.request("GET", "/api/health", token=None, headers={"Cookie": cookie})[0] == 200
    finally:
        stop_server(proc)


def _answers(api: Any) -> bool:
    try:
        return all(api.request("GET", "/api/health")[0] == 200 for _ in range(4))
    except OSError:
        return False


_DYING_WORKER = """
import sys, threading, time
from scdm.server.jobs import JobBoard
board = JobBoard(sys.argv[1], max_jobs=1)
board.submit("upload", lambda job: threading.Event().wait())   # runs until the process is killed
board.submit("predict", lambda job: None)                      # queued behind it
time.sleep(600)
"""


def test_a_job_of_a_worker_that_died_reads_failed_not_running_forever(tmp_path: Path) -> None:
    # before: a worker killed (for memory, say) during an upload left it 'running' for good, and the job it had
    # queued 'queued' at position 1 for good, ahead of every job the other workers queued after it
    import os
    import subprocess
    import sys

    from tests.server.conftest import ROOT

    folder = tmp_path / "jobs"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    worker = subprocess.Popen([sys.executable, "-c", _DYING_WORKER, str(folder)], env=env)
    try:
        board = JobBoard(folder, max_jobs=1)
        wait_until(lambda: [r.state for r in board.all()] == ["queued", "running"], "the other worker's two jobs", 60)
        gate = threading.Event()
        mine = board.submit("report", lambda job: gate.wait(30))
        assert [r.state for r in board.all()] == ["queued", "queued", "running"]  # the other worker holds the slot
        assert board.get(mine.job_id).position == 2
    finally:
        worker.kill()
        worker.wait()
    wait_until(lambda: board.get(mine.job_id).state == "running", "this worker's job to take the freed slot")
    gate.set()
    running, queued = sorted((r for r in board.all() if r.job_id != mine.job_id), key=lambda r: r.created_at)
    assert (running.state, queued.state) == ("failed", "failed")
    assert running.message.startswith(f"The server worker that ran this job (process {worker.pid}) stopped before")
    assert queued.message.startswith(f"The server worker that queued this job (process {worker.pid}) stopped before")
    assert running.finished_at is not None and running.active is False
    wait_until(lambda: board.get(mine.job_id).state == "done", "this worker's job")


def test_a_job_finished_just_before_its_worker_stopped_reads_done_not_failed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # before: a reader that read 'running', then found the worker's lock free, saved 'failed' over the 'done' the worker
    # had written in between (the job finished, the worker stopped: restarted, or the server stopping)
    ran, reader = JobBoard(tmp_path / "jobs", max_jobs=1), JobBoard(tmp_path / "jobs", max_jobs=1)
    gate = threading.Event()
    job = ran.submit("upload", lambda job: gate.wait(30))
    wait_until(lambda: reader.get(job.job_id).state == "running", "the job to start")

    def finishes_then_stops(worker: str) -> bool:
        gate.set()
        wait_until(lambda: ran.get(job.job_id).state == "done", "the job to finish")
        return True

    monkeypatch.setattr(reader, "_worker_died", finishes_then_stops)
    assert reader.get(job.job_id).state == "done"
    assert ran.get(job.job_id).state == "done"
