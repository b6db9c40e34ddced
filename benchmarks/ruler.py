"""The realism ruler: published real-model PSNR figures beside the testbed's own.

The testbeds are small models trained here; their per-step changes are far smaller than a real
model's, so every method scores many dB higher on them than on FLUX.1-dev or HunyuanVideo. The
ruler puts each published figure (same method, same setting, 50-step reference) beside the
testbed's value and prints the gap, so that nobody reads a testbed margin as a real-model one.

Published figures (PSNR per image against the 50-step output of the same seed) are those quoted
in the project's shared notes (``NOTES.md``, "The realism ruler: published real-model figures")
and spec (``XSLIM_SPEC.md`` section 3), both from the X-Slim paper: Table 1 for FLUX.1-dev on
DrawBench, its HunyuanVideo table for video. Only PSNR is compared: it is the one quality number
both the paper and the benchmark compute the same way.

Usage::

    python -m benchmarks.ruler docs/benchmarks/results.json      # markdown, every testbed

Example:
    >>> tb = {"testbed": {"name": "digits"}, "methods": {
    ...     "full": {"family": "reference", "steps": 50, "psnr": "inf"},
    ...     "steps/2": {"family": "fewer-steps", "steps": 25, "psnr": 30.25, "speedup": 1.91}}}
    >>> row = next(r for r in ruler_rows(tb) if r.figure.setting == "25 steps")
    >>> (row.figure.psnr, row.testbed_psnr, round(row.gap, 2))
    (17.92, 30.25, 12.33)
    >>> verdict(tb)
    'testbed is 12.3 dB easier than the real model (FLUX.1-dev, median over 1 matched row): margins are not transferable'
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: where the published figures come from (printed under every ruler)
SOURCE = (
    "X-Slim paper: Table 1 (FLUX.1-dev, DrawBench, 50 steps = 27.32 s on one GPU) and its "
    "HunyuanVideo table (50 steps = 597.9 s); quoted in the project's shared NOTES.md "
    "('The realism ruler') and XSLIM_SPEC.md section 3"
)

#: a gap above this many dB makes the verdict "not transferable"
TRANSFER_GAP_DB = 3.0

FLUX = "FLUX.1-dev"
HUNYUAN = "HunyuanVideo"


@dataclass(frozen=True)
class Figure:
    """One published real-model result and how to find its counterpart on a testbed.

    Attributes:
        model: the real model (``"FLUX.1-dev"`` or ``"HunyuanVideo"``).
        setting: the method and setting as the paper names it.
        speedup: published latency speedup against 50 steps.
        psnr: published PSNR (dB) against the 50-step output.
        family: the benchmark's method family of the counterpart.
        names: benchmark method names that run exactly this setting, in order of preference.
        steps: for fewer-steps rows, the step count out of 50 (matched proportionally on a
            testbed whose reference has another step count).
    """

    model: str
    setting: str
    speedup: float
    psnr: float
    family: str
    names: tuple[str, ...] = ()
    steps: int | None = None


#: every published PSNR figure with a 50-step reference that the project has (NOTES.md, where
#: each value is checked against the spec); ToCa and EasyCache are left out: no testbed runs them
FIGURES: tuple[Figure, ...] = (
    Figure(FLUX, "25 steps", 1.98, 17.92, "fewer-steps", steps=25),
    Figure(FLUX, "15 steps", 3.25, 15.49, "fewer-steps", steps=15),
    Figure(FLUX, "uniform reuse every 3 steps", 2.85, 15.82, "uniform-reuse", ("reuse-every-3",)),
    Figure(FLUX, "TeaCache 0.6", 3.24, 16.94, "teacache", ("TeaCache 0.6",)),
    Figure(
        FLUX,
        "TaylorSeer N=3",
        2.35,
        19.60,
        "taylorseer",
        ("TaylorSeer N=3 o=1 lite", "TaylorSeer N=3 o=2", "TaylorSeer N=3 o=1"),
    ),
    Figure(FLUX, "X-Slim C2F-slow", 3.37, 21.30, "xslim", ("X-Slim preset flux-slow",)),
    Figure(HUNYUAN, "X-Slim C2F-slow", 2.94, 27.52, "xslim", ("X-Slim preset hunyuan_video-slow",)),
    Figure(FLUX, "10 steps", 4.75, 14.53, "fewer-steps", steps=10),
    Figure(FLUX, "uniform reuse every 5 steps", 4.71, 14.53, "uniform-reuse", ("reuse-every-5",)),
    Figure(
        FLUX,
        "TaylorSeer N=6",
        3.60,
        15.78,
        "taylorseer",
        ("TaylorSeer N=6 o=1 lite", "TaylorSeer N=6 o=2", "TaylorSeer N=6 o=1"),
    ),
    Figure(FLUX, "TeaCache 1.0", 4.58, 15.47, "teacache", ("TeaCache 1",)),
    Figure(FLUX, "X-Slim C2F-fast", 4.97, 19.24, "xslim", ("X-Slim preset flux-fast",)),
    Figure(HUNYUAN, "25 steps", 1.98, 19.94, "fewer-steps", steps=25),
    Figure(HUNYUAN, "TeaCache 0.15", 2.35, 23.18, "teacache", ("TeaCache 0.15",)),
    Figure(HUNYUAN, "TeaCache 0.25", 3.34, 23.10, "teacache", ("TeaCache 0.25",)),
    Figure(HUNYUAN, "X-Slim C2F-fast", 3.52, 24.07, "xslim", ("X-Slim preset hunyuan_video-fast",)),
)

#: a counterpart found by speedup (not by setting) must lie within this factor of the published one
SPEEDUP_TOLERANCE = 1.25


@dataclass
class RulerRow:
    """One published figure beside its testbed counterpart (``None`` fields: not run here)."""

    figure: Figure
    method: str | None = None
    how: str = ""
    testbed_psnr: float | None = None
    testbed_speedup: float | None = None

    @property
    def gap(self) -> float | None:
        """Testbed PSNR minus published PSNR (dB): how much easier the testbed is."""
        if self.testbed_psnr is None:
            return None
        return self.testbed_psnr - self.figure.psnr


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def reference_steps(tb: dict[str, Any]) -> int | None:
    """Step count of the testbed's reference (the full computation)."""
    for e in tb["methods"].values():
        if e.get("family") == "reference":
            return int(e["steps"])
    return None


