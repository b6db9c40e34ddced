"""X-Slim with and without the ControlNet on the digits FLUX testbed (issue 10, point 1).

For ``--n`` test digits (sample ``i``, from ``--offset``: test image ``i``'s class and its control signal, noise seeded
``i``, one sample per pipeline call, true CFG 7), ``--steps`` steps: the full computation with the
ControlNet and without it, then each X-Slim setting with and without it. Each X-Slim run is
scored by its PSNR against the full run of the SAME pipeline (with against with, without against
without); the paired difference per sample (with minus without) is the quantity of the claim
"X-Slim's PSNR with ControlNet >= its PSNR without, at the same FLOPs, minus a bound". The PSNR
between the two full runs shows how much the control changes the images.

FLOP fractions are X-Slim's own count over the transformer; the ControlNet (1 double + 1 single
block) runs at every step in full, so the pipeline's fraction is also given, with the
ControlNet's cost taken as its share of the transformer's linear-layer parameters (every
token goes through every linear layer once; attention is small at 68 tokens).

Example::

    python -m benchmarks.testbeds.eval_flux_controlnet --n 20 --steps 50
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.metrics import psnr_per_image
from benchmarks.testbeds.digits import load_digits_images
from benchmarks.testbeds.flux_controlnet import DigitsFluxControlNetPipeline, control_signal
from xslim_xdit import Schedule, XSlimConfig, disable_xslim, enable_xslim


def uniform_schedule(steps: int, every: int) -> Schedule:
    """Every ``every``-th step full from step 0, and the last step."""
    return Schedule(steps, full_steps=tuple(sorted(set(range(0, steps, every)) | {steps - 1})))


def settings(steps: int) -> dict[str, Callable[[], XSlimConfig]]:
    """The X-Slim settings measured: uniform schedules (every 2nd / 3rd step full, the others
    skipped with the linearly extrapolated residual) and two online step-only configs."""
    return {
        "uniform every 2nd": lambda: XSlimConfig(mode="schedule", schedule=uniform_schedule(steps, 2)),
        "uniform every 3rd": lambda: XSlimConfig(mode="schedule", schedule=uniform_schedule(steps, 3)),
        "online warn 0.12": lambda: XSlimConfig(warn=0.12, crit=0.36, polish="none"),
        "online warn 0.2": lambda: XSlimConfig(warn=0.2, crit=0.6, polish="none"),
    }


def linear_params(module: nn.Module) -> int:
    """Weights of the module's linear layers (per-token multiply-adds of one forward)."""
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


