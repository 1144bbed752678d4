"""The values the TarFlow sections of the paper are filled with, read from the results.

Nothing here is measured and no prose lives here: every value is read from a JSON file
a study wrote (or derived from such values), and the sentences that state them are in
``studies/sections/*.md``.  Values are numbers where the template formats them
(``{seq_len}``, ``{budget:g}``) and strings for what is assembled from a variable
number of results (tables, lists of strategies).  :func:`global_values` serves every
section, :func:`model_values` the per-model section, one model at a time.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fixedpoint.benchmark import markdown_table
from fixedpoint.quality import FeatureClassifier
from fixedpoint.tarflow import select_strategy

from . import auto_strategy
from .common import FULL, Mode, read_json
from .speedup import markdown as speedup_table

# Dependent-step reduction targets of the issue, per model.
TARGETS = {"mnist-p4": 4.0, "mnist-p2": 10.0}
TARGET_B1_SPEEDUP = 2.0  # wall-clock at batch 1, within the budget
TARGET_TOUGH_GAIN = 1.5  # fewer dependent steps than Jacobi on the tough block
TARGET_COST_ERROR = 0.25  # mean abs prediction error of the cost model
TIMING_NOISE = 0.1  # a speed-up within 10% of 1 is not a win
# Facts about the paper being reproduced (Liu and Qin 2025), not measured here.
PAPER = {"paper_year": 2025, "paper_gpus": 8, "paper_samples": 50000, "paper_blocks": 8,
         "paper_layers": 8, "paper_min_seq_len": 256, "paper_max_seq_len": 1024}
# The noise seeds of the studies (lib.SEED, the quality draws lib.QSEED and QSEED + 1,
# auto_strategy's calibration).
SEEDS = {"seed_eval": 0, "seed_quality": 100, "seed_second": 101, "seed_calibration": 1234}


def load(mode: Mode, stem: str, preset: str | None = None) -> dict[str, Any] | None:
    name = f"{stem}-{preset}.json" if preset else f"{stem}.json"
    path = mode.out_dir / name
    return read_json(path) if path.exists() else None


def clock(result: dict) -> str:
    """What a study timed with; results from before it was recorded used the wall-clock."""
    return result.get("clock", "wall-clock")


def presets(mode: Mode) -> list[str]:
    """Models with TarFlow results (a speed-up table), in the mode's order."""
    return [p for p in mode.models if load(mode, "speedup", p)]


def figure(mode: Mode, stem: str, preset: str, caption: str, script: str) -> str:
    path = mode.out_dir / f"{stem}-{preset}.png"
    if not path.exists():
        return ""
    # paper/paper.md sits beside results/; a fast-mode paper.md sits inside its results.
    rel = f"{mode.out_dir.name}/{path.name}" if mode.out_dir == FULL.out_dir else path.name
    return f"![{caption}]({rel})\n\n*{caption}* Made by `python -m studies.{script}`."


