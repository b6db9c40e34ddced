"""Tiny CogVideoX pipelines (``CogVideoXPipeline``) from random components, with a T5 encoder and
an in-memory tokenizer.

Example:
    >>> sorted(TINY_COGVIDEOX_CALL_KWARGS)[:2]
    ['guidance_scale', 'height']
"""

from __future__ import annotations

from typing import Any

import torch

from . import tiny_model
from .encoders import tiny_t5_encoder

__all__ = ["TINY_COGVIDEOX_CALL_KWARGS", "tiny_cogvideox_pipeline"]


#: Keyword arguments of a cheap call of :func:`tiny_cogvideox_pipeline`: 5 frames of 64x64 pixels
#: -> 2 latent frames of 8x8 -> 2 x 4 x 4 = 32 video tokens (2x2 patches); 6 text tokens; guidance
#: (CogVideoX batches the two branches into one call).
TINY_COGVIDEOX_CALL_KWARGS: dict[str, Any] = {
    "height": 64,
    "width": 64,
    "num_frames": 5,
    "max_sequence_length": 6,
    "guidance_scale": 6.0,
}


def tiny_cogvideox_pipeline(seed: int = 0, **transformer_overrides: Any) -> Any:
    """A ``CogVideoXPipeline`` from tiny random components: the tiny CogVideoX transformer of
    :mod:`xslim_xdit.testing` (RoPE, as CogVideoX-5B; ``transformer_overrides`` change it), a T5
    encoder (16 channels), a four-level ``AutoencoderKLCogVideoX`` (spatial factor 8, temporal 4)
    and ``CogVideoXDPMScheduler`` (CogVideoX-5B's). Call it with
    :data:`TINY_COGVIDEOX_CALL_KWARGS`.

    Example:
        >>> pipe = tiny_cogvideox_pipeline()
        >>> out = pipe("a cat", num_inference_steps=2, output_type="latent", **TINY_COGVIDEOX_CALL_KWARGS)
        >>> tuple(out.frames.shape)
        (1, 2, 4, 8, 8)
    """
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDPMScheduler, CogVideoXPipeline

    transformer = tiny_model("cogvideox", seed=seed, **transformer_overrides)
    encoder, tok = tiny_t5_encoder(transformer.config.text_embed_dim, seed=seed + 1)
    torch.manual_seed(seed + 2)
    vae = AutoencoderKLCogVideoX(
        down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        latent_channels=transformer.config.in_channels,
        layers_per_block=1,
        norm_num_groups=2,
        temporal_compression_ratio=4,
    ).eval()
    return CogVideoXPipeline(
        tokenizer=tok,
        text_encoder=encoder,
        vae=vae,
        transformer=transformer,
        scheduler=CogVideoXDPMScheduler(),
    )
