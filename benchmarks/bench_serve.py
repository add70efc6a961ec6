"""Server load test: N concurrent clients on loopback while an evaluation job writes to the store.

Three processes share one store:
  - the server (``python -m scdm_server``, a free loopback port, bearer token on);
  - a writer that runs ``scdm_classify.grid.evaluate`` again and again (a new fold seed each
    time, so every run fits and commits new tasks) for the whole measurement;
  - this process: ``--clients`` threads that, for ``--seconds``, alternate
    ``GET /api/leaderboard`` and ``POST /api/sql`` (a count and a group-by over eval_results).

Prints one table (requests, requests/s, p50/p95/max latency and errors per route) and checks
that no request failed and no result was lost: every task the writer reports as done has its
``eval_tasks`` row and one ``eval_results`` row per metric. Exits 1 otherwise.

Usage: python benchmarks/bench_serve.py [--clients 8] [--seconds 10] [--workdir /tmp/scdm-bench-serve]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TOKEN = "bench-token-0123456789"
SQL = ["SELECT count(*) AS n FROM eval_results",
       "SELECT model, head, metric, avg(value) AS mean FROM eval_results GROUP BY ALL ORDER BY ALL"]

WRITER = r"""
import json, sys, time, warnings
sys.path.insert(0, sys.argv[3])
from scdm_classify.grid import evaluate
from store import Store
st, deadline, done, runs = Store(sys.argv[1]), time.monotonic() + float(sys.argv[2]), 0, 0
warnings.simplefilter("ignore")
while time.monotonic() < deadline:
    runs += 1
    s = evaluate(st, scenarios=["pooled"], by=["all", "tissue"], heads=["ridge", "logreg"], folds=5, seed=1000 + runs, silent=True)
    done += s.n_done
print(json.dumps({"runs": runs, "tasks_done": done}))
"""


def build(store: Path) -> None:
    from scdm_classify.grid import evaluate
    from scdm_embed.runner import embed_baseline
    from store import Store, example_data

    st = Store(store)
    st.ingest(example_data("A375"), name="a375", label_key="response_PLX4720", study="GSE108383", tissue="skin",
              cancer_type="melanoma", drug_type="targeted", regimen="PLX4720")
    embed_baseline(st, ["a375"], model="pca", n_comps=16, n_hvg=500, progress=False)
    evaluate(st, scenarios=["pooled"], by=["all"], heads=["ridge"], folds=5, seed=0, silent=True)


def start_server(store: Path) -> tuple[subprocess.Popen[str], int]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "scdm_server", "--store", str(store), "--port", "0", "--token", TOKEN],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("listening on "):
        proc.kill()
        raise SystemExit(f"server did not start: {line!r}")
    return proc, int(line.rstrip().rstrip("/").rsplit(":", 1)[1])


class Client(threading.Thread):
    def __init__(self, port: int, deadline: float, index: int) -> None:
        super().__init__(daemon=True)
        self.port, self.deadline, self.index = port, deadline, index
        self.samples: list[tuple[str, float, bool, str]] = []

    def call(self, method: str, path: str, body: dict | None) -> tuple[bool, str]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        headers = {"Authorization": f"Bearer {TOKEN}"}
        data = None
        if body is not None:
            data, headers["Content-Type"] = json.dumps(body).encode(), "application/json"
        try:
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            payload = resp.read()
            if resp.status != 200:
                return False, f"{resp.status} {payload[:200]!r}"
            json.loads(payload)
            return True, ""
        except Exception as err:  # counted as an error, reported below
            return False, f"{type(err).__name__}: {err}"
        finally:
            conn.close()

    def run(self) -> None:
        i = self.index
        while time.monotonic() < self.deadline:
            if i % 2 == 0:
                route, method, path, body = "leaderboard", "GET", "/api/leaderboard?metric=auroc,f1", None
            else:
                route, method, path, body = "sql", "POST", "/api/sql", {"query": SQL[(i // 2) % 2], "max_rows": 200}
            t0 = time.perf_counter()
            ok, why = self.call(method, path, body)
            self.samples.append((route, time.perf_counter() - t0, ok, why))
            i += 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "scdm-bench-serve"))
    args = parser.parse_args()
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    store = work / "store"
    build(store)
    from store import Store

    before = int(Store(store).query("SELECT count(*) AS n FROM eval_tasks")["n"].iloc[0])
    server, port = start_server(store)
    try:
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(store), str(args.seconds), str(ROOT)],
                                  cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        t0 = time.monotonic()
        clients = [Client(port, t0 + args.seconds, i) for i in range(args.clients)]
        for c in clients:
            c.start()
        for c in clients:
            c.join()
        wall = time.monotonic() - t0
        out, err = writer.communicate(timeout=600)
        if writer.returncode != 0:
            print(err, file=sys.stderr)
            raise SystemExit("the evaluation writer failed")
        written = json.loads(out.strip().splitlines()[-1])
    finally:
        server.terminate()
        server.wait(timeout=30)
    samples = [s for c in clients for s in c.samples]
    st = Store(store)
    after = int(st.query("SELECT count(*) AS n FROM eval_tasks")["n"].iloc[0])
    orphans = int(st.query("SELECT count(*) AS n FROM eval_tasks t WHERE (SELECT count(*) FROM eval_results r "
                           "WHERE r.task_id = t.task_id) = 0")["n"].iloc[0])
    print(f"{args.clients} clients, {wall:.1f} s, writer: {written['runs']} evaluate runs, {written['tasks_done']} tasks committed "
          f"(cores: {os.cpu_count()})")
    print(f"{'route':<12}{'requests':>10}{'req/s':>9}{'p50 ms':>9}{'p95 ms':>9}{'max ms':>9}{'errors':>8}")
    for route in ("leaderboard", "sql", "all"):
        rows = [s for s in samples if route == "all" or s[0] == route]
        lat = np.array([s[1] for s in rows]) * 1000 if rows else np.zeros(1)
        errors = sum(not s[2] for s in rows)
        print(f"{route:<12}{len(rows):>10}{len(rows) / wall:>9.1f}{np.percentile(lat, 50):>9.1f}"
              f"{np.percentile(lat, 95):>9.1f}{lat.max():>9.1f}{errors:>8}")
    failures = [s[3] for s in samples if not s[2]]
    lost = before + written["tasks_done"] - after
    print(f"eval_tasks: {before} before + {written['tasks_done']} written = {after} stored (lost: {lost}; tasks without results: {orphans})")
    for why in failures[:5]:
        print("error:", why)
    return 1 if failures or lost or orphans else 0


if __name__ == "__main__":
    raise SystemExit(main())
