"""Calibration under xDiT: the same calibration on one device, on 2 Ulysses ranks (xfuser's FLUX
wrapper) and on 2 PipeFusion stages (xfuser's ``xFuserFluxPipeline``); each rank returns its
result's JSON text (importable by spawned children)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from xslim_xdit.calibration import calibrate
from xslim_xdit.testing import sample, tiny_model

SEEDS = (0, 1)
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
