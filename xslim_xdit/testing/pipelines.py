"""Tiny but real diffusers and xFuser pipelines, built offline from random components.

The builders here assemble a complete :class:`diffusers.FluxPipeline` or
:class:`diffusers.PixArtSigmaPipeline` (tokenizers built in memory, tiny CLIP/T5 text encoders,
a tiny ``AutoencoderKL``, a tiny transformer, the real scheduler class), so tests and the
``--tiny`` examples exercise the same code as a real checkpoint: prompt encoding, latent
preparation, the scheduler, the VAE decode. Nothing is downloaded.

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

import string
from pathlib import Path
from typing import Any

import torch

from . import tiny_model

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

_CHARS = string.ascii_lowercase + string.digits + ".,!?'-"


def _clip_tokenizer() -> Any:
    """A character-level CLIP BPE tokenizer (no merges): every word splits into letters."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in _CHARS:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def _t5_tokenizer() -> Any:
    """A character-level T5 (unigram) tokenizer: ``<pad>`` = 0, ``</s>`` = 1, ``<unk>`` = 2."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    pieces += [(c, -2.0) for c in _CHARS] + [("\u2581" + c, -1.5) for c in string.ascii_lowercase]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def tiny_clip_text_encoder(hidden_size: int = 16, seed: int = 0) -> tuple[Any, Any]:
    """A random one-layer ``CLIPTextModel`` and its in-memory tokenizer.

    The pooled output (what FLUX uses) has ``hidden_size`` channels.

    Example:
        >>> enc, tok = tiny_clip_text_encoder()
        >>> enc(**tok(["a cat"], return_tensors="pt")).pooler_output.shape[-1]
        16
    """
    from transformers import CLIPTextConfig, CLIPTextModel

    tok = _clip_tokenizer()
    torch.manual_seed(seed)
    cfg = CLIPTextConfig(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        projection_dim=hidden_size,
    )
    return CLIPTextModel(cfg).eval(), tok


def _t5_config_kwargs(d_model: int, vocab_size: int) -> dict[str, Any]:
    """One layer, two heads, the T5 tokenizer's special ids: what the tiny T5 and UMT5 share."""
    return dict(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=d_model // 2,
        d_ff=2 * d_model,
        num_layers=1,
        num_heads=2,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )


def tiny_t5_encoder(d_model: int = 24, seed: int = 0) -> tuple[Any, Any]:
    """A random one-layer ``T5EncoderModel`` and its in-memory tokenizer.

    Example:
        >>> enc, tok = tiny_t5_encoder(d_model=24)
        >>> enc(**tok(["a cat"], return_tensors="pt")).last_hidden_state.shape[-1]
        24
    """
    from transformers import T5Config, T5EncoderModel

    tok = _t5_tokenizer()
    torch.manual_seed(seed)
    return T5EncoderModel(T5Config(**_t5_config_kwargs(d_model, len(tok)))).eval(), tok


def tiny_umt5_encoder(d_model: int = 16, seed: int = 0) -> tuple[Any, Any]:
    """A random one-layer ``UMT5EncoderModel`` (Wan's text encoder class) and the in-memory
    T5 tokenizer (same vocabulary conventions: ``<pad>`` = 0, ``</s>`` = 1).

    Example:
        >>> enc, tok = tiny_umt5_encoder(d_model=16)
        >>> enc(**tok(["a cat"], return_tensors="pt")).last_hidden_state.shape[-1]
        16
    """
    from transformers import UMT5Config, UMT5EncoderModel

    tok = _t5_tokenizer()
    torch.manual_seed(seed)
    return UMT5EncoderModel(UMT5Config(**_t5_config_kwargs(d_model, len(tok)))).eval(), tok


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


def tiny_vae(latent_channels: int, seed: int = 0, **overrides: Any) -> Any:
    """A random ``AutoencoderKL`` with four levels (VAE scale factor 8, as in FLUX and PixArt).

    Example:
        >>> tiny_vae(4).config.latent_channels
        4
    """
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    kw: dict[str, Any] = dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=2,
        sample_size=64,
    )
    kw.update(overrides)
    return AutoencoderKL(**kw).eval()


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
