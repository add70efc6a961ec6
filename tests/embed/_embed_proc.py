"""Helper process for the concurrent-embedding tests: one ``embed`` of the toy adapter.

Usage: python _embed_proc.py STORE DATASET CHECKPOINT CHUNK_ROWS
Prints ``ready`` once imported; with ``SCDM_TEST_GO`` set, waits for that file before embedding
(so that two processes start together), then prints the result as JSON.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from scdm.embedding.runner import embed  # noqa: E402
from tests.embed import toy_adapter  # noqa: E402, F401  (registers toy-test)


def main() -> None:
    store, dataset, ckpt, chunk_rows = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    print("ready", flush=True)
    go = os.environ.get("SCDM_TEST_GO")
    while go and not Path(go).exists():
        time.sleep(0.01)
    result = embed(store, dataset, "toy-test", ckpt, chunk_rows=chunk_rows, progress=False)
    print(json.dumps({"embedding_id": result.embedding_id, "computed": result.computed_chunks}), flush=True)


if __name__ == "__main__":
    main()
