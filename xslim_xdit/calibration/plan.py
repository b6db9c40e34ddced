"""Planning: schedules from recorded profiles (pure: numbers in, plans out, no model).

- ``strategy="optimal"``: :func:`candidate_plans` makes the full-step plans the closed-loop
  check chooses among (several warm-ups and caps on the gap between full steps, each an exact
  search of :func:`~xslim_xdit.planner.optimal_full_steps` on the profiles' Gram matrices).
- ``strategy="threshold"``: :func:`threshold_search` replays the recorded indicator through the
  online controller (:func:`simulate`) at thresholds searched to hit the target compute fraction
  (:func:`estimated_cost`).

Example:
    >>> line = [[float(i), 1.0] for i in range(12)]  # a residual moving in a straight line
    >>> gram = [[sum(x * y for x, y in zip(u, v)) for v in line] for u in line]
    >>> candidate_plans([gram], 3.0, warmup_steps=1, closed_loop=False)
    [(0, 1, 2, 11)]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..config import ConfigError, Schedule, XSlimConfig
from ..controller import OnlineController, StepKind
from ..planner import Extrapolate, default_max_gap, optimal_full_steps, skip_error

Gram = list[list[float]]
#: a run served by several transformers (Wan 2.2 A14B's two experts): each one's ``[start, end)``
#: steps, in run order, covering the run
Segments = Sequence[tuple[int, int]]


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
    every segment's first step, see :func:`forced_full_steps`): that bounds the speedup.

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

    ``segments`` (a run served by several transformers, see :func:`segmented_full_steps`): every
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


def check_segments(num_steps: int, segments: Segments) -> list[tuple[int, int]]:
    """``segments`` as a list, checked: non-empty ``[start, end)`` ranges, in order, one after
    the other, covering ``0 .. num_steps - 1``.

    Example:
        >>> check_segments(8, [(0, 4), (4, 8)])
        [(0, 4), (4, 8)]
        >>> check_segments(8, [(0, 4), (5, 8)])
        Traceback (most recent call last):
        ...
        xslim_xdit.schedule.ConfigError: segments must be non-empty [start, end) step ranges, one after the other, covering steps 0 .. 7; got [(0, 4), (5, 8)]
    """
    segs = [(int(a), int(b)) for a, b in segments]
    ok = bool(segs) and segs[0][0] == 0 and segs[-1][1] == num_steps
    ok = (
        ok and all(a < b for a, b in segs) and all(segs[i][1] == segs[i + 1][0] for i in range(len(segs) - 1))
    )
    if not ok:
        raise ConfigError(
            "segments must be non-empty [start, end) step ranges, one after the other, covering steps "
            f"0 .. {num_steps - 1}; got {list(segments)!r}"
        )
    return segs


def forced_full_steps(num_steps: int, warmup_steps: int, segments: Segments | None = None) -> list[int]:
    """The steps a plan keeps full: the warm-up, the last step, and (a run served by several
    transformers) every segment's first step, where that transformer has nothing cached yet.

    Example:
        >>> forced_full_steps(8, 1, [(0, 4), (4, 8)])
        [0, 4, 7]
    """
    starts = [a for a, _ in check_segments(num_steps, segments)] if segments else []
    return sorted({*range(min(warmup_steps, num_steps)), *starts, num_steps - 1})


def segmented_skip_errors(
    gram: Gram, full_steps: Sequence[int], segments: Segments, extrapolate: Extrapolate = "linear"
) -> list[float | None]:
    """As :func:`~xslim_xdit.planner.skip_errors_of`, for a run served by several transformers:
    a skipped step is scored against its own segment's last full steps (the slope only when two
    of them are in the segment), as each transformer's engine estimates from its own caches.

    Example:
        >>> line = [[float(i), 1.0] for i in range(6)]
        >>> gram = [[sum(x * y for x, y in zip(u, v)) for v in line] for u in line]
        >>> [round(e, 4) if e is not None else None
        ...  for e in segmented_skip_errors(gram, (0, 1, 3, 5), [(0, 3), (3, 6)])]
        [None, None, 0.0, None, 0.0588, None]
    """
    n = len(gram)
    starts = {a for a, _ in check_segments(n, segments)}
    fulls = set(full_steps)
    if not starts <= fulls:
        raise ConfigError(
            f"full_steps must contain every segment's first step {sorted(starts)}; got {sorted(fulls)}"
        )
    out: list[float | None] = [None] * n
    a, b = -1, -1
    for s in range(n):
        if s in fulls:
            a, b = (-1 if s in starts else b), s
            continue
        out[s] = skip_error(gram, a, b, s, extrapolate)
    return out


def segmented_full_steps(
    grams: Sequence[Gram],
    num_full: int,
    segments: Segments,
    *,
    warmup_steps: int = 1,
    max_gap: int | None = None,
    extrapolate: Extrapolate = "linear",
) -> tuple[int, ...]:
    """:func:`~xslim_xdit.planner.optimal_full_steps` for a run served by several transformers
    (Wan 2.2 A14B: ``transformer`` for the high-noise steps, ``transformer_2`` from the switch
    step on). Each segment's first step is full (:func:`forced_full_steps`: its engine has nothing
    cached there), and a skipped step's error is that of its own segment's estimate
    (:func:`segmented_skip_errors`): the other transformer's residuals never stand in. The
    ``num_full`` full steps minimise the summed relative skip error over ``grams`` (one per
    profiled run), by dynamic programming over (previous full, current full, fulls used).

    Example:
        >>> line = [[float(i), 1.0] for i in range(10)]
        >>> gram = [[sum(x * y for x, y in zip(u, v)) for v in line] for u in line]
        >>> segmented_full_steps([gram], 5, [(0, 4), (4, 10)])  # two full steps per expert's line
        (0, 1, 4, 5, 9)
    """
    grams = [list(map(list, g)) for g in grams]
    n = len(grams[0])
    segs = check_segments(n, segments)
    forced = forced_full_steps(n, warmup_steps, segs)
    if not len(forced) <= num_full <= n:
        raise ConfigError(
            f"num_full must be in [{len(forced)}, {n}] (the forced full steps {forced}); got {num_full!r}"
        )
    if num_full == n:
        return tuple(range(n))
    starts = {a for a, _ in segs}
    forced_set = set(forced)
    # the next forced step after each step (a plan cannot jump over one)
    next_forced = [n - 1] * n
    for s in range(n - 2, -1, -1):
        next_forced[s] = s + 1 if s + 1 in forced_set else next_forced[s + 1]
    forced_after = [sum(1 for f in forced if f > s) for s in range(n)]
    w = min(warmup_steps, n)
    gap = default_max_gap(n, num_full, w) if max_gap is None else int(max_gap)
    gap = max(gap, -(-(n - w) // max(num_full - w, 1)))
    last = n - 1
    cost_cache: dict[tuple[int, int], list[float]] = {}

    def cum_cost(a: int, b: int) -> list[float]:
        """cum[j] = summed error of steps b+1 .. b+j skipped after fulls (a, b)."""
        if (a, b) not in cost_cache:
            cum, acc = [0.0], 0.0
            for s in range(b + 1, next_forced[b]):
                acc += sum(skip_error(g, a, b, s, extrapolate) for g in grams)
                cum.append(acc)
            cost_cache[(a, b)] = cum
        return cost_cache[(a, b)]

    State = tuple[int, int]
    layer: dict[State, tuple[float, State | None]] = {(-1, 0): (0.0, None)}
    history = [layer]
    for k in range(1, num_full):
        remaining = num_full - k - 1  # fulls still to place after this one
        nxt: dict[State, tuple[float, State | None]] = {}
        for (a, b), (cost, _) in layer.items():
            cum = cum_cost(a, b)
            for c in range(b + 1, min(next_forced[b], b + gap) + 1):
                if (c == last) != (remaining == 0) or not forced_after[c] <= remaining <= last - c:
                    continue
                total = cost + cum[c - b - 1]
                state = (-1 if c in starts else b, c)
                if total < nxt.get(state, (math.inf, None))[0]:
                    nxt[state] = (total, (a, b))
        layer = nxt
        history.append(layer)
    ends = [(v[0], s) for s, v in layer.items() if s[1] == last]
    if not ends:
        raise ConfigError(f"no schedule with {num_full} full steps and max_gap={gap} covers {n} steps")
    _, state = min(ends)
    steps: list[int] = []
    for lay in reversed(history[1:]):
        steps.append(state[1])
        prev = lay[state][1]
        assert prev is not None
        state = prev
    return (0, *reversed(steps))


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
