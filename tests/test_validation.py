"""Validation that cannot be bypassed (issue 10, point 9): every bad input below raises
:class:`~xslim_xdit.ConfigError` naming the field (or flag, or file key) and what is accepted,
before any model runs. Each case gave a ``TypeError``, ``AttributeError``, a bare
``ValueError`` or no error at all before."""

import argparse
import json

import pytest

from xslim_xdit import ConfigError, Schedule, XSlimConfig
from xslim_xdit.calibration import CalibrationResult

# ---------------------------------------------------------------- Schedule step lists


@pytest.mark.parametrize("key", ["full_steps", "block_steps", "token_steps"])
@pytest.mark.parametrize("bad", [None, 0, 3, "03", b"0", {0: 1}, 2.0])
def test_schedule_step_lists_must_be_lists(key, bad):
    """``None``, an int, a float or a mapping gave ``TypeError: ... is not iterable`` (a string
    was iterated character by character, a mapping by its keys)."""
    kwargs = {"num_steps": 10, "full_steps": (0,), key: bad}
    with pytest.raises(
        ConfigError, match=rf"^schedule\.{key} must be a list of integer step indices in \[0, 9\]"
    ):
        Schedule(**kwargs)


@pytest.mark.parametrize("bad", [None, [0, 3], "schedule", 4])
def test_schedule_from_dict_needs_a_mapping(bad):
    with pytest.raises(ConfigError, match=r"^schedule must be a mapping with keys num_steps, full_steps"):
        Schedule.from_dict(bad)


@pytest.mark.parametrize("missing", ["num_steps", "full_steps"])
def test_schedule_from_dict_names_a_missing_key(missing):
    d = {"num_steps": 4, "full_steps": [0, 3]}
    del d[missing]
    with pytest.raises(ConfigError, match=rf"^schedule\.{missing} must be given"):
        Schedule.from_dict(d)


def test_a_bad_schedule_inside_a_config_names_the_schedule_field():
    with pytest.raises(ConfigError, match=r"^schedule\.full_steps must be a list"):
        XSlimConfig(mode="schedule", schedule={"num_steps": 4, "full_steps": 0})


def test_repeated_steps_are_listed_in_the_message():
    """The repeat check was quadratic (``out.count(s)`` per step: 49 s for this list on the
    shared CPU); it is one pass with a set now. No wall-clock assertion: the message must list
    the repeated steps."""
    steps = list(range(39_999)) + [1234]
    with pytest.raises(
        ConfigError, match=r"^schedule\.full_steps must be a list without repeated steps; repeated: 1234$"
    ):
        Schedule(num_steps=40_000, full_steps=steps)
    with pytest.raises(ConfigError, match=r"repeated: 2, 5$"):
        Schedule(num_steps=10, full_steps=(0,), token_steps=[5, 2, 5, 2, 2])


def test_step_lists_still_accept_any_iterable_of_ints():
    s = Schedule(num_steps=6, full_steps=range(0, 6, 5), block_steps=[2], token_steps={3, 1})
    assert (s.full_steps, s.block_steps, s.token_steps) == ((0, 5), (2,), (1, 3))
    assert Schedule.from_dict(s.to_dict()) == s


# ---------------------------------------------------------------- XSlimConfig fields


@pytest.mark.parametrize("bad", [5, 5.0, True, b"ab", {1.0, 2.0}, {"a": 1}])
def test_rescale_must_be_a_name_or_a_coefficient_sequence(bad):
    """``rescale=5`` gave ``TypeError: 'int' object is not iterable``; bytes and sets were read
    as coefficients."""
    with pytest.raises(
        ConfigError,
        match=r"^rescale must be None, one of \[[^]]*'flux', 'hunyuan_video'[^]]*\], or a sequence",
    ):
        XSlimConfig(rescale=bad)


def test_rescale_still_accepts_names_and_coefficients():
    assert XSlimConfig(rescale=[1.0, 0.0]).rescale == (1.0, 0.0)
    assert XSlimConfig(rescale="flux").rescale == "flux"


