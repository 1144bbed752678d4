"""TarFlow sampling: every solver reaches the sequential sample; the map is incremental.

Tolerance: float32, tiny models (T = 16 tokens, 4 blocks).  Different solvers evaluate
the network with different window shapes (one token, a module, all tokens), so attention
sums in a different order; the samples agree to ``|diff| <= ATOL + RTOL |x|`` with
``ATOL = RTOL = 1e-5`` (observed: ~1e-6 relative to values of size 1-7), far below what
a wrong solution gives (differences of order 0.1 - 1 for a non-converged iterate).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fixedpoint as fp
from fixedpoint.tarflow import (
    BlockInverse,
    InitialGuess,
    NonFiniteSampleError,
    Sample,
    SamplingError,
    SequentialDecoder,
    Strategy,
    TarFlow,
    TarFlowConfig,
    denoise_step,
    reverse,
    sample_sequential,
    sample_sequential_naive,
)
from fixedpoint.tarflow.inverse import BlockInverseState
from fixedpoint.tarflow.model import DecodeCache, decode_step

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
    "anderson": fp.Anderson(max_iter=300),
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
        _SEQUENTIAL[key] = reverse(model, noise(), y, **GUIDANCE[guide]).images
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
    got = reverse(model, noise(), y, strategy=Strategy.uniform(METHODS[name], 4), **kw)
    assert all(r.status is fp.Status.SUCCESS for r in got.blocks), [r.status for r in got.blocks]
    torch.testing.assert_close(got.images, seq, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize(
    "spec", ["[1-4-4-16]", "[0/3-16/5-1/4-15]", "[2-3-6-15]"],
)
def test_exact_parsed_strategies_match_sequential(cond_model, spec):
    # Caps large enough for finite termination (module width / T - 1): exact solutions.
    y = torch.tensor([0, 1, 2])
    z = noise()
    seq = reverse(cond_model, z, y, guidance=1.0)
    for init in InitialGuess:
        strategy = Strategy.parse(spec, 4, 16, init=init)
        got = reverse(cond_model, z, y, guidance=1.0, strategy=strategy)
        torch.testing.assert_close(got.images, seq.images, rtol=RTOL, atol=ATOL)


def test_capped_strategy_reports_max_iter(cond_model):
    strategy = Strategy.parse("[1-2-2-3]", 4, 16)
    got = reverse(cond_model, noise(), strategy=strategy)
    assert [r.status for r in got.blocks] == [fp.Status.MAX_ITER] * 4
    assert [r.iterations for r in got.blocks] == [3, 4, 3, 3]


@pytest.mark.parametrize("conditional", [True, False], ids=["cond", "uncond"])
@pytest.mark.parametrize("guide", list(GUIDANCE), ids=list(GUIDANCE))
def test_sequential_equals_naive_reference_loop(cond_model, uncond_model, conditional, guide):
    model = cond_model if conditional else uncond_model
    y = torch.tensor([9, -1, 0]) if conditional else None
    kw = GUIDANCE[guide]
    z = noise()
    lean = reverse(model, z, y, **kw).images
    naive = sample_sequential_naive(
        model, z, y, kw["guidance"], anneal_guidance=kw.get("anneal_guidance", False),
        uncond_temperature=kw.get("uncond_temperature", 1.0),
    )
    torch.testing.assert_close(lean, naive, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("method", [fp.Sequential(), fp.GSJacobi(modules=3)])
def test_forward_of_sample_recovers_noise(cond_model, method):
    y = torch.tensor([1, 2, -1])
    z = noise()
    sample = reverse(cond_model, z, y, strategy=Strategy.uniform(method, 4))
    with torch.no_grad():
        z_back, _ = cond_model(sample.images, y)
    # reverse scales the standard normal noise by sqrt(var) before inverting.
    torch.testing.assert_close(z_back, z * cond_model.var.sqrt(), rtol=RTOL, atol=ATOL)


def test_sample_structure_and_inputs_untouched(cond_model):
    z = noise()
    z_copy = z.clone()
    s = reverse(cond_model, z, torch.tensor([1, 2, 3]), denoise=True, trace=True)
    assert torch.equal(z, z_copy)
    assert isinstance(s, Sample) and s.images.shape == (3, 1, 8, 8)
    assert len(s.blocks) == 4 and all(isinstance(r, fp.Result) for r in s.blocks)
    assert len(s.intermediates) == 4 + 2  # noise, one per block, denoised
    assert torch.equal(s.intermediates[-1], s.images)
    # T = 16 positions; x_0 = z_0 needs no network call, so 15 dependent steps.
    assert all(r.iterations == 16 and r.dependent_steps == 15 for r in s.blocks)
    assert s.blocks[0].trace is not None


def test_denoise_on_identity_flow_is_tweedie_for_a_standard_normal():
    model = TarFlow(TarFlowConfig(**TINY, noise_std=0.3))  # fresh: identity flow, var = 1
    z = noise()
    s = reverse(model, z, denoise=True)
    # log p(x) = -|x|^2 / 2 => x + sigma^2 grad log p = (1 - sigma^2) x.
    torch.testing.assert_close(s.images, (1 - 0.09) * model.unpatchify(z), rtol=0, atol=1e-6)


def test_reference_is_read_in_the_permuted_order_whatever_its_type(cond_model):
    z = noise()
    seq = reverse(cond_model, z)
    permuted = [r.x for r in seq.blocks]
    assert all(torch.equal(a, b) for a, b in zip(permuted, seq.permuted_solutions))
    # Blocks 1 and 3 reverse the token order: there the two orders really differ.
    assert not torch.equal(cond_model.blocks[1].permute(permuted[1]), permuted[1])
    for reference in (seq, permuted, tuple(permuted)):
        got = reverse(cond_model, z, strategy=Strategy.uniform(fp.Jacobi(), 4), trace=True,
                      reference_permuted=reference)
        for r in got.blocks:
            errors = torch.stack([row.error for row in r.trace])
            assert errors[-1].max() < ATOL  # converged onto the reference
            assert errors[0].max() > 1e-3  # ... from a start that was not there


def test_reference_in_the_original_order_is_not_what_the_solver_converges_to(cond_model):
    z = noise()
    seq = reverse(cond_model, z)
    originals = [cond_model.blocks[k].permute(r.x) for k, r in enumerate(seq.blocks)]
    got = reverse(cond_model, z, strategy=Strategy.uniform(fp.Jacobi(), 4), trace=True,
                  reference_permuted=originals)
    final = [float(r.trace[-1].error.max()) for r in got.blocks]
    assert final[0] < ATOL and final[2] < ATOL  # identity order: same tensors
    assert final[1] > 1e-2 and final[3] > 1e-2  # reversed order: read as permuted


def test_deprecated_reference_name_takes_a_sample_only(cond_model):
    z = noise()
    seq = reverse(cond_model, z)
    got = reverse(cond_model, z, strategy=Strategy.uniform(fp.Jacobi(), 4), trace=True,
                  reference=seq)
    assert all(float(r.trace[-1].error.max()) < ATOL for r in got.blocks)
    with pytest.raises(TypeError, match="reference_permuted"):
        reverse(cond_model, z, reference=seq.permuted_solutions)
    with pytest.raises(TypeError, match="reference_permuted only"):
        reverse(cond_model, z, reference=seq, reference_permuted=seq)
    with pytest.raises(ValueError, match="3 entries, the model 4"):
        reverse(cond_model, z, reference_permuted=seq.permuted_solutions[:3])


def test_strategy_block_count_must_match(cond_model):
    with pytest.raises(ValueError, match="3 block plans, the model 4"):
        reverse(cond_model, noise(), strategy=Strategy.uniform(fp.Jacobi(), 3))


def test_autocast_bfloat16_sampling_runs_and_is_close(cond_model):
    z = noise()
    ref = reverse(cond_model, z, torch.tensor([1, 2, 3]), guidance=1.0).images
    with torch.autocast("cpu", dtype=torch.bfloat16):
        seq = reverse(cond_model, z, torch.tensor([1, 2, 3]), guidance=1.0)
        # The default tolerance: the bfloat16 rounding level at the iterate's scale.
        jac = reverse(cond_model, z, torch.tensor([1, 2, 3]), guidance=1.0,
                      strategy=Strategy.uniform(fp.Jacobi(), 4))
    assert seq.images.dtype == torch.float32
    torch.testing.assert_close(seq.images, ref, rtol=0, atol=0.1)
    torch.testing.assert_close(jac.images, seq.images, rtol=0, atol=0.1)


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
    s = reverse(cond_model, noise(), strategy=None)
    # Inputs 0..T-2 each pushed once per sample: (T - 1) * B.
    assert all(r.token_evals == 15 * 3 for r in s.blocks)


# ---- the failure contract --------------------------------------------------------------


def overflowing_noise() -> torch.Tensor:
    z = noise()
    z[1, 3] = 1e38  # finite noise that overflows inside the network (sample 1 only)
    return z


FAILING = {"sequential": fp.Sequential(), "jacobi": fp.Jacobi(), "anderson": fp.Anderson()}


@pytest.mark.parametrize("name", list(FAILING), ids=list(FAILING))
def test_a_failed_block_raises_naming_the_block_status_and_cause(cond_model, name):
    strategy = Strategy.uniform(FAILING[name], 4)
    with pytest.raises(SamplingError) as info:
        reverse(cond_model, overflowing_noise(), strategy=strategy)
    message = str(info.value)
    assert "\n" not in message  # one line, for the command line
    # Block 3 is inverted first; the cause is the core's status message.
    assert message.startswith(
        "block 3: NONFINITE: the map produced a non-finite value (overflow or NaN) in 1 of 3 "
        "samples (1)"), message
    assert info.value.block == 3
    assert info.value.result.sample_status[1] is fp.Status.NONFINITE


@pytest.mark.parametrize("name", list(FAILING), ids=list(FAILING))
def test_throw_false_returns_every_blocks_status_and_spares_the_other_samples(cond_model, name):
    strategy = Strategy.uniform(FAILING[name], 4)
    clean = reverse(cond_model, noise(), strategy=strategy)
    s = reverse(cond_model, overflowing_noise(), strategy=strategy, throw=False)
    assert len(s.blocks) == 4 and s.statuses[3] is fp.Status.NONFINITE
    assert 3 in s.failed_blocks and s.failed_samples == [1]
    # The core keeps a failed sample's last finite iterate: nothing non-finite is passed
    # on, and the samples that did not fail are those of a clean run.
    assert all(torch.isfinite(r.x).all() for r in s.blocks)
    torch.testing.assert_close(s.images[[0, 2]], clean.images[[0, 2]], rtol=RTOL, atol=ATOL)


def test_capped_strategies_are_not_failures(cond_model):
    s = reverse(cond_model, noise(), strategy=Strategy.parse("[1-2-2-3]", 4, 16))
    assert s.statuses == (fp.Status.MAX_ITER,) * 4 and s.failed_blocks == []


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_guidance_and_noise_are_refused_up_front(cond_model, bad):
    with pytest.raises(ValueError, match="guidance must be a finite number"):
        reverse(cond_model, noise(), guidance=bad)
    z = noise()
    z[0, 0, 0] = bad
    with pytest.raises(ValueError, match="the noise z has 1 non-finite entries"):
        reverse(cond_model, z)
    with pytest.raises(ValueError, match="uncond_temperature"):
        reverse(cond_model, noise(), guidance=1.0, uncond_temperature=bad)


# ---- honest costs ---------------------------------------------------------------------


@pytest.mark.parametrize("guidance", [0.0, 1.5], ids=["no-cfg", "cfg"])
def test_sequential_bills_t_minus_1_steps_and_the_rows_it_runs(cond_model, guidance):
    s = reverse(cond_model, noise(), torch.tensor([1, 2, 3]), guidance=guidance)
    rows = 2 if guidance else 1
    for r in s.blocks:
        assert r.dependent_steps == 15  # x_0 = z_0 needs no network call
        assert r.token_evals == rows * 3 * 15


COUNTED = {
    "sequential": fp.Sequential(),
    "jacobi": fp.Jacobi(),
    "gsjacobi": fp.GSJacobi(modules=3),
    "triangular-anderson": fp.TriangularAnderson(),
    "anderson": fp.Anderson(max_iter=40),
}


@pytest.mark.parametrize("guidance", [0.0, 1.5], ids=["no-cfg", "cfg"])
@pytest.mark.parametrize("name", list(COUNTED), ids=list(COUNTED))
def test_token_evals_are_the_rows_the_network_really_processed(cond_model, name, guidance):
    processed = []  # rows x positions entering each block's network, per call
    hooks = [
        block.proj_in.register_forward_hook(
            lambda mod, inp, out: processed.append(inp[0].shape[0] * inp[0].shape[1]))
        for block in cond_model.blocks
    ]
    try:
        s = reverse(cond_model, noise(), torch.tensor([1, 2, 3]), guidance=guidance,
                    strategy=Strategy.uniform(COUNTED[name], 4))
    finally:
        for h in hooks:
            h.remove()
    assert sum(r.token_evals for r in s.blocks) == sum(processed)
    # Every network call is one dependent step (the hook sees one call per step).
    assert sum(r.dependent_steps for r in s.blocks) == len(processed)


def test_default_jacobi_takes_fewer_dependent_steps_than_sequential(cond_model):
    y = torch.tensor([1, 2, 3])
    seq = reverse(cond_model, noise(), y, guidance=1.0)
    jac = reverse(cond_model, noise(), y, guidance=1.0,
                  strategy=Strategy.uniform(fp.Jacobi(), 4))
    assert jac.statuses == (fp.Status.SUCCESS,) * 4
    assert (sum(r.dependent_steps for r in jac.blocks)
            < sum(r.dependent_steps for r in seq.blocks))
    torch.testing.assert_close(jac.images, seq.images, rtol=RTOL, atol=ATOL)


def test_any_method_written_outside_the_package_samples_the_flow(cond_model):
    @dataclasses.dataclass(frozen=True)
    class Damped(fp.PrefixMethod):  # damped Jacobi, the package has never heard of it
        atol: float | None = None
        rtol: float | None = None
        damping: float = 0.6

        def proposer(self, problem, lo0, hi):
            return self

        def propose(self, x_old, f, lo, unfrozen, first):
            return x_old + self.damping * (f - x_old)

    strategy = Strategy.uniform(Damped(damping=0.7), 4)
    assert strategy.plans[0].describe() == "Damped(damping=0.7), init z"
    seq = reverse(cond_model, noise())
    got = reverse(cond_model, noise(), strategy=strategy)
    assert got.statuses == (fp.Status.SUCCESS,) * 4
    torch.testing.assert_close(got.images, seq.images, rtol=RTOL, atol=ATOL)


def test_block_inverse_arguments(cond_model):
    z = noise()
    fmap = BlockInverse(cond_model, np.int64(1), z, guidance=np.float32(1.5))
    assert fmap.block_index == 1 and fmap.flow_block is cond_model.blocks[1]
    assert fmap.rows_per_sample == 2 and BlockInverse(cond_model, 0, z).rows_per_sample == 1
    for bad in (4, -1, 1.0, True):
        with pytest.raises(ValueError, match=r"block_index must be an int in \[0, 4\)"):
            BlockInverse(cond_model, bad, z)
    with pytest.raises(ValueError, match=r"z must have shape \(B, 16, 4\)"):
        BlockInverse(cond_model, 0, z[:, :8])


# ---- the fast sequential sampler --------------------------------------------------------
#
# SequentialDecoder computes the same network as the oracle loop in a different order of
# floating-point operations (addmm on transposed weights, one lerp for the guided
# combination, fused addcmul, attention over a cache slice or over the whole cache under
# a mask), so the images agree to float32 rounding, not bit for bit: the same
# |diff| <= ATOL + RTOL |x| with ATOL = RTOL = 1e-5 as every other sampler here (observed
# <= 3.1e-6 on values of size up to 4, i.e. a few ulp after four blocks; a wrong token,
# cache entry or guidance weight moves the images by 1e-2 or more).

FAST_SHAPES = {"eager": dict(fixed_shape=False), "fixed-shape": dict(fixed_shape=True)}


@pytest.mark.parametrize("shape", list(FAST_SHAPES), ids=list(FAST_SHAPES))
@pytest.mark.parametrize(
    "conditional, guide", CASES + [(False, "no-cfg")],
    ids=[f"{'cond' if c else 'uncond'}-{g}" for c, g in CASES + [(False, "no-cfg")]],
)
def test_fast_sequential_equals_naive_reference_loop(cond_model, uncond_model, conditional,
                                                     guide, shape):
    model = cond_model if conditional else uncond_model
    y = torch.tensor([9, -1, 0]) if conditional else None
    kw = GUIDANCE[guide]
    z = noise()
    z_copy = z.clone()
    fast = SequentialDecoder(model, **FAST_SHAPES[shape])(z, y, **kw)
    naive = sample_sequential_naive(
        model, z, y, kw["guidance"], anneal_guidance=kw.get("anneal_guidance", False),
        uncond_temperature=kw.get("uncond_temperature", 1.0),
    )
    assert torch.equal(z, z_copy)  # the noise is never modified
    assert fast.shape == (3, 1, 8, 8) and fast.dtype == torch.float32
    torch.testing.assert_close(fast, naive, rtol=RTOL, atol=ATOL)


def test_fast_sequential_equals_reverse_and_is_reusable(cond_model):
    y = torch.tensor([4, 5, -1])
    decoder = SequentialDecoder(cond_model)
    for seed in (5, 6):  # one decoder, two calls, different noise: no state leaks
        z = noise(seed=seed)
        got = decoder(z, y, guidance=1.5)
        torch.testing.assert_close(got, reverse(cond_model, z, y, guidance=1.5).images,
                                   rtol=RTOL, atol=ATOL)
    # A plain function of the same: accepts image-shaped noise too.
    img_noise = cond_model.unpatchify(noise())
    torch.testing.assert_close(sample_sequential(cond_model, img_noise, y, guidance=1.5),
                               decoder(noise(), y, guidance=1.5), rtol=0, atol=0)


def test_fixed_shape_step_reads_the_same_as_the_sliced_step(cond_model):
    """One decode step at a position: attending to all T cached keys under the causal
    mask row equals attending to the first position + 1 keys (the compile-ready form
    computes the same thing as the eager one)."""
    block = cond_model.blocks[1]
    p = block.decode_params()
    g = torch.Generator().manual_seed(3)
    rows = 4
    cache = DecodeCache.allocate(cond_model.config, rows)
    cache.kv.normal_(generator=g)  # keys past the position must not matter
    sliced = DecodeCache(cache.kv.clone())
    x_t = torch.randn(2, 4, generator=g)
    emb_t = torch.randn(2, 1, 64, generator=g)
    for t in (0, 7, 15):
        pos = torch.tensor([t])
        with torch.no_grad():
            full = decode_step(p, x_t, emb_t, cache, pos, length=None)
            part = decode_step(p, x_t, emb_t, sliced, pos, length=t + 1)
        assert full.shape == (rows, 8)
        torch.testing.assert_close(full, part, rtol=1e-6, atol=1e-6)
        # The same writes: layer 0 from the same input, later layers up to rounding.
        assert torch.equal(cache.kv[0], sliced.kv[0])
        torch.testing.assert_close(cache.kv, sliced.kv, rtol=1e-6, atol=1e-6)


def test_fast_decode_step_is_the_network_on_one_token(cond_model):
    """decode_step on each position in turn equals MetaBlock.network on all tokens."""
    block = cond_model.blocks[0]
    p = block.decode_params()
    z = noise()
    cls = block.class_vector(torch.tensor([1, 2, 3]), 3)
    emb = block.embedding(cls)  # (3, T, W)
    with torch.no_grad():
        full = block.network(z, emb)
        cache = DecodeCache.allocate(cond_model.config, 3)
        steps = [decode_step(p, z[:, t], emb[None, :, t], cache, torch.tensor([t]),
                             length=t + 1) for t in range(16)]
    torch.testing.assert_close(torch.stack(steps, 1), full, rtol=RTOL, atol=ATOL)


def test_fast_sequential_checks_its_inputs_and_failures(cond_model):
    decoder = SequentialDecoder(cond_model)
    with pytest.raises(ValueError, match="guidance must be a finite number"):
        decoder(noise(), guidance=float("nan"))
    with pytest.raises(ValueError, match="uncond_temperature"):
        decoder(noise(), guidance=1.0, uncond_temperature=0.0)
    bad = noise()
    bad[0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="the noise z has 1 non-finite entries"):
        decoder(bad)
    with pytest.raises(ValueError, match=r"z must be tokens \(B, 16, 4\)"):
        decoder(noise()[:, :8])
    with pytest.raises(ValueError, match="labels must be in"):
        decoder(noise(), torch.tensor([0, 1, 10]))
    # Never passed on silently: a block that overflows raises, naming block and samples.
    with pytest.raises(SamplingError) as info:
        decoder(overflowing_noise())
    assert isinstance(info.value, NonFiniteSampleError)
    assert str(info.value).startswith(
        "block 3: NONFINITE: the map produced a non-finite value (overflow or NaN) in 1 of 3 "
        "samples (1)"), str(info.value)
    assert info.value.block == 3 and info.value.samples == [1]


def test_fast_sequential_output_works_with_autograd_and_bfloat16(cond_model):
    y = torch.tensor([1, 2, 3])
    img = sample_sequential(cond_model, noise(), y, guidance=1.0)
    assert not img.is_inference()
    denoised = denoise_step(cond_model, img, y)  # autograd through the model on it
    assert torch.isfinite(denoised).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = sample_sequential(cond_model, noise(), y, guidance=1.0)
    assert low.dtype == torch.float32
    # bfloat16 rounding moves the samples (as for reverse, see the autocast test above)
    # but not by a wrong-solution amount.
    torch.testing.assert_close(low, img, rtol=0, atol=0.1)
    assert float((low - img).abs().max()) > 0  # bfloat16 really ran


def test_compile_options_reach_torch_compile_with_fixed_shapes_and_static_buffers(
        cond_model, monkeypatch):
    """The wiring of the compile-ready path (the compiler itself is not run here: it
    takes minutes on this CPU): the options go to torch.compile, the steps get fixed
    shapes (no Python int length), the buffers are kept per batch shape and marked
    static, and the samples are the eager ones."""
    calls, lengths = [], []

    def fake_compile(fn, **options):
        calls.append(options)

        def wrapped(*args):
            lengths.append(args[-1])
            return fn(*args)

        return wrapped

    monkeypatch.setattr(torch, "compile", fake_compile)
    static = []
    monkeypatch.setattr(torch._dynamo, "mark_static_address", static.append)
    decoder = SequentialDecoder(cond_model, compile_options={"mode": "reduce-overhead"})
    assert calls == [{"mode": "reduce-overhead"}] and decoder.fixed_shape
    y = torch.tensor([1, 2, 3])
    first = decoder(noise(), y, guidance=1.5)
    assert lengths and set(lengths) == {None}
    assert len(static) == 2 * 4  # (xs, cache) per block, allocated once
    second = decoder(noise(seed=8), y, guidance=1.5)
    assert len(static) == 2 * 4  # reused at the second call
    eager = SequentialDecoder(cond_model)
    torch.testing.assert_close(first, eager(noise(), y, guidance=1.5), rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(second, eager(noise(seed=8), y, guidance=1.5), rtol=RTOL,
                               atol=ATOL)
