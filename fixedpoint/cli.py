"""Command-line interface: ``python -m fixedpoint <command>`` (or ``fixedpoint``).

Commands:

* ``train``   train a TarFlow from a preset (optionally overriding sizes), resumable;
* ``sample``  sample from a checkpoint with a solver strategy, write a PNG grid and print
  the per-block cost table;
* ``metrics`` print the CRM / IGM table of a checkpoint on training images;
* ``generate`` many samples in shards, resumable, optionally scored (FCD, accuracy); under
  ``torchrun`` the shards are spread over the processes;
* ``convert`` a published TarFlow state dict into a checkpoint;
* ``demo``    the solver demonstration (``fixedpoint.demo``), if installed.

User errors (missing checkpoint or data, malformed strategy, bad option values) print one
line ``fixedpoint: error: ...`` to stderr and exit with status 2, without a traceback.
Heavy imports (torch, the model) happen inside the commands so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib
import importlib.util
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["UserError", "build_parser", "main"]

PROG = "fixedpoint"
METHOD_NAMES = ("sequential", "jacobi", "gs-jacobi", "anderson", "triangular-anderson")
# The preset whose default output directory a dataset's commands look in.
DEFAULT_PRESET = {"digits": "digits", "mnist": "mnist-p4"}
# Where `generate --metrics` caches the feature classifier of the Frechet distance.
CLASSIFIER_CACHE = ".cache/classifiers"


class UserError(Exception):
    """An error the user can fix; reported as one line, exit status 2."""


# ------------------------------------------------------------------------------ parser


def _common_parser() -> argparse.ArgumentParser:
    """The options every command shares, defined once and reused via ``parents=``."""
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("common options")
    group.add_argument("--dataset", choices=("digits", "mnist"), default=None,
                       help="data set (default: the checkpoint's, or digits)")
    group.add_argument("--data-dir", default=None, metavar="DIR",
                       help="MNIST folder with the IDX files (default: $FIXEDPOINT_MNIST_DIR "
                            "or ../shared/data/mnist)")
    group.add_argument("--checkpoint", default=None, metavar="PATH",
                       help="checkpoint to read (sample, metrics) or write (train); default "
                            ".cache/runs/<preset>/checkpoint.pt")
    group.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    group.add_argument("--device", default="cpu",
                       help="cpu, cuda (under torchrun: the GPU of the local rank), cuda:N or "
                            "auto (CUDA if available); default cpu")
    group.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                       help="compute dtype for sampling and metrics; bfloat16 = autocast "
                            "(default float32)")
    group.add_argument("--threads", type=int, default=None,
                       help="torch CPU threads (default: torch's choice; 1 is faster when "
                            "another process keeps the other core busy)")
    group.add_argument("--quiet", action="store_true", help="no progress bars or notes")
    return common


def _sampling_parser() -> argparse.ArgumentParser:
    """Sampling options shared by ``sample`` and ``generate``."""
    sampling = argparse.ArgumentParser(add_help=False)
    group = sampling.add_argument_group("sampling options")
    group.add_argument("--strategy", default="sequential",
                       help="a method name (" + ", ".join(METHOD_NAMES) + ") for every block, "
                            "or a paper-style spec such as '[6-8-32-10]' (default sequential)")
    group.add_argument("--modules", type=int, default=4,
                       help="module count when --strategy is gs-jacobi (default 4)")
    group.add_argument("--atol", type=float, default=None,
                       help="absolute stopping tolerance of the iterative methods (default: "
                            "stop at the rounding level of the iterate; 0 with --rtol 0: exact "
                            "finite termination); raised to the dtype's noise floor")
    group.add_argument("--rtol", type=float, default=None,
                       help="relative stopping tolerance (default: see --atol)")
    group.add_argument("--guidance", type=float, default=0.0, help="CFG strength (default 0)")
    group.add_argument("--labels", default=None,
                       help="comma-separated class labels (cycled over the samples), or 'none' "
                            "for unconditional; default 0,1,2,... for class-conditional models")
    group.add_argument("--anneal-guidance", action="store_true",
                       help="anneal the CFG strength along the sequence, g_t = g t / (T - 1)")
    group.add_argument("--denoise", action="store_true",
                       help="finish with one score-based denoising step")
    return sampling


def build_parser() -> argparse.ArgumentParser:
    common = _common_parser()
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Parallel solvers for triangular systems, applied to TarFlow sampling.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", parents=[common], help="train a TarFlow (resumable)",
                       description="Train a TarFlow from a preset; sizes may be overridden. "
                                   "Rerunning the same command resumes an interrupted run.")
    p.add_argument("--preset", default=None,
                   help="digits, mnist-p4 or mnist-p2 (default: by --dataset, else digits)")
    p.add_argument("--out-dir", default=None, metavar="DIR",
                   help="run directory (default .cache/runs/<preset>[-<config hash>])")
    sizes = p.add_argument_group("overrides of the preset")
    for flag, kind in (("--width", int), ("--blocks", int), ("--layers", int),
                       ("--patch-size", int), ("--head-dim", int), ("--num-classes", int),
                       ("--noise-std", float)):
        sizes.add_argument(flag, type=kind, default=None)
    for flag, kind in (("--steps", int), ("--epochs", float), ("--batch-size", int),
                       ("--lr", float), ("--warmup", int), ("--checkpoint-every", int)):
        sizes.add_argument(flag, type=kind, default=None)

    sampling = _sampling_parser()
    p = sub.add_parser("sample", parents=[common, sampling], help="sample from a checkpoint",
                       description="Sample with a solver strategy; writes a PNG grid and "
                                   "prints the per-block cost table.")
    p.add_argument("--batch", type=int, default=16, help="number of samples (default 16)")
    p.add_argument("--out", default="samples.png", help="PNG file (default samples.png)")
    p.add_argument("--nrow", type=int, default=None, help="images per grid row")

    p = sub.add_parser(
        "generate", parents=[common, sampling],
        help="many samples in shards, optionally scored; runs under torchrun",
        description="Sample --num-samples images in shards of --shard-size (each shard one "
                    "batch, each sample's noise seeded by its global index), optionally "
                    "score them (FCD, accuracy). Launch with `torchrun --nproc_per_node=N` "
                    "to shard across processes (gloo on CPU, nccl on CUDA); a plain run is "
                    "one process. Rerunning the same command skips finished shards.")
    p.add_argument("--num-samples", type=int, default=256, help="samples in all (default 256)")
    p.add_argument("--shard-size", type=int, default=64,
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

    p = sub.add_parser(
        "convert", help="convert a published TarFlow state dict into a checkpoint",
        description="Read a state dict in the published TarFlow layout (a .pth file of "
                    "tensors), infer the configuration from its shapes and write a "
                    "fixedpoint checkpoint that sample / generate / metrics can use.")
    p.add_argument("published", metavar="STATE_DICT", help="the published .pth file")
    p.add_argument("--out", required=True, metavar="PATH", help="checkpoint to write")
    p.add_argument("--channels", type=int, default=3, help="image channels (default 3)")
    p.add_argument("--head-dim", type=int, default=64, help="attention head size (default 64)")
    p.add_argument("--noise-std", type=float, required=True,
                   help="the model's training noise sigma (the last number of the published "
                        "name, e.g. 0.07 for AFHQ 8-768-8-8-0.07)")
    p.add_argument("--quiet", action="store_true", help="no notes")

    p = sub.add_parser("metrics", parents=[common], help="CRM / IGM table of a checkpoint",
                       description="Convergence-ranking (CRM) and initial-guess (IGM) "
                                   "metrics per block, on training images.")
    p.add_argument("--batch", type=int, default=256,
                   help="training images to measure on (default 256)")
    p.add_argument("--clean", action="store_true",
                   help="measure on clean images (default: with the training noise added, "
                        "so block inputs match what the model was trained on)")

    sub.add_parser("demo", add_help=False, help="run the solver demonstration",
                   description="Arguments are passed on to fixedpoint.demo.")
    return parser


# ----------------------------------------------------------------------------- helpers


def _note(args: argparse.Namespace, message: str) -> None:
    if not args.quiet:
        print(message, file=sys.stderr)


def _device(args: argparse.Namespace) -> Any:
    import torch

    if args.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(args.device)
    except (RuntimeError, ValueError) as exc:
        raise UserError(f"bad --device {args.device!r}: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {args.device}: CUDA is not available on this machine")
    return device


def _precision(args: argparse.Namespace, device: Any) -> Any:
    """Context for the requested compute dtype.

    bfloat16 runs under ``torch.autocast``: the model keeps float32 weights and its
    LayerNorm / softmax / exp stay in float32 (the model is written for autocast; casting
    its weights to bfloat16 is not supported), while the linear layers run in bfloat16.
    """
    import contextlib

    import torch

    if args.dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _default_checkpoint(dataset: str | None) -> Path:
    from fixedpoint.tarflow.train import PRESETS

    preset = PRESETS[DEFAULT_PRESET[dataset or "digits"]]
    return preset.train.checkpoint_path


def _load(args: argparse.Namespace, device: Any = None) -> tuple[Any, Any]:
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
    model = ckpt.build_model().to(device=device if device is not None else _device(args))
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


def _strategy(args: argparse.Namespace, config: Any) -> Any:
    """A Strategy from a method name or a paper-style spec; errors become UserError."""
    import fixedpoint as fp
    from fixedpoint.tarflow.strategy import Strategy

    spec, tols = args.strategy, {"atol": args.atol, "rtol": args.rtol}
    name = spec.strip().lower()
    try:
        methods = {
            "sequential": lambda: fp.Sequential(),
            "jacobi": lambda: fp.Jacobi(**tols),
            "gs-jacobi": lambda: fp.GSJacobi(modules=args.modules, **tols),
            "anderson": lambda: fp.Anderson(**tols),
            "triangular-anderson": lambda: fp.TriangularAnderson(**tols),
        }
        if name in methods:
            if name == "gs-jacobi" and not 1 <= args.modules <= config.seq_len:
                raise ValueError(f"--modules must be in 1..{config.seq_len}, got {args.modules}")
            return Strategy.uniform(methods[name](), config.blocks)
        if not spec.strip().startswith("["):
            raise ValueError(f"expected one of {', '.join(METHOD_NAMES)} or a spec like "
                             "'[1-4-8-5]' ([Stack-GS-J-Else])")
        return Strategy.parse(spec, config.blocks, config.seq_len, **tols)
    except (ValueError, TypeError) as exc:
        raise UserError(f"bad --strategy {spec!r}: {exc}") from None


def save_grid(images: Any, path: str | Path, nrow: int | None = None) -> Path:
    """Write images ``(B, C, H, W)`` in ``[-1, 1]`` as one PNG grid (nearest upscaling)."""
    import math

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


def cost_table(blocks: Sequence[Any], methods: Sequence[str] | None = None) -> str:
    """Per-block cost table: iterations, dependent steps, token evals, wall-clock, status.

    ``blocks`` are solver results in forward block order (the sampler inverts them from
    the last to the first); ``methods`` the matching descriptions.
    """
    header = ("block", "method", "iters", "dep.steps", "token evals", "wall ms", "status")
    rows = []
    for k, res in enumerate(blocks):
        method = methods[k] if methods is not None and k < len(methods) else "-"
        rows.append((str(k), method, str(res.iterations), str(res.dependent_steps),
                     f"{res.token_evals:,}", f"{res.wall_time * 1e3:.1f}",
                     getattr(res.status, "name", str(res.status))))
    rows.append(("total", "", str(sum(r.iterations for r in blocks)),
                 str(sum(r.dependent_steps for r in blocks)),
                 f"{sum(r.token_evals for r in blocks):,}",
                 f"{sum(r.wall_time for r in blocks) * 1e3:.1f}", ""))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = []
    for i, row in enumerate([header, *rows]):
        cells = [c.ljust(widths[j]) if j in (1, 6) else c.rjust(widths[j])
                 for j, c in enumerate(row)]
        lines.append("  ".join(cells).rstrip())
        if i == 0 or i == len(rows) - 1:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _plan_descriptions(strategy: Any) -> list[str]:
    return [plan.describe() for plan in strategy.plans]


# ---------------------------------------------------------------------------- commands


def _config_hash(model_cfg: Any, train_cfg: Any) -> str:
    blob = json.dumps([model_cfg.to_dict(), train_cfg.identity()], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:8]


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
    train_over.update(seed=args.seed, data_dir=args.data_dir, device=str(_device(args)))
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
        _note(args, f"resuming from {train_cfg.checkpoint_path} if it matches this config")
    m = model_cfg
    length = (f"{train_cfg.steps} steps" if train_cfg.steps is not None
              else f"{train_cfg.epochs:g} epochs")
    _note(args, f"training {train_cfg.dataset} (preset {name}"
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


def cmd_sample(args: argparse.Namespace) -> int:
    import torch

    if args.batch < 1:
        raise UserError(f"--batch must be >= 1, got {args.batch}")
    ckpt, model = _load(args)
    config = model.config
    strategy = _strategy(args, config)
    labels = _labels(args.labels, args.batch, config.num_classes)
    device = _device(args)
    # Noise from a CPU generator, then moved: the same --seed gives the same noise on
    # every device.
    gen = torch.Generator().manual_seed(args.seed)
    z = torch.randn(args.batch, config.seq_len, config.token_dim, generator=gen).to(device)
    y = None if labels is None else labels.to(device)
    with torch.no_grad(), _precision(args, device):
        sample = model.reverse(z, y=y, strategy=strategy, guidance=args.guidance,
                               anneal_guidance=args.anneal_guidance, denoise=args.denoise)
    path = save_grid(sample.x, args.out, args.nrow)
    print(f"{len(sample.x)} samples, {args.dtype} on {device}, guidance {args.guidance:g}, "
          f"strategy {strategy}")
    print(cost_table(sample.blocks, _plan_descriptions(strategy)))
    print(f"wrote {len(sample.x)} samples to {path}")
    return 0


def cmd_metrics(args: argparse.Namespace) -> int:
    import torch

    from fixedpoint.tarflow.metrics import crm_igm_table, format_table

    if args.batch < 1:
        raise UserError(f"--batch must be >= 1, got {args.batch}")
    ckpt, model = _load(args)
    data = _dataset_for(args, ckpt)
    n = min(args.batch, len(data.train_x))
    images = data.train_x[:n]
    if not args.clean:
        gen = torch.Generator().manual_seed(args.seed)
        images = images + model.config.noise_std * torch.randn(images.shape, generator=gen)
    device = _device(args)
    images = images.to(device)
    labels = data.train_y[:n].to(device) if model.config.num_classes > 0 else None
    with _precision(args, device):
        table = crm_igm_table(model, images, labels)
    print(f"CRM / IGM on {n} {'clean' if args.clean else 'noisy'} training images "
          f"of {data.name}, {args.dtype}")
    print(format_table(table))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from fixedpoint.distributed import DistributedError, launch

    for flag, value in (("--num-samples", args.num_samples), ("--shard-size", args.shard_size)):
        if value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}")
    try:
        with launch(args.device) as ctx:
            return _generate(args, ctx)
    except DistributedError as exc:
        raise UserError(str(exc)) from None


def _generate(args: argparse.Namespace, ctx: Any) -> int:
    import torch

    from fixedpoint.tarflow.generate import GenerationError, GenerationSpec, generate

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
        _note(args, f"generating {spec.num_samples} samples in {spec.num_shards} shards of "
                    f"{spec.shard_size} on {ctx.world_size} process(es) ({ctx.device}, "
                    f"{args.dtype}), strategy {strategy}")
    try:
        report = generate(
            model, spec, args.out_dir, strategy=strategy, context=ctx, meter=meter,
            autocast_dtype=torch.bfloat16 if args.dtype == "bfloat16" else None,
            checkpoint=ckpt.path, progress=not args.quiet, merge=not args.no_merge,
        )
    except GenerationError as exc:
        # Every rank raises the same error; one copy of the message is enough.
        if ctx.is_main:
            print(f"{PROG} generate: error: {exc}", file=sys.stderr)
        return 1
    if ctx.is_main:
        _print_generation(report, args)
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


def _print_generation(report: Any, args: argparse.Namespace) -> None:
    r = report
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


def cmd_convert(args: argparse.Namespace) -> int:
    import torch

    from fixedpoint.tarflow.checkpoint import save_checkpoint
    from fixedpoint.tarflow.model import TarFlow

    path = Path(args.published)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"{path}: not a readable torch state dict ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # some releases wrap the weights in {"model": ...}
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor)
                                              for v in state.values()):
        raise UserError(f"{path}: expected a state dict of tensors")
    try:
        model = TarFlow.from_published_state_dict(
            state, channels=args.channels, head_dim=args.head_dim, noise_std=args.noise_std)
    except (ValueError, KeyError) as exc:
        raise UserError(f"{path}: {exc}") from None
    out = save_checkpoint(args.out, model, extra={"converted_from": str(path.resolve())})
    c = model.config
    print(f"{path.name}: image {c.image_size}, patch {c.patch_size} (T={c.seq_len}), width "
          f"{c.width}, {c.blocks} blocks x {c.layers} layers, {c.num_classes} classes, "
          f"{sum(p.numel() for p in model.parameters()):,} parameters -> {out}")
    return 0


def cmd_demo(argv: list[str]) -> int:
    if importlib.util.find_spec("fixedpoint.demo") is None:
        print(f"{PROG} demo: the solver demonstration (fixedpoint.demo) is not available in "
              "this version", file=sys.stderr)
        return 1
    demo = importlib.import_module("fixedpoint.demo")
    result = demo.main(argv)
    return result if isinstance(result, int) else 0


COMMANDS = {"train": cmd_train, "sample": cmd_sample, "metrics": cmd_metrics,
            "generate": cmd_generate, "convert": cmd_convert}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # demo hands its whole argument list to fixedpoint.demo, so it bypasses our parser.
    if argv and argv[0] == "demo":
        return cmd_demo(argv[1:])
    args = build_parser().parse_args(argv)
    from fixedpoint.data import DatasetError
    from fixedpoint.tarflow.checkpoint import CheckpointError
    from fixedpoint.tarflow.train import TrainError

    try:
        threads = getattr(args, "threads", None)
        if threads is not None:
            if threads < 1:
                raise UserError(f"--threads must be >= 1, got {threads}")
            import torch

            torch.set_num_threads(threads)
        return COMMANDS[args.command](args)
    except (UserError, CheckpointError, DatasetError, TrainError) as exc:
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print(f"{PROG} {args.command}: {exc or 'interrupted'}", file=sys.stderr)
        return 130
