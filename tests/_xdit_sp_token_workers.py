"""Rank functions for token refresh under xDiT's sequence parallelism (Ulysses 2, Ring 2) for the
families whose token level needed work there, on CPU with gloo, and the single-device references:

- CogVideoX through xfuser's ``xFuserCogVideoXPipeline`` (the pipeline splits the latents by rows
  and the text by tokens; xfuser's attention wrapper passes ``latte_temporal_attention=False`` to
  the processor): one latent frame, so that a rank's rows are one contiguous chunk of the flattened
  video tokens and a single device with ``token_groups=2`` selects within the same groups (with
  several frames a rank holds the same rows of every frame, which no contiguous groups describe);
- Qwen-Image through xfuser's bare ``xFuserQwenImageTransformerWrapper`` (image and text tokens
  chunked over the ranks, each stream's RoPE table chunked alike; every text token valid, see
  ``tests/_xdit_image_workers.py``), 10 steps;
- LTX-2 through xfuser's bare ``xFuserLTX2VideoTransformer3DWrapper`` (video tokens and their RoPE
  tables chunked, audio whole on every rank; its video-to-audio processor all-gathers the video
  before its projections), the "split" RoPE layout (see ``tests/_xdit_more_workers.py``), 10 steps.

Each layout runs a plain call, then X-Slim with a schedule (every level) and online (token polish);
Ulysses 2 also forced full with every level offered. Every case records the decision log, the token
sets each token step selected (``_select_tokens``'s index: within the rank's shard on a rank) and
the output. One launch runs every case.
"""

from __future__ import annotations

import traceback
from typing import Any

import torch
import torch.distributed as dist

from xslim_xdit import Schedule, XSlimConfig, disable_xslim, enable_xslim
from xslim_xdit.engine import XSlimEngine

#: (Ulysses, Ring) degrees, in the order one launch runs them
LAYOUTS = {"ulysses2": (2, 1), "ring2": (1, 2)}
#: CogVideoX's pipeline steps and configs (on one device: schedule FFBTSF, online FFSTTF)
COG_STEPS = 6
COG_CONFIGS = {
    "schedule": dict(mode="schedule", schedule=Schedule(COG_STEPS, (0, 1, 5), (2,), (3,)), token_ratio=0.5),
    "online": dict(warn=0.15, crit=0.35, polish="token", warmup_steps=2, partial_reset=0.3, token_ratio=0.5),
    # every step forced full with every level offered: the token processors only delegate
    "forced": dict(warn=1e-12, crit=2e-12, polish="auto"),
}


#: Qwen-Image's steps and configs (on one device: schedule FFBTTFTBTF... as SCHEDULE below, online
#: FFSTTTFSTF)
QWEN_STEPS = 10
QWEN_CONFIGS = {
    "schedule": dict(
        mode="schedule", schedule=Schedule(QWEN_STEPS, (0, 1, 5, 9), (2, 7), (3, 4, 6)), token_ratio=0.5
    ),
    "online": dict(warn=0.12, crit=0.26, polish="token", warmup_steps=2, partial_reset=0.3, token_ratio=0.5),
    "forced": dict(warn=1e-12, crit=2e-12, polish="auto"),
}


#: LTX-2's steps and configs (on one device: online FFSTTTTTTF)
LTX2_STEPS = 10
LTX2_CONFIGS = {
    "schedule": QWEN_CONFIGS["schedule"],
    "online": dict(warn=0.12, crit=0.26, polish="token", warmup_steps=2, partial_reset=0.3, token_ratio=0.5),
    "forced": QWEN_CONFIGS["forced"],
}


def _configs(configs: dict[str, dict[str, Any]], forced: bool) -> dict[str, dict[str, Any]]:
    return {k: v for k, v in configs.items() if forced or k != "forced"}


def record_token_sets(engine: XSlimEngine) -> list[torch.Tensor]:
    """The token sets every token step of ``engine`` selects, in call order (test instrumentation:
    the decision room's selection wrapped on this engine only)."""
    picks: list[torch.Tensor] = []
    select = engine.room._select_tokens

    def recorded(caches: Any) -> torch.Tensor:
        index = select(caches)
        picks.append(index.detach().clone())
        return index

    engine.room._select_tokens = recorded  # type: ignore[method-assign]
    return picks


