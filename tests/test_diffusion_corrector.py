"""Chen et al.'s parallel Langevin corrector: the chain, the sampler, its parallel solves."""

from __future__ import annotations

import math

import mpmath as mp
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fixedpoint as fp
from fixedpoint import testing as fpt
from fixedpoint.diffusion import (
    ChainSegment,
    CorrectorNoise,
    DDIMChain,
    EulerChain,
    GaussianMixture,
    HeunChain,
    LangevinChain,
    MarkovMap,
    MixtureDenoiser,
    NoiseSchedule,
    PhaseSpaceDenoiser,
    PicardMap,
    predictor_corrector,
    sample_loop,
    solve_chain,
)

SCHEDULE = NoiseSchedule.default()
EXACT = dict(atol=0.0, rtol=0.0)
# Each example runs two whole predictor-corrector samplers: half the profile's count.
EXAMPLES = max(10, settings.default.max_examples // 2)


def oracle(dim=4, components=3, seed=0, std=0.2):
    mixture = GaussianMixture.random(dim, components=components, seed=seed, std=std)
    return mixture, MixtureDenoiser(mixture, SCHEDULE.alphas_cumprod)


# ------------------------------------------------------------- the plain reference loop
def exact_ou_step(h: float, gamma: float):
    """The underdamped step's matrices from matrix exponentials (Van Loan), not from the
    closed forms in the module: state (x, v), dY = M Y dt + (0, s) dt + (0, sqrt(2g)) dB.
    Returns (Phi, force column, noise factor L) with noise = L @ (z_v, z_x).  In 40-digit
    arithmetic (mpmath, a dependency of torch): in float64 the position noise of a short
    step, a difference of nearly equal covariance terms, keeps only about 7 digits."""
    mp.mp.dps = 40
    m = mp.matrix([[0, 1], [0, -gamma]])
    aug = mp.zeros(4, 4)
    q = mp.zeros(4, 4)
    for i in range(2):
        aug[i, 2 + i] = 1
        for j in range(2):
            aug[i, j] = m[i, j]
            q[i, j] = -m[i, j]
            q[2 + i, 2 + j] = m[j, i]
    q[1, 3] = 2 * mp.mpf(gamma)
    e = mp.expm(aug * h)
    ev = mp.expm(q * h)
    f22 = mp.matrix([[ev[2, 2], ev[2, 3]], [ev[3, 2], ev[3, 3]]])
    f12 = mp.matrix([[ev[0, 2], ev[0, 3]], [ev[1, 2], ev[1, 3]]])
    cov = f22.T * f12
    swapped = mp.matrix([[cov[1, 1], cov[1, 0]], [cov[0, 1], cov[0, 0]]])  # order (v, x)
    chol = mp.cholesky(swapped)  # v uses z_v alone

    def tensor(a, rows, cols):
        return torch.tensor([[float(a[i, j]) for j in cols] for i in rows], dtype=torch.float64)

    phi = tensor(e, range(2), range(2))
    force = tensor(e, range(2), (3,))[:, 0]
    return phi, force, tensor(chol, range(2), range(2))


def langevin_loop(mixture, abar, x, v, noise, step_size, friction):
    """Underdamped Langevin at one noise level, written as a plain for loop."""
    sigma = math.sqrt(1 - abar)
    phi, force, chol = exact_ou_step(step_size * sigma, friction / sigma)
    level = torch.full((x.shape[0],), abar, dtype=torch.float64)
    for k in range(noise.shape[1]):
        score = -mixture.eps(x, level) / sigma
        zx, zv = noise[:, k, 0], noise[:, k, 1]
        x, v = (
            phi[0, 0] * x + phi[0, 1] * v + force[0] * score + chol[1, 0] * zv + chol[1, 1] * zx,
            phi[1, 0] * x + phi[1, 1] * v + force[1] * score + chol[0, 0] * zv,
        )
    return x, v


@pytest.mark.parametrize("step_size,friction", [(0.25, 2.0), (0.01, 0.5), (1.5, 3.0)])
@pytest.mark.parametrize("form", [MarkovMap, PicardMap])
def test_sequential_corrector_equals_a_plain_langevin_loop(step_size, friction, form):
    mixture, den = oracle(dim=5, components=4, seed=3)
    t = 400
    abar = float(SCHEDULE.alphas_cumprod[t].double())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, generator=g, dtype=torch.float64)
    v = torch.randn(3, 5, generator=g, dtype=torch.float64)
    noise = torch.randn(3, 7, 2, 5, generator=g, dtype=torch.float64)
    chain = LangevinChain(t, abar, 7, step_size=step_size, friction=friction)
    state = torch.stack([x, v], 1)
    fmap = form(chain, PhaseSpaceDenoiser(den), state, noise)
    out = solve_chain(fmap, fp.Sequential()).sample
    loop = sample_loop(chain, PhaseSpaceDenoiser(den), state, noise)
    rx, rv = langevin_loop(mixture, abar, x, v, noise, step_size, friction)
    for got in (out, loop):
        assert float((got[:, 0] - rx).abs().max()) <= 1e-12
        assert float((got[:, 1] - rv).abs().max()) <= 1e-12
    assert fmap.count.calls == 7  # one dependent network call per step
    if form is MarkovMap:  # (the Picard form also re-reads the state committed last)
        assert fmap.count.rows == 3 * 7


