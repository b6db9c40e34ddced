"""Calibration under xDiT: the same calibration on one device, on 2 Ulysses ranks (xfuser's FLUX
wrapper) and on 2 PipeFusion stages (xfuser's ``xFuserFluxPipeline``); each rank returns its
result's JSON text (importable by spawned children)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from xslim_xdit.calibration import calibrate
from xslim_xdit.testing import sample, tiny_model

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


#: one seeded run per calibration (the reductions do not depend on the number of runs; the
#: example test calibrates on 2 through the command line)
SEEDS = (0,)
TARGET = 2.0


def _flux_runs(model: torch.nn.Module, steps: int, hw: int) -> list:
    return [(lambda s=s: sample(model, "flux", steps=steps, seed=s, height=hw, width=hw)) for s in SEEDS]


def single_device_flux() -> str:
    from _xdit_workers import HW, STEPS

    m = tiny_model("flux")
    res = calibrate(m, _flux_runs(m, STEPS, HW), num_inference_steps=STEPS, target_speedup=TARGET)
    return json.dumps(res.to_dict())


def ulysses(rank: int, world: int, save: str) -> dict[str, Any]:
    from _xdit_workers import HW, STEPS, _xfuser_tiny_flux

    from xslim_xdit.integrations.xfuser import calibrate_xdit

    dist.init_process_group("gloo")
    try:
        xmodel = _xfuser_tiny_flux(world, 1)
        res = calibrate_xdit(
            xmodel, _flux_runs(xmodel, STEPS, HW), num_inference_steps=STEPS, target_speedup=TARGET
        )
        if rank == 0:  # one rank writes the file
            res.save(save)
        return {"json": json.dumps(res.to_dict())}
    finally:
        dist.destroy_process_group()


def _pp_runs(pipe: Any) -> list:
    from _pp_workers import _call

    return [(lambda s=s: pipe(generator=torch.Generator().manual_seed(s), **_call())) for s in SEEDS]


def single_device_pipeline() -> str:
    from _pp_workers import STEPS

    from xslim_xdit.testing.pipelines import tiny_flux_embeds_pipeline

    pipe = tiny_flux_embeds_pipeline()
    with torch.no_grad():
        res = calibrate(pipe, _pp_runs(pipe), target_speedup=TARGET)
    assert res.schedule.num_steps == STEPS
    return json.dumps(res.to_dict())


def pipefusion(rank: int, world: int, warmup_steps: int, patches: int) -> dict[str, Any]:
    from xslim_xdit.integrations.xfuser_compat import apply_xfuser_cpu_compat

    apply_xfuser_cpu_compat()  # before xfuser is imported
    from _pp_workers import HEIGHT, STEPS, TXT, WIDTH
    from xfuser import xFuserFluxPipeline

    from xslim_xdit.integrations.xfuser import calibrate_xdit
    from xslim_xdit.testing.pipelines import tiny_flux_embeds_pipeline
    from xslim_xdit.testing.xfuser import xfuser_engine_config

    dist.init_process_group("gloo")
    try:
        engine_config, _ = xfuser_engine_config(
            torch.float32,
            height=HEIGHT,
            width=WIDTH,
            num_inference_steps=STEPS,
            max_sequence_length=TXT,
            pipefusion_parallel_degree=world,
            num_pipeline_patch=patches,
            warmup_steps=warmup_steps,
        )
        xpipe = xFuserFluxPipeline(tiny_flux_embeds_pipeline(), engine_config)
        try:
            with torch.no_grad():
                res = calibrate_xdit(xpipe, _pp_runs(xpipe), target_speedup=TARGET, timeout_s=60)
        except NotImplementedError as e:
            return {"error": str(e)}
        return {"json": json.dumps(res.to_dict())}
    finally:
        dist.destroy_process_group()


def read(path: str) -> str:
    return json.dumps(json.loads(Path(path).read_text()))