@pytest.mark.parametrize("bad", [None, 3, "warn=0.1", [("warn", 0.1)]])
def test_from_dict_needs_a_mapping(bad):
    """``from_dict(None)`` gave ``TypeError: 'NoneType' object is not iterable``."""
    with pytest.raises(ConfigError, match=r"^config must be a mapping of field names to values"):
        XSlimConfig.from_dict(bad)


def test_from_dict_lists_unknown_keys_of_mixed_types():
    with pytest.raises(ConfigError, match=r"^config must be a mapping with keys among .*got \[1, 'wran'\]"):
        XSlimConfig.from_dict({1: 2, "wran": 0.3})


@pytest.mark.parametrize(
    "build",
    [
        lambda: XSlimConfig(wran=0.1),
        lambda: XSlimConfig().replace(wran=0.1),
        lambda: XSlimConfig.from_preset("flux-fast", token_ration=0.5),
    ],
)
def test_an_unknown_field_name_is_a_config_error(build):
    """A misspelt field gave ``TypeError: ... got an unexpected keyword argument``."""
    with pytest.raises(
        ConfigError,
        match=r"^config must be built from fields among \['block_first_n'.*got \['(wran|token_ration)'\]",
    ):
        build()


# ---------------------------------------------------------------- presets and their overrides


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"mode": "online"}, "mode"),
        ({"warn": 0.2}, "warn"),
        ({"crit": 0.5}, "crit"),
        ({"warmup_steps": 5}, "warmup_steps"),
        ({"polish": "token"}, "polish"),
        ({"partial_reset": 1.0}, "partial_reset"),
        ({"max_skips": 2}, "max_skips"),
        ({"rescale": "flux"}, "rescale"),
        ({"last_step_full": False}, "last_step_full"),
        ({"schedule": Schedule(4, (0, 3))}, "schedule"),
        ({"preset": "flux-slow"}, "preset"),
    ],
)
def test_from_preset_refuses_conflicting_overrides(overrides, field):
    """Only ``mode`` was refused; the online fields were accepted and never read, another
    ``schedule`` replaced the preset's, ``preset=`` twice gave ``TypeError``."""
    with pytest.raises(ConfigError, match=rf"^{field} must be"):
        XSlimConfig.from_preset("flux-fast", **overrides)
    if field != "preset":
        with pytest.raises(ConfigError, match=rf"^{field} must be"):
            XSlimConfig(preset="flux-fast", **overrides)


@pytest.mark.parametrize("bad", [None, "flux-medium", 3])
def test_from_preset_needs_a_preset_name(bad):
    """``from_preset(None)`` built an online config."""
    with pytest.raises(ConfigError, match=r"^preset must be one of \['flux-fast'"):
        XSlimConfig.from_preset(bad)


def test_preset_configs_still_take_schedule_fields_and_round_trip():
    cfg = XSlimConfig.from_preset("flux-fast", token_ratio=0.5, block_thresh=(1.0, 4.0))
    assert cfg.mode == "schedule" and cfg.token_ratio == 0.5 and cfg.block_thresh == (1.0, 4.0)
    assert cfg == XSlimConfig(preset="flux-fast", token_ratio=0.5, block_thresh=(1.0, 4.0))
    # every field is explicit in the JSON form: defaults and the preset's own schedule are no conflict
    assert XSlimConfig.from_dict(json.loads(cfg.to_json())) == cfg
    assert cfg.replace(token_ratio=0.6).token_ratio == 0.6
    with pytest.raises(ConfigError, match=r"^warn must be left out with preset='flux-fast'"):
        cfg.replace(warn=0.2)


# ---------------------------------------------------------------- calibration files

SCHEDULE = {"num_steps": 4, "full_steps": [0, 3], "token_steps": [1]}


def _result(**kw):
    base = dict(
        schedule=Schedule(num_steps=4, full_steps=(0, 3), token_steps=(1,)),
        warn=None,
        crit=None,
        polish="none",
        token_ratio=0.5,
        block_thresh=2.0,
        indicator="residual_change",
        estimated_fraction=0.5,
        strategy="optimal",
    )
    return CalibrationResult(**{**base, **kw})


