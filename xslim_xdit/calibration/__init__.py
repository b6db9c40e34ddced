"""Offline calibration: profile full runs, then emit a schedule.

X-Slim's released code runs no online controller: it records how much the stack residual
changes from step to step in one full run of one prompt (the change is U-shaped over the run and
depends little on the prompt), and builds a static schedule from it. :func:`calibrate` profiles
one full run, or several (one per calibration prompt or seed), and builds the schedule in one of
two ways:

- ``strategy="optimal"`` (default): the full steps that minimise the error the skipped steps
  would make with the engine's own residual estimate (:mod:`xslim_xdit.planner`, an exact
  search on the profile's Gram matrix). Full and skipped steps only.
- ``strategy="threshold"``: the recorded indicator replayed through
  :class:`~xslim_xdit.controller.OnlineController` at thresholds searched to hit the target
  compute fraction (X-Slim's published procedure; the only one with polish steps).

The result saves to a JSON file a person can edit.

Example:
    >>> from xslim_xdit.testing import tiny_model, sample
    >>> m = tiny_model("dit")
    >>> result = calibrate(m, lambda: sample(m, "dit", steps=10), num_inference_steps=10,
    ...                    target_speedup=2.0)
    >>> result.schedule.num_steps
    10
    >>> cfg = result.config()  # a schedule-mode XSlimConfig

The pieces, each usable alone:

- :mod:`~xslim_xdit.calibration.profile`: :func:`profile_runs` runs the calibration callables
  in full with the engine recording (the only module that touches the engine).
- :mod:`~xslim_xdit.calibration.plan`: candidate plans from the profiles (pure).
- :mod:`~xslim_xdit.calibration.check`: the closed-loop check of the candidates.
- :mod:`~xslim_xdit.calibration.select`: the least-error candidate, and the result.
- :mod:`~xslim_xdit.calibration.result`: :class:`CalibrationResult` (JSON, configs).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch

from ..config import ConfigError, Schedule, XSlimConfig
from ..planner import Extrapolate
from .check import check_candidates, relative_error
from .plan import (
    ThresholdPlan,
    candidate_plans,
    check_reachable,
    estimated_cost,
    mean_indicator,
    profile_gram,
    simulate,
    threshold_search,
)
from .profile import Enable, Profiles, _as_tensor, profile_runs, replay_schedule
from .result import CalibrationResult
from .select import geometric_mean, optimal_result, select_candidate, threshold_result

Indicator = Literal["residual_change", "probe_change"]
Strategy = Literal["optimal", "threshold"]

__all__ = [
    "CalibrationResult",
    "Indicator",
    "Profiles",
    "Strategy",
    "ThresholdPlan",
    "_as_tensor",
    "calibrate",
    "candidate_plans",
    "check_candidates",
    "check_reachable",
    "estimated_cost",
    "geometric_mean",
    "mean_indicator",
    "profile_gram",
    "profile_runs",
    "relative_error",
    "select_candidate",
    "simulate",
    "threshold_search",
]


def calibrate(
    pipe_or_transformer: Any,
    run: Callable[[], Any] | Sequence[Callable[[], Any]],
    *,
    num_inference_steps: int | None = None,
    target_speedup: float = 2.5,
    strategy: Strategy = "optimal",
    polish: Literal["token", "block", "auto", "none"] | None = None,
    token_ratio: float = 0.5,
    block_thresh: float = 2.0,
    warmup_steps: int | None = None,
    warn_fraction: float = 0.5,
    indicator: Indicator = "residual_change",
    extrapolate: Literal["linear", "none"] = "linear",
    max_gap: int | None = None,
    closed_loop_check: bool = True,
    enable: Enable | None = None,
) -> CalibrationResult:
    """Profile full runs and return a schedule that reaches ``target_speedup`` (in FLOPs).

    A pipeline whose run two transformers serve (Wan 2.2 A14B's ``transformer`` and
    ``transformer_2``) is calibrated over the whole run: both experts are profiled in one
    profile (each row names its ``"expert"``), every expert's first step is planned full (its
    engine has nothing cached there), a skipped step is scored against its own expert's full
    steps only (:func:`~xslim_xdit.calibration.plan.segmented_full_steps`), the replays run the
    whole pipeline, and the result records the experts' steps
    (:attr:`CalibrationResult.experts`): ``enable_xslim(pipe, result)`` applies it to both.

    Args:
        pipe_or_transformer: what X-Slim will be enabled on.
        run: a callable that performs one generation (e.g. ``lambda: pipe(prompt, generator=g)``),
            or a sequence of them (one per calibration prompt or seed; recommended above 3x, where
            a plan made on one sample depends on that sample). Each must be deterministic (seed
            its generator inside the callable): the closed-loop check compares its outputs.
        num_inference_steps: steps of that run, when ``pipe_or_transformer`` is a bare transformer.
        target_speedup: wanted ratio of full compute to cached compute (> 1).
        strategy: ``"optimal"`` (full steps placed to minimise the skip error, see
            :mod:`xslim_xdit.planner`) or ``"threshold"`` (the indicator replayed through the
            online controller, X-Slim's published procedure).
        polish, token_ratio, block_thresh: the polish level of the band between the thresholds
            (``strategy="threshold"``; default ``"token"``). ``"optimal"`` accepts only
            ``"none"``.
        warmup_steps: steps always computed at the start (default 1 for ``"optimal"``, which
            places the others itself, and 3 for ``"threshold"``).
        warn_fraction: ``warn = warn_fraction * crit``, in (0, 1) (``"threshold"``).
        indicator: ``"residual_change"`` (relative change of the stack residual, X-Slim's offline
            profile) or ``"probe_change"`` (relative change of block 0's modulated input)
            (``"threshold"``; averaged over the runs).
        extrapolate: the residual estimate the schedule will be replayed with (the returned
            :meth:`CalibrationResult.config` uses it); ``"optimal"`` plans for it.
        max_gap: the longest run of skipped steps plus one that ``"optimal"`` considers
            (default: a few caps are tried, see ``closed_loop_check``).
        closed_loop_check: ``"optimal"`` plans on the full runs' trajectories, which misjudges how
            errors of the first steps carry on; with this set it makes plans for warm-ups of
            ``warmup_steps`` to ``warmup_steps + 2`` steps, each with no cap on the gap between
            full steps and with caps of the mean gap + 1 and + 3, replays each distinct plan on
            every run (each replay costs about ``1 / target_speedup`` of a run) and keeps the one
            whose final outputs are closest to the full runs' (least geometric mean of the
            relative errors; the run's return value when it is a tensor, an array, an image
            list or has ``.images``, else the transformer's last output).
        enable: what attaches the engine for each profiling run and replay (default
            :func:`~xslim_xdit.api.enable_xslim`, one device). Under xDiT pass
            :func:`~xslim_xdit.integrations.xfuser.enable_xslim_xdit` and call ``calibrate`` on
            every rank (or use :func:`~xslim_xdit.integrations.xfuser.calibrate_xdit`): the
            profiles are reduced exactly over the ranks, the closed-loop errors are those of the
            rank holding the output, and every rank returns the same result (see
            ``docs/parallel.md``). An xfuser model on several ranks without it is refused.
    """
    runs, polish, warmup_steps = _validate(
        run,
        num_inference_steps=num_inference_steps,
        target_speedup=target_speedup,
        strategy=strategy,
        polish=polish,
        token_ratio=token_ratio,
        block_thresh=block_thresh,
        warmup_steps=warmup_steps,
        warn_fraction=warn_fraction,
        indicator=indicator,
        extrapolate=extrapolate,
        max_gap=max_gap,
    )
    profiles = profile_runs(pipe_or_transformer, runs, num_inference_steps, enable)
    n, profile = profiles.num_steps, profiles.profiles[0]
    segments = profiles.segments  # two experts: each one's steps (None for one transformer)
    experts = [{"name": name, "steps": [a, b]} for name, a, b in profiles.experts] if segments else []
    if strategy == "optimal":
        check_reachable(n, target_speedup, warmup_steps, segments)
        grams = [profile_gram(p) for p in profiles.profiles]
        plans = candidate_plans(
            grams,
            target_speedup,
            warmup_steps=warmup_steps,
            max_gap=max_gap,
            extrapolate=extrapolate,
            closed_loop=closed_loop_check,
            segments=segments,
        )

        def replay(full_steps: tuple[int, ...], i: int) -> torch.Tensor | None:
            cfg = XSlimConfig(
                mode="schedule",
                schedule=Schedule(num_steps=n, full_steps=full_steps),
                extrapolate=extrapolate,
            )
            return replay_schedule(pipe_or_transformer, cfg, runs[i], num_inference_steps, enable)

        sync = profiles.sync
        share = (
            (lambda values: sync.from_output_rank(values, profiles.holds_output))
            if sync.is_distributed
            else None
        )
        candidates = check_candidates(plans, profiles.references, replay, share)
        best = select_candidate(candidates)
        return optimal_result(
            profile,
            grams[0],
            candidates,
            best,
            num_runs=len(runs),
            token_ratio=token_ratio,
            block_thresh=block_thresh,
            extrapolate=extrapolate,
            segments=segments,
            experts=experts,
        )
    values = mean_indicator(profiles.profiles, indicator)
    for a, _ in segments or ():
        values[a] = None  # a transformer's first step: nothing of its own to compare with, full
    plan = threshold_search(
        values,
        target_speedup,
        warn_fraction=warn_fraction,
        warmup_steps=warmup_steps,
        polish=polish,
        token_ratio=token_ratio,
        block_thresh=block_thresh,
    )
    return threshold_result(
        profile,
        plan,
        num_runs=len(runs),
        polish=polish,
        token_ratio=token_ratio,
        block_thresh=block_thresh,
        indicator=indicator,
        extrapolate=extrapolate,
        experts=experts,
    )


def _validate(
    run: Callable[[], Any] | Sequence[Callable[[], Any]],
    *,
    num_inference_steps: int | None,
    target_speedup: float,
    strategy: str,
    polish: str | None,
    token_ratio: float,
    block_thresh: float,
    warmup_steps: int | None,
    warn_fraction: float,
    indicator: str,
    extrapolate: Extrapolate,
    max_gap: int | None,
) -> tuple[list[Callable[[], Any]], str, int]:
    """Check :func:`calibrate`'s arguments before anything runs (errors name the parameter and
    its range); returns the runs as a list, and ``polish`` and ``warmup_steps`` resolved."""
    runs = [run] if callable(run) else list(run) if isinstance(run, (list, tuple)) else []
    if not runs or not all(callable(r) for r in runs):
        raise ConfigError(f"run must be a callable or a non-empty sequence of callables; got {run!r}")
    if isinstance(target_speedup, bool) or not (
        isinstance(target_speedup, (int, float)) and target_speedup > 1.0
    ):
        raise ConfigError(f"target_speedup must be > 1; got {target_speedup!r}")
    if strategy not in ("optimal", "threshold"):
        raise ConfigError(f"strategy must be 'optimal' or 'threshold'; got {strategy!r}")
    if polish is None:
        polish = "none" if strategy == "optimal" else "token"
    if strategy == "optimal" and polish != "none":
        raise ConfigError(
            f"polish must be 'none' with strategy='optimal' (it places full steps only); got {polish!r}; "
            "use strategy='threshold' for block or token steps"
        )
    if warmup_steps is None:
        warmup_steps = 1 if strategy == "optimal" else 3
    if num_inference_steps is not None and (
        isinstance(num_inference_steps, bool)
        or not isinstance(num_inference_steps, int)
        or num_inference_steps < 1
    ):
        raise ConfigError(f"num_inference_steps must be None or an integer >= 1; got {num_inference_steps!r}")
    if (
        isinstance(warn_fraction, bool)
        or not isinstance(warn_fraction, (int, float))
        or not 0.0 < warn_fraction < 1.0
    ):
        raise ConfigError(f"warn_fraction must be in (0, 1); got {warn_fraction!r}")
    if indicator not in ("residual_change", "probe_change"):
        raise ConfigError(f"indicator must be 'residual_change' or 'probe_change'; got {indicator!r}")
    if max_gap is not None and (not isinstance(max_gap, int) or max_gap < 1):
        raise ConfigError(f"max_gap must be an integer >= 1; got {max_gap!r}")
    XSlimConfig(
        polish=polish,
        token_ratio=token_ratio,
        block_thresh=block_thresh,
        warmup_steps=warmup_steps,
        extrapolate=extrapolate,
    )
    if strategy == "optimal" and num_inference_steps is not None:
        check_reachable(num_inference_steps, target_speedup, warmup_steps)
    return runs, polish, warmup_steps
