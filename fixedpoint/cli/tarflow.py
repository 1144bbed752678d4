"""TarFlow commands, at the top level: ``train``, ``sample``, ``metrics``, ``generate``,
``convert``.

* ``train``    a TarFlow from a preset (optionally overriding sizes), resumable;
* ``sample``   from a checkpoint with a solver strategy: a PNG grid and the per-block cost
  table;
* ``metrics``  the CRM / IGM table of a checkpoint on training images;
* ``generate`` many samples in shards, resumable, optionally scored (FCD, accuracy);
  under ``torchrun`` the shards are spread over the processes;
* ``convert``  a published TarFlow state dict into a checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .common import (
    PROG,
    RESUMES,
    CommandFailed,
    UserError,
    add_common_options,
    cost_table,
    device,
    guidance_float,
    nonnegative_float,
    nonnegative_int,
    note,
    positive_float,
    positive_int,
    precision,
    relative_tolerance,
    save_grid,
    user_errors,
)

METHOD_NAMES = ("sequential", "jacobi", "gs-jacobi", "anderson", "triangular-anderson")
DEFAULT_MODULES = 4  # --modules of --strategy gs-jacobi
# The preset whose default output directory a dataset's commands look in.
DEFAULT_PRESET = {"digits": "digits", "mnist": "mnist-p4"}
# Where `generate --metrics` caches the feature classifier of the Frechet distance.
CLASSIFIER_CACHE = ".cache/classifiers"
# Channel counts of published TarFlows, tried in this order by `convert`.
PUBLISHED_CHANNELS = (3, 1)

Handler = Callable[[argparse.Namespace], int]


def _tarflow_errors(handler: Handler) -> Handler:
    """Report TarFlow's bad-input errors (checkpoint, data, training config) as UserError."""

    @functools.wraps(handler)
    def run(args: argparse.Namespace) -> int:
        from fixedpoint.data import DatasetError
        from fixedpoint.tarflow.checkpoint import CheckpointError
        from fixedpoint.tarflow.train import TrainError

        with user_errors(CheckpointError, DatasetError, TrainError):
            return handler(args)

    return run


# ------------------------------------------------------------------------ parsers


def register(subparsers: Any) -> None:
    _register_train(subparsers)
    _register_sample(subparsers)
    _register_generate(subparsers)
    _register_convert(subparsers)
    _register_metrics(subparsers)


def _add_checkpoint_option(parser: argparse.ArgumentParser, role: str) -> None:
    parser.add_argument("--checkpoint", default=None, metavar="PATH",
                        help=f"checkpoint to {role}; default .cache/runs/<preset>/checkpoint.pt")


def _add_sampling_options(parser: argparse.ArgumentParser) -> None:
    """Sampling options shared by ``sample`` and ``generate``."""
    group = parser.add_argument_group("sampling options")
    group.add_argument("--strategy", default="sequential",
                       help="a method for every block (" + ", ".join(METHOD_NAMES) + "), or "
                            "a paper-style spec [Stack-GS-J-Else] such as '[1-4-8-5]' "
                            "(default sequential)")
    group.add_argument("--modules", type=positive_int, default=None,
                       help=f"modules per block of --strategy gs-jacobi (default "
                            f"{DEFAULT_MODULES}; a spec gives its own)")
    group.add_argument("--atol", type=nonnegative_float, default=None,
                       help="absolute stopping tolerance of the iterative methods (default: "
                            "the rounding level of the dtype at the scale of the iterate; "
                            "--atol 0 --rtol 0: exact termination, runs to T-1 iterations "
                            "when iterates flicker)")
    group.add_argument("--rtol", type=relative_tolerance, default=None,
                       help="relative stopping tolerance, in [0, 0.5] (default: see --atol)")
    group.add_argument("--guidance", type=guidance_float, default=0.0,
                       help="classifier-free guidance strength in [0, 100] (default 0: off)")
    group.add_argument("--labels", default=None,
                       help="comma-separated class labels (cycled over the samples), or 'none' "
                            "for unconditional; default 0,1,2,... for class-conditional models")
    group.add_argument("--anneal-guidance", action="store_true",
                       help="anneal the CFG strength along the sequence, g_t = g t / (T - 1)")
    group.add_argument("--denoise", action="store_true",
                       help="finish with one score-based denoising step")


