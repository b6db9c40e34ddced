"""What the testbed training scripts share: options, batches, the time-budgeted loop, saving.

``train_digits_dit.py``, ``train_flux_controlnet.py`` and the class-token scripts
(``train_flux_testbed.py``, ``train_flux2_testbed.py``, ``train_video_testbed.py``,
``train_wan_testbed.py``, ``train_emoji_flux.py``) differ in their model and in how one batch
turns into a loss; everything else is here: the command line (the option groups below, put together
for the class-token scripts by :func:`text_flow_parser`), drawing a batch with
classifier-free-guidance label dropout (:func:`draw_batch`), the rectified-flow loss
(:func:`rectified_flow_loss`), and :func:`run_training`: AdamW, linear warm-up then cosine decay
over the wall-time budget (:func:`lr_at`), gradient clipping, EMA of the weights, logging, and
periodic saving of the EMA weights (``save_pretrained``, :func:`save_checkpoint`) and of the fp32
training state (``--state``, resumed from with ``--resume``).
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def training_parser(
    doc: str | None, *, minutes: float, out: Path, batch_size: int, batch_help: str | None = None
) -> argparse.ArgumentParser:
    """A parser with the options every training script starts with: ``--minutes``, ``--out``,
    ``--seed``, ``--threads`` and ``--batch-size`` (the defaults given, ``doc`` as description)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=minutes, help="wall-time budget of the training loop")
    p.add_argument("--out", type=Path, default=out, help="checkpoint folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--batch-size", type=int, default=batch_size, help=batch_help)
    return p


def add_optimizer_args(p: argparse.ArgumentParser, *, lr: float, ema_decay: float, null_name: str) -> None:
    """``--lr``, ``--warmup``, ``--ema-decay`` and ``--cfg-dropout`` (the probability of the null
    condition, called ``null_name`` in the help)."""
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--warmup", type=int, default=200, help="learning-rate warm-up steps")
    p.add_argument("--ema-decay", type=float, default=ema_decay)
    p.add_argument("--cfg-dropout", type=float, default=0.1, help=f"probability of the null {null_name}")


def add_save_args(p: argparse.ArgumentParser, log_every: int) -> None:
    """``--save-dtype``, ``--save-every`` and ``--log-every`` (default ``log_every``)."""
    p.add_argument("--save-dtype", choices=["fp16", "fp32"], default="fp16")
    p.add_argument("--save-every", type=float, default=5.0, help="minutes between checkpoint saves")
    p.add_argument("--log-every", type=int, default=log_every, help="steps between log lines")


def add_state_args(
    p: argparse.ArgumentParser, state_help: str = "fp32 training state (.pt) written at every save"
) -> None:
    """``--state`` (help ``state_help``) and ``--resume``."""
    p.add_argument("--state", type=Path, default=None, help=state_help)
    p.add_argument("--resume", action="store_true", help="continue from --state")


def add_flow_args(p: argparse.ArgumentParser) -> None:
    """``--logit-mean`` and ``--train-shift`` of :func:`rectified_flow_loss`."""
    p.add_argument("--logit-mean", type=float, default=0.0, help="mean of the logit-normal noise level")
    p.add_argument(
        "--train-shift", type=float, default=1.0, help="time shift applied to training noise levels"
    )


Option = tuple[str, dict[str, Any]]
"""One command-line option: its flag and the keyword arguments of ``add_argument``."""


def two_stream_architecture(
    *, width: int = 128, single_blocks: int = 4, refiner_blocks: int | None = None, head_dim: int = 32
) -> dict[str, int]:
    """The shape options of a two-stream (FLUX / HunyuanVideo) transformer, flag -> default, in
    the order the scripts list them: ``width``, ``double-blocks`` (2), ``single-blocks``,
    ``refiner-blocks`` (only when given), ``head-dim``, ``text-dim`` (64)."""
    shape = {"width": width, "double-blocks": 2, "single-blocks": single_blocks}
    if refiner_blocks is not None:
        shape["refiner-blocks"] = refiner_blocks
    return {**shape, "head-dim": head_dim, "text-dim": 64}


