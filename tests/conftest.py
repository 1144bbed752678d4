"""Shared pytest configuration: hypothesis profiles and the ``slow`` marker.

Profiles (choose with the environment variable ``HYPOTHESIS_PROFILE``; the default is
``ci`` when ``CI`` is set, else ``dev``):

* ``ci``: derandomized (the same examples on every run, so CI is reproducible), a
  moderate number of examples, no deadline (shared 2-core machines have noisy timing),
  failing examples printed with a reproduction blob.
* ``dev``: random examples, several times more of them, to hunt for new failures.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# The tests use small tensors, for which intra-op threads only add overhead, and on a
# shared 2-core machine two busy-waiting OpenMP threads slow them down five- to tenfold
# (measured: the solver property tests took 78 s with 2 threads under load, 15 s with 1).
# FIXEDPOINT_TEST_THREADS overrides.
THREADS = int(os.environ.get("FIXEDPOINT_TEST_THREADS", "1"))
torch.set_num_threads(THREADS)

_COMMON = dict(
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

settings.register_profile("ci", derandomize=True, max_examples=50, **_COMMON)
settings.register_profile("dev", max_examples=200, **_COMMON)
settings.load_profile(
    os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev")
)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than a few seconds; still run in CI")


@pytest.fixture(autouse=True, scope="module")
def _test_threads():
    """Every test module starts with THREADS torch threads, whatever an earlier one (e.g.
    a CLI call with --threads) left behind."""
    torch.set_num_threads(THREADS)
    yield
