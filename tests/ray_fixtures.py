"""A local Ray cluster for the tests that exercise the Ray executors (one per pytest process).

Import the fixture into a test module with ``from tests.ray_fixtures import ray_local  # noqa: F401``.
The module skips when Ray is not installed.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

ray = pytest.importorskip("ray")


@pytest.fixture(scope="session")
def ray_local() -> Iterator[Any]:
    """``ray`` connected to a 2-CPU local cluster started once per session, shut down at the end."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    yield ray
    ray.shutdown()
