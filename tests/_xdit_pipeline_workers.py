"""Rank functions running X-Slim through xFuser's own pipelines (``xFuserPixArtSigmaPipeline``
with CFG parallelism, ``xFuserFluxPipeline`` with Ulysses), loaded with ``from_pretrained`` from
tiny random checkpoints, plus their single-device diffusers references."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from xslim_xdit import Schedule, XSlimConfig, disable_xslim, enable_xslim
from xslim_xdit.testing.pipelines import TINY_CALL_KWARGS

STEPS = 10
PROMPT = "a photo of a cat"
# Online controller for which skip, block, token and full steps all occur on both tiny
# pipelines (FLUX: FFSBTFSBTF, PixArt: FFFBTTFSBF on one device); every accumulated error
# stays >= 5e-4 away from a threshold, far above the ~1e-6 round-off between layouts.
ONLINE = dict(warn=0.08, crit=0.25, polish="auto", warmup_steps=2, partial_reset=0.0, token_ratio=0.5)
# X-Slim attached with every step full: caching switched off through the config.
ALL_FULL = dict(mode="schedule", schedule=Schedule(STEPS, tuple(range(STEPS))))

# The layouts under test: xFuser arguments, and the single device's token_groups (per-shard
# top-k under sequence parallelism: one group per SP rank).
LAYOUTS: dict[str, dict[str, Any]] = {
    "pixart": {"xfuser": {"use_cfg_parallel": True}, "token_groups": 1},
    "flux": {"xfuser": {"ulysses_degree": 2}, "token_groups": 2},
}


def _call(pipe: Any, family: str) -> torch.Tensor:
    out = pipe(
        prompt=PROMPT,
        num_inference_steps=STEPS,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
        **TINY_CALL_KWARGS[family],
    )
    return None if out is None else out.images


def single_device(family: str, path: str | Path) -> dict[str, Any]:
    """Diffusers pipeline from the same checkpoint: plain and with X-Slim (token groups = SP degree)."""
    from diffusers import FluxPipeline, PixArtSigmaPipeline

    cls = FluxPipeline if family == "flux" else PixArtSigmaPipeline
    pipe = cls.from_pretrained(str(path))
    pipe.set_progress_bar_config(disable=True)
    plain = _call(pipe, family)
    eng = enable_xslim(pipe, XSlimConfig(token_groups=LAYOUTS[family]["token_groups"], **ONLINE))
    x = _call(pipe, family)
    log = eng.statistics.decision_log()
    disable_xslim(pipe)
    return {"plain": plain, "x": x, "log": log}


def _layout(family: str, path: str | Path) -> dict[str, Any]:
    """One family on its layout: plain xfuser, X-Slim on, X-Slim with every step full, then
    X-Slim removed; on this rank."""
    from xslim_xdit.integrations.xfuser import XSlimXFuserWrapper
    from xslim_xdit.integrations.xfuser_runtime import reset_xfuser_parallel_state
    from xslim_xdit.testing.xfuser import load_xfuser_pipeline, xfuser_engine_config

    kw = TINY_CALL_KWARGS[family]
    engine_config, _ = xfuser_engine_config(
        height=kw["height"], width=kw["width"], **LAYOUTS[family]["xfuser"]
    )
    pipe = load_xfuser_pipeline(family, path, engine_config)
    pipe.set_progress_bar_config(disable=True)
    res: dict[str, Any] = {"transformer": type(pipe.transformer).__name__}
    res["plain"] = _call(pipe, family)

    wrapped = XSlimXFuserWrapper(pipe)  # no config: X-Slim off
    res["wrapped_off"] = _call(wrapped, family)

    engine = wrapped.enable_xslim(XSlimConfig(**ONLINE))  # per-shard top-k: token_groups=1
    res["x"] = _call(wrapped, family)
    res["log"] = engine.statistics.decision_log()
    res["collectives"] = engine.statistics.collectives
    res["table"] = wrapped.get_cache_statistics().table()

    wrapped.enable_xslim(XSlimConfig(**ALL_FULL))
    res["all_full"] = _call(wrapped, family)

    wrapped.disable_xslim()
    res["after_disable"] = _call(wrapped, family)
    reset_xfuser_parallel_state()
    return res


# HunyuanVideo has no xFuser pipeline: xfuser's transformer wrapper under Ulysses 2, sampled
# by a plain loop, with a schedule that runs every level.
HV_SHAPE = dict(frames=2, height=4, width=4)
HV_SCHEDULE = dict(
    mode="schedule", schedule=Schedule(STEPS, (0, 1, 5, 9), (2, 7), (3, 4, 6)), token_ratio=0.5
)


def hunyuan_single_device() -> dict[str, Any]:
    """The diffusers HunyuanVideo transformer on one device (token groups = SP degree 2)."""
    from xslim_xdit.testing import sample, tiny_model

    model = tiny_model("hunyuan_video")
    plain = sample(model, "hunyuan_video", steps=STEPS, **HV_SHAPE)
    eng = enable_xslim(model, XSlimConfig(token_groups=2, **HV_SCHEDULE), num_inference_steps=STEPS)
    x = sample(model, "hunyuan_video", steps=STEPS, **HV_SHAPE)
    return {"plain": plain, "x": x, "log": eng.statistics.decision_log()}


def _hunyuan_ulysses() -> dict[str, Any]:
    from xslim_xdit.integrations.xfuser_compat import apply_xfuser_cpu_compat

    apply_xfuser_cpu_compat()  # before xfuser is imported (an import sorter would reorder imports)
    from xfuser.model_executor.models.transformers.transformer_hunyuan_video import (
        xFuserHunyuanVideoTransformer3DWrapper,
    )

    from xslim_xdit.integrations.xfuser import enable_xslim_xdit
    from xslim_xdit.integrations.xfuser_runtime import init_xfuser_runtime, reset_xfuser_parallel_state
    from xslim_xdit.testing import sample, tiny_model

    model = tiny_model("hunyuan_video")
    init_xfuser_runtime(model, height=32, width=32, max_condition_sequence_length=5, ulysses_degree=2)
    xmodel = xFuserHunyuanVideoTransformer3DWrapper.from_config(model.config)
    xmodel.load_state_dict(model.state_dict())
    xmodel.eval()
    res: dict[str, Any] = {"plain": sample(xmodel, "hunyuan_video", steps=STEPS, **HV_SHAPE)}
    eng = enable_xslim_xdit(xmodel, XSlimConfig(**HV_SCHEDULE))
    eng.default_steps = STEPS
    res["x"] = sample(xmodel, "hunyuan_video", steps=STEPS, **HV_SHAPE)
    res["log"] = eng.statistics.decision_log()
    res["collectives"] = eng.statistics.collectives
    disable_xslim(xmodel)
    res["after_disable"] = sample(xmodel, "hunyuan_video", steps=STEPS, **HV_SHAPE)
    reset_xfuser_parallel_state()
    return res


def pipelines(rank: int, world: int, paths: dict[str, str]) -> dict[str, Any]:
    """Every layout in one spawn (xfuser's import dominates the cost of a spawn)."""
    dist.init_process_group("gloo")
    try:
        res = {family: _layout(family, path) for family, path in paths.items()}
        res["hunyuan_video"] = _hunyuan_ulysses()
        return res
    finally:
        dist.destroy_process_group()
