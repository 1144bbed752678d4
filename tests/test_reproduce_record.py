"""The reproduction record: the git revision check and run.json across resumed runs."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from studies import common, reproduce


def _git(root: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=root,
                   check=True, capture_output=True)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    (root / "paper" / "results").mkdir(parents=True)
    (root / "src.py").write_text("x = 1\n")
    (root / "paper" / "paper.md").write_text("# paper\n")
    (root / "paper" / "finc.md").write_text("# finc\n")
    (root / "paper" / "results" / "run.json").write_text("{}\n")
    _git(root, "init", "-q")
    _git(root, "add", ".")
    _git(root, "commit", "-q", "-m", "init")
    return root


def test_a_clean_commit_is_not_dirty_after_the_run_rewrites_its_outputs(repo: Path) -> None:
    assert not common.git_revision(repo).endswith("-dirty")
    # What a reproduction run writes: rewritten results, paper, section, new files.
    (repo / "paper" / "results" / "run.json").write_text('{"wall_clock_s": 1}\n')
    (repo / "paper" / "paper.md").write_text("# paper, rerendered\n")
    (repo / "paper" / "finc.md").write_text("# finc, rerendered\n")
    (repo / "paper" / "results" / "new-study.json").write_text("{}\n")
    rev = common.git_revision(repo)
    assert rev != "unknown" and not rev.endswith("-dirty")
    # A change to anything else is a change of the code that produced the results.
    (repo / "src.py").write_text("x = 2\n")
    assert common.git_revision(repo).endswith("-dirty")


def test_the_outputs_cover_every_output_directory_of_the_studies() -> None:
    # The full mode writes paper/results; finc_scaling writes paper/finc.md beside it.
    outs = [common.FULL.out_dir, common.FULL.out_dir.parent / "finc.md"]
    for out in outs:
        rel = out.relative_to(common.ROOT)
        assert any(rel.is_relative_to(p) for p in common.RUN_OUTPUTS), rel


def test_full_mode_measures_quality_on_at_least_2000_samples() -> None:
    assert common.FULL.quality_samples >= 2000
    assert common.FAST.quality_samples < common.FULL.quality_samples


# ------------------------------------------------------------------------ run.json


class _Crash(Exception):
    pass


@pytest.fixture
def fake_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """reproduce.main with two fake studies, a fake trainer and no paper rendering."""
    cache = tmp_path / "cache"
    monkeypatch.setattr(reproduce, "CACHE", cache)
    calls = {"crash": None, "train_s": 0.02}

    def trained(preset, mode):
        time.sleep(calls["train_s"])
        if calls["crash"] == "train":
            raise _Crash("training interrupted")
        return SimpleNamespace(test_bpd=1.0, parameters=10)

    def study(name):
        def run(preset, mode):
            time.sleep(0.01)
            if calls["crash"] == name:
                raise _Crash(f"{name} interrupted")
            (mode.out_dir / f"{name}-{preset}.json").write_text("{}")
        return run

    monkeypatch.setattr(reproduce, "trained", trained)
    monkeypatch.setattr(reproduce, "STUDIES", [("a", "a-{}.json", study("a")),
                                               ("b", "b-{}.json", study("b"))])
    monkeypatch.setattr(reproduce.write_paper, "write", lambda mode: None)
    out = tmp_path / "out"

    def invoke(*extra: str):
        reproduce.main(["--mode", "fast", "--models", "digits", "--out", str(out), *extra])
        return json.loads((out / "run.json").read_text())

    threads = torch.get_num_threads()
    yield SimpleNamespace(invoke=invoke, calls=calls, cache=cache, out=out)
    torch.set_num_threads(threads)  # main sets the process-wide count from --threads


def test_run_json_sums_the_invocations_of_a_resumed_run(fake_run) -> None:
    fake_run.calls["crash"] = "b"
    with pytest.raises(_Crash):
        fake_run.invoke()
    fake_run.calls["crash"] = None
    run = fake_run.invoke()
    first, second = run["invocations"]
    assert first["interrupted"] and not second["interrupted"]
    assert first["ran"] == ["train digits", "a/digits"]
    assert second["skipped"] == ["a/digits"] and second["ran"] == ["train digits", "b/digits"]
    assert run["complete"] and run["missing"] == [] and run["invocation_count"] == 2
    assert run["wall_clock_s"] == pytest.approx(first["wall_clock_s"] + second["wall_clock_s"])
    # Training is summed over both invocations; each study counts once.
    assert set(run["timings_s"]) == {"train digits", "a/digits", "b/digits"}
    assert run["timings_s"]["train digits"] >= 2 * fake_run.calls["train_s"]
    assert run["steps_s"] == pytest.approx(sum(run["timings_s"].values()))
    assert run["steps_s"] <= run["wall_clock_s"]
    assert run["from_empty_cache"] and run["threads"] == 1


def test_interrupted_training_time_is_kept_for_the_resumed_run(fake_run) -> None:
    fake_run.calls.update(crash="train", train_s=0.05)
    with pytest.raises(_Crash):
        fake_run.invoke()
    fake_run.calls.update(crash=None, train_s=0.0)
    run = fake_run.invoke()
    assert run["invocations"][0]["ran"] == [] and run["invocations"][0]["interrupted"]
    assert run["timings_s"]["train digits"] >= 0.05
    assert run["complete"]


def test_a_new_run_starts_with_force_and_knows_the_cache_was_not_empty(fake_run) -> None:
    fake_run.invoke()
    (fake_run.cache / "models").mkdir(parents=True)
    (fake_run.cache / "models" / "checkpoint.pt").write_bytes(b"x")
    run = fake_run.invoke("--force")
    assert run["invocation_count"] == 1 and not run["from_empty_cache"]


def test_an_incomplete_selection_is_reported_as_incomplete(fake_run) -> None:
    run = fake_run.invoke("--only", "a")
    assert not run["complete"] and run["missing"] == ["b/digits"]


def test_resuming_with_another_thread_count_is_refused(fake_run) -> None:
    fake_run.invoke()
    with pytest.raises(SystemExit) as exc:
        fake_run.invoke("--threads", "2")
    assert exc.value.code == 2


def test_the_paper_states_the_record(fake_run) -> None:
    from studies import paper_values

    fake_run.calls["crash"] = "b"
    with pytest.raises(_Crash):
        fake_run.invoke()
    fake_run.calls["crash"] = None
    run = fake_run.invoke()
    text = paper_values.run_record(run)
    assert "It is complete" in text and "empty cache" in text
    lines = [ln for ln in text.splitlines() if ln.startswith("* `")]
    assert len(lines) == 2 and lines[0].endswith("interrupted")
    assert not lines[1].endswith("interrupted")
