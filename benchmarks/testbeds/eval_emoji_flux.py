"""The realism ruler on the emoji FLUX testbed: the published FLUX.1-dev rows, measured on a checkpoint.

For each sampler setting (``--shift``: FLUX ``max_shift`` = ``mu`` at 256 tokens; ``--guidance``)
it samples ``--n`` emoji (classes ``i % 8``, seed ``--seed``, one batch) with the benchmark's own
method objects (:mod:`benchmarks.methods`: the reference, 25 and 17 of 50 steps, uniform reuse
every 3 steps, TeaCache 0.6 through xfuser's FLUX adapter, TaylorSeer N=3 through diffusers' hook)
and prints, per method, PSNR per image on ``[0, 1]`` (averaged over images) against the 50-step
samples, the FLOP fraction (the benchmark's counter), the emoji-classifier
accuracy, and the published value beside it with the gap. No timing: use
``python -m benchmarks.run --testbeds emoji_flux ...`` for the full report.

Example::

    python -m benchmarks.testbeds.eval_emoji_flux --ckpt outputs/emoji_flux_ckpt --n 8 \\
        --shift 1.15 2.0 --guidance 4 --json outputs/ruler.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.methods import FewerSteps, TaylorSeer, TeaCache, UniformReuse
from benchmarks.metrics import psnr_per_image
from benchmarks.suites import EmojiFluxTestbed

#: (label, published FLUX.1-dev PSNR in dB, factory of the benchmark's method)
RULER: tuple[tuple[str, float, Any], ...] = (
    ("25 steps", 17.92, lambda: FewerSteps(2)),
    ("15 steps (17 here)", 15.49, lambda: FewerSteps(3)),
    ("uniform reuse every 3", 15.82, lambda: UniformReuse(3)),
    ("TeaCache 0.6", 16.94, lambda: TeaCache(0.6)),
    ("TaylorSeer N=3", 19.60, lambda: TaylorSeer(3, 1)),
)
#: a testbed row within this many dB of the published value counts as realistic
TOLERANCE_DB = 3.0


def counted(fn: Any) -> tuple[Any, int]:
    """``(fn(), FLOPs it computed)`` by the benchmark's counter (:mod:`xslim_xdit.flops`)."""
    from xslim_xdit.flops import counter

    with counter() as mode:
        out = fn()
    return out, int(mode.get_total_flops())


def save_grid(images: dict[str, torch.Tensor], path: Path) -> None:
    """One row of samples per method (``[0, 1]``, ``(N, 3, 32, 32)``), x3 nearest upscaled, as a PNG."""
    from PIL import Image

    rows = [torch.cat(list(x), dim=2) for x in images.values()]  # (3, 32, 32 N)
    grid = torch.cat(rows, dim=1).permute(1, 2, 0).mul(255).round().byte().numpy()
    img = Image.fromarray(grid)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.resize((img.width * 3, img.height * 3), Image.NEAREST).save(path)


def ruler(
    testbed: EmojiFluxTestbed, pipe: Any, n: int, steps: int = 50, seed: int = 0, png: Path | None = None
) -> dict[str, Any]:
    """The ruler rows of one sampler setting: ``{label: {psnr, psnr_min, accuracy, fraction, published}}``."""
    conds = testbed.conditions(n)
    t0 = time.time()
    ref, ref_flops = counted(lambda: testbed.generate(pipe, conds, steps, seed))
    rows: dict[str, Any] = {
        "full": {"accuracy": testbed.sample_quality(ref, conds)["accuracy"], "seconds": time.time() - t0}
    }
    grid = {"full": ref}
    for label, published, factory in RULER:
        m = factory()
        t0 = time.time()
        try:
            m.prepare(pipe, testbed, steps)
            m.enable(pipe, measure=True)
            try:
                out, flops = counted(lambda m=m: testbed.generate(pipe, conds, m.num_steps(steps), seed))
            finally:
                m.disable(pipe)
        except Exception as e:  # noqa: BLE001 - a refused or crashed peer is a result too
            rows[label] = {"published": published, "error": f"{type(e).__name__}: {e}"}
            continue
        grid[label] = out
        p = psnr_per_image(out, ref)
        rows[label] = {
            "method": m.name,
            "published": published,
            "psnr": float(p.mean()),
            "psnr_min": float(p.min()),
            "gap": float(p.mean()) - published,
            "accuracy": testbed.sample_quality(out, conds)["accuracy"],
            "fraction": flops / ref_flops,
            "seconds": time.time() - t0,
        }
    if png is not None:
        save_grid(grid, png)
    return rows


def format_rows(rows: dict[str, Any]) -> str:
    """A markdown table of :func:`ruler`'s rows."""
    lines = [
        "| setting | published | testbed (min) | gap | FLOPs | accuracy |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    lines.append(f"| 50 steps (reference) | - | - | - | 1.00 | {rows['full']['accuracy']:.2f} |")
    for label, r in rows.items():
        if label == "full":
            continue
        if "error" in r:
            lines.append(f"| {label} | {r['published']:.1f} dB | {r['error']} | | | |")
            continue
        frac = f"{r['fraction']:.2f}"
        ok = "ok" if abs(r["gap"]) <= TOLERANCE_DB else "off"
        lines.append(
            f"| {label} | {r['published']:.1f} dB | {r['psnr']:.1f} ({r['psnr_min']:.1f}) dB | "
            f"{r['gap']:+.1f} dB ({ok}) | {frac} | {r['accuracy']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", type=Path, default=None, help="checkpoint folder (default: the committed one)")
    p.add_argument("--n", type=int, default=8, help="samples per setting (one batch)")
    p.add_argument("--steps", type=int, default=50, help="reference steps")
    p.add_argument("--shift", type=float, nargs="+", default=[None], help="max_shift overrides")
    p.add_argument("--guidance", type=float, nargs="+", default=[None], help="guidance overrides")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, default=None, help="append the results here (JSON lines)")
    p.add_argument("--png", type=Path, default=None, help="sample grid (a row per method), per setting")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    testbed = EmojiFluxTestbed()
    pipe = testbed.load(str(args.ckpt) if args.ckpt else None)
    base = dict(pipe.scheduler.config)
    default_guidance = testbed.guidance_scale
    for shift in args.shift:
        pipe.scheduler = type(pipe.scheduler).from_config(
            base, **({} if shift is None else {"max_shift": shift})
        )
        for g in args.guidance:
            testbed.guidance_scale = default_guidance if g is None else g
            t0 = time.time()
            png = None
            if args.png is not None:
                png = args.png.with_name(f"{args.png.stem}_shift{pipe.scheduler.config['max_shift']:g}"
                                         f"_g{testbed.guidance_scale:g}{args.png.suffix}")  # fmt: skip
            rows = ruler(testbed, pipe, args.n, args.steps, args.seed, png)
            setting = {
                "ckpt": str(args.ckpt),
                "max_shift": pipe.scheduler.config["max_shift"],
                "guidance": testbed.guidance_scale,
                "n": args.n,
                "seconds": time.time() - t0,
            }
            print(f"\n{json.dumps(setting)}\n{format_rows(rows)}", flush=True)
            if args.json is not None:
                with args.json.open("a") as f:
                    f.write(json.dumps({**setting, "rows": rows}) + "\n")


if __name__ == "__main__":
    main()