def test_per_stack_block_thresh_round_trips(tmp_path):
    """``block_thresh`` as a per-stack tuple was written as a list and read back with
    ``float(list)``: ``TypeError``."""
    path = tmp_path / "c.json"
    r = _result(block_thresh=(1.5, 10.0))
    r.save(path)
    again = CalibrationResult.load(path)
    assert again == r and again.block_thresh == (1.5, 10.0)
    assert again.config().block_thresh == (1.5, 10.0)
    assert _result(block_thresh=[1.5, 10.0]).block_thresh == (1.5, 10.0)


def _write(tmp_path, obj):
    path = tmp_path / "c.json"
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return path


@pytest.mark.parametrize(
    "content, key",
    [
        ("{not json", "not JSON"),
        ([1, 2], "the file must hold a JSON object"),
        ({"thresholds": {}}, r"missing keys \['schedule'\]"),
        ({"schedule": SCHEDULE}, r"missing keys \['thresholds'\]"),
        ({"schedule": SCHEDULE, "thresholds": {}, "bogus": 1}, r"unknown keys \['bogus'\]"),
        ({"schedule": None, "thresholds": {}}, "schedule must be a mapping"),
        ({"schedule": {"num_steps": 4, "full_steps": 0}, "thresholds": {}}, r"schedule\.full_steps must be"),
        ({"schedule": SCHEDULE, "thresholds": None}, "thresholds must be an object"),
        ({"schedule": SCHEDULE, "thresholds": [1]}, "thresholds must be an object"),
        ({"schedule": SCHEDULE, "thresholds": {"wran": 1}}, r"thresholds has unknown keys \['wran'\]"),
        (
            {"schedule": SCHEDULE, "thresholds": {"warn": "a", "crit": 1}},
            r"thresholds\.warn must be null or a number",
        ),
        (
            {"schedule": SCHEDULE, "thresholds": {"warn": 0.1}},
            r"thresholds\.warn and thresholds\.crit must be both",
        ),
        ({"schedule": SCHEDULE, "thresholds": {"warn": 0.5, "crit": 0.1}}, r"crit must be > warn"),
        (
            {"schedule": SCHEDULE, "thresholds": {"block_thresh": "x"}},
            r"thresholds\.block_thresh must be a number or",
        ),
        (
            {"schedule": SCHEDULE, "thresholds": {"block_thresh": []}},
            r"thresholds\.block_thresh must be a number or",
        ),
        (
            {"schedule": SCHEDULE, "thresholds": {"block_thresh": [1, None]}},
            r"thresholds\.block_thresh must be",
        ),
        (
            {"schedule": SCHEDULE, "thresholds": {"block_thresh": [1, -2]}},
            r"block_thresh must be a number > 0",
        ),
        ({"schedule": SCHEDULE, "thresholds": {}, "token_ratio": None}, "token_ratio must be a number"),
        ({"schedule": SCHEDULE, "thresholds": {}, "token_ratio": "x"}, "token_ratio must be a number"),
        ({"schedule": SCHEDULE, "thresholds": {}, "num_runs": "x"}, r"num_runs must be an integer >= 1"),
        ({"schedule": SCHEDULE, "thresholds": {}, "num_runs": 1.5}, r"num_runs must be an integer >= 1"),
        ({"schedule": SCHEDULE, "thresholds": {}, "profile": 3}, "profile must be a list"),
        ({"schedule": SCHEDULE, "thresholds": {}, "candidates": 3}, "candidates must be a list"),
        ({"schedule": SCHEDULE, "thresholds": {}, "polish": "bogus"}, "polish must be one of"),
        ({"schedule": SCHEDULE, "thresholds": {}, "strategy": 3}, "strategy must be one of"),
        ({"schedule": SCHEDULE, "thresholds": {}, "indicator": 3}, "indicator must be a string"),
        ({"schedule": SCHEDULE, "thresholds": {}, "extrapolate": 3}, "extrapolate must be one of"),
        (
            {"schedule": SCHEDULE, "thresholds": {}, "estimated_flops_fraction": "x"},
            "estimated_flops_fraction must",
        ),
    ],
)
def test_malformed_calibration_files_name_the_key(tmp_path, content, key):
    path = _write(tmp_path, content)
    with pytest.raises(ConfigError, match=rf"^calibration file {path}: .*{key}"):
        CalibrationResult.load(path)


# ---------------------------------------------------------------- the xDiT command line


