"""The public API on a real diffusers pipeline, statistics export, calibration round trips, and
the import boundary (no xfuser unless asked for)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from benchmarks.testbeds.digits import DigitsDiTPipeline
from xslim_xdit import ConfigError, XSlimConfig, XSlimPipelineWrapper, disable_xslim, enable_xslim, get_engine
from xslim_xdit.calibration import CalibrationResult, calibrate
from xslim_xdit.testing import sample, tiny_model

LABELS = [3, 7, 1, 9]


@pytest.fixture(scope="module")
def pipe():
    return DigitsDiTPipeline.from_checkpoint()


def _run(p, steps=12, seed=0):
    return p(LABELS, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed), progress=False)


def test_import_does_not_import_xfuser():
    code = "import sys, xslim_xdit, xslim_xdit.calibration; assert 'xfuser' not in sys.modules, 'xfuser imported'"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).returncode == 0


def test_state_resets_between_pipeline_calls(pipe):
    wrapped = XSlimPipelineWrapper(pipe, XSlimConfig(warmup_steps=2))
    first = _run(wrapped)
    log1 = wrapped.get_cache_statistics().decision_log()
    second = _run(wrapped)
    log2 = wrapped.get_cache_statistics().decision_log()
    third = _run(wrapped, steps=8)  # another step count: the scheduler tells the engine
    stats = wrapped.get_cache_statistics()
    wrapped.disable_xslim()
    assert torch.equal(first, second) and log1 == log2
    assert len(stats.decision_log()) == 8 and stats.last_run == 2
    assert third.shape == first.shape
    assert "skip" in [k for k, _, _ in log1]
    assert get_engine(pipe) is None
    assert "set_timesteps" not in vars(pipe.scheduler)  # the scheduler hook is gone too


def test_statistics_table_and_json(pipe, tmp_path):
    engine = enable_xslim(pipe, XSlimConfig(polish="token", warn=0.05, crit=0.2, warmup_steps=2))
    _run(pipe)
    disable_xslim(pipe)
    stats = engine.statistics
    table = stats.table()
    assert len(table.splitlines()) == 14  # header, 12 steps, summary line
    assert "FLOPs computed" in table and "cache" in table
    path = tmp_path / "stats.json"
    stats.to_json(path)
    data = json.loads(path.read_text())
    s = data["summary"]
    assert s["steps"] == 12 and s["full"] + s["skip"] + s["token"] + s["block"] == 12
    assert len(s["indicators"]) == 12 and s["indicators"][0] is None
    assert s["cache_bytes"]["kv"] > 0 and s["cache_bytes"]["block_residuals"] == 0
    assert 0 < s["flops_fraction"] < 1 and len(data["records"]) == 12


def test_enabling_twice_replaces_the_engine(pipe):
    e1 = enable_xslim(pipe, XSlimConfig())
    e2 = enable_xslim(pipe, XSlimConfig(polish="block"))
    assert get_engine(pipe) is e2 and e1 is not e2 and not e1.attached
    disable_xslim(pipe)
    ref = _run(pipe)
    assert torch.equal(ref, _run(pipe))


def test_bad_arguments_fail_before_anything_is_patched(pipe):
    with pytest.raises(TypeError, match="config must be an XSlimConfig"):
        enable_xslim(pipe, {"warn": 0.1})
    with pytest.raises(TypeError, match="pipe_or_transformer"):
        enable_xslim(object(), XSlimConfig())
    with pytest.raises(ValueError, match="num_inference_steps"):
        enable_xslim(tiny_model("dit"), XSlimConfig(), num_inference_steps=0)
    assert get_engine(pipe) is None


@pytest.mark.parametrize("strategy", ["optimal", "threshold"])
def test_calibration_round_trip(tmp_path, strategy):
    m = tiny_model("flux")
    result = calibrate(
        m, lambda: sample(m, "flux", steps=20), num_inference_steps=20, target_speedup=2.5, strategy=strategy
    )
    assert result.strategy == strategy
    assert result.schedule.num_steps == 20
    assert result.estimated_fraction <= 1 / 2.5 + 1e-9
    assert len(result.profile) == 20 and result.profile[0]["residual_change"] is None
    assert all(
        p["block_magnitudes"] is not None and len(p["block_magnitudes"]) == 5 for p in result.profile[:-1]
    )
    path = tmp_path / "calib.json"
    result.save(path)
    again = CalibrationResult.load(path)
    assert again.schedule == result.schedule and again.crit == result.crit
    if strategy == "threshold":
        assert again.online_config().crit == result.crit
    else:
        with pytest.raises(ConfigError, match="no thresholds"):
            again.online_config()
    assert again.config() == result.config()
    # the schedule replays exactly
    eng = enable_xslim(m, again.config(), num_inference_steps=20)
    sample(m, "flux", steps=20)
    disable_xslim(m)
    kinds = eng.statistics.summary()["kinds"]
    assert [i for i, k in enumerate(kinds) if k == "full"] == list(result.schedule.full_steps)
    # a hand edit that breaks the schedule is refused when loaded, naming the field
    data = json.loads(path.read_text())
    data["schedule"]["token_steps"] = [data["schedule"]["full_steps"][0]]
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="schedule.token_steps"):
        CalibrationResult.load(path)


def test_calibration_rejects_bad_targets():
    m = tiny_model("dit")
    with pytest.raises(ConfigError, match="target_speedup"):
        calibrate(m, lambda: None, num_inference_steps=4, target_speedup=0.5)
    with pytest.raises(ConfigError, match="token_ratio"):
        calibrate(m, lambda: None, num_inference_steps=4, token_ratio=2.0)
