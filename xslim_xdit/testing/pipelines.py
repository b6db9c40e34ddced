"""Tiny but real diffusers and xFuser pipelines, built offline from random components.

The builders here assemble a complete :class:`diffusers.FluxPipeline` or
:class:`diffusers.PixArtSigmaPipeline` (tokenizers built in memory, tiny CLIP/T5 text encoders,
a tiny ``AutoencoderKL``, a tiny transformer, the real scheduler class), so tests and the
``--tiny`` examples exercise the same code as a real checkpoint: prompt encoding, latent
preparation, the scheduler, the VAE decode. Nothing is downloaded.
The other families' pipelines have modules of their own: :mod:`.wan_pipelines`,
:mod:`.cogvideox_pipelines`, :mod:`.hunyuan_pipelines`, :mod:`.ltx2_pipelines`,
:mod:`.image_pipelines` (Qwen-Image, FLUX.2, Z-Image), :mod:`.edit_pipelines` (Qwen-Image-Edit),
:mod:`.sd3_pipelines`; the shared text encoders and VAE are in :mod:`.encoders`. The names this
module always exported (Wan's, CogVideoX's, the encoders') are imported here still.

:func:`save_tiny_pipeline` writes one as a checkpoint directory, which
:func:`xslim_xdit.testing.xfuser.load_xfuser_pipeline` loads into an xFuser pipeline the way a
user loads a real checkpoint. This module does not import xfuser.

Example:
    >>> pipe = tiny_pipeline("pixart")
    >>> out = pipe("a cat", num_inference_steps=2, output_type="latent", **TINY_CALL_KWARGS["pixart"])
    >>> tuple(out.images.shape)
    (1, 4, 8, 8)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from . import tiny_model
from .cogvideox_pipelines import TINY_COGVIDEOX_CALL_KWARGS, tiny_cogvideox_pipeline
from .encoders import (
    _clip_tokenizer,  # noqa: F401  (tests import them from here)
    _t5_tokenizer,  # noqa: F401
    tiny_clip_text_encoder,
    tiny_t5_encoder,
    tiny_umt5_encoder,
    tiny_vae,
)
from .wan_pipelines import TINY_WAN_CALL_KWARGS, tiny_wan_pipeline, tiny_wan_vae

__all__ = [
    "PIPELINE_FAMILIES",
    "TINY_CALL_KWARGS",
    "TINY_FLUX_EMBEDS_TRANSFORMER",
    "save_tiny_pipeline",
    "TINY_WAN_CALL_KWARGS",
    "TINY_COGVIDEOX_CALL_KWARGS",
    "tiny_clip_text_encoder",
    "tiny_cogvideox_pipeline",
    "tiny_flux_embeds_call",
    "tiny_flux_embeds_pipeline",
    "tiny_pipeline",
    "tiny_t5_encoder",
    "tiny_umt5_encoder",
    "tiny_vae",
    "tiny_wan_pipeline",
    "tiny_wan_vae",
]

PIPELINE_FAMILIES = ("flux", "pixart")

#: Keyword arguments that make a call of the tiny pipeline of each family cheap and valid:
#: image size (in pixels, VAE factor 8), text length, and, for PixArt, switches that need
#: real-checkpoint sizes or extra packages (resolution binning, caption cleaning).
TINY_CALL_KWARGS: dict[str, dict[str, Any]] = {
    # 128 px -> 16x16 latents -> 8x8 = 64 packed tokens (divisible by SP degrees 2 and 4)
    "flux": {"height": 128, "width": 128, "max_sequence_length": 8, "guidance_scale": 3.5},
    # 64 px -> 8x8 latents -> 4x4 = 16 patch tokens
    "pixart": {
        "height": 64,
        "width": 64,
        "max_sequence_length": 8,
        "guidance_scale": 4.5,
        "use_resolution_binning": False,
        "clean_caption": False,
    },
}


def _flux_pipeline(
    transformer: Any,
    vae: Any,
    text_encoder: Any = None,
    tokenizer: Any = None,
    text_encoder_2: Any = None,
    tokenizer_2: Any = None,
) -> Any:
    """A ``FluxPipeline`` of these components with a default ``FlowMatchEulerDiscreteScheduler``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )


