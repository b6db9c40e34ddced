"""Selection: score the checked candidates, keep the best, and build the
:class:`~xslim_xdit.calibration.result.CalibrationResult` of either strategy.

Example:
    >>> cands = [{"full_steps": [0, 3], "closed_loop_error": None, "run_errors": [0.1, 0.4]},
    ...          {"full_steps": [0, 2, 3], "closed_loop_error": None, "run_errors": [0.3, 0.3]}]
    >>> select_candidate(cands), [c["closed_loop_error"] for c in cands]
    (0, [0.2, 0.3])
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from ..config import Schedule
from ..planner import Extrapolate, skip_errors_of
from .plan import Gram, Segments, ThresholdPlan, segmented_skip_errors
from .result import CalibrationResult


def geometric_mean(values: Sequence[float]) -> float:
    """Of relative errors: the ranking mean PSNR over the runs would give (0 and inf pass through).

    Example:
        >>> geometric_mean([0.1, 0.4]), geometric_mean([0.1, float("inf")]), geometric_mean([0.0, 0.5])
        (0.2, inf, 0.5)
    """
    if any(v == float("inf") for v in values):
        return float("inf")
    if any(v <= 0.0 for v in values):
        return 0.0 if all(v <= 0.0 for v in values) else geometric_mean([v for v in values if v > 0.0])
    return math.exp(sum(math.log(v) for v in values) / len(values))


def select_candidate(candidates: list[dict[str, Any]]) -> int:
    """The index of the candidate whose replays came closest to the references: the least
    geometric mean of its ``run_errors``, which this writes into each one's
    ``closed_loop_error`` (the first on ties). The first candidate when they were not checked
    (any has no ``run_errors``; see the module example)."""
    if not candidates or any("run_errors" not in c for c in candidates):
        return 0
    for c in candidates:
        c["closed_loop_error"] = geometric_mean(c["run_errors"])
    return min(range(len(candidates)), key=lambda i: candidates[i]["closed_loop_error"])


def optimal_result(
    profile: list[dict[str, Any]],
    gram: Gram,
    candidates: list[dict[str, Any]],
    best: int,
    *,
    num_runs: int,
    token_ratio: float,
    block_thresh: float,
    extrapolate: Extrapolate,
    segments: Segments | None = None,
    experts: list[dict[str, Any]] | None = None,
) -> CalibrationResult:
    """The result of ``strategy="optimal"``: candidate ``best``'s full steps. Each step of
    ``profile`` (the first run's, whose Gram matrix is ``gram``) gets its ``planned_skip_error``
    (with ``segments``, a run served by several transformers, against its own transformer's full
    steps; ``experts`` names them in the result).

    Example:
        >>> line = [[float(i), 1.0] for i in range(4)]
        >>> gram = [[sum(x * y for x, y in zip(u, v)) for v in line] for u in line]
        >>> r = optimal_result([{} for _ in range(4)], gram, [{"full_steps": [0, 1, 3]}], 0, num_runs=1,
        ...                    token_ratio=0.5, block_thresh=2.0, extrapolate="linear")
        >>> r.schedule.full_steps, r.estimated_fraction, r.profile[2]
        ((0, 1, 3), 0.75, {'planned_skip_error': 0.0})
    """
    n = len(profile)
    full = tuple(candidates[best]["full_steps"])
    errors = (
        segmented_skip_errors(gram, full, segments, extrapolate)
        if segments is not None and len(segments) > 1
        else skip_errors_of(gram, full, extrapolate)
    )
    for p, err in zip(profile, errors, strict=True):
        p["planned_skip_error"] = err
    return CalibrationResult(
        schedule=Schedule(num_steps=n, full_steps=full),
        warn=None,
        crit=None,
        polish="none",
        token_ratio=token_ratio,
        block_thresh=block_thresh,
        indicator="gram",
        estimated_fraction=len(full) / n,
        profile=profile,
        strategy="optimal",
        extrapolate=extrapolate,
        candidates=candidates,
        num_runs=num_runs,
        experts=list(experts or []),
    )


def threshold_result(
    profile: list[dict[str, Any]],
    plan: ThresholdPlan,
    *,
    num_runs: int,
    polish: str,
    token_ratio: float,
    block_thresh: float,
    indicator: str,
    extrapolate: Extrapolate,
    experts: list[dict[str, Any]] | None = None,
) -> CalibrationResult:
    """The result of ``strategy="threshold"``: the searched schedule and thresholds (``experts``:
    the transformers that served the run, when several did).

    Example:
        >>> from xslim_xdit.calibration.plan import ThresholdPlan
        >>> plan = ThresholdPlan(Schedule(num_steps=2, full_steps=(0, 1)), 0.1, 0.2, 1.0)
        >>> r = threshold_result([], plan, num_runs=1, polish="token", token_ratio=0.5, block_thresh=2.0,
        ...                      indicator="residual_change", extrapolate="linear")
        >>> r.online_config().crit
        0.2
    """
    return CalibrationResult(
        schedule=plan.schedule,
        warn=plan.warn,
        crit=plan.crit,
        polish=polish,
        token_ratio=token_ratio,
        block_thresh=block_thresh,
        indicator=indicator,
        estimated_fraction=plan.estimated_fraction,
        profile=profile,
        strategy="threshold",
        extrapolate=extrapolate,
        num_runs=num_runs,
        experts=list(experts or []),
    )