def _register_train(sub: Any) -> None:
    p = sub.add_parser("train", help="train a TarFlow (resumable)",
                       description="Train a TarFlow from a preset; sizes may be overridden. "
                                   "Rerunning the same command resumes an interrupted run.")
    add_common_options(p)
    _add_checkpoint_option(p, "write (and resume from)")
    p.add_argument("--preset", default=None,
                   help="digits, mnist-p4 or mnist-p2 (default: by --dataset, else digits)")
    p.add_argument("--out-dir", default=None, metavar="DIR",
                   help="run directory (default .cache/runs/<preset>[-<config hash>])")
    sizes = p.add_argument_group("overrides of the preset")
    for flag, kind in (("--width", positive_int), ("--blocks", positive_int),
                       ("--layers", positive_int), ("--patch-size", positive_int),
                       ("--head-dim", positive_int), ("--num-classes", nonnegative_int),
                       ("--noise-std", nonnegative_float), ("--steps", positive_int),
                       ("--epochs", positive_float), ("--batch-size", positive_int),
                       ("--lr", positive_float), ("--warmup", nonnegative_int),
                       ("--checkpoint-every", positive_int)):
        sizes.add_argument(flag, type=kind, default=None)
    p.set_defaults(func=cmd_train, on_interrupt=RESUMES + " (from the last checkpoint)")


def _register_sample(sub: Any) -> None:
    p = sub.add_parser("sample", help="sample from a checkpoint",
                       description="Sample with a solver strategy; writes a PNG grid and "
                                   "prints the per-block cost table. A block whose solve "
                                   "fails (non-finite values) ends the command with exit "
                                   "status 1 and no image.")
    add_common_options(p)
    _add_checkpoint_option(p, "read")
    _add_sampling_options(p)
    p.add_argument("--batch", type=positive_int, default=16,
                   help="number of samples (default 16)")
    p.add_argument("--out", default="samples.png", help="PNG file (default samples.png)")
    p.add_argument("--nrow", type=positive_int, default=None, help="images per grid row")
    p.set_defaults(func=cmd_sample)


def _register_generate(sub: Any) -> None:
    p = sub.add_parser(
        "generate", help="many samples in shards, optionally scored; runs under torchrun",
        description="Sample --num-samples images in shards of --shard-size (each shard one "
                    "batch, each sample's noise seeded by its global index), optionally "
                    "score them (FCD, accuracy). Launch with `torchrun --nproc_per_node=N` "
                    "to shard across processes (gloo on CPU, nccl on CUDA); a plain run is "
                    "one process. Rerunning the same command skips finished shards.")
    add_common_options(p)
    _add_checkpoint_option(p, "read")
    _add_sampling_options(p)
    p.add_argument("--num-samples", type=positive_int, default=256,
                   help="samples in all (default 256)")
    p.add_argument("--shard-size", type=positive_int, default=64,
                   help="samples per shard = batch size (default 64); results do not depend "
                        "on the number of processes, but do on this")
    p.add_argument("--out-dir", default="generated", metavar="DIR",
                   help="output directory shared by all ranks (default ./generated)")
    p.add_argument("--metrics", action="store_true",
                   help="score the samples: Frechet classifier distance (not FID) and "
                        "conditional accuracy, with a classifier trained here and cached in "
                        f"{CLASSIFIER_CACHE}")
    p.add_argument("--no-merge", action="store_true",
                   help="keep the shards only; do not write DIR/samples.pt")
    p.set_defaults(func=cmd_generate, on_interrupt=RESUMES + " (finished shards are kept)")


