"""A tiny FLUX-architecture model on scikit-learn's digits: the FLUX testbed for cache benchmarks.

A small :class:`diffusers.FluxTransformer2DModel` (double-stream blocks, then single-stream blocks,
joint attention over text and image tokens, 3-axis RoPE) works in pixel space on the 16x16 digits
of :func:`benchmarks.testbeds.digits.load_digits_images`, packed as FLUX packs its VAE latents:
each 2x2 patch of the ``(1, 16, 16)`` image becomes one token of ``in_channels = 4`` values
(``patch_size = 1``), 64 image tokens with ``img_ids = (0, row, col)``.

The digit class is given through the TEXT path, as a prompt is in FLUX: a
:class:`~benchmarks.testbeds.class_tokens.ClassTokenEncoder` (the pipeline's ``text_encoder``)
maps the class to ``encoder_hidden_states`` (4 learned tokens, ``txt_ids`` all zero as in FLUX)
and ``pooled_projections`` (a learned vector); class :data:`NULL_CLASS` is the empty prompt.

Training is rectified flow (``x_t = (1 - s) x_0 + s * noise``, velocity target ``noise - x_0``,
logit-normal ``s``); sampling is :class:`~diffusers.FlowMatchEulerDiscreteScheduler` with FLUX's
resolution-dependent time shift (``use_dynamic_shifting``; ``mu`` from the image sequence length
by :func:`calculate_shift`, with ``base/max_image_seq_len`` scaled to this model's 64 tokens) and
true classifier-free guidance: the conditional and unconditional branches run batched in ONE
transformer forward per step.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

from benchmarks.testbeds.class_tokens import ClassTokenEncoder
from benchmarks.testbeds.digits import IMAGE_SIZE, NUM_CLASSES
from benchmarks.testbeds.sampling import ClassTokenPipeline

NULL_CLASS = NUM_CLASSES
"""Class index of the empty prompt used by classifier-free guidance."""
TEXT_TOKENS = 4
"""Length of the learned class-token sequence."""
DEFAULT_GUIDANCE_SCALE = 7.0
"""Guidance scale the committed checkpoint was evaluated with (see ``docs/testbeds.md``)."""
DEFAULT_MAX_SHIFT = 2.2
"""FLUX ``max_shift`` (= ``mu`` for 64 tokens, shift factor ``exp(2.2) = 9.0``) of the committed sampler."""
DEFAULT_CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "digits_flux"
"""Folder of the committed checkpoint (``transformer/``, ``text_encoder/``, ``scheduler/``)."""


def calculate_shift(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """FLUX's time-shift exponent ``mu``, linear in the image sequence length (as in ``FluxPipeline``)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return image_seq_len * m + b


