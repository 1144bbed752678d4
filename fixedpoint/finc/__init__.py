"""FInC Flow (Kallappa et al. 2023): invertible k x k convolutions inverted by the core.

>>> from fixedpoint.finc import FInCFlow, FInCFlowConfig
>>> model = FInCFlow(FInCFlowConfig())                                    # doctest: +SKIP
"""

from .inverse import ChannelSystem, FInCSystem, PixelSystem
from .model import FInCConv, FInCFlow, FInCFlowConfig, FInCUnit, Layout, Orientation

__all__ = [
    "ChannelSystem",
    "FInCConv",
    "FInCFlow",
    "FInCFlowConfig",
    "FInCSystem",
    "FInCUnit",
    "Layout",
    "Orientation",
    "PixelSystem",
]
