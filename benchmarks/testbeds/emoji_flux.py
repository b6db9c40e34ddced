"""A FLUX-architecture model on 32x32 RGB colour emoji: the emoji FLUX testbed (issue 13, point 1).

The digits FLUX testbed (:mod:`benchmarks.testbeds.flux_testbed`) is too easy for cache methods:
each digit class is a narrow distribution of smooth 16x16 images on a flat background, so its
flow trajectories are nearly straight and features barely change between adjacent steps
(``docs/testbeds.md``). This one keeps the architecture and the sampler and changes the data and
the size: the 2251 emoji of :mod:`benchmarks.testbeds.emoji` (detailed, multimodal RGB images)
with only 8 coarse classes as the condition (faces, people, animals/nature, food, travel/places,
objects, symbols, flags), packed 2x2 as FLUX packs latents (256 tokens x 12 channels), and a
wider and deeper :class:`diffusers.FluxTransformer2DModel`.

The class goes through the TEXT path (:class:`~benchmarks.testbeds.class_tokens.ClassTokenEncoder`,
class :data:`NULL_CLASS` is the empty prompt); sampling is FLUX's (flow-matching Euler,
dynamic time shift with ``mu = max_shift`` at this model's 256 tokens, true CFG batched in ONE
transformer forward per step) through :class:`EmojiFluxPipeline`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

from benchmarks.testbeds.class_tokens import ClassTokenEncoder
from benchmarks.testbeds.emoji import IMAGE_SIZE, NUM_CLASSES

# pack, unpack, calculate_shift and text_ids: the emoji tokens pack, shift and are placed as the
# digits' (re-exported)
from benchmarks.testbeds.flux_testbed import (  # noqa: F401
    DigitsFluxPipeline,
    calculate_shift,
    image_ids,
    pack,
    text_ids,
    unpack,
)
from benchmarks.testbeds.flux_testbed import (
    make_transformer as flux_make_transformer,
)

NULL_CLASS = NUM_CLASSES
"""Class index of the empty prompt used by classifier-free guidance."""
TEXT_TOKENS = 4
"""Length of the learned class-token sequence."""
CHANNELS = 3
"""RGB."""
TOKENS = (IMAGE_SIZE // 2) ** 2
"""Image tokens (256)."""
DEFAULT_GUIDANCE_SCALE = 4.0
"""Guidance scale of the testbed."""
DEFAULT_MAX_SHIFT = 1.15
"""FLUX ``max_shift`` (= ``mu`` at 256 tokens); FLUX.1's own value (shift factor 3.16)."""
DEFAULT_CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "emoji_flux"
"""Folder of the committed checkpoint (``transformer/``, ``text_encoder/``, ``scheduler/``)."""


def emoji_image_ids() -> torch.Tensor:
    """FLUX ``img_ids`` of the 16x16 token grid."""
    return image_ids(IMAGE_SIZE, IMAGE_SIZE)


def make_transformer(
    width: int = 192,
    double_blocks: int = 2,
    single_blocks: int = 4,
    head_dim: int = 64,
    text_dim: int = 64,
    pooled_dim: int = 64,
) -> FluxTransformer2DModel:
    """An untrained FLUX transformer for packed 32x32 RGB images (12 channels per token): the
    digits testbed's :func:`~benchmarks.testbeds.flux_testbed.make_transformer`, wider and RGB."""
    return flux_make_transformer(
        width, double_blocks, single_blocks, head_dim, text_dim, pooled_dim, channels=CHANNELS
    )


def make_text_encoder(text_dim: int = 64, pooled_dim: int = 64) -> ClassTokenEncoder:
    """The learned class-token "text encoder" (8 classes + the null class)."""
    return ClassTokenEncoder(NUM_CLASSES, TEXT_TOKENS, text_dim, pooled_dim)


def make_scheduler(
    max_shift: float = DEFAULT_MAX_SHIFT, base_shift: float = 0.5
) -> FlowMatchEulerDiscreteScheduler:
    """FLUX's sampler config with the shift's sequence-length range scaled to 256 tokens
    (``base_image_seq_len`` 16, ``max_image_seq_len`` 256: ``mu = max_shift`` here)."""
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=1.0,
        use_dynamic_shifting=True,
        base_shift=base_shift,
        max_shift=max_shift,
        base_image_seq_len=16,
        max_image_seq_len=TOKENS,
        time_shift_type="exponential",
    )


class EmojiFluxPipeline(DigitsFluxPipeline):
    """:class:`~benchmarks.testbeds.flux_testbed.DigitsFluxPipeline` at 32x32 RGB (emoji classes).

    Initial noise ``randn(B, 3, 32, 32)`` packed to 256 tokens x 12; otherwise the digits FLUX
    pipeline's loop: ``sigmas = linspace(1, 1/n, n)``, ``mu`` from the sequence length, one
    ``set_timesteps`` per call, ONE transformer call per step on ``[cond; uncond]``. Its call
    returns ``(B, 3, 32, 32)`` in ``[0, 1]`` (``"np"``: channels last).
    """

    default_checkpoint = DEFAULT_CHECKPOINT
    null_class = NULL_CLASS
    default_guidance_scale = DEFAULT_GUIDANCE_SCALE
    image_size = IMAGE_SIZE