def _register_convert(sub: Any) -> None:
    p = sub.add_parser(
        "convert", help="convert a published TarFlow state dict into a checkpoint",
        description="Read a state dict in the published TarFlow layout (a .pth file of "
                    "tensors), infer the configuration from its shapes and write a "
                    "fixedpoint checkpoint that sample / generate / metrics can use.")
    p.add_argument("published", metavar="STATE_DICT", help="the published .pth file")
    p.add_argument("--out", required=True, metavar="PATH", help="checkpoint to write")
    p.add_argument("--channels", type=positive_int, default=None,
                   help="image channels (default: inferred from the shapes, 3 or 1)")
    p.add_argument("--head-dim", type=positive_int, default=64,
                   help="attention head size (default 64)")
    p.add_argument("--noise-std", type=positive_float, required=True,
                   help="the model's training noise sigma (the last number of the published "
                        "name, e.g. 0.07 for AFHQ 8-768-8-8-0.07)")
    p.add_argument("--quiet", action="store_true", help="no notes")
    p.set_defaults(func=cmd_convert)


def _register_metrics(sub: Any) -> None:
    p = sub.add_parser("metrics", help="CRM / IGM table of a checkpoint",
                       description="Convergence-ranking (CRM) and initial-guess (IGM) "
                                   "metrics per block, on training images.")
    add_common_options(p)
    _add_checkpoint_option(p, "read")
    p.add_argument("--batch", type=positive_int, default=256,
                   help="training images to measure on (default 256)")
    p.add_argument("--clean", action="store_true",
                   help="measure on clean images (default: with the training noise added, "
                        "so block inputs match what the model was trained on)")
    p.set_defaults(func=cmd_metrics)


# ------------------------------------------------------------------------ helpers


def _default_checkpoint(dataset: str | None) -> Path:
    from fixedpoint.tarflow.train import PRESETS

    preset = PRESETS[DEFAULT_PRESET[dataset or "digits"]]
    return preset.train.checkpoint_path


def _load(args: argparse.Namespace, dev: Any = None) -> tuple[Any, Any]:
    """(checkpoint, model) from --checkpoint or the dataset's default run."""
    from fixedpoint.tarflow.checkpoint import load_checkpoint

    path = Path(args.checkpoint) if args.checkpoint else _default_checkpoint(args.dataset)
    if not path.exists():
        hint = "" if args.checkpoint else (
            f"; train one with `{PROG} train --dataset {args.dataset or 'digits'}` "
            "or pass --checkpoint"
        )
        raise UserError(f"no checkpoint at {path}{hint}")
    ckpt = load_checkpoint(path)
    model = ckpt.build_model().to(device=dev if dev is not None else device(args))
    return ckpt, model


def _dataset_for(args: argparse.Namespace, ckpt: Any) -> Any:
    from fixedpoint.data import load_dataset

    provenance = ckpt.extra.get("data", {})
    name = args.dataset or provenance.get("dataset") or "digits"
    directory = args.data_dir
    if directory is None and name == "mnist" and provenance.get("dataset") == "mnist":
        # Prefer the folder the model was trained from, if it is still there.
        source = provenance.get("source")
        if source and Path(source).is_dir():
            directory = source
    return load_dataset(name, directory)


def _labels(spec: str | None, batch: int, num_classes: int) -> Any:
    import torch

    if spec is not None and spec.strip().lower() == "none":
        return None
    if num_classes == 0:
        if spec is not None:
            raise UserError("--labels given but the model is unconditional (num_classes=0)")
        return None
    if spec is None:
        values = [i % num_classes for i in range(batch)]
    else:
        try:
            parsed = [int(v) for v in spec.split(",") if v.strip()]
        except ValueError:
            raise UserError(f"--labels must be comma-separated integers, got {spec!r}") from None
        if not parsed:
            raise UserError("--labels is empty")
        bad = [v for v in parsed if not -1 <= v < num_classes]
        if bad:
            raise UserError(f"--labels {bad[0]} outside 0..{num_classes - 1} (or -1 for none)")
        values = [parsed[i % len(parsed)] for i in range(batch)]
    return torch.tensor(values, dtype=torch.long)


