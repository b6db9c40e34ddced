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
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from .api import disable_xslim, enable_xslim
from .config import ConfigError, Schedule, XSlimConfig
from .controller import OnlineController, StepKind
from .planner import optimal_full_steps, skip_errors_of

Indicator = Literal["residual_change", "probe_change"]
Strategy = Literal["optimal", "threshold"]


@dataclass
class CalibrationResult:
    """A calibrated schedule, how it was found, and the profile behind it.

    ``warn`` and ``crit`` are the thresholds of ``strategy="threshold"`` (``None`` for
    ``"optimal"``, which has none).
    """

    schedule: Schedule
    warn: float | None
    crit: float | None
    polish: str
    token_ratio: float
    block_thresh: float
    indicator: str
    estimated_fraction: float
    profile: list[dict[str, Any]] = field(default_factory=list)
    strategy: str = "threshold"
    extrapolate: str = "linear"
    #: ``strategy="optimal"``: the schedules tried on the calibration runs, with their errors
    candidates: list[dict[str, Any]] = field(default_factory=list)
    #: how many calibration runs were profiled (``profile`` holds the first one's)
    num_runs: int = 1

    def config(self, **overrides: Any) -> XSlimConfig:
        """A schedule-mode config that replays this schedule (rescaled to any step count)."""
        kw: dict[str, Any] = dict(
            mode="schedule",
            schedule=self.schedule,
            token_ratio=self.token_ratio,
            block_thresh=self.block_thresh,
            extrapolate=self.extrapolate,
        )
        kw.update(overrides)
        return XSlimConfig(**kw)

    def online_config(self, **overrides: Any) -> XSlimConfig:
        """An online config with the calibrated thresholds (for the same indicator); only for
        ``strategy="threshold"`` results."""
        if self.warn is None or self.crit is None:
            raise ConfigError(
                f"strategy={self.strategy!r} found no thresholds: use config() to replay the schedule, "
                "or calibrate with strategy='threshold' for online thresholds"
            )
        kw: dict[str, Any] = dict(
            warn=self.warn,
            crit=self.crit,
            polish=self.polish,
            token_ratio=self.token_ratio,
            block_thresh=self.block_thresh,
        )
        kw.update(overrides)
        return XSlimConfig(**kw)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schedule": self.schedule.to_dict(),
            "thresholds": {"warn": self.warn, "crit": self.crit, "block_thresh": self.block_thresh},
            "polish": self.polish,
            "token_ratio": self.token_ratio,
            "indicator": self.indicator,
            "strategy": self.strategy,
            "extrapolate": self.extrapolate,
            "candidates": self.candidates,
            "num_runs": self.num_runs,
            "estimated_flops_fraction": self.estimated_fraction,
            "profile": self.profile,
        }

    def save(self, path: str | Path) -> None:
        """Write the result as indented JSON."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> CalibrationResult:
        """Read a result written by :meth:`save` (or edited by hand); it is validated again."""
        d = json.loads(Path(path).read_text())
        missing = {"schedule", "thresholds"} - set(d)
        if missing:
            raise ConfigError(f"calibration file {path}: missing keys {sorted(missing)}")
        th = d["thresholds"]
        res = cls(
            schedule=Schedule.from_dict(d["schedule"]),
            warn=None if th.get("warn") is None else float(th["warn"]),
            crit=None if th.get("crit") is None else float(th["crit"]),
            block_thresh=float(th.get("block_thresh", 2.0)),
            polish=d.get("polish", "token"),
            token_ratio=float(d.get("token_ratio", 0.5)),
            indicator=d.get("indicator", "residual_change"),
            estimated_fraction=float(d.get("estimated_flops_fraction", float("nan"))),
            profile=d.get("profile", []),
            strategy=d.get("strategy", "threshold"),
            extrapolate=d.get("extrapolate", "linear"),
            candidates=d.get("candidates", []),
            num_runs=int(d.get("num_runs", 1)),
        )
        res.config()  # validate now, not at first use
        return res


def simulate(
    values: Sequence[float | None],
    warn: float,
    crit: float,
    *,
    warmup_steps: int,
    polish: str,
    partial_reset: float = 1.0,
) -> list[StepKind]:
    """Replay an indicator sequence through the online controller (pure)."""
    cfg = XSlimConfig(
        warn=warn, crit=crit, warmup_steps=warmup_steps, polish=polish, partial_reset=partial_reset
    )
    ctl = OnlineController(cfg, len(values))
    return [ctl.decide(i, v).kind for i, v in enumerate(values)]


def estimated_cost(kinds: Sequence[StepKind], token_ratio: float, block_fraction: float) -> float:
    """Fraction of full-step compute a decision sequence needs (block/token steps by their share)."""
    cost = {
        StepKind.FULL: 1.0,
        StepKind.SKIP: 0.0,
        StepKind.TOKEN: token_ratio,
        StepKind.BLOCK: block_fraction,
    }
    return sum(cost[k] for k in kinds) / max(len(kinds), 1)


def profile_gram(profile: Sequence[dict[str, Any]]) -> list[list[float]]:
    """The ``N x N`` Gram matrix of the stack residuals, from the profile's ``gram_row`` entries
    (row ``i`` holds the inner products of step ``i`` with steps ``0 .. i``)."""
    n = len(profile)
    rows = [p.get("gram_row") for p in profile]
    if any(r is None or len(r) != i + 1 for i, r in enumerate(rows)):
        raise ConfigError("profile: every step needs a gram_row of its step index + 1 entries")
    g = [[0.0] * n for _ in range(n)]
    for i, r in enumerate(rows):
        for j, v in enumerate(r):  # type: ignore[arg-type]
            g[i][j] = g[j][i] = float(v)
    return g


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
) -> CalibrationResult:
    """Profile full runs and return a schedule that reaches ``target_speedup`` (in FLOPs).

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
    """
    runs = [run] if callable(run) else list(run)
    if not runs or not all(callable(r) for r in runs):
        raise ConfigError(f"run must be a callable or a non-empty sequence of callables; got {run!r}")
    if not (isinstance(target_speedup, (int, float)) and target_speedup > 1.0):
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
    if not 0.0 < warn_fraction < 1.0:
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
        _check_reachable(num_inference_steps, target_speedup, warmup_steps)
    # Every step full, with block statistics recorded: thresholds that nothing stays under.
    record_cfg = XSlimConfig(warn=1e-12, crit=2e-12, polish="block", warmup_steps=1)
    profiles: list[list[dict[str, Any]]] = []
    references: list[torch.Tensor | None] = []
    for r in runs:
        engine, reference = _replay(pipe_or_transformer, record_cfg, r, num_inference_steps, profiling=True)
        if not engine.profile:
            raise RuntimeError("calibration run called the transformer no time: check `run`")
        profiles.append(engine.profile)
        references.append(reference)
    profile = profiles[0]
    n = len(profile)
    if any(len(p) != n for p in profiles):
        raise ConfigError(
            f"the calibration runs made {[len(p) for p in profiles]} transformer calls: they must agree"
        )
    target = 1.0 / target_speedup

    if strategy == "optimal":
        _check_reachable(n, target_speedup, warmup_steps)
        grams = [profile_gram(p) for p in profiles]
        w = min(warmup_steps, n)
        num_full = max(min(n, w + 1), int(n * target + 1e-9))
        plans: list[tuple[int, ...]] = []
        for warm in range(w, w + 3 if closed_loop_check else w + 1):
            if warm + 1 > num_full:  # the warm-up and the last step must fit (always for warm == w)
                break
            if max_gap is not None or not closed_loop_check:
                caps: list[int | None] = [max_gap]
            else:
                mean_gap = -(-(n - warm) // max(num_full - warm, 1))
                caps = [None, mean_gap + 1, mean_gap + 3]
            for cap in caps:
                plan = optimal_full_steps(
                    grams, num_full, warmup_steps=warm, max_gap=cap, extrapolate=extrapolate
                )
                if plan not in plans:
                    plans.append(plan)
        candidates: list[dict[str, Any]] = [{"full_steps": list(p), "closed_loop_error": None} for p in plans]
        if len(plans) > 1 and all(ref is not None for ref in references):
            for cand, plan in zip(candidates, plans, strict=True):
                cfg = XSlimConfig(
                    mode="schedule", schedule=Schedule(num_steps=n, full_steps=plan), extrapolate=extrapolate
                )
                errors = []
                for r, ref in zip(runs, references, strict=True):
                    _, out = _replay(pipe_or_transformer, cfg, r, num_inference_steps)
                    errors.append(_relative_error(out, ref))  # type: ignore[arg-type]
                cand["run_errors"] = errors
                cand["closed_loop_error"] = _geometric_mean(errors)
            best_i = min(range(len(plans)), key=lambda i: candidates[i]["closed_loop_error"])
        else:
            best_i = 0
        full = plans[best_i]
        for p, err in zip(profile, skip_errors_of(grams[0], full, extrapolate), strict=True):
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
            num_runs=len(runs),
        )

    values = [_mean([p[i][indicator] for p in profiles]) for i in range(n)]
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
    return CalibrationResult(
        schedule=sched,
        warn=warn_fraction * best_crit,
        crit=best_crit,
        polish=polish,
        token_ratio=token_ratio,
        block_thresh=block_thresh,
        indicator=indicator,
        estimated_fraction=estimated_cost(best, token_ratio, block_fraction),
        profile=profile,
        strategy="threshold",
        extrapolate=extrapolate,
        num_runs=len(runs),
    )


def _mean(values: Sequence[float | None]) -> float | None:
    finite = [v for v in values if v is not None]
    return sum(finite) / len(finite) if finite else None


def _geometric_mean(values: Sequence[float]) -> float:
    """Of relative errors: the ranking mean PSNR over the runs would give (0 and inf pass through)."""
    if any(v == float("inf") for v in values):
        return float("inf")
    if any(v <= 0.0 for v in values):
        return 0.0 if all(v <= 0.0 for v in values) else _geometric_mean([v for v in values if v > 0.0])
    return math.exp(sum(math.log(v) for v in values) / len(values))


def _check_reachable(num_steps: int, target_speedup: float, warmup_steps: int) -> None:
    """``strategy="optimal"`` keeps the warm-up and the last step full: that bounds the speedup."""
    fixed = min(num_steps, warmup_steps + 1)
    if num_steps / fixed + 1e-9 < target_speedup:
        raise ConfigError(
            f"target_speedup={target_speedup!r} is out of reach for {num_steps} steps: with warmup_steps="
            f"{warmup_steps} and the last step full, at most {num_steps / fixed:.3g}"
        )


def _replay(
    pipe_or_transformer: Any,
    config: XSlimConfig,
    run: Callable[[], Any],
    num_inference_steps: int | None,
    *,
    profiling: bool = False,
) -> tuple[Any, torch.Tensor | None]:
    """Run ``run`` once with X-Slim enabled under ``config``, then disable it; returns the
    engine (its profile, when ``profiling``) and the run's final output (:func:`_final_output`)."""
    engine = enable_xslim(pipe_or_transformer, config, num_inference_steps=num_inference_steps)
    engine.profiling = profiling
    try:
        return engine, _final_output(engine.model, run)
    finally:
        disable_xslim(pipe_or_transformer)


