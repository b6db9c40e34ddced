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
from benchmarks.testbeds.training import (
    WithTextEncoder,
    add_flow_args,
    add_optimizer_args,
    add_save_args,
    add_state_args,
    run_text_flow_training,
    seed_everything,
    training_parser,
)
from benchmarks.testbeds.wan_testbed import (
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
    p = training_parser(
        __doc__, minutes=35.0, out=DEFAULT_CHECKPOINT, batch_size=8, batch_help="clips per step"
    )
    p.add_argument("--frames", type=int, default=NUM_FRAMES)
    add_optimizer_args(p, lr=4e-4, ema_decay=0.998, null_name="class")
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--text-dim", type=int, default=64)
    add_flow_args(p)
    p.add_argument("--flow-shift", type=float, default=DEFAULT_FLOW_SHIFT, help="sampler's static flow shift")
    add_save_args(p, log_every=50)
    add_state_args(p)
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

    def clips_of(idx: torch.Tensor) -> torch.Tensor:
        """The training digits ``idx`` as clips, each moving in a random direction."""
        return make_clips(images[idx], random_velocities(args.batch_size, gen), args.frames)

    run_text_flow_training(args, gen, model, clips_of, labels, NULL_CLASS, make_scheduler(args.flow_shift))


if __name__ == "__main__":
    main()
