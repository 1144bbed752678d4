"""Checkpoints: round trip, atomic writes and clear errors for bad files."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from fixedpoint.tarflow import checkpoint as ckpt_mod
from fixedpoint.tarflow.checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    capture_rng_state,
    load_checkpoint,
    load_model,
    restore_rng_state,
    save_checkpoint,
)
from fixedpoint.tarflow.model import TarFlow, TarFlowConfig

CONFIG = TarFlowConfig(image_size=4, patch_size=2, width=64, blocks=2, layers=1, num_classes=3)


def trained_model(config: TarFlowConfig = CONFIG) -> tuple[TarFlow, torch.optim.Optimizer, object]:
    """A model with non-trivial weights and optimiser / scheduler state."""
    torch.manual_seed(0)
    model = TarFlow(config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    x = torch.randn(8, config.channels, config.image_size, config.image_size)
    for _ in range(3):
        z, logdet = model(x)
        loss = 0.5 * z.pow(2).mean() - logdet.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model, opt, sched


def payload(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def test_round_trip(tmp_path: Path) -> None:
    model, opt, sched = trained_model()
    extra = {"data": {"dataset": "digits", "md5": {"images": "abc"}}, "test_bpd": 1.5}
    path = save_checkpoint(tmp_path / "run" / "c.pt", model, opt, sched, step=3, extra=extra,
                           rng={"data_generator": torch.Generator().manual_seed(5).get_state()})
    ckpt = load_checkpoint(path)
    assert ckpt.format_version == FORMAT_VERSION and ckpt.step == 3
    assert ckpt.config == CONFIG.to_dict() and ckpt.model_config == CONFIG
    assert ckpt.extra == extra
    assert set(ckpt.versions) >= {"torch", "numpy", "python", "fixedpoint"}
    assert {"torch", "python", "numpy", "data_generator"} <= set(ckpt.rng_state)
    for key, value in model.state_dict().items():
        assert torch.equal(ckpt.model_state[key], value), key

    loaded = load_model(path)
    assert not loaded.training
    x = torch.randn(4, 1, 4, 4)
    y = torch.tensor([0, 1, 2, -1])
    with torch.no_grad():
        z1, ld1 = model(x, y)
        z2, ld2 = loaded(x, y)
    assert torch.equal(z1, z2) and torch.equal(ld1, ld2)

    # Optimiser and scheduler state restore into fresh objects.
    opt2 = torch.optim.AdamW(loaded.parameters(), lr=1e-3)
    opt2.load_state_dict(ckpt.optimizer_state)
    assert opt2.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 1.0 / (1 + s))
    sched2.load_state_dict(ckpt.scheduler_state)
    assert sched2.last_epoch == 3


def test_without_optimizer(tmp_path: Path) -> None:
    model = TarFlow(CONFIG)
    ckpt = load_checkpoint(save_checkpoint(tmp_path / "m.pt", model))
    assert ckpt.optimizer_state is None and ckpt.scheduler_state is None and ckpt.step == 0


def test_rng_capture_restore() -> None:
    state = capture_rng_state()
    a = (torch.rand(3), random.random(), np.random.rand())  # noqa: NPY002
    restore_rng_state(state)
    b = (torch.rand(3), random.random(), np.random.rand())  # noqa: NPY002
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]


def test_rng_state_survives_weights_only_round_trip(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "c.pt", TarFlow(CONFIG))
    a = (torch.rand(3), random.random(), np.random.rand())  # noqa: NPY002
    restore_rng_state(load_checkpoint(path).rng_state)
    b = (torch.rand(3), random.random(), np.random.rand())  # noqa: NPY002
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]


def test_loading_does_not_touch_global_rng(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "c.pt", TarFlow(CONFIG))
    torch.manual_seed(7)
    expected = torch.rand(4)
    torch.manual_seed(7)
    load_model(path)
    assert torch.equal(torch.rand(4), expected)


def test_atomic_write_leaves_no_temporary_files(tmp_path: Path) -> None:
    model, opt, sched = trained_model()
    path = tmp_path / "c.pt"
    for step in range(3):  # overwriting in place
        save_checkpoint(path, model, opt, sched, step=step)
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]
    assert load_checkpoint(path).step == 2


def test_failed_write_keeps_old_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = TarFlow(CONFIG)
    path = save_checkpoint(tmp_path / "c.pt", model, step=1)
    before = path.read_bytes()

    def broken_save(obj: object, f: object) -> None:
        f.write(b"partial data")  # type: ignore[attr-defined]
        raise KeyboardInterrupt  # e.g. Ctrl-C in the middle of writing

    monkeypatch.setattr(ckpt_mod.torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, model, step=2)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        load_checkpoint(tmp_path / "none.pt")
    with pytest.raises(CheckpointError, match="not a file"):
        load_checkpoint(tmp_path)


def test_truncated_file(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "c.pt", TarFlow(CONFIG))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"c\.pt: not a fixedpoint checkpoint \(or "
                       r"corrupted\): damaged or truncated archive$") as info:
        load_checkpoint(path)
    assert "\n" not in str(info.value)


def test_random_bytes(tmp_path: Path) -> None:
    path = tmp_path / "noise.pt"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    # A plain message, without torch's advice to load with weights_only=False.
    assert str(info.value) == f"{path}: not a fixedpoint checkpoint (or corrupted)"


def test_pickled_object_is_refused(tmp_path: Path) -> None:
    # A checkpoint must never execute code: arbitrary pickles are rejected.
    path = tmp_path / "evil.pt"
    torch.save({"format": ckpt_mod.FORMAT, "x": Path("/")}, path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert str(info.value) == (f"{path}: not a fixedpoint checkpoint (or corrupted): it holds "
                               "a pickled pathlib.PosixPath object, which is never loaded")


def test_other_torch_file(tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    torch.save(TarFlow(CONFIG).state_dict(), path)
    with pytest.raises(CheckpointError, match="not a fixedpoint TarFlow checkpoint"):
        load_checkpoint(path)


def test_format_version(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "c.pt", TarFlow(CONFIG))
    data = payload(path)
    data["format_version"] = FORMAT_VERSION + 1
    torch.save(data, path)
    with pytest.raises(CheckpointError, match=f"format version {FORMAT_VERSION + 1}.*upgrade"):
        load_checkpoint(path)


def test_config_weights_mismatch(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "c.pt", TarFlow(CONFIG))
    data = payload(path)

    wider = dict(data, config={**data["config"], "width": 128})
    torch.save(wider, path)
    with pytest.raises(CheckpointError, match=r"blocks\.0\.proj_in\.weight has shape \(64, 4\), "
                                              r"the config expects \(128, 4\)"):
        load_checkpoint(path)

    deeper = dict(data, config={**data["config"], "layers": 2})
    torch.save(deeper, path)
    with pytest.raises(CheckpointError, match=r"missing keys: blocks\.0\.attn_blocks\.1\."):
        load_checkpoint(path)

    state = dict(data["model"])
    state["blocks.0.surprise"] = torch.zeros(1)
    del state["var"]
    torch.save(dict(data, model=state), path)
    message = r"missing keys: var; unexpected keys: blocks\.0\.surprise"
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


def test_invalid_config(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "c.pt", TarFlow(CONFIG))
    data = payload(path)
    torch.save(dict(data, config={**data["config"], "colour": "blue"}), path)
    with pytest.raises(CheckpointError, match="stored config is invalid.*colour"):
        load_checkpoint(path)
    torch.save(dict(data, config={**data["config"], "patch_size": 3}), path)
    with pytest.raises(CheckpointError, match="stored config is invalid.*divisible"):
        load_checkpoint(path)


def test_checkpoint_error_is_value_error() -> None:
    assert issubclass(CheckpointError, ValueError)
