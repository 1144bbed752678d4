"""Training FInC Flow by maximum likelihood, deterministic and resumable.

Loss: bits per dimension of the discrete data (uniform dequantization, the logit
transform's Jacobian included), Adam with a linear warm-up and a cosine decay, gradient
norm clipping.  All randomness after model initialisation comes from one generator
(dequantization noise) and from per-epoch permutations derived from ``(seed, epoch)``;
both, the global RNGs, the optimiser and the scheduler are saved in every checkpoint, so
an interrupted run restarted with the same configuration continues bit for bit.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fixedpoint.data import Dataset, load_dataset

from .checkpoint import load_checkpoint, save_checkpoint, set_global_rng_state
from .model import FInCFlow, FInCFlowConfig

__all__ = ["PRESETS", "Preset", "TrainConfig", "TrainError", "TrainOutcome", "evaluate_bpd",
           "train"]


class TrainError(ValueError):
    """A training request that cannot be honoured."""


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings; exactly one of ``steps`` / ``epochs`` sets the length."""

    dataset: str = "digits"
    steps: int | None = None
    epochs: float | None = None
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 50
    grad_clip: float = 10.0
    seed: int = 0
    checkpoint_every: int = 200
    out_dir: str = ".cache/runs/finc-digits"
    data_dir: str | None = None
    eval_batch_size: int = 500
    threads: int | None = None

    _RUNTIME_ONLY = ("checkpoint_every", "out_dir", "data_dir", "eval_batch_size", "threads")

    def identity(self) -> dict[str, Any]:
        """The fields that decide the trained weights (compared on resume)."""
        d = dataclasses.asdict(self)
        for key in self._RUNTIME_ONLY:
            d.pop(key)
        return d

    @property
    def checkpoint_path(self) -> Path:
        return Path(self.out_dir) / "checkpoint.pt"

    def steps_per_epoch(self, n_train: int) -> int:
        return max(1, n_train // self.batch_size)  # full batches only

    def total_steps(self, n_train: int) -> int:
        if self.steps is not None:
            return self.steps
        return max(1, math.ceil(float(self.epochs) * self.steps_per_epoch(n_train)))

    def validate(self) -> None:
        if (self.steps is None) == (self.epochs is None):
            raise TrainError("set exactly one of steps and epochs")
        if self.steps is not None and self.steps < 1:
            raise TrainError(f"steps must be >= 1, got {self.steps}")
        if self.epochs is not None and not self.epochs > 0:
            raise TrainError(f"epochs must be > 0, got {self.epochs}")
        if self.batch_size < 2:
            raise TrainError(f"batch_size must be >= 2 (ActNorm's data init), got "
                             f"{self.batch_size}")
        if not self.lr > 0 or self.warmup < 0 or not self.grad_clip > 0:
            raise TrainError("lr and grad_clip must be > 0 and warmup >= 0")
        if self.checkpoint_every < 1:
            raise TrainError(f"checkpoint_every must be >= 1, got {self.checkpoint_every}")


@dataclass(frozen=True)
class Preset:
    model: FInCFlowConfig
    train: TrainConfig
    description: str


# Sized for a shared 2-core CPU.  Step times (1 thread, batch 64, shared machine): digits
# ~0.06-0.11 s, mnist 0.28 s idle to 0.7 s loaded (125 steps per epoch over 8,000 images:
# 12 epochs take 7 to 18 min).
PRESETS: dict[str, Preset] = {
    "digits": Preset(
        FInCFlowConfig(image_size=8, channels=1, levels=2, steps=4, kernel_size=3,
                       hidden=32, bins=17),
        TrainConfig(dataset="digits", epochs=60, batch_size=64, lr=2e-3,
                    out_dir=".cache/runs/finc-digits"),
        "sklearn digits 8x8 (17 levels), 2 levels x 4 steps, k=3, coupling width 32",
    ),
    "mnist": Preset(
        FInCFlowConfig(image_size=28, channels=1, levels=2, steps=6, kernel_size=3,
                       hidden=48, bins=256),
        TrainConfig(dataset="mnist", epochs=12, batch_size=64, lr=1e-3, warmup=100,
                    checkpoint_every=100, out_dir=".cache/runs/finc-mnist"),
        "MNIST 28x28 (256 levels), 2 levels x 6 steps, k=3, coupling width 48",
    ),
}


@dataclass(frozen=True)
class TrainOutcome:
    checkpoint: Path
    test_bpd: float
    train_time: float
    steps: int
    resumed_from: int
    parameters: int
    losses: list[float] = field(default_factory=list, repr=False)


@torch.no_grad()
def evaluate_bpd(model: FInCFlow, images: Tensor, seed: int = 0, batch_size: int = 500) -> float:
    """Mean test bits/dim, dequantization noise drawn from a generator seeded by ``seed``."""
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    total = 0.0
    for lo in range(0, len(images), batch_size):
        u = model.dequantize(images[lo : lo + batch_size], gen)
        total += float(model.bits_per_dim(u).sum())
    model.train(was_training)
    return total / max(len(images), 1)


def _permutation(seed: int, epoch: int, n: int) -> Tensor:
    # From (seed, epoch), so a resumed run rebuilds the current epoch's order directly.
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def _schedule(warmup: int, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return factor


@contextmanager
def _stop_requested() -> Iterator[threading.Event]:
    """SIGINT/SIGTERM set a flag; the loop checkpoints after the current step and stops."""
    flag = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum: int, frame: Any) -> None:
        if flag.is_set():
            raise KeyboardInterrupt
        flag.set()

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def train(
    model_config: FInCFlowConfig,
    cfg: TrainConfig,
    progress: bool = True,
    data: Dataset | None = None,
    callback: Callable[[int, float], None] | None = None,
) -> TrainOutcome:
    """Train or resume, then report test bits/dim.  ``data`` overrides loading."""
    cfg.validate()
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _train(model_config, cfg, progress, data, callback)
    finally:
        torch.set_num_threads(threads)


def _train(model_config, cfg, progress, data, callback) -> TrainOutcome:
    if data is None:
        data = load_dataset(cfg.dataset, cfg.data_dir)
    shape = (model_config.channels, model_config.image_size, model_config.image_size)
    if tuple(data.train_x.shape[1:]) != shape:
        raise TrainError(f"data set {data.name} has images {tuple(data.train_x.shape[1:])}, "
                         f"the model expects {shape}")
    n_train = len(data.train_x)
    spe, total = cfg.steps_per_epoch(n_train), cfg.total_steps(n_train)
    path = cfg.checkpoint_path

    torch.manual_seed(cfg.seed)
    model = FInCFlow(model_config)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, foreach=False)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(cfg.warmup, total))
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    step, train_time, losses = 0, 0.0, []
    n_params = sum(p.numel() for p in model.parameters())
    if path.exists():
        ckpt = load_checkpoint(path)
        problems = [f"{k}: {ckpt.extra.get('train_config', {}).get(k)!r} in checkpoint vs "
                    f"{v!r} requested" for k, v in cfg.identity().items()
                    if ckpt.extra.get("train_config", {}).get(k) != v]
        if ckpt.config != model_config:
            problems.append("model config differs")
        if ckpt.extra.get("data_md5") != data.provenance.get("md5"):
            problems.append("training data differ (md5)")
        if problems:
            raise TrainError(f"{path} belongs to another run ({'; '.join(problems)}); use "
                             "another output directory or delete it")
        model.load_state_dict(ckpt.model_state)
        optimizer.load_state_dict(ckpt.optimizer_state)
        scheduler.load_state_dict(ckpt.scheduler_state)
        set_global_rng_state(ckpt.rng)
        gen.set_state(ckpt.rng["data"])
        step = ckpt.step
        train_time = float(ckpt.extra.get("train_time", 0.0))
        losses = [float(v) for v in ckpt.extra.get("losses", torch.zeros(0)).tolist()]
        if step >= total and "test_bpd" in ckpt.extra:
            return TrainOutcome(path, float(ckpt.extra["test_bpd"]), train_time, step, step,
                                n_params, losses)
    resumed_from = step

    def save(**more: Any) -> None:
        extra = {"train_config": cfg.identity(), "data": data.provenance,
                 "data_md5": data.provenance.get("md5"), "train_time": train_time,
                 "losses": torch.tensor(losses, dtype=torch.float64), "parameters": n_params,
                 **more}
        save_checkpoint(path, model, optimizer, scheduler, step, extra, {"data": gen})

    bar = None
    if progress and sys.stderr.isatty():
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=step, desc=f"finc {data.name}", unit="step")
    perm_epoch, perm = -1, None
    try:
        with _stop_requested() as stop:
            while step < total:
                t0 = time.perf_counter()
                epoch, i = divmod(step, spe)
                if epoch != perm_epoch:
                    perm_epoch, perm = epoch, _permutation(cfg.seed, epoch, n_train)
                images = data.train_x[perm[i * cfg.batch_size : (i + 1) * cfg.batch_size]]
                loss = model.bits_per_dim(model.dequantize(images, gen)).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                optimizer.step()
                scheduler.step()
                step += 1
                losses.append(float(loss.detach()))
                train_time += time.perf_counter() - t0
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(bpd=f"{losses[-1]:.3f}", epoch=epoch, refresh=False)
                if step % cfg.checkpoint_every == 0 and step < total:
                    save()
                    if progress and bar is None:  # a log file: one line per checkpoint
                        recent = losses[-cfg.checkpoint_every :]
                        print(f"step {step}/{total} epoch {epoch} train bpd "
                              f"{sum(recent) / len(recent):.4f} "
                              f"({train_time / max(step - resumed_from, 1):.3f} s/step)",
                              file=sys.stderr, flush=True)
                if callback is not None:
                    callback(step, losses[-1])
                if stop.is_set() and step < total:
                    save()
                    raise KeyboardInterrupt(f"interrupted at step {step}/{total}; checkpoint "
                                            f"saved to {path}; rerun to resume")
    finally:
        if bar is not None:
            bar.close()
    model.eval()
    test_bpd = evaluate_bpd(model, data.test_x, seed=cfg.seed + 2,
                            batch_size=cfg.eval_batch_size)
    save(test_bpd=test_bpd, complete=True)
    return TrainOutcome(path, test_bpd, train_time, step, resumed_from, n_params, losses)
