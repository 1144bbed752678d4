"""``fixedpoint diffusion``: train, sample and generate with a diffusion UNet.

    fixedpoint diffusion train --preset digits                  # prints the test loss
    fixedpoint diffusion sample --model .cache/diffusion/digits/model --sampler ddim \\
        --steps 100 --method window --window 20 --atol 1e-4 --out samples.png
    fixedpoint diffusion generate --model DIR --num-samples 1024 --metrics --out-dir runs/d

``--model`` is any directory a diffusers ``UNet2DModel`` was saved to (``save_pretrained``),
with or without its scheduler config.  ``--method`` chooses how the sampler's chain of
steps is solved: ``sequential`` (the plain loop), ``jacobi``, ``window`` (ParaDiGMS's
sliding window, ``--window``), ``paradigms`` (the window with ParaDiGMS's noise-scaled
RMS rule, ``--tau``), ``gs-jacobi`` (block Picard, ``--blocks``) or
``triangular-anderson`` (ParaTAA) or ``window-anderson`` (ParaTAA on the sliding
window, ``--window``); ``--form`` picks the Picard (integral) or the Markov
form of the chain.

Few-step samplers (``sample`` only; ``--steps`` is then the budget of network
evaluations): ``dpmpp-2m``, ``dpmpp-3m``, ``unipc``, ``pndm``, ``heun-k`` (diffusers'
schedulers), ``ipndm``, ``amed``, ``amed-plugin`` (on iPNDM), ``amed-plugin-dpmpp`` (on
DPM-Solver++(2M); the three with ``--predictor``, trained by ``amed-train``) and ``boss``
(a BOSS grid of Euler steps; ``--method`` other than sequential solves it in parallel), on
``--grid`` or ``--grid-timesteps``::

    fixedpoint diffusion amed-train --model DIR --kind amed --steps 5 --out amed5.pt
    fixedpoint diffusion sample --model DIR --sampler amed --steps 5 --predictor amed5.pt
    fixedpoint diffusion sample --model DIR --sampler dpmpp-3m --steps 5 --grid logsnr
"""

from __future__ import annotations

import argparse
from typing import Any

from .common import (
    RESUMES,
    CommandFailed,
    UserError,
    add_quiet_option,
    add_seed_option,
    add_threads_option,
    checked_float,
    checked_int,
    guidance_float,
    nonnegative_float,
    note,
    positive_int,
    relative_tolerance,
    save_grid,
    user_errors,
)

SAMPLERS = ("ddim", "ddpm", "euler", "heun")
# The solvers of a chain; fixedpoint.diffusion.generate.METHODS builds them (kept literal
# here so that --help does not import torch; tests/test_diffusion_cli.py checks they agree).
METHODS = (
    "sequential",
    "jacobi",
    "window",
    "paradigms",
    "gs-jacobi",
    "triangular-anderson",
    "window-anderson",
)
# Few-step samplers: CLI name -> fixedpoint.diffusion.fewstep name ("heun-k": diffusers'
# Heun with an NFE budget, unlike the chain sampler "heun" with a step count).
FEWSTEP = {
    "dpmpp-2m": "dpmpp-2m",
    "dpmpp-3m": "dpmpp-3m",
    "unipc": "unipc",
    "pndm": "pndm",
    "heun-k": "heun",
    "ipndm": "ipndm",
}
# fixedpoint.diffusion.amed.KINDS, spelled out (tests/test_amed.py checks they agree).
AMED_KINDS = ("amed", "amed-plugin", "amed-plugin-dpmpp")
LEARNED = (*AMED_KINDS, "boss")
GRIDS = ("uniform", "polynomial", "logsnr")
# fixedpoint.diffusion.train.PRESETS's names, spelled out so that building the parser
# loads no application (a test checks that the two agree).
PRESETS = ("digits", "mnist", "flow-digits", "flow-mnist")


