"""What the diffusion studies share: the command line, output paths, the accuracy sweep."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fixedpoint.diffusion import ChainMap, solve_chain

from .common import MODES, Mode

TOLERANCES = (3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5, 1e-6)
# Classifier-free guidance strength with which the studies sample the class-conditional
# models (each network call then evaluates a conditional and an unconditional row).
GUIDANCE = 2.0


def parse_args(doc: str, argv: list[str] | None = None,
               samplers: tuple[str, ...] = (), revalue: bool = False) -> argparse.Namespace:
    """``--mode`` and ``--models`` (the trained models to study; default: every one
    available, see :func:`model_names`), ``--samplers`` when the study offers a choice
    (``samplers``), ``--revalue`` when it can recompute its section values from its JSON;
    fixes torch to one thread."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--mode", choices=MODES, default="fast")
    parser.add_argument("--models", nargs="+", choices=("digits", "mnist"), default=None)
    if samplers:
        parser.add_argument("--samplers", nargs="+", choices=samplers, default=list(samplers),
                            help="study only these samplers (default: all)")
    if revalue:  # the studies that can revalue are the ones with a table of named methods
        parser.add_argument("--methods", nargs="+", default=None, metavar="TEXT",
                            help="study only the methods whose name contains one of these "
                            "(case-insensitive; default: all)")
        parser.add_argument("--revalue", action="store_true",
                            help="only recompute the section values of the existing JSON files")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    args.mode = MODES[args.mode]
    return args


def parse(doc: str, argv: list[str] | None = None) -> Mode:
    return parse_args(doc, argv).mode


def out_path(mode: Mode, name: str) -> Path:
    mode.out_dir.mkdir(parents=True, exist_ok=True)
    return mode.out_dir / name


@dataclass
class Reached:
    """The cheapest run of a tolerance sweep that met the accuracy target."""

    atol: float | None
    iterations: int
    dependent_steps: int
    network_calls: int
    network_rows: int
    error: float
    met: bool

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def final_error(x: torch.Tensor, exact: torch.Tensor) -> float:
    """Largest deviation of the final sample (last position) from the sequential one."""
    return float((x[:, -1] - exact[:, -1]).abs().max())


def sweep(
    make_map: Callable[[], ChainMap],
    make_method: Callable[[float], object],
    exact: torch.Tensor,
    target: float,
    tolerances: Sequence[float] = TOLERANCES,
) -> Reached:
    """Loosest tolerance (fewest dependent steps) whose final sample is within ``target``.

    The tolerances are tried from loose to strict; the first that meets the target is
    kept (a stricter one never costs fewer steps on these monotone iterations).
    """
    last = None
    for atol in tolerances:
        fmap = make_map()
        out = solve_chain(fmap, make_method(atol))
        err = final_error(out.result.x, exact)
        last = Reached(
            atol,
            out.result.iterations,
            out.result.dependent_steps,
            out.network.calls,
            out.network.rows,
            err,
            err <= target,
        )
        if last.met:
            return last
    assert last is not None
    return last


def slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of log(y) against log(x)."""
    lx = [math.log(v) for v in xs]
    ly = [math.log(v) for v in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    num = sum((a - mx) * (b - my) for a, b in zip(lx, ly))
    den = sum((a - mx) ** 2 for a in lx)
    return num / den


# ---------------------------------------------------------------------------- models

FAST_STEPS = {"digits": 300, "mnist": 150}


def _shared_mnist() -> None:
    """Point FIXEDPOINT_MNIST_DIR at ../shared/data/mnist when it exists and nothing is set
    (fixedpoint.data looks one directory too high for the shared copy)."""
    import os

    from .common import ROOT

    shared = ROOT.parent / "shared" / "data" / "mnist"
    if shared.is_dir():
        os.environ.setdefault("FIXEDPOINT_MNIST_DIR", str(shared))


def model_names(mode: Mode) -> tuple[str, ...]:
    """digits always; MNIST in full mode once its model is trained (it takes far longer
    than digits on a shared CPU, so it is trained separately: ``fixedpoint diffusion
    train --preset mnist``)."""
    _shared_mnist()
    names = ["digits"]
    if mode.name == "full" and (Path(train_config("mnist", mode).out_dir) / "model").is_dir():
        names.append("mnist")
    return tuple(names)


def train_config(name: str, mode: Mode):
    import dataclasses

    from fixedpoint.diffusion.train import PRESETS

    cfg = PRESETS[name]
    if mode.name != "full":
        cfg = dataclasses.replace(
            cfg, steps=FAST_STEPS[name], warmup=20, out_dir=f".cache/diffusion/fast-{name}"
        )
    return cfg


def trained_model(name: str, mode: Mode):
    """The model of preset ``name`` (trained now if missing; resumed if interrupted)."""
    from fixedpoint.diffusion import load_model
    from fixedpoint.diffusion.train import train

    outcome = train(train_config(name, mode))
    model = load_model(outcome.model_dir)
    model.meta.setdefault("test_loss", outcome.test_loss)
    return model


def meter_for(name: str):
    from fixedpoint.data import load_dataset
    from fixedpoint.quality import QualityMeter

    from .common import CACHE

    data = load_dataset(name)
    return QualityMeter.for_dataset(data, cache_dir=CACHE / "classifiers"), data


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table; floats get three significant digits."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
