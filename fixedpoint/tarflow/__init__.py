"""TarFlow (transformer autoregressive flow) and its sampling by triangular solvers.

>>> from fixedpoint.tarflow import TarFlow, TarFlowConfig, Strategy
>>> model = TarFlow(TarFlowConfig())                                   # doctest: +SKIP
>>> sample = model.reverse(model.sample_noise(4), strategy=Strategy.parse(
...     "[1-4-8-5]", blocks=4, seq_len=16))                             # doctest: +SKIP
"""

from .metrics import BlockMetrics, crm_igm_table, format_table
from .model import KVCache, TarFlow, TarFlowConfig
from .sampling import BlockInverse, Sample, reverse, sample_sequential_naive
from .strategy import BlockPlan, InitialGuess, Strategy, select_strategy

__all__ = [
    "BlockInverse",
    "BlockMetrics",
    "BlockPlan",
    "InitialGuess",
    "KVCache",
    "Sample",
    "Strategy",
    "TarFlow",
    "TarFlowConfig",
    "crm_igm_table",
    "format_table",
    "reverse",
    "sample_sequential_naive",
    "select_strategy",
]
