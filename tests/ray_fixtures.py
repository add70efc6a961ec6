"""A local Ray cluster for the tests that exercise the Ray executors (one per pytest process).

Import the fixture into a test module with ``from tests.ray_fixtures import ray_local  # noqa: F401``,
and mark the module with :data:`RETRY_A_RAY_CRASH`. The module skips when Ray is not installed.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

ray = pytest.importorskip("ray")

RETRY_A_RAY_CRASH = pytest.mark.flaky(reruns=1)
"""Run a test of these modules once more if it fails or its pytest-xdist worker dies (pytest-rerunfailures).

Once in the CI runs of December 2026 (ray 2.60, 2 cores, two xdist workers each with its local
cluster), a worker died inside test_resume_crosses_executors with no Python traceback: Ray's core
worker ended the driver process. It did not come back in 5 runs of both Ray modules on 2 loaded cores
afterwards. A test that fails for a reason of scdm's fails its second run as well, and the summary
lists every rerun ("1 rerun"), so a retry is never silent.
"""


@pytest.fixture(scope="session")
def ray_local() -> Iterator[Any]:
    """``ray`` connected to a 2-CPU local cluster started once per session, shut down at the end."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    yield ray
    ray.shutdown()