def text_flow_parser(
    doc: str | None,
    *,
    minutes: float,
    out: Path,
    batch_size: int,
    lr: float,
    architecture: dict[str, int],
    batch_help: str | None = None,
    ema_decay: float = 0.998,
    log_every: int = 50,
    data_options: Sequence[Option] = (),
    sampler_options: Sequence[Option] = (),
) -> argparse.ArgumentParser:
    """The command line of the class-token rectified-flow training scripts (FLUX, FLUX.2, video,
    Wan, emoji FLUX), option groups in this order: :func:`training_parser`, ``data_options``,
    :func:`add_optimizer_args` (null class), one integer option per ``architecture`` entry
    (flag -> default, e.g. :func:`two_stream_architecture`), :func:`add_flow_args`,
    ``sampler_options``, :func:`add_save_args`, :func:`add_state_args`.

    Example::

        p = text_flow_parser(None, minutes=30.0, out=Path("ckpt"), batch_size=64, lr=5e-4,
                             architecture=two_stream_architecture())
        p.parse_args(["--width", "64"]).width  # 64
    """
    p = training_parser(doc, minutes=minutes, out=out, batch_size=batch_size, batch_help=batch_help)
    for flag, options in data_options:
        p.add_argument(flag, **options)
    add_optimizer_args(p, lr=lr, ema_decay=ema_decay, null_name="class")
    for name, default in architecture.items():
        p.add_argument(f"--{name}", type=int, default=default)
    add_flow_args(p)
    for flag, options in sampler_options:
        p.add_argument(flag, **options)
    add_save_args(p, log_every)
    add_state_args(p)
    return p


def seed_everything(args: argparse.Namespace) -> torch.Generator:
    """Set the torch threads and the global seed; return the generator of the training batches."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    return torch.Generator().manual_seed(args.seed)


def lr_at(step: int, frac: float, base_lr: float, warmup: int, min_ratio: float = 0.05) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay over the elapsed time fraction."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    frac = min(max(frac, 0.0), 1.0)
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def draw_batch(
    gen: torch.Generator,
    batch_size: int,
    labels: torch.Tensor,
    cfg_dropout: float,
    null_class: int,
    samples_of: Callable[[torch.Tensor], torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``batch_size`` training items: ``(samples_of(idx), labels[idx])``, each label replaced by
    ``null_class`` with probability ``cfg_dropout`` (drawn after ``samples_of``, which may draw too)."""
    idx = torch.randint(0, labels.shape[0], (batch_size,), generator=gen)
    x0 = samples_of(idx)
    y = labels[idx].clone()
    y[torch.rand(batch_size, generator=gen) < cfg_dropout] = null_class
    return x0, y


def sample_sigmas(n: int, gen: torch.Generator, mean: float = 0.0, shift: float = 1.0) -> torch.Tensor:
    """Logit-normal noise levels ``sigmoid(N(mean, 1))``, then ``shift * s / (1 + (shift - 1) s)``."""
    s = torch.sigmoid(torch.randn(n, generator=gen) + mean)
    return shift * s / (1 + (shift - 1) * s)


def rectified_flow_loss(
    model: nn.Module, x0: torch.Tensor, y: torch.Tensor, gen: torch.Generator, mean: float, shift: float
) -> torch.Tensor:
    """MSE of ``model(x_t, sigma, y)`` against the velocity ``noise - x0``, ``x_t = (1 - s) x0 + s noise``
    with ``s`` from :func:`sample_sigmas`."""
    sigma = sample_sigmas(x0.shape[0], gen, mean, shift)
    noise = torch.randn(x0.shape, generator=gen)
    s = sigma.view(-1, *[1] * (x0.ndim - 1))
    xt = (1 - s) * x0 + s * noise
    return F.mse_loss(model(xt, sigma, y), noise - x0)