def _method(name: str, args: argparse.Namespace, seq_len: int) -> Any:
    """The solver method of ``--strategy <name>`` with its options."""
    import fixedpoint as fp

    tols = {"atol": args.atol, "rtol": args.rtol}
    if name == "sequential":
        if args.atol is not None or args.rtol is not None:
            raise UserError("--atol / --rtol do not apply to --strategy sequential")
        return fp.Sequential()
    if name == "gs-jacobi":
        modules = DEFAULT_MODULES if args.modules is None else args.modules
        if modules > seq_len:
            raise UserError(f"--modules must be in 1..{seq_len} (the sequence length), "
                            f"got {modules}")
        return fp.GSJacobi(modules=modules, **tols)
    factories = {"jacobi": fp.Jacobi, "anderson": fp.Anderson,
                 "triangular-anderson": fp.TriangularAnderson}
    return factories[name](**tols)


def _strategy(args: argparse.Namespace, config: Any) -> Any:
    """A Strategy from a method name or a paper-style spec; errors become UserError."""
    from fixedpoint.tarflow import Strategy

    spec = args.strategy.strip()
    name = spec.lower()
    if args.modules is not None and name != "gs-jacobi":
        raise UserError(f"--modules applies to --strategy gs-jacobi only, not {spec!r}"
                        + (" (a spec sets its own module counts)" if spec.startswith("[")
                           else ""))
    if name not in METHOD_NAMES and not spec.startswith("["):
        raise UserError(f"bad --strategy {spec!r}: expected one of {', '.join(METHOD_NAMES)} "
                        "or a spec like '[1-4-8-5]' ([Stack-GS-J-Else])")
    try:
        if name in METHOD_NAMES:
            return Strategy.uniform(_method(name, args, config.seq_len), config.blocks)
        return Strategy.parse(spec, config.blocks, config.seq_len, atol=args.atol,
                              rtol=args.rtol)
    except (ValueError, TypeError) as exc:  # a method's own check of its options
        raise UserError(f"bad --strategy {spec!r}: {exc}") from None


def _plan_descriptions(strategy: Any) -> list[str]:
    return [plan.describe() for plan in strategy.plans]


# ------------------------------------------------------------------------ commands


def _config_hash(model_cfg: Any, train_cfg: Any) -> str:
    blob = json.dumps([model_cfg.to_dict(), train_cfg.identity()], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:8]


