"""The issue's targets, checked on a ``results.json``: frontiers, X-Slim vs. fewer steps, wall clock vs. FLOPs.

Usage::

    python -m benchmarks.targets docs/benchmarks/results.json            # every testbed, markdown
    python -m benchmarks.targets results.json --testbeds flux --lo 1.5 --hi 5

A *frontier* is the upper envelope of a family's points in (speedup, PSNR): the Pareto-optimal
points (no other point of the family is both faster and better), joined by straight lines; it is
defined only between its slowest and its fastest point. X-Slim's frontier takes every X-Slim
setting (online, calibrated, presets, every level); each peer's frontier takes its own settings.
Two frontiers are compared on a grid of speedups between ``--lo`` and ``--hi`` where both are
defined, along the FLOP speedup (``1 / FLOP fraction``, exact) and along the wall-clock speedup
(median of interleaved timings; noisy on a shared machine).

Example:
    >>> frontier([(1.0, 30.0), (2.0, 25.0), (1.5, 20.0)])
    [(1.0, 30.0), (2.0, 25.0)]
    >>> interpolate([(1.0, 30.0), (2.0, 25.0)], 1.5)
    27.5
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

PEER_FAMILIES = (
    "fewer-steps",
    "uniform-reuse",
    "first-block-cache",
    "taylorseer",
    "teacache",
    "dbcache",
    "dbcache-taylorseer",
    "dbcache-foca",
    "magcache",
)
Point = tuple[float, float]


def frontier(points: list[Point]) -> list[Point]:
    """Pareto-optimal points (higher speedup and higher PSNR are better), sorted by speedup."""
    pts = sorted((s, p) for s, p in points if math.isfinite(s) and math.isfinite(p))
    out: list[Point] = []
    for i, (s, p) in enumerate(pts):
        if not any(s2 >= s and p2 > p for s2, p2 in pts[i + 1 :]):
            out.append((s, p))
    return out


def interpolate(front: list[Point], s: float) -> float | None:
    """PSNR of a frontier at speedup ``s`` (linear between its points), ``None`` outside it."""
    if not front or s < front[0][0] - 1e-9 or s > front[-1][0] + 1e-9:
        return None
    for (s0, p0), (s1, p1) in zip(front, front[1:], strict=False):
        if s0 <= s <= s1:
            return p0 if s1 == s0 else p0 + (p1 - p0) * (s - s0) / (s1 - s0)
    return front[0][1]


def staircase(points: list[Point], s: float) -> float | None:
    """Best PSNR among points at least as fast as ``s`` (what a user who wants at least ``s`` can
    get); ``None`` if no point is that fast.

    Example:
        >>> staircase([(2.0, 30.0), (3.1, 28.0)], 3.0)
        28.0
    """
    vals = [p for x, p in points if x >= s - 1e-9 and math.isfinite(p)]
    return max(vals) if vals else None


def dominance(xs: list[Point], peer: list[Point], lo: float, hi: float) -> dict[str, Any]:
    """For every peer point with speedup in ``[lo, hi]``: the best X-Slim PSNR at that speedup or
    faster, minus the peer's PSNR (positive: some X-Slim setting is both faster and better)."""
    rows = []
    for s, p in peer:
        if lo - 1e-9 <= s <= hi + 1e-9:
            x = staircase(xs, s)
            rows.append({"speedup": s, "peer": p, "xslim": x, "margin": None if x is None else x - p})
    margins = [r["margin"] for r in rows if r["margin"] is not None]
    return {
        "points": rows,
        "dominated": sum(m > 0 for m in margins),
        "n": len(rows),
        "min_margin": min(margins) if margins else None,
    }


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def family_points(tb: dict[str, Any], axis: str) -> dict[str, list[tuple[float, float, str]]]:
    """``family -> [(speedup, psnr, name)]`` with X-Slim's families pooled under ``xslim``."""
    out: dict[str, list[tuple[float, float, str]]] = {}
    for name, e in tb["methods"].items():
        s, p = _num(e.get(axis)), _num(e.get("psnr"))
        if s is None or p is None:
            continue
        fam = "xslim" if e["family"].startswith("xslim") else e["family"]
        out.setdefault(fam, []).append((s, p, name))
    return out


