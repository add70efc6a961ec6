"""An upload's file lives while its job runs, not after.

Before: ``<store>/uploads/<job id>/<file>`` was removed only when the job failed. A done job kept it
for good (a second full copy: the ingest copies the data into the store, ``stored_path``, and reads
nothing from the upload afterwards), and a job whose server worker died kept it too.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from scdm.server.jobs import JobBoard, JobFolder, new_job_id, remove_abandoned_folders
from scdm.store import Store, example_data
from tests.server.jobwait import finished


def test_an_upload_is_removed_when_its_job_is_done_and_the_store_reads_its_own_copy(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from scdm.server import create_app

    store = Store(tmp_path / "store")
    with TestClient(create_app(store), base_url="http://127.0.0.1:8000") as client:
        answer = client.post("/api/upload?filename=a375.h5ad&label_key=response_PLX4720",
                             content=Path(example_data("A375")).read_bytes(),
                             headers={"Content-Type": "application/octet-stream"})
        assert answer.status_code == 202, answer.text
        job = finished(client, answer.json())
    assert job["state"] == "done", job
    assert list((store.root / "uploads").iterdir()) == []  # neither the folder nor its lock
    info = store.dataset("a375")
    assert info.source_path == str(store.root.resolve() / "uploads" / job["job_id"] / "a375.h5ad")  # provenance only
    assert (store.root / info.stored_path).is_file()
    assert store.open_anndata("a375", backed=False).n_obs == info.n_cells


_DYING_UPLOAD = """
import sys, threading, time
from pathlib import Path
from scdm.server.jobs import JobBoard, JobFolder, new_job_id
board, uploads = JobBoard(sys.argv[1]), Path(sys.argv[2])
job_id = new_job_id()
folder = JobFolder(uploads, job_id)
folder.path.mkdir()
(folder.path / "x.h5ad").write_bytes(b"uploaded")
board.submit("upload", lambda job: threading.Event().wait(), on_failure=folder.remove, job_id=job_id)
time.sleep(600)
"""


def test_the_upload_of_a_job_whose_worker_died_is_removed_when_the_job_is_found_failed(tmp_path: Path) -> None:
    from tests.server.conftest import ROOT

    jobs, uploads = tmp_path / "jobs", tmp_path / "store" / "uploads"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    worker = subprocess.Popen([sys.executable, "-c", _DYING_UPLOAD, str(jobs), str(uploads)], env=env)
    try:
        board = JobBoard(jobs, on_dead=lambda record: remove_abandoned_folders(uploads, [record.job_id]))
        deadline = time.monotonic() + 60
        while [r.state for r in board.all()] != ["running"] and time.monotonic() < deadline:
            time.sleep(0.05)
        (running,) = board.all()
        assert running.state == "running"
        assert remove_abandoned_folders(uploads) == []  # the job runs: its upload stays
        assert (uploads / running.job_id / "x.h5ad").is_file()
    finally:
        worker.kill()
        worker.wait()
    assert board.get(running.job_id).state == "failed"
    assert sorted(p.name for p in uploads.iterdir()) == []


def test_a_server_starting_removes_the_uploads_no_running_job_holds(tmp_path: Path) -> None:
    from scdm.server import create_app

    store = Store(tmp_path / "store")
    uploads = store.root / "uploads"
    left = uploads / new_job_id()  # a worker killed mid-job, before its lock files existed or after
    left.mkdir(parents=True)
    (left / "x.h5ad").write_bytes(b"uploaded")
    (uploads / f".{new_job_id()}.lock").touch()  # a lock left without its folder
    running = JobFolder(uploads, new_job_id())  # another server's job on this store, running
    running.path.mkdir()
    try:
        create_app(store)
        assert sorted(p.name for p in uploads.iterdir()) == [f".{running.path.name}.lock", running.path.name]
    finally:
        running.remove()
    assert list(uploads.iterdir()) == []
