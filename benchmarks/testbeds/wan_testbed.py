"""A tiny Wan-architecture model on the moving digits of the video testbed: the Wan video testbed.

The clips are those of :mod:`benchmarks.testbeds.video_testbed` (:func:`make_clips`: one 16x16
digit translating one pixel per frame for :data:`NUM_FRAMES` frames, ``(B, 1, T, 16, 16)`` in
``[-1, 1]``), the layout :class:`diffusers.WanTransformer3DModel` takes in pixel space.

A small :class:`diffusers.WanTransformer3DModel` (patch ``(1, 2, 2)``: 64 tokens per frame, 3-axis
RoPE over frames/rows/columns, self-attention, cross-attention to the text, feed-forward, a shared
timestep modulation) denoises the clips. The digit class goes through the TEXT path as a prompt
does in Wan: a :class:`~benchmarks.testbeds.class_tokens.ClassTokenEncoder` (the pipeline's
``text_encoder``) gives 4 learned tokens of width ``text_dim``, which the transformer's own
``condition_embedder.text_embedder`` projects to its width and cross-attends to. As Wan pads its
UMT5 prompt embeddings with zeros (no attention mask reaches the transformer), the null class (the
"empty prompt") has one valid token and three zero tokens.

Training is rectified flow (velocity target ``noise - x_0``), exactly as the other testbeds;
sampling follows :class:`diffusers.WanPipeline`: a
:class:`~diffusers.UniPCMultistepScheduler` with flow sigmas and a static ``flow_shift``
(``prediction_type="flow_prediction"``, as the Wan 2.1 checkpoints ship it),
``scheduler.set_timesteps(num_inference_steps)``, ``timestep = t`` (0..1000), and true
classifier-free guidance with TWO transformer calls per step, the conditional one inside
``transformer.cache_context("cond")`` and the unconditional one inside
``transformer.cache_context("uncond")`` (both given ``step_index``, ``sigma`` and
``num_inference_steps``, as ``WanPipeline`` gives them), combined ``uncond + s * (cond - uncond)``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from diffusers import UniPCMultistepScheduler, WanTransformer3DModel

from benchmarks.testbeds.class_tokens import ClassTokenEncoder
from benchmarks.testbeds.digits import IMAGE_SIZE, NUM_CLASSES
from benchmarks.testbeds.sampling import ClassTokenPipeline
from benchmarks.testbeds.video_testbed import NUM_FRAMES, frames_of, make_clips, random_velocities

__all__ = [
    "DEFAULT_CHECKPOINT",
    "DEFAULT_FLOW_SHIFT",
    "DEFAULT_GUIDANCE_SCALE",
    "NULL_CLASS",
    "NUM_FRAMES",
    "frames_of",
    "MovingDigitsWanPipeline",
    "make_clips",
    "make_scheduler",
    "make_text_encoder",
    "make_transformer",
    "random_velocities",
]

NULL_CLASS = NUM_CLASSES
"""Class index of the empty prompt used by classifier-free guidance."""
TEXT_TOKENS = 4
"""Length of the learned class-token sequence."""
NULL_VALID_TOKENS = 1
"""Non-zero tokens of the null class (the rest are zeros, as Wan's padded prompt embeddings)."""
DEFAULT_GUIDANCE_SCALE = 5.0
"""Guidance scale of the benchmark (``WanPipeline``'s default is 5.0)."""
DEFAULT_FLOW_SHIFT = 5.0
"""Static flow shift of the committed sampler (Wan 2.1 uses 3.0 at 480p, 5.0 at 720p)."""
DEFAULT_CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "digits_wan"
"""Folder of the committed checkpoint (``transformer/``, ``text_encoder/``, ``scheduler/``)."""


def make_transformer(
    width: int = 128, blocks: int = 4, head_dim: int = 32, text_dim: int = 64, ffn_mult: int = 4
) -> WanTransformer3DModel:
    """Build an untrained Wan transformer for 1-channel 16x16 clips (patch ``(1, 2, 2)``).

    Args:
        width: Hidden size (``num_attention_heads * attention_head_dim``).
        blocks: ``WanTransformerBlock`` blocks.
        head_dim: Attention head dimension (Wan's RoPE splits it over frames, rows, columns).
        text_dim: ``text_dim`` (width of the class tokens, projected to ``width`` inside).
        ffn_mult: ``ffn_dim = ffn_mult * width``.
    """
    if width % head_dim:
        raise ValueError(f"width {width} must be a multiple of head_dim {head_dim}")
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=width // head_dim,
        attention_head_dim=head_dim,
        in_channels=1,
        out_channels=1,
        text_dim=text_dim,
        freq_dim=256,
        ffn_dim=ffn_mult * width,
        num_layers=blocks,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        rope_max_seq_len=64,
    )


