"""X-Slim for diffusers and xDiT: training-free step, block and token caching for diffusion
transformers, with identical decisions on every rank of a parallel run.

Example:
    >>> from xslim_xdit import XSlimConfig, enable_xslim
    >>> engine = enable_xslim(pipe, XSlimConfig.from_preset("flux-fast"))  # doctest: +SKIP

Importing this package never imports xfuser; :mod:`xslim_xdit.integrations.xfuser` does.
"""

from .api import XSlimPipelineWrapper, disable_xslim, enable_xslim, get_engine, get_engines
from .config import PRESETS, ConfigError, Schedule, XSlimConfig
from .controller import StepKind
from .engine import XSlimEngine
from .stats import CacheStatistics

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "CacheStatistics",
    "ConfigError",
    "Schedule",
    "StepKind",
    "XSlimConfig",
    "XSlimEngine",
    "XSlimPipelineWrapper",
    "disable_xslim",
    "enable_xslim",
    "get_engine",
    "get_engines",
]
