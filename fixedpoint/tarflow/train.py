"""Training TarFlow by maximum likelihood, deterministic and resumable.

Recipe (background section 2): Gaussian noise of std ``model_config.noise_std`` is added
to every training batch; the loss is ``0.5 mean(z^2) - mean(logdet)`` per dimension;
labels are replaced by ``-1`` ("no label") with probability ``label_drop`` so that the
model also learns the unconditional density used by classifier-free guidance; AdamW with
betas (0.9, 0.95), a linear warm-up then a cosine decay to zero, and gradient-norm
clipping.

Determinism and resume: the initial weights come from a generator seeded with ``seed``
(:func:`initial_model`), all later randomness from one ``torch.Generator`` (noise and
label drop) and from per-epoch permutations derived from ``(seed, epoch)``; the global
RNGs are neither set nor read.  The generator, the optimiser and the scheduler are saved
in every checkpoint, so a run that is interrupted and restarted with the same
configuration resumes from its last checkpoint and ends bit-for-bit where an uninterrupted
run would (on the same machine, thread count and torch build).
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
from fixedpoint.tarflow.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from fixedpoint.tarflow.model import TarFlow, TarFlowConfig

__all__ = [
    "PRESETS",
    "Preset",
    "TrainConfig",
    "TrainError",
    "TrainOutcome",
    "evaluate_bpd",
    "initial_model",
    "train",
]


class TrainError(ValueError):
    """A training request that cannot be honoured (bad config, conflicting out_dir)."""


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings.  Exactly one of ``steps`` / ``epochs`` sets the length.

    Fields that do not change the result (``out_dir``, ``checkpoint_name``,
    ``checkpoint_every``, ``eval_batch_size``, ``threads``, ``data_dir``) are ignored
    when deciding whether an existing checkpoint belongs to this run.
    """

    dataset: str = "digits"
    steps: int | None = None
    epochs: float | None = None
    batch_size: int = 64
    lr: float = 2e-3
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 1e-4
    warmup: int = 100
    grad_clip: float = 1.0
    label_drop: float = 0.1
    seed: int = 0
    checkpoint_every: int = 500
    out_dir: str = ".cache/runs/digits"
    checkpoint_name: str = "checkpoint.pt"
    data_dir: str | None = None
    eval_batch_size: int = 500
    threads: int | None = None
    device: str = "cpu"

    _RUNTIME_ONLY = (
        "out_dir", "checkpoint_name", "checkpoint_every", "eval_batch_size", "threads",
        "data_dir", "device",
    )

    def identity(self) -> dict[str, Any]:
        """The fields that determine the trained weights (compared on resume)."""
        d = dataclasses.asdict(self)
        for key in self._RUNTIME_ONLY:
            d.pop(key, None)
        d["betas"] = list(d["betas"])
        return d

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(d["betas"])
        return d

    @property
    def checkpoint_path(self) -> Path:
        return Path(self.out_dir) / self.checkpoint_name

    def total_steps(self, n_train: int) -> int:
        if (self.steps is None) == (self.epochs is None):
            raise TrainError("set exactly one of steps and epochs")
        if self.steps is not None:
            return int(self.steps)
        return max(1, math.ceil(float(self.epochs) * self.steps_per_epoch(n_train)))

    def steps_per_epoch(self, n_train: int) -> int:
        # Batches are full-size (the ragged tail of each epoch's permutation is dropped)
        # so every step sees the same batch size and the loss scale never jumps.
        return max(1, n_train // self.batch_size)

    def validate(self) -> None:
        if self.batch_size < 1:
            raise TrainError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.steps is not None and self.steps < 1:
            raise TrainError(f"steps must be >= 1, got {self.steps}")
        if self.epochs is not None and self.epochs <= 0:
            raise TrainError(f"epochs must be > 0, got {self.epochs}")
        if not 0.0 <= self.label_drop <= 1.0:
            raise TrainError(f"label_drop must be in [0, 1], got {self.label_drop}")
        if self.checkpoint_every < 1:
            raise TrainError(f"checkpoint_every must be >= 1, got {self.checkpoint_every}")
        if self.lr <= 0 or self.warmup < 0 or self.grad_clip <= 0:
            raise TrainError("lr and grad_clip must be > 0 and warmup >= 0")


@dataclass(frozen=True)
class TrainOutcome:
    """What :func:`train` produced.

    ``train_time`` is the cumulative optimisation time over all (resumed) runs;
    ``run_time`` the time spent in this call; ``seconds_per_epoch`` is measured from the
    steps of this call (NaN if it ran none).
    """

    checkpoint: Path
    test_bpd: float
    train_time: float
    run_time: float
    steps: int
    resumed_from: int
    seconds_per_epoch: float
    parameters: int
    losses: list[float] = field(default_factory=list, repr=False)


@dataclass(frozen=True)
class Preset:
    """A model and training configuration sized for a 2-core CPU."""

    model: TarFlowConfig
    train: TrainConfig
    description: str


# Sized for a 2-core CPU.  Step times (batch 64, forward + backward + AdamW, torch 2.13,
# idle machine, 2 threads / 1 thread): digits 53 / 70 ms (23 steps per epoch: 100 epochs
# ~ 2 min); mnist-p4 555 / 1030 ms (125 steps per epoch over the 8,000 training images:
# 69 s/epoch, 12 epochs ~ 14 min; the background note's 77 s per 10,000 images agrees);
# mnist-p2 441 / 761 ms (55 s/epoch, 12 epochs ~ 11 min; width 128 would cost 1.9 s/step
# at T=196).  When another process keeps a core busy, two-thread kernels slow down 4-30x:
# pass threads=1 (CLI --threads 1) there.
# Sample quality is a matter of training length (studies/tarflow_training_curve.py): the
# mnist-p4 model at the full mode's 8 epochs (17 CPU minutes at 1 thread) draws the digit
# it is asked for 39% of the time at guidance 1, 44% at guidance 2 (2,000 samples x 2
# seeds; chance at 2 epochs, then about +6 points per epoch, not yet saturating); 90% needs
# 2-30x this budget by the fits (README), which a shared 2-core CPU does not have.
PRESETS: dict[str, Preset] = {
    "digits": Preset(
        TarFlowConfig(
            image_size=8, channels=1, patch_size=2, width=64, blocks=4, layers=2,
            head_dim=64, num_classes=10, noise_std=0.1,
        ),
        TrainConfig(
            dataset="digits", epochs=100, batch_size=64, warmup=100, checkpoint_every=500,
            out_dir=".cache/runs/digits",
        ),
        "sklearn digits 8x8, patch 2 (T=16), width 64, 4 blocks x 2 layers",
    ),
    "mnist-p4": Preset(
        TarFlowConfig(
            image_size=28, channels=1, patch_size=4, width=128, blocks=4, layers=4,
            head_dim=64, num_classes=10, noise_std=0.1,
        ),
        TrainConfig(
            dataset="mnist", epochs=12, batch_size=64, warmup=200, checkpoint_every=250,
            out_dir=".cache/runs/mnist-p4",
        ),
        "MNIST 28x28, patch 4 (T=49), width 128, 4 blocks x 4 layers",
    ),
    "mnist-p2": Preset(
        TarFlowConfig(
            image_size=28, channels=1, patch_size=2, width=64, blocks=4, layers=2,
            head_dim=64, num_classes=10, noise_std=0.1,
        ),
        TrainConfig(
            dataset="mnist", epochs=12, batch_size=64, warmup=200, checkpoint_every=250,
            out_dir=".cache/runs/mnist-p2",
        ),
        "MNIST 28x28, patch 2 (T=196), width 64, 4 blocks x 2 layers",
    ),
}


# ----------------------------------------------------------------------------- pieces


def flow_loss(model: TarFlow, x: Tensor, y: Tensor | None) -> Tensor:
    """``0.5 mean(z^2) - mean(logdet) / D``: negative log-likelihood per dimension in nats,
    up to the constant ``0.5 log(2 pi)``."""
    z, logdet = model(x, y)
    dims = z[0].numel()
    # The prior variance buffer is 1 for models trained here; dividing keeps the loss
    # consistent with model.log_prob for any model.
    return 0.5 * (z.pow(2) / model.var).mean() - logdet.mean() / dims


@torch.no_grad()
def evaluate_bpd(
    model: TarFlow,
    images: Tensor,
    labels: Tensor | None,
    noise_std: float,
    seed: int = 0,
    batch_size: int = 500,
    device: str | torch.device = "cpu",
) -> float:
    """Mean test NLL in bits per dimension of noise-augmented images.

    The noise is drawn from a generator seeded by ``seed`` so that the number is
    reproducible and comparable between runs.
    """
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    for lo in range(0, len(images), batch_size):
        x = images[lo : lo + batch_size]
        x = x + noise_std * torch.randn(x.shape, generator=gen)
        y = None if labels is None else labels[lo : lo + batch_size].to(device)
        bpd = model.nll_bits_per_dim(x.to(device), y)
        total += float(bpd) * len(x)
        count += len(x)
    model.train(was_training)
    return total / max(count, 1)


def _epoch_permutation(seed: int, epoch: int, n: int) -> Tensor:
    # Derived from (seed, epoch) rather than drawn from a running generator, so a resumed
    # run recomputes the current epoch's order without replaying earlier epochs.
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def _lr_factor(warmup: int, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def _optimizer(model: TarFlow, cfg: TrainConfig) -> torch.optim.AdamW:
    # Decay matrices only: decaying biases, norm gains and embeddings just fights the
    # likelihood without regularising anything useful.
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    keep = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": keep, "weight_decay": 0.0},
    ]
    # foreach=False: one deterministic code path whatever the torch build defaults to.
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), foreach=False)


