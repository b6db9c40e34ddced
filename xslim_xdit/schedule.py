"""Hand-written X-Slim schedules (which steps run in full, with block or token refresh), and the
error every invalid configuration value raises.

Example:
    >>> from xslim_xdit.schedule import Schedule
    >>> Schedule(num_steps=4, full_steps=(0, 3), token_steps=(1,)).kind_of(2)
    'skip'
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any


class ConfigError(ValueError):
    """A configuration value is outside its accepted range. The message names the field."""


def _fail(field_name: str, accepted: str, got: Any) -> None:
    raise ConfigError(f"{field_name} must be {accepted}; got {got!r}")


def _check_steps(name: str, steps: Any, num_steps: int) -> tuple[int, ...]:
    """``steps`` as a sorted tuple, or :class:`ConfigError` naming ``name``. Linear in the number
    of steps (repeats are found with a set)."""
    accepted = f"a list of integer step indices in [0, {num_steps - 1}]"
    if (
        steps is None
        or isinstance(steps, (str, bytes, bytearray, Mapping))
        or not isinstance(steps, Iterable)
    ):
        _fail(name, accepted + " (use [] for none)", steps)
    out = []
    seen: set[int] = set()
    repeated: set[int] = set()
    for s in steps:
        if isinstance(s, bool) or not isinstance(s, int):
            _fail(name, accepted, s)
        if not 0 <= s < num_steps:
            _fail(name, f"a list of step indices in [0, {num_steps - 1}] (num_steps={num_steps})", s)
        if s in seen:
            repeated.add(s)
        seen.add(s)
        out.append(s)
    if repeated:
        raise ConfigError(
            f"{name} must be a list without repeated steps; repeated: {', '.join(map(str, sorted(repeated)))}"
        )
    return tuple(sorted(out))


@dataclass(frozen=True)
class Schedule:
    """A static X-Slim schedule: which steps run in full, with block refresh, or with token refresh.

    Every step not listed is skipped (the cached stack residual is applied). Indices are for a run
    of ``num_steps`` steps; :meth:`rescaled` maps them to another step count.

    Example:
        >>> s = Schedule(num_steps=10, full_steps=(0, 1, 5, 9), token_steps=(3, 7))
        >>> s.kind_of(3), s.kind_of(4)
        ('token', 'skip')
    """

    num_steps: int
    full_steps: tuple[int, ...]
    block_steps: tuple[int, ...] = ()
    token_steps: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.num_steps, bool) or not isinstance(self.num_steps, int) or self.num_steps < 1:
            _fail("schedule.num_steps", "an integer >= 1", self.num_steps)
        n = self.num_steps
        full = _check_steps("schedule.full_steps", self.full_steps, n)
        block = _check_steps("schedule.block_steps", self.block_steps, n)
        token = _check_steps("schedule.token_steps", self.token_steps, n)
        for a_name, a, b_name, b in (
            ("full_steps", full, "block_steps", block),
            ("full_steps", full, "token_steps", token),
            ("block_steps", block, "token_steps", token),
        ):
            both = sorted(set(a) & set(b))
            if both:
                _fail(f"schedule.{b_name}", f"disjoint from schedule.{a_name}", both)
        if 0 not in full:
            _fail(
                "schedule.full_steps", "a list that contains step 0 (the first step must run in full)", full
            )
        object.__setattr__(self, "full_steps", full)
        object.__setattr__(self, "block_steps", block)
        object.__setattr__(self, "token_steps", token)

    def kind_of(self, step: int) -> str:
        """``'full'``, ``'block'``, ``'token'`` or ``'skip'`` for a step index."""
        if step in self.full_steps:
            return "full"
        if step in self.block_steps:
            return "block"
        if step in self.token_steps:
            return "token"
        return "skip"

    def rescaled(self, num_steps: int) -> Schedule:
        """Map the schedule to ``num_steps`` steps, keeping first and last step and the priority
        full > block > token where two indices land on the same step.

        Example:
            >>> Schedule(50, (0, 1, 2, 3, 49), token_steps=(25,)).rescaled(25).full_steps
            (0, 1, 24)
        """
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
            _fail("num_steps", "an integer >= 1", num_steps)
        if num_steps == self.num_steps:
            return self

        def mapped(steps: Sequence[int]) -> set[int]:
            if self.num_steps == 1:
                return {0 for _ in steps}
            scale = (num_steps - 1) / (self.num_steps - 1)
            return {min(num_steps - 1, int(math.floor(s * scale + 0.5))) for s in steps}

        full = mapped(self.full_steps)
        block = mapped(self.block_steps) - full
        token = mapped(self.token_steps) - full - block
        return Schedule(num_steps, tuple(sorted(full)), tuple(sorted(block)), tuple(sorted(token)))

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready form (lists of step indices).

        Example:
            >>> Schedule(4, (0, 3), token_steps=(1,)).to_dict()
            {'num_steps': 4, 'full_steps': [0, 3], 'block_steps': [], 'token_steps': [1]}
        """
        return {
            "num_steps": self.num_steps,
            "full_steps": list(self.full_steps),
            "block_steps": list(self.block_steps),
            "token_steps": list(self.token_steps),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Schedule:
        """The schedule :meth:`to_dict` describes, validated; anything but a mapping with those keys
        (``num_steps`` and ``full_steps`` required) raises :class:`ConfigError`.

        Example:
            >>> Schedule.from_dict({"num_steps": 4, "full_steps": [0, 3]}).kind_of(3)
            'full'
            >>> Schedule.from_dict(None)
            Traceback (most recent call last):
            ...
            xslim_xdit.schedule.ConfigError: schedule must be a mapping with keys num_steps, full_steps, block_steps, token_steps; got None
        """
        keys = ("num_steps", "full_steps", "block_steps", "token_steps")
        if not isinstance(d, Mapping):
            _fail("schedule", "a mapping with keys " + ", ".join(keys), d)
        unknown = set(d) - set(keys)
        if unknown:
            _fail("schedule", "a mapping with keys " + ", ".join(keys), sorted(unknown, key=str))
        missing = [k for k in ("num_steps", "full_steps") if k not in d]
        if missing:
            _fail(f"schedule.{missing[0]}", "given (a mapping with num_steps and full_steps at least)", None)
        return cls(
            num_steps=d["num_steps"],
            full_steps=d["full_steps"],
            block_steps=d.get("block_steps", ()),
            token_steps=d.get("token_steps", ()),
        )
