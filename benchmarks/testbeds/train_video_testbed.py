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

import torch

from benchmarks.testbeds.digits import load_digits_images
from benchmarks.testbeds.training import (
    WithTextEncoder,
    add_architecture_args,
    add_flow_args,
    add_optimizer_args,
    add_save_args,
    add_state_args,
    run_text_flow_training,
    seed_everything,
    training_parser,
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = training_parser(
        __doc__, minutes=30.0, out=DEFAULT_CHECKPOINT, batch_size=12, batch_help="clips per step"
    )
    p.add_argument("--frames", type=int, default=NUM_FRAMES)
    add_optimizer_args(p, lr=4e-4, ema_decay=0.998, null_name="class")
    add_architecture_args(p, single_blocks=2, refiner_blocks=1)
    add_flow_args(p)
    p.add_argument("--flow-shift", type=float, default=DEFAULT_FLOW_SHIFT, help="sampler's static time shift")
    add_save_args(p, log_every=50)
    add_state_args(p)
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

    def clips_of(idx: torch.Tensor) -> torch.Tensor:
        """The training digits ``idx`` as clips, each moving in a random direction."""
        return make_clips(images[idx], random_velocities(args.batch_size, gen), args.frames)

    run_text_flow_training(args, gen, model, clips_of, labels, NULL_CLASS, sample_sched)


if __name__ == "__main__":
    main()
