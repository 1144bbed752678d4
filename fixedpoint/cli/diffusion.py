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
``triangular-anderson`` (ParaTAA); ``--form`` picks the Picard (integral) or the Markov
form of the chain.
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
METHODS = ("sequential", "jacobi", "window", "paradigms", "gs-jacobi", "triangular-anderson")


def register(subparsers: Any) -> None:
    group = subparsers.add_parser(
        "diffusion",
        help="diffusion sampling as a triangular system over time",
        description="Train a noise-predicting UNet2DModel and sample it with any solver of "
        "the core, the steps of the sampler being the positions.",
    )
    sub = group.add_subparsers(dest="diffusion_command", required=True, metavar="COMMAND")

    train = sub.add_parser("train", help="train a UNet (DDPM objective), report test loss")
    train.add_argument("--preset", choices=("digits", "mnist"), default="digits")
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
        p.add_argument("--sampler", choices=SAMPLERS, default="ddim")
        p.add_argument("--steps", type=checked_int(1, 10_000), default=100)
        p.add_argument("--method", choices=METHODS, default="window")
        p.add_argument("--form", choices=("picard", "markov"), default="picard")
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
    from fixedpoint.diffusion.train import PRESETS, TrainError, train

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
    print(
        f"test loss (noise MSE): {out.test_loss:.4f} ({out.steps} steps, "
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
