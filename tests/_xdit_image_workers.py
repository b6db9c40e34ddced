"""Rank functions running the tiny FLUX.2 transformer through xfuser's own sequence-parallel
wrapper (``xFuserFlux2Transformer2DWrapper``: image and text tokens sharded over the ranks), on
CPU with gloo, and the single-device reference they are compared with."""

from __future__ import annotations

import torch.distributed as dist

from xslim_xdit import Schedule, XSlimConfig, disable_xslim, enable_xslim
from xslim_xdit.testing import sample, tiny_model

STEPS = 10
#: every level: full, block, token and skip steps
SCHEDULE = dict(mode="schedule", schedule=Schedule(STEPS, (0, 1, 5, 9), (2, 7), (3, 4, 6)), token_ratio=0.5)


def config(which: str, sp: int) -> XSlimConfig:
    """The run's config; ``sp`` token groups make the single device select tokens within each
    rank's shard, as the ranks do."""
    if which != "schedule":
        raise ValueError(f"which: only 'schedule'; got {which!r}")
    return XSlimConfig(token_groups=sp, **SCHEDULE)


def single_device(sp: int, which: str) -> dict:
    m = tiny_model("flux2")
    eng = enable_xslim(m, config(which, sp), num_inference_steps=STEPS)
    x = sample(m, "flux2", steps=STEPS)
    log = eng.statistics.decision_log()
    disable_xslim(m)
    return {"log": log, "x": x, "plain": sample(m, "flux2", steps=STEPS)}


def flux2_usp(rank: int, world: int, ulysses: int, which: str) -> dict:
    """xfuser Ulysses over ``world`` ranks on the tiny FLUX.2 (16 image, 6 text tokens)."""
    from xslim_xdit.integrations.xfuser import enable_xslim_xdit
    from xslim_xdit.integrations.xfuser_runtime import init_xfuser_runtime

    dist.init_process_group("gloo")
    try:
        model = tiny_model("flux2")
        # 4 x 4 image tokens: 64 x 64 pixels (2 x 2 packed latents, VAE factor 8), 6 text tokens
        init_xfuser_runtime(
            model, height=64, width=64, max_condition_sequence_length=6, ulysses_degree=ulysses
        )
        # imported after the runtime set-up, which makes xfuser importable without an accelerator
        from xfuser.model_executor.models.transformers.transformer_flux2 import (
            xFuserFlux2Transformer2DWrapper,
        )

        xmodel = xFuserFlux2Transformer2DWrapper.from_config(model.config)
        xmodel.load_state_dict(model.state_dict())
        xmodel.eval()
        plain = sample(xmodel, "flux2", steps=STEPS)
        eng = enable_xslim_xdit(xmodel, config(which, 1))  # each rank selects within its shard
        eng.default_steps = STEPS
        x = sample(xmodel, "flux2", steps=STEPS)
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
