"""Rank functions running tiny FLUX through xfuser's own sequence-parallel wrapper (CPU, gloo)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from xslim_xdit import Schedule, XSlimConfig, disable_xslim, enable_xslim
from xslim_xdit.testing import make_inputs, sample, tiny_model

STEPS = 10
HW = 8  # 8x8 image tokens: 128x128 pixels for xfuser (packed 2x2 latents, VAE factor 8)
ONLINE = dict(warn=0.12, crit=0.26, polish="auto", warmup_steps=2, partial_reset=0.3, token_ratio=0.5)
SCHEDULE = dict(mode="schedule", schedule=Schedule(STEPS, (0, 1, 5, 9), (2, 7), (3, 4, 6)), token_ratio=0.5)


def configs(sp: int) -> dict[str, XSlimConfig]:
    return {
        "online": XSlimConfig(token_groups=sp, **ONLINE),
        "schedule": XSlimConfig(token_groups=sp, **SCHEDULE),
    }


def single_device(sp: int, which: str) -> dict:
    m = tiny_model("flux")
    eng = enable_xslim(m, configs(sp)[which], num_inference_steps=STEPS)
    x = sample(m, "flux", steps=STEPS, height=HW, width=HW)
    log = eng.statistics.decision_log()
    disable_xslim(m)
    plain = sample(m, "flux", steps=STEPS, height=HW, width=HW)
    return {"log": log, "x": x, "plain": plain}


def _xfuser_tiny_flux(ulysses: int, ring: int) -> torch.nn.Module:
    """The tiny FLUX transformer wrapped by xfuser, its runtime set up for HW x HW image tokens."""
    from xslim_xdit.integrations.xfuser_runtime import init_xfuser_runtime, to_xfuser_flux1

    model = tiny_model("flux")
    _, cond = make_inputs("flux", height=HW, width=HW)
    init_xfuser_runtime(
        model,
        height=HW * 16,
        width=HW * 16,
        max_condition_sequence_length=cond["encoder_hidden_states"].shape[1],
        ulysses_degree=ulysses,
        ring_degree=ring,
    )
    return to_xfuser_flux1(model)


def local_indicators(rank: int, world: int) -> dict:
    """Control: plain xfuser Ulysses=2, each rank measuring block 0's modulated-input change on
    its own shard only (what a cache without reductions would decide on)."""
    from xslim_xdit.adapters import adapter_for
    from xslim_xdit.calibration import simulate

    dist.init_process_group("gloo")
    try:
        xmodel = _xfuser_tiny_flux(ulysses=2, ring=1)
        block0 = xmodel.transformer_blocks[0]
        probes: list[torch.Tensor] = []
        block0.register_forward_pre_hook(
            lambda mod, args, kwargs: probes.append(
                mod.norm1(kwargs["hidden_states"], emb=kwargs["temb"])[0]
            ),
            with_kwargs=True,
        )
        assert adapter_for(xmodel).name == "flux"
        sample(xmodel, "flux", steps=STEPS, height=HW, width=HW)
        rel = [None] + [
            float((b - a).abs().mean() / a.abs().mean()) for a, b in zip(probes[:-1], probes[1:], strict=True)
        ]
        kinds = simulate(
            rel,
            ONLINE["warn"],
            ONLINE["crit"],
            warmup_steps=2,
            polish="auto",
            partial_reset=ONLINE["partial_reset"],
        )
        return {"kinds": [k.name for k in kinds], "indicators": rel}
    finally:
        dist.destroy_process_group()


def usp(rank: int, world: int, ulysses: int, ring: int, which: str, reduced: bool = True) -> dict:
    from xslim_xdit.integrations.xfuser import enable_xslim_xdit
    from xslim_xdit.parallel import LocalSync

    dist.init_process_group("gloo")
    try:
        xmodel = _xfuser_tiny_flux(ulysses, ring)
        plain = sample(xmodel, "flux", steps=STEPS, height=HW, width=HW)
        cfg = configs(1)[which]  # each rank selects within its own shard
        if reduced:
            eng = enable_xslim_xdit(xmodel, cfg)
            eng.default_steps = STEPS
        else:  # control: every rank decides on its own shard's indicators
            eng = enable_xslim(xmodel, cfg, num_inference_steps=STEPS, sync=LocalSync())
        x = sample(xmodel, "flux", steps=STEPS, height=HW, width=HW)
        res = {
            "log": eng.statistics.decision_log(),
            "x": x,
            "plain": plain,
            "collectives": eng.sync.collectives,
        }
        disable_xslim(xmodel)
        return res
    finally:
        dist.destroy_process_group()
