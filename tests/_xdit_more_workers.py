"""Rank functions running SD3, HunyuanVideo 1.5, LTX-2 and CogVideoX through xfuser 0.7's
own transformer wrappers (bare) and pipelines, on CPU with gloo, and the single-device references
they are compared with:

- HunyuanVideo 1.5 (``xFuserHunyuanVideo15Transformer3DWrapper``: video tokens and their RoPE
  tables chunked over the SP group; the condition sequence's padding dropped, and the condition
  split over the SP group when its length divides, else kept whole), the full multi-rank case:
  Ulysses 2 and Ring 2, each with a schedule (every level, token refresh gathering the other
  shard's K/V) and the online controller;
- LTX-2 (``xFuserLTX2VideoTransformer3DWrapper``: video tokens chunked, audio whole on every rank),
  Ulysses 2 and Ring 2, online (step and block levels; its token level: tests/test_parallel_xdit_sp_token.py);
- SD3 through xfuser's ``xFuserStableDiffusion3Pipeline`` (its transformer wrapper is patch-level,
  driven by the pipeline, which shards the latents by rows and the text over the SP group): Ulysses
  2 with a schedule (every level) and online, Ring 2, CFG parallel 2 and synchronous PipeFusion 2
  online (block polish), against diffusers' ``StableDiffusion3Pipeline`` (batched CFG);
- CogVideoX through xfuser's ``xFuserCogVideoXPipeline``: Ulysses 2, Ring 2 and CFG parallel 2, online
  (block polish: step and block levels), against diffusers' ``CogVideoXPipeline`` (both with
  ``CogVideoXDDIMScheduler``).

One launch runs every case (two spawned ranks importing xfuser take most of a minute on a loaded
CPU)."""

from __future__ import annotations

import copy
import importlib
import traceback
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist

from xslim_xdit import Schedule, XSlimConfig, disable_xslim, enable_xslim
from xslim_xdit.testing import sample, tiny_model

STEPS = 10
#: every level: full, block, token and skip steps
SCHEDULE = dict(mode="schedule", schedule=Schedule(STEPS, (0, 1, 5, 9), (2, 7), (3, 4, 6)), token_ratio=0.5)
#: online: on the tiny HunyuanVideo 1.5 (2 x 4 x 4 latents: 32 video tokens) full, skip, block and
#: token steps all occur (FFSBBBBTTF on one device)
ONLINE = dict(warn=0.12, crit=0.26, polish="auto", warmup_steps=2, partial_reset=0.3, token_ratio=0.5)
#: LTX-2 online, block polish (no token level): FFSBBBBBBF on one device
LTX2_ONLINE = dict(warn=0.12, crit=0.26, polish="block", warmup_steps=2, partial_reset=0.3)
#: the pipelines' steps, and their configs (6 steps; on one device: SD3 FFSBBF online, CogVideoX
#: FFSSBF)
PIPE_STEPS = 6
PIPE_CONFIGS = {
    "schedule": dict(
        mode="schedule", schedule=Schedule(PIPE_STEPS, (0, 1, 5), (2,), (3,)), token_ratio=0.5
    ),  # step 4 skips
    "online": dict(warn=0.12, crit=0.26, polish="block", warmup_steps=2, partial_reset=0.3),
    "cog_online": dict(warn=0.2, crit=0.4, polish="block", warmup_steps=2, partial_reset=0.3),
}
#: pipeline cases: key -> (family, xfuser arguments, which config, the single device's token groups)
PIPE_CASES = {
    "sd3/ulysses2/schedule": ("sd3", {"ulysses_degree": 2}, "schedule", 2),
    "sd3/ulysses2/online": ("sd3", {"ulysses_degree": 2}, "online", 2),
    "sd3/ring2/online": ("sd3", {"ring_degree": 2}, "online", 2),
    "sd3/cfg2/online": ("sd3", {"use_cfg_parallel": True}, "online", 1),
    "cogvideox/ulysses2/online": ("cogvideox", {"ulysses_degree": 2}, "cog_online", 2),
    "cogvideox/ring2/online": ("cogvideox", {"ring_degree": 2}, "cog_online", 2),
    "cogvideox/cfg2/online": ("cogvideox", {"use_cfg_parallel": True}, "cog_online", 1),
    # synchronous PipeFusion (warm-up steps = steps, one patch); no token level under PipeFusion
    "sd3/pipefusion2/online": (
        "sd3",
        {"pipefusion_parallel_degree": 2, "num_pipeline_patch": 1, "warmup_steps": PIPE_STEPS},
        "online",
        1,
    ),
}
#: (Ulysses, Ring) degrees, in the order one launch runs them
LAYOUTS = {"ulysses2": (2, 1), "ring2": (1, 2)}
#: LTX-2's tiny model with the "split" RoPE layout: with diffusers' default "interleaved" tables
#: ((batch, tokens, dim)), xfuser's video-to-audio processor gathers the key RoPE tables along
#: dim 2 (the feature dimension; the token dimension of "split" tables (batch, heads, tokens,
#: dim/2)) and fails (transformer_ltx2.py, xFuserLTX2AudioVideoAttnProcessor.__call__)
LTX2_OVERRIDES = {"rope_type": "split"}

