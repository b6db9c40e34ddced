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
import copy
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler
from torch import nn

from benchmarks.testbeds.digits import load_digits_images
from benchmarks.testbeds.train_digits_dit import lr_at
from benchmarks.testbeds.train_flux_testbed import sample_sigmas
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


class VideoWithText(nn.Module):
    """Transformer and class-token encoder as one trainable module (velocity of clips)."""

    def __init__(self, transformer: nn.Module, text_encoder: nn.Module) -> None:
        super().__init__()
        self.transformer = transformer
        self.text_encoder = text_encoder

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


def save_checkpoint(
    ema: VideoWithText, scheduler: FlowMatchEulerDiscreteScheduler, out: Path, dtype: torch.dtype
) -> None:
    """Save the EMA transformer and text encoder (in ``dtype``) and the sampler config under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    copy.deepcopy(ema.transformer).to(dtype).save_pretrained(out / "transformer", safe_serialization=True)
    copy.deepcopy(ema.text_encoder).to(dtype).save_pretrained(out / "text_encoder", safe_serialization=True)
    scheduler.save_pretrained(out / "scheduler")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=30.0, help="wall-time budget of the training loop")
    p.add_argument("--out", type=Path, default=DEFAULT_CHECKPOINT, help="checkpoint folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--batch-size", type=int, default=12, help="clips per step")
    p.add_argument("--frames", type=int, default=NUM_FRAMES)
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--warmup", type=int, default=200, help="learning-rate warm-up steps")
    p.add_argument("--ema-decay", type=float, default=0.998)
    p.add_argument("--cfg-dropout", type=float, default=0.1, help="probability of the null class")
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--double-blocks", type=int, default=2)
    p.add_argument("--single-blocks", type=int, default=2)
    p.add_argument("--refiner-blocks", type=int, default=1)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--text-dim", type=int, default=64)
    p.add_argument("--logit-mean", type=float, default=0.0, help="mean of the logit-normal noise level")
    p.add_argument(
        "--train-shift", type=float, default=1.0, help="time shift applied to training noise levels"
    )
    p.add_argument("--flow-shift", type=float, default=DEFAULT_FLOW_SHIFT, help="sampler's static time shift")
    p.add_argument("--save-dtype", choices=["fp16", "fp32"], default="fp16")
    p.add_argument("--save-every", type=float, default=5.0, help="minutes between checkpoint saves")
    p.add_argument("--log-every", type=int, default=50, help="steps between log lines")
    p.add_argument("--state", type=Path, default=None, help="fp32 training state (.pt) written at every save")
    p.add_argument("--resume", action="store_true", help="continue from --state")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Train and save the video testbed."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    images, labels = load_digits_images("train")
    n = images.shape[0]
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
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, betas=(0.9, 0.99))
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    step = 0
    if args.resume and args.state is not None and args.state.exists():
        state = torch.load(args.state, weights_only=False)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        step = state["step"]
        print(f"resumed from {args.state} at step {step}", flush=True)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"train images {n}, params {n_params}, budget {args.minutes} min", flush=True)

    def save() -> None:
        save_checkpoint(
            ema, sample_sched, args.out, torch.float16 if args.save_dtype == "fp16" else torch.float32
        )
        if args.state is not None:
            torch.save(
                {"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "step": step},
                args.state,
            )

    budget = args.minutes * 60.0
    t_start = time.time()
    last_save = t_start
    running = 0.0
    model.train()
    while (elapsed := time.time() - t_start) < budget:
        idx = torch.randint(0, n, (args.batch_size,), generator=gen)
        x0 = make_clips(images[idx], random_velocities(args.batch_size, gen), args.frames)
        y = labels[idx].clone()
        y[torch.rand(args.batch_size, generator=gen) < args.cfg_dropout] = NULL_CLASS
        sigma = sample_sigmas(args.batch_size, gen, args.logit_mean, args.train_shift)
        noise = torch.randn(x0.shape, generator=gen)
        s = sigma.view(-1, 1, 1, 1, 1)
        xt = (1 - s) * x0 + s * noise

        lr = lr_at(step, elapsed / budget, args.lr, args.warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        loss = F.mse_loss(model(xt, sigma, y), noise - x0)
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
            print(f"step {step} t {elapsed / 60:.1f}min loss {running:.4f} lr {lr:.2e}", flush=True)
        if time.time() - last_save > args.save_every * 60:
            save()
            last_save = time.time()
            print(f"saved at step {step}", flush=True)

    save()
    print(
        f"done: {step} steps in {(time.time() - t_start) / 60:.1f} min, final loss {running:.4f}, "
        f"saved to {args.out}",
        flush=True,
    )


if __name__ == "__main__":
    main()