def _diff(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    keys = sorted(set(a) | set(b))
    return [f"{k}: {b.get(k)!r} in checkpoint vs {a.get(k)!r} requested"
            for k in keys if a.get(k) != b.get(k)]


def _is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


@contextmanager
def _graceful_stop() -> Iterator[threading.Event]:
    """Turn SIGINT/SIGTERM into a flag checked between steps.

    A signal in the middle of an optimiser step would leave parameters half updated; the
    loop instead finishes the step, writes a checkpoint and then raises
    KeyboardInterrupt.  A second signal interrupts immediately.
    """
    event = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield event
        return
    previous = {}

    def handler(signum: int, frame: Any) -> None:
        if event.is_set():
            raise KeyboardInterrupt
        event.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, handler)
    try:
        yield event
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


# ------------------------------------------------------------------------------ train


def _check_resume(
    ckpt: Checkpoint, model_config: TarFlowConfig, cfg: TrainConfig, data: Dataset
) -> None:
    problems = _diff(model_config.to_dict(), ckpt.config)
    problems += _diff(cfg.identity(), ckpt.extra.get("train_config", {}))
    stored_md5 = ckpt.extra.get("data", {}).get("md5")
    if stored_md5 != data.provenance.get("md5"):
        problems.append("training data differ (md5)")
    if problems:
        raise TrainError(
            f"{ckpt.path} belongs to a different configuration ({'; '.join(problems)}); "
            "use another output directory or delete the checkpoint"
        )


