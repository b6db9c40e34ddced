"""The ``--xslim-*`` command-line flags of the xDiT examples, and the config they describe.

Plain :mod:`argparse`: importing this module imports neither xfuser nor anything that patches
it, so the flags can be added to (and tested on) any parser. :mod:`xslim_xdit.integrations.xfuser`
re-exports both functions.

A flag is "given" when it is on the command line: the tuning flags default to ``None`` here and
:func:`config_from_args` fills in :class:`~xslim_xdit.XSlimConfig`'s defaults, so a preset or a
schedule file combined with a flag it would ignore is refused instead of silently dropping it.

Example:
    >>> import argparse
    >>> p = add_xslim_args(argparse.ArgumentParser())
    >>> config_from_args(p.parse_args(["--xslim", "--xslim-warn", "0.1", "--xslim-crit", "0.3"])).crit
    0.3
    >>> config_from_args(p.parse_args(["--xslim", "--xslim-preset", "flux-fast", "--xslim-warn", "0.1"]))
    Traceback (most recent call last):
    ...
    xslim_xdit.schedule.ConfigError: --xslim-preset and --xslim-warn cannot be combined: --xslim-preset runs a fixed schedule and never reads --xslim-warn, --xslim-crit, --xslim-warmup, --xslim-polish, --xslim-rescale, --xslim-lagged-indicator; drop --xslim-warn, or drop --xslim-preset to run the online controller
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from ..config import _ONLINE_ONLY, PRESETS, ConfigError, XSlimConfig

__all__ = ["CalibrationRequest", "add_xslim_args", "calibration_from_args", "config_from_args"]

#: (argparse dest, flag, XSlimConfig field) of the tuning flags (default None: "not given")
_TUNING = (
    ("xslim_warn", "--xslim-warn", "warn"),
    ("xslim_crit", "--xslim-crit", "crit"),
    ("xslim_warmup", "--xslim-warmup", "warmup_steps"),
    ("xslim_polish", "--xslim-polish", "polish"),
    ("xslim_token_ratio", "--xslim-token-ratio", "token_ratio"),
    ("xslim_block_thresh", "--xslim-block-thresh", "block_thresh"),
    ("xslim_rescale", "--xslim-rescale", "rescale"),
    ("xslim_lagged_indicator", "--xslim-lagged-indicator", "lagged_indicator"),
)


def _on_off(value: str) -> bool:
    """``on`` / ``off`` as a bool (``--xslim-lagged-indicator``)."""
    if value not in ("on", "off"):
        raise argparse.ArgumentTypeError(f"expected on or off; got {value!r}")
    return value == "on"


def add_xslim_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``--xslim-*`` flags to an xDiT (``xFuserArgs``) argument parser.

    Each flag is registered with dashes and with underscores (``--xslim-warn`` and
    ``--xslim_warn``): xDiT's ``FlexibleArgumentParser`` rewrites every dash in an option name
    to an underscore before parsing, so dash-only flags would be rejected by it.

    Example:
        >>> p = add_xslim_args(argparse.ArgumentParser())
        >>> config_from_args(p.parse_args(["--xslim", "--xslim-preset", "flux-fast"])).preset
        'flux-fast'
    """
    d = XSlimConfig()
    g = parser.add_argument_group("X-Slim caching")
    g.add_argument("--xslim", action="store_true", help="enable X-Slim caching")
    g.add_argument(
        "--xslim-preset",
        "--xslim_preset",
        choices=sorted(PRESETS),
        default=None,
        help="a published schedule (combines with --xslim-token-ratio and --xslim-block-thresh only)",
    )
    g.add_argument(
        "--xslim-warn",
        "--xslim_warn",
        type=float,
        default=None,
        help=f"early-warning threshold (default {d.warn})",
    )
    g.add_argument(
        "--xslim-crit",
        "--xslim_crit",
        type=float,
        default=None,
        help=f"critical threshold (default {d.crit})",
    )
    g.add_argument(
        "--xslim-warmup",
        "--xslim_warmup",
        type=int,
        default=None,
        help=f"full warm-up steps (default {d.warmup_steps})",
    )
    g.add_argument(
        "--xslim-polish",
        "--xslim_polish",
        choices=["token", "block", "auto", "none"],
        default=None,
        help=f"polish level (default {d.polish})",
    )
    g.add_argument(
        "--xslim-token-ratio",
        "--xslim_token_ratio",
        type=float,
        default=None,
        help=f"tokens refreshed (default {d.token_ratio}, or the preset's)",
    )
    g.add_argument(
        "--xslim-block-thresh",
        "--xslim_block_thresh",
        type=float,
        default=None,
        help=f"block walk threshold (default {d.block_thresh}, or the preset's)",
    )
    g.add_argument(
        "--xslim-rescale", "--xslim_rescale", default=None, help="indicator polynomial: flux, hunyuan_video"
    )
    g.add_argument(
        "--xslim-lagged-indicator",
        "--xslim_lagged_indicator",
        type=_on_off,
        default=None,
        metavar="{on,off}",
        help="decide each step on the previous step's indicator (default: on under PipeFusion with "
        "patches, off elsewhere; pass on to reproduce such a run on one device)",
    )
    g.add_argument(
        "--xslim-schedule", "--xslim_schedule", default=None, help="a calibration JSON file to follow"
    )
    g.add_argument(
        "--xslim-timeout",
        "--xslim_timeout",
        type=float,
        default=None,
        help="seconds an X-Slim collective (or, during a run, any wait on other ranks) may take before "
        "the rank gives up and the job ends; every process is gone within this + 15 s (default 300)",
    )
    g.add_argument(
        "--xslim-calibrate",
        "--xslim_calibrate",
        type=int,
        default=None,
        metavar="N",
        help="calibrate a schedule on N seeded runs (seeds --seed .. --seed+N-1), then generate with it",
    )
    g.add_argument(
        "--xslim-target-speedup",
        "--xslim_target_speedup",
        type=float,
        default=None,
        help="with --xslim-calibrate: the FLOP speedup the schedule reaches (> 1; default 2.0)",
    )
    g.add_argument(
        "--xslim-save",
        "--xslim_save",
        default=None,
        metavar="PATH",
        help="with --xslim-calibrate: write the calibration JSON here (global rank 0 writes it)",
    )
    return parser


