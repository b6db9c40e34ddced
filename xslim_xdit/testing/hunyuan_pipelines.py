"""Tiny HunyuanVideo pipelines (``HunyuanVideoPipeline``; ``HunyuanVideo15Pipeline`` and
``HunyuanVideo15ImageToVideoPipeline``), called with precomputed prompt embeddings.

Their text encoders (a LLaVA-Llama and CLIP for HunyuanVideo; Qwen2.5-VL and ByT5 for 1.5) only
produce the embeddings and masks the pipelines also accept directly, after chat templates a tiny
random model would not exercise; the pipelines here have no text encoder and no tokenizer, and
ask for latent output. They run everything else as a checkpoint does: latent preparation, the
flow-matching scheduler with the pipelines' sigmas, guidance as each pipeline applies it, the
step loop:

- ``HunyuanVideoPipeline``: embedded guidance (``guidance_scale``, guidance-distilled: one call
  per step) and, with a negative prompt and ``true_cfg_scale > 1``, true CFG as a second call per
  step in ``cache_context("uncond")``;
- ``HunyuanVideo15Pipeline``: a ``ClassifierFreeGuidance`` guider, two calls per step in
  ``cache_context("pred_cond")`` / ``("pred_uncond")``, the transformer's input the noisy latents,
  the condition latents and their mask (``2 * C + 1`` channels); a tiny
  ``AutoencoderKLHunyuanVideo15`` (the pipeline reads its config); 729 all-zero image-embedding
  tokens (text-to-video), which the model masks out;
- ``HunyuanVideo15ImageToVideoPipeline``: the same, with a reference image encoded by the VAE into
  the condition latents and by a tiny random SigLIP vision model into the image embeddings.

Example:
    >>> pipe, kwargs = tiny_hunyuan_video_pipeline()
    >>> tuple(pipe(num_inference_steps=2, **kwargs).frames.shape)
    (1, 4, 2, 4, 4)
"""

from __future__ import annotations

from typing import Any

import torch

from . import tiny_model

__all__ = ["tiny_hunyuan_video15_pipeline", "tiny_hunyuan_video_pipeline"]


def _randn(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g)


def _mask(length: int) -> torch.Tensor:
    """A key mask of ``length`` tokens, the last one padding."""
    mask = torch.ones(1, length, dtype=torch.long)
    mask[:, -1] = 0
    return mask


