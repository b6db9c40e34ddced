"""A tiny ``LTX2Pipeline`` (video and audio), called with precomputed prompt embeddings.

LTX-2's text encoder (Gemma 3) gives per-layer hidden states, which the pipeline's own
``LTX2TextConnectors`` turn into the video and the audio text embeddings; the pipeline here has no
text encoder and no tokenizer but a tiny random connector module (two "layers" of 16 channels),
and is called with ``prompt_embeds`` (the per-layer states, flattened) and their mask. No
vocoder (latent output); a tiny ``AutoencoderKLLTX2Video`` (factors 32 in space, 8 in time, as
LTX-2's) and a tiny ``AutoencoderKLLTX2Audio`` give the latents' shapes and statistics (the audio:
4 channels, 4 mel bins, one latent mel bin). The rest runs as a checkpoint does: both
latent streams, the flow-matching scheduler and its deep copy for the audio, CFG batched into one
call per step (``cache_context("cond_uncond")``), spatio-temporal guidance (a call with the
perturbed blocks, ``cache_context("uncond_stg")``) and modality-isolation guidance (a call with
the cross-modal attention off, ``cache_context("uncond_modality")``) when their scales ask for
them.

Example:
    >>> pipe, kwargs = tiny_ltx2_pipeline()
    >>> out = pipe(num_inference_steps=2, **kwargs)
    >>> tuple(out.frames.shape), tuple(out.audio.shape)
    ((1, 4, 2, 4, 4), (1, 4, 9, 1))
"""

from __future__ import annotations

from typing import Any

import torch

from . import tiny_model

__all__ = ["tiny_ltx2_pipeline"]


def tiny_ltx2_pipeline(
    seed: int = 0, guidance: str = "cfg", image_to_video: bool = False
) -> tuple[Any, dict[str, Any]]:
    """An ``LTX2Pipeline`` around the ltx2 family's tiny transformer (weights from ``seed``), and
    the keyword arguments of a cheap call (all but ``num_inference_steps``): 9 frames of 128 x 128
    px (2 latent frames of 4 x 4: 32 video tokens), 9 audio latent frames, 6 prompt tokens (the first one left padding), latent
    output. ``guidance``:

    - ``"cfg"``: CFG 3.0 (batched), no spatio-temporal nor modality guidance: one call per step;
    - ``"all"``: the pipeline's defaults, CFG 3.0, spatio-temporal guidance 1.0 on block 1 and
      modality guidance 3.0: three calls per step.

    ``image_to_video``: an ``LTX2ImageToVideoPipeline`` (a random 128 x 128 image, encoded by the
    tiny VAE, conditions the first latent frame, whose tokens get the timestep 0: the video
    timestep is per token) and its ``image`` argument.

    Example:
        >>> pipe, kwargs = tiny_ltx2_pipeline(guidance="all")
        >>> type(pipe).__name__, kwargs["spatio_temporal_guidance_blocks"]
        ('LTX2Pipeline', [1])
    """
    from diffusers import (
        AutoencoderKLLTX2Audio,
        AutoencoderKLLTX2Video,
        FlowMatchEulerDiscreteScheduler,
        LTX2ImageToVideoPipeline,
        LTX2Pipeline,
    )
    from diffusers.pipelines.ltx2.connectors import LTX2TextConnectors

    if guidance not in ("cfg", "all"):
        raise ValueError(f"guidance must be 'cfg' or 'all'; got {guidance!r}")
    transformer = tiny_model("ltx2", seed=seed)
    cfg = transformer.config
    torch.manual_seed(seed + 3)
    connectors = LTX2TextConnectors(
        caption_channels=cfg.caption_channels,
        text_proj_in_factor=2,
        video_connector_num_attention_heads=2,
        video_connector_attention_head_dim=cfg.caption_channels // 2,
        video_connector_num_layers=1,
        video_connector_num_learnable_registers=None,
        audio_connector_num_attention_heads=2,
        audio_connector_attention_head_dim=cfg.caption_channels // 2,
        audio_connector_num_layers=1,
        audio_connector_num_learnable_registers=None,
    ).eval()
    torch.manual_seed(seed + 4)
    audio_vae = AutoencoderKLLTX2Audio(
        base_channels=4,
        ch_mult=(1, 1, 1),
        num_res_blocks=1,
        latent_channels=cfg.audio_in_channels,
        mel_bins=4,
    ).eval()
    torch.manual_seed(seed + 5)
    vae = AutoencoderKLLTX2Video(
        latent_channels=cfg.in_channels,
        # the factors of this layout (3 spatial and 3 temporal halvings after 4 x 4 patches), stated
        # as LTX-2's config states them (the class's default formula would say 64 and 16)
        spatial_compression_ratio=32,
        temporal_compression_ratio=8,
        block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8),
        layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1),
    ).eval()
    pipe = (LTX2ImageToVideoPipeline if image_to_video else LTX2Pipeline)(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        audio_vae=audio_vae,
        text_encoder=None,
        tokenizer=None,
        connectors=connectors,
        transformer=transformer,
        vocoder=None,
    )
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(seed + 2)
    mask = torch.ones(1, 6, dtype=torch.long)
    mask[:, 0] = 0  # one padded token (Gemma pads on the left)
    kwargs: dict[str, Any] = {
        "height": 128,
        "width": 128,
        "num_frames": 9,
        "prompt_embeds": torch.randn(1, 6, 2 * cfg.caption_channels, generator=g),
        "prompt_attention_mask": mask,
        "negative_prompt_embeds": torch.randn(1, 6, 2 * cfg.caption_channels, generator=g),
        "negative_prompt_attention_mask": torch.ones(1, 6, dtype=torch.long),
        "guidance_scale": 3.0,
        "audio_guidance_scale": 3.0,
        "output_type": "latent",
        "generator": torch.Generator().manual_seed(seed + 1),
    }
    if image_to_video:
        import PIL.Image

        pixels = (torch.rand(128, 128, 3, generator=g) * 255).to(torch.uint8).numpy()
        kwargs["image"] = PIL.Image.fromarray(pixels)
    if guidance == "cfg":
        kwargs.update(stg_scale=0.0, audio_stg_scale=0.0, modality_scale=1.0, audio_modality_scale=1.0)
    else:
        kwargs["spatio_temporal_guidance_blocks"] = [1]
    return pipe, kwargs
