"""How curved are a data set's flow trajectories? The ruler rows of the exact (memorising) velocity.

For a finite training set the rectified-flow velocity has a closed form: with
``x_t = (1 - s) x_0 + s noise`` and ``x_0`` uniform over the training images of the class,
``v(x_t, s) = (x_t - E[x_0 | x_t]) / s``, ``E[x_0 | x_t]`` the softmax-weighted mean of the
images with weights ``exp(-|x_t - (1 - s) x_i|^2 / (2 s^2))``. A perfectly trained model of the
empirical distribution samples along these trajectories, so they measure what the DATA allows,
independently of training: if 25 steps land close to 50 steps even for this oracle, no amount of
training on that data makes fewer steps (or caching) as costly as on FLUX.1-dev.

The oracle drops into the testbeds' pipelines as their ``transformer`` (:class:`OracleTransformer`,
class labels given through ``pooled_projections``), so sampling is exactly the testbed's
(FLUX's time shift, true CFG in one call per step), and the benchmark's output-level methods
(fewer steps, uniform reuse every N steps) run unchanged. Block-level caches (TeaCache,
TaylorSeer) need a transformer's blocks and are not measured here.

Example::

    python -m benchmarks.testbeds.oracle_flow --data emoji digits --n 16 --guidance 1 4 --shift 1.15 2.2
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from benchmarks.methods import FewerSteps, UniformReuse
from benchmarks.metrics import psnr_per_image


class OracleTransformer(nn.Module):
    """The exact velocity of the empirical (class-conditional) distribution of packed images.

    Args:
        x0: Training images as packed tokens ``(N, T, C)`` in ``[-1, 1]``.
        labels: Their classes ``(N,)``; the null class (``num_classes``) means all images.
        num_classes: Real classes.
    """

    def __init__(self, x0: torch.Tensor, labels: torch.Tensor, num_classes: int) -> None:
        super().__init__()
        self.x0 = x0.flatten(1).double()
        self.sq = self.x0.pow(2).sum(1)
        self.labels = labels
        self.num_classes = num_classes
        self.config = SimpleNamespace(in_channels=x0.shape[-1])
        self.dtype = torch.float32
        self.device = torch.device("cpu")

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        pooled_projections: torch.Tensor,
        **_: object,
    ) -> tuple[torch.Tensor]:
        """Velocity ``(B, T, C)``; ``timestep`` is sigma, ``pooled_projections[:, 0]`` the class."""
        xt = hidden_states.flatten(1).double()
        s = timestep.double().clamp_min(1e-4)[:, None]
        # |x_t - (1 - s) x_i|^2 without the (B, N, D) intermediate
        d2 = xt.pow(2).sum(1, keepdim=True) - 2 * (1 - s) * (xt @ self.x0.T) + (1 - s) ** 2 * self.sq[None]
        logw = -d2 / (2 * s**2)
        cls = pooled_projections[:, 0].long()
        member = (self.labels[None, :] == cls[:, None]) | (cls[:, None] == self.num_classes)
        logw = logw.masked_fill(~member, float("-inf"))
        w = torch.softmax(logw, dim=1)
        x0_hat = w @ self.x0
        v = (xt - x0_hat) / s
        return (v.view_as(hidden_states).float(),)


class LabelEncoder(nn.Module):
    """Stand-in text encoder: the class index as the pooled vector, one dummy token."""

    def __init__(self) -> None:
        super().__init__()
        self.dtype = torch.float32
        self.device = torch.device("cpu")

    def forward(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(tokens (B, 1, 1), pooled (B, 1) = label, mask)``."""
        pooled = labels.float()[:, None]
        return torch.zeros(labels.shape[0], 1, 1), pooled, torch.ones(labels.shape[0], 1, dtype=torch.long)


def oracle_pipeline(data: str, shift: float) -> tuple[object, int]:
    """The testbed pipeline of ``data`` (``"emoji"``: 32x32 RGB, 8 classes; ``"digits"``: 16x16, 10
    classes) with the oracle of its train split as transformer and ``max_shift = shift``."""
    if data == "emoji":
        from benchmarks.testbeds import emoji_flux as m
        from benchmarks.testbeds.emoji import NUM_CLASSES, load_emoji_images

        x, y = load_emoji_images("train")
        pipe_cls, sched = m.EmojiFluxPipeline, m.make_scheduler(max_shift=shift)
    else:
        from benchmarks.testbeds import flux_testbed as m
        from benchmarks.testbeds.digits import NUM_CLASSES, load_digits_images

        x, y = load_digits_images("train")
        pipe_cls, sched = m.DigitsFluxPipeline, m.make_scheduler(max_shift=shift)
    pipe = pipe_cls(
        transformer=OracleTransformer(m.pack(x), y, NUM_CLASSES), scheduler=sched, text_encoder=LabelEncoder()
    )
    pipe.null_class = NUM_CLASSES
    return pipe, NUM_CLASSES


def measure(data: str, shift: float, guidance: float, n: int, seed: int = 0) -> dict[str, float]:
    """PSNR per image against 50 steps of 25 / 17 steps and of uniform reuse every 3 steps."""
    pipe, k = oracle_pipeline(data, shift)
    labels = torch.arange(n) % k

    def run(method: object, steps: int = 50) -> torch.Tensor:
        method.enable(pipe) if hasattr(method, "enable") else None
        try:
            return pipe(labels, num_inference_steps=steps, guidance_scale=guidance,
                        generator=torch.Generator().manual_seed(seed), progress=False)  # fmt: skip
        finally:
            method.disable(pipe) if hasattr(method, "disable") else None

    ref = run(object())
    out = {}
    for name, method in (
        ("25 steps", FewerSteps(2)),
        ("17 steps", FewerSteps(3)),
        ("reuse every 3", UniformReuse(3)),
    ):
        method.prepare(pipe, None, 50)
        img = run(method, method.num_steps(50))
        out[name] = float(psnr_per_image(img, ref).mean())
    return out


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", nargs="+", default=["emoji", "digits"], choices=["emoji", "digits"])
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--guidance", type=float, nargs="+", default=[1.0, 4.0])
    p.add_argument("--shift", type=float, nargs="+", default=[1.15])
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for data in args.data:
        for shift in args.shift:
            for g in args.guidance:
                t0 = time.time()
                r = {"data": data, "max_shift": shift, "guidance": g, **measure(data, shift, g, args.n)}
                r["seconds"] = round(time.time() - t0, 1)
                rows.append(r)
                print(
                    json.dumps({k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items()}),
                    flush=True,
                )
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
