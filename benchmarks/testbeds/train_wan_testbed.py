"""Train the moving-digits Wan testbed (see :mod:`benchmarks.testbeds.wan_testbed`) on CPU.

The same data, loss and loop as :mod:`benchmarks.testbeds.train_video_testbed`: clips built on
the fly from training digits and random directions, rectified flow (velocity target
``noise - x_0``, logit-normal noise levels), class tokens trained jointly with CFG label dropout,
AdamW with warm-up and cosine decay over the time budget, EMA saved as fp16 safetensors to
``<out>/transformer`` and ``<out>/text_encoder``, the UniPC sampler config to ``<out>/scheduler``;
``--state`` / ``--resume`` continue a run.

Example::

    python -m benchmarks.testbeds.train_wan_testbed --minutes 35 --out benchmarks/checkpoints/digits_wan \\
        --state /tmp/wan_state.pt
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.testbeds.digits import load_digits_images
from benchmarks.testbeds.train_video_testbed import FRAMES_OPTION, moving_clips
from benchmarks.testbeds.training import (
    WithTextEncoder,
    run_text_flow_training,
    seed_everything,
    text_flow_parser,
)
from benchmarks.testbeds.wan_testbed import (
    DEFAULT_CHECKPOINT,
    DEFAULT_FLOW_SHIFT,
    NULL_CLASS,
    make_scheduler,
    make_text_encoder,
    make_transformer,
)


class WanWithText(WithTextEncoder):
    """Transformer and class-token encoder as one trainable module (velocity of clips)."""

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Predicted velocity for clips ``x`` ``(B, 1, T, H, W)`` at noise levels ``sigma`` in ``[0, 1]``."""
        tokens, _, _ = self.text_encoder(labels)
        return self.transformer(
            hidden_states=x, timestep=sigma * 1000, encoder_hidden_states=tokens, return_dict=False
        )[0]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    flow_shift = {"type": float, "default": DEFAULT_FLOW_SHIFT, "help": "sampler's static flow shift"}
    p = text_flow_parser(
        __doc__,
        minutes=35.0,
        out=DEFAULT_CHECKPOINT,
        batch_size=8,
        batch_help="clips per step",
        lr=4e-4,
        architecture={"width": 128, "blocks": 4, "head-dim": 32, "text-dim": 64},
        data_options=[FRAMES_OPTION],
        sampler_options=[("--flow-shift", flow_shift)],
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Train and save the Wan testbed."""
    args = parse_args(argv)
    gen = seed_everything(args)

    images, labels = load_digits_images("train")
    model = WanWithText(
        make_transformer(args.width, args.blocks, args.head_dim, args.text_dim),
        make_text_encoder(args.text_dim),
    )
    clips_of = moving_clips(images, gen, args.batch_size, args.frames)
    run_text_flow_training(args, gen, model, clips_of, labels, NULL_CLASS, make_scheduler(args.flow_shift))


if __name__ == "__main__":
    main()
