"""Sensitivity report of the FLUX and HunyuanVideo testbeds: PSNR of fewer steps against 50 steps.

For each guidance scale and time shift, generates ``--n`` samples (labels ``i % 10``) from the
SAME initial noise at every step count and reports

- classifier accuracy of the samples (:func:`benchmarks.testbeds.digits_classifier.classify`,
  frame by frame for video; the real-data floor is printed beside it),
- PSNR of each step count against the largest one, per image (per frame for video) on ``[0, 1]``
  pixels and averaged over images, as the cache papers report it, and SSIM.

A testbed whose 25-step samples are nearly its 50-step samples cannot rank cache methods; the
realism criterion asks for at most 35 dB (25 vs 50 steps), aiming at 30 dB.

Example::

    python -m benchmarks.testbeds.eval_testbeds flux --n 200 --guidance 5 7 --shift 1.15 1.6
    python -m benchmarks.testbeds.eval_testbeds video --n 100 --guidance 5 --shift 5 7
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from benchmarks.metrics import psnr, psnr_per_image, ssim
from benchmarks.testbeds import flux_testbed, video_testbed
from benchmarks.testbeds.digits import load_digits_images
from benchmarks.testbeds.digits_classifier import classify

Pipeline = flux_testbed.DigitsFluxPipeline | video_testbed.MovingDigitsVideoPipeline


def as_frames(samples: torch.Tensor) -> torch.Tensor:
    """Images ``(N, 1, H, W)`` unchanged; clips ``(N, 1, T, H, W)`` as frames ``(N * T, 1, H, W)``."""
    return video_testbed.frames_of(samples) if samples.ndim == 5 else samples


def accuracy(samples: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of images (or of frames, for clips) the digits classifier reads as the requested class."""
    frames = as_frames(samples)
    repeat = frames.shape[0] // labels.shape[0]
    logits, _ = classify(frames)
    return float((logits.argmax(1) == labels.repeat_interleave(repeat)).float().mean())


def real_accuracy(kind: str) -> float:
    """Classifier accuracy on the real test split (as clips with random directions for ``video``)."""
    x, y = load_digits_images("test")
    if kind == "video":
        x = video_testbed.make_clips(
            x, video_testbed.random_velocities(len(x), torch.Generator().manual_seed(0))
        )
    return accuracy((x + 1) / 2, y)


def set_shift(pipe: Pipeline, shift: float) -> None:
    """Override the sampler's time shift: FLUX's ``max_shift`` (= ``mu`` at 64 tokens) or the static ``shift``."""
    key = "max_shift" if isinstance(pipe, flux_testbed.DigitsFluxPipeline) else "shift"
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, **{key: shift})


def evaluate(
    pipe: Pipeline,
    n: int,
    guidance_scale: float,
    steps: list[int],
    seed: int = 0,
    batch_size: int = 100,
) -> dict[str, object]:
    """Sample ``n`` items per step count from the same noise; accuracy, PSNR and SSIM against the most steps."""
    labels = torch.arange(n) % 10
    ref_steps = max(steps)
    samples: dict[int, torch.Tensor] = {}
    seconds: dict[int, float] = {}
    for s in steps:
        gen = torch.Generator().manual_seed(seed)
        t0 = time.time()
        chunks = [
            pipe(
                labels[i : i + batch_size],
                num_inference_steps=s,
                guidance_scale=guidance_scale,
                generator=gen,
                progress=False,
            )
            for i in range(0, n, batch_size)
        ]
        seconds[s] = time.time() - t0
        samples[s] = torch.cat(chunks)
    per_steps: dict[int, dict[str, float]] = {}
    for s in steps:
        entry = {"accuracy": accuracy(samples[s], labels), "seconds": seconds[s]}
        if s != ref_steps:
            a, b = as_frames(samples[s]), as_frames(samples[ref_steps])
            entry["psnr"] = psnr(a, b)
            entry["psnr_min"] = float(psnr_per_image(a, b).min())
            entry["ssim"] = ssim(a, b)
        per_steps[s] = entry
    return {"guidance_scale": guidance_scale, "n": n, "seed": seed, "per_steps": per_steps}


def steps_line(per_steps: dict[int, dict[str, float]], with_ssim: bool = False) -> str:
    """One log line of :func:`evaluate`'s ``per_steps``: accuracy, and PSNR (and SSIM when
    ``with_ssim``) against the most steps, per step count."""
    return " ".join(
        f"{s}:acc={e['accuracy']:.3f}"
        + (
            f",psnr={e['psnr']:.2f}dB" + (f",ssim={e['ssim']:.3f}" if with_ssim else "")
            if "psnr" in e
            else ""
        )
        for s, e in per_steps.items()
    )


def write_results(path: Path | None, results: list[dict[str, object]]) -> None:
    """The results as indented JSON at ``path`` (its folder made), when a path is given."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2))


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("testbed", choices=["flux", "video"])
    p.add_argument("--ckpt", type=Path, default=None, help="checkpoint folder (default: the committed one)")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--guidance", type=float, nargs="+", default=[5.0])
    p.add_argument("--shift", type=float, nargs="+", default=[None], help="time-shift overrides")
    p.add_argument("--steps", type=int, nargs="+", default=[50, 25, 10])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    module = flux_testbed if args.testbed == "flux" else video_testbed
    cls = (
        flux_testbed.DigitsFluxPipeline if args.testbed == "flux" else video_testbed.MovingDigitsVideoPipeline
    )
    pipe = cls.from_checkpoint(args.ckpt or module.DEFAULT_CHECKPOINT)
    base_config = dict(pipe.scheduler.config)
    floor = real_accuracy(args.testbed)
    print(f"real test data: classifier accuracy {floor:.3f}", flush=True)
    results = []
    for shift in args.shift:
        pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(base_config)
        if shift is not None:
            set_shift(pipe, shift)
        for g in args.guidance:
            r = evaluate(pipe, args.n, g, args.steps, args.seed)
            r["shift"] = pipe.scheduler.config["max_shift" if args.testbed == "flux" else "shift"]
            r["real_accuracy"] = floor
            results.append(r)
            print(f"shift {r['shift']} guidance {g}: {steps_line(r['per_steps'])}", flush=True)  # type: ignore[arg-type]
    write_results(args.json, results)


if __name__ == "__main__":
    main()
