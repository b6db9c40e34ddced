"""Setting xfuser up in a test process, and loading the tiny pipelines into xFuser pipelines.

Every function here applies xfuser's CPU compatibility layer
(:func:`~xslim_xdit.integrations.xfuser_compat.apply_xfuser_cpu_compat`, a no-op where an
accelerator exists) before it imports xfuser; importing this module imports neither.

Example:
    >>> from xslim_xdit.testing.pipelines import save_tiny_pipeline
    >>> engine_config, _ = xfuser_engine_config(ulysses_degree=2)  # doctest: +SKIP
    >>> pipe = load_xfuser_pipeline("flux", save_tiny_pipeline("flux", "/tmp/f"), engine_config)  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .pipelines import PIPELINE_FAMILIES

__all__ = ["load_xfuser_pipeline", "xfuser_engine_config", "xfuser_pipeline_class"]


def xfuser_engine_config(dtype: torch.dtype = torch.float32, **xfuser_args: Any) -> tuple[Any, Any]:
    """``xFuserArgs(**xfuser_args).create_config()``, made to work in any process.

    - ``torch.distributed`` already initialised (by a test harness, say): xfuser's own world
      group is built first, which ``create_config`` only does when it initialises
      ``torch.distributed`` itself;
    - not initialised: ``create_config`` does it from ``RANK``/``WORLD_SIZE``/``MASTER_*``
      (``torchrun`` sets them), with gloo on CPU;
    - ``runtime_config.dtype`` is set to ``dtype`` (xfuser defaults to float16 and allocates
      PipeFusion's receive buffers in it whatever the model's dtype);
    - on a CPU-only machine, Ring attention gets the ``SDPA_FLASH`` backend (it needs the
      log-sum-exp), see ``docs/xfuser_cpu.md``.

    Returns ``(engine_config, input_config)``.

    Example:
        >>> engine_config, input_config = xfuser_engine_config(  # doctest: +SKIP
        ...     model="/ckpt/FLUX.1-dev", ulysses_degree=2, height=1024, width=1024)
    """
    from ..integrations.xfuser_compat import apply_xfuser_cpu_compat, has_accelerator

    apply_xfuser_cpu_compat()
    from xfuser.config import xFuserArgs
    from xfuser.core.distributed import init_distributed_environment

    if torch.distributed.is_initialized():
        init_distributed_environment(
            rank=torch.distributed.get_rank(), world_size=torch.distributed.get_world_size()
        )
    if (
        xfuser_args.get("attention_backend") is None
        and xfuser_args.get("ring_degree", 1) > 1
        and not has_accelerator()
    ):
        xfuser_args["attention_backend"] = "SDPA_FLASH"
    xfuser_args.setdefault("model", "")
    engine_config, input_config = xFuserArgs(**xfuser_args).create_config()
    engine_config.runtime_config.dtype = dtype
    return engine_config, input_config


def xfuser_pipeline_class(family: str) -> type:
    """The xFuser pipeline class of a family (``xFuserFluxPipeline``, ``xFuserPixArtSigmaPipeline``).

    Example:
        >>> xfuser_pipeline_class("flux").__name__  # doctest: +SKIP
        'xFuserFluxPipeline'
    """
    from ..integrations.xfuser_compat import apply_xfuser_cpu_compat

    apply_xfuser_cpu_compat()
    if family == "flux":
        from xfuser import xFuserFluxPipeline

        return xFuserFluxPipeline
    if family == "pixart":
        from xfuser import xFuserPixArtSigmaPipeline

        return xFuserPixArtSigmaPipeline
    raise ValueError(f"family must be one of {PIPELINE_FAMILIES}; got {family!r}")


def load_xfuser_pipeline(
    family: str, path: str | Path, engine_config: Any, device: str | torch.device = "cpu", **kwargs: Any
) -> Any:
    """``xFuser<Family>Pipeline.from_pretrained(path, engine_config=engine_config)`` moved to
    ``device``: the same call a user makes with a real checkpoint.

    Example:
        >>> ec, _ = xfuser_engine_config(ulysses_degree=2)  # doctest: +SKIP
        >>> pipe = load_xfuser_pipeline("flux", save_tiny_pipeline("flux", "/tmp/f"), ec)  # doctest: +SKIP
    """
    cls = xfuser_pipeline_class(family)
    kwargs.setdefault("dtype", engine_config.runtime_config.dtype)
    return cls.from_pretrained(str(path), engine_config=engine_config, **kwargs).to(device)
