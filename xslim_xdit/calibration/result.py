"""The result of :func:`~xslim_xdit.calibration.calibrate`: a schedule, how it was found, and the
profile behind it; saves to a JSON file a person can edit.

Example:
    >>> from xslim_xdit.config import Schedule
    >>> r = CalibrationResult(schedule=Schedule(num_steps=4, full_steps=(0, 3)), warn=None, crit=None,
    ...                       polish="none", token_ratio=0.5, block_thresh=2.0, indicator="gram",
    ...                       estimated_fraction=0.5, strategy="optimal")
    >>> r.config().mode
    'schedule'
    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "calibration.json")
    >>> r.save(path)
    >>> CalibrationResult.load(path) == r
    True
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import ConfigError, Schedule, XSlimConfig


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
        """The JSON-ready form :meth:`save` writes (keys in a fixed order)."""
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
