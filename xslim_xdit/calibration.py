"""Offline calibration: profile one full run, then emit a schedule and thresholds.

X-Slim's released code runs no online controller: it records how much the stack residual
changes from step to step in one full run of one prompt (the change is U-shaped over the run and
depends little on the prompt), and builds a static schedule from it. :func:`calibrate` does the
same with the pure controller: it replays the recorded indicator through
:class:`~xslim_xdit.controller.OnlineController` at thresholds searched to hit a target compute
fraction, and returns the resulting schedule, which saves to a JSON file a person can edit.

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .api import disable_xslim, enable_xslim
from .config import ConfigError, Schedule, XSlimConfig
from .controller import OnlineController, StepKind

Indicator = Literal["residual_change", "probe_change"]


@dataclass
class CalibrationResult:
    """A calibrated schedule, the thresholds that produced it, and the profile behind it."""

    schedule: Schedule
    warn: float
    crit: float
    polish: str
    token_ratio: float
    block_thresh: float
    indicator: str
    estimated_fraction: float
    profile: list[dict[str, Any]] = field(default_factory=list)

    def config(self, **overrides: Any) -> XSlimConfig:
        """A schedule-mode config that replays this schedule (rescaled to any step count)."""
        kw: dict[str, Any] = dict(
            mode="schedule",
            schedule=self.schedule,
            token_ratio=self.token_ratio,
            block_thresh=self.block_thresh,
        )
        kw.update(overrides)
        return XSlimConfig(**kw)

    def online_config(self, **overrides: Any) -> XSlimConfig:
        """An online config with the calibrated thresholds (for the same indicator)."""
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
            warn=float(th["warn"]),
            crit=float(th["crit"]),
            block_thresh=float(th.get("block_thresh", 2.0)),
            polish=d.get("polish", "token"),
            token_ratio=float(d.get("token_ratio", 0.5)),
            indicator=d.get("indicator", "residual_change"),
            estimated_fraction=float(d.get("estimated_flops_fraction", float("nan"))),
            profile=d.get("profile", []),
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


def calibrate(
    pipe_or_transformer: Any,
    run: Callable[[], Any],
    *,
    num_inference_steps: int | None = None,
    target_speedup: float = 2.5,
    polish: Literal["token", "block", "auto", "none"] = "token",
    token_ratio: float = 0.5,
    block_thresh: float = 2.0,
    warmup_steps: int = 3,
    warn_fraction: float = 0.5,
    indicator: Indicator = "residual_change",
) -> CalibrationResult:
    """Profile one full run and return a schedule that reaches ``target_speedup`` (in FLOPs).

    Args:
        pipe_or_transformer: what X-Slim will be enabled on.
        run: a callable that performs one generation (e.g. ``lambda: pipe(prompt, ...)``).
        num_inference_steps: steps of that run, when ``pipe_or_transformer`` is a bare transformer.
        target_speedup: wanted ratio of full compute to cached compute (> 1).
        polish, token_ratio, block_thresh: the polish level of the band between the thresholds.
        warmup_steps: steps always computed at the start.
        warn_fraction: ``warn = warn_fraction * crit``, in (0, 1).
        indicator: ``"residual_change"`` (relative change of the stack residual, X-Slim's offline
            profile) or ``"probe_change"`` (relative change of block 0's modulated input).
    """
    if not target_speedup > 1.0:
        raise ConfigError(f"target_speedup must be > 1; got {target_speedup!r}")
    if not 0.0 < warn_fraction < 1.0:
        raise ConfigError(f"warn_fraction must be in (0, 1); got {warn_fraction!r}")
    if indicator not in ("residual_change", "probe_change"):
        raise ConfigError(f"indicator must be 'residual_change' or 'probe_change'; got {indicator!r}")
    XSlimConfig(polish=polish, token_ratio=token_ratio, block_thresh=block_thresh, warmup_steps=warmup_steps)
    # Every step full, with block statistics recorded: thresholds that nothing stays under.
    record_cfg = XSlimConfig(warn=1e-12, crit=2e-12, polish="block", warmup_steps=1)
    engine = enable_xslim(pipe_or_transformer, record_cfg, num_inference_steps=num_inference_steps)
    engine.profiling = True
    try:
        run()
    finally:
        disable_xslim(pipe_or_transformer)
    profile = engine.profile
    if not profile:
        raise RuntimeError("calibration run called the transformer no time: check `run`")
    values = [p[indicator] for p in profile]
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
    )