def train(
    model_config: TarFlowConfig,
    train_config: TrainConfig,
    progress: bool = True,
    data: Dataset | None = None,
    callback: Callable[[int, float], None] | None = None,
) -> TrainOutcome:
    """Train (or resume training) and evaluate the test NLL; see the module docstring.

    ``data`` overrides loading ``train_config.dataset`` (tests pass a small subset).
    ``callback(step, loss)`` runs after every optimiser step; an exception it raises
    aborts training like a crash would (used to test resume).
    """
    train_config.validate()
    threads = torch.get_num_threads()
    if train_config.threads:
        torch.set_num_threads(train_config.threads)
    try:
        return _train(model_config, train_config, progress, data, callback)
    finally:
        torch.set_num_threads(threads)  # do not leak the setting into the caller


def _train(
    model_config: TarFlowConfig,
    cfg: TrainConfig,
    progress: bool,
    data: Dataset | None,
    callback: Callable[[int, float], None] | None,
) -> TrainOutcome:
    data = _training_data(model_config, cfg, data)
    run = _Run.start(model_config, cfg, data)
    if run.path.exists():
        done = run.resume()
        if done is not None:
            return done
    run.optimise(progress, callback)
    return run.finish()


def _training_data(model_config: TarFlowConfig, cfg: TrainConfig,
                   data: Dataset | None) -> Dataset:
    if data is None:
        data = load_dataset(cfg.dataset, cfg.data_dir)
    if data.image_size != model_config.image_size or data.channels != model_config.channels:
        raise TrainError(
            f"data set {data.name} has {data.channels}x{data.image_size}x{data.image_size} "
            f"images but the model expects {model_config.channels}x"
            f"{model_config.image_size}x{model_config.image_size}"
        )
    return data


