"""Train the digits FLUX.2 testbed (see :mod:`benchmarks.testbeds.flux2_testbed`) on CPU.

The same data, loss and loop as :mod:`benchmarks.testbeds.train_flux_testbed`: rectified flow
(velocity target ``noise - x_0``, logit-normal noise levels) on the packed digits, class tokens
trained jointly with CFG label dropout, AdamW with warm-up and cosine decay over the time budget,
EMA saved as fp16 safetensors to ``<out>/transformer`` and ``<out>/text_encoder``, the sampler
config to ``<out>/scheduler``; ``--state`` / ``--resume`` continue a run.

Example::

    python -m benchmarks.testbeds.train_flux2_testbed --minutes 35 --out benchmarks/checkpoints/digits_flux2 \\
        --state /tmp/flux2_state.pt
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.testbeds.digits import load_digits_images
from benchmarks.testbeds.flux2_testbed import (
    DEFAULT_CHECKPOINT,
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


class Flux2WithText(WithTextEncoder):
    """Transformer and class-token encoder as one trainable module (velocity of packed tokens)."""

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Predicted velocity for packed tokens ``x`` at noise levels ``sigma`` in ``[0, 1]``."""
        tokens, _, _ = self.text_encoder(labels)
        b = x.shape[0]
        return self.transformer(
            hidden_states=x,
            timestep=sigma,
            guidance=None,
            encoder_hidden_states=tokens,
            txt_ids=text_ids(b, tokens.shape[1]),
            img_ids=image_ids(b),
            return_dict=False,
        )[0]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = text_flow_parser(
        __doc__,
        minutes=35.0,
        out=DEFAULT_CHECKPOINT,
        batch_size=32,
        lr=4e-4,
        architecture=two_stream_architecture(),
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Train and save the digits FLUX.2 testbed."""
    args = parse_args(argv)
    gen = seed_everything(args)

    images, labels = load_digits_images("train")
    x_all = pack(images)
    model = Flux2WithText(
        make_transformer(args.width, args.double_blocks, args.single_blocks, args.head_dim, args.text_dim),
        make_text_encoder(args.text_dim),
    )
    run_text_flow_training(args, gen, model, lambda i: x_all[i], labels, NULL_CLASS, make_scheduler())


if __name__ == "__main__":
    main()
