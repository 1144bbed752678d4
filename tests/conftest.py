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

from hypothesis import HealthCheck, settings

_COMMON = dict(
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

settings.register_profile("ci", derandomize=True, max_examples=20, **_COMMON)
settings.register_profile("dev", max_examples=80, **_COMMON)
settings.load_profile(
    os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev")
)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than a few seconds; still run in CI")