def test_the_corrector_relaxes_to_the_noisy_marginal():
    """One Gaussian in d = 4000: every coordinate is an independent chain, so the
    moments are sharp.  Started at the wrong place (all zeros, velocity zero), the
    corrector's law moves to N(0, abar s^2 + 1 - abar) (up to its O(h) bias)."""
    s = 0.3
    mixture = GaussianMixture(
        torch.zeros(1, 4000, dtype=torch.float64),
        torch.tensor([s], dtype=torch.float64),
        torch.tensor([1.0], dtype=torch.float64),
    )
    den = MixtureDenoiser(mixture, SCHEDULE.alphas_cumprod)
    t = 300
    abar = float(SCHEDULE.alphas_cumprod[t].double())
    target = abar * s**2 + 1 - abar
    chain = LangevinChain(t, abar, 60, step_size=0.2, friction=2.0)
    noise = torch.randn(
        1, 60, 2, 4000, generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )
    state = torch.zeros(1, 2, 4000, dtype=torch.float64)
    out = sample_loop(chain, PhaseSpaceDenoiser(den), state, noise)
    x_var, v_var = float(out[0, 0].var()), float(out[0, 1].var())
    assert abs(x_var / target - 1) < 0.1, (x_var, target)
    assert abs(v_var - 1) < 0.1, v_var


# ------------------------------------------------------------- the whole sampler
def test_without_corrector_the_blocks_compose_to_the_sequential_sampler():
    _, den = oracle()
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for chain_type in (DDIMChain, HeunChain):
        chain = chain_type.from_schedule(SCHEDULE, 17)
        ref = sample_loop(chain, den, x)
        out = predictor_corrector(
            chain,
            den,
            x,
            blocks=(0, 3, 11),
            corrector_steps=0,
            predictor=fp.Sequential(),
            form=MarkovMap,
        )
        assert torch.equal(out.sample, ref)  # the same steps in the same order
        assert [s.kind for s in out.solves] == ["predictor"] * 3
        assert out.network_calls == 17 * chain.stages - 1 * (chain.stages == 2)


def test_sequential_predictor_corrector_equals_the_plain_loops():
    mixture, den = oracle(dim=3, components=2, seed=5)
    chain = DDIMChain.from_schedule(SCHEDULE, 12)
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    cn = CorrectorNoise.draw(2, 2, 5, (3,), generator=torch.Generator().manual_seed(6))
    out = predictor_corrector(
        chain,
        den,
        x,
        blocks=3,
        corrector_steps=5,
        step_size=0.3,
        friction=1.5,
        corrector_noise=cn,
        predictor=fp.Sequential(),
        corrector=fp.Sequential(),
        form=MarkovMap,
    )
    y = x
    for j, (lo, hi) in enumerate(((0, 4), (4, 8), (8, 12))):
        y = sample_loop(ChainSegment(chain, lo, hi), den, y)
        if hi < 12:
            abar = float(chain.abar[hi])
            y, _ = langevin_loop(mixture, abar, y, cn.velocity[:, j], cn.steps[:, j], 0.3, 1.5)
    assert float((out.sample - y).abs().max()) <= 1e-12
    assert [s.kind for s in out.solves] == ["predictor", "corrector"] * 2 + ["predictor"]
    assert out.network_calls == 12 + 2 * 5
    assert out.cost("corrector")["network_rows"] == 2 * 5 * 2


