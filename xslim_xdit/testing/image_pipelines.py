"""Tiny diffusers pipelines of the Qwen-Image, FLUX.2 and Z-Image families, called with
precomputed prompt embeddings.

Their text encoders (Qwen2.5-VL, Mistral 3, Qwen3) are large vision-language or causal language
models whose pipelines also apply chat templates; a random tiny one would exercise little of the
X-Slim path and cost seconds, so the pipelines here have no text encoder, no tokenizer and no VAE:
they are called with ``prompt_embeds`` (which each of these pipelines accepts instead of a prompt)
and ``output_type="latent"``, and run everything else as a real checkpoint does: latent
preparation and packing, the position ids, the flow-matching scheduler with its shifted sigmas,
guidance (Qwen-Image's and FLUX.2 Klein's true CFG as two transformer calls per step in ``cache_context("cond")`` and
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

__all__ = ["IMAGE_PIPELINES", "tiny_image_pipeline"]

#: name -> (family, the diffusers pipeline class built for it)
IMAGE_PIPELINES = {
    "qwen_image": ("qwen_image", "QwenImagePipeline"),
    "flux2": ("flux2", "Flux2Pipeline"),
    "flux2_klein": ("flux2", "Flux2KleinPipeline"),
    "z_image": ("z_image", "ZImagePipeline"),
}


def _embeds(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def tiny_image_pipeline(name: str, seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """The pipeline ``name`` (a key of :data:`IMAGE_PIPELINES`) around its family's tiny transformer
    (weights from ``seed``), and the keyword arguments of a cheap call (all but
    ``num_inference_steps``): prompt embeddings of the transformer's text width, a small image,
    guidance as the pipeline applies it, latent output, a fixed generator.

    - ``"qwen_image"``: ``QwenImagePipeline``, 64 x 64 px (16 image tokens), true CFG
      (``true_cfg_scale=4.0`` with negative embeddings: two calls per step), a text key mask.
    - ``"flux2"``: ``Flux2Pipeline``, 64 x 64 px (16 image tokens), embedded guidance 4.0.
    - ``"flux2_klein"``: ``Flux2KleinPipeline`` (no guidance embedding), true CFG 4.0: two calls
      per step; it reads the VAE's batch-norm statistics even for latent output, so it gets a
      tiny ``AutoencoderKLFlux2`` (2 latent channels).
    - ``"z_image"``: ``ZImagePipeline``, 128 x 128 px (64 image tokens), CFG 5.0 batched.

    Example:
        >>> pipe, kwargs = tiny_image_pipeline("qwen_image")
        >>> type(pipe).__name__, kwargs["true_cfg_scale"]
        ('QwenImagePipeline', 4.0)
    """
    import diffusers

    if name not in IMAGE_PIPELINES:
        raise ValueError(f"name must be one of {sorted(IMAGE_PIPELINES)}; got {name!r}")
    family, class_name = IMAGE_PIPELINES[name]
    klein = name == "flux2_klein"
    transformer = tiny_model(family, seed=seed, **({"guidance_embeds": False} if klein else {}))
    width = transformer.config.get("joint_attention_dim") or transformer.config["cap_feat_dim"]
    vae = None
    if klein:
        torch.manual_seed(seed + 4)
        vae = diffusers.AutoencoderKLFlux2(
            block_out_channels=(4, 4, 4, 4), layers_per_block=1, latent_channels=2, norm_num_groups=2
        ).eval()
    pipe = getattr(diffusers, class_name)(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    kwargs: dict[str, Any] = {"output_type": "latent", "generator": torch.Generator().manual_seed(seed + 1)}
    if name == "qwen_image":
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
        if klein:
            kwargs["negative_prompt_embeds"] = _embeds(seed + 3, 1, 6, width)
    else:
        kwargs.update(
            height=128,
            width=128,
            prompt_embeds=[_embeds(seed + 2, 6, width)],
            negative_prompt_embeds=[_embeds(seed + 3, 3, width)],
            guidance_scale=5.0,
        )
    return pipe, kwargs
