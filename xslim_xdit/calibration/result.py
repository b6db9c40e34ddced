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
    #: one threshold, or one per block stack (as :attr:`XSlimConfig.block_thresh`)
    block_thresh: float | tuple[float, ...]
    indicator: str
    estimated_fraction: float
    profile: list[dict[str, Any]] = field(default_factory=list)
    strategy: str = "threshold"
    extrapolate: str = "linear"
    #: ``strategy="optimal"``: the schedules tried on the calibration runs, with their errors
    candidates: list[dict[str, Any]] = field(default_factory=list)
    #: how many calibration runs were profiled (``profile`` holds the first one's)
    num_runs: int = 1
    #: a pipeline whose run several transformers serve (Wan 2.2 A14B): each one's pipeline
    #: attribute and ``[start, end)`` steps, in run order (``[{"name": "transformer", "steps":
    #: [0, 4]}, {"name": "transformer_2", "steps": [4, 8]}]``); empty for one transformer.
    #: :func:`~xslim_xdit.api.enable_xslim` applies the schedule to every one of them and refuses
    #: a pipeline whose transformers are others.
    experts: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if isinstance(self.block_thresh, list):  # one per block stack: a tuple, as in XSlimConfig
            self.block_thresh = tuple(self.block_thresh)
        _check_experts(self.experts, self.schedule)

    @property
    def expert_names(self) -> list[str]:
        """The pipeline attributes of the transformers the result was calibrated on (empty: one)."""
        return [e["name"] for e in self.experts]

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
            "experts": self.experts,
            "estimated_flops_fraction": self.estimated_fraction,
            "profile": self.profile,
        }

    def table(self) -> str:
        """A printable table in the layout of :meth:`CacheStatistics.table
        <xslim_xdit.stats.CacheStatistics.table>`: one line per step of the schedule (its kind, the
        profiled indicator, the planned skip error), the candidates tried, then the totals.

        Example:
            >>> r = CalibrationResult(schedule=Schedule(num_steps=3, full_steps=(0, 2)), warn=None,
            ...     crit=None, polish="none", token_ratio=0.5, block_thresh=2.0, indicator="gram",
            ...     estimated_fraction=0.67, strategy="optimal")
            >>> print(r.table())
            step kind   indicator    error
               0 full           -        -
               1 skip           -        -
               2 full           -        -
            steps 3: full 2, block 0, token 0, skip 1 | FLOPs estimated 67.0% (theoretical 1.49x) | strategy optimal, 1 calibration run(s)
        """

        def num(v: Any, width: int) -> str:
            return (
                f"{v:>{width}.4f}"
                if isinstance(v, (int, float)) and not isinstance(v, bool)
                else f"{'-':>{width}}"
            )

        key = self.indicator if self.indicator in ("residual_change", "probe_change") else "residual_change"
        lines = [f"{'step':>4} {'kind':<5} {'indicator':>10} {'error':>8}"]
        n = self.schedule.num_steps
        for i in range(n):
            row = self.profile[i] if i < len(self.profile) and isinstance(self.profile[i], dict) else {}
            lines.append(
                f"{i:>4} {self.schedule.kind_of(i):<5} {num(row.get(key), 10)} "
                f"{num(row.get('planned_skip_error'), 8)}"
            )
        for j, c in enumerate(self.candidates):
            if isinstance(c, dict):
                err = c.get("closed_loop_error")
                err_s = f"{err:.4g}" if isinstance(err, (int, float)) else "-"
                lines.append(f"candidate {j}: full steps {c.get('full_steps')}, closed-loop error {err_s}")
        if self.experts:
            lines.append(
                "experts: "
                + ", ".join(f"{e['name']} steps {e['steps'][0]}-{e['steps'][1] - 1}" for e in self.experts)
            )
        kinds = [self.schedule.kind_of(i) for i in range(n)]
        frac = self.estimated_fraction
        speed = f"{1.0 / frac:.2f}x" if isinstance(frac, float) and frac > 0 else "-"
        lines.append(
            f"steps {n}: full {kinds.count('full')}, block {kinds.count('block')}, token {kinds.count('token')}, "
            f"skip {kinds.count('skip')} | FLOPs estimated {frac:.1%} (theoretical {speed}) | "
            f"strategy {self.strategy}, {self.num_runs} calibration run(s)"
            + (
                f" | warn {self.warn:.4g}, crit {self.crit:.4g}"
                if self.warn is not None and self.crit is not None
                else ""
            )
        )
        return "\n".join(lines)

    def save(self, path: str | Path) -> None:
        """Write the result as indented JSON."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> CalibrationResult:
        """Read a result written by :meth:`save` (or edited by hand); it is validated again.

        A file that is not such a result (not JSON, a missing or ill-typed key, a schedule or
        threshold out of range) raises :class:`~xslim_xdit.config.ConfigError` naming the file and
        the key. ``thresholds.block_thresh`` is a number or a list with one per block stack (read
        as a tuple, as :class:`~xslim_xdit.config.XSlimConfig` takes it).

        Example:
            >>> import json, os, tempfile
            >>> path = os.path.join(tempfile.mkdtemp(), "calibration.json")
            >>> with open(path, "w") as f:
            ...     json.dump({"schedule": {"num_steps": 4, "full_steps": [0, 3]},
            ...                "thresholds": {"warn": None, "crit": None, "block_thresh": [1.5, 10.0]}}, f)
            >>> CalibrationResult.load(path).config().block_thresh
            (1.5, 10.0)
        """
        try:
            d = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(
                f"calibration file {path}: not JSON ({e}); write it with CalibrationResult.save"
            ) from e
        try:
            res = _from_dict(d)
            res.config()  # validate now, not at first use
            if res.warn is not None:
                res.online_config()
        except ConfigError as e:
            raise ConfigError(f"calibration file {path}: {e}") from None
        return res


_KEYS = (
    "schedule",
    "thresholds",
    "polish",
    "token_ratio",
    "indicator",
    "strategy",
    "extrapolate",
    "candidates",
    "num_runs",
    "experts",
    "estimated_flops_fraction",
    "profile",
)


def _number(key: str, v: Any, *, optional: bool = False) -> float | None:
    if v is None and optional:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(f"{key} must be {'null or ' if optional else ''}a number; got {v!r}")
    return float(v)


def _choice(key: str, v: Any, accepted: tuple[str, ...] | None = None) -> str:
    if not isinstance(v, str) or (accepted is not None and v not in accepted):
        what = "a string" if accepted is None else "one of " + ", ".join(map(repr, accepted))
        raise ConfigError(f"{key} must be {what}; got {v!r}")
    return v


def _list(key: str, v: Any) -> list[Any]:
    if not isinstance(v, list):
        raise ConfigError(f"{key} must be a list; got {v!r}")
    return v


def _from_dict(d: Any) -> CalibrationResult:
    """:meth:`CalibrationResult.to_dict` read back, every key type-checked (errors name the key)."""
    if not isinstance(d, dict):
        raise ConfigError(
            f"the file must hold a JSON object with keys {', '.join(_KEYS)}; got {type(d).__name__}"
        )
    missing = [k for k in ("schedule", "thresholds") if k not in d]
    if missing:
        raise ConfigError(f"missing keys {missing} (a file written by CalibrationResult.save has them)")
    unknown = sorted(set(d) - set(_KEYS), key=str)
    if unknown:
        raise ConfigError(f"unknown keys {unknown}; accepted: {', '.join(_KEYS)}")
    th = d["thresholds"]
    if not isinstance(th, dict):
        raise ConfigError(f"thresholds must be an object with keys warn, crit, block_thresh; got {th!r}")
    unknown = sorted(set(th) - {"warn", "crit", "block_thresh"}, key=str)
    if unknown:
        raise ConfigError(f"thresholds has unknown keys {unknown}; accepted: warn, crit, block_thresh")
    warn = _number("thresholds.warn", th.get("warn"), optional=True)
    crit = _number("thresholds.crit", th.get("crit"), optional=True)
    if (warn is None) != (crit is None):
        raise ConfigError(
            f"thresholds.warn and thresholds.crit must be both numbers or both null; got {warn!r}, {crit!r}"
        )
    bt = th.get("block_thresh", 2.0)
    per_stack = (
        isinstance(bt, list)
        and bt
        and all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in bt)
    )
    if not (per_stack or (isinstance(bt, (int, float)) and not isinstance(bt, bool))):
        raise ConfigError(
            f"thresholds.block_thresh must be a number or a non-empty list of numbers (one per block stack); got {bt!r}"
        )
    block_thresh = tuple(float(t) for t in bt) if isinstance(bt, list) else float(bt)
    num_runs = d.get("num_runs", 1)
    if isinstance(num_runs, bool) or not isinstance(num_runs, int) or num_runs < 1:
        raise ConfigError(f"num_runs must be an integer >= 1; got {num_runs!r}")
    return CalibrationResult(
        schedule=Schedule.from_dict(d["schedule"]),
        warn=warn,
        crit=crit,
        block_thresh=block_thresh,
        polish=_choice("polish", d.get("polish", "token"), ("token", "block", "auto", "none")),
        token_ratio=_number("token_ratio", d.get("token_ratio", 0.5)),  # type: ignore[arg-type]
        indicator=_choice("indicator", d.get("indicator", "residual_change")),
        estimated_fraction=_number(
            "estimated_flops_fraction", d.get("estimated_flops_fraction", float("nan"))
        ),  # type: ignore[arg-type]
        profile=_list("profile", d.get("profile", [])),
        strategy=_choice("strategy", d.get("strategy", "threshold"), ("threshold", "optimal")),
        extrapolate=_choice("extrapolate", d.get("extrapolate", "linear"), ("linear", "none")),
        candidates=_list("candidates", d.get("candidates", [])),
        num_runs=num_runs,
        experts=_list("experts", d.get("experts", [])),
    )


def _check_experts(experts: Any, schedule: Schedule) -> None:
    """``experts`` as :attr:`CalibrationResult.experts` holds them: objects with a ``name`` and
    ``steps`` ``[start, end)``, one after the other, covering the schedule's steps, every start a
    full step of the schedule (that transformer has nothing cached there). Errors name the key."""
    if not isinstance(experts, list):
        raise ConfigError(f"experts must be a list; got {experts!r}")
    if not experts:
        return
    expect = 0
    for i, e in enumerate(experts):
        ok = isinstance(e, dict) and set(e) == {"name", "steps"} and isinstance(e["name"], str)
        steps = e.get("steps") if isinstance(e, dict) else None
        ok = ok and isinstance(steps, list) and len(steps) == 2
        ok = ok and all(isinstance(x, int) and not isinstance(x, bool) for x in steps)  # type: ignore[union-attr]
        if not ok:
            raise ConfigError(
                f"experts[{i}] must be an object with keys name (a pipeline attribute) and steps ([start, end]); got {e!r}"
            )
        start, end = steps  # type: ignore[misc]
        if start != expect or end <= start:
            raise ConfigError(
                f"experts[{i}].steps must be [start, end) after the previous expert's (start {expect}); got {steps!r}"
            )
        if start not in schedule.full_steps:
            raise ConfigError(
                f"experts[{i}] ({e['name']}) starts at step {start}, which the schedule must run in full "
                "(that transformer has nothing cached there); add it to schedule.full_steps"
            )
        expect = end
    if expect != schedule.num_steps:
        raise ConfigError(f"experts cover steps 0 .. {expect - 1}; the schedule has {schedule.num_steps}")