def analog_model(tb: dict[str, Any]) -> str:
    """The real model a testbed stands in for: HunyuanVideo for video testbeds, else FLUX.1-dev
    (the digits DiT has no published PSNR of its own: DiT-XL/2 is reported in FID only)."""
    t = tb.get("testbed")
    name = str(t.get("name", "") if isinstance(t, dict) else t or "").lower()
    model = str(t.get("model", "") if isinstance(t, dict) else "").lower()
    return HUNYUAN if "video" in name or "hunyuan" in model else FLUX


def _match(fig: Figure, tb: dict[str, Any], ref_steps: int | None) -> RulerRow:
    methods = tb["methods"]

    def usable(name: str) -> bool:
        return name in methods and _num(methods[name].get("psnr")) is not None

    def row(name: str, how: str) -> RulerRow:
        e = methods[name]
        return RulerRow(fig, name, how, _num(e.get("psnr")), _num(e.get("speedup")))

    if fig.steps is not None and ref_steps:
        # fewer steps: the same fraction of the reference's steps (25 of 50 = 10 of 20)
        want = fig.steps * ref_steps / 50
        runs = [n for n, e in methods.items() if e.get("family") == fig.family and usable(n)]
        if runs:
            best = min(runs, key=lambda n: abs(methods[n]["steps"] - want))
            got = methods[best]["steps"]
            if abs(got - want) <= max(1.0, 0.15 * want):
                near = "" if abs(got - want) < 0.5 else f", nearest to {want:g}"
                return row(best, f"{got} of {ref_steps} steps{near}")
        return RulerRow(fig, how=f"not run on this testbed (no {want:g}-of-{ref_steps}-step run)")
    for name in fig.names:
        if usable(name):
            return row(name, "same setting")
    # else a run of the family near the published speedup; for X-Slim the best of its many
    # settings there (what "X-Slim at about 3x" means in the benchmark's own tables)
    near = []
    for n, e in methods.items():
        fam = str(e.get("family", ""))
        s = _num(e.get("speedup"))
        if (fam.startswith("xslim") if fig.family == "xslim" else fam == fig.family) and usable(n) and s:
            d = abs(math.log(s / fig.speedup))
            if d <= math.log(SPEEDUP_TOLERANCE):
                near.append((-_num(e["psnr"]) if fig.family == "xslim" else d, n))  # type: ignore[operator]
    if near:
        n = min(near)[1]
        how = f"best X-Slim near {fig.speedup:g}x" if fig.family == "xslim" else "nearest speedup"
        return row(n, how)
    return RulerRow(fig, how="not run on this testbed")


def ruler_rows(tb: dict[str, Any]) -> list[RulerRow]:
    """Every published figure of the testbed's real model (:func:`analog_model`) beside its
    counterpart on this testbed. Only that model's figures: a digits or FLUX-like testbed beside
    a video model's figures (or the reverse) would compare two different difficulties."""
    ref, model = reference_steps(tb), analog_model(tb)
    return [_match(f, tb, ref) for f in sorted(FIGURES, key=lambda f: f.speedup) if f.model == model]


def median_gap(tb: dict[str, Any]) -> tuple[float | None, int, str]:
    """Median gap (dB) over the matched rows (robust to one odd row, such as a published
    schedule that does not suit the testbed), the number of those rows, and the real model."""
    gaps = [r.gap for r in ruler_rows(tb) if r.gap is not None]
    return (statistics.median(gaps) if gaps else None), len(gaps), analog_model(tb)


