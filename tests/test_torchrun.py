"""Two CPU processes under torchrun (gloo) give exactly the single-process samples and metric.

Each shard is one batch whatever the number of processes, and every process runs with
one torch thread, so each sample is computed with the same operations in the same order:
the samples must be equal bit for bit, and the Fréchet classifier distance too (the
per-shard feature sums are added in shard order on every rank).

Also: a rank that finds non-finite samples or dies makes the run fail, naming the rank
(and, when it can still speak, the sample indices); the shards written so far are kept
and a rerun samples only the missing ones.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_tarflow_sampling import make_model

from fixedpoint.tarflow.checkpoint import save_checkpoint
from fixedpoint.tarflow.generate import load_samples

pytestmark = pytest.mark.slow

WORKER = Path(__file__).with_name("torchrun_worker.py")
# 10 samples in shards of 3: shards 0 and 2 on rank 0, shards 1 and 3 (a short one) on 1.
ARGS = ["generate", "--num-samples", "10", "--shard-size", "3", "--strategy", "[2-3-8-5]",
        "--guidance", "1", "--seed", "11", "--threads", "1", "--quiet"]


def torchrun(target: list[str], cwd: Path, fault: str | None = None,
             nproc: int = 2) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if fault:
        env["FIXEDPOINT_TEST_FAULT"] = fault
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", *target]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("torchrun")
    save_checkpoint(work / "model.pt", make_model(seed=2))
    return work


@pytest.fixture(scope="module")
def single(work) -> dict:
    """The reference: one plain process (no torchrun) in the workers' environment.

    ``OMP_NUM_THREADS=1`` as torchrun sets it: ``--threads`` sets torch's threads, but the
    Fréchet distance's matrix square root runs in SciPy's BLAS, whose thread count it does
    not reach (with two BLAS threads the distance differs in the last bit).
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "fixedpoint", *ARGS, "--checkpoint", "model.pt",
           "--out-dir", "single", "--metrics"]
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((work / "single" / "report.json").read_text())
    return {"report": report, "samples": load_samples(work / "single" / "samples.pt")}


def test_two_processes_equal_one_bit_for_bit(work, single):
    proc = torchrun(["-m", "fixedpoint", *ARGS, "--checkpoint", "model.pt",
                     "--out-dir", "two", "--metrics"], work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((work / "two" / "report.json").read_text())
    samples = load_samples(work / "two" / "samples.pt")
    assert torch.equal(samples["images"], single["samples"]["images"])
    assert torch.equal(samples["labels"], single["samples"]["labels"])
    assert samples["indices"].tolist() == list(range(10))
    assert report["fcd"] == single["report"]["fcd"]
    assert report["accuracy"] == single["report"]["accuracy"]
    assert report["fingerprint"] == single["report"]["fingerprint"]
    assert report["world_size"] == 2 and single["report"]["world_size"] == 1
    assert len(report["rank_seconds"]) == 2
    assert report["slowest_rank_seconds"] == max(report["rank_seconds"])
    assert report["dependent_steps"] == single["report"]["dependent_steps"]
    # Only the main rank prints the summary.
    assert proc.stdout.count("10 samples in 4 shards of 3 on 2 process(es)") == 1
    # Every shard records which rank of how many wrote it.
    owners = [torch.load(work / "two" / "shards" / f"shard-{k:06d}.pt")["rank"]
              for k in range(4)]
    assert owners == [0, 1, 0, 1]


def test_non_finite_samples_on_one_rank_fail_the_run_then_resume(work, single):
    out = ["--checkpoint", "model.pt", "--out-dir", "overflow"]
    proc = torchrun([str(WORKER), *ARGS, *out], work, fault="overflow:4")
    assert proc.returncode != 0
    assert "rank 1 failed on shard 1 (samples 4): non-finite values in 1 sample(s)" \
        in proc.stderr, proc.stderr[-3000:]
    shards = work / "overflow" / "shards"
    # Rank 0 finished its shards 0 and 2; rank 1 stopped at its first, shard 1.
    assert sorted(p.name for p in shards.glob("shard-*.pt")) == \
        ["shard-000000.pt", "shard-000002.pt"]
    assert "2 of 4 shards are complete" in proc.stderr
    proc = torchrun(["-m", "fixedpoint", *ARGS, *out], work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 sampled now, 2 already done" in proc.stdout
    samples = load_samples(work / "overflow" / "samples.pt")
    assert torch.equal(samples["images"], single["samples"]["images"])


def test_a_rank_that_dies_fails_the_run_and_keeps_the_written_shards(work, single):
    out = ["--checkpoint", "model.pt", "--out-dir", "crash"]
    # Index 9 is in shard 3, rank 1's second shard: shard 1 is written before it dies.
    proc = torchrun([str(WORKER), *ARGS, *out], work, fault="exit:9")
    assert proc.returncode != 0
    assert "exitcode" in proc.stderr and "17" in proc.stderr, proc.stderr[-3000:]
    assert "rank: 1" in proc.stderr  # torchrun's failure summary names the rank
    assert (work / "crash" / "shards" / "shard-000001.pt").exists()
    # The rerun may use another number of processes: shards are global.
    proc = torchrun(["-m", "fixedpoint", *ARGS, *out], work, nproc=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((work / "crash" / "report.json").read_text())
    assert report["shards_skipped"] >= 1
    assert report["shards_sampled"] + report["shards_skipped"] == 4
    samples = load_samples(work / "crash" / "samples.pt")
    assert torch.equal(samples["images"], single["samples"]["images"])