def _parse(argv):
    from xslim_xdit.integrations.cli import add_xslim_args, config_from_args

    return config_from_args(add_xslim_args(argparse.ArgumentParser()).parse_args(argv))


ONLINE_FLAGS = [
    ("--xslim-warn", "0.1"),
    ("--xslim-crit", "0.5"),
    ("--xslim-warmup", "2"),
    ("--xslim-polish", "token"),
    ("--xslim-rescale", "flux"),
    ("--xslim-lagged-indicator", "on"),
]


@pytest.mark.parametrize("flag, value", ONLINE_FLAGS)
def test_preset_with_an_online_flag_is_an_error(flag, value):
    """Every ``--xslim-*`` tuning flag was silently dropped beside ``--xslim-preset``."""
    with pytest.raises(ConfigError, match=rf"^--xslim-preset and {flag} cannot be combined"):
        _parse(["--xslim", "--xslim-preset", "flux-fast", flag, value])
    # the underscore spelling (xDiT's FlexibleArgumentParser rewrites dashes) is the same flag
    with pytest.raises(ConfigError, match=rf"^--xslim-preset and {flag} cannot be combined"):
        _parse(["--xslim", "--xslim_preset", "flux-fast", flag.replace("-", "_").replace("__", "--"), value])


@pytest.mark.parametrize("flag, value", ONLINE_FLAGS)
def test_schedule_file_with_an_online_flag_is_an_error(tmp_path, flag, value):
    path = tmp_path / "c.json"
    _result().save(path)
    with pytest.raises(ConfigError, match=rf"^--xslim-schedule and {flag} cannot be combined"):
        _parse(["--xslim", "--xslim-schedule", str(path), flag, value])


def test_preset_and_schedule_file_exclude_each_other(tmp_path):
    path = tmp_path / "c.json"
    _result().save(path)
    with pytest.raises(ConfigError, match=r"^--xslim-preset and --xslim-schedule cannot be combined"):
        _parse(["--xslim", "--xslim-preset", "flux-fast", "--xslim-schedule", str(path)])


@pytest.mark.parametrize(
    "argv", [["--xslim-preset", "flux-fast"], ["--xslim-warn", "0.1"], ["--xslim-schedule", "x.json"]]
)
def test_xslim_flags_without_xslim_are_an_error(argv):
    with pytest.raises(ConfigError, match=rf"^{argv[0]} is given without --xslim"):
        _parse(argv)


def test_schedule_fields_override_the_preset_and_the_file(tmp_path):
    """``--xslim-token-ratio`` / ``--xslim-block-thresh`` apply to a preset as
    ``from_preset(name, token_ratio=...)`` does (they were dropped before)."""
    cfg = _parse(
        ["--xslim", "--xslim-preset", "flux-fast", "--xslim-token-ratio", "0.5", "--xslim-block-thresh", "3"]
    )
    assert cfg == XSlimConfig.from_preset("flux-fast", token_ratio=0.5, block_thresh=3.0)
    path = tmp_path / "c.json"
    _result().save(path)
    assert (
        _parse(["--xslim", "--xslim-schedule", str(path), "--xslim-token-ratio", "0.25"]).token_ratio == 0.25
    )


def test_cli_defaults_are_the_config_defaults():
    assert _parse([]) is None
    assert _parse(["--xslim"]) == XSlimConfig()
    assert _parse(["--xslim", "--xslim-warn", "0.05", "--xslim-polish", "block"]) == XSlimConfig(
        warn=0.05, polish="block"
    )
    assert _parse(["--xslim", "--xslim-preset", "flux-fast"]) == XSlimConfig.from_preset("flux-fast")


