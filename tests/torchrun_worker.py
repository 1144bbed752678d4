"""A torchrun worker for test_torchrun.py: ``fixedpoint generate`` with an injected fault.

``FIXEDPOINT_TEST_FAULT=<kind>:<index>`` makes the rank that samples global index
``index`` fail there: ``overflow`` puts a huge finite value into that sample's noise (the
network overflows, the solver reports NONFINITE), ``exit`` kills the process on the spot
(``os._exit(17)``, as a segfault or an out-of-memory kill would).  Only the test suite
uses this file; the library has no fault hooks.
"""

from __future__ import annotations

import os
import sys

from fixedpoint.cli import main
from fixedpoint.tarflow import generate

kind, _, where = os.environ["FIXEDPOINT_TEST_FAULT"].partition(":")
target = int(where)
clean = generate.sample_noise


def faulty(indices, seed, seq_len, token_dim):
    z = clean(indices, seed, seq_len, token_dim)
    if target in indices:
        if kind == "exit":
            os._exit(17)
        z[list(indices).index(target), 3] = 1e38
    return z


generate.sample_noise = faulty
raise SystemExit(main(sys.argv[1:]))