class WithTextEncoder(nn.Module):
    """A transformer and its class-token encoder as one trainable module (subclasses: ``forward``)."""

    def __init__(self, transformer: nn.Module, text_encoder: nn.Module) -> None:
        super().__init__()
        self.transformer = transformer
        self.text_encoder = text_encoder

    def checkpoint_modules(self) -> dict[str, nn.Module]:
        """The checkpoint's ``transformer/`` and ``text_encoder/``."""
        return {"transformer": self.transformer, "text_encoder": self.text_encoder}


def save_checkpoint(modules: dict[str, nn.Module], scheduler: Any, out: Path, dtype: torch.dtype) -> None:
    """Save a copy of each module in ``dtype`` to ``out/<name>`` (safetensors) and the scheduler to
    ``out/scheduler``."""
    out.mkdir(parents=True, exist_ok=True)
    for name, module in modules.items():
        copy.deepcopy(module).to(dtype).save_pretrained(out / name, safe_serialization=True)
    scheduler.save_pretrained(out / "scheduler")


def run_training(
    args: argparse.Namespace,
    model: nn.Module,
    batch_loss: Callable[[nn.Module], torch.Tensor],
    checkpoint_modules: Callable[[nn.Module], dict[str, nn.Module]],
    scheduler: Any,
    num_items: int,
    betas: tuple[float, float],
) -> None:
    """Train ``model`` for ``args.minutes`` of wall time (or ``args.max_steps`` steps where that
    option exists and is set, whichever ends first) and save its EMA.

    Every step sets the learning rate (:func:`lr_at`), computes ``batch_loss(model)`` (which draws
    its own batch), clips the gradient norm to 1 and updates the EMA (decay
    ``min(args.ema_decay, (1 + step) / (10 + step))``). Every ``args.save_every`` minutes and at
    the end, ``checkpoint_modules(ema)`` and ``scheduler`` are saved to ``args.out`` in
    ``args.save_dtype`` (:func:`save_checkpoint`) and, with ``args.state``, the fp32 model, EMA,
    optimizer and step; ``args.resume`` starts from that state.

    Args:
        args: The options of :func:`training_parser`, :func:`add_optimizer_args`,
            :func:`add_save_args` and :func:`add_state_args`.
        model: The module to train (its initial weights already drawn).
        batch_loss: The loss of one fresh batch.
        checkpoint_modules: Folder name -> module to save, of the EMA module.
        scheduler: The sampling scheduler saved with the weights.
        num_items: Training items, for the log.
        betas: AdamW betas.
    """
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, betas=betas)
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
    print(f"train images {num_items}, params {n_params}, budget {args.minutes} min", flush=True)

    def save() -> None:
        dtype = torch.float16 if args.save_dtype == "fp16" else torch.float32
        save_checkpoint(checkpoint_modules(ema), scheduler, args.out, dtype)
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
    max_steps = getattr(args, "max_steps", None)
    while (elapsed := time.time() - t_start) < budget and (max_steps is None or step < max_steps):
        lr = lr_at(step, elapsed / budget, args.lr, args.warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        loss = batch_loss(model)
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


def run_text_flow_training(
    args: argparse.Namespace,
    gen: torch.Generator,
    model: WithTextEncoder,
    samples_of: Callable[[torch.Tensor], torch.Tensor],
    labels: torch.Tensor,
    null_class: int,
    scheduler: Any,
) -> None:
    """:func:`run_training` of the FLUX and video testbeds: batches from :func:`draw_batch`
    (``samples_of(idx)`` the training items ``idx``), :func:`rectified_flow_loss` with
    ``args.logit_mean`` and ``args.train_shift``, transformer and text encoder saved, AdamW betas
    ``(0.9, 0.99)``."""

    def batch_loss(model: nn.Module) -> torch.Tensor:
        x0, y = draw_batch(gen, args.batch_size, labels, args.cfg_dropout, null_class, samples_of)
        return rectified_flow_loss(model, x0, y, gen, args.logit_mean, args.train_shift)

    run_training(
        args, model, batch_loss, type(model).checkpoint_modules, scheduler, labels.shape[0], betas=(0.9, 0.99)
    )
