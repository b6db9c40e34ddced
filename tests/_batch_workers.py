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
