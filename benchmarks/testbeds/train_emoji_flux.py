"""Train the emoji FLUX testbed (:mod:`benchmarks.testbeds.emoji_flux`) on CPU for a fixed wall time.

The digits FLUX testbed's recipe (:mod:`benchmarks.testbeds.training`): rectified flow with
logit-normal noise levels, velocity target, class dropped to the null class with probability
``--cfg-dropout``, AdamW, warm-up then cosine decay over the budget, EMA; the EMA weights are saved
(fp16 safetensors) every ``--save-every`` minutes with the fp32 state (``--state``) to resume from
(``--resume``; give the next run its own ``--minutes`` and ``--warmup 0``). Data:
:func:`benchmarks.testbeds.emoji.load_emoji_images` (train split), with random horizontal flips
when ``--flip``.

Example (one thread, in the background, resumable)::

    OMP_NUM_THREADS=1 nohup python -m benchmarks.testbeds.train_emoji_flux --minutes 90 \\
        --state /work/emoji_state.pt --resume > /work/emoji_train.log 2>&1 &
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from benchmarks.testbeds.emoji import load_emoji_images
from benchmarks.testbeds.emoji_flux import (
    DEFAULT_CHECKPOINT,
    DEFAULT_MAX_SHIFT,
    NULL_CLASS,
    EmojiFluxPipeline,
    emoji_image_ids,
    make_scheduler,
    make_text_encoder,
    make_transformer,
    pack,
)
from benchmarks.testbeds.train_flux_testbed import FluxWithText
from benchmarks.testbeds.training import (
    run_text_flow_training,
    seed_everything,
    text_flow_parser,
    two_stream_architecture,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    init_help = (
        "start from the (fp16) weights of a checkpoint folder, e.g. the committed one, with a "
        "fresh optimizer (a warm start where the fp32 --state is gone); ignored when --resume finds --state"
    )
    p = text_flow_parser(
        __doc__,
        minutes=90.0,
        out=DEFAULT_CHECKPOINT,
        batch_size=16,
        lr=4e-4,
        ema_decay=0.995,
        log_every=20,
        architecture=two_stream_architecture(width=192, head_dim=64),
        sampler_options=[
            (
                "--max-shift",
                {"type": float, "default": DEFAULT_MAX_SHIFT, "help": "sampler's FLUX max_shift"},
            ),
            ("--flip", {"action": "store_true", "help": "random horizontal flips"}),
            ("--max-steps", {"type": int, "default": None, "help": "stop after this many steps"}),
            ("--init-from", {"type": Path, "default": None, "help": init_help}),
        ],
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Train and save the emoji FLUX testbed."""
    args = parse_args(argv)
    gen = seed_everything(args)
    images, labels = load_emoji_images("train")
    x_all = pack(images)
    x_flip = pack(images.flip(-1))
    model = FluxWithText(
        make_transformer(args.width, args.double_blocks, args.single_blocks, args.head_dim, args.text_dim),
        make_text_encoder(args.text_dim),
        emoji_image_ids(),
    )
    if args.init_from is not None and not (args.resume and args.state is not None and args.state.exists()):
        pipe = EmojiFluxPipeline.from_checkpoint(args.init_from)
        model.transformer.load_state_dict(pipe.transformer.state_dict())
        model.text_encoder.load_state_dict(pipe.text_encoder.state_dict())
        print(f"initialised from {args.init_from}", flush=True)

    def samples_of(idx: torch.Tensor) -> torch.Tensor:
        if not args.flip:
            return x_all[idx]
        flip = torch.rand(idx.shape[0], generator=gen) < 0.5
        return torch.where(flip[:, None, None], x_flip[idx], x_all[idx])

    run_text_flow_training(args, gen, model, samples_of, labels, NULL_CLASS, make_scheduler(args.max_shift))


if __name__ == "__main__":
    main()