def rows_off(tb: dict[str, Any]) -> list[RulerRow]:
    """The matched rows more than :data:`TRANSFER_GAP_DB` from their published value, worst first:
    a testbed is realistic only when there are none (issue 13's rule: every ruler method within
    3 dB), whatever the median."""
    off = [r for r in ruler_rows(tb) if r.gap is not None and abs(r.gap) > TRANSFER_GAP_DB]
    return sorted(off, key=lambda r: -abs(r.gap or 0.0))


def is_realistic(tb: dict[str, Any]) -> bool:
    """Some published figure is matched and every matched row is within :data:`TRANSFER_GAP_DB`."""
    return median_gap(tb)[0] is not None and not rows_off(tb)


def verdict(tb: dict[str, Any]) -> str:
    """One line: how much easier (or harder) the testbed is than its real model, and, when the
    median hides them, the rows that break the 3 dB rule."""
    gap, n, model = median_gap(tb)
    if gap is None:
        return "no published figure has a counterpart on this testbed: realism unknown"
    over = f"({model}, median over {n} matched row{'s' if n != 1 else ''})"
    if gap > TRANSFER_GAP_DB:
        return f"testbed is {gap:.1f} dB easier than the real model {over}: margins are not transferable"
    if gap < -TRANSFER_GAP_DB:
        return f"testbed is {-gap:.1f} dB harder than the real model {over}: margins are not transferable"
    off = rows_off(tb)
    if off:
        worst = off[0]
        return (
            f"testbed is within {TRANSFER_GAP_DB:g} dB of the real model at the median {over} (gap "
            f"{gap:+.1f} dB), but {len(off)} of {n} rows are further off (worst: {worst.figure.setting} "
            f"{worst.gap:+.1f} dB): not realistic, margins are not transferable"
        )
    return f"testbed is within {TRANSFER_GAP_DB:g} dB of the real model {over} (gap {gap:+.1f} dB)"


def _f(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


RULER_HEADER = [
    "published setting",
    "published speedup",
    "published PSNR",
    "testbed method",
    "testbed speedup",
    "testbed PSNR",
    "gap",
]


def table_rows(tb: dict[str, Any], matched_only: bool = False) -> list[list[str]]:
    """Rows of :data:`RULER_HEADER` as strings (``-`` where the testbed has no counterpart);
    ``matched_only`` keeps the rows with a testbed value (see :func:`unmatched` for the rest)."""
    out = []
    for r in ruler_rows(tb):
        if matched_only and r.gap is None:
            continue
        f = r.figure
        method = f"{r.method} ({r.how})" if r.method else r.how
        out.append(
            [
                f.setting,
                f"{f.speedup:.2f}x",
                f"{f.psnr:.2f} dB",
                method,
                _f(r.testbed_speedup, ".2f") + ("x" if r.testbed_speedup is not None else ""),
                _f(r.testbed_psnr, ".2f") + (" dB" if r.testbed_psnr is not None else ""),
                _f(r.gap, "+.1f") + (" dB" if r.gap is not None else ""),
            ]
        )
    return out


def unmatched(tb: dict[str, Any]) -> str:
    """The published settings with no counterpart on this testbed, as one comma-separated line
    (``""`` if every one has one)."""
    return ", ".join(
        f"{r.figure.setting} ({r.figure.speedup:.2f}x, {r.figure.psnr:.2f} dB)"
        for r in ruler_rows(tb)
        if r.gap is None
    )


def markdown(name: str, tb: dict[str, Any]) -> str:
    """The ruler of one testbed as a markdown section (printed by every benchmark run)."""
    steps = reference_steps(tb)
    model = analog_model(tb)
    lines = [f"#### {name}: realism ruler (published {model} PSNR vs. this testbed)", ""]
    lines.append("| " + " | ".join(RULER_HEADER) + " |")
    lines.append("| " + " | ".join("---" for _ in RULER_HEADER) + " |")
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(tb, matched_only=True)]
    lines.append("")
    missing = unmatched(tb)
    if missing:
        lines += [f"Published, not run on this testbed in this run: {missing}.", ""]
    lines.append(f"**Verdict: {verdict(tb)}.**")
    note = f"Source: {SOURCE}. Gap = testbed PSNR minus published PSNR."
    if steps is not None and steps != 50:
        note += f" This testbed's reference has {steps} steps, not 50: indicative only."
    lines.append(note)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Print the ruler of every testbed in a ``results.json``."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.ruler", description=__doc__.split("\n")[0])
    p.add_argument("results", type=Path, help="a results.json written by benchmarks.run")
    p.add_argument("--testbeds", default=None, help="comma-separated (default: all in the file)")
    args = p.parse_args(argv)
    res = json.loads(args.results.read_text())
    names = args.testbeds.split(",") if args.testbeds else list(res["testbeds"])
    for name in names:
        print(markdown(name, res["testbeds"][name]) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
