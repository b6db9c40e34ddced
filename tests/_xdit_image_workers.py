"""Rank functions running the tiny FLUX.2 transformer through xfuser's own sequence-parallel
wrapper (``xFuserFlux2Transformer2DWrapper``: image and text tokens sharded over the ranks), on
CPU with gloo, and the single-device reference they are compared with.

One launch runs every case (two spawned ranks importing xfuser take most of a minute on a loaded
CPU): Ulysses 2, then Ring 2 (xfuser's groups torn down and rebuilt in between), each with a
schedule and with the online controller."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from xslim_xdit import Schedule, XSlimConfig, disable_xslim, enable_xslim
from xslim_xdit.testing import sample, tiny_model

STEPS = 10
#: every level: full, block, token and skip steps
SCHEDULE = dict(mode="schedule", schedule=Schedule(STEPS, (0, 1, 5, 9), (2, 7), (3, 4, 6)), token_ratio=0.5)
#: online thresholds under which the tiny FLUX.2 reaches every level (skip, block, token, full)
ONLINE = dict(warn=0.12, crit=0.26, polish="auto", warmup_steps=2, partial_reset=0.3, token_ratio=0.5)
#: (Ulysses, Ring) degrees, in the order one launch runs them
LAYOUTS = {"ulysses2": (2, 1), "ring2": (1, 2)}


def config(which: str, sp: int) -> XSlimConfig:
    """The run's config; ``sp`` token groups make the single device select tokens within each
    rank's shard, as the ranks do."""
    table = {"schedule": SCHEDULE, "online": ONLINE}
    if which not in table:
        raise ValueError(f"which: one of {sorted(table)}; got {which!r}")
    return XSlimConfig(token_groups=sp, **table[which])


def single_device(sp: int, which: str) -> dict:
    m = tiny_model("flux2")
    eng = enable_xslim(m, config(which, sp), num_inference_steps=STEPS)
    x = sample(m, "flux2", steps=STEPS)
    log = eng.statistics.decision_log()
    disable_xslim(m)
    return {"log": log, "x": x, "plain": sample(m, "flux2", steps=STEPS)}


def _flux2_run(model: torch.nn.Module, which: str) -> dict[str, Any]:
    """One X-Slim run of xfuser's FLUX.2 wrapper under the current layout, and a plain one."""
    from xfuser.core.distributed import get_ring_parallel_world_size, get_ulysses_parallel_world_size
    from xfuser.model_executor.models.transformers.transformer_flux2 import (
        xFuserFlux2Transformer2DWrapper,
    )

    from xslim_xdit.integrations.xfuser import enable_xslim_xdit

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
        # the layout xfuser really ran (a Ring case must not silently run as Ulysses)
        "degrees": (get_ulysses_parallel_world_size(), get_ring_parallel_world_size()),
    }
    disable_xslim(xmodel)
    return res


def flux2_cases(rank: int, world: int) -> dict[str, Any]:
    """Every FLUX.2 case of one 2-rank launch on the tiny FLUX.2 (16 image, 6 text tokens), keyed
    ``"<layout>/<which>"``."""
    from xslim_xdit.integrations.xfuser_runtime import init_xfuser_runtime, reset_xfuser_parallel_state

    dist.init_process_group("gloo")
    out: dict[str, Any] = {}
    try:
        model = tiny_model("flux2")
        for layout, (ulysses, ring) in LAYOUTS.items():
            # 4 x 4 image tokens: 64 x 64 pixels (2 x 2 packed latents, VAE factor 8), 6 text
            # tokens; Ring gets SDPA_FLASH on CPU (init_xfuser_runtime: Ring needs the log-sum-exp)
            init_xfuser_runtime(
                model,
                height=64,
                width=64,
                max_condition_sequence_length=6,
                ulysses_degree=ulysses,
                ring_degree=ring,
            )
            for which in ("schedule", "online"):
                out[f"{layout}/{which}"] = _flux2_run(model, which)
            reset_xfuser_parallel_state()
        return out
    finally:
        dist.destroy_process_group()
