"""Tiny ``StableDiffusion3Pipeline`` s (SD3, SD3.5 Large, SD3.5 Medium layouts), called with
precomputed prompt embeddings.

SD3's three text encoders (two CLIPs and a T5-XXL) only produce the joint and pooled embeddings
the pipeline also accepts directly; so the pipeline here has no text encoder, no tokenizer and no
VAE (``output_type="latent"``) and runs everything else as a checkpoint does: latent preparation,
``FlowMatchEulerDiscreteScheduler(shift=3.0)`` (SD3's), classifier-free guidance batched into
one transformer call per step (unconditional rows first), the step loop; and, when asked for,
SD3.5 Medium's skip-layer guidance (a third prediction, a call of its own on some steps, with
``skip_layers``).

Example:
    >>> pipe, kwargs = tiny_sd3_pipeline("sd3")
    >>> tuple(pipe(num_inference_steps=2, **kwargs).images.shape)
    (1, 4, 8, 8)
"""

from __future__ import annotations

from typing import Any

import torch

from . import tiny_model

__all__ = ["SD3_VARIANTS", "tiny_sd3_pipeline"]

#: variant -> the tiny transformer's overrides of the sd3 adapter's tiny config (SD3.5 Large's:
#: query/key RMS norm)
SD3_VARIANTS: dict[str, dict[str, Any]] = {
    "sd3": {"qk_norm": None},  # SD3 Medium (3.0): no query/key norm
    "sd35": {},  # SD3.5 Large
    "sd35_medium": {"dual_attention_layers": (0, 1)},  # SD3.5 Medium: attn2 in the first blocks
}


def _embeds(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def tiny_sd3_pipeline(variant: str = "sd35", seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """A ``StableDiffusion3Pipeline`` around the sd3 family's tiny transformer of ``variant`` (a key
    of :data:`SD3_VARIANTS`; weights from ``seed``), and the keyword arguments of a cheap call (all
    but ``num_inference_steps``): 64 x 64 px (8 x 8 latents, 16 patch tokens), 6 prompt tokens
    and a pooled embedding, negative ones too, CFG 5.0 (batched), latent output, a fixed
    generator.

    Example:
        >>> pipe, kwargs = tiny_sd3_pipeline("sd35_medium")
        >>> type(pipe).__name__, pipe.transformer.config.dual_attention_layers, kwargs["guidance_scale"]
        ('StableDiffusion3Pipeline', (0, 1), 5.0)
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    if variant not in SD3_VARIANTS:
        raise ValueError(f"variant must be one of {sorted(SD3_VARIANTS)}; got {variant!r}")
    transformer = tiny_model("sd3", seed=seed, **SD3_VARIANTS[variant])
    cfg = transformer.config
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=None,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    kwargs: dict[str, Any] = {
        "height": 64,
        "width": 64,
        "prompt_embeds": _embeds(seed + 2, 1, 6, cfg.joint_attention_dim),
        "pooled_prompt_embeds": _embeds(seed + 3, 1, cfg.pooled_projection_dim),
        "negative_prompt_embeds": _embeds(seed + 4, 1, 6, cfg.joint_attention_dim),
        "negative_pooled_prompt_embeds": _embeds(seed + 5, 1, cfg.pooled_projection_dim),
        "guidance_scale": 5.0,
        "output_type": "latent",
        "generator": torch.Generator().manual_seed(seed + 1),
    }
    return pipe, kwargs
