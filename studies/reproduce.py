"""Reproduce every figure and table of the GS-Jacobi paper, then write the paper.

    python -m studies.reproduce              # fast mode: tiny settings, a few minutes
    python -m studies.reproduce --mode full  # the real reproduction, writes paper/

Models are trained (or loaded from ``.cache/studies``) first; then each study runs per
model and writes JSON and PNG files into the mode's output directory (``paper/results``
in full mode).  A study this checkout already finished is skipped (see ``Ledger``), so
an interrupted run resumes where it stopped; ``--force`` reruns everything (trained
models stay cached).  Without MNIST files only the embedded digits model runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fixedpoint.data import MNIST_ENV, DatasetError, load_dataset
from fixedpoint.tarflow.train import PRESETS

from . import (
    batch_scaling,
    convergence,
    crm_igm,
    initial_guess,
    precision,
    samples,
    scaleout,
    speedup,
    trace,
    write_paper,
)
from .common import (
    CACHE,
    MODES,
    Mode,
    atomic_write_bytes,
    git_revision,
    key,
    timed,
    write_json,
)
from .lib import trained

# (name, output file stem or None for figures without JSON, per-model function), in
# dependency order: CRM/IGM reads the convergence results, later studies read CRM/IGM.
STUDIES: list[tuple[str, str, Callable[[str, Mode], object]]] = [
    ("convergence", "convergence-{}.json", convergence.run_model),
    ("crm_igm", "crm_igm-{}.json", crm_igm.run_model),
    ("trace", "trace-{}.png", trace.trace_figure),
    ("samples", "samples-{}.png", samples.samples_figure),
    ("initial_guess", "initial_guess-{}.json", initial_guess.initial_guess_study),
    ("speedup", "speedup-{}.json", speedup.run_model),
    ("batch_scaling", "batch_scaling-{}.json", batch_scaling.run_model),
    ("scaleout", "scaleout-{}.json", scaleout.run_model),
    ("precision", "precision-{}.json", precision.run_model),
]


def _needs_mnist(preset: str) -> bool:
    return PRESETS[preset].train.dataset == "mnist"


def _mnist_available() -> str | None:
    """None if the MNIST files can be found, else the reason they cannot."""
    try:
        load_dataset("mnist")
    except (DatasetError, OSError) as exc:
        return str(exc)
    return None


class Ledger:
    """Which (study, model) pairs this checkout's runs finished, kept in the cache.

    A study is skipped only when the ledger records it for the same output directory and
    settings: committed results in a fresh clone are recomputed, an interrupted run here
    resumes after the last finished study.
    """

    def __init__(self, mode: Mode):
        self.path = CACHE / f"ledger-{key(str(mode.out_dir), mode.name, mode.epochs)}.json"
        self.done: set[str] = set()
        if self.path.exists():
            self.done = set(json.loads(self.path.read_text()))

    def finished(self, entry: str) -> bool:
        return entry in self.done

    def add(self, entry: str) -> None:
        self.done.add(entry)
        atomic_write_bytes(self.path, json.dumps(sorted(self.done)).encode())


class RunRecord:
    """The wall-clock of one run across the invocations that resumed it, kept in the cache.

    A run starts with the first invocation (no record yet, or ``--force``) and is
    complete when every model is trained and every (study, model) pair finished;
    resumed invocations add to it (their command, revision, wall-clock, what they ran
    and skipped, whether they were interrupted).  Per
    step: training time is summed over invocations (training resumes where it stopped),
    a study's time is that of the invocation that finished it.  ``wall_clock_s`` is the
    sum of the invocations' wall-clocks (everything spent, interrupted work included).
    ``from_empty_cache`` says whether nothing was cached when the run started (no trained
    model, classifier or sampled reference): only then is the sum the cost of a
    reproduction from scratch.
    """

    def __init__(self, mode: Mode, threads: int, fresh: bool):
        self.path = CACHE / f"run-{key(str(mode.out_dir), mode.name, mode.epochs)}.json"
        if self.path.exists() and not fresh:
            self.state = json.loads(self.path.read_text())
        else:
            self.state = {"mode": mode.name, "threads": threads,
                          "started": _now(), "from_empty_cache": _cache_empty(),
                          "invocations": [], "timings_s": {}}
        if self.state["threads"] != threads:
            raise RunRecordError(
                f"this run was started with --threads {self.state['threads']}; resume it "
                f"with the same count or start a new run with --force")
        self.invocation: dict[str, Any] = {
            "command": " ".join(sys.argv), "started": _now(), "git_revision": git_revision(),
            "wall_clock_s": 0.0, "ran": [], "skipped": [], "interrupted": True}
        self.state["invocations"].append(self.invocation)
        self._start = time.perf_counter()

    def add(self, entry: str, seconds: float, accumulate: bool = False) -> None:
        """Record a finished step; ``accumulate``: add the time earlier invocations spent
        on it (training resumes from its checkpoint, so that time was not lost)."""
        timings, partial = self.state["timings_s"], self.state.setdefault("partial_s", {})
        earlier = timings.get(entry, 0.0) + partial.pop(entry, 0.0) if accumulate else 0.0
        timings[entry] = seconds + earlier
        self.invocation["ran"].append(entry)
        self.save()

    def interrupted(self, entry: str, seconds: float) -> None:
        """Time spent on a step that was interrupted and will resume."""
        partial = self.state.setdefault("partial_s", {})
        partial[entry] = partial.get(entry, 0.0) + seconds
        self.save()

    def skip(self, entry: str) -> None:
        self.invocation["skipped"].append(entry)

    def save(self, interrupted: bool = True) -> None:
        self.invocation["wall_clock_s"] = time.perf_counter() - self._start
        self.invocation["interrupted"] = interrupted
        atomic_write_bytes(self.path, json.dumps(self.state, indent=1).encode())

    def summary(self, expected: list[str]) -> dict[str, Any]:
        """What run.json reports: totals, completeness, the invocations."""
        done = self.state["timings_s"]
        invocations = self.state["invocations"]
        return {
            "mode": self.state["mode"], "threads": self.state["threads"],
            "started": self.state["started"],
            "wall_clock_s": sum(i["wall_clock_s"] for i in invocations),
            "steps_s": sum(done.values()),
            "invocation_count": len(invocations),
            "complete": all(e in done for e in expected),
            "missing": [e for e in expected if e not in done],
            "from_empty_cache": self.state["from_empty_cache"],
            "timings_s": done, "invocations": invocations,
        }


class RunRecordError(ValueError):
    """A resumed invocation that does not fit the run it resumes."""


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _cache_empty() -> bool:
    """No cached model, classifier or study entry (ledgers and run records aside)."""
    if not CACHE.exists():
        return True
    return not any(p.is_file() and not p.name.startswith(("ledger-", "run-"))
                   for p in CACHE.rglob("*"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=MODES, default="fast")
    parser.add_argument("--force", action="store_true", help="rerun studies already finished")
    names = [name for name, _, _ in STUDIES]
    # choices: an unknown name is refused (exit 2) instead of running nothing and still
    # rewriting the paper.
    parser.add_argument("--only", nargs="*", choices=names, metavar="STUDY",
                        help="run only these studies: " + ", ".join(names))
    parser.add_argument("--models", nargs="*", help="restrict to these training presets")
    parser.add_argument("--out", type=Path, help="output directory (default: the mode's)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads for training and timing (default: 1, the "
                             "paper's regime; recorded in run.json)")
    args = parser.parse_args(argv)
    mode = MODES[args.mode]
    torch.set_num_threads(max(1, args.threads))
    if args.models:
        unknown = set(args.models) - set(mode.models)
        if unknown:
            parser.error(f"unknown models {sorted(unknown)}; {mode.name} mode has {mode.models}")
        mode = dataclasses.replace(mode, models=tuple(args.models))
    elif any(_needs_mnist(p) for p in mode.models):
        reason = _mnist_available()
        if reason is not None:
            print(f"MNIST not found ({reason}); running the embedded digits model only. "
                  f"Set {MNIST_ENV} to a folder with the MNIST IDX files for the rest.")
            mode = dataclasses.replace(
                mode, models=tuple(p for p in mode.models if not _needs_mnist(p)))
    if args.out:
        mode = dataclasses.replace(mode, out_dir=args.out.resolve())
    mode.out_dir.mkdir(parents=True, exist_ok=True)
    ledger = Ledger(mode)
    try:
        record = RunRecord(mode, torch.get_num_threads(), fresh=args.force)
    except RunRecordError as exc:
        parser.error(str(exc))
    try:
        _run(mode, args, ledger, record)
    except BaseException:
        record.save(interrupted=True)
        raise
    record.save(interrupted=False)
    expected = [f"train {p}" for p in mode.models]
    expected += [f"{name}/{p}" for name, _, _ in STUDIES for p in mode.models]
    summary = record.summary(expected)
    write_json(mode.out_dir / "run.json", {**summary, "models": list(mode.models),
                                           "only": args.only or None, "force": args.force})
    # The paper shows every model with results in the output directory, not only the
    # models this invocation ran (a `--models digits` run must not drop the MNIST tables).
    write_paper.write(dataclasses.replace(MODES[args.mode], out_dir=mode.out_dir))
    print(f"this invocation {record.invocation['wall_clock_s'] / 60:.1f} min; the run so far "
          f"{summary['wall_clock_s'] / 60:.1f} min over {summary['invocation_count']} "
          f"invocation(s){'' if summary['complete'] else ' (incomplete)'}; results in "
          f"{mode.out_dir}")


def _run(mode: Mode, args: argparse.Namespace, ledger: Ledger, record: RunRecord) -> None:
    for preset in mode.models:
        t0 = time.perf_counter()
        try:
            with timed(f"train {preset} ({mode.name} mode)"):
                t = trained(preset, mode)
        except BaseException:
            record.interrupted(f"train {preset}", time.perf_counter() - t0)
            raise
        record.add(f"train {preset}", time.perf_counter() - t0, accumulate=True)
        print(f"{preset}: test NLL {t.test_bpd:.3f} bits/dim, {t.parameters} parameters")
    for name, stem, fn in STUDIES:
        if args.only and name not in args.only:
            continue
        for preset in mode.models:
            entry = f"{name}/{preset}"
            if ledger.finished(entry) and (mode.out_dir / stem.format(preset)).exists() \
                    and not args.force:
                print(f"[{entry}] finished earlier, skipped (--force reruns it)")
                record.skip(entry)
                continue
            t0 = time.perf_counter()
            with timed(entry):
                fn(preset, mode)
            record.add(entry, time.perf_counter() - t0)
            ledger.add(entry)


if __name__ == "__main__":
    main()
