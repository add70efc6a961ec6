"""A small store with a baseline embedding, evaluation results and a trained head; the app over it
through FastAPI's TestClient, and a real ``scdm serve`` (uvicorn) process on a free loopback port
(started per module, stopped at its end)."""

from __future__ import annotations

import http.client
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from scdm.store import Store, example_data

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "test-token-0123456789"
START_TIMEOUT_S = 60.0


def build_store(path: Path) -> dict[str, str]:
    """A375 ingested, a pca baseline, a 3-fold ridge evaluation and a trained ridge head."""
    import warnings

    from scdm.classify.grid import evaluate
    from scdm.classify.trained_heads import train_head
    from scdm.embedding.runner import embed_baseline
    from scdm.store.splits import SampleLeakageWarning

    st = Store(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SampleLeakageWarning)
        st.ingest(example_data("A375"), name="a375", label_key="response_PLX4720", study="GSE108383", tissue="skin",
                  cancer_type="melanoma", drug_type="targeted", regimen="PLX4720")
    (result,) = embed_baseline(st, ["a375"], model="pca", n_comps=8, n_hvg=200, progress=False)
    evaluate(st, scenarios=["pooled"], by=["all", "tissue"], heads=["ridge"], folds=3, silent=True)
    head_id = train_head(st, [result.embedding_id], "all", "all", "ridge")
    return {"head_id": head_id, "embedding_id": result.embedding_id}


@dataclass
class Server:
    """A running server and a small HTTP client for it (http.client: every header is as given)."""

    url: str
    host: str
    port: int
    token: str | None
    store: Path
    info: dict[str, str]

    def request(self, method: str, path: str, body: bytes | dict[str, Any] | None = None, *, token: str | None = "default",
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
        hdrs = dict(headers or {})
        use = self.token if token == "default" else token
        if use:
            hdrs["Authorization"] = f"Bearer {use}"
        if isinstance(body, dict):
            body = json.dumps(body).encode()
            hdrs.setdefault("Content-Type", "application/json")
        try:
            conn.request(method, path, body=body, headers=hdrs)
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    def json(self, method: str, path: str, body: Any = None, **kw: Any) -> tuple[int, Any]:
        status, _, data = self.request(method, path, body, **kw)
        return status, json.loads(data)

    def wait_job(self, job_id: str, timeout: float = 60.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status, job = self.json("GET", f"/api/jobs/{job_id}")
            assert status == 200
            if job["state"] not in ("queued", "running"):
                return job
            time.sleep(0.1)
        raise AssertionError(f"job {job_id} did not finish in {timeout} s")


def start_server(store: Path, *, token: str | None, extra: list[str] | None = None,
                 log: Path | None = None) -> tuple[subprocess.Popen[bytes], str]:
    """``scdm --store STORE serve --port 0 ...`` as a user runs it; returns the process and its URL.

    The server's stderr goes to ``log`` (default: ``<store>.serve.log``), read for the URL it prints.
    """
    cmd = [sys.executable, "-m", "scdm", "--store", str(store), "serve", "--port", "0", *(extra or [])]
    if token:
        cmd += ["--token", token]
    # this checkout's source first: an installed scdm (another checkout's, editable) must not answer instead
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]), "OMP_NUM_THREADS": "1"}
    env.pop("SCDM_TOKEN", None)
    log = log or store.with_name(store.name + ".serve.log")
    with open(log, "wb") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        found = re.search(r"listening on (http://\S+)", log.read_text(errors="replace"))
        if found:
            return proc, found.group(1)
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    stop_server(proc)
    raise AssertionError(f"server did not start (exit {proc.returncode}): {log.read_text(errors='replace')}")


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def server_at(url: str, token: str | None, store: Path, info: dict[str, str]) -> Server:
    host, port = url.removeprefix("http://").split("/")[0].rsplit(":", 1)
    return Server(url, host, int(port), token, store, info)


@pytest.fixture(scope="module")
def built_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    path = tmp_path_factory.mktemp("serve") / "store"
    return path, build_store(path)


@pytest.fixture(scope="module")
def server(built_store: tuple[Path, dict[str, str]]) -> Iterator[Server]:
    """A real ``scdm serve`` with a token over the built store (uploads up to twice the A375 file)."""
    path, info = built_store
    size = Path(example_data("A375")).stat().st_size
    proc, url = start_server(path, token=TOKEN, extra=["--max-upload-mb", str(2 * size / 2**20)])
    yield server_at(url, TOKEN, path, info)
    stop_server(proc)


@pytest.fixture(scope="module")
def client(built_store: tuple[Path, dict[str, str]]) -> Iterator[Any]:
    """FastAPI's TestClient over the built store, with the token sent on every request."""
    from fastapi.testclient import TestClient

    from scdm.server import create_app

    path, _ = built_store
    app = create_app(Store(path), token=TOKEN)
    with TestClient(app, base_url="http://127.0.0.1:8000", headers={"Authorization": f"Bearer {TOKEN}"}) as test_client:
        yield test_client
