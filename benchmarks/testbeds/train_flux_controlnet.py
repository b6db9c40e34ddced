"""Train a tiny ControlNet on the FROZEN digits FLUX testbed, on CPU, for a fixed wall time.

The ControlNet (:func:`~benchmarks.testbeds.flux_controlnet.make_controlnet`: 1 double + 1 single
block from the testbed transformer) learns to steer the committed ``digits_flux`` transformer and
class-token encoder, whose weights do not change, towards the digit whose 4x4 thumbnail
(:func:`~benchmarks.testbeds.flux_controlnet.control_signal`) it is given. Loss, noise levels,
batches, label dropout, optimizer, schedule and EMA are the FLUX testbed's
(:mod:`benchmarks.testbeds.training`: rectified flow, velocity target ``noise - x_0``, logit-normal
``s``, class replaced by the null class with probability ``--cfg-dropout``; the control is always
given, also with the null class, as ``FluxControlNetPipeline`` runs the ControlNet on both
guidance branches). The EMA ControlNet is saved with ``save_pretrained`` to ``<out>/controlnet``
(fp16 safetensors by default); ``--max-steps`` stops earlier than ``--minutes``.

Example::

    python -m benchmarks.testbeds.train_flux_controlnet --minutes 6 --out benchmarks/checkpoints/digits_flux_controlnet
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

from benchmarks.testbeds.digits import load_digits_images
from benchmarks.testbeds.flux_controlnet import (
    CONTROL_CELL,
    DEFAULT_CONTROLNET_CHECKPOINT,
    control_signal,
    make_controlnet,
)
from benchmarks.testbeds.flux_testbed import NULL_CLASS, DigitsFluxPipeline, image_ids, pack, text_ids
from benchmarks.testbeds.training import (
    add_flow_args,
    add_optimizer_args,
    add_save_args,
    draw_batch,
    rectified_flow_loss,
    run_training,
    seed_everything,
    training_parser,
)


class ControlNetOnFrozen(nn.Module):
    """The trainable ControlNet; the frozen transformer and text encoder are held outside the
    module tree (not trained, not in the EMA, not saved). ``forward(x, sigma, labels)`` with
    ``self.control`` set to the batch's packed control tokens."""

    def __init__(self, controlnet: nn.Module, transformer: nn.Module, text_encoder: nn.Module) -> None:
        super().__init__()
        self.controlnet = controlnet
        self._frozen = (transformer.eval().requires_grad_(False), text_encoder.eval().requires_grad_(False))
        self.register_buffer("img_ids", image_ids(), persistent=False)
        self.register_buffer("txt_ids", text_ids(), persistent=False)
        self.control: torch.Tensor | None = None

    def __deepcopy__(self, memo: dict) -> ControlNetOnFrozen:
        # the EMA copy shares the frozen modules
        import copy

        out = ControlNetOnFrozen.__new__(ControlNetOnFrozen)
        nn.Module.__init__(out)
        out.controlnet = copy.deepcopy(self.controlnet, memo)
        out._frozen = self._frozen
        out.register_buffer("img_ids", self.img_ids.clone(), persistent=False)
        out.register_buffer("txt_ids", self.txt_ids.clone(), persistent=False)
        out.control = None
        return out

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        transformer, text_encoder = self._frozen
        with torch.no_grad():
            tokens, pooled, _ = text_encoder(labels)
        kwargs = {
            "hidden_states": x,
            "timestep": sigma,
            "pooled_projections": pooled,
            "encoder_hidden_states": tokens,
            "txt_ids": self.txt_ids,
            "img_ids": self.img_ids,
        }
        blocks, singles = self.controlnet(controlnet_cond=self.control, return_dict=False, **kwargs)
        return transformer(
            **kwargs,
            controlnet_block_samples=blocks,
            controlnet_single_block_samples=singles,
            return_dict=False,
        )[0]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = training_parser(__doc__, minutes=6.0, out=DEFAULT_CONTROLNET_CHECKPOINT, batch_size=32)
    add_optimizer_args(p, lr=5e-4, ema_decay=0.995, null_name="class")
    add_flow_args(p)
    p.add_argument("--base", type=Path, default=None, help="testbed checkpoint (default: digits_flux)")
    p.add_argument("--double-blocks", type=int, default=1, help="ControlNet double-stream blocks")
    p.add_argument("--single-blocks", type=int, default=1, help="ControlNet single-stream blocks")
    p.add_argument(
        "--cell",
        type=int,
        default=CONTROL_CELL,
        help="control signal cell size in pixels (the pipeline and eval use flux_controlnet.CONTROL_CELL = 4)",
    )
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
    add_save_args(p, log_every=50)
    p.add_argument("--state", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--resume", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Train and save the ControlNet."""
    args = parse_args(argv)
    gen = seed_everything(args)
    if args.max_steps is not None and args.warmup >= args.max_steps:
        args.warmup = max(1, args.max_steps // 5)

    base = DigitsFluxPipeline.from_checkpoint(args.base)
    images, labels = load_digits_images("train")
    x_all, c_all = pack(images), pack(control_signal(images, args.cell))
    model = ControlNetOnFrozen(
        make_controlnet(base.transformer, args.double_blocks, args.single_blocks),
        base.transformer,
        base.text_encoder,
    )

    def batch_loss(m: nn.Module) -> torch.Tensor:
        drawn: list[torch.Tensor] = []

        def samples_of(idx: torch.Tensor) -> torch.Tensor:
            drawn.append(idx)
            return x_all[idx]

        x0, y = draw_batch(gen, args.batch_size, labels, args.cfg_dropout, NULL_CLASS, samples_of)
        m.control = c_all[drawn[0]]
        return rectified_flow_loss(m, x0, y, gen, args.logit_mean, args.train_shift)

    run_training(
        args,
        model,
        batch_loss,
        lambda ema: {"controlnet": ema.controlnet},
        base.scheduler,
        labels.shape[0],
        betas=(0.9, 0.99),
    )


if __name__ == "__main__":
    main()