def _cog_call(pipe: Any) -> torch.Tensor | None:
    """The tiny CogVideoX call with one latent frame (8 x 8 latents: 16 video tokens, 6 text
    tokens, batched CFG); None on a rank that returns no output."""
    from xslim_xdit.testing.cogvideox_pipelines import TINY_COGVIDEOX_CALL_KWARGS

    kwargs = dict(TINY_COGVIDEOX_CALL_KWARGS, num_frames=1)
    out = pipe(
        "a cat",
        negative_prompt="a dog",
        num_inference_steps=COG_STEPS,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
        **kwargs,
    )
    # xfuser's CogVideoX pipeline returns frames [None] (one per sample) on the ranks without output
    return None if isinstance(out.frames, list) and all(f is None for f in out.frames) else out.frames


def _cog_base() -> Any:
    """The tiny ``CogVideoXPipeline`` with the deterministic DDIM scheduler (see
    ``tests/_xdit_more_workers.py``: the DPM scheduler's noise is drawn per shard under SP)."""
    from _xdit_more_workers import _base_pipeline

    return _base_pipeline("cogvideox")


def _run_configs(pipe: Any, call: Any, configs: dict[str, dict[str, Any]], enable: Any) -> dict[str, Any]:
    """A plain call, then one call per X-Slim config: log, token sets, output, collectives."""
    out: dict[str, Any] = {"plain": call(pipe)}
    for which, cfg in configs.items():
        eng = enable(pipe, XSlimConfig(**cfg))
        picks = record_token_sets(eng)
        x = call(pipe)
        out[which] = {
            "log": eng.statistics.decision_log(),
            "picks": picks,
            "x": x,
            "collectives": eng.sync.collectives,
            "gathers": getattr(eng.token_ctx.gather, "collectives", 0) if eng.token_ctx is not None else 0,
        }
        disable_xslim(pipe)
    return out


def single_device_cogvideox() -> dict[str, Any]:
    """The diffusers ``CogVideoXPipeline`` on one device, token groups 2 (a rank's rows)."""

    def enable(pipe: Any, cfg: XSlimConfig) -> XSlimEngine:
        return enable_xslim(pipe, cfg.replace(token_groups=2))

    return _run_configs(_cog_base(), _cog_call, COG_CONFIGS, enable)


def _xfuser_cogvideox(ulysses: int, ring: int, forced: bool) -> dict[str, Any]:
    from xslim_xdit.integrations.xfuser_compat import apply_xfuser_cpu_compat

    apply_xfuser_cpu_compat()  # before xfuser is imported
    from xfuser.core.distributed import get_ring_parallel_world_size, get_ulysses_parallel_world_size
    from xfuser.model_executor.pipelines.pipeline_cogvideox import xFuserCogVideoXPipeline

    from xslim_xdit.integrations.xfuser import enable_xslim_xdit
    from xslim_xdit.testing.xfuser import xfuser_engine_config

    engine_config, _ = xfuser_engine_config(height=64, width=64, ulysses_degree=ulysses, ring_degree=ring)
    pipe = xFuserCogVideoXPipeline(_cog_base(), engine_config)
    pipe.set_progress_bar_config(disable=True)
    out = _run_configs(
        pipe, _cog_call, _configs(COG_CONFIGS, forced), enable_xslim_xdit
    )  # selects in its shard
    out["degrees"] = (get_ulysses_parallel_world_size(), get_ring_parallel_world_size())
    out["transformer"] = type(pipe.transformer).__name__
    return out


def _qwen_run(model: torch.nn.Module) -> torch.Tensor:
    from _xdit_image_workers import qwen_inputs

    from xslim_xdit.testing import denoise

    return denoise(model, "qwen_image", *qwen_inputs(), QWEN_STEPS)


def single_device_qwen_image() -> dict[str, Any]:
    """The diffusers ``QwenImageTransformer2DModel`` on one device, token groups 2."""
    from xslim_xdit.testing import tiny_model

    def enable(model: Any, cfg: XSlimConfig) -> XSlimEngine:
        return enable_xslim(model, cfg.replace(token_groups=2), num_inference_steps=QWEN_STEPS)

    return _run_configs(tiny_model("qwen_image"), _qwen_run, QWEN_CONFIGS, enable)


