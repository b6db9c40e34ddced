"""Batches of independent samples for the per-sample tests: inputs of several seeds stacked into
one batch, the same sampling loop on a batch or on one sample, and the 2-rank Ulysses worker."""

from __future__ import annotations

import torch
import torch.distributed as dist

from xslim_xdit import XSlimConfig, disable_xslim, enable_xslim
from xslim_xdit.testing import denoise, make_batch_inputs, tiny_model

STEPS = 10
HW = 8  # FLUX: 8x8 image tokens (128x128 pixels for xfuser)
#: thresholds under which the three samples (seeds 0, 1, 2) of each family decide differently
ONLINE = {
    "dit": dict(warmup_steps=2, warn=0.1, crit=0.3, polish="block"),
    "flux": dict(warmup_steps=2, warn=0.08, crit=0.2, polish="block"),
    "pixart": dict(warmup_steps=2, warn=0.1, crit=0.3, polish="none"),
}


def batch_inputs(family: str, seeds: list[int], **shape: int) -> tuple[torch.Tensor, dict]:
    return make_batch_inputs(family, seeds, **shape)


def run(model: torch.nn.Module, family: str, x: torch.Tensor, cond: dict, steps: int = STEPS) -> torch.Tensor:
    return denoise(model, family, x, cond, steps)


def flux_config() -> XSlimConfig:
    return XSlimConfig(per_sample=True, guidance_pairs="none", **ONLINE["flux"])


def single_device_flux(seeds: list[int]) -> dict:
    m = tiny_model("flux")
    eng = enable_xslim(m, flux_config(), num_inference_steps=STEPS)
    x = run(m, "flux", *batch_inputs("flux", seeds, height=HW, width=HW))
    res = {"log": eng.statistics.decision_log(), "kinds": eng.statistics.sample_kinds(), "x": x}
    disable_xslim(m)
    return res


def ulysses_batch(rank: int, world: int, seeds: list[int]) -> dict:
    """Ulysses over ``world`` ranks, a batch of ``len(seeds)`` samples, per-sample decisions."""
    from xslim_xdit.integrations.xfuser import enable_xslim_xdit
    from xslim_xdit.integrations.xfuser_runtime import init_xfuser_runtime, to_xfuser_flux1

    dist.init_process_group("gloo")
    try:
        model = tiny_model("flux")
        x, cond = batch_inputs("flux", seeds, height=HW, width=HW)
        init_xfuser_runtime(
            model,
            height=HW * 16,
            width=HW * 16,
            batch_size=len(seeds),
            max_condition_sequence_length=cond["encoder_hidden_states"].shape[1],
            ulysses_degree=world,
            ring_degree=1,
        )
        xmodel = to_xfuser_flux1(model)
        eng = enable_xslim_xdit(xmodel, flux_config())
        eng.default_steps = STEPS
        out = run(xmodel, "flux", x, cond)
        res = {
            "log": eng.statistics.decision_log(),
            "kinds": eng.statistics.sample_kinds(),
            "x": out,
            "collectives": eng.sync.collectives,
        }
        disable_xslim(xmodel)
        return res
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------ CFG parallel, batch of 2
CFG_SEEDS = [0, 1]
CFG_STEPS = 10
CFG_TIMESTEPS = [int(999 * (1 - i / CFG_STEPS)) for i in range(CFG_STEPS)]
UNCOND = 10  # DiT's null class


def cfg_batch_config() -> XSlimConfig:
    """Per-sample, the batched-guidance rows paired as halves (diffusers' ``cat([x] * 2)``)."""
    return XSlimConfig(per_sample=True, guidance_pairs="halves", **ONLINE["dit"])


def _guided(x: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
    return x - (1.0 / CFG_STEPS) * (uncond + 4.0 * (cond - uncond))


def single_device_cfg_batch(seeds: list[int]) -> dict:
    """Reference: batch of ``len(seeds)`` samples, both guidance branches in one forward (rows
    ``[cond..., uncond...]``), per-sample decisions."""
    m = tiny_model("dit")
    eng = enable_xslim(m, cfg_batch_config(), num_inference_steps=CFG_STEPS)
    x, cond = batch_inputs("dit", seeds)
    b = x.shape[0]
    labels = torch.cat([cond["class_labels"], torch.full((b,), UNCOND)])
    with torch.no_grad():
        for t in CFG_TIMESTEPS:
            out = m(torch.cat([x, x]), timestep=torch.tensor([t] * 2 * b), class_labels=labels).sample
            x = _guided(x, out[:b], out[b:])
    res = {"log": eng.statistics.decision_log(), "kinds": eng.statistics.sample_kinds(), "x": x}
    disable_xslim(m)
    return res


def cfg_parallel_batch(rank: int, world: int, seeds: list[int]) -> dict:
    """CFG parallel 2: rank 0 runs the conditional rows of every sample, rank 1 the
    unconditional ones (batch ``len(seeds)`` each), one exact reduction per step over both.
    Two runs in one process group: with ``branch_per_rank`` (what ``enable_xslim_xdit`` sets
    when ``cfg > 1``), then without it (the control: each rank pairs its own rows as halves)."""
    dist.init_process_group("gloo")
    try:
        return {
            "with": _cfg_parallel_batch_run(rank, world, seeds, True),
            "without": _cfg_parallel_batch_run(rank, world, seeds, False),
        }
    finally:
        dist.destroy_process_group()


def _cfg_parallel_batch_run(rank: int, world: int, seeds: list[int], branch_per_rank: bool) -> dict:
    from xslim_xdit.parallel import GroupSync

    m = tiny_model("dit")
    sync = GroupSync(dist.group.WORLD, timeout_s=60)
    eng = enable_xslim(m, cfg_batch_config(), num_inference_steps=CFG_STEPS, sync=sync)
    assert eng.samples is not None
    eng.samples.branch_per_rank = branch_per_rank
    x, cond = batch_inputs("dit", seeds)
    b = x.shape[0]
    labels = cond["class_labels"] if rank == 0 else torch.full((b,), UNCOND)
    with torch.no_grad():
        for t in CFG_TIMESTEPS:
            out = m(x, timestep=torch.tensor([t] * b), class_labels=labels).sample
            both = [torch.empty_like(out) for _ in range(world)]
            dist.all_gather(both, out)
            x = _guided(x, both[0], both[1])
    res = {
        "log": eng.statistics.decision_log(),
        "kinds": eng.statistics.sample_kinds(),
        "x": x,
        "collectives": sync.collectives,
    }
    disable_xslim(m)
    return res