def table(head: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    return markdown_table(head, rows) if rows else "(no rows)"


# ----------------------------------------------------------------- reading the rows


def parallel_within_budget(speed: dict) -> list[dict]:
    """Rows within the deviation budget that are not the sequential sampler in disguise."""
    seq = speed["rows"][0]
    return [r for r in speed["rows"][1:] if r["deviation"]["max_abs"] <= speed["budget"]
            and r["dependent_steps"] < seq["dependent_steps"]]


def best_within_budget(speed: dict) -> dict | None:
    ok = parallel_within_budget(speed)
    return max(ok, key=lambda r: r["step_reduction"]) if ok else None


def fastest_b1_within_budget(speed: dict) -> dict | None:
    ok = parallel_within_budget(speed)
    return max(ok, key=lambda r: r["speedup_b1"]) if ok else None


def closest_miss(speed: dict) -> dict | None:
    seq = speed["rows"][0]
    miss = [r for r in speed["rows"][1:] if r["deviation"]["max_abs"] > speed["budget"]
            and r["dependent_steps"] < seq["dependent_steps"]]
    return min(miss, key=lambda r: r["deviation"]["max_abs"]) if miss else None


def tough_block_gain(conv: dict) -> tuple[float, dict, dict] | None:
    """(Jacobi steps / best other method's steps, best, Jacobi) on the tough block."""
    rows = conv["tough_block_methods"]
    jac = next(r for r in rows if r["method"].startswith("Jacobi"))
    others = [r for r in rows if not r["method"].startswith("Jacobi")
              and r["dependent_steps"] is not None]
    if not others or jac["dependent_steps"] is None:
        return None
    best = min(others, key=lambda r: r["dependent_steps"])
    return jac["dependent_steps"] / best["dependent_steps"], best, jac


# ----------------------------------------------------------------- global values


def global_values(mode: Mode) -> dict[str, Any]:
    ps = presets(mode)
    speed = {p: load(mode, "speedup", p) for p in ps}
    first = speed[ps[0]] if ps else {}
    prov = first.get("provenance", {})
    hw = prov.get("hardware", {})
    run = load(mode, "run") or {}
    v: dict[str, Any] = {**PAPER, **SEEDS}
    v["results_dir"] = mode.out_dir.name
    v["mode"] = mode.name
    v["cpu_count"] = hw.get("cpu_count", "?")
    v["machine"] = hw.get("machine", "?")
    v["torch_version"] = prov.get("versions", {}).get("torch", "?")
    v["threads"] = first.get("threads", "?")
    v["clock"] = clock(first)
    v["git_revision"] = prov.get("git_revision", "?")
    v["guidance"] = 1.0 if not ps else _guidance(mode, ps[0])
    v["feature_dim"] = FeatureClassifier().feature_dim
    v["eval_batch"] = first.get("eval_batch", "?")
    v["quality_samples"] = first.get("quality_samples", v["eval_batch"])
    v["budget"] = first.get("budget", float("nan"))
    v["tolerance"] = first.get("tolerance", float("nan"))
    v["repeats"] = first.get("repeats", mode.repeats)
    v["model_names"] = ", ".join(ps) if ps else "none"
    v["seq_lens"] = " / ".join(str(speed[p]["seq_len"]) for p in ps)
    v["block_counts"] = " / ".join(sorted({str(speed[p]["blocks"]) for p in ps}))
    v["summary"] = "\n\n".join(summary_line(mode, p) for p in ps) or "(no TarFlow results)"
    v["model_table"] = table(
        ["model", "T", "blocks", "parameters", "train min", "test NLL (bits/dim)",
         "classifier test acc."],
        [[p, s["seq_len"], s["blocks"], f"{s['parameters']:,}", f"{s['train_time_s'] / 60:.1f}",
          f"{s['test_bpd']:.3f}", f"{s['classifier_test_accuracy']:.3f}"]
         for p, s in speed.items()])
    v["published_table"] = table(
        ["model", "For time", "For FID", "strategy", "GS-J time", "GS-J FID", "speed-up"],
        [list(r) for r in first.get("published", [])])
    crm = next((c for c in (load(mode, "crm_igm", p) for p in ps) if c), None)
    v["published_crm"] = "; ".join(
        f"{k}: {' '.join(f'{x:.2f}' for x in vals)}"
        for k, vals in (crm["published_crm"].items() if crm else []))
    v["targets_table"] = targets_table(mode, ps)
    v["run_minutes"] = run.get("wall_clock_s", float("nan")) / 60
    v["run_mode"] = run.get("mode", "?")
    v["run_threads"] = run.get("threads", "?")
    v["run_selection"] = ("studies " + ", ".join(run["only"]) if run.get("only")
                          else "every study")
    v["run_timings"] = "```\n" + json.dumps(run.get("timings_s", {}), indent=1) + "\n```"
    v["run_record"] = run_record(run)
    n = len(run.get("invocations", []))
    v["run_scope"] = (f"summed over its {n} invocation(s)" if n else
                      "in its last invocation (this record predates the run record)")
    v["superseded"] = superseded(mode)
    v["latency_without_table"] = latency_without_table(mode, ps)
    v.update(costmodel_values(mode))
    conv = {p: load(mode, "convergence", p) for p in ps}
    v["tough_iterations"] = " / ".join(
        f"{conv[p]['iterations_to_budget'][conv[p]['tough_block']]}" for p in ps if conv[p])
    v["calibration_batch"] = _default(auto_strategy.choose, "calibration")
    v["rule_threshold"] = _default(select_strategy, "threshold")
    v["rule_jacobi_cap"] = _default(select_strategy, "jacobi_max_iter")
    v["tough_gain_target"] = TARGET_TOUGH_GAIN
    rule = {p: next(r for r in speed[p]["rows"] if r["strategy"] == "paper rule") for p in ps}
    v["paper_rule_devs"] = "; ".join(
        f"{p} {r['deviation']['max_abs']:.1e}" for p, r in rule.items()) or "no results"
    v["bf16_finding"] = " ".join(bf16_finding(mode, p) for p in ps)
    return v


def bf16_finding(mode: Mode, p: str) -> str:
    """What raising the tolerance to bfloat16's floor did on model ``p``, in one sentence."""
    pr = load(mode, "precision", p)
    if not pr:
        return ""
    rows = {r["variant"]: r for r in pr["rows"]}
    f32, seq = rows["float32 jacobi"], rows["bfloat16 sequential"]
    raised = rows["bfloat16 jacobi, tolerance raised"]
    kept = rows["bfloat16 jacobi, tolerance kept"]

    def dev(r: dict) -> float:
        return r["deviation_from_float32_sequential"]["max_abs"]

    fewer = raised["dependent_steps"] < f32["dependent_steps"]
    return (f"On {p}, raising it to the floor (atol {raised['tol_used']:.3g}) takes "
            f"{raised['dependent_steps']} dependent steps against {kept['dependent_steps']} kept "
            f"and {f32['dependent_steps']} for float32 Jacobi"
            + (", fewer than float32" if fewer else "")
            + f", and moves the samples by {dev(raised):.2e} against {dev(seq):.2e} for "
            "bfloat16 sequential sampling"
            + ("; the floor taken at the scale of the iterate is coarser than the accuracy "
               "bfloat16 sequential sampling reaches." if dev(raised) > 2 * dev(seq) else "."))


def _default(fn: Callable[..., object], name: str) -> Any:
    """A setting the studies ran with: the default of ``fn``'s parameter ``name``."""
    return inspect.signature(fn).parameters[name].default


def costmodel_values(mode: Mode) -> dict[str, Any]:
    """The cost model on every architecture (``studies.costmodel_check``), if it ran."""
    cm = load(mode, "costmodel_check")
    if cm is None:
        return {}
    errors, constants = [], []
    for p, r in cm["models"].items():
        by = {}
        for row in r["rows"]:
            by.setdefault(row["strategy"], []).append(f"{100 * row['error']:+.0f}%")
        errors.append([p, r["seq_len"], r["weights"], " / ".join(map(str, r["batches"])),
                       f"{100 * r['mean_abs_error']:.0f}%", f"{100 * r['max_abs_error']:.0f}%",
                       "; ".join(f"{k} {' / '.join(e)}" for k, e in by.items())])
        for b, c in r["cost_model"].items():
            o = c["overhead_s_per_step"]
            constants.append([p, b, f"{1e3 * c['alpha_s']:.3f}",
                              f"{1e6 * c['beta_s_per_token']:.2f}",
                              *(f"{1e3 * o[k]:.3f}" for k in ("Sequential", "Jacobi", "GSJacobi",
                                                              "TriangularAnderson", "Anderson")),
                              f"{1e3 * c['per_solve_s']:.2f}", f"{1e3 * c['per_run_s']:.2f}",
                              f"{c['in_run_factor']:.2f}"])
    first = next(iter(cm["models"].values()))
    return {
        "cm_clock": clock(first), "cm_threads": first["threads"], "cm_repeats": first["repeats"],
        "cm_errors_table": table(["model", "T", "weights", "batches", "mean abs error",
                                  "max abs error", "error per strategy and batch"], errors),
        "cm_constants_table": table(
            ["model", "batch", "ms per call", "us per token row", "overhead ms/step: Sequential",
             "Jacobi", "GSJacobi", "TriangularAnderson", "Anderson", "ms per solve",
             "ms per run", "in-run factor"], constants),
    }


def run_record(run: dict[str, Any]) -> str:
    """What the run record says about completeness, the cache and the invocations."""
    invocations = run.get("invocations")
    if invocations is None:  # a record written before run.json tracked resumed runs
        return ("It does not say whether the run was complete or started from an empty "
                "cache.")
    parts = [f"{sum(bool(i['interrupted']) for i in invocations)} invocation(s) were "
             f"interrupted; the steps below add up to {run['steps_s'] / 60:.1f} minutes."]
    models = ", ".join(run.get("models", [])) or "no model"
    parts.append(f"It is complete for {models} (every model trained, every study finished)."
                 if run.get("complete") else
                 "It is not complete: missing " + ", ".join(run.get("missing", [])) + ".")
    parts.append("It started from an empty cache (every model and classifier trained "
                 "within it)." if run.get("from_empty_cache") else
                 "It did not start from an empty cache: trained models or classifiers "
                 "cached earlier were reused, so the total leaves their training out.")
    listing = "\n".join(
        f"* `{i['command']}` at `{i['git_revision']}`: {i['wall_clock_s'] / 60:.1f} min, ran "
        f"{len(i['ran'])} step(s), skipped {len(i['skipped'])}"
        + (", interrupted" if i["interrupted"] else "") for i in invocations)
    return " ".join(parts) + " Invocations:\n\n" + listing + "\n"


def superseded(mode: Mode) -> str:
    """A sentence on results kept in ``superseded/`` (older code; not shown), or ''."""
    # Only models without a current speed-up table: a rerun model is shown, not superseded.
    old = [p for p in sorted((mode.out_dir / "superseded").glob("speedup-*.json"))
           if not (mode.out_dir / p.name).exists()]
    if not old:
        return ""
    models = [p.stem.removeprefix("speedup-") for p in old]
    revs = sorted({read_json(p)["provenance"]["git_revision"] for p in old})
    return (f"Not rerun after the change of cost accounting: {', '.join(models)}. Their last "
            f"results (revisions {', '.join(revs)}, when sequential sampling was billed T "
            "dependent steps per block instead of T - 1 and deviations were stored under "
            "other keys) are kept in `" + mode.out_dir.name + "/superseded/` and are not "
            "shown here.")


def _guidance(mode: Mode, preset: str) -> float:
    prec = load(mode, "precision", preset)
    return prec["guidance"] if prec else 1.0


def summary_line(mode: Mode, p: str) -> str:
    s, c, m = load(mode, "speedup", p), load(mode, "convergence", p), load(mode, "crm_igm", p)
    assert s is not None
    rows_by = {r["strategy"]: r for r in s["rows"]}
    best, fast, miss = best_within_budget(s), fastest_b1_within_budget(s), closest_miss(s)
    parts = [f"* **{p}** (T = {s['seq_len']}):"]
    if c:
        parts.append(f"Jacobi needs {c['iterations_to_budget']} iterations per block to reach "
                     f"max error {c['budget']:g}; block {c['tough_block']} is the tough one; "
                     f"with the default tolerance it takes {c['default_iterations']} "
                     f"iterations per block.")
    if m and m["spearman_crm_vs_iterations"] is not None:
        parts.append(f"CRM ranks the blocks with Spearman {m['spearman_crm_vs_iterations']:.2f}.")
    if best:
        parts.append(f"Within the deviation budget the largest dependent-step reduction is "
                     f"{best['step_reduction']:.2f}x ({best['strategy']}).")
    if fast:
        parts.append(f"The fastest batch-1 strategy within budget runs "
                     f"{fast['speedup_b1']:.2f}x the sequential sampler ({fast['strategy']}).")
    if not best:
        parts.append("No parallel strategy stays within the deviation budget.")
    if miss and (not best or miss["step_reduction"] > best["step_reduction"]):
        parts.append(f"Closest miss: {miss['strategy']} at max deviation "
                     f"{miss['deviation']['max_abs']:.2e} with {miss['step_reduction']:.2f}x "
                     f"fewer dependent steps and {miss['speedup_b1']:.2f}x at batch 1.")
    big = max(s["timing_batches"])
    if big > 1 and rows_by["sequential"].get(f"time_b{big}"):
        winners = [r["strategy"] for r in parallel_within_budget(s)
                   if r.get(f"speedup_b{big}", 0) > 1 + TIMING_NOISE]
        parts.append(f"At batch {big} " + (f"{', '.join(winners)} beat sequential."
                     if winners else "no parallel strategy within budget beats sequential by "
                     f"more than the {100 * TIMING_NOISE:.0f}% timing noise."))
    return " ".join(parts)


def targets_table(mode: Mode, ps: list[str]) -> str:
    rows = []
    for p in ps:
        s = load(mode, "speedup", p)
        assert s is not None
        best, miss, target = best_within_budget(s), closest_miss(s), TARGETS.get(p)
        miss_text = ("none within budget" if miss is None else
                     f"none within budget; closest: {miss['strategy']} at deviation "
                     f"{miss['deviation']['max_abs']:.2e}")
        goal = f">= {target:g}x" if target else "(no target)"
        label = f"dependent-step reduction at max dev <= {s['budget']:g}"
        if best is not None:
            red = best["step_reduction"]
            verdict = "-" if target is None else ("met" if red >= target else "missed")
            rows.append([label, p, goal, f"{red:.2f}x ({best['strategy']})", verdict])
        else:
            rows.append([label, p, goal, miss_text + (f", {miss['step_reduction']:.2f}x"
                                                      if miss else ""),
                         "missed" if target else "-"])
        fast = fastest_b1_within_budget(s)
        label = f"time at batch 1 vs sequential ({clock(s)}), max dev <= {s['budget']:g}"
        goal = f">= {TARGET_B1_SPEEDUP:g}x"
        if fast is not None:
            rows.append([label, p, goal, f"{fast['speedup_b1']:.2f}x ({fast['strategy']})",
                         "met" if fast["speedup_b1"] >= TARGET_B1_SPEEDUP else "missed"])
        else:
            rows.append([label, p, goal, miss_text + (f", {miss['speedup_b1']:.2f}x"
                                                      if miss else ""), "missed"])
        c = load(mode, "convergence", p)
        gain = tough_block_gain(c) if c else None
        if c and gain:
            g, b, j = gain
            rows.append([f"tough block {c['tough_block']}: fewer dependent steps than Jacobi "
                         f"(max error <= {c['budget']:g})", p, f">= {TARGET_TOUGH_GAIN:g}x",
                         f"{g:.2f}x ({b['method']}: {b['dependent_steps']} vs "
                         f"{j['dependent_steps']})", "met" if g >= TARGET_TOUGH_GAIN else "missed"])
        sc = load(mode, "batch_scaling", p)
        if sc:
            err = sc["mean_abs_prediction_error"]
            rows.append([f"cost model predicts the {clock(sc)} (mean abs error)", p,
                         f"<= {100 * TARGET_COST_ERROR:.0f}%", f"{100 * err:.0f}%",
                         "met" if err <= TARGET_COST_ERROR else "missed"])
    return table(["target", "model", "goal", "measured", "verdict"], rows)


# ----------------------------------------------------------------- per model


def model_values(mode: Mode, p: str) -> dict[str, Any]:
    s = load(mode, "speedup", p)
    assert s is not None
    c, m = load(mode, "convergence", p), load(mode, "crm_igm", p)
    v: dict[str, Any] = {"model": p, "seq_len": s["seq_len"], "blocks": s["blocks"],
                         "threads": s["threads"], "eval_batch": s["eval_batch"],
                         "fcd_noise_floor": s["fcd_noise_floor"], "repeats": s["repeats"],
                         "quality_samples": s.get("quality_samples", s["eval_batch"]),
                         "accuracy_noise_floor": s.get("accuracy_noise_floor", float("nan")),
                         "timing_batches": " and ".join(str(b) for b in s["timing_batches"]),
                         "budget": s["budget"], "clock": clock(s)}
    v["fig_trace"] = figure(mode, "trace", p, f"{p}: noise, the image after each inverted "
                            "block, and the denoised image.", "trace")
    v["fig_samples"] = figure(mode, "samples", p, f"{p}: sequential samples (top), paper-rule "
                              "samples from the same noise (middle), absolute difference "
                              "(bottom).", "samples")
    v["speedup_table"] = speedup_table(s)
    v["convergence"] = convergence_part(mode, p, c) if c else ""
    v["crm_igm"] = crm_part(m) if m else ""
    v["initial_guess"] = initial_guess_part(mode, p)
    v["batch_scaling"] = batch_scaling_part(mode, p)
    v["scaleout"] = scaleout_part(mode, p)
    v["precision"] = precision_part(mode, p)
    v["auto"] = auto_part(s)
    v["latency"] = latency_part(load(mode, "auto_strategy", p), TARGETS.get(p))
    return v


def _section(title: str, *paragraphs: str) -> str:
    return "\n\n".join([f"### {title}", *[x for x in paragraphs if x]])


def convergence_part(mode: Mode, p: str, c: dict) -> str:
    its = table(["block", f"Jacobi iterations to max error <= {c['budget']:g}",
                 "iterations to exact (atol = rtol = 0)", "iterations, default tolerance"],
                [[k, it if it is not None else "never", len(cv["error"]), d]
                 for k, (it, cv, d) in enumerate(zip(c["iterations_to_budget"], c["jacobi"],
                                                     c["default_iterations"], strict=True))])
    default = (f"The default tolerance (stop at the rounding level of the iterate) takes "
               f"{c['default_dependent_steps']} dependent steps in all and ends "
               f"{c['default_max_deviation']:.1e} from the sequential solution (max, "
               f"{c['batch']} samples).")
    sweep = ", ".join("default" if t is None else f"{t:g}" for t in c["sweep"])
    methods = table(["method", "status", "dependent steps", "token evals",
                     "max error vs sequential"],
                    [[r["method"], r["status"], r["dependent_steps"], r["token_evals"],
                      "-" if r["error"] is None else f"{r['error']:.1e}"]
                     for r in c["tough_block_methods"]])
    k = c["tough_block"]
    fig = figure(mode, "convergence", p, f"{p}: error against the sequential solution (left), "
                 "residual (middle) per Jacobi iteration, and GS-Jacobi per module on block "
                 f"{k} (right).", "convergence")
    return "\n\n".join([
        _section("Figure 2: pure-Jacobi convergence per block", fig, its, default),
        _section(f"Figure 3: GS-Jacobi per module (block {k})",
                 f"Right panel above: {c['gs_modules']} modules with atol {c['gs_tol']:g}, "
                 f"iterations per module {c['gs_module_iterations']}. Every method on the "
                 f"tough block alone (its input taken from the sequential trajectory, "
                 f"{c['sweep_batch']} samples): the fewest dependent steps over the "
                 f"tolerances {sweep} that keep the max error within {c['budget']:g}:",
                 methods)])


def crm_part(m: dict) -> str:
    rho = m["spearman_crm_vs_iterations"]
    return _section("Table 4: CRM and IGM (`python -m studies.crm_igm`)", m["markdown"],
                    "" if rho is None else "Spearman rank correlation between CRM and the "
                    f"measured Jacobi iterations to the error budget: **{rho:.2f}**",
                    "The paper's rule chooses: " + m["paper_rule_description"].replace("\n", "; "))


def initial_guess_part(mode: Mode, p: str) -> str:
    ig = load(mode, "initial_guess", p)
    if not ig:
        return ""
    rows = [[name, "/".join(v["inits"]), f"{v['deviation']['max_abs']:.2e}", f"{v['fcd']:.3f}"]
            for name, v in ig["variants"].items()]
    n = ig.get("eval_batch", mode.eval_batch)  # the study samples mode.eval_batch
    return _section(f"Figure 7: initial guesses (Jacobi capped at {ig['cap']} iterations, "
                    f"{n} samples)",
                    figure(mode, "initial_guess", p, f"{p}: error per iteration from each "
                           "start.", "initial_guess"),
                    table(["start", "per-block starts", "max deviation", "FCD"], rows))


def batch_scaling_part(mode: Mode, p: str) -> str:
    sc = load(mode, "batch_scaling", p)
    if not sc:
        return ""
    rows = []
    for name, v in sc["strategies"].items():
        if name == "sequential":
            continue
        cross = v["crossover_batch"]
        if cross is not None:
            cross_text = f"{cross:.1f}"
        elif v["speedup"][0] < 1:
            cross_text = "none: sequential faster at every batch size"
        else:
            cross_text = "none: parallel faster at every batch size"
        rows.append([name, " / ".join(f"{x:.2f}" for x in v["speedup"]), cross_text,
                     " / ".join(f"{x:.2f}" for x in v["latency_bound_speedup"]),
                     " / ".join(f"{100 * e:+.0f}%" for e in v["prediction_error"])])
    seq = sc["strategies"]["sequential"]
    rows.insert(0, ["sequential", "1", "-", "1", " / ".join(f"{100 * e:+.0f}%"
                                                         for e in seq["prediction_error"])])
    cost_rows = []
    for b, cm in sc["cost_model"].items():
        over = cm["overhead_s_per_step"]
        cost_rows.append([b, f"{1e3 * cm['alpha_s']:.3f}", f"{1e6 * cm['beta_s_per_token']:.2f}",
                          f"{1e3 * over.get('Sequential', float('nan')):.3f}",
                          f"{1e3 * over.get('Jacobi', float('nan')):.3f}",
                          f"{1e3 * over.get('GSJacobi', float('nan')):.3f}",
                          f"{1e3 * over.get('TriangularAnderson', float('nan')):.3f}",
                          f"{1e3 * cm['per_solve_s']:.2f}", f"{1e3 * cm['per_run_s']:.2f}",
                          f"{cm.get('in_run_factor', 1.0):.2f}"])
    return _section(
        "Beyond the paper: speed-up against batch size",
        figure(mode, "batch_scaling", p, f"{p}: speed-up vs sequential (left) and "
               "measured vs predicted time (right).", "batch_scaling"),
        f"Batch sizes {sc['batches']}; CPU, float32, {sc['threads']} thread(s); "
        f"{clock(sc)}, median of {sc['repeats']} round-robin repeats.",
        table(["strategy", "CPU speed-up per batch size", "crossover batch",
               "latency-bound speed-up (step ratio)", "cost-model error per batch size"], rows),
        "Cost model (`studies/costmodel.py`), fitted per batch size on calibration noise: "
        "network time per call and per token row from bare calls of block 0's map, solver "
        "overhead per dependent step (per method class) from calibration solves minus that "
        "network time, a per-solve remainder, and a per-run cost and in-run factor from two "
        "whole calibration runs. None of the strategies above is used to fit it. Prediction "
        "error over the table: mean "
        f"{100 * sc['mean_abs_prediction_error']:.0f}%, max "
        f"{100 * sc['max_abs_prediction_error']:.0f}%.",
        table(["batch", "ms per call", "us per token row", "overhead ms/step: Sequential",
               "Jacobi", "GSJacobi", "TriangularAnderson", "ms per solve", "ms per run",
               "in-run factor"],
              cost_rows))


def scaleout_part(mode: Mode, p: str) -> str:
    so = load(mode, "scaleout", p)
    if not so:
        return ""
    rows = [[name, r["way"], f"{r['sampling_s']:.2f}", f"{r['speedup']:.2f}x",
             f"{r['command_s']:.1f}", "yes" if r["identical_to_reference"]
             else f"no (max diff {r['max_abs_diff']:.1e})", f"{r['fcd']:.3f}"]
            for name, rs in so["strategies"].items() for r in rs]
    return _section(
        "Beyond the paper: sharded sampling (`python -m studies.scaleout`)",
        f"`fixedpoint generate`, {so['num_samples']} samples in shards of {so['shard_size']}, "
        f"CPU, float32, guidance {so['guidance']:g}"
        f"{', denoising step' if so.get('denoise') else ''}; sampling time of the slowest rank "
        f"(median of {so['repeats']}), whole command including start-up; samples compared bit "
        "for bit with the one-process, one-thread run.",
        table(["strategy", "processes x threads", "sampling s (slowest rank)", "speed-up",
               "command s", "identical samples", "FCD"], rows))


def precision_part(mode: Mode, p: str) -> str:
    pr = load(mode, "precision", p)
    if not pr:
        return ""
    rows = [[r["variant"], "-" if r["tol_used"] is None else f"{r['tol_used']:g}",
             str(r["iterations"]), r["dependent_steps"],
             f"{r['deviation_from_float32_sequential']['max_abs']:.2e}",
             f"{1e3 * r['time_s']:.1f}"] for r in pr["rows"]]
    raised = ", ".join(sorted({f"{r['tol_used']:.3g}" for r in pr["rows"]
                               if "raised" in r["variant"] and r["tol_used"] is not None}))
    return _section(
        "Beyond the paper: tolerances in bfloat16 (`python -m studies.precision`)",
        f"Batch {pr['batch']}, guidance {pr['guidance']:g}, CPU, {pr['threads']} thread(s); "
        f"Jacobi with atol {pr['tol']:g} on every block; bfloat16 = autocast (linear layers in "
        f"bfloat16). The bfloat16 noise floor is {pr['noise_floor_bfloat16']:g} at scale 1 and "
        "is taken at the scale of the iterate (the largest token of the scaled noise): a "
        "smaller tolerance is raised to it unless `adjust_tolerance=False` (here to "
        f"{raised}). Deviation from the float32 sequential samples; {clock(pr)}, median of "
        f"{pr['repeats']}, round-robin.",
        table(["variant", "atol used", "iterations per block", "dependent steps",
               "max deviation", "ms"], rows))


def auto_part(s: dict) -> str:
    rows_by = {r["strategy"]: r for r in s["rows"]}
    lines = []
    for b, info in s.get("auto", {}).items():
        r = rows_by.get(f"auto (b={b})")
        if r is None:
            continue
        last = info["rounds"][-1]
        lines.append(
            f"* Batch {b}: predicted {1e3 * info['predicted_s']:.1f} ms by the cost model at "
            f"batch {b}; measured {1e3 * r[f'time_b{b}']:.1f} ms; calibration deviation "
            f"{last['deviation']['max_abs']:.1e} after {len(info['rounds'])} round(s); "
            f"evaluation deviation {r['deviation']['max_abs']:.1e} (budget {s['budget']:g}). "
            "Plan: " + info["strategy"].replace("\n", "; "))
    return _section("Automatic strategy", "\n\n".join(lines)) if lines else ""


def latency_without_table(mode: Mode, ps: list[str]) -> str:
    """The latency measurement of models with no (current) speed-up table, each under
    its own heading: for them it is the only result the paper shows."""
    parts = []
    for p in mode.models:
        a = None if p in ps else load(mode, "auto_strategy", p)
        if a is not None:
            parts.append(latency_part(a, TARGETS.get(p), f"{p} (T = {a['seq_len']}): "))
    return "\n\n".join(parts) or "No such model."


def latency_part(a: dict | None, target: float | None, heading_prefix: str = "") -> str:
    """The latency objective on its own evaluation batch, with damped Newton on the
    slowest block (``python -m studies.auto_strategy --name MODEL --newton-samples N``),
    under a heading that starts with ``heading_prefix`` (the model, where the section
    does not already name it)."""
    if a is None:
        return ""
    head = ["strategy", "samples", "dependent steps", "step reduction", "token evals",
            "max deviation"]
    rows = [[r["strategy"], a["eval_batch"], r["dependent_steps"],
             f"{r['step_reduction']:.2f}x", r["token_evals"],
             f"{r['deviation']['max_abs']:.1e}"] for r in a["rows"]]
    rows += [[r["strategy"], r["samples"], r["dependent_steps"], f"{r['step_reduction']:.2f}x",
              r["token_evals"], f"{r['deviation']['max_abs']:.1e}"] for r in a["newton_rows"]]
    within = [r for r in a["rows"] + a["newton_rows"]
              if r["deviation"]["max_abs"] <= a["budget"] and r["strategy"] != "sequential"]
    best = max(within, key=lambda r: r["step_reduction"], default=None)
    verdict = ""
    if best is not None and target is not None:
        verdict = (f" Best within the budget {a['budget']:g}: {best['strategy']}, "
                   f"{best['step_reduction']:.2f}x fewer dependent steps on "
                   f"{best.get('samples', a['eval_batch'])} samples (target >= "
                   f"{target:g}x: {'met' if best['step_reduction'] >= target else 'missed'}).")
    text = (f"The latency objective (fewest dependent steps within the budget, calibrated "
            f"on {a['calibration_batch']['latency']} samples with margin {a['margin']:g}) "
            f"on {a['eval_batch']} samples at guidance {a['guidance']:g}; the Newton rows "
            "switch the slowest block of the latency strategy to damped Newton on the first "
            "samples of the same noise (its Jacobian's directional derivatives are counted "
            "in token evals; they are independent of each other, so they add no dependent "
            "step; with a bandwidth k only the k sub-diagonal blocks nearest the diagonal "
            "are taken, k x d directions instead of (T - 1) x d: an approximate Jacobian, "
            "so more iterations, never another fixed point)."
            f"{verdict}")
    return _section(f"{heading_prefix}Latency objective and damped Newton "
                    "(`python -m studies.auto_strategy`)", text, table(head, rows))


def read_values_file(path: Path) -> dict[str, Any]:
    """The ``section_values`` a study stored in its JSON (see studies.write_paper)."""
    payload = read_json(path)
    values = payload.get("section_values")
    if not isinstance(values, dict):
        raise ValueError(f"{path} has no 'section_values' dict")
    return values
