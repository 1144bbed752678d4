"""Strategies: the paper's [Stack-GS-J-Else] notation, selection from CRM / IGM metrics."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import fixedpoint as fp
from fixedpoint.tarflow import (
    BlockInverse,
    BlockMetrics,
    BlockPlan,
    InitialGuess,
    Strategy,
    TarFlow,
    TarFlowConfig,
    crm_igm_table,
    format_table,
    select_strategy,
)
from fixedpoint.tarflow.diagnostics import IGMForm, igm_paper, igm_sample

# ---- parsing -------------------------------------------------------------------------


def test_parse_img128cond_strategy():
    s = Strategy.parse("[6-8-32-10]", blocks=8, seq_len=1024)
    assert s.plans[6].method == fp.GSJacobi(modules=8, max_iter=32)
    assert all(s.plans[k].method == fp.Jacobi(max_iter=10) for k in range(8) if k != 6)
    assert all(p.init is InitialGuess.NOISE for p in s.plans)
    assert s.to_spec() == "[6-8-32-10]" and str(s) == "[6-8-32-10]"


def test_parse_afhq_and_img64uncond_strategies():
    s = Strategy.parse("[7-8-32-10]", blocks=8, seq_len=1024)
    assert s.plans[7].method == fp.GSJacobi(modules=8, max_iter=32)
    assert s.plans[6].method == fp.Jacobi(max_iter=10)
    # One GS / J value for two stacked blocks: it applies to both.
    s = Strategy.parse("[0/6-8-32-20]", blocks=8, seq_len=1024)
    assert s.plans[0].method == fp.GSJacobi(modules=8, max_iter=32)
    assert s.plans[6].method == fp.GSJacobi(modules=8, max_iter=32)
    assert s.plans[3].method == fp.Jacobi(max_iter=20)
    assert s.to_spec() == "[0/6-8-32-20]"
    assert Strategy.parse("[0/6-8/8-32/32-20]", 8, 1024) == s
    mixed = Strategy.parse("[0/6-4/8-32-20]", 8, 1024)
    assert mixed.to_spec() == "[0/6-4/8-32-20]"


def test_parse_img64cond_strategy():
    s = Strategy.parse("[0/7-256/8-1/13-6]", blocks=8, seq_len=256)
    assert s.plans[0].method == fp.GSJacobi(modules=256, max_iter=1)
    assert s.plans[7].method == fp.GSJacobi(modules=8, max_iter=13)
    assert all(s.plans[k].method == fp.Jacobi(max_iter=6) for k in range(1, 7))
    assert s.to_spec() == "[0/7-256/8-1/13-6]"
    assert "block 7: GSJacobi(modules=8, max_iter=13), init z" in s.describe()


def test_parse_passes_tolerance_and_initial_guesses():
    inits = [InitialGuess.ZEROS_AFTER_FIRST] + [InitialGuess.NOISE] * 3
    s = Strategy.parse(" [ 1 - 4 - 5 - 7 ] ", 4, 16, atol=1e-4, init=inits)
    assert s.plans[1].method == fp.GSJacobi(modules=4, max_iter=5, atol=1e-4)
    assert s.plans[0] == BlockPlan(fp.Jacobi(atol=1e-4, max_iter=7), InitialGuess.ZEROS_AFTER_FIRST)
    assert str(s) == "[1-4-5-7] (init zeros: blocks 0)"


@pytest.mark.parametrize(
    "spec, message",
    [
        ("6-8-32-10", "square brackets"),
        ("(6-8-32-10)", "square brackets"),
        ("[6-8-32]", "4 '-'-separated fields"),
        ("[6-8-32-10-1]", "4 '-'-separated fields"),
        ("[0/7/3-256/8-1/13-6]", "GS lists 2 entries for 3 stacked"),
        ("[0/7-8/8-1/2/3-6]", "J lists 3 entries for 2 stacked"),
        ("[6-8/4-32-10]", "GS lists 2 entries for 1 stacked"),
        ("[8-8-32-10]", "block index 8 out of range"),
        ("[6-0-32-10]", "GS values must be positive"),
        ("[6-8-0-10]", "J values must be positive"),
        ("[6-8-32-0]", "Else values must be positive"),
        ("[6-2048-32-10]", "2048 modules exceed the sequence length T=1024"),
        ("[6/6-8/8-32/32-10]", "listed twice"),
        ("[6-8-32-10/2]", "Else must be a single number"),
        ("[a-8-32-10]", "non-negative integers"),
        ("[6--32-10]", "field GS must be '/'-separated non-negative integers"),
        ("[6-8.5-32-10]", "non-negative integers"),
        ("[]", "4 '-'-separated fields"),
    ],
)
def test_parse_rejects_malformed_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        Strategy.parse(spec, blocks=8, seq_len=1024)


def test_parse_rejects_bad_arguments():
    with pytest.raises(ValueError, match="blocks"):
        Strategy.parse("[0-1-1-1]", blocks=0, seq_len=4)
    with pytest.raises(ValueError, match="init lists 2"):
        Strategy.parse("[0-1-1-1]", blocks=3, seq_len=4, init=[InitialGuess.NOISE] * 2)


def test_uniform_and_unrepresentable_strategies():
    s = Strategy.uniform(fp.Sequential(), 3)
    assert s.blocks == 3 and s.to_spec() is None
    assert str(s).startswith("0: Sequential(), init z")
    with pytest.raises(ValueError, match="non-empty"):
        Strategy(())
    with pytest.raises(TypeError, match="fixedpoint.Method"):
        BlockPlan("jacobi")  # type: ignore[arg-type]


def test_any_method_is_a_plan_and_describes_itself():
    @dataclasses.dataclass(frozen=True)
    class Outside(fp.Sequential):  # a method the package has never heard of
        label: str = "x"

    plan = BlockPlan(Outside(label="mine"), InitialGuess.ZEROS_AFTER_FIRST)
    assert plan.describe() == "Outside(label='mine'), init zeros"
    s = Strategy.uniform(Outside(), 2)
    assert s.to_spec() is None and str(s) == "0: Outside(), init z; 1: Outside(), init z"


def test_parse_defaults_to_the_rounding_level_tolerance():
    s = Strategy.parse("[1-2-3-4]", 2, 16)
    assert all(p.method.atol is None and p.method.rtol is None for p in s.plans)


# ---- selection -----------------------------------------------------------------------


def row(k, pct, noise=1.0, zeros=2.0, s_noise=None, s_zeros=None) -> BlockMetrics:
    return BlockMetrics(k, pct, pct, noise, zeros,
                        noise if s_noise is None else s_noise,
                        zeros if s_zeros is None else s_zeros)


def test_select_strategy_splits_dominant_blocks_and_picks_starts():
    # Img64uncond's published CRM shares: blocks 0 and 6 dominate.
    shares = [50.71, 2.42, 2.29, 3.38, 1.77, 1.33, 33.62, 4.44]
    table = [row(k, p) for k, p in enumerate(shares)]
    table[3] = row(3, shares[3], noise=5.0, zeros=0.5)
    table[5] = row(5, shares[5], noise=math.inf, zeros=3.0)  # overflow from the noise start
    s = select_strategy(table, seq_len=1024, modules=8, gs_max_iter=32, jacobi_max_iter=20)
    assert s.to_spec() == "[0/6-8-32-20]"
    assert [p.init for p in s.plans] == [InitialGuess.NOISE] * 3 + [
        InitialGuess.ZEROS_AFTER_FIRST, InitialGuess.NOISE, InitialGuess.ZEROS_AFTER_FIRST,
        InitialGuess.NOISE, InitialGuess.NOISE,
    ]
    # The per-sample IGM can disagree with the paper form.
    table[2] = row(2, shares[2], noise=0.1, zeros=0.2, s_noise=3.0, s_zeros=1.0)
    paper = select_strategy(table, seq_len=1024, igm=IGMForm.PAPER)
    sample = select_strategy(table, seq_len=1024, igm=IGMForm.PER_SAMPLE)
    assert paper.plans[2].init is InitialGuess.NOISE
    assert sample.plans[2].init is InitialGuess.ZEROS_AFTER_FIRST


def test_select_strategy_threshold_and_errors():
    table = [row(0, 20.0), row(1, 80.0)]
    assert select_strategy(table, seq_len=16, modules=4).to_spec() == "[1-4-32-10]"
    # threshold 1.7 * 50 % = 85 %: nothing dominates.
    assert select_strategy(table, seq_len=16, threshold=1.7).to_spec() is None
    with pytest.raises(ValueError, match="modules"):
        select_strategy(table, seq_len=4, modules=8)
    with pytest.raises(ValueError, match="empty"):
        select_strategy([], seq_len=4)
    for flag in ("mean", "paper"):  # an enum, not a string flag
        with pytest.raises(ValueError, match="IGMForm"):
            select_strategy(table, seq_len=4, modules=2, igm=flag)


# ---- CRM / IGM -----------------------------------------------------------------------


def make_model(seed: int = 0) -> TarFlow:
    torch.manual_seed(seed)
    cfg = TarFlowConfig(image_size=8, patch_size=2, width=64, blocks=3, layers=1, head_dim=32)
    model = TarFlow(cfg).eval()
    with torch.no_grad():
        for k, block in enumerate(model.blocks):
            block.proj_out.weight.normal_(0, 0.02 * (1 + 3 * (k == 1)))  # block 1 tougher
            block.proj_out.bias.normal_(0, 0.02)
    return model


def test_crm_igm_table_shapes_and_percentages():
    model = make_model()
    images = torch.randn(6, 1, 8, 8).clamp(-1, 1)
    labels = torch.tensor([0, 1, 2, 3, 4, -1])
    table = crm_igm_table(model, images, labels)
    assert [r.block for r in table] == [0, 1, 2]
    assert math.isclose(sum(r.crm_percent for r in table), 100.0, rel_tol=1e-9)
    assert max(table, key=lambda r: r.crm).block == 1
    for r in table:
        values = [r.crm, r.igm_paper_noise, r.igm_paper_zeros, r.igm_sample_noise,
                  r.igm_sample_zeros]
        assert all(math.isfinite(v) and v >= 0 for v in values)
        # The batch mean before the norm can only cancel: paper form <= per-sample form.
        assert r.igm_paper_noise <= r.igm_sample_noise + 1e-6
        assert r.igm_paper_zeros <= r.igm_sample_zeros + 1e-6
    text = format_table(table)
    assert text.count("\n") == 4 and "CRM %" in text
    with_cfg = crm_igm_table(model, images, labels, guidance=1.0)
    assert [r.crm for r in with_cfg] == [r.crm for r in table]  # CRM ignores guidance


def test_crm_matches_its_definition():
    model = make_model()
    images = torch.randn(5, 1, 8, 8)
    table = crm_igm_table(model, images)
    with torch.no_grad():
        traces = model.block_traces(images)
    d = model.config.token_dim
    for k, (block, t) in enumerate(zip(model.blocks, traces)):
        w = block.proj_out.weight.detach()
        expected = torch.linalg.norm((torch.exp(-t.a) * t.x).mean(0)) * torch.linalg.matrix_norm(
            w[:d], ord=2
        ) + torch.linalg.matrix_norm(w[d:], ord=2)
        assert math.isclose(table[k].crm, float(expected), rel_tol=1e-5)


def test_crm_of_fresh_model_is_uniform():
    table = crm_igm_table(TarFlow(TarFlowConfig(blocks=2, head_dim=32)), torch.randn(2, 1, 8, 8))
    assert [r.crm for r in table] == [0.0, 0.0]
    assert [r.crm_percent for r in table] == [50.0, 50.0]
    # Identity flow: F does not depend on x, so one Jacobi step is exact from any start.
    assert all(r.igm_sample_noise == 0.0 == r.igm_sample_zeros for r in table)


def test_igm_forms_on_constructed_errors():
    target = torch.zeros(2, 3, 4)
    # Opposite errors cancel in the batch mean (paper form) but not per sample.
    e = torch.ones(3, 4)
    pred = torch.stack([e, -e])
    assert igm_paper(pred, target) == 0.0
    assert math.isclose(igm_sample(pred, target), math.sqrt(12), rel_tol=1e-6)
    # Identical errors: the two forms agree.
    pred = torch.stack([e, e])
    assert math.isclose(igm_paper(pred, target), igm_sample(pred, target))


def test_igm_is_exact_from_the_true_input():
    # One Jacobi iterate of the inverse from x_true itself returns x_true (guidance 0).
    from fixedpoint.tarflow import BlockInverse

    model = make_model()
    images = torch.randn(4, 1, 8, 8)
    for k, t in enumerate(model.block_traces(images)):
        fmap = BlockInverse(model, k, t.z.detach())
        torch.testing.assert_close(fmap(t.x.detach()), t.x.detach(), rtol=1e-5, atol=1e-5)


# ---- the automatic strategy's objective ---------------------------------------------------


def test_objective_parses_its_spelling_and_orders_candidates():
    from fixedpoint.tarflow.strategy import Objective

    assert Objective("latency") is Objective.LATENCY
    assert Objective("wallclock") is Objective.WALLCLOCK
    with pytest.raises(ValueError):
        Objective("fast")
    # (steps, tokens, seconds): latency ranks steps first, tokens break ties; wall-clock
    # ranks the predicted seconds whatever the steps.
    few_wide, many_narrow, few_narrow = (4, 9000, 2.0), (30, 300, 0.5), (4, 600, 0.9)
    ranked = sorted([many_narrow, few_wide, few_narrow], key=lambda c: Objective.LATENCY.key(*c))
    assert ranked == [few_narrow, few_wide, many_narrow]
    ranked = sorted([many_narrow, few_wide, few_narrow],
                    key=lambda c: Objective.WALLCLOCK.key(*c))
    assert ranked == [many_narrow, few_narrow, few_wide]
    with pytest.raises(ValueError, match="predicted time"):
        Objective.WALLCLOCK.key(3, 10, None)


@pytest.mark.slow
def test_latency_objective_takes_the_fewest_steps_within_the_margin():
    """On a small random model: the latency choice meets margin x budget end to end on
    the calibration batch, never takes more steps than sequential, and each block's plan
    has the fewest steps among that block's candidates within its share."""
    from fixedpoint.tarflow.strategy import Objective
    from studies import auto_strategy as auto

    model = make_model(seed=1)
    K, T = model.config.blocks, model.config.seq_len
    kw = dict(calibration=2, tolerances=(1e-3, 1e-5))
    with pytest.raises(ValueError, match="cost model"):
        auto.choose(model, None, 1, [InitialGuess.NOISE] * K, **kw)
    out = auto.choose(model, None, 1, [InitialGuess.NOISE] * K,
                      objective=Objective.LATENCY, **kw)
    final = out["rounds"][-1]
    assert final["deviation"]["max_abs"] <= out["margin"] * auto.BUDGET
    assert out["calibration_totals"]["dependent_steps"] <= K * (T - 1)
    assert out["predicted_s"] is None  # no cost model given
    steps = [ch.steps for ch in out["choices"]]
    assert any(s < T - 1 for s in steps), "no block beat sequential on this model"
    z, y = auto.noise(model, 2, seed=auto.CALIBRATION_SEED)
    ref = auto.sample(model, z, y, auto.sequential_strategy(K))
    inputs = auto.block_inputs(model, ref)
    limit = out["margin"] * auto.BUDGET * final["share"]
    for k, ch in enumerate(out["choices"]):
        fmap = BlockInverse(model, k, inputs[k], y, guidance=auto.GUIDANCE)
        for tol in kw["tolerances"]:
            for method in auto.latency_candidates(T, tol):
                for init in InitialGuess:
                    r = fp.solve(fmap, init.start(inputs[k]), method)
                    err = float((r.x - ref.blocks[k].x).abs().max())
                    if r.converged.all() and err <= limit:
                        assert ch.steps <= r.dependent_steps, (k, method, init)


def test_uniform_probe_banded_newton_is_cheaper_and_reaches_sequential():
    """Newton with a banded Jacobian (every block) reaches the sequential samples like
    the dense one, with fewer directional derivatives."""
    from studies import auto_strategy as auto

    model = make_model(seed=1)
    rows = auto.uniform_probe(model, 2, tol=1e-5, bandwidths=(None, 1))
    by = {r["strategy"]: r for r in rows}
    assert list(by) == ["sequential", "jacobi", "newton", "newton (bandwidth 1)"]
    for label in ("newton", "newton (bandwidth 1)"):
        assert set(by[label]["status"]) == {"SUCCESS"}
        assert by[label]["deviation"]["max_abs"] < 1e-3
    assert by["newton (bandwidth 1)"]["token_evals"] < by["newton"]["token_evals"]


@pytest.mark.parametrize("bad", ["0", "-3", "wide"])
def test_auto_strategy_refuses_a_bad_bandwidth(bad, capsys):
    from studies import auto_strategy as auto

    with pytest.raises(SystemExit) as exc:
        auto.main(["--checkpoint", "x.pt", "--newton-bandwidth", bad])
    assert exc.value.code == 2
    assert "bandwidth" in capsys.readouterr().err