def make_text_encoder(text_dim: int = 64) -> ClassTokenEncoder:
    """The learned class-token "text encoder" (null class with :data:`NULL_VALID_TOKENS` non-zero tokens;
    the pooled vector is unused by Wan)."""
    return ClassTokenEncoder(NUM_CLASSES, TEXT_TOKENS, text_dim, 1, NULL_VALID_TOKENS)


def make_scheduler(flow_shift: float = DEFAULT_FLOW_SHIFT) -> UniPCMultistepScheduler:
    """Wan's sampler: UniPC (bh2, order 2) on flow sigmas with a static ``flow_shift``, as the
    ``Wan-AI/Wan2.1-T2V-*-Diffusers`` scheduler configs."""
    return UniPCMultistepScheduler(
        num_train_timesteps=1000,
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=flow_shift,
        solver_order=2,
        solver_type="bh2",
        predict_x0=True,
        lower_order_final=True,
        final_sigmas_type="zero",
    )


class MovingDigitsWanPipeline(ClassTokenPipeline):
    """Class-conditional video sampling for the Wan testbed, with :class:`diffusers.WanPipeline`'s
    call structure (no VAE).

    ``scheduler.set_timesteps(num_inference_steps)`` once per call; every step calls
    ``self.transformer`` on the class prompts inside ``cache_context("cond")`` and, when
    ``guidance_scale > 1``, again on :data:`NULL_CLASS` inside ``cache_context("uncond")``, with
    ``timestep = t`` (0..1000); ``v = uncond + s * (cond - uncond)``; ``scheduler.step``.

    Args:
        transformer: The trained ``WanTransformer3DModel``.
        scheduler: A ``UniPCMultistepScheduler`` with flow sigmas (or a flow-matching Euler one).
        text_encoder: The trained :class:`ClassTokenEncoder`.
    """

    null_class = NULL_CLASS
    default_guidance_scale = DEFAULT_GUIDANCE_SCALE
    transformer_cls = WanTransformer3DModel
    scheduler_cls = UniPCMultistepScheduler
    default_checkpoint = DEFAULT_CHECKPOINT

    def encode_prompt(self, labels: torch.Tensor) -> torch.Tensor:
        """``encoder_hidden_states`` ``(B, 4, text_dim)`` of the class labels (padding tokens zero)."""
        tokens, _, _ = self.text_encoder(labels)
        return tokens.to(self.transformer.dtype)

    def _sample_shape(self, num_frames: int = NUM_FRAMES) -> tuple[int, ...]:
        """``(C, T, H, W)`` of a ``num_frames``-long clip (``num_frames`` is a call option)."""
        return (self.transformer.config.in_channels, num_frames, IMAGE_SIZE, IMAGE_SIZE)

    def _sample(self, labels: torch.Tensor, latents: torch.Tensor, steps: int, scale: float) -> torch.Tensor:
        """The scheduler's own timesteps, cond and uncond calls in their cache contexts (with the
        step index, sigma and step count, as ``WanPipeline``)."""
        device, dtype = self._execution_device, self.transformer.dtype

        def predictor(class_labels: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
            prompt_embeds = self.encode_prompt(class_labels)

            def predict(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                return self.transformer(
                    hidden_states=x.to(dtype),
                    timestep=t.expand(x.shape[0]),
                    encoder_hidden_states=prompt_embeds,
                    return_dict=False,
                )[0]

            return predict

        predict_cond = predictor(labels)
        predict_uncond = predictor(torch.full_like(labels, NULL_CLASS)) if scale > 1.0 else None
        self.scheduler.set_timesteps(steps, device=device)
        num_timesteps = len(self.scheduler.timesteps)

        def step_context(i: int) -> dict[str, Any]:
            sigma = float(self.scheduler.sigmas[i])
            return {"step_index": i, "sigma": sigma, "num_inference_steps": num_timesteps}

        latents = self._denoise(latents, scale, predict_cond, predict_uncond, step_context, two_calls=True)
        return latents.float()
