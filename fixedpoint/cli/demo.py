"""``fixedpoint demo``: every solver method on a few synthetic triangular systems."""

from __future__ import annotations

import argparse
from typing import Any

from .common import add_threads_option, positive_int


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "demo", help="run the solver demonstration",
        description="Every solver method on three synthetic triangular systems (float64, "
                    "CPU): iterations, dependent steps, error against the exact solution, "
                    "wall-clock.")
    p.add_argument("--length", type=positive_int, default=64,
                   help="sequence length T (default 64)")
    p.add_argument("--batch", type=positive_int, default=4,
                   help="systems solved together (default 4)")
    p.add_argument("--repeats", type=positive_int, default=3,
                   help="timed runs per method; the median is shown (default 3)")
    add_threads_option(p)
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    from fixedpoint.demo import run

    run(length=args.length, batch=args.batch, repeats=args.repeats)
    return 0
