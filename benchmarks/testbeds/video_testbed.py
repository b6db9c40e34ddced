"""A tiny HunyuanVideo-architecture model on synthetic moving digits: the video testbed.

Clips (:func:`make_clips`) are :data:`NUM_FRAMES` frames of one 16x16 digit from
:func:`benchmarks.testbeds.digits.load_digits_images` translating in a straight line, one pixel
per frame along one of 8 directions (``(vx, vy)`` in ``{-1, 0, 1}^2 \\ {(0, 0)}``), through offsets
``-1, 0, 1, 2`` times the velocity, the uncovered border filled with the background. Clips are
``(B, 1, T, 16, 16)`` in ``[-1, 1]``, the layout ``HunyuanVideoTransformer3DModel`` takes.

A small :class:`diffusers.HunyuanVideoTransformer3DModel` (token refiner, double-stream blocks,
single-stream blocks, 3-axis RoPE over frames/rows/columns, 2x2 spatial patches: 64 tokens per
frame) denoises the clips in pixel space. The digit class goes through the TEXT path: a
:class:`~benchmarks.testbeds.class_tokens.ClassTokenEncoder` (the pipeline's ``text_encoder``)
gives 4 learned tokens with an ``encoder_attention_mask`` (the null class, the "empty prompt",
has one valid token and three padding tokens) and a pooled vector. There is no guidance
embedding (``guidance_embeds=False``): guidance is true classifier-free guidance.

Training is rectified flow (velocity target ``noise - x_0``); sampling follows
:class:`diffusers.HunyuanVideoPipeline`: ``sigmas = linspace(1, 0, n + 1)[:-1]`` on a
:class:`~diffusers.FlowMatchEulerDiscreteScheduler` with a static time shift, and the
conditional and unconditional branches batched in ONE transformer forward per step.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideoTransformer3DModel

from benchmarks.testbeds.class_tokens import ClassTokenEncoder
from benchmarks.testbeds.digits import IMAGE_SIZE, NUM_CLASSES
from benchmarks.testbeds.sampling import ClassTokenPipeline

NUM_FRAMES = 4
"""Frames per clip."""
NULL_CLASS = NUM_CLASSES
"""Class index of the empty prompt used by classifier-free guidance."""
TEXT_TOKENS = 4
"""Length of the learned class-token sequence."""
NULL_VALID_TOKENS = 1
"""Unmasked tokens of the null class (the rest is padding, masked by ``encoder_attention_mask``)."""
DEFAULT_GUIDANCE_SCALE = 7.0
"""Guidance scale the committed checkpoint was evaluated with (see ``docs/testbeds.md``)."""
DEFAULT_FLOW_SHIFT = 10.0
"""Static time shift of the committed sampler."""
DEFAULT_CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "video_hunyuan"
"""Folder of the committed checkpoint (``transformer/``, ``text_encoder/``, ``scheduler/``)."""
VELOCITIES = [(vx, vy) for vy in (-1, 0, 1) for vx in (-1, 0, 1) if (vx, vy) != (0, 0)]
"""The 8 motion directions, pixels per frame."""


def make_clips(
    images: torch.Tensor, velocities: torch.Tensor, num_frames: int = NUM_FRAMES, background: float = -1.0
) -> torch.Tensor:
    """Translate each image along its velocity to make a clip.

    Frame ``f`` shows the image shifted by ``(f - 1) * (vx, vy)`` pixels (right/down positive), the
    uncovered border filled with ``background``.

    Args:
        images: ``(B, 1, H, W)`` in ``[-1, 1]``.
        velocities: int64 ``(B, 2)`` of ``(vx, vy)``.
        num_frames: Clip length.
        background: Fill value.

    Returns:
        ``(B, 1, num_frames, H, W)``.
    """
    b, c, h, w = images.shape
    offsets = [f - 1 for f in range(num_frames)]
    pad = max(abs(o) for o in offsets)
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad), value=background)
    frames = torch.empty(b, c, num_frames, h, w, dtype=images.dtype)
    for i in range(b):
        vx, vy = (int(v) for v in velocities[i])
        for f, o in enumerate(offsets):
            dx, dy = o * vx, o * vy
            frames[i, :, f] = padded[i, :, pad - dy : pad - dy + h, pad - dx : pad - dx + w]
    return frames


def random_velocities(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``(n, 2)`` velocities drawn uniformly from :data:`VELOCITIES`."""
    idx = torch.randint(0, len(VELOCITIES), (n,), generator=generator)
    return torch.tensor(VELOCITIES, dtype=torch.long)[idx]


