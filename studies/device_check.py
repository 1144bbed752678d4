"""Device check: solver and TarFlow parity, float32 / bfloat16 samples, and latency.

One command for the first GPU that comes (under 5 minutes on one GPU by design; not run
on one here: this project's machines have none):

    python -m studies.device_check --device cuda
    python -m studies.device_check --device cpu --tiny     # the CPU path, in the tests

It runs, on ``--device``:

1. **Solver parity**: every core method (Jacobi, GS-Jacobi, triangular Anderson,
   Anderson, sliding window, Newton) against forward substitution on the synthetic
   systems of :mod:`fixedpoint.testing` (linear, affine and attention autoregressive, in
   float64 and float32), at the package's documented tolerances
   (:func:`fixedpoint.testing.assertions.default_rtol`).
2. **TarFlow parity**: per model, ``reverse`` with Jacobi, GS-Jacobi and triangular
   Anderson against the sequential ``reverse`` on the device, and the fast sequential
   decoder against it (same tolerance, float32).
3. **Precision**: sequential samples (fast decoder) in float32 and under bfloat16
   autocast on the device, each against the CPU float32 samples of the same noise (and
   the device's bfloat16 against the CPU's bfloat16); float32 within the studies'
   deviation budget passes, bfloat16 is reported (its rounding moves samples, see the
   README).
4. **Latency** at batch 1, 8 and 64 (``--batch-sizes``) with CUDA synchronisation
   around every timed call: the fast sequential decoder, sequential ``reverse``, the
   paper's rule (``studies.crm_igm.paper_rule`` on CRM / IGM) and the automatic strategy
   with the latency objective (``studies.auto_strategy.choose``, calibrated on the CPU
   copy of the model in float32, then run on the device), with their dependent steps
   and deviation from sequential.  ``--compile-decoder`` adds the sequential decoder
   under ``torch.compile`` (CUDA graphs on a GPU; compiling takes minutes, outside the
   5-minute budget; not run here).

Models: ``--checkpoint PATH`` (repeatable), by default every trained model of the
studies (``.cache/studies/models/*/checkpoint.pt``); ``--tiny`` uses two untrained tiny
models instead (and tiny sizes everywhere: the test setting).  Writes ``report.json``
(settings, provenance, every check, per-phase seconds) and ``report.md`` (the tables)
into ``--out``.  Exit status: 0 when every parity check passed, 1 when one failed, 2 for
bad arguments (``--device cuda`` without a GPU is refused in one line).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

import fixedpoint as fp
from fixedpoint import testing as fpt
from fixedpoint.atomic import atomic_write_bytes
from fixedpoint.benchmark import interleaved_medians, markdown_table
from fixedpoint.data import DatasetError, load_dataset
from fixedpoint.quality import deviation
from fixedpoint.tarflow import (
    InitialGuess,
    SequentialDecoder,
    Strategy,
    TarFlow,
    TarFlowConfig,
    crm_igm_table,
    reverse,
)
from fixedpoint.tarflow.checkpoint import load_model
from fixedpoint.testing.assertions import default_rtol
from fixedpoint.testing.systems import AffineAutoregressive, AttentionAutoregressive, LinearSystem

from .common import CACHE, ROOT, write_json
from .lib import BUDGET, GUIDANCE, SEED

METHODS: dict[str, fp.Method] = {
    "jacobi": fp.Jacobi(),
    "gs-jacobi-4": fp.GSJacobi(modules=4),
    "triangular-anderson": fp.TriangularAnderson(),
    "anderson": fp.Anderson(max_iter=400),
    "sliding-window-8": fp.SlidingWindow(width=8),
    "newton": fp.Newton(),
}
TARFLOW_METHODS: dict[str, fp.Method] = {
    "jacobi": fp.Jacobi(),
    "gs-jacobi-4": fp.GSJacobi(modules=4),
    "triangular-anderson": fp.TriangularAnderson(),
}
SYSTEMS = {
    "linear": partial(LinearSystem.random, toughness=0.5),
    "affine": partial(AffineAutoregressive.random, toughness=1.0),
    "attention": partial(AttentionAutoregressive.random, toughness=1.0),
}


class DeviceUnavailable(ValueError):
    """The requested device does not exist here (a user error: exit 2)."""


@dataclass(frozen=True)
class Settings:
    """Sizes of one run: the GPU defaults, or the tiny test setting."""

    batch_sizes: tuple[int, ...] = (1, 8, 64)
    repeats: int = 3
    system: tuple[int, int, int] = (4, 32, 4)   # batch, length, dim (Newton: T d directions)
    parity_batch: int = 8
    samples: int = 64                           # float32 / bfloat16 comparison
    # Automatic strategy, calibrated on the CPU.  A batch takes its slowest sample's
    # steps, so a strategy calibrated on fewer samples than it runs at may take more
    # steps at batch 64 (and deviate more): the latency table shows both as measured.
    calibration: int = 8
    crm_images: int = 64                        # paper's rule
    auto_tolerances: tuple[float, ...] | None = None  # None: the objective's own list


TINY = Settings(batch_sizes=(1, 2), repeats=1, system=(2, 8, 3), parity_batch=2, samples=4,
                calibration=2, crm_images=8, auto_tolerances=(1e-3,))


def resolve_device(name: str) -> torch.device:
    """``name`` as a device, refusing CUDA where there is none (one line)."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as exc:
        raise DeviceUnavailable(f"bad device {name!r}: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailable(f"--device {name}: CUDA is not available on this machine")
    if device.type not in ("cpu", "cuda"):
        raise DeviceUnavailable(f"--device {name}: only cpu and cuda are checked")
    return device


def synchronizing_clock(device: torch.device) -> Callable[[], float]:
    """Wall-clock that first waits for the device's queued work (CUDA is asynchronous)."""
    if device.type != "cuda":
        return time.perf_counter

    def clock() -> float:
        torch.cuda.synchronize(device)
        return time.perf_counter()

    return clock


# ---- 1. solver parity ------------------------------------------------------------------


def solver_parity(device: torch.device, settings: Settings) -> list[dict[str, Any]]:
    """Every method against forward substitution on every system, float64 and float32."""
    B, T, d = settings.system
    rows = []
    for sys_name, make in SYSTEMS.items():
        for dtype in (torch.float64, torch.float32):
            system = make(B, T, d, seed=SEED, dtype=dtype, device=device)
            x0 = system.noise_guess(seed=SEED)
            reference = fpt.systems.forward_substitution(system, x0)
            for name, method in METHODS.items():
                row = {"system": sys_name, "dtype": str(dtype).removeprefix("torch."),
                       "method": name, "rtol": default_rtol(dtype)}
                try:
                    res = fpt.assert_matches_sequential(system, x0, method, reference=reference)
                    row.update(ok=True, iterations=res.iterations,
                               max_rel_error=float(fpt.relative_error(res.x, reference).max()))
                except AssertionError as exc:
                    row.update(ok=False, error=str(exc).splitlines()[0])
                rows.append(row)
    return rows


# ---- models ----------------------------------------------------------------------------


def tiny_models() -> list[tuple[str, TarFlow]]:
    """Two untrained tiny flows (conditional, unconditional) with small random
    out-projections, so that the blocks are not the identity."""
    out = []
    for name, classes in (("tiny-cond", 10), ("tiny-uncond", 0)):
        config = TarFlowConfig(image_size=8, patch_size=2, width=32, blocks=2, layers=1,
                               head_dim=16, num_classes=classes)
        g = torch.Generator().manual_seed(SEED)
        model = TarFlow(config).reset_parameters(g).eval()
        with torch.no_grad():
            for block in model.blocks:
                block.proj_out.weight.normal_(0, 0.05, generator=g)
                block.proj_out.bias.normal_(0, 0.05, generator=g)
        out.append((name, model))
    return out


def trained_models(paths: list[Path]) -> list[tuple[str, TarFlow]]:
    return [(p.parent.name, load_model(p).eval()) for p in paths]


def noise(model: TarFlow, batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Seeded CPU noise and balanced labels (moved to the device by the caller)."""
    c = model.config
    z = torch.randn(batch, c.seq_len, c.token_dim, generator=torch.Generator().manual_seed(seed))
    y = torch.arange(batch) % c.num_classes if c.num_classes else None
    return z, y


def _to(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if t is None else t.to(device)


def _autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype)


# ---- 2. TarFlow parity and 3. precision --------------------------------------------------


def tarflow_parity(cpu_model: TarFlow, model: TarFlow, device: torch.device,
                   settings: Settings) -> list[dict[str, Any]]:
    """Methods and the fast decoder against sequential ``reverse`` on the device, and the
    device's sequential samples against the CPU's (float32)."""
    z, y = noise(model, settings.parity_batch, SEED)
    zd, yd = z.to(device), _to(y, device)
    seq = reverse(model, zd, yd, guidance=GUIDANCE).images
    rtol = default_rtol(torch.float32)
    rows = []
    candidates: dict[str, Callable[[], torch.Tensor]] = {
        name: partial(lambda m: reverse(model, zd, yd, guidance=GUIDANCE,
                                        strategy=Strategy.uniform(m, model.config.blocks)
                                        ).images, m)
        for name, m in TARFLOW_METHODS.items()
    }
    candidates["fast sequential decoder"] = partial(SequentialDecoder(model), zd, yd,
                                                    guidance=GUIDANCE)
    for name, run in candidates.items():
        got = run()
        dev = deviation(got, seq)
        ok = bool(fpt.relative_error(got, seq).max() <= rtol)
        rows.append({"check": f"{name} vs sequential ({device.type})", "rtol": rtol, "ok": ok,
                     **dev})
    cpu_seq = reverse(cpu_model, z, y, guidance=GUIDANCE).images
    dev = deviation(seq.cpu(), cpu_seq)
    rows.append({"check": f"sequential {device.type} vs cpu", "budget": BUDGET,
                 "ok": dev["max_abs"] <= BUDGET, **dev})
    return rows


def precision(cpu_model: TarFlow, model: TarFlow, device: torch.device,
              settings: Settings) -> list[dict[str, Any]]:
    """Sequential samples in float32 and bfloat16 on the device against the CPU's."""
    z, y = noise(model, settings.samples, SEED + 1)
    zd, yd = z.to(device), _to(y, device)
    cpu32 = SequentialDecoder(cpu_model)(z, y, guidance=GUIDANCE)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cpu16 = SequentialDecoder(cpu_model)(z, y, guidance=GUIDANCE)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        with _autocast(device, dtype):
            got = SequentialDecoder(model)(zd, yd, guidance=GUIDANCE).cpu()
        name = str(dtype).removeprefix("torch.")
        d32 = deviation(got, cpu32)
        row = {"dtype": name, "samples": len(z), "vs_cpu_float32": d32,
               "finite": bool(torch.isfinite(got).all())}
        if dtype == torch.float32:
            row["ok"] = row["finite"] and d32["max_abs"] <= BUDGET
            row["budget"] = BUDGET
        else:
            row["vs_cpu_bfloat16"] = deviation(got, cpu16)
            row["ok"] = row["finite"]  # bfloat16 rounding moves samples: reported only
        rows.append(row)
    return rows


# ---- 4. latency ------------------------------------------------------------------------


def paper_rule_strategy(model: TarFlow, settings: Settings) -> tuple[Strategy, str]:
    """The paper's rule on CRM / IGM of noisy training images (the model's own sequential
    samples when its data set is not on this machine)."""
    from .crm_igm import paper_rule

    c = model.config
    g = torch.Generator().manual_seed(SEED)
    try:
        data = load_dataset("digits" if c.image_size == 8 else "mnist")
        idx = torch.randperm(len(data.train_x), generator=g)[: settings.crm_images]
        x, labels, source = data.train_x[idx], data.train_y[idx], "training images"
        if c.num_classes == 0:
            labels = None
    except DatasetError:
        z, labels = noise(model, settings.crm_images, SEED + 2)
        x, source = SequentialDecoder(model)(z, labels, guidance=GUIDANCE), "model samples"
    if x.shape[1:] != (c.channels, c.image_size, c.image_size):
        z, labels = noise(model, settings.crm_images, SEED + 2)
        x, source = SequentialDecoder(model)(z, labels, guidance=GUIDANCE), "model samples"
    x = x + c.noise_std * torch.randn(x.shape, generator=g)
    with torch.no_grad():
        table = crm_igm_table(model, x, labels, guidance=GUIDANCE)
    return paper_rule(table, c.seq_len), source


def auto_strategy(model: TarFlow, settings: Settings) -> tuple[Strategy, str]:
    """The automatic strategy with the latency objective, calibrated on the CPU model."""
    try:
        from fixedpoint.tarflow.strategy import Objective
    except ImportError:  # a checkout from before the latency objective
        raise RuntimeError("this checkout has no latency objective for the automatic "
                           "strategy") from None
    from .auto_strategy import choose

    objective = Objective.LATENCY
    inits = [InitialGuess.NOISE] * model.config.blocks  # the latency objective tries both
    chosen = choose(model, None, max(settings.batch_sizes), inits,
                    calibration=settings.calibration, objective=objective,
                    tolerances=settings.auto_tolerances)
    return chosen["strategy"], objective.value


# torch.compile options of the opt-in compiled decoder: CUDA graphs on a GPU.
COMPILE = {"cuda": {"mode": "reduce-overhead", "dynamic": False}, "cpu": {"dynamic": False}}
COMPILED = "sequential (compiled decoder)"


def latency(model: TarFlow, device: torch.device, strategies: dict[str, Strategy],
            settings: Settings, compiled: SequentialDecoder | None = None
            ) -> list[dict[str, Any]]:
    """Median seconds per batch of every sampler, with CUDA synchronisation.  With
    ``compiled`` (a decoder made with ``compile_options``), its row too; its first call
    per batch shape compiles, in the untimed warm-up."""
    clock = synchronizing_clock(device)
    rows = []
    for B in settings.batch_sizes:
        z, y = noise(model, B, SEED + 3)
        zd, yd = z.to(device), _to(y, device)
        decoder = SequentialDecoder(model)
        fns: dict[str, Callable[[], object]] = {
            "sequential (fast decoder)": partial(decoder, zd, yd, guidance=GUIDANCE)}
        if compiled is not None:
            fns[COMPILED] = partial(compiled, zd, yd, guidance=GUIDANCE)
        runs = {"sequential (reverse)": None, **strategies}
        for name, strategy in runs.items():
            fns[name] = partial(reverse, model, zd, yd, guidance=GUIDANCE, strategy=strategy)
        seconds = interleaved_medians(fns, settings.repeats, clock=clock)
        seq = reverse(model, zd, yd, guidance=GUIDANCE)
        for name in fns:
            row = {"batch": B, "sampler": name, "seconds": seconds[name],
                   "speedup_vs_fast_sequential": seconds["sequential (fast decoder)"]
                   / seconds[name]}
            if name in runs:
                s = seq if runs[name] is None else reverse(model, zd, yd, guidance=GUIDANCE,
                                                           strategy=runs[name])
                row["dependent_steps"] = sum(r.dependent_steps for r in s.blocks)
                row["deviation_from_sequential"] = deviation(s.images, seq.images)["max_abs"]
            else:
                row["dependent_steps"] = model.config.blocks * (model.config.seq_len - 1)
            if name == COMPILED:
                images = compiled(zd, yd, guidance=GUIDANCE)
                row["deviation_from_sequential"] = deviation(images, seq.images)["max_abs"]
            rows.append(row)
    return rows


# ---- the run ---------------------------------------------------------------------------


@contextmanager
def phase(times: dict[str, float], name: str) -> Iterator[None]:
    start = time.perf_counter()
    print(f"device_check: {name} ...", file=sys.stderr, flush=True)
    try:
        yield
    finally:
        times[name] = round(time.perf_counter() - start, 3)


def run(device: torch.device, models: list[tuple[str, TarFlow]], settings: Settings,
        latency_dtype: torch.dtype, compile_decoder: bool = False) -> dict[str, Any]:
    times: dict[str, float] = {}
    report: dict[str, Any] = {
        "device": str(device), "device_name": _device_name(device),
        "settings": settings.__dict__, "guidance": GUIDANCE, "budget": BUDGET,
        "latency_dtype": str(latency_dtype).removeprefix("torch."),
        "compiled_decoder": COMPILE[device.type] if compile_decoder else None, "models": {},
    }
    with phase(times, "solver parity"):
        report["solver_parity"] = solver_parity(device, settings)
    for name, cpu_model in models:
        model = load_on(cpu_model, device)
        entry: dict[str, Any] = {"config": cpu_model.config.to_dict()}
        with phase(times, f"{name}: tarflow parity"):
            entry["parity"] = tarflow_parity(cpu_model, model, device, settings)
        with phase(times, f"{name}: float32 / bfloat16 samples"):
            entry["precision"] = precision(cpu_model, model, device, settings)
        strategies: dict[str, Strategy] = {}
        with phase(times, f"{name}: strategies (CPU)"):
            rule, source = paper_rule_strategy(cpu_model, settings)
            strategies["paper rule"] = rule
            entry["paper_rule"] = {"strategy": str(rule), "crm_igm_on": source}
            try:
                auto, objective = auto_strategy(cpu_model, settings)
                strategies[f"automatic ({objective})"] = auto
                entry["automatic"] = {"objective": objective, "strategy": str(auto),
                                      "calibration_samples": settings.calibration}
            except RuntimeError as exc:
                entry["automatic"] = {"error": str(exc)}
        compiled = (SequentialDecoder(model, compile_options=COMPILE[device.type])
                    if compile_decoder else None)
        with phase(times, f"{name}: latency"), _autocast(device, latency_dtype):
            entry["latency"] = latency(model, device, strategies, settings, compiled)
        report["models"][name] = entry
    report["seconds"] = times
    report["ok"] = all_ok(report)
    return report


def load_on(model: TarFlow, device: torch.device) -> TarFlow:
    """A copy of ``model`` on ``device`` (the CPU model stays the reference)."""
    copy = TarFlow(model.config)
    copy.load_state_dict(model.state_dict())
    return copy.to(device).eval()


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return platform.processor() or platform.machine()


def all_ok(report: dict[str, Any]) -> bool:
    checks = [r["ok"] for r in report["solver_parity"]]
    for entry in report["models"].values():
        checks += [r["ok"] for r in entry["parity"]] + [r["ok"] for r in entry["precision"]]
    return all(checks)


def markdown(report: dict[str, Any]) -> str:
    """The report's tables."""
    out = [f"# Device check: {report['device']} ({report['device_name']})", ""]
    sp = report["solver_parity"]
    failed = [r for r in sp if not r["ok"]]
    out += [f"Solver parity: {len(sp) - len(failed)} of {len(sp)} method x system x dtype "
            "checks agree with forward substitution.", ""]
    if failed:
        out += [markdown_table(["system", "dtype", "method", "error"],
                               [[r["system"], r["dtype"], r["method"], r["error"]]
                                for r in failed]), ""]
    for name, e in report["models"].items():
        out += [f"## {name}", ""]
        out += [markdown_table(
            ["check", "max abs", "mean abs", "ok"],
            [[r["check"], f"{r['max_abs']:.2e}", f"{r['mean_abs']:.2e}", r["ok"]]
             for r in e["parity"]]), ""]
        out += [markdown_table(
            ["dtype", "samples", "max abs vs CPU float32", "max abs vs CPU bfloat16", "ok"],
            [[r["dtype"], r["samples"], f"{r['vs_cpu_float32']['max_abs']:.2e}",
              f"{r['vs_cpu_bfloat16']['max_abs']:.2e}" if "vs_cpu_bfloat16" in r else "-",
              r["ok"]] for r in e["precision"]]), ""]
        auto = e["automatic"].get("strategy", e["automatic"].get("error"))
        out += [f"Paper's rule: {e['paper_rule']['strategy']} (CRM / IGM on "
                f"{e['paper_rule']['crm_igm_on']}); automatic: {auto}", ""]
        out += [markdown_table(
            ["batch", "sampler", "ms", "dependent steps", "speed-up vs fast sequential",
             "deviation from sequential"],
            [[r["batch"], r["sampler"], f"{r['seconds'] * 1e3:.1f}", r["dependent_steps"],
              f"{r['speedup_vs_fast_sequential']:.2f}x",
              f"{r['deviation_from_sequential']:.1e}" if "deviation_from_sequential" in r
              else "-"] for r in e["latency"]]), ""]
    out += [f"Latency in {report['latency_dtype']}, guidance {report['guidance']}, median of "
            f"{report['settings']['repeats']} interleaved repeats, synchronised; phase "
            f"seconds: {report['seconds']}.", ""]
    return "\n".join(out)


def _batch_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(b) for b in text.split(",") if b.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not comma-separated integers: {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be positive, got {text!r}")
    return sizes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m studies.device_check",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    parser.add_argument("--checkpoint", type=Path, action="append", default=[],
                        help="a trained model (repeatable; default: the studies' models)")
    parser.add_argument("--tiny", action="store_true",
                        help="untrained tiny models and tiny sizes (the test setting)")
    parser.add_argument("--batch-sizes", type=_batch_sizes, default=None,
                        help="latency batch sizes, e.g. 1,8,64")
    parser.add_argument("--calibration", type=int, default=None,
                        help="samples the automatic strategy is calibrated on (CPU; "
                             "default 8, 2 with --tiny)")
    parser.add_argument("--latency-dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--compile-decoder", action="store_true",
                        help="also time the sequential decoder under torch.compile (CUDA "
                             "graphs on a GPU; compiles once per model and batch size: "
                             "minutes, outside the 5-minute budget; untested here)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=None,
                        help="output directory (default .cache/device_check/<device>)")
    args = parser.parse_args(argv)
    try:
        device = resolve_device(args.device)
    except DeviceUnavailable as exc:
        print(f"device_check: error: {exc}", file=sys.stderr)
        return 2
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
    settings = TINY if args.tiny else Settings()
    if args.batch_sizes is not None:
        settings = Settings(**{**settings.__dict__, "batch_sizes": args.batch_sizes})
    if args.calibration is not None:
        if args.calibration < 1:
            parser.error("--calibration must be >= 1")
        settings = Settings(**{**settings.__dict__, "calibration": args.calibration})
    if args.tiny and args.checkpoint:
        parser.error("--tiny uses untrained tiny models: drop --checkpoint")
    paths = args.checkpoint or sorted((CACHE / "models").glob("*/checkpoint.pt"))
    for p in paths:
        if not p.is_file():
            parser.error(f"no checkpoint at {p}")
    if not args.tiny and not paths:
        parser.error(f"no trained models in {CACHE / 'models'}: pass --checkpoint or --tiny")
    models = tiny_models() if args.tiny else trained_models(list(paths))
    out = args.out or ROOT / ".cache" / "device_check" / str(device).replace(":", "-")
    out.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    try:  # restored afterwards: a call in process (the tests) leaves no global setting
        torch.set_num_threads(args.threads or threads)
        report = run(device, models, settings, getattr(torch, args.latency_dtype),
                     compile_decoder=args.compile_decoder)
    finally:
        torch.set_num_threads(threads)
    write_json(out / "report.json", report, seed=SEED)
    text = markdown(report)
    atomic_write_bytes(out / "report.md", text.encode())
    print(text)
    print(f"device_check: {'all checks passed' if report['ok'] else 'CHECKS FAILED'}; "
          f"wrote {out / 'report.json'} and {out / 'report.md'}", file=sys.stderr)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