def _final_output(model: Any, run: Callable[[], Any]) -> torch.Tensor | None:
    """Run ``run`` and return its output as a tensor (a tensor, an array, a list of images or
    arrays, or an object with ``.images``), else the first tensor of the model's last output
    (``None`` if neither exists)."""
    box: list[torch.Tensor | None] = [None]

    def hook(_m: Any, _a: Any, out: Any) -> None:
        while not isinstance(out, torch.Tensor):
            if isinstance(out, (tuple, list)) and out:
                out = out[0]
            elif hasattr(out, "sample"):
                out = out.sample
            else:
                return
        box[0] = out.detach().clone()

    handle = model.register_forward_hook(hook)
    try:
        result = run()
    finally:
        handle.remove()
    final = _as_tensor(result)
    return final if final is not None else box[0]


def _as_tensor(obj: Any) -> torch.Tensor | None:
    """A pipeline's output as a float64 tensor, or ``None`` when it is nothing image-like."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to(torch.float64).cpu()
    if hasattr(obj, "images"):
        return _as_tensor(obj.images)
    if hasattr(obj, "frames"):
        return _as_tensor(obj.frames)
    if hasattr(obj, "__array__") or hasattr(obj, "__array_interface__"):  # numpy arrays, PIL images
        try:
            return torch.from_numpy(np.asarray(obj, dtype=np.float64).copy())
        except (TypeError, ValueError):
            return None
    if isinstance(obj, (tuple, list)) and obj:
        parts = [_as_tensor(x) for x in obj]
        if all(p is not None for p in parts) and len({p.shape for p in parts}) == 1:  # type: ignore[union-attr]
            return torch.stack(parts)  # type: ignore[arg-type]
        return parts[0]
    return None


def _relative_error(out: torch.Tensor | None, ref: torch.Tensor) -> float:
    if out is None or out.shape != ref.shape:
        return float("inf")
    num = (out.double() - ref.double()).norm()
    den = ref.double().norm()
    return float(num / den) if float(den) > 0 else float(num)
