"""Command-line interface: ``fixedpoint <command>`` (or ``python -m fixedpoint``).

Every module of this package except :mod:`~fixedpoint.cli.common` is a command group,
found at start-up: it defines ``register(subparsers) -> None``, which adds its commands
(``tarflow``: ``train``, ``sample``, ``metrics``, ``generate``, ``convert`` at the top
level; ``demo``; an application adds ``fixedpoint/cli/<app>.py`` with a ``<app>``
command and its own sub-commands) and gives each a handler with
``set_defaults(func=handler)``, ``handler(args) -> int``.

main() runs the handler with ``--threads`` applied (and the previous thread count
restored afterwards) and turns the failures a user meets into one line on stderr:
:class:`~fixedpoint.cli.common.UserError` and bad arguments exit 2,
:class:`~fixedpoint.cli.common.CommandFailed` exits 1, Ctrl-C exits 130 (saying whether
rerunning resumes). Applications are imported inside the handlers, so ``--help`` loads
none of them (torch itself comes with ``import fixedpoint``, the solver core).
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys
from collections.abc import Sequence
from types import ModuleType

from .common import PROG, CommandFailed, Parser, UserError, thread_count

__all__ = ["CommandFailed", "UserError", "build_parser", "group_modules", "main"]

_NOT_GROUPS = {"common"}


def group_modules() -> list[ModuleType]:
    """The command-group modules of this package, in name order."""
    names = sorted(info.name for info in pkgutil.iter_modules(__path__)
                   if info.name not in _NOT_GROUPS and not info.name.startswith("_"))
    return [importlib.import_module(f"{__name__}.{name}") for name in names]


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog=PROG,
        description="Parallel solvers for triangular systems x = F(x), applied to "
                    "generative models.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in group_modules():
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (also for ``--help`` and bad arguments)."""
    try:
        return _run(list(sys.argv[1:] if argv is None else argv))
    except BrokenPipeError:
        # The reader went away (`fixedpoint demo | head`): stop quietly, as cat would.
        # Point stdout at devnull so the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE


def _run(argv: list[str]) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or a bad argument (2), already printed
        return exc.code if isinstance(exc.code, int) else 0
    try:
        with thread_count(getattr(args, "threads", None)):
            return args.func(args)
    except UserError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except CommandFailed as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        hint = getattr(args, "on_interrupt", None)
        print(f"{PROG}: interrupted" + (f"; {hint}" if hint else ""), file=sys.stderr)
        return 130