def _method(shortest, longest):
    """An exact method (tolerance 0) for every length in [shortest, longest]: GS-Jacobi's
    modules fit the shortest, Jacobi's cap and the window reach the longest."""
    fit = fpt.methods(shortest, ("sequential", "gsjacobi", "triangular_anderson"))
    jacobi = st.sampled_from((fp.Jacobi(**EXACT), fp.Jacobi(max_iter=longest, **EXACT)))
    window = st.integers(1, longest + 2).map(lambda w: fp.SlidingWindow(w, **EXACT))
    return fit | jacobi | window


@settings(max_examples=EXAMPLES)
@given(
    st.integers(1, 5),
    st.integers(1, 4),
    st.integers(0, 50),
    st.sampled_from((DDIMChain, EulerChain, HeunChain)),
    st.integers(2, 14),
    st.integers(1, 4),
    st.integers(0, 5),
    st.floats(0.05, 0.6),
    st.floats(0.5, 4.0),
    st.sampled_from((MarkovMap, PicardMap)),
    st.data(),
)
def test_every_parallel_solve_reaches_the_sequential_sampler(
    dim, components, seed, chain_type, steps, blocks, m, step_size, friction, form, data
):
    _, den = oracle(dim, components, seed)
    chain = chain_type.from_schedule(SCHEDULE, steps)
    blocks = min(blocks, steps)
    shortest, longest = steps // blocks, -(-steps // blocks)
    pred = data.draw(_method(shortest, longest), label="predictor")
    corr = data.draw(_method(m, m), label="corrector") if m else fp.Sequential()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, dim, generator=g, dtype=torch.float64)
    kw = dict(blocks=blocks, corrector_steps=m, step_size=step_size, friction=friction)
    ref = predictor_corrector(
        chain,
        den,
        x,
        predictor=fp.Sequential(),
        corrector=fp.Sequential(),
        form=MarkovMap,
        generator=torch.Generator().manual_seed(seed),
        **kw,
    )
    out = predictor_corrector(
        chain,
        den,
        x,
        predictor=pred,
        corrector=corr,
        form=form,
        generator=torch.Generator().manual_seed(seed),
        **kw,
    )
    scale = max(1.0, float(ref.sample.abs().max()))
    assert float((out.sample - ref.sample).abs().max()) <= 1e-10 * scale, (pred, corr)
    assert all(s.status == "SUCCESS" for s in out.solves)
    corrected = sum(s.kind == "corrector" for s in out.solves)
    assert corrected == (blocks - 1 if m else 0)


