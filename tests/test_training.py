"""Training: the loss goes down, runs are deterministic and resume bit for bit."""

from __future__ import annotations

import dataclasses
import os
import signal
from pathlib import Path

import pytest
import torch

from fixedpoint.data import Dataset, load_digits_dataset
from fixedpoint.tarflow import TarFlow, TarFlowConfig
from fixedpoint.tarflow.checkpoint import load_checkpoint
from fixedpoint.tarflow.train import (
    PRESETS,
    TrainConfig,
    TrainError,
    TrainOutcome,
    evaluate_bpd,
    initial_model,
    train,
)

# One thread: tiny models gain nothing from two, and on a shared 2-core machine a second
# busy process makes two-thread OpenMP kernels crawl.
TINY = TarFlowConfig(image_size=8, patch_size=2, width=64, blocks=2, layers=1, num_classes=10)


@pytest.fixture(scope="module")
def digits() -> Dataset:
    full = load_digits_dataset()
    # A fixed subset keeps every step and the final evaluation cheap.
    return dataclasses.replace(full, train_x=full.train_x[:256], train_y=full.train_y[:256],
                               test_x=full.test_x[:64], test_y=full.test_y[:64])


def config(out: Path, **kw: object) -> TrainConfig:
    base = dict(dataset="digits", steps=8, batch_size=32, warmup=2, checkpoint_every=3,
                out_dir=str(out), seed=0, threads=1)
    base.update(kw)
    return TrainConfig(**base)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def reference(digits: Dataset, tmp_path_factory: pytest.TempPathFactory) -> TrainOutcome:
    """An uninterrupted 8-step run."""
    out = tmp_path_factory.mktemp("reference")
    return train(TINY, config(out), progress=False, data=digits)


def states_equal(a: Path, b: Path) -> None:
    ca, cb = load_checkpoint(a), load_checkpoint(b)
    assert ca.step == cb.step
    for key, value in ca.model_state.items():
        assert torch.equal(value, cb.model_state[key]), key
    oa, ob = ca.optimizer_state["state"], cb.optimizer_state["state"]
    for i in oa:
        for name in oa[i]:
            assert torch.equal(oa[i][name], ob[i][name]), (i, name)
    assert ca.scheduler_state == cb.scheduler_state
    assert torch.equal(ca.rng_state["data_generator"], cb.rng_state["data_generator"])


def test_loss_decreases(digits: Dataset, tmp_path: Path) -> None:
    out = train(TINY, config(tmp_path, steps=40, batch_size=64, warmup=5, checkpoint_every=100,
                             lr=3e-3),
                progress=False, data=digits)
    first, last = sum(out.losses[:5]) / 5, sum(out.losses[-5:]) / 5
    assert len(out.losses) == 40
    assert last < first - 0.2, (first, last)
    assert out.steps == 40 and out.resumed_from == 0
    ckpt = load_checkpoint(out.checkpoint)
    assert ckpt.extra["test_bpd"] == out.test_bpd and ckpt.extra["complete"]
    assert ckpt.extra["data"] == digits.provenance
    assert ckpt.extra["train_config"]["steps"] == 40


def test_resume_after_crash_is_bit_identical(
    digits: Dataset, reference: TrainOutcome, tmp_path: Path
) -> None:
    def crash(step: int, loss: float) -> None:
        if step == 5:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        train(TINY, config(tmp_path), progress=False, data=digits, callback=crash)
    assert load_checkpoint(tmp_path / "checkpoint.pt").step == 3  # last periodic one
    # Disturb the global RNG: resume must restore everything it depends on.
    torch.manual_seed(12345)
    resumed = train(TINY, config(tmp_path), progress=False, data=digits)
    assert resumed.resumed_from == 3 and resumed.steps == 8
    assert resumed.losses == reference.losses
    assert resumed.test_bpd == reference.test_bpd
    states_equal(resumed.checkpoint, reference.checkpoint)


def test_graceful_interrupt_then_resume(
    digits: Dataset, reference: TrainOutcome, tmp_path: Path
) -> None:
    # SIGINT mid-run: the step finishes, a checkpoint is written at that step, and
    # KeyboardInterrupt propagates; rerunning finishes identically.
    def interrupt(step: int, loss: float) -> None:
        if step == 4:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt, match="interrupted at step 4/8"):
        train(TINY, config(tmp_path), progress=False, data=digits, callback=interrupt)
    assert load_checkpoint(tmp_path / "checkpoint.pt").step == 4
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    resumed = train(TINY, config(tmp_path), progress=False, data=digits)
    assert resumed.resumed_from == 4
    assert resumed.losses == reference.losses and resumed.test_bpd == reference.test_bpd
    states_equal(resumed.checkpoint, reference.checkpoint)


def test_completed_run_is_not_retrained(
    digits: Dataset, reference: TrainOutcome
) -> None:
    again = train(TINY, config(reference.checkpoint.parent), progress=False, data=digits)
    assert again.run_time == 0.0 and again.resumed_from == 8
    assert again.test_bpd == reference.test_bpd


