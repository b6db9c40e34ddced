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


def tiny_cogvideox_pipeline(seed: int = 0, image_to_video: bool = False, **transformer_overrides: Any) -> Any:
    """A ``CogVideoXPipeline`` from tiny random components: the tiny CogVideoX transformer of
    :mod:`xslim_xdit.testing` (RoPE, as CogVideoX-5B; ``transformer_overrides`` change it), a T5
    encoder (16 channels), a four-level ``AutoencoderKLCogVideoX`` (spatial factor 8, temporal 4)
    and ``CogVideoXDPMScheduler`` (CogVideoX-5B's). Call it with
    :data:`TINY_COGVIDEOX_CALL_KWARGS`.

    ``image_to_video``: a ``CogVideoXImageToVideoPipeline`` (the transformer takes the noisy
    latents and the encoded image, ``2 * 4`` input channels; a learned position embedding besides
    RoPE, as CogVideoX-5B-I2V); call it with an ``image=`` too.

    Example:
        >>> pipe = tiny_cogvideox_pipeline()
        >>> out = pipe("a cat", num_inference_steps=2, output_type="latent", **TINY_COGVIDEOX_CALL_KWARGS)
        >>> tuple(out.frames.shape)
        (1, 2, 4, 8, 8)
    """
    import diffusers

    if image_to_video:
        # CogVideoX-5B-I2V: RoPE and a learned position embedding
        transformer_overrides = {
            "in_channels": 8,
            "out_channels": 4,
            "use_learned_positional_embeddings": True,
            **transformer_overrides,
        }
    transformer = tiny_model("cogvideox", seed=seed, **transformer_overrides)
    encoder, tok = tiny_t5_encoder(transformer.config.text_embed_dim, seed=seed + 1)
    torch.manual_seed(seed + 2)
    vae = diffusers.AutoencoderKLCogVideoX(
        down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        latent_channels=transformer.config.out_channels,
        layers_per_block=1,
        norm_num_groups=2,
        temporal_compression_ratio=4,
    ).eval()
    pipeline_class = (
        diffusers.CogVideoXImageToVideoPipeline if image_to_video else diffusers.CogVideoXPipeline
    )
    return pipeline_class(
        tokenizer=tok,
        text_encoder=encoder,
        vae=vae,
        transformer=transformer,
        scheduler=diffusers.CogVideoXDPMScheduler(),
    )