#: family -> (xfuser module, wrapper class)
WRAPPERS = {
    "hunyuan_video15": ("transformer_hunyuan_video15", "xFuserHunyuanVideo15Transformer3DWrapper"),
    "ltx2": ("transformer_ltx2", "xFuserLTX2VideoTransformer3DWrapper"),
}


def _model(family: str) -> torch.nn.Module:
    return tiny_model(family, **(LTX2_OVERRIDES if family == "ltx2" else {}))


def config(family: str, which: str, sp: int) -> XSlimConfig:
    """The run's config; ``sp`` token groups make the single device select tokens within each
    rank's shard, as the ranks do (contiguous chunks of the flattened video tokens)."""
    table = {
        ("hunyuan_video15", "schedule"): SCHEDULE,
        ("hunyuan_video15", "online"): ONLINE,
        ("ltx2", "online"): LTX2_ONLINE,
    }
    return XSlimConfig(token_groups=sp, **table[family, which])


def single_device(family: str, which: str) -> dict[str, Any]:
    """The diffusers transformer on one device, with X-Slim (``which``, token groups 2) and without."""
    m = _model(family)
    eng = enable_xslim(m, config(family, which, 2), num_inference_steps=STEPS)
    x = sample(m, family, steps=STEPS)
    log = eng.statistics.decision_log()
    disable_xslim(m)
    return {"log": log, "x": x, "plain": sample(m, family, steps=STEPS)}


def _wrap(family: str, model: torch.nn.Module) -> torch.nn.Module:
    """xfuser's wrapper of ``family`` with ``model``'s config and weights."""
    module, name = WRAPPERS[family]
    cls = getattr(importlib.import_module(f"xfuser.model_executor.models.transformers.{module}"), name)
    # pass the config as keywords (a wrapper taking **kwargs, Z-Image's, defeats from_config)
    wrapped = cls(**{k: v for k, v in model.config.items() if not k.startswith("_")})
    if family == "hunyuan_video15":
        # the tiny model narrows the ByT5 projection (the class fixes its width at 2048)
        wrapped.context_embedder_2 = copy.deepcopy(model.context_embedder_2)
    wrapped.load_state_dict(model.state_dict())
    return wrapped.eval()


