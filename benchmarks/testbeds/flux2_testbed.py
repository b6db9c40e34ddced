"""A tiny FLUX.2-architecture model on scikit-learn's digits: the FLUX.2 image testbed.

A small :class:`diffusers.Flux2Transformer2DModel` (double-stream blocks with shared modulation,
then fused single-stream blocks, SwiGLU feed-forwards, 4-axis RoPE over ``(t, h, w, l)``) works in
pixel space on the 16x16 digits of :func:`benchmarks.testbeds.digits.load_digits_images`, patchified
and packed as :class:`diffusers.Flux2Pipeline` does with its VAE latents
(:func:`patchify`: each 2x2 patch of the ``(1, 16, 16)`` image becomes 4 channels; :func:`pack`:
``(B, 4, 8, 8)`` -> 64 tokens ``(B, 64, 4)``), with ``img_ids = (0, row, col, 0)``
(:func:`image_ids`) and ``txt_ids = (0, 0, 0, l)`` (:func:`text_ids`).

The digit class is the prompt: a :class:`~benchmarks.testbeds.class_tokens.ClassTokenEncoder`
(the pipeline's ``text_encoder``) maps it to 4 learned ``encoder_hidden_states`` tokens (FLUX.2
has no pooled text vector); class :data:`NULL_CLASS` is the empty prompt.

FLUX.2 [dev] is guidance-distilled (``guidance_embeds=True``, one call per step with the guidance
scale embedded), which cannot be trained from scratch here. The testbed is the undistilled
FLUX.2 form, ``guidance_embeds=False``, sampled as :class:`diffusers.Flux2KleinPipeline` samples
its base models (same transformer class, same conventions as ``Flux2Pipeline`` otherwise):
flow-matching Euler, ``sigmas = linspace(1, 1/n, n)``, ``mu`` from :func:`compute_empirical_mu`
(FLUX.2's step-count-dependent shift), ``timestep = t / 1000``, and true classifier-free guidance
with TWO transformer calls per step, inside ``transformer.cache_context("cond")`` and
``cache_context("uncond")``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel

from benchmarks.testbeds.class_tokens import ClassTokenEncoder
from benchmarks.testbeds.digits import IMAGE_SIZE, NUM_CLASSES
from benchmarks.testbeds.sampling import ClassTokenPipeline

NULL_CLASS = NUM_CLASSES
"""Class index of the empty prompt used by classifier-free guidance."""
TEXT_TOKENS = 4
"""Length of the learned class-token sequence."""
DEFAULT_GUIDANCE_SCALE = 4.0
"""Guidance scale of the benchmark (``Flux2KleinPipeline``'s default is 4.0)."""
DEFAULT_CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "digits_flux2"
"""Folder of the committed checkpoint (``transformer/``, ``text_encoder/``, ``scheduler/``)."""


def compute_empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """FLUX.2's time-shift exponent ``mu`` (``diffusers.pipelines.flux2.pipeline_flux2``), linear in
    the sequence length and in the step count (for 64 tokens: 1.79 at 25 steps, 1.60 at 50)."""
    a1, b1 = 8.73809524e-05, 1.89833333
    a2, b2 = 0.00016927, 0.45666666
    if image_seq_len > 4300:
        return float(a2 * image_seq_len + b2)
    m_200 = a2 * image_seq_len + b2
    m_10 = a1 * image_seq_len + b1
    a = (m_200 - m_10) / 190.0
    b = m_200 - 200.0 * a
    return float(a * num_steps + b)


def patchify(images: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, 4C, H/2, W/2)``, as ``Flux2Pipeline._patchify_latents``."""
    b, c, h, w = images.shape
    x = images.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(b, c * 4, h // 2, w // 2)


def unpatchify(latents: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`patchify`, as ``Flux2Pipeline._unpatchify_latents``."""
    b, c, h, w = latents.shape
    x = latents.reshape(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(b, c // 4, h * 2, w * 2)


def pack(images: torch.Tensor) -> torch.Tensor:
    """``(B, 1, 16, 16)`` images -> ``(B, 64, 4)`` tokens: :func:`patchify`, then
    ``Flux2Pipeline._pack_latents`` (row-major tokens, channels last)."""
    x = patchify(images)
    b, c, h, w = x.shape
    return x.reshape(b, c, h * w).permute(0, 2, 1)


def unpack(tokens: torch.Tensor, height: int = IMAGE_SIZE, width: int = IMAGE_SIZE) -> torch.Tensor:
    """Inverse of :func:`pack`: ``(B, 64, 4)`` -> ``(B, 1, 16, 16)``."""
    b, _, c = tokens.shape
    return unpatchify(tokens.permute(0, 2, 1).reshape(b, c, height // 2, width // 2))


def image_ids(batch: int = 1, height: int = IMAGE_SIZE, width: int = IMAGE_SIZE) -> torch.Tensor:
    """FLUX.2 ``img_ids`` ``(B, H/2 * W/2, 4)``: ``(t=0, row, col, l=0)`` per token."""
    coords = torch.cartesian_prod(
        torch.arange(1), torch.arange(height // 2), torch.arange(width // 2), torch.arange(1)
    )
    return coords.unsqueeze(0).expand(batch, -1, -1)


def text_ids(batch: int = 1, num_tokens: int = TEXT_TOKENS) -> torch.Tensor:
    """FLUX.2 ``txt_ids`` ``(B, L, 4)``: ``(0, 0, 0, l)``."""
    coords = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(num_tokens))
    return coords.unsqueeze(0).expand(batch, -1, -1)


def make_transformer(
    width: int = 128, double_blocks: int = 2, single_blocks: int = 4, head_dim: int = 32, text_dim: int = 64
) -> Flux2Transformer2DModel:
    """Build an untrained FLUX.2 transformer for packed 16x16 1-channel digits.

    Args:
        width: Hidden size (``num_attention_heads * attention_head_dim``).
        double_blocks: Double-stream (``Flux2TransformerBlock``) blocks.
        single_blocks: Single-stream (``Flux2SingleTransformerBlock``) blocks.
        head_dim: Attention head dimension, split equally over the 4 RoPE axes.
        text_dim: ``joint_attention_dim`` (width of the class tokens).
    """
    if width % head_dim or head_dim % 8:
        raise ValueError(f"width {width} must be a multiple of head_dim {head_dim}, itself a multiple of 8")
    return Flux2Transformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=double_blocks,
        num_single_layers=single_blocks,
        attention_head_dim=head_dim,
        num_attention_heads=width // head_dim,
        joint_attention_dim=text_dim,
        timestep_guidance_channels=256,
        mlp_ratio=3.0,
        axes_dims_rope=(head_dim // 4,) * 4,
        rope_theta=2000,
        guidance_embeds=False,
    )


def make_text_encoder(text_dim: int = 64) -> ClassTokenEncoder:
    """The learned class-token "text encoder" (null class :data:`NULL_CLASS`; pooled vector unused)."""
    return ClassTokenEncoder(NUM_CLASSES, TEXT_TOKENS, text_dim, 1)


def make_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """FLUX.2's sampler config: flow-matching Euler with dynamic (exponential) shifting by ``mu``."""
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
        time_shift_type="exponential",
    )


class DigitsFlux2Pipeline(ClassTokenPipeline):
    """Class-conditional FLUX.2-style sampling for the digits FLUX.2 testbed (no VAE).

    Initial noise ``randn(B, 1, 16, 16)`` is packed to 64 tokens (:func:`pack`);
    ``sigmas = linspace(1, 1/n, n)`` and ``mu = compute_empirical_mu(64, n)`` go to
    ``scheduler.set_timesteps`` once per call; every step calls ``self.transformer`` with the class
    prompts inside ``cache_context("cond")`` and, when ``guidance_scale > 1``, with
    :data:`NULL_CLASS` inside ``cache_context("uncond")`` (``Flux2KleinPipeline``'s true CFG),
    ``timestep = t / 1000``, ``guidance=None``; ``v = uncond + s * (cond - uncond)``.

    Args:
        transformer: The trained ``Flux2Transformer2DModel``.
        scheduler: A ``FlowMatchEulerDiscreteScheduler`` with dynamic shifting.
        text_encoder: The trained :class:`ClassTokenEncoder`.
    """

    null_class = NULL_CLASS
    default_guidance_scale = DEFAULT_GUIDANCE_SCALE
    transformer_cls = Flux2Transformer2DModel
    default_checkpoint = DEFAULT_CHECKPOINT

    def encode_prompt(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(prompt_embeds (B, 4, text_dim), text_ids (B, 4, 4))`` of the class labels."""
        tokens, _, _ = self.text_encoder(labels)
        return tokens.to(self.transformer.dtype), text_ids(labels.shape[0], tokens.shape[1]).to(labels.device)

    def _sample_shape(self) -> tuple[int, ...]:
        """``(C, H, W)``: ``(1, 16, 16)`` (``C`` = the transformer's packed channels / 4)."""
        return (self.transformer.config.in_channels // 4, IMAGE_SIZE, IMAGE_SIZE)

    def _sample(self, labels: torch.Tensor, latents: torch.Tensor, steps: int, scale: float) -> torch.Tensor:
        """Pack, FLUX.2 sigmas and empirical ``mu``, cond and uncond calls in their cache contexts."""
        device, dtype = self._execution_device, self.transformer.dtype
        latents = pack(latents)
        img_ids = image_ids(labels.shape[0]).to(device)

        def predictor(class_labels: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
            prompt_embeds, txt_ids = self.encode_prompt(class_labels)

            def predict(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                return self.transformer(
                    hidden_states=x.to(dtype),
                    timestep=t.expand(x.shape[0]).to(dtype) / 1000,
                    guidance=None,
                    encoder_hidden_states=prompt_embeds,
                    txt_ids=txt_ids,
                    img_ids=img_ids,
                    return_dict=False,
                )[0]

            return predict

        predict_cond = predictor(labels)
        predict_uncond = predictor(torch.full_like(labels, NULL_CLASS)) if scale > 1.0 else None
        sigmas = np.linspace(1.0, 1.0 / steps, steps)
        mu = compute_empirical_mu(latents.shape[1], steps)
        self.scheduler.set_timesteps(sigmas=sigmas, mu=mu, device=device)
        latents = self._denoise(latents, scale, predict_cond, predict_uncond, two_calls=True)
        return unpack(latents.float())
