"""Tiny Wan pipelines (``WanPipeline``, ``WanImageToVideoPipeline``; Wan 2.1 and Wan 2.2 A14B's
two experts) from random components, with a UMT5 encoder and an in-memory tokenizer.

Example:
    >>> tiny_wan_vae().config.z_dim
    4
"""

from __future__ import annotations

from typing import Any

import torch

from . import tiny_model
from .encoders import tiny_umt5_encoder

__all__ = ["TINY_WAN_CALL_KWARGS", "tiny_wan_pipeline", "tiny_wan_vae"]


def tiny_wan_vae(z_dim: int = 4, seed: int = 0) -> Any:
    """A random ``AutoencoderKLWan`` (scale factors 4 in time, 8 in space, as Wan 2.1's) with
    ``z_dim`` latent channels, zero latent means and unit deviations.

    Example:
        >>> vae = tiny_wan_vae()
        >>> vae.config.scale_factor_temporal, vae.config.scale_factor_spatial
        (4, 8)
    """
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    return AutoencoderKLWan(
        base_dim=3,
        z_dim=z_dim,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=[0.0] * z_dim,
        latents_std=[1.0] * z_dim,
    ).eval()


#: Keyword arguments of a cheap call of :func:`tiny_wan_pipeline`: 5 frames of 32x32 pixels ->
#: 2 latent frames of 4x4 -> 2 x 2 x 2 = 8 video tokens; 8 text tokens; guidance (two branches).
TINY_WAN_CALL_KWARGS: dict[str, Any] = {
    "height": 32,
    "width": 32,
    "num_frames": 5,
    "max_sequence_length": 8,
    "guidance_scale": 2.0,
}


def tiny_wan_pipeline(
    experts: int = 1, boundary_ratio: float = 0.7, seed: int = 0, image_to_video: bool = False
) -> Any:
    """A ``WanPipeline`` from tiny random components: the tiny Wan transformer of
    :mod:`xslim_xdit.testing` (``text_dim`` 16), a UMT5 encoder, ``AutoencoderKLWan`` and
    ``FlowMatchEulerDiscreteScheduler(shift=3.0)``. ``experts=2`` builds Wan 2.2 A14B's layout: a
    second transformer (other weights) as ``transformer_2``, taking over below the timestep
    ``boundary_ratio * 1000``. Call it with :data:`TINY_WAN_CALL_KWARGS`.

    ``image_to_video``: a ``WanImageToVideoPipeline`` as Wan 2.2 A14B I2V has it (no CLIP image
    encoder; the transformers take the noisy latents, the frame mask and the encoded image:
    ``2 * 4 + 4`` input channels); call it with an ``image=`` too.

    Example:
        >>> pipe = tiny_wan_pipeline(experts=2)
        >>> out = pipe("a cat", num_inference_steps=3, output_type="latent", **TINY_WAN_CALL_KWARGS)
        >>> tuple(out.frames.shape), pipe.config.boundary_ratio
        ((1, 4, 2, 4, 4), 0.7)
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline, WanPipeline

    if experts not in (1, 2):
        raise ValueError(f"experts must be 1 or 2; got {experts!r}")
    z_dim = tiny_model("wan").config.out_channels
    # I2V: the frame mask (one channel per frame of a latent frame's 4) and the image's latents
    overrides = {"in_channels": 2 * z_dim + 4} if image_to_video else {}
    transformer = tiny_model("wan", seed=seed, **overrides)
    encoder, tok = tiny_umt5_encoder(transformer.config.text_dim, seed=seed + 1)
    vae = tiny_wan_vae(z_dim, seed=seed + 2)
    pipeline_class = WanImageToVideoPipeline if image_to_video else WanPipeline
    return pipeline_class(
        tokenizer=tok,
        text_encoder=encoder,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        transformer=transformer,
        transformer_2=tiny_model("wan", seed=seed + 3, **overrides) if experts == 2 else None,
        boundary_ratio=boundary_ratio if experts == 2 else None,
    )