@pytest.mark.parametrize("form", [MarkovMap, PicardMap])
def test_error_goes_to_zero_with_the_tolerance(form):
    _, den = oracle(dim=6, components=3, seed=1)
    chain = DDIMChain.from_schedule(SCHEDULE, 30)
    x = torch.randn(2, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    kw = dict(blocks=3, corrector_steps=8, generator=None)
    cn = CorrectorNoise.draw(2, 2, 8, (6,), generator=torch.Generator().manual_seed(9))
    kw["corrector_noise"] = cn
    ref = predictor_corrector(
        chain, den, x, predictor=fp.Sequential(), corrector=fp.Sequential(), form=MarkovMap, **kw
    ).sample
    for make in (
        lambda a: fp.Jacobi(atol=a, rtol=0.0),
        lambda a: fp.SlidingWindow(4, atol=a, rtol=0.0),
    ):
        errors = []
        for atol in (1e-2, 1e-4, 1e-6, 1e-8, 1e-10, 0.0):
            out = predictor_corrector(
                chain, den, x, predictor=make(atol), corrector=make(atol), form=form, **kw
            )
            errors.append(float((out.sample - ref).abs().max()))
        assert errors[-1] <= 1e-12, errors
        assert errors[-2] <= 1e-8, errors
        assert all(b <= max(a, 1e-12) * 2 for a, b in zip(errors, errors[1:])), errors


def test_block_picard_costs_and_converges_in_the_iteration_count():
    _, den = oracle(dim=8, components=4, seed=2)
    chain = DDIMChain.from_schedule(SCHEDULE, 24)  # 4 blocks of 6 steps
    x = torch.randn(2, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    cn = CorrectorNoise.draw(2, 3, 4, (8,), generator=torch.Generator().manual_seed(7))
    kw = dict(blocks=4, corrector_steps=4, corrector_noise=cn)
    ref = predictor_corrector(
        chain, den, x, predictor=fp.Sequential(), corrector=fp.Sequential(), **kw
    ).sample
    seq = fp.Sequential()
    for kind in ("predictor", "corrector"):
        errors = []
        for k in (1, 2, 3, 4, 6):
            if kind == "predictor":  # the corrector solved exactly, K varies
                out = predictor_corrector(chain, den, x, iterations=k, corrector=seq, **kw)
            else:  # the predictor solved exactly, K_c varies
                out = predictor_corrector(
                    chain, den, x, predictor=seq, corrector_iterations=k, **kw
                )
            errors.append(float((out.sample - ref).abs().max()))
            # K dependent calls per block (at most its length), K_c per corrector
            want = 4 * min(k, 6) if kind == "predictor" else 3 * min(k, 4)
            assert out.cost(kind)["network_calls"] == want
        assert all(b < a for a, b in zip(errors, errors[1:4])), (kind, errors)
        assert errors[-1] <= 1e-12, (kind, errors)  # K = the length is exact
    both = predictor_corrector(chain, den, x, iterations=2, corrector_iterations=2, **kw)
    assert both.network_calls == 4 * 2 + 3 * 2
    assert all(s.status == "MAX_ITER" for s in both.solves)  # the fixed count stopped them


def test_guidance_and_labels_reach_the_corrector():
    mixture, den = oracle(dim=3, components=3, seed=4)
    chain = DDIMChain.from_schedule(SCHEDULE, 10)
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    labels = torch.tensor([0, 3])
    kw = dict(
        blocks=2,
        corrector_steps=3,
        labels=labels,
        guidance=1.5,
        corrector_noise=CorrectorNoise.draw(2, 1, 3, (3,)),
        form=MarkovMap,
    )
    seq = predictor_corrector(
        chain, den, x, predictor=fp.Sequential(), corrector=fp.Sequential(), **kw
    )
    par = predictor_corrector(
        chain, den, x, predictor=fp.Jacobi(**EXACT), corrector=fp.Jacobi(**EXACT), **kw
    )
    assert float((seq.sample - par.sample).abs().max()) <= 1e-12
    assert seq.network_rows == 2 * seq.network_calls * 2  # CFG: two rows per sample
    plain = predictor_corrector(
        chain, den, x, blocks=2, corrector_steps=3, corrector_noise=kw["corrector_noise"]
    )
    assert float((plain.sample - seq.sample).abs().max()) > 1e-3  # guidance did something


# ------------------------------------------------------------- bad input
def corrector_noise(correctors: int, part: str | None = None, bad: float = 0.0):
    """Corrector noise for one sample in d = 4 with two steps per corrector, with one
    entry of ``part`` set to ``bad``."""
    cn = CorrectorNoise.draw(1, correctors, 2, (4,), generator=torch.Generator().manual_seed(0))
    if part is not None:
        getattr(cn, part).view(-1)[3] = bad
    return cn


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(step_size=0.0), "step_size must be finite and > 0"),
        (dict(step_size=-0.1), "step_size must be finite and > 0"),
        (dict(step_size=float("nan")), "step_size must be finite and > 0"),
        (dict(friction=0.0), "friction must be finite and > 0"),
        (dict(corrector_steps=-1), "corrector steps must be >= 0"),
        (dict(iterations=0), "iterations must be >= 1"),
        (dict(blocks=0), "modules must be >= 1"),
        (dict(blocks=40), "exceeds the sequence length"),
        *[
            (dict(corrector_noise=corrector_noise(1, part, bad)), "corrector noise must be finite")
            for part in ("velocity", "steps")
            for bad in (float("nan"), float("inf"))
        ],
        # Two correctors' noise, but two blocks have one corrector.
        (dict(corrector_noise=corrector_noise(2)), "velocity noise must have shape"),
    ],
)
def test_bad_arguments_are_one_line_errors(kw, match):
    _, den = oracle()
    chain = DDIMChain.from_schedule(SCHEDULE, 10)
    x = torch.zeros(1, 4, dtype=torch.float64)
    args = dict(blocks=2, corrector_steps=2) | kw
    with pytest.raises(ValueError, match=match) as info:
        predictor_corrector(chain, den, x, **args)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "build,match",
    [
        (lambda: LangevinChain(0, 1.0, 3, step_size=0.1), "0 < abar < 1"),
        (lambda: LangevinChain(10, 0.5, 0, step_size=0.1), "corrector steps must be >= 1"),
        (lambda: LangevinChain(10, 0.5, 3, step_size=-1.0), "step_size must be finite and > 0"),
        (
            lambda: LangevinChain(10, 0.5, 3, step_size=0.1).step(
                torch.zeros(1, 4), torch.zeros(1, dtype=torch.long), lambda *a: torch.zeros(1, 2)
            ),
            "needs its noise drawn in advance",
        ),
        (lambda: ChainSegment(DDIMChain.from_schedule(SCHEDULE, 5), 3, 7), "not inside the chain"),
    ],
)
def test_bad_langevin_chains_are_refused(build, match):
    with pytest.raises(ValueError, match=match) as info:
        build()
    assert "\n" not in str(info.value)


