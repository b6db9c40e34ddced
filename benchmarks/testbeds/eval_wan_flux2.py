"""Sensitivity report of the Wan video and FLUX.2 image testbeds, as :mod:`eval_testbeds` does for
FLUX and HunyuanVideo: classifier accuracy (frame by frame for video) and PSNR/SSIM of fewer
steps against the most steps, from the same initial noise.

Example::

    python -m benchmarks.testbeds.eval_wan_flux2 wan_video --n 20 --steps 50 25 10
    python -m benchmarks.testbeds.eval_wan_flux2 flux2 --n 20 --guidance 4 --json out.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from benchmarks.testbeds.eval_testbeds import evaluate, real_accuracy, steps_line, write_results
from benchmarks.testbeds.flux2_testbed import DigitsFlux2Pipeline
from benchmarks.testbeds.wan_testbed import MovingDigitsWanPipeline

PIPELINES = {"wan_video": MovingDigitsWanPipeline, "flux2": DigitsFlux2Pipeline}


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("testbed", choices=sorted(PIPELINES))
    p.add_argument("--ckpt", type=Path, default=None, help="checkpoint folder (default: the committed one)")
    p.add_argument("--n", type=int, default=20)
    p.add_argument("--guidance", type=float, nargs="+", default=[None], help="default: the testbed's")
    p.add_argument("--steps", type=int, nargs="+", default=[50, 25, 10])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cls = PIPELINES[args.testbed]
    pipe = cls.from_checkpoint(args.ckpt)
    floor = real_accuracy("video" if args.testbed == "wan_video" else "image")
    print(f"real test data: classifier accuracy {floor:.3f}", flush=True)
    module = __import__(cls.__module__, fromlist=["DEFAULT_GUIDANCE_SCALE"])
    results = []
    for g in args.guidance:
        g = module.DEFAULT_GUIDANCE_SCALE if g is None else g
        r = evaluate(pipe, args.n, g, args.steps, args.seed)
        r["real_accuracy"] = floor
        results.append(r)
        print(f"guidance {g}: {steps_line(r['per_steps'], with_ssim=True)}", flush=True)  # type: ignore[arg-type]
    write_results(args.json, results)


if __name__ == "__main__":
    main()
