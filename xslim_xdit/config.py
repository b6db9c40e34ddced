"""Validated configuration for X-Slim: one dataclass.

Every field is checked when the object is built, so a bad value fails with a message naming the
field and its accepted range before any model runs. The presets the model families publish, and
how ``preset=`` builds one, are in :mod:`xslim_xdit.presets` (:data:`PRESETS` is re-exported here);
hand-written schedules in :mod:`xslim_xdit.schedule` (:class:`Schedule`, re-exported here).

Example:
    >>> from xslim_xdit.config import XSlimConfig
    >>> cfg = XSlimConfig(warn=0.1, crit=0.3, polish="token", token_ratio=0.5)
    >>> cfg.levels
    ('step', 'token')
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from .presets import _ONLINE_ONLY, PRESETS, RESCALE_POLYNOMIALS, preset_init  # noqa: F401 (re-exported)
from .schedule import ConfigError, Schedule, _fail

__all__ = ["PRESETS", "RESCALE_POLYNOMIALS", "ConfigError", "Schedule", "XSlimConfig"]

StepIndicator = Literal["modulated_input", "first_block_residual"]
Polish = Literal["token", "block", "auto", "none"]
GuidancePairs = Literal["auto", "halves", "none"]


@dataclass(frozen=True)
class XSlimConfig:
    """Everything X-Slim needs to decide, per step, what to reuse.

    Two modes share this config: ``mode="online"`` runs the dual-threshold push-then-polish
    controller (``warn``/``crit`` on an accumulated step indicator); ``mode="schedule"`` follows
    ``schedule`` (or a named ``preset``) exactly.

    Fields:
        mode: ``"online"`` or ``"schedule"``.
        warn, crit: the two thresholds on the accumulated indicator, ``0 < warn < crit``.
            Below ``warn`` the step is skipped, in ``[warn, crit)`` it is polished (block or
            token refresh), at or above ``crit`` it runs in full and the error resets.
        warmup_steps: first steps always computed in full (``>= 1``).
        last_step_full: the final step always runs in full.
        step_indicator: ``"modulated_input"`` (block 0's modulated input, free) or
            ``"first_block_residual"`` (block 0's residual; block 0 then always runs).
        lagged_indicator: ``True``: step ``s`` is decided on step ``s - 1``'s indicator (the
            probe's change from step ``s - 2`` to ``s - 1`` over the whole image), the one rule
            that PipeFusion's asynchronous patch phase can follow exactly: patch 0 of step ``s``
            runs before the later patches of step ``s`` exist, but after every patch of step
            ``s - 1``. ``False``: the step's own indicator (the standard rule). ``None``
            (default): lagged under PipeFusion with several patches, standard elsewhere (pass
            ``True`` on one device to reproduce a PipeFusion run's decisions).
        rescale: ``None``, the name of a built-in polynomial (``"flux"``, ``"hunyuan_video"``) or
            coefficients (highest degree first) applied to the raw relative-L1 indicator.
        polish: which refresh fills the warn band: ``"token"``, ``"block"``, ``"auto"`` (block
            refresh in the lower half of the band, token refresh in the upper half) or ``"none"``
            (no polish level: the band runs in full, a TeaCache-like controller).
        partial_reset: fraction of the accumulated error removed after a polish step, in [0, 1].
            0 (default) keeps accumulating, so polish steps fill the band until ``crit`` forces
            a full step; 1 restarts the accumulation (the published reading of the paper), which
            never reaches ``crit`` again when the per-step indicator is below ``crit - warn``.
        max_skips: longest run of consecutive skipped steps (``None`` for no cap).
        extrapolate: how a skipped step (and the untouched tokens of a token refresh) estimates
            the stack residual: ``"none"`` reuses the last computed one, ``"linear"``
            extrapolates it along the slope between the last two full steps.
        token_ratio: fraction of image tokens recomputed in a token refresh, in (0, 1].
        token_groups: token selection takes the top tokens within this many contiguous chunks of
            the image sequence (``1`` = one global top-k). Sequence-parallel runs select per rank,
            so a single device with ``token_groups`` equal to the SP degree selects the same set.
        block_thresh: threshold of the accumulated per-block residual walk, one per block stack
            or one for all (``> 0``).
        block_thresh_scale: ``"stack_mean"`` (each ``e_l`` divided by the stack mean, so the
            threshold reads "about this many blocks between recomputations") or ``"absolute"``.
        block_first_n: the first blocks of each stack always computed in a block refresh (>= 0).
        schedule: a :class:`Schedule` for ``mode="schedule"``.
        preset: name of a published schedule (see :data:`PRESETS`). Passing it builds that
            preset: mode schedule and the preset's fields, the fields passed beside it
            overriding them (as :meth:`from_preset`).
        per_sample: decide per sample of a batch (:mod:`xslim_xdit.batch`): each sample has its
            own indicator, controller state, caches and block set, the samples that compute a
            block run it as a sub-batch, and each sample's output is the one it gets alone.
            Off (default): one decision per call for the whole batch, the indicator reduced over
            it. Supports the step and block levels (``polish`` ``"none"`` or ``"block"``, or a
            schedule without token steps).
        guidance_pairs: with ``per_sample``, which rows of a batch are one sample: ``"halves"``
            (batched classifier-free guidance: rows ``i`` and ``i + B/2`` are one prompt's two
            branches and share every decision), ``"none"`` (each row is a sample), ``"auto"``
            (``"halves"`` for the pairs whose image inputs are bit-identical in the call, as
            diffusers' ``torch.cat([latents] * 2)`` makes them; each row alone otherwise).

    Example:
        >>> XSlimConfig.from_preset("flux-fast").schedule.token_steps
        (11, 18, 36)
        >>> XSlimConfig(preset="flux-fast", token_ratio=0.6) == XSlimConfig.from_preset("flux-fast", token_ratio=0.6)
        True
    """

    mode: Literal["online", "schedule"] = "online"
    warn: float = 0.12
    crit: float = 0.35
    warmup_steps: int = 3
    last_step_full: bool = True
    step_indicator: StepIndicator = "modulated_input"
    lagged_indicator: bool | None = None
    rescale: str | tuple[float, ...] | None = None
    polish: Polish = "none"
    partial_reset: float = 0.0
    max_skips: int | None = None
    extrapolate: Literal["none", "linear"] = "linear"
    token_ratio: float = 0.5
    token_groups: int = 1
    block_thresh: float | tuple[float, ...] = 2.0
    block_thresh_scale: Literal["stack_mean", "absolute"] = "stack_mean"
    block_first_n: int = 1
    schedule: Schedule | None = None
    preset: str | None = None
    per_sample: bool = False
    guidance_pairs: GuidancePairs = "auto"

    def __post_init__(self) -> None:
        if self.preset is not None:
            if self.preset not in PRESETS:
                _fail("preset", f"one of {sorted(PRESETS)}", self.preset)
        if self.mode not in ("online", "schedule"):
            _fail("mode", "'online' or 'schedule'", self.mode)
        for name in ("warn", "crit", "partial_reset", "token_ratio"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                _fail(name, "a finite number", v)
        if not self.warn > 0:
            _fail("warn", "> 0", self.warn)
        if not self.crit > self.warn:
            _fail("crit", f"> warn ({self.warn})", self.crit)
        if not 0.0 <= self.partial_reset <= 1.0:
            _fail("partial_reset", "in [0, 1]", self.partial_reset)
        if not 0.0 < self.token_ratio <= 1.0:
            _fail("token_ratio", "in (0, 1]", self.token_ratio)
        for name, lo in (("warmup_steps", 1), ("token_groups", 1), ("block_first_n", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                _fail(name, f"an integer >= {lo}", v)
        if self.max_skips is not None and (
            isinstance(self.max_skips, bool) or not isinstance(self.max_skips, int) or self.max_skips < 1
        ):
            _fail("max_skips", "None or an integer >= 1", self.max_skips)
        if not isinstance(self.last_step_full, bool):
            _fail("last_step_full", "True or False", self.last_step_full)
        if self.step_indicator not in ("modulated_input", "first_block_residual"):
            _fail("step_indicator", "'modulated_input' or 'first_block_residual'", self.step_indicator)
        if self.polish not in ("token", "block", "auto", "none"):
            _fail("polish", "'token', 'block', 'auto' or 'none'", self.polish)
        if self.extrapolate not in ("none", "linear"):
            _fail("extrapolate", "'none' or 'linear'", self.extrapolate)
        if self.block_thresh_scale not in ("stack_mean", "absolute"):
            _fail("block_thresh_scale", "'stack_mean' or 'absolute'", self.block_thresh_scale)
        thresholds = self.block_thresh if isinstance(self.block_thresh, tuple) else (self.block_thresh,)
        if isinstance(self.block_thresh, list):
            thresholds = tuple(self.block_thresh)
            object.__setattr__(self, "block_thresh", thresholds)
        if not thresholds:
            _fail("block_thresh", "a number > 0 or a non-empty tuple of numbers > 0", self.block_thresh)
        for t in thresholds:
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
                _fail("block_thresh", "a number > 0 or a tuple of numbers > 0 (one per block stack)", t)
        if isinstance(self.rescale, str):
            if self.rescale not in RESCALE_POLYNOMIALS:
                _fail("rescale", f"None, coefficients, or one of {sorted(RESCALE_POLYNOMIALS)}", self.rescale)
        elif self.rescale is not None:
            rescale = self.rescale
            if hasattr(rescale, "tolist") and not isinstance(rescale, Sequence):
                rescale = rescale.tolist()  # a 1-D numpy array or tensor of coefficients
            if not isinstance(rescale, Sequence) or isinstance(rescale, (str, bytes, bytearray)):
                _fail(
                    "rescale",
                    f"None, one of {sorted(RESCALE_POLYNOMIALS)}, or a sequence of polynomial coefficients "
                    "(highest degree first, e.g. (1.0, 0.0) for the identity)",
                    self.rescale,
                )
            coeffs = tuple(rescale)
            if not coeffs or any(
                isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c) for c in coeffs
            ):
                _fail(
                    "rescale",
                    "None, a built-in name, or a non-empty sequence of finite numbers",
                    self.rescale,
                )
            object.__setattr__(self, "rescale", coeffs)
        if self.schedule is not None and not isinstance(self.schedule, Schedule):
            if isinstance(self.schedule, dict):
                object.__setattr__(self, "schedule", Schedule.from_dict(self.schedule))
            else:
                _fail("schedule", "a Schedule, a dict, or None", self.schedule)
        if self.mode == "schedule" and self.schedule is None:
            _fail("schedule", "set when mode='schedule' (or pass preset=...)", None)
        if not isinstance(self.per_sample, bool):
            _fail("per_sample", "True or False", self.per_sample)
        if self.lagged_indicator is not None and not isinstance(self.lagged_indicator, bool):
            _fail("lagged_indicator", "None, True or False", self.lagged_indicator)
        if self.per_sample and self.lagged_indicator:
            # per-sample rooms decide on each call's own rows (xslim_xdit/batch.py)
            _fail("lagged_indicator", "not True with per_sample=True", self.lagged_indicator)
        if self.guidance_pairs not in ("auto", "halves", "none"):
            _fail("guidance_pairs", "'auto', 'halves' or 'none'", self.guidance_pairs)
        if self.per_sample and "token" in self.levels:
            # Token refresh keeps one K/V cache per branch for the whole batch; a sub-batch of
            # samples cannot splice into it. In the whole-batch path each sample already picks its
            # own tokens.
            _fail(
                "per_sample",
                "False with token refresh (per_sample supports polish 'none' or 'block', or a "
                "schedule without token steps)",
                self.per_sample,
            )

    # ------------------------------------------------------------------ helpers
    @property
    def levels(self) -> tuple[str, ...]:
        """The reuse levels this config can use, among ``step``, ``block``, ``token``."""
        if self.mode == "schedule":
            schedule = self.schedule
            if not isinstance(schedule, Schedule):  # only if a built config was mutated by force
                _fail("schedule", "a Schedule when mode='schedule' (build the config again)", schedule)
            out = ["step"]
            if schedule.block_steps:
                out.append("block")
            if schedule.token_steps:
                out.append("token")
            return tuple(out)
        return {
            "none": ("step",),
            "block": ("step", "block"),
            "token": ("step", "token"),
            "auto": ("step", "block", "token"),
        }[self.polish]

    def rescale_coefficients(self) -> tuple[float, ...] | None:
        if isinstance(self.rescale, str):
            return RESCALE_POLYNOMIALS[self.rescale]
        return self.rescale  # type: ignore[return-value]

    def block_threshold(self, stack_index: int) -> float:
        t = self.block_thresh
        if isinstance(t, tuple):
            return float(t[min(stack_index, len(t) - 1)])
        return float(t)

    def replace(self, **changes: Any) -> XSlimConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> XSlimConfig:
        """Build a schedule-mode config from a published preset (rescaled at run time).

        ``overrides`` may change the fields a schedule run reads (``token_ratio``,
        ``block_thresh``, ...); the online controller's fields (``warn``, ``crit``, ``polish``,
        ...), another ``mode``, ``schedule`` or ``preset`` conflict with the preset and raise
        :class:`ConfigError`.

        Example:
            >>> XSlimConfig.from_preset("hunyuan_video-fast").token_ratio
            0.8
            >>> XSlimConfig.from_preset("flux-fast", warn=0.2)
            Traceback (most recent call last):
            ...
            xslim_xdit.schedule.ConfigError: warn must be left out with preset='flux-fast' (a preset runs its schedule and never reads warn, crit, warmup_steps, last_step_full, polish, partial_reset, max_skips, rescale, lagged_indicator; use mode='online' without a preset to set them); got 0.2
        """
        if not isinstance(name, str) or name not in PRESETS:
            _fail("preset", f"one of {sorted(PRESETS)}", name)
        if "preset" in overrides:
            _fail("preset", f"named once (from_preset({name!r}) already names it)", overrides["preset"])
        return cls(preset=name, **overrides)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Schedule):
                v = v.to_dict()
            elif isinstance(v, tuple):
                v = list(v)
            d[f.name] = v
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> XSlimConfig:
        """The config :meth:`to_dict` describes (the form ``to_json`` writes), validated.

        Example:
            >>> cfg = XSlimConfig(warn=0.1, crit=0.3, block_thresh=(1.5, 10.0))
            >>> XSlimConfig.from_dict(json.loads(cfg.to_json())) == cfg
            True
            >>> XSlimConfig.from_dict(None)
            Traceback (most recent call last):
            ...
            xslim_xdit.schedule.ConfigError: config must be a mapping of field names to values (e.g. json.loads(config.to_json())); got None
        """
        names = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(d, Mapping):
            _fail("config", "a mapping of field names to values (e.g. json.loads(config.to_json()))", d)
        unknown = set(d) - names
        if unknown:
            _fail("config", f"a mapping with keys among {sorted(names)}", sorted(unknown, key=str))
        kw = dict(d)
        if isinstance(kw.get("schedule"), dict):
            kw["schedule"] = Schedule.from_dict(kw["schedule"])
        for k in ("block_thresh", "rescale"):
            if isinstance(kw.get(k), list):
                kw[k] = tuple(kw[k])
        return cls(**kw)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


XSlimConfig.__init__ = preset_init(XSlimConfig, XSlimConfig.__init__)  # type: ignore[method-assign]