def _init_runtime(model: torch.nn.Module, ulysses: int, ring: int) -> None:
    """xfuser's config, groups and runtime state as its runners build them for these bare wrappers
    (as for Wan: no ``set_input_parameters``; each wrapper shards its tokens itself). Ring gets
    SDPA_FLASH (it needs the log-sum-exp; the CPU compat layer routes it)."""
    from xslim_xdit.integrations.xfuser_compat import apply_xfuser_cpu_compat

    apply_xfuser_cpu_compat()
    from xfuser.config import xFuserArgs
    from xfuser.core.distributed import init_distributed_environment, initialize_runtime_state

    init_distributed_environment(rank=dist.get_rank(), world_size=dist.get_world_size())
    args = xFuserArgs(
        model="",
        ulysses_degree=ulysses,
        ring_degree=ring,
        attention_backend="SDPA_FLASH" if ring > 1 else None,
    )
    engine_config, _ = args.create_config()
    engine_config.runtime_config.dtype = torch.float32
    cfg = SimpleNamespace(**dict(model.config))
    initialize_runtime_state(SimpleNamespace(transformer=SimpleNamespace(config=cfg)), engine_config)


def _bare(family: str, which: str) -> dict[str, Any]:
    """One X-Slim run of the bare wrapped transformer under the current layout, and a plain one."""
    from xfuser.core.distributed import get_ring_parallel_world_size, get_ulysses_parallel_world_size

    from xslim_xdit.integrations.xfuser import enable_xslim_xdit

    xmodel = _wrap(family, _model(family))
    plain = sample(xmodel, family, steps=STEPS)
    eng = enable_xslim_xdit(xmodel, config(family, which, 1))  # each rank selects within its shard
    eng.default_steps = STEPS
    x = sample(xmodel, family, steps=STEPS)
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


def tiny_sd3_pipeline() -> Any:
    """A ``StableDiffusion3Pipeline`` from the tiny SD3 transformer, a tiny VAE and no text encoders
    (the calls pass prompt embeddings)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    from xslim_xdit.testing.pipelines import tiny_vae

    pipe = StableDiffusion3Pipeline(
        transformer=tiny_model("sd3"),
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=tiny_vae(4),
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _pipe_call(family: str, pipe: Any) -> torch.Tensor | None:
    """The family's tiny call (latent output, seeded); None on a rank that returns no output."""
    g = torch.Generator().manual_seed(1)
    if family == "sd3":  # 8 x 8 latents (16 image tokens), 6 text tokens, CFG (scale 7)
        out = pipe(
            prompt_embeds=torch.randn(1, 6, 24, generator=g),
            pooled_prompt_embeds=torch.randn(1, 16, generator=g),
            negative_prompt_embeds=torch.randn(1, 6, 24, generator=g),
            negative_pooled_prompt_embeds=torch.randn(1, 16, generator=g),
            height=64,
            width=64,
            num_inference_steps=PIPE_STEPS,
            output_type="latent",
            generator=torch.Generator().manual_seed(0),
        )
        return None if out is None else out.images
    from xslim_xdit.testing.pipelines import TINY_COGVIDEOX_CALL_KWARGS

    out = pipe(
        "a cat",
        negative_prompt="a dog",
        num_inference_steps=PIPE_STEPS,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
        **TINY_COGVIDEOX_CALL_KWARGS,
    )
    # xfuser's CogVideoX pipeline returns frames [None] (one per sample) on the ranks without output
    return None if isinstance(out.frames, list) and all(f is None for f in out.frames) else out.frames


def _base_pipeline(family: str) -> Any:
    from xslim_xdit.testing.pipelines import tiny_cogvideox_pipeline

    if family == "sd3":
        return tiny_sd3_pipeline()
    from diffusers import CogVideoXDDIMScheduler

    pipe = tiny_cogvideox_pipeline()
    # deterministic DDIM (eta 0) rather than the tiny pipeline's CogVideoXDPMScheduler, whose step
    # adds noise drawn for the latents' shape: under sequence parallelism each rank draws it for
    # its own shard from the same generator (xfuser's pipeline steps the shards), so xfuser's own
    # output differs from diffusers' (measured: 42 on latents of magnitude ~1) whatever X-Slim does
    pipe.scheduler = CogVideoXDDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def single_device_pipeline(key: str) -> dict[str, Any]:
    """The diffusers pipeline of a :data:`PIPE_CASES` entry on one device, with X-Slim and without."""
    family, _, which, groups = PIPE_CASES[key]
    pipe = _base_pipeline(family)
    plain = _pipe_call(family, pipe)
    eng = enable_xslim(pipe, XSlimConfig(token_groups=groups, **PIPE_CONFIGS[which]))
    x = _pipe_call(family, pipe)
    log = eng.statistics.decision_log()
    disable_xslim(pipe)
    return {"log": log, "x": x, "plain": plain}


