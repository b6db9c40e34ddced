"""X-Slim demo: a trained class-conditional DiT draws digits with and without X-Slim.

Loads the small DiT committed in ``benchmarks/checkpoints/digits_dit`` (trained here on
scikit-learn's digits), generates a grid of digits 0-9 with the full computation and with X-Slim
(same seed), and prints the wall-clock speedup, the PSNR between the two grids, the share of
transformer FLOPs X-Slim computed, and what a digit classifier reads in both grids. The grid is
saved as a PNG (top: full computation, bottom: X-Slim).

Run from the repository root::

    python examples/digits_demo.py --help
    python examples/digits_demo.py --per-class 8 --steps 50 --out outputs/digits_demo.png
    python examples/digits_demo.py --calibrate 3   # a schedule planned for 3x on four other samples
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

# xfuser (a dependency) ships a top-level `benchmarks` namespace package in site-packages; put
# this repository first so that `benchmarks` is ours.
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.metrics import psnr  # noqa: E402
from benchmarks.testbeds.digits import DEFAULT_CHECKPOINT, DigitsDiTPipeline  # noqa: E402
from benchmarks.testbeds.digits_classifier import classify  # noqa: E402
from xslim_xdit import XSlimConfig, XSlimPipelineWrapper  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT), help="digits DiT checkpoint folder")
    p.add_argument("--per-class", type=int, default=10, help="digits per class (grid columns)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats (median)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--preset", default=None, help="an X-Slim preset instead of the default online controller")
    p.add_argument(
        "--calibrate",
        type=float,
        default=None,
        metavar="SPEEDUP",
        help="calibrate a schedule for this FLOP speedup on four samples that are not drawn (a 3, 5, 8\n"
        "and 1 with their own seeds), then draw with it, instead of the online controller",
    )
    p.add_argument("--out", default="outputs/digits_demo.png", help="where to save the grid PNG")
    p.add_argument("--stats", action="store_true", help="print X-Slim's per-step statistics table")
    return p.parse_args(argv)


def grid(images: torch.Tensor, rows: int) -> np.ndarray:
    """(N, 1, 16, 16) in [0, 1] -> one (rows*18, cols*18) uint8 image, 2-pixel gutters."""
    n = images.shape[0]
    cols = n // rows
    tile = 18
    out = np.full((rows * tile, cols * tile), 255, dtype=np.uint8)
    for i in range(n):
        r, c = i % rows, i // rows
        out[r * tile + 1 : r * tile + 17, c * tile + 1 : c * tile + 17] = (
            images[i, 0].clamp(0, 1).mul(255).round().byte().numpy()
        )
    return out


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = DigitsDiTPipeline.from_checkpoint(args.checkpoint)
    labels = [d for _ in range(args.per_class) for d in range(10)]  # column-major: one row per digit

    def generate(p) -> tuple[torch.Tensor, float]:
        g = torch.Generator().manual_seed(args.seed)
        t0 = time.perf_counter()
        out = p(labels, num_inference_steps=args.steps, generator=g, progress=False)
        return out, time.perf_counter() - t0

    if args.preset and args.calibrate:
        raise SystemExit("--preset and --calibrate are alternatives: pass one")
    config = XSlimConfig.from_preset(args.preset) if args.preset else XSlimConfig()
    described = f"preset {args.preset}" if args.preset else "default online controller"
    xslim_pipe = DigitsDiTPipeline.from_checkpoint(args.checkpoint)
    if args.calibrate:
        from xslim_xdit.calibration import calibrate

        def calibration_run(digit: int, seed: int):  # seeded: the closed-loop check compares outputs
            return lambda: xslim_pipe(
                [digit],
                num_inference_steps=args.steps,
                generator=torch.Generator().manual_seed(seed),
                progress=False,
            )

        # four samples of their own (not the ones shown): plans made on one sample depend on it above 4x
        runs = [calibration_run(d, 12345 + i) for i, d in enumerate((3, 5, 8, 1))]
        result = calibrate(xslim_pipe, runs, target_speedup=args.calibrate)
        config = result.config()
        described = f"calibrated for {args.calibrate:g}x, full steps {list(result.schedule.full_steps)}"
    xslim = XSlimPipelineWrapper(xslim_pipe, config)
    generate(pipe)  # warm-up of both pipelines (first calls allocate and count FLOPs)
    generate(xslim)
    times_full, times_xslim = [], []
    for _ in range(args.repeats):  # interleaved, so both see the same machine load
        full, t = generate(pipe)
        times_full.append(t)
        cached, t = generate(xslim)
        times_xslim.append(t)
    stats = xslim.get_cache_statistics()
    summary = stats.summary()
    speedup = float(np.median(times_full) / np.median(times_xslim))
    quality = psnr(cached, full)
    pred_full = classify(full)[0].argmax(1)
    pred_xslim = classify(cached)[0].argmax(1)
    target = torch.tensor(labels)
    acc_full = (pred_full == target).float().mean().item()
    acc_xslim = (pred_xslim == target).float().mean().item()

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from PIL import Image

    picture = np.concatenate(
        [grid(full, 10), np.full((6, grid(full, 10).shape[1]), 255, np.uint8), grid(cached, 10)]
    )
    Image.fromarray(picture).resize((picture.shape[1] * 3, picture.shape[0] * 3), Image.NEAREST).save(out)

    if args.stats:
        print(stats.table())
    print(f"digits DiT, {len(labels)} images, {args.steps} DDIM steps, guidance 6 (batched CFG)")
    print(f"X-Slim config: {described}")
    print(
        f"decisions: full {summary['full']}, block {summary['block']}, token {summary['token']}, "
        f"skip {summary['skip']} of {summary['steps']} steps"
    )
    print(
        f"transformer FLOPs computed: {summary['flops_fraction']:.1%} ({summary['theoretical_speedup']:.2f}x)"
    )
    print(
        f"wall-clock: full {np.median(times_full):.2f} s, X-Slim {np.median(times_xslim):.2f} s -> speedup {speedup:.2f}x"
    )
    print(f"PSNR X-Slim vs full: {quality:.2f} dB")
    print(f"classifier accuracy on the requested digits: full {acc_full:.1%}, X-Slim {acc_xslim:.1%}")
    print(f"grid saved to {out} (top: full computation, bottom: X-Slim)")
    return {
        "speedup": speedup,
        "psnr": quality,
        "flops_fraction": summary["flops_fraction"],
        "accuracy_full": acc_full,
        "accuracy_xslim": acc_xslim,
        "out": str(out),
    }


if __name__ == "__main__":
    main()