def pack(images: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, H/2 * W/2, C * 4)``: 2x2 patches as tokens, as ``FluxPipeline._pack_latents``."""
    b, c, h, w = images.shape
    x = images.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, height: int = IMAGE_SIZE, width: int = IMAGE_SIZE) -> torch.Tensor:
    """Inverse of :func:`pack`: ``(B, H/2 * W/2, C * 4)`` -> ``(B, C, H, W)``."""
    b, _, d = tokens.shape
    c = d // 4
    x = tokens.view(b, height // 2, width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, height, width)


def image_ids(height: int = IMAGE_SIZE, width: int = IMAGE_SIZE) -> torch.Tensor:
    """FLUX ``img_ids`` ``(H/2 * W/2, 3)``: ``(0, row, col)`` per packed token."""
    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] = torch.arange(height // 2)[:, None]
    ids[..., 2] = torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3)


def text_ids(num_tokens: int = TEXT_TOKENS) -> torch.Tensor:
    """FLUX ``txt_ids`` ``(L, 3)``: all zero."""
    return torch.zeros(num_tokens, 3)


def make_transformer(
    width: int = 128,
    double_blocks: int = 2,
    single_blocks: int = 4,
    head_dim: int = 32,
    text_dim: int = 64,
    pooled_dim: int = 64,
    channels: int = 1,
) -> FluxTransformer2DModel:
    """Build an untrained FLUX transformer for packed 16x16 1-channel digits (``channels`` image
    channels, packed 2x2 to ``4 * channels`` per token: the emoji testbed's 3).

    Args:
        width: Hidden size (``num_attention_heads * attention_head_dim``).
        double_blocks: Double-stream (``FluxTransformerBlock``) blocks.
        single_blocks: Single-stream (``FluxSingleTransformerBlock``) blocks.
        head_dim: Attention head dimension; RoPE axes split it ``(head_dim/4, 3/8, 3/8)``.
        text_dim: ``joint_attention_dim`` (width of the class tokens).
        pooled_dim: ``pooled_projection_dim``.
    """
    if width % head_dim or head_dim % 8:
        raise ValueError(f"width {width} must be a multiple of head_dim {head_dim}, itself a multiple of 8")
    axes = (head_dim // 4, 3 * head_dim // 8, 3 * head_dim // 8)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * channels,
        num_layers=double_blocks,
        num_single_layers=single_blocks,
        attention_head_dim=head_dim,
        num_attention_heads=width // head_dim,
        joint_attention_dim=text_dim,
        pooled_projection_dim=pooled_dim,
        guidance_embeds=False,
        axes_dims_rope=axes,
    )


def make_text_encoder(text_dim: int = 64, pooled_dim: int = 64) -> ClassTokenEncoder:
    """The learned class-token "text encoder" (null class :data:`NULL_CLASS`, all tokens valid)."""
    return ClassTokenEncoder(NUM_CLASSES, TEXT_TOKENS, text_dim, pooled_dim)


def make_scheduler(
    base_shift: float = 0.5,
    max_shift: float = DEFAULT_MAX_SHIFT,
    base_seq_len: int = 16,
    max_seq_len: int = 64,
) -> FlowMatchEulerDiscreteScheduler:
    """FLUX's sampler config, with the shift's sequence-length range scaled to 64-token images.

    A 64-token image gets ``mu = max_shift``, as a 4096-token image does in FLUX.1 (whose
    ``max_shift = 1.15``, shift factor ``exp(1.15) = 3.2``). The committed checkpoint uses
    :data:`DEFAULT_MAX_SHIFT` (shift factor 9.0), which makes 25 steps differ from 50 steps by
    about 29 dB instead of 36 dB with FLUX.1's value (``docs/testbeds.md``).
    """
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=1.0,
        use_dynamic_shifting=True,
        base_shift=base_shift,
        max_shift=max_shift,
        base_image_seq_len=base_seq_len,
        max_image_seq_len=max_seq_len,
        time_shift_type="exponential",
    )


class DigitsFluxPipeline(ClassTokenPipeline):
    """Class-conditional FLUX-style sampling (flow-matching Euler, true CFG) for the digits FLUX testbed.

    Mirrors :class:`diffusers.FluxPipeline` without a VAE: initial noise ``randn(B, 1, 16, 16)`` is
    packed to 64 tokens; ``sigmas = linspace(1, 1/n, n)`` and ``mu`` from :func:`calculate_shift`
    go to ``scheduler.set_timesteps`` (once per call); every step calls ``self.transformer``
    exactly once on ``[cond; uncond]`` (the class prompts first, then :data:`NULL_CLASS`) and
    combines ``v = uncond + s * (cond - uncond)``. With ``guidance_scale <= 1`` only the
    conditional half runs.

    Args:
        transformer: The trained ``FluxTransformer2DModel``.
        scheduler: A ``FlowMatchEulerDiscreteScheduler`` with dynamic shifting.
        text_encoder: The trained :class:`ClassTokenEncoder`.
    """

    null_class = NULL_CLASS
    default_guidance_scale = DEFAULT_GUIDANCE_SCALE
    transformer_cls = FluxTransformer2DModel
    default_checkpoint = DEFAULT_CHECKPOINT
    image_size = IMAGE_SIZE
    """Height and width of the (square) images; packed 2x2 to ``(image_size / 2) ** 2`` tokens."""

    def _extra_transformer_kwargs(self, kwargs: dict) -> dict:
        """More arguments of this step's transformer call, given its others (none here; the
        ControlNet pipeline adds its block samples)."""
        return {}

    def encode_prompt(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(encoder_hidden_states, pooled_projections, txt_ids)`` of the class labels."""
        tokens, pooled, _ = self.text_encoder(labels)
        dtype = self.transformer.dtype
        return tokens.to(dtype), pooled.to(dtype), text_ids(tokens.shape[1]).to(labels.device, dtype)

    def _sample_shape(self) -> tuple[int, ...]:
        """``(C, H, W)``: ``(1, 16, 16)`` (``C`` = the transformer's packed channels / 4)."""
        return (self.transformer.config.in_channels // 4, self.image_size, self.image_size)

    def _sample(self, labels: torch.Tensor, latents: torch.Tensor, steps: int, scale: float) -> torch.Tensor:
        """Pack, FLUX sigmas and ``mu``, one batched CFG call per step, unpack."""
        device, dtype = self._execution_device, self.transformer.dtype
        latents = pack(latents)
        prompt_embeds, pooled, txt_ids = self.encode_prompt(self._cfg_labels(labels, scale))
        img_ids = image_ids(self.image_size, self.image_size).to(device, dtype)

        def predict(model_input: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            kwargs = {
                "hidden_states": model_input,
                "timestep": t.expand(model_input.shape[0]).to(dtype) / 1000,
                "pooled_projections": pooled,
                "encoder_hidden_states": prompt_embeds,
                "txt_ids": txt_ids,
                "img_ids": img_ids,
            }
            return self.transformer(**kwargs, **self._extra_transformer_kwargs(kwargs), return_dict=False)[0]

        sigmas = np.linspace(1.0, 1.0 / steps, steps)
        cfg = self.scheduler.config
        mu = calculate_shift(
            latents.shape[1], cfg.base_image_seq_len, cfg.max_image_seq_len, cfg.base_shift, cfg.max_shift
        )
        self.scheduler.set_timesteps(sigmas=sigmas, mu=mu, device=device)
        latents = self._denoise(latents, scale, predict)
        return unpack(latents.float(), self.image_size, self.image_size)