def make_transformer(
    width: int = 128,
    double_blocks: int = 2,
    single_blocks: int = 2,
    refiner_blocks: int = 1,
    head_dim: int = 32,
    text_dim: int = 64,
    pooled_dim: int = 64,
) -> HunyuanVideoTransformer3DModel:
    """Build an untrained HunyuanVideo transformer for 1-channel 16x16 clips (2x2 patches, 1 frame each).

    Args:
        width: Hidden size (``num_attention_heads * attention_head_dim``).
        double_blocks: Double-stream blocks.
        single_blocks: Single-stream blocks.
        refiner_blocks: Token-refiner blocks.
        head_dim: Attention head dimension; RoPE axes (t, h, w) split it ``(1/4, 3/8, 3/8)``.
        text_dim: ``text_embed_dim`` (width of the class tokens).
        pooled_dim: ``pooled_projection_dim``.
    """
    if width % head_dim or head_dim % 8:
        raise ValueError(f"width {width} must be a multiple of head_dim {head_dim}, itself a multiple of 8")
    return HunyuanVideoTransformer3DModel(
        in_channels=1,
        out_channels=1,
        num_attention_heads=width // head_dim,
        attention_head_dim=head_dim,
        num_layers=double_blocks,
        num_single_layers=single_blocks,
        num_refiner_layers=refiner_blocks,
        mlp_ratio=4.0,
        patch_size=2,
        patch_size_t=1,
        qk_norm="rms_norm",
        guidance_embeds=False,
        text_embed_dim=text_dim,
        pooled_projection_dim=pooled_dim,
        rope_theta=256.0,
        rope_axes_dim=(head_dim // 4, 3 * head_dim // 8, 3 * head_dim // 8),
    )


def make_text_encoder(text_dim: int = 64, pooled_dim: int = 64) -> ClassTokenEncoder:
    """The learned class-token "text encoder" (null class with :data:`NULL_VALID_TOKENS` valid tokens)."""
    return ClassTokenEncoder(NUM_CLASSES, TEXT_TOKENS, text_dim, pooled_dim, NULL_VALID_TOKENS)


def make_scheduler(shift: float = DEFAULT_FLOW_SHIFT) -> FlowMatchEulerDiscreteScheduler:
    """HunyuanVideo's sampler: flow-matching Euler with a static time shift (``flow_shift``).

    HunyuanVideo samples with ``flow_shift = 7``; the committed checkpoint uses
    :data:`DEFAULT_FLOW_SHIFT` (25 vs 50 steps about 29 dB instead of 32 dB, ``docs/testbeds.md``).
    """
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


class MovingDigitsVideoPipeline(ClassTokenPipeline):
    """Class-conditional video sampling (flow-matching Euler, true CFG) for the HunyuanVideo testbed.

    Mirrors :class:`diffusers.HunyuanVideoPipeline` without a VAE: ``sigmas = linspace(1, 0, n + 1)[:-1]``
    go to ``scheduler.set_timesteps`` once per call; every step calls ``self.transformer`` exactly
    once on ``[cond; uncond]`` (class prompts first, then :data:`NULL_CLASS`, with their
    ``encoder_attention_mask``), ``timestep = t`` (0..1000), and combines
    ``v = uncond + s * (cond - uncond)``. With ``guidance_scale <= 1`` only the conditional half runs.

    Args:
        transformer: The trained ``HunyuanVideoTransformer3DModel``.
        scheduler: A ``FlowMatchEulerDiscreteScheduler``.
        text_encoder: The trained :class:`ClassTokenEncoder`.
    """

    null_class = NULL_CLASS
    default_guidance_scale = DEFAULT_GUIDANCE_SCALE
    transformer_cls = HunyuanVideoTransformer3DModel
    default_checkpoint = DEFAULT_CHECKPOINT

    def encode_prompt(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(encoder_hidden_states, pooled_projections, encoder_attention_mask)`` of the class labels."""
        tokens, pooled, mask = self.text_encoder(labels)
        dtype = self.transformer.dtype
        return tokens.to(dtype), pooled.to(dtype), mask

    def _sample_shape(self, num_frames: int = NUM_FRAMES) -> tuple[int, ...]:
        """``(C, T, H, W)`` of a ``num_frames``-long clip (``num_frames`` is a call option)."""
        return (self.transformer.config.in_channels, num_frames, IMAGE_SIZE, IMAGE_SIZE)

    def _sample(self, labels: torch.Tensor, latents: torch.Tensor, steps: int, scale: float) -> torch.Tensor:
        """HunyuanVideo sigmas, one batched CFG call per step (with the attention mask)."""
        device, dtype = self._execution_device, self.transformer.dtype
        prompt_embeds, pooled, mask = self.encode_prompt(self._cfg_labels(labels, scale))

        def predict(model_input: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.transformer(
                hidden_states=model_input,
                timestep=t.expand(model_input.shape[0]).to(dtype),
                encoder_hidden_states=prompt_embeds,
                encoder_attention_mask=mask,
                pooled_projections=pooled,
                return_dict=False,
            )[0]

        sigmas = np.linspace(1.0, 0.0, steps + 1)[:-1]
        self.scheduler.set_timesteps(sigmas=sigmas, device=device)
        return self._denoise(latents, scale, predict).float()


def frames_of(clips: torch.Tensor) -> torch.Tensor:
    """``(B, C, T, H, W)`` clips -> ``(B * T, C, H, W)`` frames (clip-major), for per-frame metrics."""
    b, c, t, h, w = clips.shape
    return clips.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