@_tarflow_errors
def cmd_train(args: argparse.Namespace) -> int:
    from fixedpoint.tarflow.train import PRESETS, train

    if args.dtype != "float32":
        raise UserError("training runs in float32; --dtype bfloat16 is for sample and metrics")
    name = args.preset or DEFAULT_PRESET[args.dataset or "digits"]
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    preset = PRESETS[name]
    if args.dataset and args.dataset != preset.train.dataset:
        raise UserError(f"preset {name} trains on {preset.train.dataset}, not {args.dataset}")
    model_over = {k: getattr(args, k) for k in ("width", "blocks", "layers", "patch_size",
                                                 "head_dim", "num_classes", "noise_std")
                  if getattr(args, k) is not None}
    train_over = {k: getattr(args, k) for k in ("batch_size", "lr", "warmup",
                                                 "checkpoint_every", "threads")
                  if getattr(args, k) is not None}
    if args.steps is not None or args.epochs is not None:
        train_over["steps"], train_over["epochs"] = args.steps, args.epochs
    train_over.update(seed=args.seed, data_dir=args.data_dir, device=str(device(args)))
    try:
        model_cfg = dataclasses.replace(preset.model, **model_over)
        train_cfg = dataclasses.replace(preset.train, **train_over)
    except (TypeError, ValueError) as exc:
        raise UserError(f"invalid configuration: {exc}") from None
    # Customised = anything that changes the trained weights (not threads, device, paths).
    customised = bool(model_over) or train_cfg.identity() != preset.train.identity()
    if args.checkpoint:
        out = Path(args.checkpoint)
        train_cfg = dataclasses.replace(train_cfg, out_dir=str(out.parent),
                                        checkpoint_name=out.name)
    elif args.out_dir:
        train_cfg = dataclasses.replace(train_cfg, out_dir=args.out_dir)
    elif customised:
        # A customised run must not collide with (and refuse to resume) the preset's run.
        train_cfg = dataclasses.replace(
            train_cfg, out_dir=f"{preset.train.out_dir}-{_config_hash(model_cfg, train_cfg)}"
        )
    if train_cfg.checkpoint_path.exists():
        note(args, f"resuming from {train_cfg.checkpoint_path} if it matches this config")
    m = model_cfg
    length = (f"{train_cfg.steps} steps" if train_cfg.steps is not None
              else f"{train_cfg.epochs:g} epochs")
    note(args, f"training {train_cfg.dataset} (preset {name}"
               f"{', customised' if customised else ''}): "
               f"image {m.image_size}, patch {m.patch_size} (T={m.seq_len}), width {m.width}, "
               f"{m.blocks} blocks x {m.layers} layers, {length} of batch "
               f"{train_cfg.batch_size} -> {train_cfg.checkpoint_path}")
    outcome = train(model_cfg, train_cfg, progress=not args.quiet)
    print(f"test NLL: {outcome.test_bpd:.4f} bits/dim")
    print(f"checkpoint: {outcome.checkpoint}")
    print(f"steps: {outcome.steps} (resumed from {outcome.resumed_from}), "
          f"parameters: {outcome.parameters:,}, train time: {outcome.train_time:.1f} s, "
          f"{outcome.seconds_per_epoch:.1f} s/epoch")
    return 0


@_tarflow_errors
def cmd_sample(args: argparse.Namespace) -> int:
    import torch

    import fixedpoint as fp
    from fixedpoint.tarflow import SamplingError, reverse

    ckpt, model = _load(args)
    config = model.config
    strategy = _strategy(args, config)
    labels = _labels(args.labels, args.batch, config.num_classes)
    dev = device(args)
    # Noise from a CPU generator, then moved: the same --seed gives the same noise on
    # every device.
    gen = torch.Generator().manual_seed(args.seed)
    z = torch.randn(args.batch, config.seq_len, config.token_dim, generator=gen).to(dev)
    y = None if labels is None else labels.to(dev)
    try:
        with torch.no_grad(), precision(args, dev):
            sample = reverse(model, z, y=y, strategy=strategy, guidance=args.guidance,
                             anneal_guidance=args.anneal_guidance, denoise=args.denoise)
    except SamplingError as exc:
        status = exc.result.status
        raise CommandFailed(
            f"sampling failed in block {exc.block} ({strategy.plans[exc.block].describe()}):"
            f" {status.name}, {status.message}; lower --guidance or check the model's "
            "weights; no image written") from None
    if not torch.isfinite(sample.images).all():  # e.g. the denoising step overflowed
        raise CommandFailed("sampling produced non-finite images; no image written")
    strategy = sample.strategy or strategy  # tolerances as actually used
    capped = [str(k) for k, res in enumerate(sample.blocks) if res.status is fp.Status.MAX_ITER]
    if capped:
        note(args, f"note: block(s) {', '.join(capped)} stopped at the iteration cap before "
                   "meeting the tolerance; those blocks are not the exact inverse")
    path = save_grid(sample.images, args.out, args.nrow)
    print(f"{len(sample.images)} samples, {args.dtype} on {dev}, guidance {args.guidance:g}, "
          f"strategy {strategy}")
    print(cost_table(sample.blocks, _plan_descriptions(strategy)))
    print(f"wrote {len(sample.images)} samples to {path}")
    return 0