def compare(a: list[Point], b: list[Point], lo: float, hi: float, n: int = 141) -> dict[str, float] | None:
    """Margin ``a - b`` (dB) on a grid of speedups in ``[lo, hi]`` where both frontiers exist."""
    if not a or not b:
        return None
    start, stop = max(lo, a[0][0], b[0][0]), min(hi, a[-1][0], b[-1][0])
    if start > stop:
        return None
    grid = [start + (stop - start) * i / (n - 1) for i in range(n)] if stop > start else [start]
    margins = []
    for s in grid:
        pa, pb = interpolate(a, s), interpolate(b, s)
        if pa is not None and pb is not None:
            margins.append((pa - pb, s))
    if not margins:
        return None
    worst = min(margins)
    return {
        "from": start,
        "to": stop,
        "min_margin": worst[0],
        "at": worst[1],
        "mean_margin": sum(m for m, _ in margins) / len(margins),
        "fraction_above": sum(m > 0 for m, _ in margins) / len(margins),
    }


def check_testbed(tb: dict[str, Any], lo: float = 1.5, hi: float = 5.0) -> dict[str, Any]:
    """Every target for one testbed's results."""
    res: dict[str, Any] = {}
    for axis in ("flops_speedup", "speedup"):
        fams = family_points(tb, axis)
        xs = frontier([(s, p) for s, p, _ in fams.get("xslim", [])])
        axis_res: dict[str, Any] = {"xslim_frontier": xs, "peers": {}}
        for fam in PEER_FAMILIES:
            if fam not in fams:
                continue
            pf = frontier([(s, p) for s, p, _ in fams[fam]])
            axis_res["peers"][fam] = {
                "frontier": pf,
                "comparison": compare(xs, pf, lo, hi),
                "dominance": dominance(
                    [(s, p) for s, p, _ in fams["xslim"]] if "xslim" in fams else [],
                    [(s, p) for s, p, _ in fams[fam]],
                    lo,
                    hi,
                ),
            }
        steps = axis_res["peers"].get("fewer-steps", {}).get("frontier", [])
        x3, f3 = interpolate(xs, 3.0), interpolate(steps, 3.0)
        x3s = staircase(xs, 3.0)
        axis_res["at_3x"] = {
            "xslim": x3,
            "xslim_at_or_above": x3s,
            "fewer_steps": f3,
            "margin": None if x3 is None or f3 is None else x3 - f3,
            "margin_at_or_above": None if x3s is None or f3 is None else x3s - f3,
        }
        res[axis] = axis_res
    ratios, bk = [], []
    for name, e in tb["methods"].items():
        if not e["family"].startswith("xslim"):
            continue
        r, fs = _num(e.get("speedup_vs_flops")), _num(e.get("flops_speedup"))
        if r is not None and fs is not None and fs >= 1.3:
            ratios.append((r, name))
        b = _num(e.get("bookkeeping_fraction_of_full_step"))
        if b is not None:
            bk.append((b, name))
    ratios.sort()
    res["wall_over_flops"] = {
        "median": ratios[len(ratios) // 2][0] if ratios else None,
        "min": ratios[0] if ratios else None,
        "max": ratios[-1] if ratios else None,
        "n": len(ratios),
        "at_least_0.85": sum(r >= 0.85 for r, _ in ratios),
    }
    bk.sort()
    res["bookkeeping"] = {"max": bk[-1] if bk else None, "min": bk[0] if bk else None}
    return res


def _fmt(v: float | None, fmt: str = ".2f") -> str:
    return "-" if v is None else format(v, fmt)


def markdown(name: str, tb: dict[str, Any], lo: float = 1.5, hi: float = 5.0) -> str:
    """The "against the targets" section of one testbed."""
    r = check_testbed(tb, lo, hi)
    lines = [f"#### {name}: X-Slim's frontier against each peer ({lo:g}x to {hi:g}x)", ""]
    lines.append(
        "| peer | axis | frontiers compared over | X-Slim minus peer: worst (at) | mean | share of range "
        "above | peer points in range beaten by a faster X-Slim point (worst margin) |"
    )
    lines.append("| --- | --- | --- | --- | --- | --- | --- |")
    for axis, label in (("flops_speedup", "FLOPs"), ("speedup", "wall clock")):
        for fam, d in r[axis]["peers"].items():
            c, dm = d["comparison"], d["dominance"]
            dom = (
                f"{dm['dominated']} of {dm['n']} ({_fmt(dm['min_margin'], '+.2f')} dB)"
                if dm["n"]
                else "none in range"
            )
            if c is None:
                lo_p = d["frontier"][0][0] if d["frontier"] else float("nan")
                hi_p = d["frontier"][-1][0] if d["frontier"] else float("nan")
                span = f"no overlap (peer spans {lo_p:.2f}x-{hi_p:.2f}x)"
                lines.append(f"| {fam} | {label} | {span} | - | - | - | {dom} |")
                continue
            lines.append(
                f"| {fam} | {label} | {c['from']:.2f}x-{c['to']:.2f}x | {c['min_margin']:+.2f} dB "
                f"({c['at']:.2f}x) | {c['mean_margin']:+.2f} dB | {100 * c['fraction_above']:.0f}% | {dom} |"
            )
    lines.append("")
    for axis, label in (("flops_speedup", "FLOP"), ("speedup", "wall-clock")):
        a = r[axis]["at_3x"]
        lines.append(
            f"- At 3x {label} speedup: X-Slim {_fmt(a['xslim'])} dB on its frontier (best X-Slim point at "
            f">= 3x: {_fmt(a['xslim_at_or_above'])} dB), fewer steps {_fmt(a['fewer_steps'])} dB; margin "
            f"{_fmt(a['margin'], '+.2f')} dB ({_fmt(a['margin_at_or_above'], '+.2f')} dB) (target +3 dB)."
        )
    w = r["wall_over_flops"]
    if w["n"]:
        lines.append(
            f"- Wall-clock speedup / FLOP speedup over the {w['n']} X-Slim settings with >= 1.3x FLOP "
            f"speedup: median {w['median']:.2f}, min {w['min'][0]:.2f} ({w['min'][1]}), max "
            f"{w['max'][0]:.2f} ({w['max'][1]}); {w['at_least_0.85']} of {w['n']} at >= 0.85 (target 0.85)."
        )
    b = r["bookkeeping"]
    if b["max"]:
        lines.append(
            f"- Bookkeeping: {100 * b['min'][0]:.2f}% to {100 * b['max'][0]:.2f}% of a full step "
            f"(max: {b['max'][1]}; target < 3%)."
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.targets", description=__doc__.split("\n")[0])
    p.add_argument("results", type=Path, help="a results.json written by benchmarks.run")
    p.add_argument("--testbeds", default=None, help="comma-separated (default: all in the file)")
    p.add_argument("--lo", type=float, default=1.5)
    p.add_argument("--hi", type=float, default=5.0)
    p.add_argument("--json", action="store_true", help="print the numbers as JSON instead of markdown")
    args = p.parse_args(argv)
    res = json.loads(args.results.read_text())
    names = args.testbeds.split(",") if args.testbeds else list(res["testbeds"])
    for name in names:
        tb = res["testbeds"][name]
        if args.json:
            print(json.dumps({name: check_testbed(tb, args.lo, args.hi)}, indent=1, default=str))
        else:
            print(markdown(name, tb, args.lo, args.hi) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