@dataclass(frozen=True)
class CalibrationRequest:
    """What ``--xslim-calibrate N --xslim-target-speedup S --xslim-save PATH`` ask for."""

    runs: int
    target_speedup: float = 2.0
    save: str | None = None


def calibration_from_args(args: argparse.Namespace) -> CalibrationRequest | None:
    """The calibration the flags ask for (None without ``--xslim-calibrate``).

    ``--xslim-calibrate`` needs ``--xslim`` and excludes ``--xslim-preset`` and
    ``--xslim-schedule`` (the calibrated schedule is the one followed) and the online controller's
    flags; ``--xslim-target-speedup`` and ``--xslim-save`` need ``--xslim-calibrate``. Errors
    are :class:`~xslim_xdit.ConfigError` naming the flag and its accepted range.

    Example:
        >>> p = add_xslim_args(argparse.ArgumentParser())
        >>> calibration_from_args(p.parse_args(["--xslim", "--xslim-calibrate", "2", "--xslim-save", "f.json"]))
        CalibrationRequest(runs=2, target_speedup=2.0, save='f.json')
        >>> calibration_from_args(p.parse_args(["--xslim", "--xslim-calibrate", "0"]))
        Traceback (most recent call last):
        ...
        xslim_xdit.schedule.ConfigError: --xslim-calibrate must be an integer >= 1 (calibration runs); got 0
    """
    runs = getattr(args, "xslim_calibrate", None)
    speed = getattr(args, "xslim_target_speedup", None)
    save = getattr(args, "xslim_save", None)
    if runs is None:
        for flag, value in (("--xslim-target-speedup", speed), ("--xslim-save", save)):
            if value is not None:
                raise ConfigError(f"{flag} is given without --xslim-calibrate N: add it, or drop {flag}")
        return None
    if not getattr(args, "xslim", False):
        raise ConfigError(
            "--xslim-calibrate is given without --xslim: add --xslim to enable X-Slim caching, or drop "
            "--xslim-calibrate"
        )
    if isinstance(runs, bool) or not isinstance(runs, int) or runs < 1:
        raise ConfigError(f"--xslim-calibrate must be an integer >= 1 (calibration runs); got {runs!r}")
    for flag, dest in (("--xslim-preset", "xslim_preset"), ("--xslim-schedule", "xslim_schedule")):
        if getattr(args, dest, None):
            raise ConfigError(
                f"--xslim-calibrate and {flag} cannot be combined: the calibrated schedule is the one "
                f"followed; drop {flag}"
            )
    for dest, flag, field in _TUNING:
        if field in _ONLINE_ONLY and getattr(args, dest, None) is not None:
            raise ConfigError(
                f"--xslim-calibrate and {flag} cannot be combined: the calibrated schedule never reads "
                f"it; drop {flag}"
            )
    target = 2.0 if speed is None else float(speed)
    if not target > 1.0:
        raise ConfigError(f"--xslim-target-speedup must be > 1; got {target!r}")
    return CalibrationRequest(runs=runs, target_speedup=target, save=save)


