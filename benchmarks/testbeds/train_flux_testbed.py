"""Train the digits FLUX testbed (see :mod:`benchmarks.testbeds.flux_testbed`) on CPU for a fixed wall time.

Rectified flow: ``x_t = (1 - s) x_0 + s * noise`` with ``s`` drawn logit-normal (``sigmoid(N(m, 1))``,
as SD3/FLUX training), optionally time-shifted, and an MSE velocity target ``noise - x_0``. The
class goes through the text path (:class:`~benchmarks.testbeds.class_tokens.ClassTokenEncoder`,
trained jointly); labels are replaced by the null class once per sample with probability
``--cfg-dropout``. AdamW, warm-up then cosine decay over the time budget, EMA of the weights. The
EMA transformer and text encoder are saved with ``save_pretrained`` (fp16 safetensors by default)
to ``<out>/transformer`` and ``<out>/text_encoder``, the sampler config to ``<out>/scheduler``.

Example::

    python -m benchmarks.testbeds.train_flux_testbed --minutes 30 --out benchmarks/checkpoints/digits_flux
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.testbeds.digits import load_digits_images
from benchmarks.testbeds.flux_testbed import (
    DEFAULT_CHECKPOINT,
    DEFAULT_MAX_SHIFT,
    NULL_CLASS,
    image_ids,
    make_scheduler,
    make_text_encoder,
    make_transformer,
    pack,
    text_ids,
)
from benchmarks.testbeds.training import (
    WithTextEncoder,
    run_text_flow_training,
    seed_everything,
    text_flow_parser,
    two_stream_architecture,
)


class FluxWithText(WithTextEncoder):
    """Transformer and class-token encoder as one trainable module (velocity of packed tokens).

    ``img_ids`` are the FLUX position ids of the packed image (default: the 16x16 digits' 8x8 token
    grid; the emoji testbed passes its 16x16 grid)."""

    def __init__(
        self, transformer: torch.nn.Module, text_encoder: torch.nn.Module, img_ids: torch.Tensor | None = None
    ) -> None:
        super().__init__(transformer, text_encoder)
        self.register_buffer("img_ids", image_ids() if img_ids is None else img_ids, persistent=False)
        self.register_buffer("txt_ids", text_ids(), persistent=False)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Predicted velocity for packed tokens ``x`` at noise levels ``sigma`` in ``[0, 1]``."""
        tokens, pooled, _ = self.text_encoder(labels)
        return self.transformer(
            hidden_states=x,
            timestep=sigma,
            pooled_projections=pooled,
            encoder_hidden_states=tokens,
            txt_ids=self.txt_ids,
            img_ids=self.img_ids,
            return_dict=False,
        )[0]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    max_shift = {
        "type": float,
        "default": DEFAULT_MAX_SHIFT,
        "help": "sampler's FLUX max_shift (mu for 64 tokens)",
    }
    p = text_flow_parser(
        __doc__,
        minutes=30.0,
        out=DEFAULT_CHECKPOINT,
        batch_size=64,
        lr=5e-4,
        architecture=two_stream_architecture(),
        sampler_options=[("--max-shift", max_shift)],
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Train and save the digits FLUX testbed."""
    args = parse_args(argv)
    gen = seed_everything(args)

    images, labels = load_digits_images("train")
    x_all = pack(images)
    sample_sched = make_scheduler(max_shift=args.max_shift)
    model = FluxWithText(
        make_transformer(args.width, args.double_blocks, args.single_blocks, args.head_dim, args.text_dim),
        make_text_encoder(args.text_dim),
    )

    run_text_flow_training(args, gen, model, lambda i: x_all[i], labels, NULL_CLASS, sample_sched)


if __name__ == "__main__":
    main()
