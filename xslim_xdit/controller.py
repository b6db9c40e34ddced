"""The X-Slim decision logic, pure: indicator values in, decisions out.

Nothing here touches torch.distributed, a model, or a tensor, so the same code decides on one
device, on every rank of a parallel run (fed with reduced indicators), and in offline
calibration (fed with a recorded profile).

A controller owns its state. ``propose(step, indicator)`` says what it would do without changing
anything; the decision room then checks the proposal against what the caches can serve and what
the ranks agree on, and reports the kind that really runs with ``commit(kind)``, which is the
only place the state moves. ``decide`` is the two in one, for offline replays.

Example:
    >>> from xslim_xdit.config import XSlimConfig
    >>> ctl = OnlineController(XSlimConfig(warn=0.1, crit=0.3, polish="token", warmup_steps=1), num_steps=5)
    >>> [ctl.decide(s, ind).kind.name for s, ind in enumerate([None, 0.05, 0.1, 0.3, 0.01])]
    ['FULL', 'SKIP', 'TOKEN', 'FULL', 'FULL']
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from enum import IntEnum

from .config import Schedule, XSlimConfig


class StepKind(IntEnum):
    """What a step computes. The integer value is what ranks exchange."""

    SKIP = 0
    TOKEN = 1
    BLOCK = 2
    FULL = 3


@dataclass(frozen=True)
class StepDecision:
    """One step's decision and the controller state behind it."""

    step: int
    kind: StepKind
    indicator: float | None  # the (rescaled) indicator added at this step, if any
    error: float  # accumulated error after this decision
    reason: str


def polyval(coeffs: Sequence[float], x: float) -> float:
    """Evaluate a polynomial, highest degree first (Horner), as ``numpy.polyval`` does."""
    acc = 0.0
    for c in coeffs:
        acc = acc * x + c
    return acc


class OnlineController:
    """Dual-threshold push-then-polish controller.

    ``decide(step, indicator)`` accumulates the (optionally rescaled) indicator and returns
    SKIP below ``warn``, a polish step (BLOCK or TOKEN) in ``[warn, crit)``, FULL at ``crit``
    or above; warm-up steps and the last step are FULL. A FULL step resets the error to 0; a
    polish step removes ``partial_reset`` of it.
    """

    def __init__(self, config: XSlimConfig, num_steps: int) -> None:
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1; got {num_steps}")
        self.config = config
        self.num_steps = num_steps
        self.error = 0.0
        self.consecutive_skips = 0
        self._coeffs = config.rescale_coefficients()

    def forced_full(self, step: int) -> bool:
        """True where the step runs in full whatever the indicator says."""
        cfg = self.config
        return step < cfg.warmup_steps or (cfg.last_step_full and step == self.num_steps - 1)

    #: the controller reads the step indicator (the engine computes and reduces it only then)
    wants_indicator = True

    def propose(self, step: int, indicator: float | None) -> StepDecision:
        """What this step would do given the indicator; the state is unchanged until :meth:`commit`."""
        cfg = self.config
        if self.forced_full(step) or indicator is None or not math.isfinite(indicator):
            reason = (
                "warm-up" if step < cfg.warmup_steps else "last step" if indicator is not None else "no probe"
            )
            return StepDecision(step, StepKind.FULL, None, 0.0, reason)
        value = polyval(self._coeffs, indicator) if self._coeffs else indicator
        value = abs(value)
        error = self.error + value
        if error >= cfg.crit:
            return StepDecision(step, StepKind.FULL, value, 0.0, "error >= crit")
        if error < cfg.warn and not (cfg.max_skips is not None and self.consecutive_skips >= cfg.max_skips):
            return StepDecision(step, StepKind.SKIP, value, error, "error < warn")
        reason = "warn <= error < crit" if error >= cfg.warn else "max_skips reached"
        if cfg.polish == "none":
            return StepDecision(step, StepKind.FULL, value, 0.0, reason + " (no polish level)")
        if cfg.polish == "token":
            kind = StepKind.TOKEN
        elif cfg.polish == "block":
            kind = StepKind.BLOCK
        else:  # auto: the cheaper-to-fix lower half of the band gets block refresh
            kind = StepKind.BLOCK if error < 0.5 * (cfg.warn + cfg.crit) else StepKind.TOKEN
        after = error * (1.0 - cfg.partial_reset)
        return StepDecision(step, kind, value, after, f"{reason} (error {error:.4g})")

    def commit(self, decision: StepDecision) -> StepDecision:
        """Move the state as ``decision`` (possibly not the proposed kind) really ran: a full step
        resets the error, a skip keeps it and counts, a polish step keeps its partial reset.
        Returns the decision with the error the controller now holds."""
        if decision.kind == StepKind.FULL:
            self.error = 0.0
            self.consecutive_skips = 0
        else:
            self.error = decision.error
            self.consecutive_skips = self.consecutive_skips + 1 if decision.kind == StepKind.SKIP else 0
        if decision.error != self.error:
            decision = replace(decision, error=self.error)
        return decision

    def decide(self, step: int, indicator: float | None) -> StepDecision:
        """:meth:`propose` and :meth:`commit` in one (offline replays of a profile)."""
        return self.commit(self.propose(step, indicator))


