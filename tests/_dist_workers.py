"""Rank functions for the multi-process tests (importable by spawned children)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from xslim_xdit import XSlimConfig, disable_xslim, enable_xslim
from xslim_xdit.parallel import GroupSync, LocalSync
from xslim_xdit.testing import make_inputs, tiny_model

STEPS = 10
CFG_CONFIG = dict(warn=0.15, crit=0.3, polish="auto", warmup_steps=2, token_ratio=0.5)
TIMESTEPS = [int(999 * (1 - i / STEPS)) for i in range(STEPS)]


def _guided_step(x, e_cond, e_uncond, scale=4.0):
    return x - (1.0 / STEPS) * (e_uncond + scale * (e_cond - e_uncond))


def single_device_cfg(label: int, reduce_config: dict) -> dict:
    """Reference: both guidance branches batched in one forward on one device."""
    torch.manual_seed(0)
    m = tiny_model("dit")
    eng = enable_xslim(m, XSlimConfig(**reduce_config), num_inference_steps=STEPS)
    x, _ = make_inputs("dit", batch=1, seed=1)
    with torch.no_grad():
        for t in TIMESTEPS:
            out = m(
                torch.cat([x, x]), timestep=torch.tensor([t, t]), class_labels=torch.tensor([label, 10])
            ).sample
            x = _guided_step(x, out[:1], out[1:])
    log = eng.statistics.decision_log()
    disable_xslim(m)
    return {"log": log, "x": x}


def cfg_parallel(rank: int, world: int, label: int, reduced: bool) -> dict:
    """CFG parallel: rank 0 runs the conditional branch, rank 1 the unconditional one."""
    dist.init_process_group("gloo")
    try:
        m = tiny_model("dit")
        sync = GroupSync(dist.group.WORLD, timeout_s=60) if reduced else LocalSync()
        eng = enable_xslim(m, XSlimConfig(**CFG_CONFIG), num_inference_steps=STEPS, sync=sync)
        x, _ = make_inputs("dit", batch=1, seed=1)
        my_label = label if rank == 0 else 10
        with torch.no_grad():
            for t in TIMESTEPS:
                out = m(x, timestep=torch.tensor([t]), class_labels=torch.tensor([my_label])).sample
                both = [torch.empty_like(out) for _ in range(world)]
                dist.all_gather(both, out)
                x = _guided_step(x, both[0], both[1])
        res = {"log": eng.statistics.decision_log(), "x": x, "collectives": sync.collectives}
        disable_xslim(m)
        return res
    finally:
        dist.destroy_process_group()


def data_parallel(rank: int, world: int) -> dict:
    """Data parallel: each replica its own prompt and its own single-rank decision group."""
    dist.init_process_group("gloo")
    try:
        groups = [dist.new_group([r]) for r in range(world)]
        m = tiny_model("dit")
        sync = GroupSync(groups[rank], timeout_s=60)
        eng = enable_xslim(m, XSlimConfig(**CFG_CONFIG), num_inference_steps=STEPS, sync=sync)
        x, _ = make_inputs("dit", batch=1, seed=10 + rank)
        with torch.no_grad():
            for t in TIMESTEPS:
                out = m(x, timestep=torch.tensor([t]), class_labels=torch.tensor([rank + 2])).sample
                x = x - (1.0 / STEPS) * out
        res = {"log": eng.statistics.decision_log(), "collectives": sync.collectives, "x": x}
        disable_xslim(m)
        return res
    finally:
        dist.destroy_process_group()


def failing_rank(rank: int, world: int) -> dict:
    """Rank 1 raises in the middle of a run; rank 0 must not wait forever."""
    dist.init_process_group("gloo")
    m = tiny_model("dit")
    sync = GroupSync(dist.group.WORLD, timeout_s=20)
    enable_xslim(m, XSlimConfig(**CFG_CONFIG), num_inference_steps=STEPS, sync=sync)
    x, _ = make_inputs("dit", batch=1, seed=1)
    with torch.no_grad():
        for i, t in enumerate(TIMESTEPS):
            if rank == 1 and i == 4:
                raise RuntimeError("injected failure on rank 1")
            out = m(x, timestep=torch.tensor([t]), class_labels=torch.tensor([3])).sample
            x = x - (1.0 / STEPS) * out
    return {}
