"""The text of the write-up, filled with numbers read from the study outputs.

Nothing here is measured: every number is read from a JSON file a study wrote, so the
paper cannot drift from the results.  Regenerate with ``python -m studies.write_paper``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .common import FULL, Mode, read_json
from .speedup import PUBLISHED, markdown

TARGETS = {"mnist-p4": 4.0, "mnist-p2": 10.0}  # dependent-step reduction targets


def _load(mode: Mode, stem: str, preset: str) -> dict[str, Any] | None:
    path = mode.out_dir / f"{stem}-{preset}.json"
    return read_json(path) if path.exists() else None


def _fig(mode: Mode, stem: str, preset: str, caption: str, script: str) -> list[str]:
    path = mode.out_dir / f"{stem}-{preset}.png"
    if not path.exists():
        return []
    # paper/paper.md sits beside results/; a fast-mode paper.md sits inside its results.
    rel = f"{mode.out_dir.name}/{path.name}" if mode.out_dir == FULL.out_dir else path.name
    return [f"![{caption}]({rel})", "", f"*{caption}* Made by `python -m studies.{script}`.", ""]


def _table(head: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return lines + [""]


def _parallel_within_budget(speed: dict) -> list[dict]:
    """Rows within the deviation budget that are not the sequential sampler in disguise."""
    seq = speed["rows"][0]
    return [r for r in speed["rows"][1:] if r["deviation"]["max"] <= speed["budget"]
            and r["dependent_steps"] < seq["dependent_steps"]]


def _best_within_budget(speed: dict) -> dict | None:
    ok = _parallel_within_budget(speed)
    return max(ok, key=lambda r: r["step_reduction"]) if ok else None


def _fastest_b1_within_budget(speed: dict) -> dict | None:
    ok = _parallel_within_budget(speed)
    return max(ok, key=lambda r: r["speedup_b1"]) if ok else None


def _closest_miss(speed: dict) -> dict | None:
    seq = speed["rows"][0]
    miss = [r for r in speed["rows"][1:] if r["deviation"]["max"] > speed["budget"]
            and r["dependent_steps"] < seq["dependent_steps"]]
    return min(miss, key=lambda r: r["deviation"]["max"]) if miss else None


def render(mode: Mode) -> str:
    presets = [p for p in mode.models if _load(mode, "speedup", p)]
    speed = {p: _load(mode, "speedup", p) for p in presets}
    conv = {p: _load(mode, "convergence", p) for p in presets}
    crm = {p: _load(mode, "crm_igm", p) for p in presets}
    init = {p: _load(mode, "initial_guess", p) for p in presets}
    scale = {p: _load(mode, "batch_scaling", p) for p in presets}
    shard = {p: _load(mode, "scaleout", p) for p in presets}
    prec = {p: _load(mode, "precision", p) for p in presets}
    run = read_json(mode.out_dir / "run.json") if (mode.out_dir / "run.json").exists() else {}
    any_speed = next(iter(speed.values()), None)
    prov = any_speed["provenance"] if any_speed else {}
    hw = prov.get("hardware", {})

    o: list[str] = [
        "# Accelerating TarFlow sampling with GS-Jacobi iteration: a CPU reproduction",
        "",
        "This write-up reproduces the argument of Liu and Qin (2025), *Accelerate TarFlow "
        "Sampling with GS-Jacobi Iteration*, with TarFlows trained here on real data "
        "(scikit-learn digits and MNIST) and sampled through the generic triangular solvers "
        "of the `fixedpoint` package. Every number below is read from a file in "
        f"`{mode.out_dir.name}/` written by the study script named beside it; "
        "`python -m studies.reproduce --mode full` rebuilds all of it.",
        "",
        "## Setup",
        "",
        f"* Hardware: {hw.get('cpu_count', '?')} CPU cores ({hw.get('machine', '?')}), no GPU; "
        f"torch {prov.get('versions', {}).get('torch', '?')} with "
        f"{any_speed['threads'] if any_speed else '?'} threads; float32 everywhere.",
        f"* Git revision {prov.get('git_revision', '?')}; seeds: evaluation noise 0, second "
        "noise draw 1 (metric noise), calibration noise 1234.",
        "* Sampling: classifier-free guidance 1.0 on class-conditional models, balanced "
        "labels, final denoising step on for images and quality.",
        "* Quality: max and mean deviation from the sequential samples from the same noise; "
        "test NLL in bits/dim; the **Fréchet classifier distance (FCD)**: a Fréchet "
        "distance in the 64-d feature space of a small CNN trained here on the same data "
        "(it is not FID: no Inception network is available offline); and the fraction of "
        "samples the classifier assigns to their conditioning label.",
        "",
    ]
    if presets:
        o += ["## Summary of findings", ""]
        for p in presets:
            s, c, m = speed[p], conv[p], crm[p]
            rows_by = {r["strategy"]: r for r in s["rows"]}
            best = _best_within_budget(s)
            fast = _fastest_b1_within_budget(s)
            line = f"* **{p}** (T = {s['seq_len']}): "
            if c:
                its = c["iterations_to_budget"]
                line += (f"Jacobi needs {its} iterations per block to reach max error "
                         f"{c['budget']:g}; block {c['tough_block']} is the tough one. ")
            if m and m["spearman_crm_vs_iterations"] is not None:
                rho = m["spearman_crm_vs_iterations"]
                line += f"CRM ranks the blocks with Spearman {rho:.2f}. "
            if best:
                line += (f"Within the deviation budget the largest dependent-step reduction is "
                         f"{best['step_reduction']:.2f}x ({best['strategy']}). ")
            if fast:
                line += (f"The fastest batch-1 strategy within budget runs "
                         f"{fast['speedup_b1']:.2f}x the sequential sampler ({fast['strategy']}). ")
            if not best:
                line += "No parallel strategy stays within the deviation budget. "
            miss = _closest_miss(s)
            if miss and (not best or miss["step_reduction"] > best["step_reduction"]):
                line += (f"Closest miss: {miss['strategy']} at max deviation "
                         f"{miss['deviation']['max']:.2e} with {miss['step_reduction']:.2f}x fewer "
                         f"dependent steps and {miss['speedup_b1']:.2f}x at batch 1. ")
            seq64 = rows_by["sequential"].get("time_b64")
            if seq64:
                winners = [r["strategy"] for r in _parallel_within_budget(s)
                           if r.get("speedup_b64", 0) > 1.1]
                line += ("At batch 64 " + (f"{', '.join(winners)} beat sequential."
                         if winners else "no parallel strategy within budget beats sequential "
                         "by more than the 10% timing noise."))
            o += [line, ""]
        rows = []
        for p in presets:
            s = speed[p]
            rows.append([p, s["seq_len"], s["blocks"], f"{s['parameters']:,}",
                         f"{s['train_time_s'] / 60:.1f}", f"{s['test_bpd']:.3f}",
                         f"{s['classifier_test_accuracy']:.3f}"])
        o += _table(["model", "T", "blocks", "parameters", "train min", "test NLL (bits/dim)",
                     "classifier test acc."], rows)

    for p in presets:
        s, c, m, ig, sc = speed[p], conv[p], crm[p], init[p], scale[p]
        o += [f"## Model `{p}` (T = {s['seq_len']})", ""]
        o += ["### Figure 1: sampling trace", ""]
        o += _fig(mode, "trace", p, f"{p}: noise, the image after each inverted block, "
                  "and the denoised image.", "trace")
        if c:
            o += ["### Figure 2: pure-Jacobi convergence per block", ""]
            o += _fig(mode, "convergence", p, f"{p}: error against the sequential solution "
                      "(left), residual (middle) per Jacobi iteration, and GS-Jacobi per "
                      f"module on block {c['tough_block']} (right).", "convergence")
            o += _table(["block", "Jacobi iterations to max error <= "
                         f"{c['budget']:g}", "iterations to exact (tol 0)"],
                        [[k, it if it is not None else "never", len(cv["error"])]
                         for k, (it, cv) in enumerate(zip(c["iterations_to_budget"],
                                                         c["jacobi"], strict=True))])
            o += [f"### Figure 3: GS-Jacobi per module (block {c['tough_block']})", "",
                  f"Right panel above: {c['gs_modules']} modules with tolerance "
                  f"{c['gs_tol']:g}, iterations per module {c['gs_module_iterations']}. "
                  "Every method on the tough block alone (its input taken from the "
                  "sequential trajectory, 16 samples): the fewest dependent steps over "
                  f"tolerances 1e-3 to 0 that keep the max error within {c['budget']:g}:", ""]
            o += _table(["method", "status", "dependent steps", "token evals",
                         "max error vs sequential"],
                        [[r["method"], r["status"], r["dependent_steps"], r["token_evals"],
                          "-" if r["error"] is None else f"{r['error']:.1e}"]
                         for r in c["tough_block_methods"]])
        if m:
            o += ["### Table 4: CRM and IGM (`python -m studies.crm_igm`)", "", m["markdown"], ""]
            rho = m["spearman_crm_vs_iterations"]
            o += [f"Spearman rank correlation between CRM and the measured Jacobi iterations "
                  f"to the error budget: **{rho:.2f}**" if rho is not None else "", "",
                  "The paper's rule chooses: " + m["paper_rule_description"].replace("\n", "; "),
                  ""]
        o += ["### Figure 5: sequential vs GS-Jacobi samples", ""]
        o += _fig(mode, "samples", p, f"{p}: sequential samples (top), paper-rule samples "
                  "from the same noise (middle), absolute difference (bottom).", "samples")
        o += ["### Table 6: time, quality and speed-up (`python -m studies.speedup`)", "",
              f"CPU, float32, {s['threads']} threads; wall-clock is the median of repeats "
              f"in one run; steps, token evaluations, deviation and quality on "
              f"{s['eval_batch']} samples. FCD of two sequential runs with different noise "
              f"differs by {s['fcd_noise_floor']:.3f} (the metric's own noise).", "",
              markdown(s), ""]
        if ig:
            o += [f"### Figure 7: initial guesses (Jacobi capped at {ig['cap']} iterations)", ""]
            o += _fig(mode, "initial_guess", p, f"{p}: error per iteration from each start.",
                      "initial_guess")
            o += _table(["start", "per-block starts", "max deviation", "FCD"],
                        [[name, "/".join(v["inits"]), f"{v['deviation']['max']:.2e}",
                          f"{v['fcd']:.3f}"] for name, v in ig["variants"].items()])
        if sc:
            o += ["### Beyond the paper: speed-up against batch size", ""]
            o += _fig(mode, "batch_scaling", p, f"{p}: wall-clock speed-up vs sequential "
                      "(left) and measured vs predicted time (right).", "batch_scaling")
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
                             " / ".join(f"{x:.2f}" for x in v["latency_bound_speedup"])])
            o += [f"Batch sizes {sc['batches']}.", ""]
            o += _table(["strategy", "CPU speed-up per batch size", "crossover batch",
                         "latency-bound speed-up (step ratio)"], rows)
            cm = sc["cost_model"]
            bookkeeping = 1e3 * cm.get("overhead_s_per_step", 0.0)
            o += [f"Cost model on this CPU: {1e3 * cm['alpha_s']:.3f} ms per call + "
                  f"{bookkeeping:.3f} ms solver bookkeeping per step + "
                  f"{1e6 * cm['beta_s_per_token']:.2f} us per token; prediction error "
                  f"mean {100 * sc['mean_abs_prediction_error']:.0f}%, max "
                  f"{100 * sc['max_abs_prediction_error']:.0f}%.", ""]
        so = shard[p]
        if so:
            o += ["### Beyond the paper: sharded sampling (`python -m studies.scaleout`)", "",
                  f"`fixedpoint generate`, {so['num_samples']} samples in shards of "
                  f"{so['shard_size']}, CPU, float32, guidance {so['guidance']:g}"
                  f"{', denoising step' if so.get('denoise') else ''}; sampling "
                  "time of the slowest rank (median of "
                  f"{so['repeats']}), whole command including start-up; samples compared "
                  "bit for bit with the one-process, one-thread run.", ""]
            o += _table(["strategy", "processes x threads", "sampling s (slowest rank)",
                         "speed-up", "command s", "identical samples", "FCD"],
                        [[name, r["way"], f"{r['sampling_s']:.2f}", f"{r['speedup']:.2f}x",
                          f"{r['command_s']:.1f}", "yes" if r["identical_to_reference"]
                          else f"no (max diff {r['max_abs_diff']:.1e})", f"{r['fcd']:.3f}"]
                         for name, rows in so["strategies"].items() for r in rows])
        pr = prec[p]
        if pr:
            o += ["### Beyond the paper: tolerances in bfloat16 (`python -m studies.precision`)",
                  "", f"Batch {pr['batch']}, guidance {pr['guidance']:g}, CPU, "
                  f"{pr['threads']} threads; Jacobi with tolerance {pr['tol']:g} on every "
                  "block; bfloat16 = autocast (linear layers in bfloat16). The bfloat16 noise "
                  f"floor is {pr['noise_floor_bfloat16']:g}: a smaller tolerance is raised "
                  "to it unless `adjust_tolerance=False`. Deviation from the float32 "
                  "sequential samples; wall-clock median of "
                  f"{pr['repeats']}, round-robin.", ""]
            o += _table(["variant", "tol used", "iterations per block", "dependent steps",
                         "max deviation", "ms"],
                        [[r["variant"], "-" if r["tol_used"] is None else f"{r['tol_used']:g}",
                          str(r["iterations"]), r["dependent_steps"],
                          f"{r['deviation_from_float32_sequential']['max']:.2e}",
                          f"{1e3 * r['time_s']:.1f}"] for r in pr["rows"]])
        auto = s.get("auto", {})
        if auto:
            o += ["### Automatic strategy", ""]
            rows_by = {r["strategy"]: r for r in s["rows"]}
            for b, info in auto.items():
                r = rows_by.get(f"auto (b={b})")
                if r is None:
                    continue
                last = info["rounds"][-1]
                o += [f"* Batch {b}: predicted {1e3 * info['predicted_s']:.1f} ms on the "
                      f"calibration batch scaled to batch {b}; measured "
                      f"{1e3 * r[f'time_b{b}']:.1f} ms; calibration deviation "
                      f"{last['deviation']['max']:.1e} after {len(info['rounds'])} round(s); "
                      f"evaluation deviation {r['deviation']['max']:.1e} (budget "
                      f"{s['budget']:g}). Plan: " + info["strategy"].replace("\n", "; "), ""]

    o += ["## The paper's published table (8 A800 GPUs, 50,000 samples, FID)", ""]
    o += _table(["model", "For time", "For FID", "strategy", "GS-J time", "GS-J FID",
                 "speed-up"], [list(r) for r in PUBLISHED])
    o += ["Published CRM (%), blocks 0-7: " + "; ".join(
        f"{k}: {' '.join(f'{v:.2f}' for v in vals)}"
        for k, vals in (next(iter(crm.values()))["published_crm"].items() if crm else []))
          , ""]

    o += ["## Performance targets", ""]
    rows = []
    for p in presets:
        s = speed[p]
        best = _best_within_budget(s)
        target = TARGETS.get(p)
        miss = _closest_miss(s)
        miss_text = ("none within budget" if miss is None else
                     f"none within budget; closest: {miss['strategy']} at deviation "
                     f"{miss['deviation']['max']:.2e}")
        goal = f">= {target:g}x" if target else "(no target)"
        if best is not None:
            red = best["step_reduction"]
            verdict = "-" if target is None else ("met" if red >= target else "missed")
            rows.append([f"dependent-step reduction at max dev <= {s['budget']:g}", p, goal,
                         f"{red:.2f}x ({best['strategy']})", verdict])
        else:
            rows.append([f"dependent-step reduction at max dev <= {s['budget']:g}", p, goal,
                         miss_text + (f", {miss['step_reduction']:.2f}x" if miss else ""),
                         "missed" if target else "-"])
        fast = _fastest_b1_within_budget(s)
        label = f"wall-clock at batch 1 vs sequential, max dev <= {s['budget']:g}"
        if fast is not None:
            rows.append([label, p, ">= 2x", f"{fast['speedup_b1']:.2f}x ({fast['strategy']})",
                         "met" if fast["speedup_b1"] >= 2 else "missed"])
        else:
            rows.append([label, p, ">= 2x", miss_text + (f", {miss['speedup_b1']:.2f}x"
                                                          if miss else ""), "missed"])
        c = conv[p]
        if c:
            k = c["tough_block"]
            rows_c = c["tough_block_methods"]
            jac = next(r for r in rows_c if r["method"].startswith("Jacobi"))
            others = [r for r in rows_c if not r["method"].startswith("Jacobi")
                      and r["dependent_steps"] is not None]
            if others and jac["dependent_steps"] is not None:
                best = min(others, key=lambda r: r["dependent_steps"])
                gain = jac["dependent_steps"] / best["dependent_steps"]
                rows.append([f"tough block {k}: fewer dependent steps than Jacobi "
                             f"(max error <= {c['budget']:g})", p, ">= 1.5x",
                             f"{gain:.2f}x ({best['method']}: {best['dependent_steps']} vs "
                             f"{jac['dependent_steps']})", "met" if gain >= 1.5 else "missed"])
        sc = scale[p]
        if sc:
            err = sc["mean_abs_prediction_error"]
            rows.append(["cost model predicts wall-clock (mean abs error)", p, "<= 25%",
                         f"{100 * err:.0f}%", "met" if err <= 0.25 else "missed"])
    o += _table(["target", "model", "goal", "measured", "verdict"], rows)
    if run:
        o += [f"The last `studies.reproduce` invocation ({run.get('mode')} mode; a run may "
              f"resume or select studies with `--only`) took {run['wall_clock_s'] / 60:.1f} "
              "minutes; per-step seconds (training is near zero when cached):", ""]
        o += ["```", json.dumps(run.get("timings_s", {}), indent=1), "```", ""]
    o += [Path(__file__).with_name("discussion.md").read_text()]
    return "\n".join(o) + "\n"
