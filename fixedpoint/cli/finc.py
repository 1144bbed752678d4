"""``fixedpoint finc``: train, sample and generate with FInC Flow.

    fixedpoint finc train --preset digits                 # prints the test bits/dim
    fixedpoint finc sample --checkpoint CKPT --method levels --out samples.png
    fixedpoint finc generate --checkpoint CKPT --num-samples 1000 --out-dir runs/finc

``--method`` names how every FInC unit's triangular inverse is solved: the core's
``sequential``, ``jacobi``, ``gs-jacobi``, ``anderson``, ``triangular-anderson`` and
``levels`` (the wavefront level schedule), or a library baseline: ``dense``
(torch.linalg.solve_triangular), ``sparse`` (scipy spsolve_triangular), ``loop``.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from typing import Any

from .common import (
    RESUMES,
    CommandFailed,
    add_quiet_option,
    add_seed_option,
    add_threads_option,
    checked_float,
    checked_int,
    cost_table,
    note,
    save_grid,
    user_errors,
)

CORE_METHODS = ("sequential", "jacobi", "gs-jacobi", "anderson", "triangular-anderson",
                "levels")
BASELINES = ("dense", "sparse", "loop")


def register(subparsers: Any) -> None:
    group = subparsers.add_parser(
        "finc", help="FInC Flow: invertible k x k convolutions",
        description="FInC Flow: train, sample and generate; every FInC unit is inverted by "
                    "a core method or a library baseline.")
    sub = group.add_subparsers(dest="finc_command", required=True, metavar="COMMAND")

    train = sub.add_parser("train", help="train a FInC Flow and report test bits/dim")
    train.add_argument("--preset", choices=("digits", "mnist"), default="digits")
    length = train.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=checked_float(0.0, None, open_low=True))
    length.add_argument("--steps", type=checked_int(1))
    train.add_argument("--out-dir", default=None, help="default: the preset's")
    train.add_argument("--data-dir", default=None, metavar="DIR",
                       help="MNIST IDX folder (default: $FIXEDPOINT_MNIST_DIR or "
                            "../shared/data/mnist)")
    add_seed_option(train)
    add_threads_option(train)
    add_quiet_option(train)
    train.set_defaults(func=_train, on_interrupt=RESUMES)

    for name, helptext in (("sample", "draw samples, write a PNG grid and a cost table"),
                           ("generate", "many samples in resumable shards")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--checkpoint", required=True)
        p.add_argument("--method", choices=CORE_METHODS + BASELINES, default="levels")
        p.add_argument("--layout", choices=("pixel", "channel"), default="pixel",
                       help="positions: pixels (d = C) or (pixel, channel) pairs (d = 1)")
        p.add_argument("--temperature", type=checked_float(0.0, 10.0, open_low=True),
                       default=1.0)
        add_seed_option(p)
        add_threads_option(p)
        add_quiet_option(p)
    sample = sub.choices["sample"]
    sample.add_argument("--num-samples", type=checked_int(1, 10_000), default=16)
    sample.add_argument("--out", default="finc-samples.png")
    sample.set_defaults(func=_sample)
    generate = sub.choices["generate"]
    generate.add_argument("--num-samples", type=checked_int(1), required=True)
    generate.add_argument("--shard-size", type=checked_int(1), default=100)
    generate.add_argument("--out-dir", required=True)
    generate.set_defaults(func=_generate, on_interrupt=RESUMES)


def _method(name: str) -> Any:
    import fixedpoint as fp

    return {
        "sequential": fp.Sequential(),
        "jacobi": fp.Jacobi(),
        "gs-jacobi": fp.GSJacobi(modules=4),
        "anderson": fp.Anderson(max_iter=1000),
        "triangular-anderson": fp.TriangularAnderson(),
        "levels": fp.LevelSchedule(),
    }[name]


def _inverter_factory(name: str):
    from fixedpoint.finc import baselines
    from fixedpoint.finc.sampling import baseline_inverter, core_inverter

    if name in BASELINES:
        solve = {"dense": baselines.solve_dense, "sparse": baselines.solve_sparse,
                 "loop": baselines.solve_loop}[name]
        return lambda results: baseline_inverter(solve)
    method = _method(name)
    return lambda results: core_inverter(method, results)


@contextlib.contextmanager
def _solver_failures() -> Iterator[None]:
    """A solve that did not converge (SolveError) ran but failed: exit status 1."""
    import fixedpoint as fp

    try:
        yield
    except fp.SolveError as exc:
        raise CommandFailed(f"a FInC unit's inverse failed: {exc}") from None


def _load(args: argparse.Namespace) -> Any:
    from fixedpoint.finc.checkpoint import CheckpointError, load_model

    with user_errors(CheckpointError):
        return load_model(args.checkpoint)


def _train(args: argparse.Namespace) -> int:
    import dataclasses

    from fixedpoint.data import DatasetError
    from fixedpoint.finc.train import PRESETS, TrainError, train

    preset = PRESETS[args.preset]
    cfg = preset.train
    if args.epochs is not None:
        cfg = dataclasses.replace(cfg, epochs=args.epochs, steps=None)
    if args.steps is not None:
        cfg = dataclasses.replace(cfg, steps=args.steps, epochs=None)
    cfg = dataclasses.replace(cfg, seed=args.seed, data_dir=args.data_dir,
                              out_dir=args.out_dir or cfg.out_dir)
    note(args, f"training FInC Flow ({preset.description}) into {cfg.out_dir}")
    with user_errors(TrainError, DatasetError):
        out = train(preset.model, cfg, progress=not args.quiet)
    print(f"test NLL: {out.test_bpd:.4f} bits/dim ({out.steps} steps, {out.parameters:,} "
          f"parameters, {out.train_time / 60:.1f} min of training); checkpoint "
          f"{out.checkpoint}")
    return 0


def _layout(args: argparse.Namespace) -> Any:
    from fixedpoint.finc import Layout

    return Layout.PIXEL if args.layout == "pixel" else Layout.CHANNEL


def _sample(args: argparse.Namespace) -> int:
    import torch

    from fixedpoint.finc.sampling import sample

    model = _load(args)
    results: list[Any] = []
    inverter = _inverter_factory(args.method)(results)
    gen = torch.Generator().manual_seed(args.seed)
    with _solver_failures():
        s = sample(model, args.num_samples, inverter, generator=gen,
                   temperature=args.temperature, layout=_layout(args))
    path = save_grid(s.images, args.out)
    if results:
        print(cost_table(results, [args.method] * len(results), label="unit"))
    print(f"{args.num_samples} samples by {args.method} ({args.layout} layout) in "
          f"{s.wall_time:.3f} s; wrote {path}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from fixedpoint.finc.generate import GenerateError, GenerateSpec, generate

    model = _load(args)
    spec = GenerateSpec(checkpoint=str(args.checkpoint), method=args.method,
                        layout=args.layout, num_samples=args.num_samples,
                        shard_size=args.shard_size, seed=args.seed,
                        temperature=args.temperature)
    with user_errors(GenerateError), _solver_failures():
        summary = generate(model, spec, _inverter_factory(args.method), _layout(args),
                           args.out_dir, progress=not args.quiet)
    print(f"{summary['samples']} samples in {summary['shards']} shards, "
          f"{summary['seconds_per_100']:.3f} s per 100 samples, "
          f"{summary['dependent_steps']} dependent steps; wrote {args.out_dir}/samples.pt")
    return 0

