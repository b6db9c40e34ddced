"""The two-expert planner: full-step plans for a run served by several transformers (pure).

Wan 2.2 A14B runs ``transformer`` for the high-noise steps and ``transformer_2`` from the switch
step on; each has its own engine and caches. A run is cut into ``segments`` (each transformer's
``[start, end)`` steps): every segment's first step is full (that engine has nothing cached
there), and a skipped step is estimated from its own segment's full steps only.
:func:`~xslim_xdit.calibration.plan.candidate_plans` calls :func:`segmented_full_steps` when it is
given more than one segment.

Example:
    >>> forced_full_steps(8, 1, [(0, 4), (4, 8)])  # warm-up, the switch step, the last step
    [0, 4, 7]
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from ..config import ConfigError
from ..planner import Extrapolate, Gram, default_max_gap, skip_error

#: a run served by several transformers (Wan 2.2 A14B's two experts): each one's ``[start, end)``
#: steps, in run order, covering the run
Segments = Sequence[tuple[int, int]]


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


__all__ = [
    "Segments",
    "check_segments",
    "forced_full_steps",
    "segmented_full_steps",
    "segmented_skip_errors",
]
