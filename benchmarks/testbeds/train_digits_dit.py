"""Train the digits DiT testbed (see :mod:`benchmarks.testbeds.digits`) on CPU for a fixed wall time.

Epsilon-prediction MSE with a DDPM schedule (1000 steps, linear betas 1e-4..0.02, as DiT-XL/2),
classifier-free-guidance label dropout once per sample, AdamW, warm-up then cosine learning-rate
decay over the time budget, EMA of the weights. The EMA weights are saved with
``save_pretrained`` (safetensors, fp16 by default to keep the committed checkpoint small) to
``<out>/transformer``, the DDIM sampling scheduler to ``<out>/scheduler``.

Example::

    python -m benchmarks.testbeds.train_digits_dit --minutes 20 --out benchmarks/checkpoints/digits_dit
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, DiTTransformer2DModel

from benchmarks.testbeds.digits import (
    DEFAULT_CHECKPOINT,
    NULL_CLASS,
    disable_builtin_label_dropout,
    load_digits_images,
    make_transformer,
)
from benchmarks.testbeds.training import (
    add_optimizer_args,
    add_save_args,
    add_state_args,
    draw_batch,
    run_training,
    seed_everything,
    training_parser,
)


def make_train_scheduler() -> DDPMScheduler:
    """The DDPM noise schedule used for training (the DDIM sampler reuses its config)."""
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=1e-4,
        beta_end=0.02,
        beta_schedule="linear",
        prediction_type="epsilon",
        clip_sample=False,
    )


def make_sampling_scheduler(
    train_scheduler: DDPMScheduler, timestep_spacing: str = "leading", clip_sample: bool = False
) -> DDIMScheduler:
    """DDIM sampler with the training schedule's betas.

    Args:
        train_scheduler: The training ``DDPMScheduler``.
        timestep_spacing: DDIM timestep spacing (``"leading"`` is diffusers' default, as DiT uses).
        clip_sample: Clip the predicted x0 to ``[-1, 1]`` at each step.
    """
    return DDIMScheduler.from_config(
        train_scheduler.config,
        timestep_spacing=timestep_spacing,
        clip_sample=clip_sample,
        set_alpha_to_one=True,
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = training_parser(__doc__, minutes=20.0, out=DEFAULT_CHECKPOINT, batch_size=64)
    add_optimizer_args(p, lr=3e-4, ema_decay=0.999, null_name="label")
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--head-dim", type=int, default=32)
    add_save_args(p, log_every=100)
    p.add_argument("--timestep-spacing", default="leading", help="DDIM timestep spacing saved with the model")
    p.add_argument("--clip-sample", action="store_true", help="save the DDIM sampler with clip_sample=True")
    add_state_args(
        p,
        "fp32 training state (.pt) written at every save; resumed from if it exists and --resume is set",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Train and save the digits DiT."""
    args = parse_args(argv)
    gen = seed_everything(args)

    images, labels = load_digits_images("train")
    train_sched = make_train_scheduler()
    sample_sched = make_sampling_scheduler(train_sched, args.timestep_spacing, args.clip_sample)
    alphas_cumprod = train_sched.alphas_cumprod.float()

    model = make_transformer(args.width, args.layers, args.head_dim)
    disable_builtin_label_dropout(model)

    def batch_loss(model: DiTTransformer2DModel) -> torch.Tensor:
        """Epsilon-prediction MSE of one batch (DDPM forward process at uniform timesteps)."""
        x0, y = draw_batch(gen, args.batch_size, labels, args.cfg_dropout, NULL_CLASS, lambda i: images[i])
        t = torch.randint(0, train_sched.config.num_train_timesteps, (args.batch_size,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        return F.mse_loss(model(xt, timestep=t, class_labels=y).sample, noise)

    run_training(
        args,
        model,
        batch_loss,
        lambda ema: {"transformer": ema},
        sample_sched,
        images.shape[0],
        betas=(0.9, 0.999),
    )


if __name__ == "__main__":
    main()
