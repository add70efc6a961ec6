"""Polling a server job until it ends, for tests that drive the JSON API with a TestClient."""

from __future__ import annotations

import time
from typing import Any


def finished(client: Any, job: dict[str, Any], timeout: float = 60.0, poll: float = 0.05) -> dict[str, Any]:
    """The job's status once it is neither queued nor running (or its last status at ``timeout`` seconds)."""
    deadline = time.monotonic() + timeout
    while job["state"] in ("queued", "running") and time.monotonic() < deadline:
        time.sleep(poll)
        job = client.get(job["status_url"]).json()
    return job
