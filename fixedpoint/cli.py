"""Command-line interface: ``python -m fixedpoint <command>`` (or ``fixedpoint``).

Commands:

* ``train``   train a TarFlow from a preset (optionally overriding sizes), resumable;
* ``sample``  sample from a checkpoint with a solver strategy, write a PNG grid and print
  the per-block cost table;
* ``metrics`` print the CRM / IGM table of a checkpoint on training images;
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
    group.add_argument("--device", default="cpu", help="torch device (default cpu)")
    group.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                       help="compute dtype for sampling and metrics; bfloat16 = autocast "
                            "(default float32)")
    group.add_argument("--threads", type=int, default=None,
                       help="torch CPU threads (default: torch's choice; 1 is faster when "
                            "another process keeps the other core busy)")
    group.add_argument("--quiet", action="store_true", help="no progress bars or notes")
    return common


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

    p = sub.add_parser("sample", parents=[common], help="sample from a checkpoint",
                       description="Sample with a solver strategy; writes a PNG grid and "
                                   "prints the per-block cost table.")
    p.add_argument("--strategy", default="sequential",
                   help="a method name (" + ", ".join(METHOD_NAMES) + ") for every block, "
                        "or a paper-style spec such as '[6-8-32-10]' (default sequential)")
    p.add_argument("--modules", type=int, default=4,
                   help="module count when --strategy is gs-jacobi (default 4)")
    p.add_argument("--tol", type=float, default=0.0,
                   help="absolute tolerance for the iterative methods (default 0: iterate to "
                        "the cap or exact finite termination; anderson keeps its own 1e-6)")
    p.add_argument("--batch", type=int, default=16, help="number of samples (default 16)")
    p.add_argument("--guidance", type=float, default=0.0, help="CFG strength (default 0)")
    p.add_argument("--labels", default=None,
                   help="comma-separated class labels (cycled to the batch), or 'none' for "
                        "unconditional; default 0,1,2,... for class-conditional models")
    p.add_argument("--anneal-guidance", action="store_true",
                   help="anneal the CFG strength along the sequence, g_t = g t / (T - 1)")
    p.add_argument("--denoise", action="store_true",
                   help="finish with one score-based denoising step")
    p.add_argument("--out", default="samples.png", help="PNG file (default samples.png)")
    p.add_argument("--nrow", type=int, default=None, help="images per grid row")

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


def _load(args: argparse.Namespace) -> tuple[Any, Any]:
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
    model = ckpt.build_model().to(device=_device(args))
    return ckpt, model


def _dataset_for(args: argparse.Namespace, ckpt: Any) -> Any:
    from fixedpoint.tarflow.data import load_dataset

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

    spec, tol = args.strategy, args.tol
    name = spec.strip().lower()
    try:
        methods = {
            "sequential": lambda: fp.Sequential(),
            "jacobi": lambda: fp.Jacobi(tol=tol),
            "gs-jacobi": lambda: fp.GSJacobi(modules=args.modules, tol=tol),
            "anderson": lambda: fp.Anderson() if tol == 0 else fp.Anderson(tol=tol),
            "triangular-anderson": lambda: fp.TriangularAnderson(tol=tol),
        }
        if name in methods:
            if name == "gs-jacobi" and not 1 <= args.modules <= config.seq_len:
                raise ValueError(f"--modules must be in 1..{config.seq_len}, got {args.modules}")
            return Strategy.uniform(methods[name](), config.blocks)
        if not spec.strip().startswith("["):
            raise ValueError(f"expected one of {', '.join(METHOD_NAMES)} or a spec like "
                             "'[1-4-8-5]' ([Stack-GS-J-Else])")
        return Strategy.parse(spec, config.blocks, config.seq_len, tol=tol)
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


def cmd_demo(argv: list[str]) -> int:
    if importlib.util.find_spec("fixedpoint.demo") is None:
        print(f"{PROG} demo: the solver demonstration (fixedpoint.demo) is not available in "
              "this version", file=sys.stderr)
        return 1
    demo = importlib.import_module("fixedpoint.demo")
    result = demo.main(argv)
    return result if isinstance(result, int) else 0


COMMANDS = {"train": cmd_train, "sample": cmd_sample, "metrics": cmd_metrics}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # demo hands its whole argument list to fixedpoint.demo, so it bypasses our parser.
    if argv and argv[0] == "demo":
        return cmd_demo(argv[1:])
    args = build_parser().parse_args(argv)
    from fixedpoint.tarflow.checkpoint import CheckpointError
    from fixedpoint.tarflow.data import DatasetError
    from fixedpoint.tarflow.train import TrainError

    try:
        if args.threads is not None:
            if args.threads < 1:
                raise UserError(f"--threads must be >= 1, got {args.threads}")
            import torch

            torch.set_num_threads(args.threads)
        return COMMANDS[args.command](args)
    except (UserError, CheckpointError, DatasetError, TrainError) as exc:
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print(f"{PROG} {args.command}: {exc or 'interrupted'}", file=sys.stderr)
        return 130