def tiny_hunyuan_video_pipeline(seed: int = 0, true_cfg: bool = False) -> tuple[Any, dict[str, Any]]:
    """A ``HunyuanVideoPipeline`` around the hunyuan_video family's tiny transformer (weights from
    ``seed``; no VAE), and the keyword arguments of a cheap call (all but ``num_inference_steps``):
    5 frames of 32 x 32 px (2 latent frames of 4 x 4: 32 video tokens), 5 prompt tokens (the last
    one padding) and a pooled embedding, embedded guidance 6.0 (the pipeline's default), latent
    output. ``true_cfg``: a negative prompt and ``true_cfg_scale=4.0`` too (two calls per step).

    Example:
        >>> pipe, kwargs = tiny_hunyuan_video_pipeline(true_cfg=True)
        >>> type(pipe).__name__, kwargs["true_cfg_scale"]
        ('HunyuanVideoPipeline', 4.0)
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline

    transformer = tiny_model("hunyuan_video", seed=seed)
    cfg = transformer.config
    pipe = HunyuanVideoPipeline(
        text_encoder=None,
        tokenizer=None,
        transformer=transformer,
        vae=None,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        text_encoder_2=None,
        tokenizer_2=None,
    )
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(seed + 2)
    kwargs: dict[str, Any] = {
        "height": 32,
        "width": 32,
        "num_frames": 5,
        "prompt_embeds": _randn(g, 1, 5, cfg.text_embed_dim),
        "prompt_attention_mask": _mask(5),
        "pooled_prompt_embeds": _randn(g, 1, cfg.pooled_projection_dim),
        "guidance_scale": 6.0,
        "output_type": "latent",
        "generator": torch.Generator().manual_seed(seed + 1),
    }
    if true_cfg:
        kwargs.update(
            negative_prompt_embeds=_randn(g, 1, 4, cfg.text_embed_dim),
            negative_prompt_attention_mask=torch.ones(1, 4, dtype=torch.long),
            negative_pooled_prompt_embeds=_randn(g, 1, cfg.pooled_projection_dim),
            true_cfg_scale=4.0,
        )
    return pipe, kwargs


def _tiny_siglip(hidden_size: int, seed: int) -> tuple[Any, Any]:
    """A random one-layer ``SiglipVisionModel`` on 16 x 16 px images (4 patches of 8 x 8) and its
    image processor."""
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(seed)
    config = SiglipVisionConfig(
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=16,
        patch_size=8,
    )
    processor = SiglipImageProcessor(size={"height": 16, "width": 16})
    return SiglipVisionModel(config).eval(), processor


def tiny_hunyuan_video15_pipeline(seed: int = 0, image_to_video: bool = False) -> tuple[Any, dict[str, Any]]:
    """A ``HunyuanVideo15Pipeline`` (``image_to_video``: ``HunyuanVideo15ImageToVideoPipeline``)
    around the hunyuan_video15 family's tiny transformer with ``2 * 4 + 1`` input channels (weights
    from ``seed``), a tiny ``AutoencoderKLHunyuanVideo15`` (4 latent channels, spatial factor 16,
    temporal 4) and a ``ClassifierFreeGuidance(guidance_scale=6.0)`` guider; and the keyword
    arguments of a cheap call (all but ``num_inference_steps``): 5 frames of 64 x 64 px (2 latent
    frames of 4 x 4: 32 video tokens), 5 MLLM and 3 ByT5 prompt tokens (the last of each padding),
    negative ones, latent output; for image-to-video a random 64 x 64 reference image too.

    Example:
        >>> pipe, kwargs = tiny_hunyuan_video15_pipeline()
        >>> type(pipe).__name__, pipe.transformer.config.in_channels, pipe.guider.guidance_scale
        ('HunyuanVideo15Pipeline', 9, 6.0)
    """
    import diffusers

    # target_size: the pixel size the I2V pipeline resizes the image to (64: 4 x 4 latents)
    transformer = tiny_model("hunyuan_video15", seed=seed, in_channels=9, target_size=64)
    cfg = transformer.config
    torch.manual_seed(seed + 3)
    vae = diffusers.AutoencoderKLHunyuanVideo15(
        latent_channels=cfg.out_channels, block_out_channels=(8, 8, 8, 8, 8), layers_per_block=1
    ).eval()
    components: dict[str, Any] = dict(
        text_encoder=None,
        tokenizer=None,
        transformer=transformer,
        vae=vae,
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=7.0),
        text_encoder_2=None,
        tokenizer_2=None,
        guider=diffusers.ClassifierFreeGuidance(guidance_scale=6.0),
    )
    if image_to_video:
        components["image_encoder"], components["feature_extractor"] = _tiny_siglip(
            cfg.image_embed_dim, seed + 4
        )
        pipe = diffusers.HunyuanVideo15ImageToVideoPipeline(**components)
    else:
        pipe = diffusers.HunyuanVideo15Pipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(seed + 2)
    kwargs: dict[str, Any] = {
        "height": 64,
        "width": 64,
        "num_frames": 5,
        "prompt_embeds": _randn(g, 1, 5, cfg.text_embed_dim),
        "prompt_embeds_mask": _mask(5),
        "prompt_embeds_2": _randn(g, 1, 3, cfg.text_embed_2_dim),
        "prompt_embeds_mask_2": _mask(3),
        "negative_prompt_embeds": _randn(g, 1, 5, cfg.text_embed_dim),
        "negative_prompt_embeds_mask": _mask(5),
        "negative_prompt_embeds_2": _randn(g, 1, 3, cfg.text_embed_2_dim),
        "negative_prompt_embeds_mask_2": _mask(3),
        "output_type": "latent",
        "generator": torch.Generator().manual_seed(seed + 1),
    }
    if image_to_video:
        import PIL.Image

        pixels = (torch.rand(64, 64, 3, generator=g) * 255).to(torch.uint8).numpy()
        kwargs["image"] = PIL.Image.fromarray(pixels)
        del kwargs["height"], kwargs["width"]  # the image's size
    return pipe, kwargs
