"""Sharded generation in one process: per-index noise, shards, resume, failures, metrics.

The multi-process runs (torchrun, gloo) are in test_torchrun.py; here the same code runs
as a single process, which is also what a plain ``python`` invocation does.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_tarflow_sampling import make_model

import fixedpoint as fp
from fixedpoint import distributed
from fixedpoint.cli import main
from fixedpoint.data import load_dataset
from fixedpoint.quality import QualityMeter, feature_statistics
from fixedpoint.tarflow import Strategy, reverse
from fixedpoint.tarflow import generate as gen
from fixedpoint.tarflow.checkpoint import load_model, save_checkpoint
from fixedpoint.tarflow.generate import (
    GenerationError,
    GenerationSpec,
    RunMismatchError,
    generate,
    load_samples,
    rank_shards,
    sample_labels,
    sample_noise,
    shard_ranges,
)

SPEC = GenerationSpec(num_samples=10, shard_size=4, seed=3, guidance=1.0,
                      labels=tuple(range(10)))


@pytest.fixture(scope="module")
def model():
    return make_model(seed=2)


@pytest.fixture(scope="module")
def meter():
    # A quickly trained classifier: the test checks the reduction, not the classifier.
    return QualityMeter.for_dataset(load_dataset("digits"), epochs=2)


def jacobi(model) -> Strategy:
    return Strategy.uniform(fp.Jacobi(atol=1e-5), model.config.blocks)


# ------------------------------------------------------------------- per-index pieces


def test_noise_depends_only_on_seed_and_index():
    full = sample_noise(range(10), seed=3, seq_len=16, token_dim=4)
    assert full.shape == (10, 16, 4)
    assert torch.equal(sample_noise([7, 2], 3, 16, 4), full[[7, 2]])
    assert not torch.equal(sample_noise([2], 4, 16, 4)[0], full[2])
    # (seed, index) is mixed, not added: seed 4 / index 0 is not seed 3 / index 1.
    assert not torch.equal(sample_noise([0], 4, 16, 4)[0], full[1])


def test_labels_cycle_over_the_global_index():
    assert sample_labels([0, 1, 2, 5], (4, 7)).tolist() == [4, 7, 4, 7]
    assert sample_labels([3], None) is None


@given(n=st.integers(1, 200), size=st.integers(1, 64), world=st.integers(1, 9))
def test_ranks_share_out_every_index_exactly_once(n, size, world):
    ranges = shard_ranges(n, size)
    owned = [[i for k in rank_shards(len(ranges), rank, world) for i in ranges[k]]
             for rank in range(world)]
    assert sorted(i for mine in owned for i in mine) == list(range(n))
    counts = [len(rank_shards(len(ranges), rank, world)) for rank in range(world)]
    assert max(counts) - min(counts) <= 1  # balanced
    assert all(len(r) == size for r in ranges[:-1]) and 1 <= len(ranges[-1]) <= size


@settings(max_examples=20)
@given(n=st.integers(1, 12), size=st.integers(1, 5), seed=st.integers(0, 2**31))
def test_noise_of_shards_is_the_noise_of_the_whole_run(n, size, seed):
    whole = sample_noise(range(n), seed, 4, 2)
    parts = torch.cat([sample_noise(r, seed, 4, 2) for r in shard_ranges(n, size)])
    assert torch.equal(whole, parts)


def test_shard_ranges_cover_every_index_once():
    ranges = shard_ranges(10, 4)
    assert [list(r) for r in ranges] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert GenerationSpec(num_samples=10, shard_size=4).num_shards == 3


@pytest.mark.parametrize("kwargs", [
    dict(num_samples=0), dict(num_samples=4, shard_size=0), dict(num_samples=2.5),
    dict(num_samples=4, seed=-1), dict(num_samples=4, guidance=math.nan),
    dict(num_samples=4, labels=()),
])
def test_bad_specs_are_rejected(kwargs):
    with pytest.raises(ValueError):
        GenerationSpec(**kwargs)


def test_labels_must_fit_the_model(model, tmp_path):
    with pytest.raises(ValueError, match="classes"):
        generate(model, GenerationSpec(num_samples=2, labels=(10,)), tmp_path)
    uncond = make_model(seed=1, num_classes=0)
    with pytest.raises(ValueError, match="classes"):
        generate(uncond, GenerationSpec(num_samples=2, labels=(0,)), tmp_path)


# ---------------------------------------------------------------------- one process


def test_each_shard_is_one_batch_of_the_per_index_noise(model, tmp_path):
    report = generate(model, SPEC, tmp_path, strategy=jacobi(model))
    samples = load_samples(report.samples_path)
    assert samples["indices"].tolist() == list(range(10))
    assert samples["labels"].tolist() == list(range(10))
    c = model.config
    for r in shard_ranges(10, 4):
        z = sample_noise(r, SPEC.seed, c.seq_len, c.token_dim)
        y = sample_labels(r, SPEC.labels)
        with torch.no_grad():
            expected = reverse(model, z, y, strategy=jacobi(model), guidance=1.0).images
        # Same batch composition, same code path: bit for bit.
        assert torch.equal(samples["images"][r.start:r.stop], expected)
    assert (report.shards_total, report.shards_sampled, report.shards_skipped) == (3, 3, 0)
    assert report.world_size == 1 and len(report.rank_seconds) == 1
    assert report.slowest_rank_seconds == report.rank_seconds[0] > 0
    assert report.dependent_steps > 0 and report.token_evals > 0
    stored = json.loads((tmp_path / "report.json").read_text())
    assert stored["fingerprint"] == report.fingerprint
    assert stored["samples_per_second"] == pytest.approx(10 / report.slowest_rank_seconds)


def test_every_strategy_gives_the_sequential_samples(model, tmp_path):
    seq = generate(model, SPEC, tmp_path / "seq")
    par = generate(model, SPEC, tmp_path / "par",
                   strategy=Strategy.uniform(fp.GSJacobi(modules=3), model.config.blocks))
    a = load_samples(seq.samples_path)["images"]
    b = load_samples(par.samples_path)["images"]
    # Different window shapes sum attention in a different order: fp32 round-off only.
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_rerun_skips_complete_shards_and_redoes_damaged_ones(model, tmp_path):
    first = generate(model, SPEC, tmp_path, strategy=jacobi(model))
    before = load_samples(first.samples_path)["images"].clone()
    shards = tmp_path / "shards"
    (shards / "shard-000001.pt").unlink()
    (shards / "shard-000002.pt").write_bytes(b"not a torch file")
    with pytest.warns(RuntimeWarning, match="unreadable shard"):
        again = generate(model, SPEC, tmp_path, strategy=jacobi(model))
    assert (again.shards_sampled, again.shards_skipped) == (2, 1)
    assert torch.equal(load_samples(again.samples_path)["images"], before)
    third = generate(model, SPEC, tmp_path, strategy=jacobi(model))
    assert (third.shards_sampled, third.shards_skipped) == (0, 3)
    assert third.samples_per_second is None


def test_a_run_can_be_extended_to_more_samples(model, tmp_path):
    small = generate(model, SPEC, tmp_path / "grow")
    first = load_samples(small.samples_path)["images"].clone()
    more = GenerationSpec(**{**SPEC.__dict__, "num_samples": 13})
    with pytest.warns(RuntimeWarning, match="not a complete shard"):
        grown = generate(model, more, tmp_path / "grow")
    # Shards 0 and 1 are reused, shard 2 (8..9 -> 8..11) is redone, shard 3 is new.
    assert (grown.shards_skipped, grown.shards_sampled) == (2, 2)
    images = load_samples(grown.samples_path)["images"]
    assert torch.equal(images[:8], first[:8])
    fresh = generate(model, more, tmp_path / "fresh")
    assert torch.equal(images, load_samples(fresh.samples_path)["images"])


def test_output_directory_of_another_run_is_refused(model, tmp_path):
    generate(model, SPEC, tmp_path)
    other = GenerationSpec(num_samples=10, shard_size=4, seed=3, guidance=2.0,
                           labels=tuple(range(10)))
    with pytest.raises(RunMismatchError) as info:
        generate(model, other, tmp_path)
    # The setting that differs is named, with both values; a user error (ValueError).
    assert isinstance(info.value, ValueError) and "\n" not in str(info.value)
    assert "different run (spec.guidance: 1.0 there, 2.0 now); choose another" in str(
        info.value)
    twice = GenerationSpec(num_samples=10, shard_size=4, seed=4, guidance=2.0,
                           labels=tuple(range(10)))
    with pytest.raises(RunMismatchError, match=r"\(spec\.guidance: 1\.0 there, 2\.0 now; "
                       r"spec\.seed: 3 there, 4 now\)"):
        generate(model, twice, tmp_path)
    with pytest.raises(RunMismatchError, match=r"\(strategy: .*Sequential.* there, .*Jacobi"):
        generate(model, SPEC, tmp_path, strategy=jacobi(model))
    (tmp_path / "run.json").write_text("{broken")
    with pytest.raises(GenerationError, match="unreadable run manifest"):
        generate(model, SPEC, tmp_path)


def test_non_finite_samples_fail_naming_rank_and_indices(model, tmp_path, monkeypatch):
    clean = gen.sample_noise

    def poisoned(indices, seed, seq_len, token_dim):
        z = clean(indices, seed, seq_len, token_dim)
        for row, i in enumerate(indices):
            if i == 6:
                z[row, 3] = 1e38  # finite noise that overflows inside the network
        return z

    monkeypatch.setattr(gen, "sample_noise", poisoned)
    with pytest.raises(GenerationError) as info:
        generate(model, SPEC, tmp_path, strategy=jacobi(model))
    message = str(info.value)
    assert "rank 0 failed on shard 1 (samples 6)" in message
    assert "non-finite values in 1 sample(s)" in message and "NONFINITE" in message
    assert "1 of 3 shards are complete" in message
    # The shard before the failure is kept, the failed one is not written.
    assert (tmp_path / "shards" / "shard-000000.pt").exists()
    assert not (tmp_path / "shards" / "shard-000001.pt").exists()
    assert not (tmp_path / "samples.pt").exists()
    monkeypatch.setattr(gen, "sample_noise", clean)
    report = generate(model, SPEC, tmp_path, strategy=jacobi(model))
    assert (report.shards_sampled, report.shards_skipped) == (2, 1)


def test_an_exception_in_a_shard_is_reported_with_its_samples(model, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("out of memory, pretend")

    monkeypatch.setattr(gen, "sample_noise", broken)
    with pytest.raises(GenerationError, match=r"shard 0 \(samples 0\.\.3\): RuntimeError: out "
                                              r"of memory, pretend"):
        generate(model, SPEC, tmp_path)


def test_reduced_quality_equals_scoring_all_samples_at_once(model, meter, tmp_path):
    report = generate(model, SPEC, tmp_path, meter=meter)
    samples = load_samples(report.samples_path)
    # The reduction: per-shard float64 sums give numpy's two-pass moments of the same
    # features to float64 round-off.
    images = samples["images"]
    parts = [images[r.start:r.stop] for r in shard_ranges(10, 4)]
    mean, cov = gen._moments([gen._feature_sums(meter, p, None) for p in parts])
    ref_mean, ref_cov = feature_statistics(torch.cat([meter.features(p) for p in parts]))
    torch.testing.assert_close(mean, torch.from_numpy(ref_mean), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(cov, torch.from_numpy(ref_cov), rtol=1e-12, atol=1e-12)
    # Scoring all images in one call computes the float32 features with another batch
    # size (differences ~1e-7 relative), and the distance takes a matrix square root of
    # singular covariances (10 samples, 64 features), which amplifies input errors; the
    # measured difference is 3e-8 relative, hence 1e-6 here.
    assert report.fcd == pytest.approx(meter.frechet(images), rel=1e-6)
    assert report.accuracy == meter.accuracy(samples["images"], samples["labels"])
    uncond = make_model(seed=1, num_classes=0)
    u = generate(uncond, GenerationSpec(num_samples=6, shard_size=4), tmp_path / "u",
                 meter=meter)
    assert u.accuracy is None and u.fcd is not None and u.fcd > 0


def test_bfloat16_autocast_run_is_finite_and_close(model, tmp_path):
    f32 = generate(model, SPEC, tmp_path / "f32")
    bf16 = generate(model, SPEC, tmp_path / "bf16", autocast_dtype=torch.bfloat16)
    assert bf16.fingerprint != f32.fingerprint  # the dtype is part of the run's identity
    a = load_samples(f32.samples_path)["images"]
    b = load_samples(bf16.samples_path)["images"]
    assert torch.isfinite(b).all()
    # bf16 linear layers keep ~3 significant digits (unit roundoff 2^-8 = 0.4%); the
    # inverse flow amplifies input errors through its blocks, so the bound is relative to
    # the samples' scale (values up to ~6 here; an absolute 0.1, which assumed values of
    # order 1, failed on this machine at 0.104 = 1.9% of the scale).  A wrong cast (say,
    # bf16 reaching the solver's tolerance test) costs far more than that.
    assert float((a - b).abs().max()) < 0.05 * float(a.abs().max())


# --------------------------------------------------------------------- the launcher


def test_plain_process_is_a_world_of_one(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert not distributed.launched()
    with distributed.launch("cpu") as ctx:
        assert (ctx.rank, ctx.world_size, ctx.backend, ctx.is_main) == (0, 1, None, True)
        assert ctx.gather({"a": 1}) == [{"a": 1}]
        ctx.barrier()
    with distributed.launch("auto") as ctx:
        assert ctx.device.type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_backends_and_device_errors():
    assert distributed.backend_for(torch.device("cpu")) == "gloo"
    assert distributed.backend_for(torch.device("cuda", 0)) == "nccl"
    with pytest.raises(distributed.DistributedError, match="bad device"):
        with distributed.launch("gpu7"):
            pass
    with pytest.raises(distributed.DistributedError, match="not supported"):
        with distributed.launch("meta"):
            pass
    if not torch.cuda.is_available():
        with pytest.raises(distributed.DistributedError, match="CUDA is not available"):
            with distributed.launch("cuda"):
                pass


# ---------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, model) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_checkpoint(path, model)
    return path


def test_cli_generate_and_resume(checkpoint, tmp_path, capsys):
    args = ["generate", "--checkpoint", str(checkpoint), "--num-samples", "9",
            "--shard-size", "4", "--out-dir", str(tmp_path), "--strategy", "[1-4-8-5]",
            "--guidance", "1", "--labels", "3,1,4", "--quiet"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "9 samples in 3 shards of 4 on 1 process(es): 3 sampled now, 0 already done" in out
    assert "slowest rank 0" in out
    samples = load_samples(tmp_path / "samples.pt")
    assert samples["labels"].tolist() == [3, 1, 4] * 3
    assert main(args) == 0
    assert "0 sampled now, 3 already done" in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [
    (["--num-samples", "0"], "--num-samples must be >= 1"),
    (["--shard-size", "-2"], "--shard-size must be >= 1"),
    (["--device", "cuda:banana"], "bad device"),
    (["--strategy", "[9-4-8-5]"], "bad --strategy"),
])
def test_cli_generate_user_errors(checkpoint, tmp_path, capsys, extra, message):
    args = ["generate", "--checkpoint", str(checkpoint), "--out-dir", str(tmp_path), "--quiet"]
    assert main(args + extra) == 2
    assert message in capsys.readouterr().err


def test_cli_generate_failure_exits_1_with_the_message(checkpoint, tmp_path, capsys,
                                                      monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(gen, "sample_noise", broken)
    args = ["generate", "--checkpoint", str(checkpoint), "--out-dir", str(tmp_path),
            "--num-samples", "4", "--quiet"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "rank 0 failed on shard 0 (samples 0..3): RuntimeError: boom" in err


def test_cli_convert_published_state_dict(model, tmp_path, capsys):
    published = tmp_path / "tiny_model_2_64_4_2_0.1.pth"
    torch.save(model.state_dict(), published)  # the published layout: a bare state dict
    out = tmp_path / "converted.pt"
    args = ["convert", str(published), "--out", str(out), "--channels", "1",
            "--head-dim", "32", "--noise-std", str(model.config.noise_std)]
    assert main(args) == 0
    assert "T=16" in capsys.readouterr().out
    converted = load_model(out)
    assert converted.config == model.config
    for name, tensor in model.state_dict().items():
        assert torch.equal(converted.state_dict()[name], tensor)
    torch.save({"blocks.0.nonsense": torch.zeros(2)}, tmp_path / "bad.pth")
    assert main(["convert", str(tmp_path / "bad.pth"), "--out", str(out),
                 "--noise-std", "0.1"]) == 2
    assert "unexpected key" in capsys.readouterr().err
    (tmp_path / "garbage.pth").write_bytes(b"\x00garbage")
    assert main(["convert", str(tmp_path / "garbage.pth"), "--out", str(out),
                 "--noise-std", "0.1"]) == 2
    assert "not a readable torch state dict" in capsys.readouterr().err


def test_cli_metrics_refuse_images_the_classifier_cannot_score(tmp_path, capsys):
    path = tmp_path / "big.pt"
    save_checkpoint(path, make_model(seed=0, image_size=16))
    assert main(["generate", "--checkpoint", str(path), "--out-dir", str(tmp_path / "o"),
                 "--metrics", "--quiet"]) == 2
    assert "leave out --metrics" in capsys.readouterr().err


def test_cuda_binding_checks_the_gpu_count_before_touching_cuda(monkeypatch):
    # No GPU here: pretend one is visible and check the guard that runs before any
    # CUDA call (two processes on this node would need two GPUs).
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(distributed.DistributedError, match="2 processes on this node but "
                                                           "only 1 CUDA devices"):
        distributed.cuda_device(local_rank=1, local_world_size=2)
    with pytest.raises(distributed.DistributedError, match="names one GPU"):
        distributed._resolve_device("cuda:0", local_rank=0, local_world=2, world=2)