class ScheduleController:
    """Follows a :class:`Schedule` (rescaled to the run's step count) exactly."""

    def __init__(self, schedule: Schedule, num_steps: int) -> None:
        self.schedule = schedule.rescaled(num_steps)
        self.num_steps = num_steps

    def forced_full(self, step: int) -> bool:
        return self.schedule.kind_of(step) == "full"

    wants_indicator = False

    def propose(self, step: int, indicator: float | None = None) -> StepDecision:
        if step >= self.num_steps:
            # More transformer calls than scheduled steps (a scheduler with extra evaluations):
            # the safe answer is to compute.
            return StepDecision(step, StepKind.FULL, indicator, 0.0, "beyond schedule")
        kind = StepKind[self.schedule.kind_of(step).upper()]
        return StepDecision(step, kind, indicator, 0.0, "schedule")

    def commit(self, decision: StepDecision) -> StepDecision:
        return decision

    def decide(self, step: int, indicator: float | None = None) -> StepDecision:
        return self.propose(step, indicator)


class RecordingController:
    """Every step full, with the indicator still read: the recording mode of calibration
    profiles (every quantity a later plan needs is measured on the full trajectory)."""

    wants_indicator = True

    def __init__(self, num_steps: int) -> None:
        self.num_steps = num_steps

    def forced_full(self, step: int) -> bool:
        return True

    def propose(self, step: int, indicator: float | None = None) -> StepDecision:
        return StepDecision(step, StepKind.FULL, indicator, 0.0, "recording")

    def commit(self, decision: StepDecision) -> StepDecision:
        return decision

    def decide(self, step: int, indicator: float | None = None) -> StepDecision:
        return self.propose(step, indicator)


Controller = OnlineController | ScheduleController | RecordingController


def make_controller(config: XSlimConfig, num_steps: int, record: bool = False) -> Controller:
    """The controller the config asks for, for a run of ``num_steps`` steps (every step full
    with ``record``)."""
    if record:
        return RecordingController(num_steps)
    if config.mode == "schedule":
        if config.schedule is None:
            raise ValueError("config.schedule must be set when config.mode='schedule'")
        return ScheduleController(config.schedule, num_steps)
    return OnlineController(config, num_steps)


def select_blocks(
    magnitudes: Sequence[float], thresh: float, first_n: int, scale: str = "stack_mean"
) -> list[bool]:
    """The block-refresh walk over one stack: ``True`` means compute, ``False`` reuse.

    ``magnitudes[l]`` is block ``l``'s residual magnitude ``e_l`` at the last full step. Walking
    down the depth, ``acc += e_l``; while ``acc < thresh`` the block reuses its cached residual,
    otherwise it is computed and ``acc`` restarts. The first ``first_n`` blocks are computed.
    With ``scale="stack_mean"`` each ``e_l`` is divided by the stack's mean first.

    Example:
        >>> select_blocks([1.0, 1.0, 1.0, 1.0, 1.0], thresh=2.0, first_n=1)
        [True, False, True, False, True]
    """
    mags = [float(m) for m in magnitudes]
    if scale == "stack_mean" and mags:
        mean = sum(mags) / len(mags)
        mags = [m / mean if mean > 0 else 0.0 for m in mags]
    out: list[bool] = []
    acc = 0.0
    for i, e in enumerate(mags):
        if i < first_n:
            out.append(True)
            acc = 0.0
            continue
        acc += e
        if acc < thresh:
            out.append(False)
        else:
            out.append(True)
            acc = 0.0
    return out


def tokens_per_group(num_tokens: int, ratio: float, groups: int = 1) -> list[int]:
    """How many tokens a token refresh recomputes in each of ``groups`` contiguous chunks.

    Example:
        >>> tokens_per_group(10, 0.5, groups=2)
        [3, 3]
    """
    if groups < 1 or num_tokens < groups:
        raise ValueError(f"token_groups={groups} needs at least that many tokens; got {num_tokens}")
    sizes = [num_tokens // groups + (1 if g < num_tokens % groups else 0) for g in range(groups)]
    return [min(s, max(1, math.ceil(ratio * s))) for s in sizes]