def register(subparsers: Any) -> None:
    group = subparsers.add_parser(
        "diffusion",
        help="diffusion sampling as a triangular system over time",
        description="Train a noise-predicting UNet2DModel and sample it with any solver of "
        "the core, the steps of the sampler being the positions.",
    )
    sub = group.add_subparsers(dest="diffusion_command", required=True, metavar="COMMAND")

    train = sub.add_parser(
        "train", help="train a UNet (DDPM or flow-matching objective), report test loss"
    )
    train.add_argument("--preset", choices=PRESETS, default="digits")
    train.add_argument("--steps", type=positive_int, default=None)
    train.add_argument("--out-dir", default=None, help="default: the preset's")
    train.add_argument(
        "--data-dir",
        default=None,
        metavar="DIR",
        help="MNIST IDX folder (default: $FIXEDPOINT_MNIST_DIR)",
    )
    add_seed_option(train)
    add_threads_option(train)
    add_quiet_option(train)
    train.set_defaults(func=_train, on_interrupt=RESUMES)

    amed = sub.add_parser("amed-train", help="distil an AMED predictor for a model")
    amed.add_argument("--model", required=True, metavar="DIR")
    amed.add_argument("--kind", choices=AMED_KINDS, default="amed")
    amed.add_argument(
        "--steps", type=checked_int(1, 100), default=5, help="NFE budget of the student"
    )
    amed.add_argument("--grid", choices=GRIDS, default="polynomial")
    amed.add_argument("--samples", type=positive_int, default=384)
    amed.add_argument("--epochs", type=positive_int, default=8)
    amed.add_argument("--batch-size", type=positive_int, default=16)
    amed.add_argument(
        "--teacher-extra",
        type=checked_int(0, 20),
        default=1,
        help="teacher (Heun) grid points between two student points",
    )
    amed.add_argument("--out", required=True, metavar="PATH")
    add_seed_option(amed)
    add_threads_option(amed)
    add_quiet_option(amed)
    amed.set_defaults(func=_amed_train)

    for name, helptext in (
        ("sample", "draw samples, write a PNG grid and the costs"),
        ("generate", "many samples in resumable shards (torchrun-ready)"),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument(
            "--model",
            required=True,
            metavar="DIR",
            help="a diffusers model directory (save_pretrained)",
        )
        choices = SAMPLERS + tuple(FEWSTEP) + LEARNED if name == "sample" else SAMPLERS
        p.add_argument("--sampler", choices=choices, default="ddim")
        p.add_argument("--steps", type=checked_int(1, 10_000), default=100)
        p.add_argument("--method", choices=METHODS, default="window")
        p.add_argument("--form", choices=("picard", "markov"), default="picard")
        p.add_argument(
            "--split",
            choices=("noise", "clean"),
            default="noise",
            help="linear part the Picard form integrates out (ddim, ddpm): noise "
            "(ParaDiGMS's) or clean (the clean-prediction form, see fd.Split)",
        )
        p.add_argument("--window", type=checked_int(1), default=16)
        p.add_argument("--blocks", type=checked_int(1), default=4)
        p.add_argument(
            "--atol",
            type=nonnegative_float,
            default=1e-4,
            help="per-component tolerance of a step's update (default 1e-4)",
        )
        p.add_argument("--rtol", type=relative_tolerance, default=0.0)
        p.add_argument(
            "--tau",
            type=checked_float(0.0, 10.0, open_low=True),
            default=0.1,
            help="ParaDiGMS tolerance, in units of the step's noise std",
        )
        p.add_argument(
            "--guidance",
            type=guidance_float,
            default=None,
            help="classifier-free guidance scale (class-conditional models)",
        )
        add_seed_option(p)
        add_threads_option(p)
        add_quiet_option(p)
    sample = sub.choices["sample"]
    sample.add_argument("--num-samples", type=checked_int(1, 4096), default=16)
    sample.add_argument("--out", default="diffusion-samples.png")
    sample.add_argument(
        "--grid",
        choices=GRIDS,
        default=None,
        help="time grid of a few-step sampler (default: uniform for pndm, else polynomial)",
    )
    sample.add_argument(
        "--grid-timesteps",
        default=None,
        metavar="T0,T1,...",
        help="a few-step sampler's own grid: --steps + 1 decreasing timesteps",
    )
    sample.add_argument("--predictor", default=None, metavar="PATH", help="AMED predictor")
    sample.add_argument(
        "--compare",
        action="store_true",
        help="also run the sequential sampler and report the deviation",
    )
    sample.set_defaults(func=_sample)
    generate = sub.choices["generate"]
    generate.add_argument("--num-samples", type=positive_int, required=True)
    generate.add_argument("--shard-size", type=positive_int, default=64)
    generate.add_argument("--out-dir", required=True)
    generate.add_argument(
        "--metrics",
        action="store_true",
        help="score the samples: FCD against the test images, accuracy",
    )
    generate.set_defaults(func=_generate, on_interrupt=RESUMES)


def _train(args: argparse.Namespace) -> int:
    import dataclasses

    from fixedpoint.data import DatasetError
    from fixedpoint.diffusion.train import PRESETS, Objective, TrainError, train

    cfg = PRESETS[args.preset]
    cfg = dataclasses.replace(
        cfg,
        seed=args.seed,
        data_dir=args.data_dir,
        out_dir=args.out_dir or cfg.out_dir,
        steps=args.steps or cfg.steps,
    )
    note(args, f"training a diffusion UNet on {cfg.dataset} into {cfg.out_dir}")
    with user_errors(TrainError, DatasetError):
        out = train(cfg, progress=not args.quiet)
    target = "velocity" if cfg.objective is Objective.VELOCITY else "noise"
    print(
        f"test loss ({target} MSE): {out.test_loss:.4f} ({out.steps} steps, "
        f"{out.parameters:,} parameters, {out.train_time / 60:.1f} min); model {out.model_dir}"
    )
    return 0


def _spec(args: argparse.Namespace) -> Any:
    from fixedpoint.diffusion.generate import GenerateError, SamplerSpec

    with user_errors(GenerateError):
        return SamplerSpec(
            sampler=args.sampler,
            steps=args.steps,
            method=args.method,
            form=args.form,
            window=args.window,
            atol=args.atol,
            rtol=args.rtol,
            tau=args.tau,
            blocks=args.blocks,
            guidance=args.guidance,
            split=args.split,
        )


def _load(args: argparse.Namespace, spec: Any) -> Any:
    from fixedpoint.diffusion import ModelError, load_model

    with user_errors(ModelError):
        model = load_model(args.model)
    if spec.guidance is not None and model.num_classes is None:
        raise UserError("--guidance needs a class-conditional model; this one is unconditional")
    if spec.steps > model.schedule.num_train_timesteps:
        raise UserError(
            f"--steps {spec.steps} exceeds the model's "
            f"{model.schedule.num_train_timesteps} training timesteps"
        )
    return model


def _sample(args: argparse.Namespace) -> int:
    from fixedpoint.diffusion.generate import GenerateError, sample_batch

    if args.sampler in FEWSTEP or args.sampler in LEARNED:
        return _sample_fewstep(args)
    spec = _spec(args)
    model = _load(args, spec)
    indices = range(args.num_samples)
    with user_errors(ValueError):
        try:
            batch = sample_batch(model, spec, indices, args.seed)
        except GenerateError as exc:
            raise CommandFailed(str(exc)) from None
    images = _crop(model, batch.images)
    path = save_grid(images, args.out)
    print(
        f"{args.num_samples} samples, {spec.sampler}-{spec.steps} by {spec.method} "
        f"({spec.form} form): {batch.iterations} iterations, {batch.calls} dependent "
        f"network calls, {batch.rows / args.num_samples:.0f} network rows per sample, "
        f"{batch.seconds:.2f} s; wrote {path}"
    )
    if args.compare and spec.method != "sequential":
        from dataclasses import replace

        seq = sample_batch(model, replace(spec, method="sequential"), indices, args.seed)
        dev = float((seq.images - batch.images).abs().max())
        print(
            f"sequential: {seq.calls} dependent calls, {seq.seconds:.2f} s; max deviation {dev:.2e}"
        )
    return 0


def _crop(model: Any, images: Any) -> Any:
    size = model.meta.get("data_size", images.shape[-1])
    if size == images.shape[-1]:
        return images
    from fixedpoint.diffusion.train import crop_images

    return crop_images(images, size)


def _generate(args: argparse.Namespace) -> int:
    from fixedpoint.diffusion.generate import GenerateError, generate
    from fixedpoint.distributed import DistributedError, launch

    spec = _spec(args)
    model = _load(args, spec)
    meter = None
    if args.metrics:
        meter = _meter(model)
    with user_errors(GenerateError, DistributedError), launch("cpu") as ctx:
        report = generate(
            model,
            args.model,
            spec,
            args.out_dir,
            num_samples=args.num_samples,
            shard_size=args.shard_size,
            seed=args.seed,
            context=ctx,
            meter=meter,
            progress=not args.quiet,
        )
    if ctx.is_main:
        quality = ""
        if "fcd" in report:
            quality = f"; FCD {report['fcd']:.3f}"
            if "accuracy" in report:
                quality += f", accuracy {report['accuracy']:.3f}"
        print(
            f"{report['samples']} samples in {report['shards']} shards on "
            f"{report['world_size']} process(es), slowest rank "
            f"{report['slowest_rank_seconds']:.1f} s{quality}; wrote "
            f"{args.out_dir}/samples.pt"
        )
    return 0


def _meter(model: Any) -> Any:
    from fixedpoint.data import DatasetError, load_dataset
    from fixedpoint.quality import QualityMeter

    name = model.meta.get("dataset")
    if name not in ("digits", "mnist"):
        raise UserError("--metrics needs a model trained here on digits or mnist")
    with user_errors(DatasetError):
        data = load_dataset(name)
    return QualityMeter.for_dataset(data, cache_dir=".cache/classifiers")


# --------------------------------------------------------------- few-step samplers


def _grid(args: argparse.Namespace) -> Any:
    from fixedpoint.diffusion import fewstep

    if args.grid_timesteps is not None:
        if args.grid is not None:
            raise UserError("give --grid or --grid-timesteps, not both")
        try:
            values = tuple(float(v) for v in args.grid_timesteps.split(","))
        except ValueError:
            raise UserError(
                f"--grid-timesteps must be comma-separated numbers, got {args.grid_timesteps!r}"
            ) from None
        return fewstep.CustomGrid(values)
    return None if args.grid is None else fewstep.GRIDS[args.grid]()


def _fewstep_sampler(args: argparse.Namespace, model: Any) -> Any:
    from fixedpoint.diffusion import amed, fewstep

    grid = _grid(args)
    with user_errors(fewstep.FewStepError):
        if args.sampler in FEWSTEP:
            return fewstep.make_sampler(FEWSTEP[args.sampler], model, args.steps, grid)
        if args.sampler in AMED_KINDS:
            if args.predictor is None:
                raise UserError(f"--sampler {args.sampler} needs --predictor (see amed-train)")
            sampler = amed.load_amed(args.predictor, model)
            kind = amed.kind_of(sampler)
            if kind != args.sampler or sampler.nfe != args.steps:
                raise UserError(
                    f"{args.predictor} holds an {kind} predictor for {sampler.nfe} "
                    f"evaluations, not {args.sampler} with --steps {args.steps}"
                )
            if grid is not None and grid != sampler.grid:
                raise UserError(f"{args.predictor} was trained on the {sampler.grid.name} grid")
            return sampler
    raise UserError(f"--sampler {args.sampler} is not available")  # pragma: no cover


def _boss(args: argparse.Namespace, x: Any, labels: Any) -> tuple[Any, int, int]:
    """A BOSS grid for the model's probability-flow ODE (noise or velocity model), sampled
    sequentially or, with a --method other than sequential, in parallel.  Returns
    (images, dependent calls, rows)."""
    import torch

    from fixedpoint.diffusion import PicardMap, boss, sample_loop, solve_chain

    flow = args.flow
    ref_labels = None
    if flow.denoiser.num_classes is not None:
        ref_labels = torch.arange(100) % flow.denoiser.num_classes
    with user_errors(boss.BossError):
        grid = boss.boss_grid(flow, args.steps, seed=args.seed, labels=ref_labels)
    chain = grid.chain(flow)
    start = chain.start(x)
    if args.method == "sequential":
        images = sample_loop(chain, flow.denoiser, start, labels=labels, guidance=args.guidance)
        rows = len(chain) * len(x) * (2 if args.guidance is not None else 1)
        return images, len(chain), rows
    from fixedpoint.diffusion.generate import SamplerSpec

    spec = SamplerSpec(
        method=args.method,
        window=args.window,
        atol=args.atol,
        rtol=args.rtol,
        tau=args.tau,
        blocks=args.blocks,
    )
    fmap = PicardMap(chain, flow.denoiser, start, labels=labels, guidance=args.guidance)
    out = solve_chain(fmap, spec.solver(chain))
    return out.sample, out.network.calls, out.network.rows


def _sample_fewstep(args: argparse.Namespace) -> int:
    import time

    import torch

    from fixedpoint.diffusion import ModelError, load_model
    from fixedpoint.diffusion.generate import hash_seed

    with user_errors(ModelError):
        if args.sampler == "boss":  # BOSS takes noise and velocity (flow-matching) models
            from fixedpoint.diffusion import load_flow

            args.flow = load_flow(args.model)
            model = args.flow.model
        else:
            model = load_model(args.model)
    if args.guidance is not None and model.num_classes is None:
        raise UserError("--guidance needs a class-conditional model; this one is unconditional")
    n = args.num_samples
    gens = [torch.Generator().manual_seed(hash_seed(args.seed, i)) for i in range(n)]
    x = torch.stack([torch.randn(model.sample_shape, generator=g) for g in gens])
    labels = None
    if model.num_classes is not None:
        labels = torch.arange(n) % model.num_classes
    start = time.perf_counter()
    if args.sampler == "boss":
        images, calls, rows = _boss(args, x, labels)
        what = f"boss-{args.steps} by {args.method}"
    else:
        sampler = _fewstep_sampler(args, model)
        with user_errors(ValueError):
            out = sampler.sample(model.denoiser(), x, labels, args.guidance)
        images, calls, rows = out.sample, out.network.calls, out.network.rows
        grid = getattr(sampler, "grid", None)
        what = f"{args.sampler} at NFE {sampler.nfe}" + (
            f" ({grid.name} grid)" if grid is not None else ""
        )
    seconds = time.perf_counter() - start
    if not bool(torch.isfinite(images).all()):
        raise CommandFailed("non-finite samples")
    path = save_grid(_crop(model, images), args.out)
    print(
        f"{n} samples, {what}: {calls} dependent network calls, {rows / n:.0f} network rows "
        f"per sample, {seconds:.2f} s; wrote {path}"
    )
    return 0


def _amed_train(args: argparse.Namespace) -> int:
    from fixedpoint.diffusion import ModelError, amed, fewstep, load_model

    with user_errors(ModelError):
        model = load_model(args.model)
    cfg = amed.AMEDTrainConfig(
        kind=args.kind,
        nfe=args.steps,
        grid=fewstep.GRIDS[args.grid](),
        teacher_extra=args.teacher_extra,
        samples=args.samples,
        epochs=args.epochs,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    note(args, f"distilling {args.kind} at NFE {args.steps} for {args.model} into {args.out}")
    with user_errors(fewstep.FewStepError):
        sampler, report = amed.train_amed(model, cfg, args.out, progress=not args.quiet)
    print(
        f"{args.kind} predictor for NFE {sampler.nfe} ({sampler.steps} intervals, "
        f"{cfg.grid.name} grid): distillation loss {report['losses'][0]:.4g} -> "
        f"{report['losses'][-1]:.4g}, {report['seconds']:.0f} s; wrote {args.out}"
    )
    return 0