def initial_model(config: TarFlowConfig, seed: int,
                  device: torch.device | str = "cpu") -> TarFlow:
    """A fresh model whose weights depend on ``seed`` only: drawn from a local generator
    (built on the meta device, so the global RNG is neither read nor advanced)."""
    with torch.device("meta"):
        model = TarFlow(config)
    model = model.to_empty(device="cpu")
    model.reset_parameters(torch.Generator().manual_seed(seed))
    return model.to(device)


@dataclass(eq=False)
class _Run:
    """One training run's state: model, optimiser, scheduler, data stream and counters.

    All randomness comes from ``gen`` (noise, label drop), the per-epoch permutations
    and the seeded initialisation; library code never touches the global RNGs.
    """

    model_config: TarFlowConfig
    cfg: TrainConfig
    data: Dataset
    model: TarFlow
    optimizer: torch.optim.Optimizer
    scheduler: Any
    gen: torch.Generator
    total: int
    spe: int
    step: int = 0
    train_time: float = 0.0
    losses: list[float] = field(default_factory=list)
    resumed_from: int = 0
    run_time: float = 0.0
    steps_run: int = 0

    @classmethod
    def start(cls, model_config: TarFlowConfig, cfg: TrainConfig, data: Dataset) -> _Run:
        n_train = len(data.train_x)
        total = cfg.total_steps(n_train)
        model = initial_model(model_config, cfg.seed, cfg.device)
        model.train()
        optimizer = _optimizer(model, cfg)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_factor(cfg.warmup, total))
        return cls(model_config, cfg, data, model, optimizer, scheduler,
                   torch.Generator().manual_seed(cfg.seed + 1), total,
                   cfg.steps_per_epoch(n_train))

    @property
    def path(self) -> Path:
        return self.cfg.checkpoint_path

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def conditional(self) -> bool:
        return self.model_config.num_classes > 0

    def resume(self) -> TrainOutcome | None:
        """Continue from the checkpoint; the outcome if that run is already complete."""
        ckpt = load_checkpoint(self.path, map_location=self.cfg.device)
        _check_resume(ckpt, self.model_config, self.cfg, self.data)
        self.model.load_state_dict(ckpt.model_state)
        if ckpt.optimizer_state is not None:
            self.optimizer.load_state_dict(ckpt.optimizer_state)
        if ckpt.scheduler_state is not None:
            self.scheduler.load_state_dict(ckpt.scheduler_state)
        if "data_generator" in ckpt.rng_state:
            self.gen.set_state(ckpt.rng_state["data_generator"])
        self.step = self.resumed_from = ckpt.step
        self.train_time = float(ckpt.extra.get("train_time", 0.0))
        stored = ckpt.extra.get("losses")
        self.losses = [] if stored is None else [float(v) for v in stored]
        if self.step >= self.total and "test_bpd" in ckpt.extra:
            return TrainOutcome(
                self.path, float(ckpt.extra["test_bpd"]), self.train_time, 0.0, self.step,
                self.step, float(ckpt.extra.get("seconds_per_epoch", float("nan"))),
                self.parameters, self.losses,
            )
        return None

    def checkpoint(self, **more: Any) -> None:
        extra = {
            "train_config": self.cfg.identity(),
            "train_config_full": self.cfg.to_dict(),
            "data": self.data.provenance,
            "train_time": self.train_time,
            "losses": torch.tensor(self.losses, dtype=torch.float64),
            "parameters": self.parameters,
            **more,
        }
        save_checkpoint(self.path, self.model, self.optimizer, self.scheduler, step=self.step,
                        extra=extra, rng={"data_generator": self.gen.get_state()})

    def batch(self, perm: Tensor, i: int) -> tuple[Tensor, Tensor | None]:
        """Batch ``i`` of the epoch's permutation, noise added, labels dropped."""
        cfg, device = self.cfg, self.cfg.device
        idx = perm[i * cfg.batch_size : (i + 1) * cfg.batch_size]
        x = self.data.train_x[idx]
        x = x + self.model_config.noise_std * torch.randn(x.shape, generator=self.gen)
        y = None
        if self.conditional:
            y = self.data.train_y[idx].clone()
            y[torch.rand(len(y), generator=self.gen) < cfg.label_drop] = -1
            y = y.to(device)
        return x.to(device), y

    def one_step(self, x: Tensor, y: Tensor | None) -> float:
        loss = flow_loss(self.model, x, y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        self.steps_run += 1
        value = float(loss.detach())
        self.losses.append(value)
        return value

    def optimise(self, progress: bool,
                 callback: Callable[[int, float], None] | None) -> None:
        """Steps until ``total``: periodic checkpoints, and a checkpoint before a
        graceful stop (SIGINT / SIGTERM)."""
        bar = _progress_bar(progress, self.total, self.step, self.data.name)
        perm_epoch, perm = -1, None
        run_start = time.perf_counter()
        try:
            with _graceful_stop() as stop:
                while self.step < self.total:
                    t0 = time.perf_counter()
                    epoch, i = divmod(self.step, self.spe)
                    if epoch != perm_epoch:
                        perm_epoch = epoch
                        perm = _epoch_permutation(self.cfg.seed, epoch, len(self.data.train_x))
                    value = self.one_step(*self.batch(perm, i))
                    self.train_time += time.perf_counter() - t0
                    self._report(bar, value, epoch, run_start, progress)
                    if callback is not None:
                        callback(self.step, value)
                    if stop.is_set() and self.step < self.total:
                        self.checkpoint()
                        raise KeyboardInterrupt(
                            f"interrupted at step {self.step}/{self.total}; checkpoint saved "
                            f"to {self.path}; rerun the same command to resume"
                        )
        finally:
            if bar is not None:
                bar.close()
            self.run_time = time.perf_counter() - run_start

    def _report(self, bar: Any, value: float, epoch: int, run_start: float,
                progress: bool) -> None:
        """Progress after a step, and the periodic checkpoint."""
        step, total, every = self.step, self.total, self.cfg.checkpoint_every
        if bar is not None:
            bar.update(1)
            if step % 10 == 0 or step == total:
                bar.set_postfix(loss=f"{value:.4f}", epoch=epoch)
        if step % every == 0 and step < total:
            self.checkpoint()
            if progress and bar is None:
                # No TTY (a log file, nohup): one plain line per checkpoint instead of a
                # progress bar.
                recent = self.losses[-every:]
                per_epoch = (time.perf_counter() - run_start) / self.steps_run * self.spe
                print(f"step {step}/{total} epoch {epoch} loss "
                      f"{sum(recent) / len(recent):.4f} {per_epoch:.1f} s/epoch",
                      file=sys.stderr, flush=True)

    def finish(self) -> TrainOutcome:
        """Evaluate the test NLL, write the final checkpoint, return the outcome."""
        sec_per_epoch = (self.run_time / self.steps_run * self.spe) if self.steps_run else float(
            "nan")
        self.model.eval()
        test_bpd = evaluate_bpd(
            self.model, self.data.test_x, self.data.test_y if self.conditional else None,
            self.model_config.noise_std, seed=self.cfg.seed + 2,
            batch_size=self.cfg.eval_batch_size, device=self.cfg.device,
        )
        self.checkpoint(test_bpd=test_bpd, seconds_per_epoch=sec_per_epoch, complete=True)
        return TrainOutcome(
            self.path, test_bpd, self.train_time, self.run_time, self.step, self.resumed_from,
            sec_per_epoch, self.parameters, self.losses,
        )


def _progress_bar(progress: bool, total: int, step: int, name: str) -> Any:
    if not (progress and _is_tty()):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=step, desc=f"train {name}", unit="step", dynamic_ncols=True)
