"""Shared pytest configuration: hypothesis profiles, threads, the generated-case count.

(The ``slow`` marker is registered once, in pyproject.toml.)

Profiles (choose with the environment variable ``HYPOTHESIS_PROFILE``; the default is
``ci`` when ``CI`` is set, else ``dev``):

* ``ci``: derandomized (the same examples on every run, so CI is reproducible), 60
  examples per property test (some tests ask for half), no deadline (shared 2-core
  machines have noisy timing), failing examples printed with a reproduction blob.  The
  whole suite then generates at least 2,000 test cases (the summary line printed at the
  end of every run counts them: 2310 in the solver, systems and testing-helper files
  alone; their run took 3.3 min wall, 100 s CPU, on the shared machine).
* ``dev``: random examples, several times more of them, to hunt for new failures.
"""

from __future__ import annotations

import os
import re

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

settings.register_profile("ci", derandomize=True, max_examples=60, **_COMMON)
settings.register_profile("dev", max_examples=200, **_COMMON)
settings.load_profile(
    os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev")
)


_GENERATED = re.compile(r"during generate phase .*?\n.*?\n\s*- (\d+) passing", re.S)


def pytest_terminal_summary(terminalreporter):
    """One line with the hypothesis test cases this run generated and passed (summed over
    the generate phase of every test's statistics, which the hypothesis plugin attaches
    to each report), so the CI profile's total can be read off every run."""
    cases = tests = 0
    for reports in terminalreporter.stats.values():
        for report in reports:
            stats = report.__dict__.get("_hypothesis_stats")
            if stats:
                tests += 1
                cases += sum(int(n) for n in _GENERATED.findall(stats))
    if tests:
        profile = settings.get_current_profile_name()
        terminalreporter.write_line(
            f"hypothesis ({profile} profile): {cases} generated test cases passed in "
            f"{tests} property tests"
        )


@pytest.fixture(autouse=True, scope="module")
def _test_threads():
    """Every test module starts with THREADS torch threads, whatever an earlier one (e.g.
    a CLI call with --threads) left behind."""
    torch.set_num_threads(THREADS)
    yield
