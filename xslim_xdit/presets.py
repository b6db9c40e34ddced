"""The presets the model families publish, and how ``XSlimConfig(preset=name, ...)`` builds one.

Each family declares its presets and its TeaCache rescale polynomial in its adapter module; the
tables here gather them at each access (:data:`PRESETS`, :data:`RESCALE_POLYNOMIALS`), so importing
this module imports no model code. :func:`preset_init` wraps :class:`~xslim_xdit.config.XSlimConfig`'s
generated ``__init__`` so that a preset's fields are filled in before the dataclass validates them.

Example:
    >>> from xslim_xdit.config import XSlimConfig
    >>> XSlimConfig(preset="flux-fast").mode
    'schedule'
    >>> "flux-fast" in PRESETS
    True
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from .schedule import Schedule, _fail

__all__ = ["PRESETS", "RESCALE_POLYNOMIALS", "preset_init"]


class _FamilyTable(Mapping[str, Any]):
    """A read-only table gathered from the registered model families at each access, so that
    importing this module imports no model code and a family registered later is listed too."""

    def __init__(self, gather: str) -> None:
        self._gather = gather  # the name of the gathering function in xslim_xdit.adapters.base

    def _table(self) -> Mapping[str, Any]:
        from .adapters import base

        return getattr(base, self._gather)()

    def __getitem__(self, key: str) -> Any:
        return self._table()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._table())

    def __len__(self) -> int:
        return len(self._table())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({dict(self._table())!r})"


#: X-Slim's published schedules, by name: the config fields each sets. Each family declares its
#: own in its adapter module (``presets``); this is the union, read-only.
PRESETS: Mapping[str, Mapping[str, Any]] = _FamilyTable("family_presets")
#: TeaCache's rescale polynomials (highest degree first, as numpy.polyval takes them), by family
#: name; each family declares its own in its adapter module (``rescale_polynomial``).
RESCALE_POLYNOMIALS: Mapping[str, tuple[float, ...]] = _FamilyTable("rescale_polynomials")


#: the online controller's fields: a schedule run (a preset) never reads them
_ONLINE_ONLY = (
    "warn",
    "crit",
    "warmup_steps",
    "last_step_full",
    "polish",
    "partial_reset",
    "max_skips",
    "rescale",
    "lagged_indicator",
)


def _same(value: Any, default: Any) -> bool:
    """``value == default`` for a field value of any type (False where it cannot be compared)."""
    if isinstance(value, bool) or isinstance(default, bool) or value is None or default is None:
        return value is default
    try:
        return bool(value == default)
    except Exception:
        return False


def preset_init(cls: type, generated_init: Callable[..., None]) -> Callable[..., None]:
    """Wrap the dataclass's ``__init__`` so that ``XSlimConfig(preset=name, **fields)`` builds the
    preset with ``fields`` overriding it. Done before the generated ``__init__`` runs because only
    there is it known which fields were passed: a field equal to its default may be an override."""
    field_names = [f.name for f in dataclasses.fields(cls)]
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}

    @functools.wraps(generated_init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        explicit = dict(zip(field_names, args, strict=False))
        if len(args) > len(field_names) or explicit.keys() & kwargs.keys():
            return generated_init(self, *args, **kwargs)  # let the dataclass refuse the call
        unknown = sorted(kwargs.keys() - set(field_names))
        if unknown:
            _fail("config", f"built from fields among {sorted(field_names)}", unknown)
        explicit.update(kwargs)
        name = explicit.get("preset")
        if name is None:
            return generated_init(self, **explicit)
        if not isinstance(name, str) or name not in PRESETS:
            _fail("preset", f"None or one of {sorted(PRESETS)}", name)
        if explicit.get("mode", "schedule") != "schedule":
            _fail("mode", f"'schedule' (or left out) with preset={name!r}", explicit["mode"])
        preset = PRESETS[name]
        for key in _ONLINE_ONLY:
            if key in explicit and not _same(explicit[key], defaults[key]):
                _fail(
                    key,
                    f"left out with preset={name!r} (a preset runs its schedule and never reads "
                    f"{', '.join(_ONLINE_ONLY)}; use mode='online' without a preset to set them)",
                    explicit[key],
                )
        if explicit.get("schedule") is not None:
            given = explicit["schedule"]
            if isinstance(given, Mapping):
                given = Schedule.from_dict(given)
            if given != preset.get("schedule"):
                _fail(
                    "schedule",
                    f"left out with preset={name!r} (the preset is a schedule; pass preset=None "
                    "with mode='schedule' to follow your own)",
                    explicit["schedule"],
                )
            explicit["schedule"] = given
        else:
            explicit.pop("schedule", None)
        return generated_init(self, **{**preset, "mode": "schedule", **explicit})

    return __init__
