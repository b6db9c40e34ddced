"""ControlNet quality on the trained digits FLUX testbed (issue 10, point 1).

The committed ControlNet (``benchmarks/checkpoints/digits_flux_controlnet``, trained by
``benchmarks/testbeds/train_flux_controlnet.py`` on the frozen ``digits_flux`` transformer, control
= the digit's 4x4 thumbnail) must change the images, towards the control, and X-Slim's PSNR
against the full computation with the ControlNet must stay within :data:`BOUND_DB` of its PSNR
without it at the same schedule (same FLOPs in the transformer). Bound and measurements:
``docs/testbeds.md`` (ControlNet section).
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.metrics import psnr_per_image
from benchmarks.testbeds.eval_flux_controlnet import eval_inputs, uniform_schedule
from benchmarks.testbeds.flux_controlnet import (
    DEFAULT_CONTROLNET_CHECKPOINT,
    DigitsFluxControlNetPipeline,
    control_signal,
)
from benchmarks.testbeds.flux_testbed import DigitsFluxPipeline
from xslim_xdit import XSlimConfig, disable_xslim, enable_xslim

N, STEPS = 4, 20
BOUND_DB = 1.5
"""Allowed shortfall of the mean PSNR with the ControlNet below the mean without it. Measured at
this setting (4 test digits per group, 20 steps, every 2nd step full) on 8 groups (test digits
4k..4k+3, noise seed k, k = 0..7): the mean difference with - without was -0.90 to +2.46 dB (mean
+0.29, sd 1.2 over groups); 1.5 dB is that mean minus about 1.5 sd and 0.6 dB below the worst
group. This test's group (k = 0) measured +1.19 dB."""

pytestmark = pytest.mark.skipif(
    not (DEFAULT_CONTROLNET_CHECKPOINT / "controlnet").exists(), reason="ControlNet checkpoint missing"
)


def _run(pipe, labels, controls, config=None):
    """One batched call (a schedule decides the same for any batch); X-Slim's FLOP fraction."""
    engine = enable_xslim(pipe, config) if config is not None else None
    out = pipe(
        labels,
        num_inference_steps=STEPS,
        generator=torch.Generator().manual_seed(0),
        progress=False,
        control=controls,
    )
    if engine is None:
        return out, 1.0
    fraction = engine.statistics.summary()["flops_fraction"]
    disable_xslim(pipe)
    return out, fraction


@pytest.fixture(scope="module")
def runs():
    torch.set_num_threads(1)
    pipe = DigitsFluxControlNetPipeline.from_checkpoint()
    labels, controls = eval_inputs(N)
    config = XSlimConfig(mode="schedule", schedule=uniform_schedule(STEPS, 2))
    out = {"controls": controls}
    out["full_plain"], _ = _run(pipe, labels, None)
    out["full_cn"], _ = _run(pipe, labels, controls)
    out["xslim_plain"], out["flops_plain"] = _run(pipe, labels, None, config)
    out["xslim_cn"], out["flops_cn"] = _run(pipe, labels, controls, config)
    return out


def test_the_control_changes_the_images_towards_it(runs):
    psnr = psnr_per_image(runs["full_cn"], runs["full_plain"])
    assert psnr.mean() < 25.0, psnr
    c = runs["controls"]
    with_cn = torch.mean((control_signal(runs["full_cn"] * 2 - 1) - c) ** 2)
    without = torch.mean((control_signal(runs["full_plain"] * 2 - 1) - c) ** 2)
    assert with_cn < 0.5 * without, (with_cn, without)


def test_xslim_with_controlnet_within_bound_of_without(runs):
    assert runs["flops_cn"] == runs["flops_plain"]  # the same schedule: the same transformer FLOPs
    p_plain = psnr_per_image(runs["xslim_plain"], runs["full_plain"])
    p_cn = psnr_per_image(runs["xslim_cn"], runs["full_cn"])
    assert p_cn.mean() >= p_plain.mean() - BOUND_DB, (p_cn, p_plain)


def test_checkpoint_is_small():
    total = sum(f.stat().st_size for f in DEFAULT_CONTROLNET_CHECKPOINT.rglob("*") if f.is_file())
    assert total < 2.2 * 2**20


def test_without_control_the_pipeline_is_the_plain_testbed():
    pipe = DigitsFluxControlNetPipeline.from_checkpoint()
    plain = DigitsFluxPipeline(
        transformer=pipe.transformer, scheduler=pipe.scheduler, text_encoder=pipe.text_encoder
    )
    kw = {"num_inference_steps": 3, "progress": False}
    a = pipe([1, 7], generator=torch.Generator().manual_seed(3), **kw)
    b = plain([1, 7], generator=torch.Generator().manual_seed(3), **kw)
    assert torch.equal(a, b)
