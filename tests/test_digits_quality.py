"""X-Slim on the trained digits DiT (benchmarks/checkpoints/digits_dit): the default setting
computes at most half the transformer FLOPs and beats the equal-cost baseline (half the steps)."""

from __future__ import annotations

import pytest
import torch

from benchmarks.metrics import psnr
from benchmarks.testbeds.digits import DigitsDiTPipeline
from xslim_xdit import XSlimConfig, XSlimPipelineWrapper

LABELS = [i % 10 for i in range(20)]


@pytest.fixture(scope="module")
def pipe():
    return DigitsDiTPipeline.from_checkpoint()


def _run(p, steps: int = 50):
    return p(LABELS, num_inference_steps=steps, generator=torch.Generator().manual_seed(0), progress=False)


@pytest.fixture(scope="module")
def reference(pipe):
    return {"full": _run(pipe), "half_steps": _run(pipe, 25), "third_steps": _run(pipe, 17)}


def test_default_setting_halves_flops_and_beats_half_the_steps(pipe, reference):
    wrapped = XSlimPipelineWrapper(pipe, XSlimConfig())
    out = _run(wrapped)
    stats = wrapped.get_cache_statistics().summary()
    wrapped.disable_xslim()
    assert stats["flops_fraction"] <= 0.5
    baseline = psnr(reference["half_steps"], reference["full"])  # measured 30.1 dB on these samples
    got = psnr(out, reference["full"])  # measured 31.2 dB (0.42 of the FLOPs)
    # The bound: a cache must beat spending the same compute on fewer steps (30 dB here).
    assert got > baseline, (got, baseline)
    assert torch.equal(_run(pipe), reference["full"])  # disabled again: the plain pipeline


def test_linear_extrapolation_improves_skips(pipe, reference):
    psnrs = {}
    for mode in ("none", "linear"):
        wrapped = XSlimPipelineWrapper(pipe, XSlimConfig(extrapolate=mode))
        psnrs[mode] = psnr(_run(wrapped), reference["full"])
        kinds = wrapped.get_cache_statistics().summary()["kinds"]
        wrapped.disable_xslim()
        assert kinds.count("skip") > 20
    assert psnrs["linear"] > psnrs["none"] + 1.0, psnrs  # measured about +3 dB at the same cost


def test_optimal_calibration_beats_fewer_steps_by_3db_at_3x(pipe, reference):
    from xslim_xdit.calibration import calibrate

    # calibrated on one sample that is not evaluated (its own class and seed)
    result = calibrate(
        pipe,
        lambda: pipe(
            [3], num_inference_steps=50, generator=torch.Generator().manual_seed(987), progress=False
        ),
        target_speedup=3.0,
    )
    assert len(result.schedule.full_steps) == 16  # 0.32 of the steps, fewer than 17 steps' 0.34
    wrapped = XSlimPipelineWrapper(pipe, result.config())
    out = _run(wrapped)
    kinds = wrapped.get_cache_statistics().summary()["kinds"]
    wrapped.disable_xslim()
    assert [i for i, k in enumerate(kinds) if k == "full"] == list(result.schedule.full_steps)
    baseline = psnr(reference["third_steps"], reference["full"])  # measured 24.9 dB
    got = psnr(out, reference["full"])  # measured 30.0 dB
    assert got > baseline + 3.0, (got, baseline)


def test_optimal_calibration_on_four_samples_beats_fewer_steps_at_5x(pipe, reference):
    from xslim_xdit.calibration import calibrate

    # four calibration samples of their own classes and seeds, none of them evaluated
    runs = [
        lambda d=d, s=s: pipe(
            [d], num_inference_steps=50, generator=torch.Generator().manual_seed(s), progress=False
        )
        for d, s in ((0, 987), (3, 988), (6, 989), (9, 990))
    ]
    result = calibrate(pipe, runs, target_speedup=5.0)
    assert result.num_runs == 4 and len(result.schedule.full_steps) == 10  # 10 steps' cost
    errors = [c["closed_loop_error"] for c in result.candidates]
    assert len(errors) >= 4 and result.candidates[errors.index(min(errors))]["full_steps"] == list(
        result.schedule.full_steps
    )
    wrapped = XSlimPipelineWrapper(pipe, result.config())
    out = _run(wrapped)
    wrapped.disable_xslim()
    baseline = psnr(_run(pipe, 10), reference["full"])  # measured 21.1 dB on these samples
    got = psnr(out, reference["full"])  # measured 24.2 dB
    assert got > baseline + 1.5, (got, baseline)
