"""FInC Flow training: test bits/dim, atomic checkpoints, exact resume, corrupt files."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fixedpoint.data import Dataset, load_digits_dataset
from fixedpoint.finc import FInCFlowConfig
from fixedpoint.finc.checkpoint import CheckpointError, load_checkpoint, load_model
from fixedpoint.finc.train import TrainConfig, TrainError, evaluate_bpd, train

MODEL = FInCFlowConfig(image_size=8, levels=2, steps=1, hidden=8, bins=17)


@pytest.fixture(scope="module")
def data() -> Dataset:
    full = load_digits_dataset()
    return dataclasses.replace(full, train_x=full.train_x[:96], train_y=full.train_y[:96],
                               test_x=full.test_x[:40], test_y=full.test_y[:40])


def _cfg(tmp_path, **kw) -> TrainConfig:
    base = dict(steps=6, batch_size=16, warmup=2, checkpoint_every=2, out_dir=str(tmp_path))
    return TrainConfig(**{**base, **kw})


def test_training_reports_test_bits_per_dim_and_writes_a_loadable_checkpoint(tmp_path, data):
    out = train(MODEL, _cfg(tmp_path), progress=False, data=data)
    assert out.steps == 6 and len(out.losses) == 6
    model = load_model(out.checkpoint)
    again = evaluate_bpd(model, data.test_x, seed=2)
    assert again == pytest.approx(out.test_bpd, rel=1e-6)
    # Not a made-up number: 0 < bpd < log2(17) bits per pixel plus the model's slack.
    assert 0 < out.test_bpd < 10
    ckpt = load_checkpoint(out.checkpoint)
    assert ckpt.extra["complete"] and ckpt.step == 6
    # A finished run is not retrained.
    assert train(MODEL, _cfg(tmp_path), progress=False, data=data).resumed_from == 6


def test_an_interrupted_run_resumes_bit_for_bit(tmp_path, data):
    straight = train(MODEL, _cfg(tmp_path / "a"), progress=False, data=data)

    def crash(step: int, loss: float) -> None:
        if step == 3:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated"):
        train(MODEL, _cfg(tmp_path / "b"), progress=False, data=data, callback=crash)
    assert load_checkpoint(tmp_path / "b" / "checkpoint.pt").step == 2
    resumed = train(MODEL, _cfg(tmp_path / "b"), progress=False, data=data)
    assert resumed.resumed_from == 2
    assert resumed.losses == straight.losses
    a, b = load_model(straight.checkpoint), load_model(resumed.checkpoint)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name


def test_resume_refuses_another_configuration(tmp_path, data):
    cfg = _cfg(tmp_path, steps=4)
    train(MODEL, cfg, progress=False, data=data)
    with pytest.raises(TrainError, match="lr"):
        train(MODEL, dataclasses.replace(cfg, lr=5e-4), progress=False, data=data)
    with pytest.raises(TrainError, match="model config"):
        train(dataclasses.replace(MODEL, hidden=4), cfg, progress=False, data=data)


def test_corrupt_and_foreign_checkpoints_raise_checkpoint_error(tmp_path, data):
    out = train(MODEL, _cfg(tmp_path, steps=2), progress=False, data=data)
    blob = out.checkpoint.read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CheckpointError, match="readable"):
        load_checkpoint(truncated)
    with pytest.raises(CheckpointError, match="no such"):
        load_checkpoint(tmp_path / "absent.pt")
    foreign = tmp_path / "foreign.pt"
    torch.save({"format": "something else"}, foreign)
    with pytest.raises(CheckpointError, match="not a FInC"):
        load_checkpoint(foreign)
    payload = torch.load(out.checkpoint, weights_only=True)
    payload["config"]["steps"] = 2
    mismatched = tmp_path / "mismatched.pt"
    torch.save(payload, mismatched)
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(mismatched)


@pytest.mark.parametrize("kw, message", [
    (dict(steps=None), "exactly one"),
    (dict(batch_size=1), "batch_size"),
    (dict(lr=0.0), "lr"),
])
def test_bad_train_configs_are_rejected(tmp_path, data, kw, message):
    with pytest.raises(TrainError, match=message):
        train(MODEL, _cfg(tmp_path, **kw), progress=False, data=data)


def test_images_of_the_wrong_size_are_rejected(tmp_path, data):
    with pytest.raises(TrainError, match="expects"):
        train(dataclasses.replace(MODEL, image_size=16), _cfg(tmp_path), progress=False,
              data=data)
