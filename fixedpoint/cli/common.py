"""What every command group of the CLI shares: errors, option helpers, checked numbers.

A group module (``fixedpoint/cli/<app>.py``) reuses these instead of redefining them, so
that ``--device``, ``--threads`` and friends mean the same everywhere and every numeric
option refuses NaN, infinities and out-of-range values in the same words. Nothing here
imports an application or torch at module level (the handlers do, when they run).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

PROG = "fixedpoint"
RESUMES = "rerunning the same command resumes where it stopped"


class UserError(Exception):
    """An error the user can fix (bad option, missing file): one line, exit status 2."""


class CommandFailed(Exception):
    """The command ran but could not finish (e.g. the solver diverged): one line, exit 1."""


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line (no usage block), exit status 2.

    Sub-parsers made by ``add_subparsers().add_parser`` inherit the class, so every
    command of every group reports bad arguments the same way as a :class:`UserError`.
    """

    def error(self, message: str) -> NoReturn:
        # "argument --batch: must be >= 1, got 0" (a checked type) -> "--batch must be ..."
        message = re.sub(r"^argument (\S+): (must be) ", r"\1 \2 ", message)
        self.exit(2, f"{self.prog}: error: {message}\n")


@contextlib.contextmanager
def user_errors(*kinds: type[BaseException]) -> Iterator[None]:
    """Report the given exception types (an application's bad-input errors) as UserError."""
    try:
        yield
    except kinds as exc:
        raise UserError(str(exc)) from None


# ------------------------------------------------------------------ checked numbers


def _bounds_text(low: float | None, high: float | None, open_low: bool) -> str:
    def show(v: float) -> str:
        return str(v) if isinstance(v, int) else f"{v:g}"

    if low is not None and high is not None:
        return f"in {'(' if open_low else '['}{show(low)}, {show(high)}]"
    if low is not None:
        return f"{'>' if open_low else '>='} {show(low)}"
    return f"<= {show(high)}"


def checked_int(low: int | None = None, high: int | None = None) -> Callable[[str], int]:
    """An argparse ``type``: an integer in ``[low, high]`` (either bound optional)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if (low is not None and value < low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(
                f"must be {_bounds_text(low, high, False)}, got {value}")
        return value

    parse.__name__ = "integer"  # argparse names the type in some messages
    return parse


def checked_float(
    low: float | None = None, high: float | None = None, *, open_low: bool = False
) -> Callable[[str], float]:
    """An argparse ``type``: a finite float in ``[low, high]`` (``(low, high]`` with
    ``open_low``). NaN and infinities are always refused: no option means them."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        too_low = low is not None and (value <= low if open_low else value < low)
        if too_low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(
                f"must be {_bounds_text(low, high, open_low)}, got {value:g}")
        return value

    parse.__name__ = "number"
    return parse


positive_int = checked_int(1)  # batch sizes, counts, steps
nonnegative_int = checked_int(0)
seed_int = checked_int(0, 2**63 - 1)  # what torch.Generator.manual_seed accepts
positive_float = checked_float(0.0, open_low=True)  # learning rates, temperatures, epochs
nonnegative_float = checked_float(0.0)  # absolute tolerances, noise levels
relative_tolerance = checked_float(0.0, 0.5)  # rtol >= 1 would accept any update
# CFG strength: 0 is off. The trained digits model already diverges at 50; a value
# above 100 is taken for a typo rather than run for minutes into NaN.
guidance_float = checked_float(0.0, 100.0)


# ---------------------------------------------------------------- shared options


def add_device_options(parser: Any, dtypes: Sequence[str] = ("float32", "bfloat16")) -> None:
    """``--device`` (cpu, cuda, cuda:N, auto) and ``--dtype``; resolve them with
    :func:`device` and :func:`precision`. ``parser``: a parser or an argument group."""
    parser.add_argument("--device", default="cpu",
                        help="cpu, cuda (under torchrun: the GPU of the local rank), cuda:N "
                             "or auto (CUDA if available); default cpu")
    parser.add_argument("--dtype", choices=tuple(dtypes), default=dtypes[0],
                        help=f"compute dtype; bfloat16 = autocast (default {dtypes[0]})")


def add_threads_option(parser: Any) -> None:
    """``--threads``: main() sets torch's CPU thread count for the command and restores
    the previous count when the command returns (nothing else needs to read it)."""
    parser.add_argument(
        "--threads", type=positive_int, default=None,
        help="torch CPU threads for this command (default: torch's choice; 1 is faster "
             "when another process keeps the other core busy)")


def add_quiet_option(parser: Any) -> None:
    parser.add_argument("--quiet", action="store_true", help="no progress bars or notes")


def add_seed_option(parser: Any, default: int = 0) -> None:
    parser.add_argument("--seed", type=seed_int, default=default,
                        help=f"random seed (default {default})")


