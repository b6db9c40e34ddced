"""X-Slim demo: a trained class-conditional DiT draws digits with and without X-Slim.

Loads the small DiT committed in ``benchmarks/checkpoints/digits_dit`` (trained here on
scikit-learn's digits), generates a grid of digits 0-9 with the full computation and with X-Slim
(same seed), and prints the wall-clock speedup, the PSNR between the two grids, the share of
transformer FLOPs X-Slim computed, what a digit classifier reads in both grids, and its own run
time. The picture saved as a PNG explains itself: the two grids labelled (full computation /
X-Slim with its setting), the speedup, FLOPs fraction and PSNR written on it, and a strip of the
run's steps showing which were computed in full, skipped, or refreshed per block or per token.

The default run is short (4 digits per class, 50 steps, one timed repeat): about a minute on two
idle cores. ``--per-class 10 --repeats 3`` is the full-size picture with a steadier timing.

Run from the repository root::

    python examples/digits_demo.py --help
    python examples/digits_demo.py --per-class 8 --steps 50 --out outputs/digits_demo.png
    python examples/digits_demo.py --calibrate 3   # a schedule planned for 3x on four other samples
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

_PROCESS_START = time.perf_counter()  # before torch and the rest are imported

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
    p.add_argument("--per-class", type=int, default=4, help="digits per class (rows of each grid)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise")
    p.add_argument("--repeats", type=int, default=1, help="timed repeats (median)")
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


def grid(images: torch.Tensor, cols: int = 10) -> np.ndarray:
    """(N, 1, 16, 16) in [0, 1], sample ``i`` drawn for digit ``i % cols`` -> one
    (rows*18, cols*18) uint8 image with a column per digit, 2-pixel gutters."""
    n = images.shape[0]
    rows = -(-n // cols)
    tile = 18
    out = np.full((rows * tile, cols * tile), 255, dtype=np.uint8)
    for i in range(n):
        r, c = i // cols, i % cols
        out[r * tile + 1 : r * tile + 17, c * tile + 1 : c * tile + 17] = (
            images[i, 0].clamp(0, 1).mul(255).round().byte().numpy()
        )
    return out


#: colours of the step strip, by decision kind
KIND_COLOURS = {"full": "#1f4e79", "block": "#2ca02c", "token": "#ff7f0e", "skip": "#d9d9d9"}
KIND_LABELS = {
    "full": "full (every block)",
    "block": "block refresh",
    "token": "token refresh",
    "skip": "skipped (cache reused)",
}


#: what the picture's numbers do not say (the realism ruler of docs/benchmarks.md, in one line)
CAVEAT = (
    "A tiny model on 16x16 digits changes little from step to step, so caching costs it little PSNR;\n"
    "real models score far lower (FLUX.1-dev, X-Slim at 3.37x: 21.3 dB, X-Slim paper Table 1)."
)


def save_picture(
    path: Path,
    full: torch.Tensor,
    cached: torch.Tensor,
    *,
    kinds: list[str],
    setting: str,
    headline: str,
    speedup: float,
    flops_fraction: float,
    quality: float,
    accuracy: tuple[float, float],
    times: tuple[float, float],
    timing: str = "",
    caveat: str = "",
) -> None:
    """The demo's picture: the two grids labelled, the numbers written on it, the step strip
    (each kind of decision with its count in the legend, so an unused level reads as 0 steps),
    and ``caveat`` (what these numbers do not say) at the foot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    g_full, g_cached = grid(full), grid(cached)
    h, w = g_full.shape
    fig_w = 10.0
    grid_h = fig_w * 0.62 * h / w
    fig = plt.figure(figsize=(fig_w, 2 * grid_h + 3.2), dpi=110)
    gs = fig.add_gridspec(
        4,
        2,
        height_ratios=[grid_h, grid_h, 0.55, 0.75],
        width_ratios=[0.62, 0.38],
        hspace=0.35,
        wspace=0.04,
        top=0.93,
        bottom=0.02,
    )
    fig.suptitle(headline, fontsize=12, fontweight="bold", y=0.995)
    panels = (
        (g_full, "full computation", f"{times[0]:.2f} s"),
        (g_cached, f"X-Slim: {setting}", f"{times[1]:.2f} s"),
    )
    for row, (img, title, took) in enumerate(panels):
        ax = fig.add_subplot(gs[row, 0])
        ax.imshow(img, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        ax.set_title(f"{title}  ({took})", loc="left", fontsize=10.5, fontweight="bold")
        ax.set_xticks([18 * d + 8.5 for d in range(10)], [str(d) for d in range(10)], fontsize=8)
        ax.set_yticks([])
        ax.tick_params(length=0)
        for side in ax.spines.values():
            side.set_visible(False)
    text_ax = fig.add_subplot(gs[0:2, 1])
    text_ax.axis("off")
    lines = [
        ("X-Slim vs. the full computation", "bold"),
        (f"wall-clock speedup   {speedup:.2f}x", "normal"),
        (f"transformer FLOPs   {flops_fraction:.1%} ({1 / flops_fraction:.2f}x)", "normal"),
        (f"PSNR   {quality:.1f} dB", "normal"),
        ("digit classifier accuracy", "normal"),
        (f"   full {accuracy[0]:.0%}, X-Slim {accuracy[1]:.0%}", "normal"),
        ("", "normal"),
        (timing, "normal"),
        ("", "normal"),
        ("same seed, same noise per digit;", "normal"),
        ("columns: the requested digit 0-9", "normal"),
    ]
    for i, (line, weight) in enumerate(lines):
        text_ax.text(
            0.06, 0.95 - i * 0.095, line, fontsize=10.5, fontweight=weight, va="top", family="DejaVu Sans"
        )
    strip = fig.add_subplot(gs[2, :])
    order = list(KIND_COLOURS)
    codes = np.array([[order.index(k) for k in kinds]])
    strip.imshow(
        codes,
        cmap=ListedColormap(list(KIND_COLOURS.values())),
        vmin=-0.5,
        vmax=len(order) - 0.5,
        aspect="auto",
        interpolation="nearest",
    )
    strip.set_yticks([])
    n = len(kinds)
    ticks = sorted({0, n - 1, *range(0, n, 5 if n <= 60 else 10)})
    strip.set_xticks(ticks, [str(t) for t in ticks], fontsize=8)
    strip.set_xticks(np.arange(-0.5, n, 1), minor=True)
    strip.grid(which="minor", axis="x", color="white", linewidth=0.8)
    strip.tick_params(which="minor", length=0)
    strip.set_xlabel("step", fontsize=9, labelpad=1)
    strip.set_title(f"X-Slim's decision at each of the {n} steps", loc="left", fontsize=10)
    legend_ax = fig.add_subplot(gs[3, :])
    legend_ax.axis("off")
    legend_ax.legend(
        handles=[Patch(color=KIND_COLOURS[k], label=f"{KIND_LABELS[k]}: {kinds.count(k)}") for k in order],
        loc="upper center",
        ncol=4,
        frameon=False,
        fontsize=9.5,
    )
    if caveat:
        legend_ax.text(0.5, 0.0, caveat, ha="center", va="top", fontsize=9, color="#555555")
    fig.savefig(path, bbox_inches="tight", facecolor="white")
    plt.close(fig)


def _load() -> tuple[float, float, float]:
    """The 1, 5 and 15 minute load averages (NaN where the platform has none)."""
    return os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3


def main(argv: list[str] | None = None) -> dict:
    started = _PROCESS_START if argv is None else time.perf_counter()  # the script: from its imports
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = DigitsDiTPipeline.from_checkpoint(args.checkpoint)
    labels = [d for _ in range(args.per_class) for d in range(10)]  # column-major: one row per digit

    def generate(p, steps: int | None = None) -> tuple[torch.Tensor, float]:
        g = torch.Generator().manual_seed(args.seed)
        t0 = time.perf_counter()
        out = p(labels, num_inference_steps=steps or args.steps, generator=g, progress=False)
        return out, time.perf_counter() - t0

    if args.preset and args.calibrate:
        raise SystemExit("--preset and --calibrate are alternatives: pass one")
    config = XSlimConfig.from_preset(args.preset) if args.preset else XSlimConfig()
    described = (
        f"preset {args.preset}"
        if args.preset
        else f"default online controller (warn {config.warn:g}, crit {config.crit:g}, polish {config.polish})"
    )
    setting = (
        f"preset {args.preset}"
        if args.preset
        else f"online, warn {config.warn:g}, crit {config.crit:g}, polish {config.polish}"
    )
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
        setting = f"schedule calibrated for {args.calibrate:g}x"
    xslim = XSlimPipelineWrapper(xslim_pipe, config)
    phases = {"set-up": time.perf_counter() - started}
    # warm-up of both pipelines: the first calls allocate, and X-Slim measures the FLOPs of a
    # full call once per shape; a few steps (all full, the warm-up) do both
    generate(pipe, steps=min(args.steps, 3))
    generate(xslim, steps=min(args.steps, 3))
    phases["warm-up"] = time.perf_counter() - started - sum(phases.values())
    times_full, times_xslim = [], []
    for _ in range(args.repeats):  # interleaved, so both see the same machine load
        full, t = generate(pipe)
        times_full.append(t)
        cached, t = generate(xslim)
        times_xslim.append(t)
    phases["timed runs"] = time.perf_counter() - started - sum(phases.values())
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
    headline = f"digits DiT: {len(labels)} digits, {args.steps} DDIM steps, guidance 6"
    save_picture(
        out,
        full,
        cached,
        kinds=summary["kinds"],
        setting=setting,
        headline=headline,
        speedup=speedup,
        flops_fraction=summary["flops_fraction"],
        quality=quality,
        accuracy=(acc_full, acc_xslim),
        times=(float(np.median(times_full)), float(np.median(times_xslim))),
        timing=f"timing: median of {args.repeats} run(s), load {_load()[0]:.1f}",
        caveat=CAVEAT,
    )

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
    print(f"picture saved to {out} (top: full computation, below: X-Slim, then its decision per step)")
    run_time = time.perf_counter() - started
    phases["scoring and picture"] = run_time - sum(phases.values())
    load = ", ".join(f"{x:.2f}" for x in _load())
    print(
        f"demo run time: {run_time:.1f} s on {torch.get_num_threads()} torch threads (load average {load}); "
        + ", ".join(f"{k} {v:.1f} s" for k, v in phases.items())
    )
    return {
        "speedup": speedup,
        "psnr": quality,
        "flops_fraction": summary["flops_fraction"],
        "accuracy_full": acc_full,
        "accuracy_xslim": acc_xslim,
        "out": str(out),
        "kinds": summary["kinds"],
        "run_time": run_time,
    }


if __name__ == "__main__":
    main()
