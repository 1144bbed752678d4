"""Training the diffusion UNet: exact resume, atomic state, the saved model."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fixedpoint.data import Dataset, load_digits_dataset
from fixedpoint.diffusion import DDIMChain, UNetConfig, load_model, sample_loop
from fixedpoint.diffusion.train import TrainConfig, TrainError, crop_images, pad_images, train


@pytest.fixture(scope="module")
def small_digits() -> Dataset:
    d = load_digits_dataset()
    return Dataset(
        "digits", d.train_x[:96], d.train_y[:96], d.test_x[:40], d.test_y[:40], d.provenance
    )


def config(tmp_path, **kw) -> TrainConfig:
    unet = UNetConfig(sample_size=8, channels=(8, 16), norm_groups=4, num_classes=10)
    base = TrainConfig(
        unet=unet,
        steps=6,
        batch_size=16,
        warmup=2,
        checkpoint_every=2,
        out_dir=str(tmp_path / "run"),
    )
    return dataclasses.replace(base, **kw)


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.unet.state_dict().items()}


@pytest.mark.slow
def test_interrupted_training_resumes_bit_for_bit(tmp_path, small_digits):
    whole = train(config(tmp_path / "a"), data=small_digits, progress=False)
    assert whole.steps == 6 and whole.test_loss > 0

    def crash(step, loss):
        if step == 5:
            raise RuntimeError("simulated crash")

    cfg = config(tmp_path / "b")
    with pytest.raises(RuntimeError, match="simulated"):
        train(cfg, data=small_digits, progress=False, callback=crash)
    resumed = train(cfg, data=small_digits, progress=False)
    assert resumed.resumed_from == 4  # the last checkpoint before the crash
    a, b = load_model(whole.model_dir), load_model(resumed.model_dir)
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert resumed.test_loss == whole.test_loss
    # a finished run is returned as it is
    again = train(cfg, data=small_digits, progress=False)
    assert again.steps == 6 and again.test_loss == whole.test_loss


def test_saved_model_samples_like_the_trained_one(tmp_path, small_digits):
    out = train(config(tmp_path, steps=2), data=small_digits, progress=False)
    model = load_model(out.model_dir)
    assert model.num_classes == 10 and model.meta["dataset"] == "digits"
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    chain = DDIMChain.from_schedule(model.schedule, 5)
    a = sample_loop(chain, model.denoiser(), x, labels=torch.tensor([1, 2]), guidance=2.0)
    model.save(tmp_path / "copy")
    b = sample_loop(
        chain,
        load_model(tmp_path / "copy").denoiser(),
        x,
        labels=torch.tensor([1, 2]),
        guidance=2.0,
    )
    assert torch.equal(a, b) and bool(torch.isfinite(a).all())


def test_a_different_configuration_is_refused(tmp_path, small_digits):
    cfg = config(tmp_path, steps=2)
    train(cfg, data=small_digits, progress=False)
    with pytest.raises(TrainError, match="different training configuration"):
        train(dataclasses.replace(cfg, lr=1e-4), data=small_digits, progress=False)
    with pytest.raises(TrainError, match="steps"):
        train(dataclasses.replace(cfg, steps=0), data=small_digits, progress=False)


def test_padding_round_trip():
    x = torch.rand(3, 1, 28, 28) * 2 - 1
    padded = pad_images(x, 32)
    assert padded.shape == (3, 1, 32, 32) and float(padded[..., 0, 0].max()) == -1.0
    assert torch.equal(crop_images(padded, 28), x)
    with pytest.raises(TrainError, match="do not fit"):
        pad_images(x, 16)