def timeout_from_args(args: argparse.Namespace) -> float:
    """``--xslim-timeout`` in seconds, for ``enable_xslim_xdit(..., timeout_s=...)``.

    Example:
        >>> timeout_from_args(add_xslim_args(argparse.ArgumentParser()).parse_args(["--xslim-timeout", "30"]))
        30.0
        >>> timeout_from_args(add_xslim_args(argparse.ArgumentParser()).parse_args(["--xslim-timeout", "0"]))
        Traceback (most recent call last):
        ...
        xslim_xdit.schedule.ConfigError: --xslim-timeout must be a number of seconds > 0; got 0.0
    """
    given = getattr(args, "xslim_timeout", None)
    value = 300.0 if given is None else float(given)
    if not value > 0:
        raise ConfigError(f"--xslim-timeout must be a number of seconds > 0; got {value!r}")
    return value


def config_from_args(args: argparse.Namespace) -> XSlimConfig | None:
    """The :class:`XSlimConfig` the ``--xslim-*`` flags describe (None without ``--xslim``).

    ``--xslim-preset`` and ``--xslim-schedule`` exclude each other and the online controller's
    flags (``--xslim-warn``, ``--xslim-crit``, ``--xslim-warmup``, ``--xslim-polish``,
    ``--xslim-rescale``, ``--xslim-lagged-indicator``); ``--xslim-token-ratio`` and ``--xslim-block-thresh`` override the
    preset's or the file's values. Any ``--xslim-*`` flag without ``--xslim`` is refused too.
    With ``--xslim-calibrate`` (:func:`calibration_from_args`) the config holds only
    ``--xslim-token-ratio`` and ``--xslim-block-thresh``: the overrides of the schedule the
    calibration finds (``CalibrationResult.config(**overrides)``).
    Conflicts raise :class:`~xslim_xdit.ConfigError` naming both flags.

    Example:
        >>> p = add_xslim_args(argparse.ArgumentParser())
        >>> config_from_args(p.parse_args(["--xslim", "--xslim-preset", "flux-fast", "--xslim-token-ratio", "0.5"])).token_ratio
        0.5
        >>> config_from_args(p.parse_args(["--xslim-preset", "flux-fast"]))
        Traceback (most recent call last):
        ...
        xslim_xdit.schedule.ConfigError: --xslim-preset is given without --xslim: add --xslim to enable X-Slim caching, or drop --xslim-preset
    """
    preset = getattr(args, "xslim_preset", None)
    schedule = getattr(args, "xslim_schedule", None)
    request = calibration_from_args(args)  # its conflicts first: they name the calibration flags
    given = [
        (flag, field, getattr(args, dest))
        for dest, flag, field in _TUNING
        if getattr(args, dest, None) is not None
    ]
    if not getattr(args, "xslim", False):
        flags = (["--xslim-preset"] if preset else []) + (["--xslim-schedule"] if schedule else [])
        flags += [flag for flag, _, _ in given]
        flags += ["--xslim-timeout"] if getattr(args, "xslim_timeout", None) is not None else []
        if flags:
            raise ConfigError(
                f"{flags[0]} is given without --xslim: add --xslim to enable X-Slim caching, or drop {flags[0]}"
            )
        return None
    if preset and schedule:
        raise ConfigError(
            "--xslim-preset and --xslim-schedule cannot be combined: both name the schedule to follow; keep one"
        )
    if request is not None:
        # the overrides of the schedule the calibration will find (CalibrationResult.config)
        return XSlimConfig(**{field: value for _, field, value in given})
    if not (preset or schedule):
        return XSlimConfig(**{field: value for _, field, value in given})  # XSlimConfig fills the rest
    source = "--xslim-preset" if preset else "--xslim-schedule"
    online_flags = [flag for _, flag, field in _TUNING if field in _ONLINE_ONLY]
    for flag, field, _ in given:
        if field in _ONLINE_ONLY:
            raise ConfigError(
                f"{source} and {flag} cannot be combined: {source} runs a fixed schedule and never reads "
                f"{', '.join(online_flags)}; drop {flag}, or drop {source} to run the online controller"
            )
    overrides: dict[str, Any] = {field: value for _, field, value in given}
    if preset:
        return XSlimConfig.from_preset(preset, **overrides)
    from ..calibration import CalibrationResult

    return CalibrationResult.load(schedule).config(**overrides)