@_tarflow_errors
def cmd_metrics(args: argparse.Namespace) -> int:
    import torch

    from fixedpoint.tarflow import crm_igm_table, format_table

    ckpt, model = _load(args)
    data = _dataset_for(args, ckpt)
    n = min(args.batch, len(data.train_x))
    images = data.train_x[:n]
    if not args.clean:
        gen = torch.Generator().manual_seed(args.seed)
        images = images + model.config.noise_std * torch.randn(images.shape, generator=gen)
    dev = device(args)
    images = images.to(dev)
    labels = data.train_y[:n].to(dev) if model.config.num_classes > 0 else None
    with precision(args, dev):
        table = crm_igm_table(model, images, labels)
    print(f"CRM / IGM on {n} {'clean' if args.clean else 'noisy'} training images "
          f"of {data.name}, {args.dtype}")
    print(format_table(table))
    return 0


@_tarflow_errors
def cmd_generate(args: argparse.Namespace) -> int:
    from fixedpoint.distributed import DistributedError, launch

    with user_errors(DistributedError), launch(args.device) as ctx:
        return _generate(args, ctx)


def _generate(args: argparse.Namespace, ctx: Any) -> int:
    import torch

    from fixedpoint.tarflow.generate import (
        GenerationError,
        GenerationSpec,
        RunMismatchError,
        generate,
    )

    ckpt, model = _load(args, ctx.device)
    config = model.config
    strategy = _strategy(args, config)
    # One label per class by default, else the given list; either is cycled over the
    # global sample index.
    given = [v for v in (args.labels or "").split(",") if v.strip()]
    labels = _labels(args.labels, len(given) or max(config.num_classes, 1), config.num_classes)
    spec = GenerationSpec(
        num_samples=args.num_samples, shard_size=args.shard_size, seed=args.seed,
        guidance=args.guidance, anneal_guidance=args.anneal_guidance, denoise=args.denoise,
        labels=None if labels is None else tuple(labels.tolist()),
    )
    meter = _meter(args, ckpt, ctx) if args.metrics else None
    if ctx.is_main:
        note(args, f"generating {spec.num_samples} samples in {spec.num_shards} shards of "
                   f"{spec.shard_size} on {ctx.world_size} process(es) ({ctx.device}, "
                   f"{args.dtype}), strategy {strategy}")
    try:
        report = generate(
            model, spec, args.out_dir, strategy=strategy, context=ctx, meter=meter,
            autocast_dtype=torch.bfloat16 if args.dtype == "bfloat16" else None,
            checkpoint=ckpt.path, progress=not args.quiet, merge=not args.no_merge,
        )
    except (GenerationError, RunMismatchError) as exc:
        # Every rank raises the same error; one copy of the message is enough. Another
        # run's folder is a user error (2); a failed shard is a failed command (1).
        if ctx.is_main:
            print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, RunMismatchError) else 1
    if ctx.is_main:
        _print_generation(report)
    return 0


def _meter(args: argparse.Namespace, ckpt: Any, ctx: Any) -> Any:
    """The FCD meter; the main rank trains (or loads) the cached classifier first."""
    from fixedpoint.quality import QualityMeter

    data = _dataset_for(args, ckpt)
    c = ckpt.model_config
    if (data.image_size, data.channels) != (c.image_size, c.channels):
        raise UserError(
            f"--metrics scores {data.name} images ({data.channels}x{data.image_size}x"
            f"{data.image_size}) but this model makes {c.channels}x{c.image_size}x"
            f"{c.image_size} images; leave out --metrics and score samples.pt with an "
            "Inception-based FID tool")
    meter = None
    if ctx.is_main:
        meter = QualityMeter.for_dataset(data, cache_dir=CLASSIFIER_CACHE,
                                         progress=not args.quiet)
    ctx.barrier()
    if meter is None:
        meter = QualityMeter.for_dataset(data, cache_dir=CLASSIFIER_CACHE)
    return meter


