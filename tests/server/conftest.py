"""A small store with a baseline embedding, evaluation results and a trained head, and a real
``scdm_server`` process on a free loopback port (started per module, stopped at its end)."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from store import Store, example_data

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "test-token-0123456789"


def build_store(path: Path) -> dict[str, str]:
    """A375 ingested, a pca baseline, a 3-fold ridge evaluation and a trained ridge head."""
    from scdm_classify.grid import evaluate
    from scdm_classify.trained_heads import train_head
    from scdm_embed.runner import embed_baseline

    st = Store(path)
    st.ingest(example_data("A375"), name="a375", label_key="response_PLX4720", study="GSE108383", tissue="skin",
              cancer_type="melanoma", drug_type="targeted", regimen="PLX4720")
    (result,) = embed_baseline(st, ["a375"], model="pca", n_comps=8, n_hvg=200, progress=False)
    evaluate(st, scenarios=["pooled"], by=["all", "tissue"], heads=["ridge"], folds=3, silent=True)
    head_id = train_head(st, [result.embedding_id], "all", "all", "ridge")
    return {"head_id": head_id, "embedding_id": result.embedding_id}


@dataclass
class Server:
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
            hdrs["Content-Type"] = "application/json"
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


def start_server(store: Path, *, token: str | None, extra: list[str] | None = None) -> tuple[subprocess.Popen[str], str]:
    cmd = [sys.executable, "-m", "scdm_server", "--store", str(store), "--port", "0", *(extra or [])]
    if token:
        cmd += ["--token", token]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("SCDM_TOKEN", None)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()  # "listening on http://127.0.0.1:PORT/" once bound
    if not line.startswith("listening on "):
        proc.kill()
        raise AssertionError(f"server did not start: {line!r} {proc.stderr.read() if proc.stderr else ''}")
    return proc, line.split()[-1]


def stop_server(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    path = tmp_path_factory.mktemp("serve") / "store"
    info = build_store(path)
    size = Path(example_data("A375")).stat().st_size
    proc, url = start_server(path, token=TOKEN, extra=["--max-upload-bytes", str(2 * size)])
    host, port = url.removeprefix("http://").rstrip("/").split(":")
    yield Server(url, host, int(port), TOKEN, path, info)
    stop_server(proc)
