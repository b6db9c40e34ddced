"""The README's headline table, printed from the committed results: ``python -m benchmarks.headline``.

The FLUX testbed at 20, 28 and 50 steps: each method family's PSNR at 2x and 3x FLOP speedup
(read off its FLOP frontier), the issue's targets checked within each run, and the realism ruler's
gap beside them. Nothing is retyped: every number comes from ``docs/benchmarks/results.json``.

Example:
    >>> cell([(1.9, 30.0), (3.2, 24.0)], 2.0)
    '29.5'
    >>> cell([(2.6, 22.0)], 2.0)
    '-'
    >>> cell([(2.2, 22.0)], 2.0)
    '22.0 (2.2x)'
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from benchmarks.ruler import ruler_rows, verdict
from benchmarks.targets import Point, compare, family_points, frontier, interpolate

RESULTS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks" / "results.json"

#: steps -> (the run with fewer steps, TeaCache, First-Block-Cache, TaylorSeer and X-Slim;
#: the run with MagCache and cache-dit's DBCache calibrators, and fewer steps, TeaCache, X-Slim)
RUNS: dict[int, tuple[str, str]] = {
    20: ("flux_20steps", "flux_20steps_cache_peers"),
    28: ("flux_28steps", "flux_28steps_cache_peers"),
    50: ("flux", "flux_50steps_cache_peers"),
}
#: (family, column title, which run of RUNS it is read from: 0 or 1)
COLUMNS: tuple[tuple[str, str, int], ...] = (
    ("xslim", "X-Slim", 0),
    ("fewer-steps", "fewer steps", 0),
    ("teacache", "TeaCache", 0),
    ("first-block-cache", "First-Block-Cache", 0),
    ("taylorseer", "TaylorSeer", 0),
    ("magcache", "MagCache", 1),
    ("dbcache-taylorseer", "DBCache+TaylorSeer", 1),
    ("dbcache-foca", "DBCache+FoCa", 1),
)
SPEEDUPS = (2.0, 3.0)
AXIS = "flops_speedup"


def cell(points: list[Point], s: float) -> str:
    """PSNR on the frontier of ``points`` at speedup ``s``; outside it, the point nearest ``s``
    within 0.85-1.25 s with its speedup; else ``-``."""
    front = frontier(points)
    v = interpolate(front, s)
    if v is not None:
        return f"{v:.1f}"
    near = [(abs(x - s), x, p) for x, p in points if 0.85 * s <= x <= 1.25 * s]
    if not near:
        return "-"
    _, x, p = min(near)
    return f"{p:.1f} ({x:.1f}x)"


def _points(tb: dict[str, Any], family: str) -> list[Point]:
    return [(s, p) for s, p, _ in family_points(tb, AXIS).get(family, [])]


def table_rows(testbeds: dict[str, Any]) -> list[list[str]]:
    """One row per (steps, speedup): PSNR (dB) of each column's family."""
    rows = []
    for steps, runs in RUNS.items():
        for s in SPEEDUPS:
            row = [str(steps), f"{s:.0f}x"]
            row += [cell(_points(testbeds[runs[run]], fam), s) for fam, _, run in COLUMNS]
            rows.append(row)
    return rows


def target_lines(testbeds: dict[str, Any]) -> list[str]:
    """The issue's targets, each margin computed within one run (same samples, same seeds)."""
    lines = []
    for steps, runs in RUNS.items():
        worst: list[tuple[float, str, float]] = []
        for name in runs:
            tb = testbeds[name]
            xs = frontier(_points(tb, "xslim"))
            for fam, title, _ in COLUMNS[1:]:
                c = compare(xs, frontier(_points(tb, fam)), 1.5, 5.0) if _points(tb, fam) else None
                if c is not None:
                    worst.append((c["min_margin"], title, c["at"]))
        m, title, at = min(worst)
        verdict = "met" if m > 0 else "missed"
        lines.append(
            f"{steps} steps: X-Slim above every peer where both reach (1.5x-5x FLOPs): {verdict}; "
            f"smallest margin {m:+.1f} dB ({title}, {at:.2f}x)"
        )
    tb = testbeds[RUNS[28][0]]
    xs, fs = frontier(_points(tb, "xslim")), frontier(_points(tb, "fewer-steps"))
    for s in SPEEDUPS:
        x, f = interpolate(xs, s), interpolate(fs, s)
        if x is None or f is None:
            lines.append(f"28 steps, {s:.0f}x: +1 dB over fewer steps: not measurable (a frontier ends)")
            continue
        verdict = "met" if x - f >= 1.0 else f"missed by {1.0 - (x - f):.1f} dB"
        lines.append(f"28 steps, {s:.0f}x: +1 dB over fewer steps: {verdict} ({x - f:+.1f} dB)")
    return lines


def ruler_line(testbeds: dict[str, Any]) -> str:
    """The realism ruler on the 50-step FLUX run: each published FLUX.1-dev figure with a
    counterpart here, published vs testbed PSNR, and the verdict."""
    tb = testbeds[RUNS[50][0]]
    parts = [
        f"{r.figure.setting} {r.figure.psnr:.1f} vs {r.testbed_psnr:.1f}"
        for r in ruler_rows(tb)
        if r.testbed_psnr is not None
    ]
    return f"Realism ruler (published FLUX.1-dev vs this testbed, dB): {'; '.join(parts)}: {verdict(tb)}."


HEADER = ["steps", "FLOPs speedup"] + [title for _, title, _ in COLUMNS]


def markdown(results: dict[str, Any]) -> str:
    """The README's table, the targets and the ruler line, as markdown."""
    tbs = results["testbeds"]
    lines = ["| " + " | ".join(HEADER) + " |", "| " + " | ".join("---" for _ in HEADER) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(tbs)]
    lines += [""] + [f"- {t}" for t in target_lines(tbs)]
    lines += ["", ruler_line(tbs)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.headline", description=__doc__.split("\n")[0])
    p.add_argument("--results", type=Path, default=RESULTS, help="results JSON (default: the committed one)")
    args = p.parse_args(argv)
    print(markdown(json.loads(args.results.read_text())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