def _print_generation(r: Any) -> None:
    print(f"{r.num_samples} samples in {r.shards_total} shards of {r.shard_size} on "
          f"{r.world_size} process(es): {r.shards_sampled} sampled now, "
          f"{r.shards_skipped} already done")
    times = ", ".join(f"{t:.2f}" for t in r.rank_seconds)
    rate = r.samples_per_second
    print(f"sampling time per rank (s): {times}; slowest rank {r.slowest_rank}: "
          f"{r.slowest_rank_seconds:.2f} s"
          + (f" ({rate:.1f} samples/s)" if rate else ""))
    print(f"cost of the shards sampled now: {r.dependent_steps:,} dependent steps, "
          f"{r.token_evals:,} token evaluations")
    if r.fcd is not None:
        acc = "" if r.accuracy is None else f", conditional accuracy {r.accuracy:.4f}"
        print(f"Frechet classifier distance (FCD, not FID) over {r.num_samples} samples: "
              f"{r.fcd:.4f}{acc}")
    if r.samples_path:
        print(f"samples: {r.samples_path}")
    print(f"report: {Path(r.out_dir) / 'report.json'}")


def _read_state_dict(path: Path) -> dict[str, Any]:
    """The tensors of a published .pth file, refusing what cannot be a model."""
    import torch

    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"{path}: not a readable torch state dict ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # some releases wrap the weights in {"model": ...}
    if not isinstance(state, dict) or not state or not all(
            isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path}: expected a state dict of tensors")
    if all(k.startswith("module.") for k in state):
        # Saved from a DistributedDataParallel / DataParallel wrapper.
        state = {k[len("module."):]: v for k, v in state.items()}
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise UserError(f"{path}: non-finite weights in {', '.join(bad[:3])}"
                        + (f" and {len(bad) - 3} more" if len(bad) > 3 else ""))
    return state


def _published_channels(state: dict[str, Any]) -> int:
    """The channel count that splits the token dimension into channels * patch^2.

    Published TarFlows are RGB or gray, and ``3 k^2`` is never a square, so at most one
    of the two fits. When neither does (or the key is missing), 3 is returned and the
    model's own check names the problem.
    """
    import math

    weight = state.get("blocks.0.proj_in.weight")  # (width, token_dim) in that layout
    if weight is None or weight.ndim != 2:
        return PUBLISHED_CHANNELS[0]
    token_dim = weight.shape[1]
    for channels in PUBLISHED_CHANNELS:
        patch_area, rest = divmod(token_dim, channels)
        if rest == 0 and math.isqrt(patch_area) ** 2 == patch_area:
            return channels
    return PUBLISHED_CHANNELS[0]


@_tarflow_errors
def cmd_convert(args: argparse.Namespace) -> int:
    from fixedpoint.tarflow import TarFlow
    from fixedpoint.tarflow.checkpoint import save_checkpoint

    path = Path(args.published)
    state = _read_state_dict(path)
    channels = args.channels or _published_channels(state)
    try:
        model = TarFlow.from_published_state_dict(
            state, channels=channels, head_dim=args.head_dim, noise_std=args.noise_std)
    except (ValueError, KeyError) as exc:
        raise UserError(f"{path}: {exc}") from None
    out = save_checkpoint(args.out, model, extra={"converted_from": str(path.resolve())})
    c = model.config
    print(f"{path.name}: image {c.image_size}x{c.image_size}x{c.channels}, patch "
          f"{c.patch_size} (T={c.seq_len}), width {c.width}, {c.blocks} blocks x {c.layers} "
          f"layers, {c.num_classes} classes, "
          f"{sum(p.numel() for p in model.parameters()):,} parameters -> {out}")
    return 0
