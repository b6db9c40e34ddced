"""Calibration under xDiT (CPU, gloo, 2 ranks): the profile's partial sums are reduced exactly
over the ranks, every rank picks the same plan, and the JSON equals the single device's (the
same plan; numbers within round-off). Ulysses 2 through xfuser's FLUX wrapper, PipeFusion 2
through ``xFuserFluxPipeline`` (synchronous phase; the asynchronous phase is refused)."""

from __future__ import annotations

import json

import pytest
from _cal_workers import assert_same_calibration
from _dist import run_ranks

pytestmark = pytest.mark.multiproc


def test_ulysses2_calibration_equals_single_device(tmp_path):
    import _cal_workers as w

    ref = w.single_device_flux()
    path = tmp_path / "cal.json"
    ranks = run_ranks(w.ulysses, 2, tmp_path, str(path), timeout=300)
    assert ranks[0]["json"] == ranks[1]["json"]  # the same bytes on every rank
    assert len(json.loads(ref)["candidates"]) > 1  # the closed-loop check chose among plans
    assert w.read(str(path)) == ranks[0]["json"]  # rank 0 wrote it
    assert_same_calibration(ref, ranks[0]["json"])


def test_pipefusion2_sync_calibration_equals_single_device(tmp_path):
    import _cal_workers as w
    from _pp_workers import STEPS

    ref = w.single_device_pipeline()
    stages = run_ranks(w.pipefusion, 2, tmp_path, STEPS, 1, timeout=300)  # warm-up = every step
    assert stages[0]["json"] == stages[1]["json"]
    assert len(json.loads(ref)["candidates"]) > 1
    assert_same_calibration(ref, stages[0]["json"])
