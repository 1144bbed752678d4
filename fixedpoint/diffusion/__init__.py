"""Diffusion and flow sampling as triangular systems over the step index.

An ``N``-step sampler is a recurrence ``x_{n+1} = Phi_n(x_n)``; with its noise drawn in
advance it is a strictly causal system whose positions are the steps and whose tokens
are whole images, solved by the same core as every other application.

* :mod:`.schedule`: the noise schedule from a diffusers scheduler config, validated;
* :mod:`.model`: the noise-predicting ``UNet2DModel``, saved and loaded the diffusers way;
* :mod:`.mixture`: Gaussian-mixture targets with an exact noise prediction (no training);
* :mod:`.chain`: DDIM, DDPM, Euler and Heun steps, batched over rows at any steps;
* :mod:`.maps`: a chain as an incremental triangular map, Markov and Picard forms;
* :mod:`.sampling`: the sequential loop, the solver route, diffusers' loop for parity;
* :mod:`.train`: DDPM training with exact resume; :mod:`.diagnostics`: the wavefront.
* :mod:`.flow`: the flow-matching (velocity) UNet; :mod:`.boss`: both models' ODE in one
  time, reference trajectories, and BOSS's Bellman-optimal Euler step sizes.
* :mod:`.fewstep`: few-step samplers (diffusers' schedulers, iPNDM) behind one interface;
  :mod:`.amed`: AMED-Solver and AMED-Plugin, their predictor and its distillation.
* :mod:`.corrector`: Chen et al.'s parallel predictor-corrector (block Picard, then an
  underdamped Langevin corrector solved as a chain of its own).
"""

from .amed import AMEDError, AMEDPlugin, AMEDPluginDPMpp, AMEDSolver, load_amed, train_amed
from .boss import (
    BossError,
    BossGrid,
    FlowEulerChain,
    NoiseFlow,
    ProbabilityFlow,
    Reference,
    VelocityFlow,
    boss_grid,
    boss_grids,
    cost_matrix,
    flow_sample,
    load_flow,
    optimal_steps,
    probability_flow,
    reference_trajectories,
    straighten,
)
from .chain import Chain, DDIMChain, DDPMChain, EulerChain, HeunChain, Split
from .corrector import (
    ChainSegment,
    CorrectedSample,
    CorrectorNoise,
    LangevinChain,
    PhaseSpaceDenoiser,
    SolveRecord,
    predictor_corrector,
)
from .diagnostics import RecordingMap, error_by_step, network_call_seconds
from .fewstep import (
    FewStepError,
    FewStepSample,
    LogSNRGrid,
    PolynomialGrid,
    UniformGrid,
    make_sampler,
)
from .flow import FlowModel, load_flow_model
from .maps import ChainMap, MarkovMap, PicardMap
from .mixture import GaussianMixture, MixtureDenoiser
from .model import DiffusionModel, ModelError, UNetConfig, UNetDenoiser, load_model, tiny_model
from .sampling import (
    block_picard,
    diffusers_ddpm_noise,
    diffusers_loop,
    paradigms_tolerance,
    sample_loop,
    solve_chain,
)
from .schedule import NoiseSchedule, ScheduleError

__all__ = [
    "AMEDError",
    "AMEDPlugin",
    "AMEDPluginDPMpp",
    "AMEDSolver",
    "FewStepError",
    "FewStepSample",
    "LogSNRGrid",
    "PolynomialGrid",
    "UniformGrid",
    "load_amed",
    "make_sampler",
    "train_amed",
    "BossError",
    "BossGrid",
    "FlowEulerChain",
    "FlowModel",
    "NoiseFlow",
    "ProbabilityFlow",
    "Reference",
    "VelocityFlow",
    "boss_grid",
    "boss_grids",
    "cost_matrix",
    "flow_sample",
    "load_flow",
    "load_flow_model",
    "optimal_steps",
    "probability_flow",
    "reference_trajectories",
    "straighten",
    "Chain",
    "ChainMap",
    "ChainSegment",
    "CorrectedSample",
    "CorrectorNoise",
    "LangevinChain",
    "PhaseSpaceDenoiser",
    "SolveRecord",
    "predictor_corrector",
    "DDIMChain",
    "DDPMChain",
    "DiffusionModel",
    "EulerChain",
    "GaussianMixture",
    "HeunChain",
    "MarkovMap",
    "MixtureDenoiser",
    "ModelError",
    "NoiseSchedule",
    "PicardMap",
    "RecordingMap",
    "ScheduleError",
    "Split",
    "UNetConfig",
    "UNetDenoiser",
    "block_picard",
    "diffusers_ddpm_noise",
    "diffusers_loop",
    "error_by_step",
    "load_model",
    "network_call_seconds",
    "paradigms_tolerance",
    "sample_loop",
    "solve_chain",
    "tiny_model",
]
