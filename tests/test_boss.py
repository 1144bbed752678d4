"""BOSS: the common-time ODE, reference trajectories, cost matrix, DP, flow models."""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch

import fixedpoint as fp
import fixedpoint.diffusion as fd
from fixedpoint.data import Dataset, load_digits_dataset
from fixedpoint.diffusion.train import PRESETS, Objective, TrainConfig, train


def brute_force(cost: torch.Tensor, steps: int) -> float:
    """The least cost over every ``steps``-jump path from 0 to K_max (all subsets)."""
    k_max = cost.shape[0] - 1
    best = math.inf
    for inner in itertools.combinations(range(1, k_max), steps - 1):
        path = (0, *inner, k_max)
        best = min(best, sum(float(cost[a, b]) for a, b in itertools.pairwise(path)))
    return best


def path_cost(cost: torch.Tensor, indices: torch.Tensor) -> float:
    return sum(float(cost[a, b]) for a, b in itertools.pairwise(indices.tolist()))


def tiny_flow_model(seed: int = 0, num_classes: int | None = None) -> fd.FlowModel:
    config = fd.UNetConfig(sample_size=8, channels=(8, 16), norm_groups=4, num_classes=num_classes)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = fd.FlowModel.new(config)
    model.unet.eval()
    return model


def noise(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def velocity() -> fd.ProbabilityFlow:
    return fd.probability_flow(tiny_flow_model())


@pytest.fixture(scope="module")
def eps_flow() -> fd.ProbabilityFlow:
    return fd.probability_flow(fd.tiny_model())


@pytest.fixture(scope="module")
def reference(velocity) -> fd.Reference:
    return fd.reference_trajectories(velocity, noise(6), steps=12)


# ------------------------------------------------------------------------- the DP
@pytest.mark.parametrize("seed", range(4))
def test_dp_is_optimal_against_brute_force(seed):
    gen = torch.Generator().manual_seed(seed)
    k_max = 8
    cost = torch.rand(k_max + 1, k_max + 1, generator=gen, dtype=torch.float64) ** 3
    for steps in range(1, k_max + 1):
        indices, total = fd.optimal_steps(cost, steps)
        assert total == pytest.approx(brute_force(cost, steps), rel=1e-12, abs=1e-15)
        assert path_cost(cost, indices) == pytest.approx(total, rel=1e-12, abs=1e-15)
        assert indices[0] == 0 and indices[-1] == k_max and len(indices) == steps + 1
        assert bool((indices[1:] > indices[:-1]).all())


def test_dp_on_a_real_cost_matrix(reference):
    cost = fd.cost_matrix(reference)
    for steps in (1, 2, 3, 5):
        indices, total = fd.optimal_steps(cost, steps)
        assert total == pytest.approx(brute_force(cost, steps), rel=1e-12, abs=1e-12)
        assert path_cost(cost, indices) == pytest.approx(total, rel=1e-12, abs=1e-12)
    # K_max steps: the reference grid itself, whose jumps are the reference's own steps.
    indices, total = fd.optimal_steps(cost, reference.k_max)
    assert indices.tolist() == list(range(reference.k_max + 1))
    assert total < 1e-8 * float(cost[0, -1])


def test_cost_matrix_matches_its_definition(reference):
    cost = fd.cost_matrix(reference)
    chunked = fd.cost_matrix(reference, max_elements=1)
    assert torch.allclose(cost, chunked, rtol=1e-12, atol=0.0)
    t, x = reference.times, reference.states.double()
    for i, j in [(0, 1), (0, 12), (3, 7), (5, 11)]:
        v = (x[:, i + 1] - x[:, i]) / (t[i + 1] - t[i])
        want = (x[:, i] + (t[j] - t[i]) * v - x[:, j]).pow(2).sum(-1).mean()
        assert float(cost[i, j]) == pytest.approx(float(want), rel=1e-9, abs=1e-12)
    below = ~torch.ones_like(cost, dtype=torch.bool).triu(1)
    assert bool(torch.isinf(cost[below]).all()) and bool(torch.isfinite(cost[~below]).all())


def test_grids_are_monotone_and_span_the_horizon(velocity, eps_flow, reference):
    grids = fd.boss_grids(velocity, range(1, 6), reference=reference)
    cost = fd.cost_matrix(reference)
    for k, grid in grids.items():
        assert grid.steps == k and grid.k_max == reference.k_max
        assert bool((grid.times[1:] < grid.times[:-1]).all())
        assert float(grid.times[0]) == velocity.t_start and float(grid.times[-1]) == 0.0
        assert path_cost(cost, grid.indices) == pytest.approx(grid.cost, rel=1e-12, abs=1e-15)
        back = fd.BossGrid.from_json(grid.to_json())
        assert torch.equal(back.times, grid.times) and torch.equal(back.indices, grid.indices)
        assert back.cost == grid.cost and back.k_max == grid.k_max
    g = fd.boss_grid(eps_flow, 3, k_max=10, samples=4)
    assert float(g.times[0]) == pytest.approx(eps_flow.t_start) and float(g.times[-1]) == 0.0
    assert bool((g.times[1:] < g.times[:-1]).all())


# ------------------------------------------------------------------- the samplers
def test_boss_sampler_is_finite_and_deterministic(velocity, reference):
    grid = fd.boss_grid(velocity, 4, reference=reference)
    a = fd.flow_sample(velocity, grid.times, noise(3, seed=5))
    b = fd.flow_sample(velocity, grid.times, noise(3, seed=5))
    assert a.shape == (3, 1, 8, 8) and bool(torch.isfinite(a).all()) and torch.equal(a, b)
    # the same grid through the chain interface and the solver core
    chain = grid.chain(velocity)
    fmap = fd.PicardMap(chain, velocity.denoiser, chain.start(noise(3, seed=5)))
    par = fd.solve_chain(fmap, fp.Jacobi(atol=0.0, rtol=0.0))
    assert torch.allclose(par.sample, a, atol=1e-5, rtol=1e-5)


def test_euler_in_common_time_is_ddim(eps_flow):
    model = eps_flow.model
    x = noise(3, seed=2)
    for steps in (4, 10):
        ddim = fd.sample_loop(
            fd.DDIMChain.from_schedule(model.schedule, steps), model.denoiser(), x
        )
        ours = fd.flow_sample(eps_flow, eps_flow.ddim_times(steps), x)
        scale = float(ddim.abs().max())
        assert float((ours - ddim).abs().max()) <= 1e-5 * scale


@pytest.mark.parametrize("kind", ["velocity", "epsilon"])
def test_parallel_reference_equals_sequential(kind, velocity, eps_flow):
    flow = velocity if kind == "velocity" else eps_flow
    z = noise(4, seed=3)
    seq = fd.reference_trajectories(flow, z, steps=16)
    for method in (fp.Jacobi(), fp.TriangularAnderson()):
        par = fd.reference_trajectories(flow, z, steps=16, method=method)
        assert par.status is fp.Status.SUCCESS and par.calls <= 16
        scale = float(seq.states.abs().max())
        assert float((par.states - seq.states).abs().max()) <= 1e-4 * scale
    assert seq.calls == 16 and seq.states.shape == (4, 17, 64)


# ------------------------------------------------------------------- bad input
def test_bad_input_is_one_line(velocity, reference):
    cost = fd.cost_matrix(reference)
    cases = [
        lambda: fd.optimal_steps(cost, reference.k_max + 1),
        lambda: fd.optimal_steps(cost, 0),
        lambda: fd.optimal_steps(cost, -2),
        lambda: fd.optimal_steps(cost, 2.0),
        lambda: fd.boss_grid(velocity, 101, k_max=100),
        lambda: fd.flow_sample(velocity, torch.tensor([1.0, 0.2, 0.5, 0.0]), noise(1)),
        lambda: fd.flow_sample(velocity, torch.tensor([1.0, 1.0, 0.0]), noise(1)),
        lambda: fd.flow_sample(velocity, torch.tensor([2.0, 0.0]), noise(1)),
        lambda: fd.FlowEulerChain(velocity, torch.tensor([0.0, 1.0])),
        lambda: velocity.uniform_times(0),
    ]
    for case in cases:
        with pytest.raises(fd.BossError) as info:
            case()
        assert "\n" not in str(info.value)
    assert issubclass(fd.BossError, ValueError)


def test_velocity_and_noise_models_are_not_interchangeable(tmp_path):
    flow_dir = tiny_flow_model().save(tmp_path / "flow")
    eps_dir = fd.tiny_model().save(tmp_path / "eps")
    with pytest.raises(fd.ModelError, match="velocity .*noise \\(epsilon\\) model is needed"):
        fd.load_model(flow_dir)
    with pytest.raises(fd.ModelError, match="noise \\(epsilon\\) model; a velocity"):
        fd.load_flow_model(eps_dir)
    with pytest.raises(fd.BossError, match="velocity model was given where a epsilon"):
        fd.NoiseFlow(fd.load_flow_model(flow_dir))
    with pytest.raises(fd.BossError, match="epsilon model was given where a velocity"):
        fd.VelocityFlow(fd.load_model(eps_dir))
    assert isinstance(fd.load_flow(flow_dir), fd.VelocityFlow)
    assert isinstance(fd.load_flow(eps_dir), fd.NoiseFlow)


def test_flow_model_save_reload_samples_identically(tmp_path):
    model = tiny_flow_model(seed=4, num_classes=10)
    times = torch.linspace(1, 0, 6, dtype=torch.float64)
    labels = torch.tensor([1, 7])
    a = fd.flow_sample(fd.probability_flow(model), times, noise(2), labels=labels, guidance=2.0)
    loaded = fd.load_flow_model(model.save(tmp_path / "m"))
    assert loaded.num_classes == 10 and loaded.meta["prediction"] == "velocity"
    b = fd.flow_sample(fd.probability_flow(loaded), times, noise(2), labels=labels, guidance=2.0)
    assert torch.equal(a, b) and bool(torch.isfinite(a).all())
    # diffusers' own flow-matching scheduler reads the saved config and steps the same way
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler.from_pretrained(tmp_path / "m" / "scheduler")
    sched.set_timesteps(5)
    x = noise(2)
    with torch.no_grad():
        for t in sched.timesteps:
            v = loaded.unet(x, t.expand(2), class_labels=torch.full((2,), 10)).sample
            x = sched.step(v, t, x).prev_sample
    # on diffusers' grid (sigmas from 1 to 1/1000, then 0)
    ours = fd.flow_sample(fd.probability_flow(loaded), sched.sigmas.double(), noise(2))
    assert torch.allclose(x, ours, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------- straightening
def test_straightening_brings_the_grid_closer_to_the_reference(velocity):
    grid = fd.boss_grid(velocity, 3, k_max=12, samples=8)
    before = {k: v.clone() for k, v in velocity.model.unet.state_dict().items()}
    tuned = fd.straighten(velocity, grid, samples=8, steps=40, batch_size=24, lr=1e-3, seed=0)
    after = velocity.model.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the caller's model
    z = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(1))  # its data
    target = fd.reference_trajectories(velocity, z, steps=12).states[:, -1]

    def deviation(flow):
        return float((fd.flow_sample(flow, grid.times, z).reshape(8, -1) - target).pow(2).mean())

    assert deviation(tuned) < deviation(velocity)


# ------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def small_digits() -> Dataset:
    d = load_digits_dataset()
    return Dataset(
        "digits", d.train_x[:96], d.train_y[:96], d.test_x[:40], d.test_y[:40], d.provenance
    )


def flow_config(tmp_path, **kw) -> TrainConfig:
    unet = fd.UNetConfig(sample_size=8, channels=(8, 16), norm_groups=4, num_classes=10)
    base = TrainConfig(
        unet=unet,
        steps=6,
        batch_size=16,
        warmup=2,
        checkpoint_every=2,
        objective=Objective.VELOCITY,
        out_dir=str(tmp_path / "run"),
    )
    return dataclasses.replace(base, **kw)


def test_flow_training_resumes_bit_for_bit(tmp_path, small_digits):
    whole = train(flow_config(tmp_path / "a"), data=small_digits, progress=False)

    def crash(step, loss):
        if step == 5:
            raise RuntimeError("simulated crash")

    cfg = flow_config(tmp_path / "b")
    with pytest.raises(RuntimeError, match="simulated"):
        train(cfg, data=small_digits, progress=False, callback=crash)
    resumed = train(cfg, data=small_digits, progress=False)
    assert resumed.resumed_from == 4 and resumed.test_loss == whole.test_loss > 0
    a, b = fd.load_flow_model(whole.model_dir), fd.load_flow_model(resumed.model_dir)
    wa, wb = a.unet.state_dict(), b.unet.state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    with pytest.raises(fd.ModelError):
        fd.load_model(whole.model_dir)
    # an epsilon run in the same directory is another configuration: refused
    with pytest.raises(ValueError, match="different training configuration"):
        train(dataclasses.replace(cfg, objective=Objective.EPSILON), data=small_digits)


def test_presets_keep_the_epsilon_identity():
    # Noise-model identities carry no objective key, so their saved states still resume.
    assert "objective" not in PRESETS["digits"].identity()
    assert "objective" not in PRESETS["mnist"].identity()
    assert PRESETS["flow-digits"].identity()["objective"] == "velocity"
    assert PRESETS["flow-mnist"].identity()["objective"] == "velocity"
    flow = {k: v for k, v in PRESETS["flow-digits"].identity().items() if k != "objective"}
    assert flow == PRESETS["digits"].identity()
