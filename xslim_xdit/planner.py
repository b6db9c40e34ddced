"""Optimal full-step placement from a profiled run (pure: numbers in, step indices out).

A skipped step applies an *estimate* of the stack residual: the residual of the last full step
``b``, moved along the slope between the last two full steps ``a < b`` (``extrapolate="linear"``)
or unchanged (``extrapolate="none"``). On a profiled full run the true residual ``R_s`` of every
step is known, so the error each skipped step would make is known too, and it depends only on
inner products of residuals: with ``t = s - b`` and ``h = b - a``,

    || R_b + (t/h)(R_b - R_a) - R_s ||^2
        = |R_b - R_s|^2 + 2 (t/h) <R_b - R_s, R_b - R_a> + (t/h)^2 |R_b - R_a|^2,

all read off the Gram matrix ``G[i][j] = <R_i, R_j>`` of the profiled residuals. That is why the
profile needs only ``G`` (an ``N x N`` matrix, and a sum over tokens, so sequence-parallel shards
add their partial Grams exactly), not the residuals themselves.

:func:`optimal_full_steps` then picks the ``K`` full steps that minimise the summed relative
error of all skipped steps, by dynamic programming over (previous full, current full, fulls
used). Given several profiled runs (one Gram matrix each, e.g. one per calibration prompt), it
minimises the relative errors summed over all of them, so that no single run's quirks decide the
plan. The error is measured along the full run's trajectory (open loop); ``calibrate`` checks the
best plans closed loop (see ``docs/method.md``).

Example:
    >>> def gram(R):
    ...     return [[sum(x * y for x, y in zip(u, v)) for v in R] for u in R]
    >>> line = [[float(i), 1.0] for i in range(10)]  # a residual that moves in a straight line
    >>> optimal_full_steps(gram(line), num_full=3)  # two full steps give the exact slope
    (0, 1, 9)
    >>> max(e for e in skip_errors_of(gram(line), (0, 1, 9)) if e is not None)
    0.0
    >>> bent = line[:6] + [[5.0 + 3.0 * i, 1.0] for i in range(1, 5)]  # slope 1, then 3 from step 6
    >>> optimal_full_steps(gram(bent), num_full=4)  # one full step after the bend
    (0, 1, 7, 9)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

Extrapolate = Literal["linear", "none"]
Gram = Sequence[Sequence[float]]


def _as_grams(gram: Gram | Sequence[Gram]) -> list[Gram]:
    """One Gram matrix, or a sequence of them (one per profiled run), as a list of matrices."""
    first = gram[0][0] if len(gram) and len(gram[0]) else 0.0
    nested = getattr(first, "ndim", 0) >= 1 or isinstance(first, Sequence)  # arrays or lists
    if nested:
        grams = list(gram)  # type: ignore[arg-type]
    else:
        grams = [gram]
    n = len(grams[0]) if grams else 0
    for g in grams:
        if len(g) != n or any(len(row) != n for row in g):
            raise ValueError(f"gram must be square N x N matrices of one size, N >= 1; got {len(g)} rows")
    if n < 1:
        raise ValueError("gram must be a square N x N matrix with N >= 1; got 0 rows")
    return grams  # type: ignore[return-value]


def skip_error(
    gram: Sequence[Sequence[float]], a: int, b: int, s: int, extrapolate: Extrapolate = "linear"
) -> float:
    """Relative squared error of step ``s`` skipped after full steps ``a < b < s`` (``a = -1``:
    no earlier full step, so no slope), ``|estimate - R_s|^2 / |R_s|^2``."""
    g = gram
    d2 = g[b][b] - 2.0 * g[b][s] + g[s][s]
    if extrapolate == "linear" and a >= 0:
        r = (s - b) / (b - a)
        cross = g[b][b] - g[b][a] - g[s][b] + g[s][a]
        slope2 = g[b][b] - 2.0 * g[a][b] + g[a][a]
        d2 += 2.0 * r * cross + r * r * slope2
    d2 = max(d2, 0.0)  # round-off can take an exact zero slightly below
    return d2 / g[s][s] if g[s][s] > 0 else d2


def default_max_gap(num_steps: int, num_full: int, warmup_steps: int = 1) -> int:
    """The longest distance between two full steps the search considers: three times the mean
    gap (at least 8), which never binds on the profiles seen so far and keeps the search
    ``O(N * gap^2 * K)``."""
    free = max(num_full - warmup_steps, 1)
    mean_gap = math.ceil((num_steps - warmup_steps) / free)
    return max(1, min(num_steps - 1, max(8, 3 * mean_gap)))


def optimal_full_steps(
    gram: Gram | Sequence[Gram],
    num_full: int,
    *,
    warmup_steps: int = 1,
    max_gap: int | None = None,
    extrapolate: Extrapolate = "linear",
    step_weights: Sequence[float] | None = None,
) -> tuple[int, ...]:
    """The ``num_full`` full steps that minimise the summed skip error (see the module docstring).

    Steps ``0 .. warmup_steps-1`` and the last step are always full (so ``num_full`` must be at
    least ``warmup_steps + 1`` when the run is longer than the warm-up); every other step is
    skipped.

    Args:
        gram: ``N x N`` Gram matrix of the profiled stack residuals, or a sequence of them (one
            per profiled run; their relative errors add).
        num_full: how many steps run in full, ``1 <= num_full <= N``.
        warmup_steps: steps forced full at the start (>= 1).
        max_gap: the longest distance between consecutive full steps (default
            :func:`default_max_gap`).
        extrapolate: how skipped steps estimate the residual, as in
            :class:`~xslim_xdit.config.XSlimConfig`.
        step_weights: a weight per step multiplying its skip error (default: all 1), for
            runs whose output is more sensitive to some steps than to others.

    Returns:
        The full steps, ascending.
    """
    grams = _as_grams(gram)
    n = len(grams[0])
    if extrapolate not in ("linear", "none"):
        raise ValueError(f"extrapolate must be 'linear' or 'none'; got {extrapolate!r}")
    if not isinstance(warmup_steps, int) or warmup_steps < 1:
        raise ValueError(f"warmup_steps must be an integer >= 1; got {warmup_steps!r}")
    if step_weights is not None and (
        len(step_weights) != n or not all(math.isfinite(x) and x >= 0 for x in step_weights)
    ):
        raise ValueError(f"step_weights must be {n} finite numbers >= 0 (one per step)")
    w = min(warmup_steps, n)
    lowest = w if w == n else w + 1
    if not isinstance(num_full, int) or not lowest <= num_full <= n:
        raise ValueError(
            f"num_full must be an integer in [{lowest}, {n}] (warm-up {w} steps plus the last); got {num_full!r}"
        )
    if num_full == n or w == n:
        return tuple(range(n))
    return _dp(grams, num_full, w, n, max_gap, extrapolate, step_weights)


def _dp(
    grams: list[Gram],
    num_full: int,
    w: int,
    n: int,
    max_gap: int | None,
    extrapolate: Extrapolate,
    step_weights: Sequence[float] | None = None,
) -> tuple[int, ...]:
    gap = default_max_gap(n, num_full, w) if max_gap is None else int(max_gap)
    if gap < 1:
        raise ValueError(f"max_gap must be >= 1; got {max_gap!r}")
    # the remaining n-w steps must be reachable in num_full-w jumps of at most `gap`
    gap = max(gap, math.ceil((n - w) / (num_full - w)))
    last = n - 1

    seg_cache: dict[tuple[int, int], list[float]] = {}

    def segment(a: int, b: int) -> list[float]:
        """cum[c - b - 1] = summed error of steps b+1 .. c-1 (next full at c)."""
        key = (a, b)
        if key not in seg_cache:
            cum, acc = [0.0], 0.0
            for s in range(b + 1, min(last, b + gap)):
                err = sum(skip_error(g, a, b, s, extrapolate) for g in grams)
                acc += err if step_weights is None else step_weights[s] * err
                cum.append(acc)
            seg_cache[key] = cum
        return seg_cache[key]

    # states after placing k fulls: (prev_full, cur_full) -> (cost, back-pointer state)
    start = (w - 2 if w >= 2 else -1, w - 1)
    layer: dict[tuple[int, int], tuple[float, tuple[int, int] | None]] = {start: (0.0, None)}
    history = [layer]
    for k in range(w, num_full):
        remaining = num_full - k - 1  # fulls still to place after this one
        nxt: dict[tuple[int, int], tuple[float, tuple[int, int] | None]] = {}
        for (a, b), (cost, _) in layer.items():
            cum = segment(a, b)
            for c in range(b + 1, min(last, b + gap) + 1):
                # keep it possible to finish: exactly `remaining` fulls after c, the last at n-1
                if c == last and remaining:
                    continue
                if c < last and (remaining == 0 or last - c > remaining * gap or last - c < remaining):
                    continue
                total = cost + cum[c - b - 1]
                if total < nxt.get((b, c), (math.inf, None))[0]:
                    nxt[(b, c)] = (total, (a, b))
        layer = nxt
        history.append(layer)
    ends = [(v[0], s) for s, v in layer.items() if s[1] == last]
    if not ends:  # cannot happen with the gap widened above; guard for hand-set max_gap
        raise ValueError(f"no schedule with {num_full} full steps and max_gap={gap} covers {n} steps")
    _, state = min(ends)
    steps: list[int] = []
    for lay in reversed(history[1:]):
        steps.append(state[1])
        prev = lay[state][1]
        assert prev is not None
        state = prev
    return tuple(range(w)) + tuple(reversed(steps))


def skip_errors_of(
    gram: Sequence[Sequence[float]], full_steps: Sequence[int], extrapolate: Extrapolate = "linear"
) -> list[float | None]:
    """The relative skip error of every step of a schedule (``None`` for full steps): what
    :func:`optimal_full_steps` minimises the sum of, for inspecting any schedule."""
    fulls = sorted(set(full_steps))
    out: list[float | None] = [None] * len(gram)
    a, b = -1, -1
    nxt = 0
    for s in range(len(gram)):
        if nxt < len(fulls) and fulls[nxt] == s:
            a, b = b, s
            nxt += 1
            continue
        if b < 0:
            raise ValueError("full_steps must contain step 0")
        out[s] = skip_error(gram, a, b, s, extrapolate)
    return out
