"""Train the moving-digits HunyuanVideo testbed (see :mod:`benchmarks.testbeds.video_testbed`) on CPU.

Each step draws training digits, a random direction per clip (:func:`random_velocities`) and
builds the clips on the fly (:func:`make_clips`). Rectified flow: ``x_t = (1 - s) x_0 + s * noise``
with ``s`` logit-normal (``sigmoid(N(m, 1))``), optionally time-shifted, MSE velocity target
``noise - x_0``. The class goes through the text path with its attention mask
(:class:`~benchmarks.testbeds.class_tokens.ClassTokenEncoder`, trained jointly); labels are replaced
by the null class once per sample with probability ``--cfg-dropout``. AdamW, warm-up then cosine
decay over the time budget, EMA of the weights, saved with ``save_pretrained`` (fp16 safetensors by
default) to ``<out>/transformer`` and ``<out>/text_encoder``, the sampler config to ``<out>/scheduler``.

Example::

    python -m benchmarks.testbeds.train_video_testbed --minutes 30 --out benchmarks/checkpoints/video_hunyuan
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from benchmarks.testbeds.digits import load_digits_images
from benchmarks.testbeds.training import (
    Option,
    WithTextEncoder,
    run_text_flow_training,
    seed_everything,
    text_flow_parser,
    two_stream_architecture,
)
from benchmarks.testbeds.video_testbed import (
    DEFAULT_CHECKPOINT,
    DEFAULT_FLOW_SHIFT,
    NULL_CLASS,
    NUM_FRAMES,
    make_clips,
    make_scheduler,
    make_text_encoder,
    make_transformer,
    random_velocities,
)


class VideoWithText(WithTextEncoder):
    """Transformer and class-token encoder as one trainable module (velocity of clips)."""

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Predicted velocity for clips ``x`` ``(B, 1, T, H, W)`` at noise levels ``sigma`` in ``[0, 1]``."""
        tokens, pooled, mask = self.text_encoder(labels)
        return self.transformer(
            hidden_states=x,
            timestep=sigma * 1000,
            encoder_hidden_states=tokens,
            encoder_attention_mask=mask,
            pooled_projections=pooled,
            return_dict=False,
        )[0]


FRAMES_OPTION: Option = ("--frames", {"type": int, "default": NUM_FRAMES})
"""``--frames``: the training clips' length (the moving-digits video testbeds)."""


def moving_clips(
    images: torch.Tensor, gen: torch.Generator, batch_size: int, frames: int
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``samples_of`` of :func:`run_text_flow_training` for the moving-digits testbeds: the
    training digits ``idx`` as ``frames``-long clips, each moving in a direction drawn from ``gen``."""

    def clips_of(idx: torch.Tensor) -> torch.Tensor:
        return make_clips(images[idx], random_velocities(batch_size, gen), frames)

    return clips_of


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    flow_shift = {"type": float, "default": DEFAULT_FLOW_SHIFT, "help": "sampler's static time shift"}
    p = text_flow_parser(
        __doc__,
        minutes=30.0,
        out=DEFAULT_CHECKPOINT,
        batch_size=12,
        batch_help="clips per step",
        lr=4e-4,
        architecture=two_stream_architecture(single_blocks=2, refiner_blocks=1),
        data_options=[FRAMES_OPTION],
        sampler_options=[("--flow-shift", flow_shift)],
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Train and save the video testbed."""
    args = parse_args(argv)
    gen = seed_everything(args)

    images, labels = load_digits_images("train")
    sample_sched = make_scheduler(args.flow_shift)
    model = VideoWithText(
        make_transformer(
            args.width,
            args.double_blocks,
            args.single_blocks,
            args.refiner_blocks,
            args.head_dim,
            args.text_dim,
        ),
        make_text_encoder(args.text_dim),
    )
    clips_of = moving_clips(images, gen, args.batch_size, args.frames)
    run_text_flow_training(args, gen, model, clips_of, labels, NULL_CLASS, sample_sched)


if __name__ == "__main__":
    main()
