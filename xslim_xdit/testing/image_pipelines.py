"""Tiny diffusers pipelines of the Qwen-Image, FLUX.2 and Z-Image families, called with
precomputed prompt embeddings.

Their text encoders (Qwen2.5-VL, Mistral 3, Qwen3) are large vision-language or causal language
models whose pipelines also apply chat templates; a random tiny one would exercise little of the
X-Slim path and cost seconds, so the pipelines here have no text encoder, no tokenizer and no VAE:
they are called with ``prompt_embeds`` (which each of these pipelines accepts instead of a prompt)
and ``output_type="latent"``, and run everything else as a real checkpoint does: latent
preparation and packing, the position ids, the flow-matching scheduler with its shifted sigmas,
guidance (Qwen-Image's true CFG as two transformer calls per step in ``cache_context("cond")`` and
``("uncond")``; Z-Image's CFG batched in one call), the step loop.

Example:
    >>> pipe, kwargs = tiny_image_pipeline("flux2")
    >>> tuple(pipe(num_inference_steps=2, **kwargs).images.shape)
    (1, 16, 8)
"""

from __future__ import annotations

from typing import Any

import torch

from . import tiny_model

__all__ = ["IMAGE_PIPELINE_FAMILIES", "tiny_image_pipeline"]

#: family -> the diffusers pipeline class built for it
IMAGE_PIPELINE_FAMILIES = {
    "qwen_image": "QwenImagePipeline",
    "flux2": "Flux2Pipeline",
    "z_image": "ZImagePipeline",
}


def _embeds(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def tiny_image_pipeline(family: str, seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """The pipeline of ``family`` around its tiny transformer (weights from ``seed``), and the keyword
    arguments of a cheap call (all but ``num_inference_steps``): prompt embeddings of the
    transformer's text width, a small image, guidance as the family's pipeline applies it, latent
    output, a fixed generator.

    - ``"qwen_image"``: ``QwenImagePipeline``, 64 x 64 px (16 image tokens), true CFG
      (``true_cfg_scale=4.0`` with negative embeddings: two calls per step), a text key mask.
    - ``"flux2"``: ``Flux2Pipeline``, 64 x 64 px (16 image tokens), embedded guidance 4.0.
    - ``"z_image"``: ``ZImagePipeline``, 128 x 128 px (64 image tokens), CFG 5.0 batched.

    Example:
        >>> pipe, kwargs = tiny_image_pipeline("qwen_image")
        >>> type(pipe).__name__, kwargs["true_cfg_scale"]
        ('QwenImagePipeline', 4.0)
    """
    import diffusers

    if family not in IMAGE_PIPELINE_FAMILIES:
        raise ValueError(f"family must be one of {sorted(IMAGE_PIPELINE_FAMILIES)}; got {family!r}")
    transformer = tiny_model(family, seed=seed)
    width = transformer.config.get("joint_attention_dim") or transformer.config["cap_feat_dim"]
    pipeline_class = getattr(diffusers, IMAGE_PIPELINE_FAMILIES[family])
    pipe = pipeline_class(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
        vae=None,
        text_encoder=None,
        tokenizer=None,
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    kwargs: dict[str, Any] = {"output_type": "latent", "generator": torch.Generator().manual_seed(seed + 1)}
    if family == "qwen_image":
        mask = torch.ones(1, 6, dtype=torch.long)
        mask[:, -1] = 0  # one padded text token
        kwargs.update(
            height=64,
            width=64,
            prompt_embeds=_embeds(seed + 2, 1, 6, width),
            prompt_embeds_mask=mask,
            negative_prompt_embeds=_embeds(seed + 3, 1, 5, width),
            negative_prompt_embeds_mask=torch.ones(1, 5, dtype=torch.long),
            true_cfg_scale=4.0,
        )
    elif family == "flux2":
        kwargs.update(height=64, width=64, prompt_embeds=_embeds(seed + 2, 1, 6, width), guidance_scale=4.0)
    else:
        kwargs.update(
            height=128,
            width=128,
            prompt_embeds=[_embeds(seed + 2, 6, width)],
            negative_prompt_embeds=[_embeds(seed + 3, 3, width)],
            guidance_scale=5.0,
        )
    return pipe, kwargs