def tiny_pipeline(family: str, seed: int = 0) -> Any:
    """A complete diffusers pipeline of ``family`` (``"flux"`` or ``"pixart"``) from tiny random
    components; call it with :data:`TINY_CALL_KWARGS` ``[family]``.

    - ``"flux"``: ``FluxPipeline`` with the tiny FLUX transformer of :mod:`xslim_xdit.testing`
      (2 double + 3 single blocks), CLIP (pooled, 16 channels) and T5 (24 channels) encoders,
      ``FlowMatchEulerDiscreteScheduler``, a VAE with 2 latent channels.
    - ``"pixart"``: ``PixArtSigmaPipeline`` with a 4-block PixArt transformer predicting the
      variance too (``out_channels = 2 * in_channels``, as PixArt-Sigma does), a T5 encoder,
      ``DPMSolverMultistepScheduler``, a VAE with 4 latent channels.

    The same ``seed`` always gives the same weights.

    Example:
        >>> pipe = tiny_pipeline("flux")
        >>> type(pipe).__name__
        'FluxPipeline'
    """
    if family == "flux":
        transformer = tiny_model("flux", seed=seed)
        clip, clip_tok = tiny_clip_text_encoder(transformer.config.pooled_projection_dim, seed=seed + 1)
        t5, t5_tok = tiny_t5_encoder(transformer.config.joint_attention_dim, seed=seed + 2)
        vae = tiny_vae(
            transformer.config.in_channels // 4,
            seed=seed + 3,
            scaling_factor=0.3611,
            shift_factor=0.1159,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
        return _flux_pipeline(transformer, vae, clip, clip_tok, t5, t5_tok)
    if family == "pixart":
        from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline

        transformer = tiny_model("pixart", seed=seed, out_channels=8)
        t5, t5_tok = tiny_t5_encoder(transformer.config.caption_channels, seed=seed + 2)
        vae = tiny_vae(transformer.config.in_channels, seed=seed + 3, scaling_factor=0.13025)
        return PixArtSigmaPipeline(
            tokenizer=t5_tok,
            text_encoder=t5,
            vae=vae,
            transformer=transformer,
            scheduler=DPMSolverMultistepScheduler(),
        )
    raise ValueError(f"family must be one of {PIPELINE_FAMILIES}; got {family!r}")


#: :func:`~xslim_xdit.testing.tiny_model` ``("flux")`` overrides of the transformer of
#: :func:`tiny_flux_embeds_pipeline`: 64 input channels (16 latent channels packed 2x2, as in
#: FLUX.1), text and pooled embeddings 32 wide.
TINY_FLUX_EMBEDS_TRANSFORMER: dict[str, Any] = {
    "in_channels": 64,
    "joint_attention_dim": 32,
    "pooled_projection_dim": 32,
}


def tiny_flux_embeds_pipeline(num_single_layers: int = 4, seed: int = 0, vae_seed: int = 1) -> Any:
    """A ``FluxPipeline`` without text encoders, to call with :func:`tiny_flux_embeds_call`.

    A VAE with 16 latent channels (seed ``vae_seed``), then the tiny FLUX transformer with
    :data:`TINY_FLUX_EMBEDS_TRANSFORMER` and ``num_single_layers`` single-stream blocks (seed
    ``seed``); what the xFuser tests wrap in ``xFuserFluxPipeline``.

    Example:
        >>> pipe = tiny_flux_embeds_pipeline()
        >>> tuple(pipe(**tiny_flux_embeds_call(2)).images.shape)
        (1, 16, 64)
    """
    vae = tiny_vae(16, seed=vae_seed, norm_num_groups=4, sample_size=32)
    transformer = tiny_model(
        "flux", seed=seed, num_single_layers=num_single_layers, **TINY_FLUX_EMBEDS_TRANSFORMER
    )
    return _flux_pipeline(transformer, vae)


def tiny_flux_embeds_call(
    steps: int, height: int = 64, width: int = 64, text_len: int = 8, seed: int = 2
) -> dict[str, Any]:
    """Keyword arguments of a call of :func:`tiny_flux_embeds_pipeline`: random prompt and pooled
    embeddings (drawn from ``seed``), ``steps`` steps, no guidance, latent output.

    Example:
        >>> tiny_flux_embeds_call(4)["prompt_embeds"].shape
        torch.Size([1, 8, 32])
    """
    g = torch.Generator().manual_seed(seed)
    return {
        "height": height,
        "width": width,
        "num_inference_steps": steps,
        "prompt_embeds": torch.randn(1, text_len, 32, generator=g),
        "pooled_prompt_embeds": torch.randn(1, 32, generator=g),
        "max_sequence_length": text_len,
        "output_type": "latent",
        "guidance_scale": 1.0,
    }


def save_tiny_pipeline(family: str, path: str | Path, seed: int = 0) -> Path:
    """Write :func:`tiny_pipeline` ``(family)`` to ``path`` as a checkpoint directory that
    ``FluxPipeline.from_pretrained`` / ``xFuserFluxPipeline.from_pretrained`` (and the PixArt
    counterparts) load like a real one.

    Example:
        >>> import tempfile
        >>> from diffusers import PixArtSigmaPipeline
        >>> path = save_tiny_pipeline("pixart", tempfile.mkdtemp())
        >>> type(PixArtSigmaPipeline.from_pretrained(path)).__name__
        'PixArtSigmaPipeline'
    """
    path = Path(path)
    tiny_pipeline(family, seed=seed).save_pretrained(path)
    return path
