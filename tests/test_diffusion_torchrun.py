"""``fixedpoint diffusion generate`` under torchrun: two CPU processes (gloo) give the
single process's samples bit for bit, and a rerun with another process count resumes.

Each shard is one batch whatever the number of processes and every process runs with one
torch thread, so each sample is computed by the same operations in the same order.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fixedpoint.diffusion import tiny_model

pytestmark = pytest.mark.slow

# 5 samples in shards of 2: shards 0 and 2 (a short one) on rank 0, shard 1 on rank 1.
ARGS = ["diffusion", "generate", "--model", "model", "--sampler", "ddpm", "--steps", "6",
        "--method", "paradigms", "--window", "4", "--num-samples", "5", "--shard-size", "2",
        "--guidance", "2", "--seed", "3", "--threads", "1", "--quiet"]


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def torchrun(args: list[str], cwd: Path, nproc: int = 2) -> subprocess.CompletedProcess[str]:
    return run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={nproc}", "-m", "fixedpoint", *args], cwd)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("diffusion-torchrun")
    model = tiny_model(num_classes=3, seed=4)
    model.meta["dataset"] = "digits"
    model.save(work / "model")
    return work


def samples(path: Path) -> dict:
    return torch.load(path / "samples.pt", weights_only=False)


def test_two_processes_equal_one_and_resume_with_another_count(work):
    proc = run([sys.executable, "-m", "fixedpoint", *ARGS, "--out-dir", "single"], work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = torchrun([*ARGS, "--out-dir", "two"], work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = samples(work / "single"), samples(work / "two")
    assert torch.equal(one["images"], two["images"])
    assert torch.equal(one["labels"], two["labels"])
    report = json.loads((work / "two" / "report.json").read_text())
    assert report["world_size"] == 2 and report["samples"] == 5
    assert len(report["seconds_per_rank"]) == 2
    # A lost shard is redone by a run with another number of processes.
    shard = sorted((work / "two" / "shards").glob("shard-*.pt"))[1]
    shard.unlink()
    proc = torchrun([*ARGS, "--out-dir", "two"], work, nproc=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert shard.exists()
    assert torch.equal(samples(work / "two")["images"], one["images"])
