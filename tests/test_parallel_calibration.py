"""Calibration under xDiT (CPU, gloo, 2 ranks): the profile's partial sums are reduced exactly
over the ranks, every rank picks the same plan, and the JSON equals the single device's (the
same plan; numbers within round-off). Ulysses 2 through xfuser's FLUX wrapper, PipeFusion 2
through ``xFuserFluxPipeline`` (synchronous phase; the asynchronous phase is refused)."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from _dist import run_ranks

pytestmark = pytest.mark.multiproc

#: the profile's numbers: the ranks add float64 partial sums in another order than one device
#: (and PipeFusion adds the stages' residual pieces, one device subtracts once): round-off only
PROFILE_REL = 1e-6
#: the closed-loop errors compare replayed outputs, which xfuser's sharded attention computes in
#: another order (~1e-6 absolute on latents of ~1, errors of ~1e-2): not the profile's round-off
ERROR_REL = 1e-2


def _numbers(v: Any) -> list[float]:
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return []
    if isinstance(v, (int, float)):
        return [float(v)]
    if isinstance(v, list):
        return [x for item in v for x in _numbers(item)]
    if isinstance(v, dict):
        return [x for item in v.values() for x in _numbers(item)]
    return []


def _close(a: Any, b: Any, rel: float, scale: float, where: str) -> None:
    """Equal structure; equal strings, ints, None; floats within ``rel`` of ``scale`` (the
    largest magnitude of the field: a Gram matrix's small off-diagonal products are round-off
    of its large ones)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            _close(a[k], b[k], rel, scale, f"{where}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _close(x, y, rel, scale, f"{where}[{i}]")
    elif isinstance(a, float) and not math.isinf(a):
        assert isinstance(b, (int, float)) and abs(a - b) <= rel * max(scale, 1e-300), (where, a, b)
    else:
        assert a == b, (where, a, b)


def assert_same_calibration(single: str, parallel: str) -> None:
    """The plan is identical; the profile within :data:`PROFILE_REL`, the closed-loop errors
    within :data:`ERROR_REL`, each relative to the largest value of its field."""
    a, b = json.loads(single), json.loads(parallel)
    assert a.keys() == b.keys()
    assert a["schedule"] == b["schedule"]  # the plan
    assert [c["full_steps"] for c in a["candidates"]] == [c["full_steps"] for c in b["candidates"]]
    for key in a:
        if key == "profile":
            assert len(a["profile"]) == len(b["profile"])
            for field in a["profile"][0]:
                scale = max([abs(x) for row in a["profile"] for x in _numbers(row.get(field))] or [0.0])
                for i, (ra, rb) in enumerate(zip(a["profile"], b["profile"], strict=True)):
                    _close(ra[field], rb[field], PROFILE_REL, scale, f"profile[{i}].{field}")
        elif key == "candidates":
            for ca, cb in zip(a["candidates"], b["candidates"], strict=True):
                for field in ca:
                    scale = max([abs(x) for x in _numbers(ca[field])] or [0.0])
                    _close(ca[field], cb[field], ERROR_REL, scale, f"candidates.{field}")
        else:
            _close(a[key], b[key], PROFILE_REL, max([abs(x) for x in _numbers(a[key])] or [0.0]), key)


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
