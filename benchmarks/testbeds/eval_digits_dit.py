"""Evaluate the digits DiT: sample quality and sensitivity to the number of DDIM steps.

For each guidance scale, generates ``--n`` digits (labels ``i % 10``) from the SAME initial noise
(one generator seed) at every step count, and reports

- classifier accuracy and Frechet distance to real test digits (:func:`benchmarks.metrics.sample_quality`),
- PSNR and SSIM of each step count against the reference (largest) step count.

A low PSNR between 25 and 50 steps means that the model is sensitive to skipped or approximated
steps, i.e. that cache errors will be visible in the benchmarks.

Example::

    python -m benchmarks.testbeds.eval_digits_dit --n 500 --guidance 5 --steps 50 25 10
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from diffusers import DDIMScheduler

from benchmarks.metrics import psnr, psnr_per_image, sample_quality, ssim
from benchmarks.testbeds.digits import DEFAULT_CHECKPOINT, DigitsDiTPipeline


def evaluate(
    pipe: DigitsDiTPipeline,
    n: int,
    guidance_scale: float,
    steps: list[int],
    seed: int = 0,
    batch_size: int = 250,
) -> dict[str, object]:
    """Sample ``n`` digits per step count from the same noise and compute the metrics.

    Returns:
        A dict with per-step-count ``accuracy``, ``frechet_distance``, ``seconds`` and, against the
        largest step count, ``psnr``, ``psnr_min`` and ``ssim``.
    """
    labels = torch.arange(n) % 10
    ref_steps = max(steps)
    images: dict[int, torch.Tensor] = {}
    seconds: dict[int, float] = {}
    for s in steps:
        gen = torch.Generator().manual_seed(seed)
        chunks = []
        t0 = time.time()
        for start in range(0, n, batch_size):
            chunks.append(
                pipe(
                    labels[start : start + batch_size],
                    num_inference_steps=s,
                    guidance_scale=guidance_scale,
                    generator=gen,
                    progress=False,
                )
            )
        seconds[s] = time.time() - t0
        images[s] = torch.cat(chunks)
    result: dict[str, object] = {"guidance_scale": guidance_scale, "n": n, "seed": seed, "per_steps": {}}
    for s in steps:
        q = sample_quality(images[s], labels)
        entry: dict[str, float] = {
            "accuracy": q["accuracy"],
            "frechet_distance": q["frechet_distance"],
            "seconds": seconds[s],
        }
        if s != ref_steps:
            entry["psnr"] = psnr(images[s], images[ref_steps])
            entry["psnr_min"] = float(psnr_per_image(images[s], images[ref_steps]).min())
            entry["ssim"] = ssim(images[s], images[ref_steps])
        result["per_steps"][s] = entry  # type: ignore[index]
    return result


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", type=Path, default=DEFAULT_CHECKPOINT)
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--guidance", type=float, nargs="+", default=[5.0])
    p.add_argument("--steps", type=int, nargs="+", default=[50, 25, 10])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--timestep-spacing", default=None, help="override the checkpoint's DDIM timestep spacing")
    p.add_argument("--clip-sample", choices=["true", "false"], default=None, help="override DDIM clip_sample")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = DigitsDiTPipeline.from_checkpoint(args.ckpt)
    overrides: dict[str, object] = {}
    if args.timestep_spacing is not None:
        overrides["timestep_spacing"] = args.timestep_spacing
    if args.clip_sample is not None:
        overrides["clip_sample"] = args.clip_sample == "true"
    if overrides:
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, **overrides)
    results = []
    for g in args.guidance:
        r = evaluate(pipe, args.n, g, args.steps, args.seed)
        r["scheduler"] = {
            k: pipe.scheduler.config[k] for k in ("timestep_spacing", "clip_sample", "beta_schedule")
        }
        results.append(r)
        print(json.dumps(r), flush=True)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