# ------------------------------------------------------------- the study
def test_the_study_denoiser_equals_the_mixture_oracle():
    from studies.diffusion_corrector import FastMixtureDenoiser

    mixture = GaussianMixture.random(33, components=5, seed=8)
    slow = MixtureDenoiser(mixture, SCHEDULE.alphas_cumprod)
    fast = FastMixtureDenoiser(mixture, SCHEDULE.alphas_cumprod)
    fast.CHUNK = 7  # several chunks
    g = torch.Generator().manual_seed(0)
    x = 2 * torch.randn(40, 33, generator=g, dtype=torch.float64)
    t = torch.randint(0, 1000, (40,), generator=g)
    assert float((fast(x, t) - slow(x, t)).abs().max()) <= 1e-12


def test_study_smoke(tmp_path, monkeypatch):
    from studies import diffusion_corrector as study

    tiny = study.Config(
        dims=(3,),
        samples=40,
        sequential_steps=(4,),
        steps=8,
        blocks=2,
        iterations=(1, 4),
        corrector_steps=2,
        corrector_iterations=2,
        step_size=0.25,
        friction=2.0,
        directions=8,
    )
    monkeypatch.setattr(study, "FAST", tiny)
    monkeypatch.setattr(study, "out_path", lambda mode, name: tmp_path / name)
    payload = study.run(["--mode", "fast"])
    assert (tmp_path / "diffusion_corrector.json").is_file()
    assert (tmp_path / "diffusion_corrector.png").is_file()
    runs = payload["by_dim"][0]["runs"]
    by = {r["label"]: r for r in runs}
    assert by["block Picard K=1"]["network_calls"] == 2
    assert by["block Picard K=1 + corrector"]["network_calls"] == 2 + 2
    assert by["sequential N=8 + corrector"]["network_calls"] == 8 + 2
    assert all(math.isfinite(r["sw2"]) and r["sw2"] > 0 for r in runs)
    values = payload["section_values"]
    assert values["corr_pairs"] == 2 and "| sampler |" in values["corr_table"]