def eval_inputs(n: int, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Classes ``(n,)`` and control signals ``(n, 1, 16, 16)`` of test digits ``offset .. offset+n-1``."""
    images, labels = load_digits_images("test")
    return labels[offset : offset + n], control_signal(images[offset : offset + n])


def sample(
    pipe: DigitsFluxControlNetPipeline,
    labels: torch.Tensor,
    controls: torch.Tensor | None,
    steps: int,
    config: XSlimConfig | None = None,
    seed0: int = 0,
) -> tuple[torch.Tensor, list[float]]:
    """One pipeline call per sample (seed ``seed0 + i``); X-Slim enabled per call with ``config``.
    Returns the images ``(n, 1, 16, 16)`` and X-Slim's FLOP fraction per call."""
    outs, fracs = [], []
    for i in range(labels.shape[0]):
        engine = enable_xslim(pipe, config) if config is not None else None
        out = pipe(
            labels[i : i + 1],
            num_inference_steps=steps,
            generator=torch.Generator().manual_seed(seed0 + i),
            progress=False,
            control=None if controls is None else controls[i : i + 1],
        )
        if engine is not None:
            fracs.append(engine.statistics.summary()["flops_fraction"])
            disable_xslim(pipe)
        outs.append(out)
    return torch.cat(outs), fracs


def _stats(x: torch.Tensor) -> dict[str, float]:
    n = x.numel()
    sd = x.std().item() if n > 1 else 0.0
    return {"mean": x.mean().item(), "std": sd, "sem": sd / math.sqrt(n), "min": x.min().item()}


def evaluate(
    pipe: DigitsFluxControlNetPipeline, n: int, steps: int, which: list[str] | None = None, offset: int = 0
) -> dict[str, Any]:
    """The measurements of the module docstring, as a dict (see :func:`main` for the table);
    samples ``offset .. offset+n-1`` (test digit and noise seed)."""
    labels, controls = eval_inputs(n, offset)
    ref_plain, _ = sample(pipe, labels, None, steps, seed0=offset)
    ref_cn, _ = sample(pipe, labels, controls, steps, seed0=offset)
    share = linear_params(pipe.controlnet) / linear_params(pipe.transformer)
    result: dict[str, Any] = {
        "n": n,
        "offset": offset,
        "steps": steps,
        "controlnet_cost_share": share,
        "psnr_full_cn_vs_full_plain": _stats(psnr_per_image(ref_cn, ref_plain)),
        "settings": {},
    }
    # how well each output follows the control: MSE of its own 4x4 thumbnail against the control
    result["thumb_mse_full_cn"] = torch.mean((control_signal(ref_cn * 2 - 1) - controls) ** 2).item()
    result["thumb_mse_full_plain"] = torch.mean((control_signal(ref_plain * 2 - 1) - controls) ** 2).item()
    for name, make in settings(steps).items():
        if which and name not in which:
            continue
        out_plain, f_plain = sample(pipe, labels, None, steps, make(), seed0=offset)
        out_cn, f_cn = sample(pipe, labels, controls, steps, make(), seed0=offset)
        p_plain = psnr_per_image(out_plain, ref_plain)
        p_cn = psnr_per_image(out_cn, ref_cn)
        fp, fc = sum(f_plain) / n, sum(f_cn) / n
        result["settings"][name] = {
            "flops_plain": fp,
            "flops_cn_transformer": fc,
            "flops_cn_pipeline": (fc + share) / (1 + share),
            "psnr_plain": _stats(p_plain),
            "psnr_cn": _stats(p_cn),
            "diff_cn_minus_plain": _stats(p_cn - p_plain),
        }
    return result


def table(result: dict[str, Any]) -> str:
    """A markdown table of :func:`evaluate`'s result."""
    lines = [
        "| setting | FLOPs without CN | FLOPs with CN (transformer / pipeline) | PSNR without CN | "
        "PSNR with CN | with - without (mean, sd, sem, min) |",
        "|---|---|---|---|---|---|",
    ]
    for name, s in result["settings"].items():
        d = s["diff_cn_minus_plain"]
        lines.append(
            f"| {name} | {s['flops_plain']:.1%} | {s['flops_cn_transformer']:.1%} / {s['flops_cn_pipeline']:.1%} | "
            f"{s['psnr_plain']['mean']:.2f} +- {s['psnr_plain']['std']:.2f} dB | "
            f"{s['psnr_cn']['mean']:.2f} +- {s['psnr_cn']['std']:.2f} dB | "
            f"{d['mean']:+.2f}, {d['std']:.2f}, {d['sem']:.2f}, {d['min']:+.2f} dB |"
        )
    f = result["psnr_full_cn_vs_full_plain"]
    lines.append("")
    lines.append(
        f"full with CN vs full without CN: {f['mean']:.2f} +- {f['std']:.2f} dB; thumbnail MSE against the "
        f"control: with CN {result['thumb_mse_full_cn']:.4f}, without {result['thumb_mse_full_plain']:.4f}; "
        f"ControlNet cost share {result['controlnet_cost_share']:.2f} of the transformer"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Run :func:`evaluate` and print the table (and the JSON with ``--json``)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--n", type=int, default=20, help="samples (n test digits from --offset, noise seeded by their index)"
    )
    p.add_argument("--offset", type=int, default=0, help="first test digit and noise seed")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--controlnet", type=Path, default=None, help="ControlNet checkpoint folder")
    p.add_argument("--setting", action="append", default=None, help="only this setting (repeatable)")
    p.add_argument("--json", type=Path, default=None, help="write the result here")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = DigitsFluxControlNetPipeline.from_checkpoint(controlnet_path=args.controlnet)
    result = evaluate(pipe, args.n, args.steps, args.setting, args.offset)
    print(table(result), flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