def add_data_options(parser: Any, datasets: Sequence[str] = ("digits", "mnist")) -> None:
    """``--dataset`` and ``--data-dir`` (for :func:`fixedpoint.data.load_dataset`)."""
    parser.add_argument("--dataset", choices=tuple(datasets), default=None,
                        help="data set (default: the checkpoint's, or digits)")
    parser.add_argument("--data-dir", default=None, metavar="DIR",
                        help="MNIST folder with the IDX files (default: "
                             "$FIXEDPOINT_MNIST_DIR or ../shared/data/mnist)")


def add_common_options(parser: argparse.ArgumentParser) -> Any:
    """All of the above in one "common options" group (returned, to add more to it)."""
    group = parser.add_argument_group("common options")
    add_data_options(group)
    add_seed_option(group)
    add_device_options(group)
    add_threads_option(group)
    add_quiet_option(group)
    return group


# ---------------------------------------------------------------- resolving options


def note(args: argparse.Namespace, message: str) -> None:
    """A progress note on stderr, unless ``--quiet``."""
    if not getattr(args, "quiet", False):
        print(message, file=sys.stderr)


def device(args: argparse.Namespace) -> Any:
    """The ``torch.device`` of ``--device``; UserError if it is malformed or absent."""
    import torch

    if args.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(args.device)
    except (RuntimeError, ValueError) as exc:
        raise UserError(f"bad --device {args.device!r}: {exc}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {args.device}: CUDA is not available on this machine")
    return dev


def precision(args: argparse.Namespace, dev: Any) -> Any:
    """Context for ``--dtype``: nothing for float32, ``torch.autocast`` for bfloat16.

    Models keep float32 weights; under autocast their linear layers run in bfloat16
    while normalisations, softmax and exp stay in float32.
    """
    import torch

    if args.dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=dev.type, dtype=getattr(torch, args.dtype))


@contextlib.contextmanager
def thread_count(threads: int | None) -> Iterator[None]:
    """Run with ``threads`` torch CPU threads (None: leave as is), then restore."""
    if threads is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------- shared output


def save_grid(images: Any, path: str | Path, nrow: int | None = None) -> Path:
    """Write images ``(B, C, H, W)`` in ``[-1, 1]`` as one PNG grid (nearest upscaling)."""
    # matplotlib.image writes PNGs without pyplot, so no GUI backend is ever selected.
    import matplotlib.image
    import numpy as np

    x = images.detach().float().cpu().clamp(-1, 1).numpy()
    b, c, h, w = x.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(b)))
    ncol = math.ceil(b / nrow)
    pad = 1
    grid = np.ones((c, ncol * (h + pad) + pad, nrow * (w + pad) + pad), dtype=np.float32)
    for i in range(b):
        r, q = divmod(i, nrow)
        top, left = pad + r * (h + pad), pad + q * (w + pad)
        grid[:, top : top + h, left : left + w] = x[i]
    # Upscale (nearest) so that 8x8 digits are visible in an image viewer: >= 512 px wide.
    scale = max(1, -(-512 // grid.shape[2]))
    grid = grid.repeat(scale, axis=1).repeat(scale, axis=2)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if c == 1:
        matplotlib.image.imsave(path, grid[0], cmap="gray", vmin=-1.0, vmax=1.0)
    else:
        matplotlib.image.imsave(path, (grid.transpose(1, 2, 0) + 1.0) / 2.0)
    return path


def cost_table(results: Sequence[Any], methods: Sequence[str] | None = None,
               label: str = "block") -> str:
    """Cost table of solver results (``fp.Result``): iterations, dependent steps, token
    evaluations, wall-clock and status per row, then the totals.

    ``methods`` are the matching method descriptions; ``label`` names the rows (TarFlow:
    blocks, in forward order).
    """
    header = (label, "method", "iters", "dep.steps", "token evals", "wall ms", "status")
    rows = []
    for k, res in enumerate(results):
        method = methods[k] if methods is not None and k < len(methods) else "-"
        rows.append((str(k), method, str(res.iterations), str(res.dependent_steps),
                     f"{res.token_evals:,}", f"{res.wall_time * 1e3:.1f}",
                     getattr(res.status, "name", str(res.status))))
    rows.append(("total", "", str(sum(r.iterations for r in results)),
                 str(sum(r.dependent_steps for r in results)),
                 f"{sum(r.token_evals for r in results):,}",
                 f"{sum(r.wall_time for r in results) * 1e3:.1f}", ""))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = []
    for i, row in enumerate([header, *rows]):
        cells = [c.ljust(widths[j]) if j in (1, 6) else c.rjust(widths[j])
                 for j, c in enumerate(row)]
        lines.append("  ".join(cells).rstrip())
        if i == 0 or i == len(rows) - 1:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