def _xfuser_qwen_image(ulysses: int, ring: int, forced: bool) -> dict[str, Any]:
    from xslim_xdit.integrations.xfuser_runtime import init_xfuser_runtime
    from xslim_xdit.testing import tiny_model

    model = tiny_model("qwen_image")
    # 4 x 4 image tokens (64 x 64 pixels), 6 text tokens; Ring gets SDPA_FLASH on CPU
    init_xfuser_runtime(
        model, height=64, width=64, max_condition_sequence_length=6, ulysses_degree=ulysses, ring_degree=ring
    )
    from xfuser.core.distributed import get_ring_parallel_world_size, get_ulysses_parallel_world_size
    from xfuser.model_executor.models.transformers.transformer_qwen import xFuserQwenImageTransformerWrapper

    from xslim_xdit.integrations.xfuser import enable_xslim_xdit

    xmodel = xFuserQwenImageTransformerWrapper.from_config(model.config)
    xmodel.load_state_dict(model.state_dict())
    xmodel.eval()

    def enable(m: Any, cfg: XSlimConfig) -> XSlimEngine:
        return enable_xslim_xdit(m, cfg, num_inference_steps=QWEN_STEPS)

    out = _run_configs(xmodel, _qwen_run, _configs(QWEN_CONFIGS, forced), enable)
    out["degrees"] = (get_ulysses_parallel_world_size(), get_ring_parallel_world_size())
    out["transformer"] = type(xmodel).__name__
    return out


def _ltx2_run(model: torch.nn.Module) -> torch.Tensor:
    from xslim_xdit.testing import sample

    return sample(model, "ltx2", steps=LTX2_STEPS)


def single_device_ltx2() -> dict[str, Any]:
    """The diffusers ``LTX2VideoTransformer3DModel`` on one device ("split" RoPE), token groups 2."""
    from _xdit_more_workers import _model

    def enable(model: Any, cfg: XSlimConfig) -> XSlimEngine:
        return enable_xslim(model, cfg.replace(token_groups=2), num_inference_steps=LTX2_STEPS)

    return _run_configs(_model("ltx2"), _ltx2_run, LTX2_CONFIGS, enable)


def _xfuser_ltx2(ulysses: int, ring: int, forced: bool) -> dict[str, Any]:
    from _xdit_more_workers import _init_runtime, _model, _wrap

    model = _model("ltx2")
    _init_runtime(model, ulysses, ring)
    from xfuser.core.distributed import get_ring_parallel_world_size, get_ulysses_parallel_world_size

    from xslim_xdit.integrations.xfuser import enable_xslim_xdit

    xmodel = _wrap("ltx2", model)

    def enable(m: Any, cfg: XSlimConfig) -> XSlimEngine:
        return enable_xslim_xdit(m, cfg, num_inference_steps=LTX2_STEPS)

    out = _run_configs(xmodel, _ltx2_run, _configs(LTX2_CONFIGS, forced), enable)
    out["degrees"] = (get_ulysses_parallel_world_size(), get_ring_parallel_world_size())
    out["transformer"] = type(xmodel).__name__
    return out


def sp_token_cases(rank: int, world: int) -> dict[str, Any]:
    """Every case of one 2-rank launch, keyed ``"<family>/<layout>"``; a case that raises is
    recorded as ``{"error": traceback}`` (the others still run)."""
    from xslim_xdit.integrations.xfuser_runtime import reset_xfuser_parallel_state

    dist.init_process_group("gloo")
    out: dict[str, Any] = {}
    try:
        for layout, (ulysses, ring) in LAYOUTS.items():
            for family, fn in (
                ("cogvideox", _xfuser_cogvideox),
                ("qwen_image", _xfuser_qwen_image),
                ("ltx2", _xfuser_ltx2),
            ):
                try:
                    # forced full under Ulysses only: it checks delegation, the same under Ring
                    out[f"{family}/{layout}"] = fn(ulysses, ring, layout == "ulysses2")
                except Exception:  # recorded: the test shows it; later cases still pair up
                    out[f"{family}/{layout}"] = {"error": traceback.format_exc()}
                reset_xfuser_parallel_state()
        return out
    finally:
        dist.destroy_process_group()
