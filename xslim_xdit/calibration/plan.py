"""Planning: schedules from recorded profiles (pure: numbers in, plans out, no model).

- ``strategy="optimal"``: :func:`candidate_plans` makes the full-step plans the closed-loop
  check chooses among (several warm-ups and caps on the gap between full steps, each an exact
  search of :func:`~xslim_xdit.planner.optimal_full_steps` on the profiles' Gram matrices).
- ``strategy="threshold"``: :func:`threshold_search` replays the recorded indicator through the
  online controller (:func:`simulate`) at thresholds searched to hit the target compute fraction
  (:func:`estimated_cost`).

A run served by several transformers (Wan 2.2 A14B's two experts, ``segments``) is planned by
:mod:`~xslim_xdit.calibration.plan_experts` (its names are importable from here too).

Example:
    >>> line = [[float(i), 1.0] for i in range(12)]  # a residual moving in a straight line
    >>> gram = [[sum(x * y for x, y in zip(u, v)) for v in line] for u in line]
    >>> candidate_plans([gram], 3.0, warmup_steps=1, closed_loop=False)
    [(0, 1, 2, 11)]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..config import ConfigError, Schedule, XSlimConfig
from ..controller import OnlineController, StepKind
from ..planner import Extrapolate, optimal_full_steps
from .plan_experts import (
    Segments,
    check_segments,
    forced_full_steps,
    segmented_full_steps,
    segmented_skip_errors,
)

Gram = list[list[float]]


def profile_gram(profile: Sequence[dict[str, Any]]) -> list[list[float]]:
    """The ``N x N`` Gram matrix of the stack residuals, from the profile's ``gram_row`` entries
    (row ``i`` holds the inner products of step ``i`` with steps ``0 .. i``).

    Example:
        >>> profile_gram([{"gram_row": [1.0]}, {"gram_row": [0.5, 2.0]}])
        [[1.0, 0.5], [0.5, 2.0]]
    """
    n = len(profile)
    rows = [p.get("gram_row") for p in profile]
    if any(r is None or len(r) != i + 1 for i, r in enumerate(rows)):
        raise ConfigError("profile: every step needs a gram_row of its step index + 1 entries")
    g = [[0.0] * n for _ in range(n)]
    for i, r in enumerate(rows):
        for j, v in enumerate(r):  # type: ignore[arg-type]
            g[i][j] = g[j][i] = float(v)
    return g


def check_reachable(
    num_steps: int, target_speedup: float, warmup_steps: int, segments: Segments | None = None
) -> None:
    """``strategy="optimal"`` keeps the warm-up and the last step full (and, with ``segments``,
    every segment's first step, see
    :func:`~xslim_xdit.calibration.plan_experts.forced_full_steps`): that bounds the speedup.

    Example:
        >>> check_reachable(10, 5.0, 1)
        >>> check_reachable(10, 5.0, 2)
        Traceback (most recent call last):
        ...
        xslim_xdit.schedule.ConfigError: target_speedup=5.0 is out of reach for 10 steps: with warmup_steps=2 and the last step full, at most 3.33
    """
    multi = segments is not None and len(segments) > 1
    fixed = (
        len(forced_full_steps(num_steps, warmup_steps, segments))
        if multi
        else min(num_steps, warmup_steps + 1)
    )
    if num_steps / fixed + 1e-9 < target_speedup:
        starts = ", each transformer's first step" if multi else ""
        raise ConfigError(
            f"target_speedup={target_speedup!r} is out of reach for {num_steps} steps: with warmup_steps="
            f"{warmup_steps}{starts} and the last step full, at most {num_steps / fixed:.3g}"
        )


def candidate_plans(
    grams: Sequence[Gram],
    target_speedup: float,
    *,
    warmup_steps: int,
    max_gap: int | None = None,
    extrapolate: Extrapolate = "linear",
    closed_loop: bool = True,
    segments: Segments | None = None,
) -> list[tuple[int, ...]]:
    """The distinct full-step plans ``strategy="optimal"`` considers, best guess first.

    ``grams``: one Gram matrix per profiled run (:func:`profile_gram`), all ``N x N``. The plans
    have ``max(warm-up + 1, int(N / target_speedup))`` full steps. With ``closed_loop`` (the
    candidates are then checked by replaying them), warm-ups of ``warmup_steps`` to
    ``warmup_steps + 2`` are tried, each with no cap on the gap between full steps and with caps
    of the mean gap + 1 and + 3 (only ``max_gap`` when it is given); without, one plan.

    ``segments`` (a run served by several transformers, see
    :func:`~xslim_xdit.calibration.plan_experts.segmented_full_steps`): every
    segment's first step is full too, and each segment's skipped steps are scored against its own
    full steps only.

    Example:
        >>> curve = [[float(i) ** 2, 1.0] for i in range(8)]  # a residual that speeds up
        >>> gram = [[sum(x * y for x, y in zip(u, v)) for v in curve] for u in curve]
        >>> candidate_plans([gram], 2.0, warmup_steps=1)  # 9 (warm-up, cap) pairs, 2 distinct plans
        [(0, 1, 3, 7), (0, 1, 2, 7)]
        >>> candidate_plans([gram], 2.0, warmup_steps=1, closed_loop=False)
        [(0, 1, 3, 7)]
    """
    n = len(grams[0])
    w = min(warmup_steps, n)
    multi = segments is not None and len(segments) > 1
    fixed = len(forced_full_steps(n, w, segments)) if multi else min(n, w + 1)
    num_full = max(fixed, int(n * (1.0 / target_speedup) + 1e-9))
    plans: list[tuple[int, ...]] = []
    for warm in range(w, w + 3 if closed_loop else w + 1):
        need = len(forced_full_steps(n, warm, segments)) if multi else warm + 1
        if warm > w and need > num_full:  # the warm-up and the last step must fit
            break
        if max_gap is not None or not closed_loop:
            caps: list[int | None] = [max_gap]
        else:
            mean_gap = -(-(n - warm) // max(num_full - warm, 1))
            caps = [None, mean_gap + 1, mean_gap + 3]
        for cap in caps:
            if multi:
                plan = segmented_full_steps(
                    grams,
                    num_full,
                    segments,  # type: ignore[arg-type]
                    warmup_steps=warm,
                    max_gap=cap,
                    extrapolate=extrapolate,
                )
            else:
                plan = optimal_full_steps(
                    grams, num_full, warmup_steps=warm, max_gap=cap, extrapolate=extrapolate
                )
            if plan not in plans:
                plans.append(plan)
    return plans


def simulate(
    values: Sequence[float | None],
    warn: float,
    crit: float,
    *,
    warmup_steps: int,
    polish: str,
    partial_reset: float = 1.0,
) -> list[StepKind]:
    """Replay an indicator sequence through the online controller (pure).

    Example:
        >>> values = [None, 0.3, 0.04, 0.04, 0.04, 0.3, 0.04, 0.04]
        >>> [k.name for k in simulate(values, 0.05, 0.1, warmup_steps=1, polish="token")]
        ['FULL', 'FULL', 'SKIP', 'TOKEN', 'SKIP', 'FULL', 'SKIP', 'FULL']
    """
    cfg = XSlimConfig(
        warn=warn, crit=crit, warmup_steps=warmup_steps, polish=polish, partial_reset=partial_reset
    )
    ctl = OnlineController(cfg, len(values))
    return [ctl.decide(i, v).kind for i, v in enumerate(values)]


def estimated_cost(kinds: Sequence[StepKind], token_ratio: float, block_fraction: float) -> float:
    """Fraction of full-step compute a decision sequence needs (block/token steps by their share).

    Example:
        >>> estimated_cost([StepKind.FULL, StepKind.SKIP, StepKind.TOKEN, StepKind.BLOCK], 0.5, 0.25)
        0.4375
    """
    cost = {
        StepKind.FULL: 1.0,
        StepKind.SKIP: 0.0,
        StepKind.TOKEN: token_ratio,
        StepKind.BLOCK: block_fraction,
    }
    return sum(cost[k] for k in kinds) / max(len(kinds), 1)


def mean_indicator(profiles: Sequence[Sequence[dict[str, Any]]], indicator: str) -> list[float | None]:
    """Per step, the mean of ``indicator`` over the profiles (``None`` where no run has a value).

    Example:
        >>> mean_indicator([[{"x": None}, {"x": 1.0}], [{"x": None}, {"x": 3.0}]], "x")
        [None, 2.0]
    """
    return [_mean([p[i][indicator] for p in profiles]) for i in range(len(profiles[0]))]


@dataclass
class ThresholdPlan:
    """What :func:`threshold_search` found: the schedule and the thresholds that make it."""

    schedule: Schedule
    warn: float
    crit: float
    estimated_fraction: float


def threshold_search(
    values: Sequence[float | None],
    target_speedup: float,
    *,
    warn_fraction: float,
    warmup_steps: int,
    polish: str,
    token_ratio: float,
    block_thresh: float,
) -> ThresholdPlan:
    """The smallest ``crit`` (``warn = warn_fraction * crit``) at which the online controller,
    replayed on the indicator ``values``, needs at most ``1 / target_speedup`` of the compute
    (a 60-step bisection in log space; the largest ``crit`` tried when none does).

    Example:
        >>> values = [None, 0.4, 0.1, 0.05, 0.05, 0.05, 0.1, 0.4]
        >>> p = threshold_search(values, 2.0, warn_fraction=0.5, warmup_steps=1, polish="none",
        ...                      token_ratio=0.5, block_thresh=2.0)
        >>> p.schedule.full_steps, p.estimated_fraction
        ((0, 1, 4, 7), 0.5)
    """
    n = len(values)
    target = 1.0 / target_speedup
    block_fraction = min(1.0, 1.0 / block_thresh)

    def kinds_for(crit: float) -> list[StepKind]:
        return simulate(values, warn_fraction * crit, crit, warmup_steps=min(warmup_steps, n), polish=polish)

    finite = [v for v in values if v is not None]
    lo, hi = 1e-9, max(1e-6, sum(finite) * 2.0)
    best = kinds_for(hi)
    best_crit = hi
    # cost falls as crit grows; find the smallest crit whose cost reaches the target
    for _ in range(60):
        mid = (lo * hi) ** 0.5
        kinds = kinds_for(mid)
        if estimated_cost(kinds, token_ratio, block_fraction) <= target:
            best, best_crit, hi = kinds, mid, mid
        else:
            lo = mid
    sched = Schedule(
        num_steps=n,
        full_steps=tuple(i for i, k in enumerate(best) if k == StepKind.FULL),
        block_steps=tuple(i for i, k in enumerate(best) if k == StepKind.BLOCK),
        token_steps=tuple(i for i, k in enumerate(best) if k == StepKind.TOKEN),
    )
    return ThresholdPlan(
        schedule=sched,
        warn=warn_fraction * best_crit,
        crit=best_crit,
        estimated_fraction=estimated_cost(best, token_ratio, block_fraction),
    )


def _mean(values: Sequence[float | None]) -> float | None:
    finite = [v for v in values if v is not None]
    return sum(finite) / len(finite) if finite else None


__all__ = [
    "Segments",
    "ThresholdPlan",
    "candidate_plans",
    "check_reachable",
    "check_segments",
    "forced_full_steps",
    "segmented_full_steps",
    "segmented_skip_errors",
    "estimated_cost",
    "mean_indicator",
    "profile_gram",
    "simulate",
    "threshold_search",
]
