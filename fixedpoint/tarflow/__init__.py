"""TarFlow (transformer autoregressive flow) sampled through the solver core.

Modules, each importing only the ones above it:

* :mod:`~fixedpoint.tarflow.model`: the network (``TarFlow``, ``TarFlowConfig``,
  ``KVCache``);
* :mod:`~fixedpoint.tarflow.strategy`: per-block methods and initial guesses
  (``Strategy``, ``BlockPlan``, ``InitialGuess``, the paper's notation);
* :mod:`~fixedpoint.tarflow.inverse`: one block's inverse as a triangular map
  (``BlockInverse``);
* :mod:`~fixedpoint.tarflow.diagnostics`: CRM / IGM and the paper's strategy rule;
* :mod:`~fixedpoint.tarflow.sampling`: ``reverse`` (noise -> images), ``Sample``,
  ``SamplingError``, the fast sequential sampler (``sample_sequential``,
  ``SequentialDecoder``), the naive reference loop;
* :mod:`~fixedpoint.tarflow.checkpoint`, :mod:`~fixedpoint.tarflow.train`,
  :mod:`~fixedpoint.tarflow.generate`: files, training, sharded generation.

>>> from fixedpoint.tarflow import TarFlow, TarFlowConfig, Strategy, reverse
>>> model = TarFlow(TarFlowConfig())                                   # doctest: +SKIP
>>> sample = reverse(model, model.sample_noise(4), strategy=Strategy.parse(
...     "[1-4-8-5]", blocks=4, seq_len=16))                             # doctest: +SKIP
"""

from .diagnostics import BlockMetrics, IGMForm, crm_igm_table, format_table, select_strategy
from .inverse import BlockInverse
from .model import KVCache, TarFlow, TarFlowConfig
from .sampling import (
    NonFiniteSampleError,
    Sample,
    SamplingError,
    SequentialDecoder,
    denoise_step,
    reverse,
    sample_sequential,
    sample_sequential_naive,
)
from .strategy import BlockPlan, InitialGuess, Strategy

__all__ = [
    "BlockInverse",
    "BlockMetrics",
    "BlockPlan",
    "IGMForm",
    "InitialGuess",
    "KVCache",
    "NonFiniteSampleError",
    "Sample",
    "SamplingError",
    "SequentialDecoder",
    "Strategy",
    "TarFlow",
    "TarFlowConfig",
    "crm_igm_table",
    "denoise_step",
    "format_table",
    "reverse",
    "sample_sequential",
    "sample_sequential_naive",
    "select_strategy",
]
