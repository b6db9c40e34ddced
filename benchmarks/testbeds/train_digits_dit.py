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
import copy
import math
import time
from pathlib import Path

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


def save_checkpoint(
    ema: DiTTransformer2DModel,
    scheduler: DDIMScheduler,
    out: Path,
    dtype: torch.dtype,
) -> None:
    """Save the EMA transformer (in ``dtype``) and the sampling scheduler under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    copy.deepcopy(ema).to(dtype).save_pretrained(out / "transformer", safe_serialization=True)
    scheduler.save_pretrained(out / "scheduler")


def lr_at(step: int, frac: float, base_lr: float, warmup: int, min_ratio: float = 0.05) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay over the elapsed time fraction."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    frac = min(max(frac, 0.0), 1.0)
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=20.0, help="wall-time budget of the training loop")
    p.add_argument("--out", type=Path, default=DEFAULT_CHECKPOINT, help="checkpoint folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--warmup", type=int, default=200, help="learning-rate warm-up steps")
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--cfg-dropout", type=float, default=0.1, help="probability of the null label")
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--save-dtype", choices=["fp16", "fp32"], default="fp16")
    p.add_argument("--save-every", type=float, default=5.0, help="minutes between checkpoint saves")
    p.add_argument("--log-every", type=int, default=100, help="steps between log lines")
    p.add_argument("--timestep-spacing", default="leading", help="DDIM timestep spacing saved with the model")
    p.add_argument("--clip-sample", action="store_true", help="save the DDIM sampler with clip_sample=True")
    p.add_argument(
        "--state",
        type=Path,
        default=None,
        help="fp32 training state (.pt) written at every save; resumed from if it exists and --resume is set",
    )
    p.add_argument("--resume", action="store_true", help="continue from --state")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Train and save the digits DiT."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    images, labels = load_digits_images("train")
    n = images.shape[0]
    train_sched = make_train_scheduler()
    sample_sched = make_sampling_scheduler(train_sched, args.timestep_spacing, args.clip_sample)
    alphas_cumprod = train_sched.alphas_cumprod.float()

    model = make_transformer(args.width, args.layers, args.head_dim)
    disable_builtin_label_dropout(model)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, betas=(0.9, 0.999))
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    step = 0
    elapsed_before = 0.0
    if args.resume and args.state is not None and args.state.exists():
        state = torch.load(args.state, weights_only=False)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        step = state["step"]
        print(f"resumed from {args.state} at step {step}", flush=True)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"train images {n}, params {n_params}, budget {args.minutes} min", flush=True)

    budget = args.minutes * 60.0
    t_start = time.time()
    last_save = t_start
    running = 0.0
    save_dtype = torch.float16 if args.save_dtype == "fp16" else torch.float32
    model.train()
    while True:
        elapsed = time.time() - t_start
        if elapsed >= budget:
            break
        idx = torch.randint(0, n, (args.batch_size,), generator=gen)
        x0 = images[idx]
        y = labels[idx].clone()
        drop = torch.rand(args.batch_size, generator=gen) < args.cfg_dropout
        y[drop] = NULL_CLASS
        t = torch.randint(0, train_sched.config.num_train_timesteps, (args.batch_size,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise

        lr = lr_at(step, elapsed / budget, args.lr, args.warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        pred = model(xt, timestep=t, class_labels=y).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        decay = min(args.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters(), strict=True):
                pe.lerp_(pm, 1 - decay)

        running = loss.item() if step == 1 else 0.98 * running + 0.02 * loss.item()
        if step % args.log_every == 0:
            print(
                f"step {step} t {elapsed / 60:.1f}min loss {running:.4f} lr {lr:.2e}",
                flush=True,
            )
        if time.time() - last_save > args.save_every * 60:
            save_checkpoint(ema, sample_sched, args.out, save_dtype)
            if args.state is not None:
                torch.save(
                    {
                        "model": model.state_dict(),
                        "ema": ema.state_dict(),
                        "opt": opt.state_dict(),
                        "step": step,
                    },
                    args.state,
                )
            last_save = time.time()
            print(f"saved at step {step}", flush=True)

    save_checkpoint(ema, sample_sched, args.out, save_dtype)
    if args.state is not None:
        torch.save(
            {"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "step": step},
            args.state,
        )
    total = time.time() - t_start + elapsed_before
    print(
        f"done: {step} steps in {total / 60:.1f} min, final loss {running:.4f}, saved to {args.out}",
        flush=True,
    )


if __name__ == "__main__":
    main()