def _xfuser_pipeline(key: str) -> dict[str, Any]:
    """A :data:`PIPE_CASES` entry through xfuser's pipeline: a plain run, then X-Slim."""
    from xslim_xdit.integrations.xfuser_compat import apply_xfuser_cpu_compat

    apply_xfuser_cpu_compat()  # before xfuser is imported (an import sorter would reorder imports)
    from xfuser.core.distributed import (
        get_classifier_free_guidance_world_size,
        get_pipeline_parallel_world_size,
        get_ring_parallel_world_size,
        get_ulysses_parallel_world_size,
    )

    from xslim_xdit.integrations.xfuser import XSlimXFuserWrapper
    from xslim_xdit.testing.xfuser import xfuser_engine_config

    family, xargs, which, _ = PIPE_CASES[key]
    engine_config, _ = xfuser_engine_config(height=64, width=64, **xargs)
    if family == "sd3":
        from xfuser.model_executor.pipelines.pipeline_stable_diffusion_3 import (
            xFuserStableDiffusion3Pipeline as cls,
        )
    else:
        from xfuser.model_executor.pipelines.pipeline_cogvideox import xFuserCogVideoXPipeline as cls
    pipe = cls(_base_pipeline(family), engine_config)
    pipe.set_progress_bar_config(disable=True)
    res: dict[str, Any] = {"transformer": type(pipe.transformer).__name__, "plain": _pipe_call(family, pipe)}
    wrapped = XSlimXFuserWrapper(pipe)
    eng = wrapped.enable_xslim(XSlimConfig(**PIPE_CONFIGS[which]))  # each rank selects within its shard
    res["x"] = _pipe_call(family, wrapped)
    res["log"] = eng.statistics.decision_log()
    res["collectives"] = eng.sync.collectives
    res["degrees"] = (
        get_ulysses_parallel_world_size(),
        get_ring_parallel_world_size(),
        get_classifier_free_guidance_world_size(),
        get_pipeline_parallel_world_size(),
    )
    if eng.pipeline is not None:  # PipeFusion: the decisions travel from stage to stage
        res["stage"], res["messages"] = eng.pipeline.stage, eng.pipeline.messages
        eng.pipeline.close()
    wrapped.disable_xslim()
    return res


def more_cases(rank: int, world: int) -> dict[str, Any]:
    """Every case of one 2-rank launch, keyed ``"<family>/<layout>/<which>"``; a case that raises
    is recorded as ``{"error": traceback}`` (the others still run)."""
    from xslim_xdit.integrations.xfuser_runtime import reset_xfuser_parallel_state

    dist.init_process_group("gloo")
    out: dict[str, Any] = {}

    def case(key: str, fn: Any, *args: Any) -> None:
        try:
            out[key] = fn(*args)
        except Exception:  # recorded: the test shows it; the collectives of later cases still pair up
            out[key] = {"error": traceback.format_exc()}

    try:
        for layout, (ulysses, ring) in LAYOUTS.items():
            _init_runtime(_model("hunyuan_video15"), ulysses, ring)
            for which in ("schedule", "online"):
                case(f"hunyuan_video15/{layout}/{which}", _bare, "hunyuan_video15", which)
            case(f"ltx2/{layout}/online", _bare, "ltx2", "online")
            reset_xfuser_parallel_state()
        for key in PIPE_CASES:
            case(key, _xfuser_pipeline, key)
            reset_xfuser_parallel_state()
        return out
    finally:
        dist.destroy_process_group()
