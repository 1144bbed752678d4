"""TarFlow sampling: every solver reaches the sequential sample; the map is incremental.

Tolerance: float32, tiny models (T = 16 tokens, 4 blocks).  Different solvers evaluate
the network with different window shapes (one token, a module, all tokens), so attention
sums in a different order; the samples agree to ``|diff| <= ATOL + RTOL |x|`` with
``ATOL = RTOL = 1e-5`` (observed: ~1e-6 relative to values of size 1-7), far below what
a wrong solution gives (differences of order 0.1 - 1 for a non-converged iterate).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fixedpoint as fp
from fixedpoint.tarflow import (
    BlockInverse,
    InitialGuess,
    Sample,
    Strategy,
    TarFlow,
    TarFlowConfig,
    sample_sequential_naive,
)
from fixedpoint.tarflow.sampling import BlockInverseState

ATOL = 1e-5
RTOL = 1e-5
TINY = dict(image_size=8, channels=1, patch_size=2, width=64, blocks=4, layers=2, head_dim=32)


def make_model(seed: int = 0, **overrides) -> TarFlow:
    """Tiny model, small random non-zero out-projections and a non-trivial prior var."""
    torch.manual_seed(seed)
    model = TarFlow(TarFlowConfig(**{**TINY, **overrides})).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.proj_out.weight.normal_(0, 0.04)
            block.proj_out.bias.normal_(0, 0.04)
        model.var.uniform_(0.7, 1.3)
    return model



@pytest.fixture(scope="module")
def cond_model() -> TarFlow:
    return make_model()


@pytest.fixture(scope="module")
def uncond_model() -> TarFlow:
    return make_model(seed=1, num_classes=0)


def noise(batch: int = 3, seed: int = 5) -> torch.Tensor:
    return torch.randn(batch, 16, 4, generator=torch.Generator().manual_seed(seed))


METHODS = {
    "sequential": fp.Sequential(),
    "jacobi": fp.Jacobi(),
    "gsjacobi-4-divides": fp.GSJacobi(modules=4),
    "gsjacobi-5-not-dividing": fp.GSJacobi(modules=5),
    "gsjacobi-boundaries": fp.GSJacobi(modules=(0, 1, 9)),
    "triangular-anderson": fp.TriangularAnderson(),
    "anderson": fp.Anderson(atol=1e-6, max_iter=300),
}

GUIDANCE = {
    "no-cfg": dict(guidance=0.0),
    "cfg": dict(guidance=1.5),
    "cfg-annealed-temp": dict(guidance=2.0, anneal_guidance=True, uncond_temperature=1.4),
}


_SEQUENTIAL: dict[tuple[bool, str], torch.Tensor] = {}


def sequential_sample(model: TarFlow, conditional: bool, guide: str) -> torch.Tensor:
    key = (conditional, guide)
    if key not in _SEQUENTIAL:
        y = torch.tensor([3, -1, 7]) if conditional else None
        _SEQUENTIAL[key] = model.reverse(noise(), y, **GUIDANCE[guide]).x
    return _SEQUENTIAL[key]


CASES = [(True, g) for g in GUIDANCE] + [(False, "cfg-annealed-temp")]


@pytest.mark.parametrize(
    "conditional, guide", CASES, ids=[f"{'cond' if c else 'uncond'}-{g}" for c, g in CASES]
)
@pytest.mark.parametrize("name", list(METHODS), ids=list(METHODS))
def test_every_method_matches_sequential(cond_model, uncond_model, conditional, guide, name):
    model = cond_model if conditional else uncond_model
    y = torch.tensor([3, -1, 7]) if conditional else None
    kw = GUIDANCE[guide]
    seq = sequential_sample(model, conditional, guide)
    got = model.reverse(noise(), y, strategy=Strategy.uniform(METHODS[name], 4), **kw)
    assert all(r.status is fp.Status.SUCCESS for r in got.blocks), [r.status for r in got.blocks]
    torch.testing.assert_close(got.x, seq, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize(
    "spec", ["[1-4-4-16]", "[0/3-16/5-1/4-15]", "[2-3-6-15]"],
)
def test_exact_parsed_strategies_match_sequential(cond_model, spec):
    # Caps large enough for finite termination (module width / T - 1): exact solutions.
    y = torch.tensor([0, 1, 2])
    z = noise()
    seq = cond_model.reverse(z, y, guidance=1.0)
    for init in InitialGuess:
        strategy = Strategy.parse(spec, 4, 16, init=init)
        got = cond_model.reverse(z, y, guidance=1.0, strategy=strategy)
        torch.testing.assert_close(got.x, seq.x, rtol=RTOL, atol=ATOL)


def test_capped_strategy_reports_max_iter(cond_model):
    strategy = Strategy.parse("[1-2-2-3]", 4, 16)
    got = cond_model.reverse(noise(), strategy=strategy)
    assert [r.status for r in got.blocks] == [fp.Status.MAX_ITER] * 4
    assert [r.iterations for r in got.blocks] == [3, 4, 3, 3]


@pytest.mark.parametrize("conditional", [True, False], ids=["cond", "uncond"])
@pytest.mark.parametrize("guide", list(GUIDANCE), ids=list(GUIDANCE))
def test_sequential_equals_naive_reference_loop(cond_model, uncond_model, conditional, guide):
    model = cond_model if conditional else uncond_model
    y = torch.tensor([9, -1, 0]) if conditional else None
    kw = GUIDANCE[guide]
    z = noise()
    lean = model.reverse(z, y, **kw).x
    naive = sample_sequential_naive(
        model, z, y, kw["guidance"], anneal_guidance=kw.get("anneal_guidance", False),
        uncond_temperature=kw.get("uncond_temperature", 1.0),
    )
    torch.testing.assert_close(lean, naive, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("method", [fp.Sequential(), fp.GSJacobi(modules=3)])
def test_forward_of_sample_recovers_noise(cond_model, method):
    y = torch.tensor([1, 2, -1])
    z = noise()
    sample = cond_model.reverse(z, y, strategy=Strategy.uniform(method, 4))
    with torch.no_grad():
        z_back, _ = cond_model(sample.x, y)
    # reverse scales the standard normal noise by sqrt(var) before inverting.
    torch.testing.assert_close(z_back, z * cond_model.var.sqrt(), rtol=RTOL, atol=ATOL)


def test_sample_structure_and_inputs_untouched(cond_model):
    z = noise()
    z_copy = z.clone()
    s = cond_model.reverse(z, torch.tensor([1, 2, 3]), denoise=True, trace=True)
    assert torch.equal(z, z_copy)
    assert isinstance(s, Sample) and s.x.shape == (3, 1, 8, 8)
    assert len(s.blocks) == 4 and all(isinstance(r, fp.Result) for r in s.blocks)
    assert len(s.intermediates) == 4 + 2  # noise, one per block, denoised
    assert torch.equal(s.intermediates[-1], s.x)
    # T = 16 positions; x_0 = z_0 needs no network call, so 15 dependent steps.
    assert all(r.iterations == 16 and r.dependent_steps == 15 for r in s.blocks)
    assert s.blocks[0].trace is not None


def test_denoise_on_identity_flow_is_tweedie_for_a_standard_normal():
    model = TarFlow(TarFlowConfig(**TINY, noise_std=0.3))  # fresh: identity flow, var = 1
    z = noise()
    s = model.reverse(z, denoise=True)
    # log p(x) = -|x|^2 / 2 => x + sigma^2 grad log p = (1 - sigma^2) x.
    torch.testing.assert_close(s.x, (1 - 0.09) * model.unpatchify(z), rtol=0, atol=1e-6)


def test_reference_trace_is_in_the_permuted_order(cond_model):
    z = noise()
    seq = cond_model.reverse(z)
    # Original-order per-block solutions, built from the sequential sample's results.
    originals = [cond_model.blocks[k].permute(r.x) for k, r in enumerate(seq.blocks)]
    for reference in (seq, originals):
        got = cond_model.reverse(z, strategy=Strategy.uniform(fp.Jacobi(), 4), trace=True,
                                 reference=reference)
        for r in got.blocks:
            errors = torch.stack([row.error for row in r.trace])
            assert errors[-1].max() < ATOL  # converged onto the reference
            assert errors[0].max() > 1e-3  # ... from a start that was not there


def test_strategy_block_count_must_match(cond_model):
    with pytest.raises(ValueError, match="3 block plans, the model 4"):
        cond_model.reverse(noise(), strategy=Strategy.uniform(fp.Jacobi(), 3))


def test_autocast_bfloat16_sampling_runs_and_is_close(cond_model):
    z = noise()
    ref = cond_model.reverse(z, torch.tensor([1, 2, 3]), guidance=1.0).x
    with torch.autocast("cpu", dtype=torch.bfloat16):
        seq = cond_model.reverse(z, torch.tensor([1, 2, 3]), guidance=1.0)
        floor = fp.noise_floor(torch.bfloat16)  # a tolerance bf16 can resolve
        jac = cond_model.reverse(z, torch.tensor([1, 2, 3]), guidance=1.0,
                                 strategy=Strategy.uniform(fp.Jacobi(atol=floor), 4))
    assert seq.x.dtype == torch.float32
    torch.testing.assert_close(seq.x, ref, rtol=0, atol=0.1)
    torch.testing.assert_close(jac.x, seq.x, rtol=0, atol=0.1)


# ---- the map itself ------------------------------------------------------------------


def make_map(model: TarFlow, block: int = 1, guidance: float = 1.5, y=None) -> BlockInverse:
    z = noise(seed=11)
    return BlockInverse(model, block, z, y, guidance=guidance, anneal_guidance=True,
                        uncond_temperature=1.2)


# Windows (lo, hi) as a solver would issue them: committed <= lo always.
SCHEDULES = {
    "sequential": [(t, t + 1) for t in range(16)],
    "jacobi-repeat": [(0, 16), (0, 16), (3, 16), (3, 16), (10, 16), (16, 16)],
    "modules-uneven": [(0, 6), (0, 6), (2, 6), (6, 11), (6, 11), (7, 11), (11, 16), (13, 16)],
    "empty-and-single": [(0, 0), (0, 1), (1, 1), (1, 5), (4, 4), (4, 16), (15, 16)],
}


@pytest.mark.parametrize("guidance", [0.0, 1.5])
@pytest.mark.parametrize("schedule", list(SCHEDULES), ids=list(SCHEDULES))
def test_advance_equals_full_evaluation(cond_model, schedule, guidance):
    y = torch.tensor([4, -1, 2])
    fmap = make_map(cond_model, guidance=guidance, y=y)
    torch.manual_seed(0)
    x = torch.randn(3, 16, 4)
    state = fmap.init_state(x)
    assert isinstance(state, BlockInverseState)
    for lo, hi in SCHEDULES[schedule]:
        # Between calls the solver may change anything at or after lo; never before.
        x = x.clone()
        x[:, lo:] = torch.randn_like(x[:, lo:])
        x_copy = x.clone()
        got = fmap.advance(state, x, lo, hi)
        assert torch.equal(x, x_copy)
        assert fmap.committed(state) == lo
        torch.testing.assert_close(got, fmap(x)[:, lo:hi], rtol=0, atol=ATOL)


@st.composite
def window_schedules(draw) -> list[tuple[int, int]]:
    """Random solver-like call sequences: lo never decreases, lo <= hi <= T."""
    lo, out = 0, []
    for _ in range(draw(st.integers(1, 8))):
        lo = draw(st.integers(lo, 16))
        out.append((lo, draw(st.integers(lo, 16))))
    return out


@settings(deadline=None)  # example count: the project profile (tests/conftest.py)
@given(schedule=window_schedules(), seed=st.integers(0, 2**16))
def test_advance_equals_full_evaluation_on_random_schedules(cond_model, schedule, seed):
    fmap = make_map(cond_model, guidance=0.7, y=torch.tensor([4, -1, 2]))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 16, 4, generator=gen)
    state = fmap.init_state(x)
    for lo, hi in schedule:
        x = x.clone()
        x[:, lo:] = torch.randn(x[:, lo:].shape, generator=gen)
        got = fmap.advance(state, x, lo, hi)
        torch.testing.assert_close(got, fmap(x)[:, lo:hi], rtol=0, atol=ATOL)


def test_advance_rejects_bad_windows(cond_model):
    fmap = make_map(cond_model)
    x = noise()
    state = fmap.init_state(x)
    fmap.advance(state, x, 4, 8)
    with pytest.raises(ValueError, match="committed <= lo"):
        fmap.advance(state, x, 3, 8)
    with pytest.raises(ValueError, match="committed <= lo"):
        fmap.advance(state, x, 5, 17)


def test_map_is_strictly_causal_and_position_zero_is_noise(cond_model):
    fmap = make_map(cond_model, y=torch.tensor([0, 1, 2]))
    x = torch.randn(3, 16, 4)
    fp.check_causal(fmap, x)
    assert torch.equal(fmap(x)[:, 0], fmap.z[:, 0])


def test_cfg_is_one_batched_network_call(cond_model):
    fmap = make_map(cond_model, guidance=1.0)
    calls = []
    hook = cond_model.blocks[1].proj_in.register_forward_hook(
        lambda mod, inp, out: calls.append(inp[0].shape[0])
    )
    try:
        x = noise()
        fmap(x)
        state = fmap.init_state(x)
        fmap.advance(state, x, 0, 16)
    finally:
        hook.remove()
    assert calls == [6, 6]  # 2B rows per call, one call each
    assert fmap.init_state(x).cache.batch == 6


def test_token_evals_of_sequential_is_one_pass(cond_model):
    s = cond_model.reverse(noise(), strategy=None)
    # Inputs 0..T-2 each pushed once per sample: (T - 1) * B.
    assert all(r.token_evals == 15 * 3 for r in s.blocks)