def test_runtime_only_fields_do_not_block_resume(
    digits: Dataset, reference: TrainOutcome, tmp_path: Path
) -> None:
    cfg = config(reference.checkpoint.parent, checkpoint_every=7, eval_batch_size=13)
    assert train(TINY, cfg, progress=False, data=digits).resumed_from == 8


def test_conflicting_checkpoint_is_refused(
    digits: Dataset, reference: TrainOutcome
) -> None:
    out = reference.checkpoint.parent
    message = r"different configuration.*lr: 0\.002 in checkpoint vs 0\.001"
    with pytest.raises(TrainError, match=message):
        train(TINY, config(out, lr=1e-3), progress=False, data=digits)
    with pytest.raises(TrainError, match="width: 64 in checkpoint vs 128"):
        train(dataclasses.replace(TINY, width=128), config(out), progress=False, data=digits)


def test_unconditional_model_trains(digits: Dataset, tmp_path: Path) -> None:
    cfg = dataclasses.replace(TINY, num_classes=0)
    out = train(cfg, config(tmp_path, steps=2), progress=False, data=digits)
    assert out.steps == 2 and torch.isfinite(torch.tensor(out.test_bpd))


def test_epochs_and_validation(digits: Dataset) -> None:
    assert TrainConfig(epochs=2, batch_size=64).total_steps(256) == 8
    assert TrainConfig(epochs=0.5, batch_size=100).total_steps(250) == 1
    with pytest.raises(TrainError, match="exactly one of steps and epochs"):
        TrainConfig(steps=3, epochs=1).total_steps(100)
    with pytest.raises(TrainError, match="exactly one"):
        TrainConfig().total_steps(100)
    with pytest.raises(TrainError, match="batch_size"):
        train(TINY, TrainConfig(steps=1, batch_size=0), progress=False, data=digits)
    with pytest.raises(TrainError, match="expects 1x28x28"):
        train(dataclasses.replace(TINY, image_size=28, patch_size=4), TrainConfig(steps=1),
              progress=False, data=digits)


def test_evaluate_bpd_is_reproducible(digits: Dataset) -> None:
    torch.manual_seed(0)
    model = TarFlow(TINY)
    a = evaluate_bpd(model, digits.test_x, digits.test_y, 0.1, seed=3, batch_size=20)
    b = evaluate_bpd(model, digits.test_x, digits.test_y, 0.1, seed=3, batch_size=64)
    assert a == pytest.approx(b, rel=1e-6)
    # An untrained (identity) flow: z = noisy x, so bits/dim is the standard normal's.
    x = digits.test_x + 0.1 * torch.randn(digits.test_x.shape,
                                          generator=torch.Generator().manual_seed(3))
    nats = 0.5 * x.pow(2).mean() + 0.5 * torch.log(torch.tensor(2 * torch.pi))
    assert a == pytest.approx(float(nats / torch.log(torch.tensor(2.0))), rel=1e-5)


def test_presets_are_consistent() -> None:
    sizes = {"digits": 8, "mnist": 28}
    for name, preset in PRESETS.items():
        assert preset.model.image_size == sizes[preset.train.dataset], name
        assert preset.train.out_dir.endswith(name)
        assert (preset.train.steps is None) != (preset.train.epochs is None)
        assert preset.train.lr == 2e-3 and preset.train.betas == (0.9, 0.95)
        assert preset.model.noise_std > 0


def test_training_neither_sets_nor_reads_the_global_rng(digits: Dataset, tmp_path: Path,
                                                        reference: TrainOutcome) -> None:
    torch.manual_seed(999)
    before = torch.get_rng_state()
    outcome = train(TINY, config(tmp_path), progress=False, data=digits)
    assert torch.equal(torch.get_rng_state(), before)  # not set, not advanced
    # ... and the result does not depend on it: the reference ran under another state.
    assert outcome.losses == reference.losses
    states_equal(outcome.checkpoint, reference.checkpoint)


def test_initial_model_depends_on_the_seed_only() -> None:
    torch.manual_seed(1)
    a = initial_model(TINY, seed=5).state_dict()
    torch.manual_seed(2)
    b = initial_model(TINY, seed=5).state_dict()
    c = initial_model(TINY, seed=6).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["blocks.0.proj_in.weight"], c["blocks.0.proj_in.weight"])
    # The constructor's initialisation: identity flow, causal masks, torch's Linear bounds.
    fresh = TarFlow(TINY).state_dict()
    assert a.keys() == fresh.keys()
    for k in a:
        if "proj_out" in k or "attn_mask" in k or "norm" in k or k == "var":
            assert torch.equal(a[k], fresh[k]), k
    w = a["blocks.0.attn_blocks.0.attention.qkv.weight"]
    bound = 1 / w.shape[1] ** 0.5
    assert float(w.abs().max()) <= bound and float(w.abs().max()) > 0.9 * bound

