"""Helper process for the concurrency tests: a job on one embedding of ``_writer.py``'s shape.

Usage:
  python _job_proc.py STORE DATASET hold SECONDS          hold a job (no chunk) for SECONDS
  python _job_proc.py STORE DATASET claim CHUNK SECONDS   hold a job and a claim on CHUNK
  python _job_proc.py STORE DATASET share DELAY_S         compute the missing chunks it can claim
                                                          (DELAY_S each), wait for the rest

Prints ``ready`` once the job is open (and the claim held), and for ``share`` the chunks it
computed as JSON on the last line. With ``SCDM_TEST_GO`` set, ``share`` waits for that file to
exist before claiming anything, so that two processes start together.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.store._writer import open_embedding, rows_of  # noqa: E402


def main() -> None:
    store, dataset, mode = sys.argv[1], sys.argv[2], sys.argv[3]
    emb = open_embedding(store, dataset)
    with emb.job() as job:
        if mode == "hold":
            print("ready", flush=True)
            time.sleep(float(sys.argv[4]))
            return
        if mode == "claim":
            assert job.claim(int(sys.argv[4]))
            print("ready", flush=True)
            time.sleep(float(sys.argv[5]))
            return
        delay = float(sys.argv[4])
        print("ready", flush=True)
        go = os.environ.get("SCDM_TEST_GO")
        while go and not Path(go).exists():
            time.sleep(0.01)
        computed = []
        with emb.writer(job=job) as writer:
            todo = emb.missing_chunks()
            while todo:
                elsewhere = []
                for chunk in todo:
                    if not writer.claim(chunk):
                        elsewhere.append(chunk)
                        continue
                    time.sleep(delay)
                    lo, hi = emb.chunk_bounds(chunk)
                    writer.write(chunk, rows_of(lo, hi))
                    computed.append(chunk)
                todo = writer.wait_for(elsewhere) if elsewhere else []
        print(json.dumps(computed), flush=True)


if __name__ == "__main__":
    main()
