"""Every bad config value fails at construction, naming the field and its accepted range."""

import json

import pytest

from xslim_xdit import PRESETS, ConfigError, Schedule, XSlimConfig
from xslim_xdit.adapters import registered_adapters

#: the package's presets (PRESETS also lists those of families registered by test files)
PACKAGE_PRESETS = sorted(
    p for a in registered_adapters() if a.__module__.startswith("xslim_xdit.") for p in a.presets
)


@pytest.mark.parametrize(
    "kwargs, field, accepted",
    [
        ({"warn": -0.1}, "warn", "> 0"),
        ({"warn": 0.0}, "warn", "> 0"),
        ({"warn": 0.3, "crit": 0.2}, "crit", "> warn"),
        ({"warn": 0.3, "crit": 0.3}, "crit", "> warn"),
        ({"crit": float("nan")}, "crit", "finite"),
        ({"token_ratio": 0.0}, "token_ratio", "(0, 1]"),
        ({"token_ratio": 1.5}, "token_ratio", "(0, 1]"),
        ({"token_ratio": -0.2}, "token_ratio", "(0, 1]"),
        ({"partial_reset": 1.2}, "partial_reset", "[0, 1]"),
        ({"warmup_steps": 0}, "warmup_steps", ">= 1"),
        ({"warmup_steps": 2.5}, "warmup_steps", "integer"),
        ({"token_groups": 0}, "token_groups", ">= 1"),
        ({"block_first_n": -1}, "block_first_n", ">= 0"),
        ({"block_thresh": 0}, "block_thresh", "> 0"),
        ({"block_thresh": (1.0, -2.0)}, "block_thresh", "> 0"),
        ({"max_skips": 0}, "max_skips", ">= 1"),
        ({"polish": "tokens"}, "polish", "'token'"),
        ({"step_indicator": "probe"}, "step_indicator", "modulated_input"),
        ({"mode": "offline"}, "mode", "'online'"),
        ({"mode": "schedule"}, "schedule", "mode='schedule'"),
        ({"preset": "flux-turbo"}, "preset", "flux-fast"),
        ({"rescale": "sdxl"}, "rescale", "flux"),
        ({"rescale": ()}, "rescale", "non-empty"),
        ({"block_thresh_scale": "relative"}, "block_thresh_scale", "stack_mean"),
    ],
)
def test_bad_config_values_name_the_field(kwargs, field, accepted):
    with pytest.raises(ConfigError) as err:
        XSlimConfig(**kwargs)
    msg = str(err.value)
    assert msg.startswith(field), msg
    assert accepted in msg, msg


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"num_steps": 10, "full_steps": (0, 10)}, "schedule.full_steps"),
        ({"num_steps": 10, "full_steps": (0, -1)}, "schedule.full_steps"),
        ({"num_steps": 10, "full_steps": (0, 3, 3)}, "schedule.full_steps"),
        ({"num_steps": 10, "full_steps": (0,), "token_steps": (4, 4)}, "schedule.token_steps"),
        ({"num_steps": 10, "full_steps": (0, 4), "token_steps": (4,)}, "schedule.token_steps"),
        (
            {"num_steps": 10, "full_steps": (0,), "block_steps": (2,), "token_steps": (2,)},
            "schedule.token_steps",
        ),
        ({"num_steps": 10, "full_steps": (1, 2)}, "schedule.full_steps"),
        ({"num_steps": 0, "full_steps": (0,)}, "schedule.num_steps"),
        ({"num_steps": 10, "full_steps": (0, 2.0)}, "schedule.full_steps"),
    ],
)
def test_bad_schedules(kwargs, field):
    with pytest.raises(ConfigError) as err:
        Schedule(**kwargs)
    assert str(err.value).startswith(field)


def test_presets_match_the_published_tables():
    flux_slow = XSlimConfig.from_preset("flux-slow")
    assert flux_slow.mode == "schedule"
    assert flux_slow.schedule.full_steps == (0, 1, 2, 3, 4, 6, 18, 23, 30, 44, 47, 49)
    assert flux_slow.schedule.block_steps == (9, 36)
    assert flux_slow.schedule.token_steps == (13, 41)
    assert flux_slow.token_ratio == 0.5 and flux_slow.block_thresh == (1.5, 10.0)
    hy_fast = XSlimConfig.from_preset("hunyuan_video-fast")
    assert hy_fast.schedule.full_steps == (0, 1, 2, 3, 4, 8, 12, 27, 39, 44, 48, 49)
    assert hy_fast.token_ratio == 0.8
    published = {"flux-slow", "flux-fast", "hunyuan_video-slow", "hunyuan_video-fast"}
    assert set(PACKAGE_PRESETS) == published and published <= set(PRESETS)  # test files may add some


@pytest.mark.parametrize("name", PACKAGE_PRESETS)
@pytest.mark.parametrize("steps", [1, 2, 7, 20, 28, 50, 100])
def test_rescaled_presets_stay_valid(name, steps):
    s = XSlimConfig.from_preset(name).schedule.rescaled(steps)
    assert s.num_steps == steps
    assert 0 in s.full_steps and steps - 1 in s.full_steps
    listed = s.full_steps + s.block_steps + s.token_steps
    assert len(listed) == len(set(listed))
    assert all(0 <= i < steps for i in listed)
    if steps == 50:
        assert s == XSlimConfig.from_preset(name).schedule


def test_config_json_round_trip():
    cfg = XSlimConfig(warn=0.05, crit=0.2, polish="auto", block_thresh=(1.5, 3.0), rescale="flux")
    again = XSlimConfig.from_dict(json.loads(cfg.to_json()))
    assert again == cfg
    sched = XSlimConfig.from_preset("flux-fast")
    assert XSlimConfig.from_dict(json.loads(sched.to_json())) == sched


def test_unknown_config_keys_rejected():
    with pytest.raises(ConfigError, match="config"):
        XSlimConfig.from_dict({"warn": 0.1, "crit": 0.2, "wran": 0.3})


def test_levels_follow_the_config():
    assert XSlimConfig(polish="none").levels == ("step",)
    assert XSlimConfig(polish="block").levels == ("step", "block")
    assert XSlimConfig(polish="auto").levels == ("step", "block", "token")
    assert XSlimConfig.from_preset("flux-fast").levels == ("step", "token")


def test_preset_passed_to_the_constructor_builds_the_preset():
    """XSlimConfig(preset=...) once built an online config that only carried the preset's name."""
    built = XSlimConfig(preset="flux-fast")
    assert built == XSlimConfig.from_preset("flux-fast")
    assert built.mode == "schedule" and built.schedule.token_steps == (11, 18, 36)
    # fields passed beside the preset override it, even when equal to the dataclass default
    assert XSlimConfig(preset="flux-fast", token_ratio=0.5).token_ratio == 0.5
    assert XSlimConfig(preset="flux-fast", token_ratio=0.5) == XSlimConfig.from_preset(
        "flux-fast", token_ratio=0.5
    )
    with pytest.raises(ConfigError, match="^mode must be 'schedule'"):
        XSlimConfig(preset="flux-fast", mode="online")
    with pytest.raises(ConfigError, match="^preset must be"):
        XSlimConfig(preset="flux-medium")
    with pytest.raises(TypeError):  # the dataclass still refuses a field passed twice
        XSlimConfig("schedule", mode="schedule", preset="flux-fast")
