"""Minimal xfuser runtime for a bare transformer (no text encoders, no VAE).

xfuser's parallel layers read a global runtime state (parallel groups, input sizes, patch
layout) that its pipelines normally build.  :func:`init_xfuser_runtime` builds the same
state for a transformer alone, which is enough to run ``xFuserFlux1Transformer2DWrapper``
(sequence and CFG parallelism) without a pipeline.  On a machine without an accelerator it
applies :func:`~xslim_xdit.integrations.xfuser_compat.apply_xfuser_cpu_compat` first.

Example (each rank, ``torch.distributed`` initialised with gloo, world size 2)::

    from xslim_xdit.integrations.xfuser_runtime import init_xfuser_runtime, to_xfuser_flux1
    init_xfuser_runtime(model, ulysses_degree=2, height=64, width=64, max_condition_sequence_length=8)
    xmodel = to_xfuser_flux1(model)
    out = xmodel(hidden_states=x, encoder_hidden_states=t, ...).sample
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch

from .xfuser_compat import apply_xfuser_cpu_compat, has_accelerator

__all__ = ["init_xfuser_runtime", "reset_xfuser_parallel_state", "to_xfuser_flux1"]


def init_xfuser_runtime(
    transformer: torch.nn.Module,
    *,
    height: int,
    width: int,
    max_condition_sequence_length: int,
    batch_size: int = 1,
    num_inference_steps: int = 1,
    ulysses_degree: int = 1,
    ring_degree: int = 1,
    pipefusion_parallel_degree: int = 1,
    use_cfg_parallel: bool = False,
    warmup_steps: int = 1,
    attention_backend: str | None = None,
    vae_scale_factor: int = 8,
    seed: int | None = None,
    **xfuser_args: Any,
) -> Any:
    """Build xfuser's config, parallel groups and runtime state for ``transformer``.

    ``torch.distributed`` must be initialised already, or ``RANK``/``WORLD_SIZE``/
    ``MASTER_ADDR``/``MASTER_PORT`` must be set (xfuser then initialises it, with gloo on
    CPU).  The product of the degrees must equal the world size.

    Args:
        transformer: the (unwrapped) transformer; xfuser reads its ``config``.
        height: image height in pixels (latent height times ``vae_scale_factor``).
        width: image width in pixels.
        max_condition_sequence_length: number of text tokens.
        batch_size: batch size of the latents.
        num_inference_steps: steps of the coming generation.
        ulysses_degree: Ulysses sequence-parallel degree.
        ring_degree: Ring sequence-parallel degree.
        pipefusion_parallel_degree: PipeFusion degree (needs an xfuser pipeline to drive it).
        use_cfg_parallel: put the two guidance branches on different ranks.
        warmup_steps: xfuser's synchronous warm-up steps (PipeFusion).
        attention_backend: xfuser attention backend name; defaults to ``"SDPA_FLASH"`` when
            ``ring_degree > 1`` without an accelerator (Ring needs the log-sum-exp).
        vae_scale_factor: pixels per latent pixel.
        seed: forwarded to ``set_input_parameters``.
        **xfuser_args: any other ``xFuserArgs`` field.

    Returns:
        The ``EngineConfig`` (the runtime state itself is ``xfuser.core.distributed.get_runtime_state()``).

    Example:
        >>> init_xfuser_runtime(model, ulysses_degree=2, height=64, width=64,  # doctest: +SKIP
        ...                     max_condition_sequence_length=8)
    """
    apply_xfuser_cpu_compat()
    from xfuser.config import xFuserArgs
    from xfuser.core.distributed import (
        get_runtime_state,
        init_distributed_environment,
        initialize_runtime_state,
    )

    if torch.distributed.is_initialized():
        # create_config() only builds xfuser's world group when it initialises
        # torch.distributed itself; without that group initialize_model_parallel fails.
        init_distributed_environment(
            rank=torch.distributed.get_rank(), world_size=torch.distributed.get_world_size()
        )

    if attention_backend is None and ring_degree > 1 and not has_accelerator():
        attention_backend = "SDPA_FLASH"
    args = xFuserArgs(
        model="",
        height=height,
        width=width,
        num_inference_steps=num_inference_steps,
        max_sequence_length=max_condition_sequence_length,
        ulysses_degree=ulysses_degree,
        ring_degree=ring_degree,
        pipefusion_parallel_degree=pipefusion_parallel_degree,
        use_cfg_parallel=use_cfg_parallel,
        warmup_steps=warmup_steps,
        attention_backend=attention_backend,
        **xfuser_args,
    )
    engine_config, _ = args.create_config()
    # xfuser allocates PipeFusion receive buffers in runtime_config.dtype (default float16),
    # whatever the model's dtype: a float32 model would send twice the bytes expected.
    engine_config.runtime_config.dtype = next(transformer.parameters()).dtype
    initialize_runtime_state(
        SimpleNamespace(transformer=transformer, vae_scale_factor=vae_scale_factor), engine_config
    )
    get_runtime_state().set_input_parameters(
        height=height,
        width=width,
        batch_size=batch_size,
        num_inference_steps=num_inference_steps,
        seed=seed,
        max_condition_sequence_length=max_condition_sequence_length,
    )
    return engine_config


def to_xfuser_flux1(model: torch.nn.Module) -> torch.nn.Module:
    """Copy a diffusers ``FluxTransformer2DModel`` into xfuser's ``xFuserFlux1Transformer2DWrapper``.

    The wrapper shards the image tokens over the SP group (and the batch over the CFG group),
    runs attention through xfuser's USP and all-gathers the output.  Call it after
    :func:`init_xfuser_runtime` (its processors read the SP degree when built).

    Example:
        >>> xmodel = to_xfuser_flux1(model)  # doctest: +SKIP
    """
    from xfuser.model_executor.models.transformers.transformer_flux import (
        xFuserFlux1Transformer2DWrapper,
    )

    p = next(model.parameters())
    wrapper = xFuserFlux1Transformer2DWrapper.from_config(model.config)
    wrapper.load_state_dict(model.state_dict())
    return wrapper.to(device=p.device, dtype=p.dtype).eval()


def reset_xfuser_parallel_state() -> None:
    """Tear down xfuser's model-parallel groups so another parallel layout can be set up.

    ``torch.distributed`` itself stays initialised; the next :func:`init_xfuser_runtime`
    (or xfuser pipeline) builds new groups.  Useful to run several layouts in one process.

    Example:
        >>> reset_xfuser_parallel_state()  # doctest: +SKIP
    """
    from xfuser.core.distributed.parallel_state import destroy_model_parallel

    destroy_model_parallel()
