"""A tiny ``QwenImageEditPipeline``, called with precomputed prompt embeddings and a reference
image.

The pipeline encodes the reference image with its VAE (a tiny random ``AutoencoderKLQwenImage``
here) and passes the reference tokens after the noisy image tokens in the transformer's
``hidden_states``; it runs true classifier-free guidance as two transformer calls per step in
``cache_context("cond")`` and ``("uncond")``. It has no text encoder here (Qwen2.5-VL): the call
gives ``prompt_embeds`` and ``negative_prompt_embeds`` and asks for latent output.

The pipeline resizes the reference image to about one megapixel
(``calculate_dimensions(1024 * 1024, aspect ratio)``), 4096 reference tokens whatever the image:
:func:`reference_area` lowers that target for a tiny call (64 x 64 px: 16 reference tokens).

Example:
    >>> pipe, kwargs = tiny_qwen_edit_pipeline()
    >>> with reference_area(64 * 64):
    ...     out = pipe(num_inference_steps=2, **kwargs).images
    >>> tuple(out.shape)  # the 16 noisy image tokens only, 4 channels packed 2 x 2
    (1, 16, 16)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from . import tiny_model

__all__ = ["reference_area", "tiny_qwen_edit_pipeline"]


@contextlib.contextmanager
def reference_area(pixels: int) -> Iterator[None]:
    """While inside, ``QwenImageEditPipeline`` resizes its reference image to about ``pixels``
    pixels (the pipeline's own ``1024 * 1024`` otherwise), keeping its aspect ratio."""
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit as module

    original = module.calculate_dimensions
    module.calculate_dimensions = lambda _area, ratio: original(pixels, ratio)
    try:
        yield
    finally:
        module.calculate_dimensions = original


def tiny_qwen_edit_pipeline(seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """A ``QwenImageEditPipeline`` around the qwen_image family's tiny transformer (weights from
    ``seed``) and a tiny ``AutoencoderKLQwenImage`` (4 latent channels, scale factor 8), and the
    keyword arguments of a cheap call (all but ``num_inference_steps``; run it inside
    :func:`reference_area` ``(64 * 64)``): a random 64 x 64 reference image, 64 x 64 px output
    (16 noisy tokens), 6 prompt tokens with a key mask (the last one padding), 5 negative ones,
    ``true_cfg_scale=4.0`` (two calls per step), latent output.

    Example:
        >>> pipe, kwargs = tiny_qwen_edit_pipeline()
        >>> type(pipe).__name__, kwargs["image"].size, pipe.vae_scale_factor
        ('QwenImageEditPipeline', (64, 64), 8)
    """
    import PIL.Image
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageEditPipeline

    transformer = tiny_model("qwen_image", seed=seed)
    z_dim = transformer.config.in_channels // 4
    torch.manual_seed(seed + 4)
    vae = AutoencoderKLQwenImage(
        base_dim=4,
        z_dim=z_dim,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        latents_mean=[0.0] * z_dim,
        latents_std=[1.0] * z_dim,
    ).eval()
    pipe = QwenImageEditPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        processor=None,
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(seed + 2)
    width = transformer.config.joint_attention_dim
    pixels = (torch.rand(64, 64, 3, generator=g) * 255).to(torch.uint8).numpy()
    mask = torch.ones(1, 6, dtype=torch.long)
    mask[:, -1] = 0  # one padded text token
    return pipe, {
        "image": PIL.Image.fromarray(pixels),
        "height": 64,
        "width": 64,
        "prompt_embeds": torch.randn(1, 6, width, generator=g),
        "prompt_embeds_mask": mask,
        "negative_prompt_embeds": torch.randn(1, 5, width, generator=g),
        "negative_prompt_embeds_mask": torch.ones(1, 5, dtype=torch.long),
        "true_cfg_scale": 4.0,
        "output_type": "latent",
        "generator": torch.Generator().manual_seed(seed + 1),
    }