def test_xfuser_module_re_exports_the_cli():
    """The flags live in ``integrations.cli`` (plain argparse, imported here); ``integrations.xfuser``
    keeps the names (checked in a fresh interpreter, as the suite keeps xfuser modules out of
    this process; its ``__test__`` doctests run in tests/test_doctests_in_subprocess.py)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))
    )
    code = (
        "from xslim_xdit.integrations import cli, xfuser\n"
        "assert xfuser.add_xslim_args is cli.add_xslim_args\n"
        "assert xfuser.config_from_args is cli.config_from_args\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr[-3000:]


# ---------------------------------------------------------------- enable_xslim and calibrate arguments


@pytest.fixture(scope="module")
def tiny_dit():
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        sample_size=8,
        num_embeds_ada_norm=10,
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_inference_steps": 0}, r"^num_inference_steps must be None or an integer >= 1"),
        ({"num_inference_steps": "10"}, r"^num_inference_steps must be None or an integer >= 1"),
        ({"num_inference_steps": 10, "sync": "x"}, r"^sync must be None or a DecisionSync"),
        ({"num_inference_steps": 10, "observers": 5}, r"^observers must be a list of EngineObserver"),
    ],
)
def test_enable_xslim_checks_its_arguments_before_patching(tiny_dit, kwargs, message):
    """``observers=5`` gave ``TypeError``, ``sync='x'`` was accepted (and failed at the first
    step), ``num_inference_steps`` gave a plain ``ValueError`` from inside the engine."""
    from xslim_xdit import enable_xslim, get_engine

    with pytest.raises(ConfigError, match=message):
        enable_xslim(tiny_dit, XSlimConfig(), **kwargs)
    assert get_engine(tiny_dit) is None


@pytest.mark.parametrize(
    "run, kwargs, message",
    [
        (5, {}, r"^run must be a callable or a non-empty sequence of callables"),
        (None, {"warn_fraction": "x"}, r"^warn_fraction must be in \(0, 1\)"),
        (None, {"num_inference_steps": "10"}, r"^num_inference_steps must be None or an integer >= 1"),
        (None, {"num_inference_steps": 0}, r"^num_inference_steps must be None or an integer >= 1"),
    ],
)
def test_calibrate_checks_its_arguments_before_running(tiny_dit, run, kwargs, message):
    """``run=5`` and ``warn_fraction='x'`` gave ``TypeError``; ``num_inference_steps=0`` gave
    ``ZeroDivisionError``."""
    from xslim_xdit.calibration import calibrate

    calls = []
    with pytest.raises(ConfigError, match=message):
        calibrate(tiny_dit, run if run is not None else (lambda: calls.append(1)), **kwargs)
    assert calls == []


def _calibration(argv):
    from xslim_xdit.integrations.cli import add_xslim_args, calibration_from_args

    return calibration_from_args(add_xslim_args(argparse.ArgumentParser()).parse_args(argv))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--xslim-calibrate", "2"], r"^--xslim-calibrate is given without --xslim"),
        (["--xslim", "--xslim-calibrate", "0"], r"^--xslim-calibrate must be an integer >= 1"),
        (
            ["--xslim", "--xslim-target-speedup", "2"],
            r"^--xslim-target-speedup is given without --xslim-calibrate",
        ),
        (["--xslim", "--xslim-save", "c.json"], r"^--xslim-save is given without --xslim-calibrate"),
        (
            ["--xslim", "--xslim-calibrate", "2", "--xslim-target-speedup", "1"],
            r"^--xslim-target-speedup must be > 1",
        ),
        (
            ["--xslim", "--xslim-calibrate", "2", "--xslim-preset", "flux-fast"],
            r"^--xslim-calibrate and --xslim-preset",
        ),
        (
            ["--xslim", "--xslim-calibrate", "2", "--xslim-warn", "0.1"],
            r"^--xslim-calibrate and --xslim-warn",
        ),
    ],
)
def test_calibration_flags_are_refused_where_they_mean_nothing(argv, message):
    with pytest.raises(ConfigError, match=message):
        _calibration(argv)
    with pytest.raises(ConfigError, match=message):  # config_from_args checks them first
        _parse(argv)


def test_calibration_flags_read_back():
    req = _calibration(
        ["--xslim", "--xslim_calibrate", "3", "--xslim-target-speedup", "2.5", "--xslim-save", "f.json"]
    )
    assert (req.runs, req.target_speedup, req.save) == (3, 2.5, "f.json")
    assert _calibration(["--xslim"]) is None
    # the config then holds only the overrides of the calibrated schedule
    assert _parse(["--xslim", "--xslim-calibrate", "2", "--xslim-token-ratio", "0.25"]) == XSlimConfig(
        token_ratio=0.25
    )
