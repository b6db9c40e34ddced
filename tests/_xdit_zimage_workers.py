"""Rank functions running Z-Image through xfuser 0.7's ``xFuserZImageTransformer2DWrapper`` (bare,
the tiny model, CPU, gloo), and the single-device references they are compared with.

The wrapper chunks the noise refiner's image, the caption and the main layers' ``[image,
caption]`` sequence separately over the sequence-parallel group and splits the batch over the CFG
group. Cases, in one 2-rank launch: Ulysses 2 and Ring 2, each with a schedule (full, block and
skip steps) and the online controller (block polish); CFG parallel 2 (a batch of two samples, one
per rank, as ``ZImagePipeline`` batches its guidance branches), online; diffusers' ``ZImagePipeline``
with the wrapper as its transformer (as xfuser's Z-Image runner uses it) under Ulysses 2 and CFG
parallel 2, online; and the token level's refusal under Ulysses 2 (``ConfigError`` before any work)."""

from __future__ import annotations

import traceback
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist

from xslim_xdit import ConfigError, Schedule, XSlimConfig, disable_xslim, enable_xslim
from xslim_xdit.testing import sample, tiny_model

STEPS = 10
CONFIGS = {
    # FFBBSFSBSF on one device: full, block and skip steps (no token level under SP)
    "schedule": dict(mode="schedule", schedule=Schedule(STEPS, (0, 1, 5, 9), (2, 3, 7), ())),
    # FFSBBBBBBF on one device (batch 1 and batch 2)
    "online": dict(warn=0.12, crit=0.26, polish="block", warmup_steps=2, partial_reset=0.3),
}
#: layout -> (Ulysses, Ring, CFG parallel, the configs run, batch)
LAYOUTS = {
    "ulysses2": (2, 1, False, ("schedule", "online"), 1),
    "ring2": (1, 2, False, ("schedule", "online"), 1),
    "cfg2": (1, 1, True, ("online",), 2),
}
#: ``ZImagePipeline`` (CFG 5.0 batched in one call) with the wrapper as its transformer: its
#: steps, its online config (FFSBBF on one device), and the layouts it runs under
PIPE_STEPS = 6
PIPE_CONFIG = dict(warn=0.3, crit=0.6, polish="block", warmup_steps=2, partial_reset=0.3)
PIPE_LAYOUTS = ("ulysses2", "cfg2")
#: every case, ``"<layout>/<config>"``
CASES = [f"{layout}/{which}" for layout, spec in LAYOUTS.items() for which in spec[3]]


def _log(eng: Any) -> dict[str, Any]:
    records = eng.statistics.run_records()
    return {
        "log": eng.statistics.decision_log(),
        "indicators": [r.indicator for r in records],
    }


def single_device(which: str, batch: int) -> dict[str, Any]:
    """The diffusers ``ZImageTransformer2DModel`` on one device, with X-Slim and without."""
    m = tiny_model("z_image")
    eng = enable_xslim(m, XSlimConfig(**CONFIGS[which]), num_inference_steps=STEPS)
    x = sample(m, "z_image", steps=STEPS, batch=batch)
    res = {**_log(eng), "x": x}
    disable_xslim(m)
    res["plain"] = sample(m, "z_image", steps=STEPS, batch=batch)
    return res


def _pipeline_run(pipe: Any, kwargs: dict[str, Any], enable: Any) -> dict[str, Any]:
    """A plain run of the pipeline, then one with X-Slim (``enable(pipe, config)``), disabled after."""
    plain = pipe(num_inference_steps=PIPE_STEPS, **{**kwargs, "generator": torch.Generator().manual_seed(1)})
    eng = enable(pipe, XSlimConfig(**PIPE_CONFIG))
    x = pipe(num_inference_steps=PIPE_STEPS, **{**kwargs, "generator": torch.Generator().manual_seed(1)})
    res = {**_log(eng), "x": x.images, "plain": plain.images}
    disable_xslim(pipe)
    return res


def single_device_pipeline() -> dict[str, Any]:
    """``ZImagePipeline`` around the diffusers transformer on one device."""
    from xslim_xdit.testing.image_pipelines import tiny_image_pipeline

    return _pipeline_run(*tiny_image_pipeline("z_image"), enable_xslim)


def _xfuser_pipeline() -> dict[str, Any]:
    """The same pipeline with xfuser's wrapper (same weights) as its transformer, X-Slim through
    ``enable_xslim_xdit``, under the current layout."""
    from xslim_xdit.integrations.xfuser import enable_xslim_xdit
    from xslim_xdit.testing.image_pipelines import tiny_image_pipeline

    pipe, kwargs = tiny_image_pipeline("z_image")
    pipe.register_modules(transformer=_wrapped(_drop_joint_attention_kwargs()))
    return _pipeline_run(pipe, kwargs, enable_xslim_xdit)


def _drop_joint_attention_kwargs() -> type:
    """xfuser's wrapper class, taking (and dropping) the ``joint_attention_kwargs=`` that diffusers
    0.42's ``ZImagePipeline`` passes and xfuser 0.7's ``forward`` does not take (a ``TypeError``
    with or without X-Slim: a version mismatch, not a CPU one; the pipeline passes ``None``)."""
    from xfuser.model_executor.models.transformers.transformer_z_image import xFuserZImageTransformer2DWrapper

    class Wrapper(xFuserZImageTransformer2DWrapper):
        def forward(self, *args: Any, joint_attention_kwargs: Any = None, **kwargs: Any) -> Any:
            assert joint_attention_kwargs is None
            return super().forward(*args, **kwargs)

    return Wrapper


def _wrapped(cls: type | None = None) -> torch.nn.Module:
    """xfuser's wrapper (or ``cls``) with the tiny model's config and weights (its ``**kwargs``
    constructor defeats diffusers' ``from_config``: the config is passed as keywords)."""
    from xfuser.model_executor.models.transformers.transformer_z_image import xFuserZImageTransformer2DWrapper

    model = tiny_model("z_image")
    wrapped = (cls or xFuserZImageTransformer2DWrapper)(
        **{k: v for k, v in model.config.items() if not k.startswith("_")}
    )
    wrapped.load_state_dict(model.state_dict())
    return wrapped.eval()


def _init_runtime(ulysses: int, ring: int, cfg: bool) -> None:
    """xfuser's config, groups and runtime state as its runner builds them (no
    ``set_input_parameters``: the wrapper shards its tokens itself); Ring gets SDPA_FLASH."""
    from xslim_xdit.integrations.xfuser_compat import apply_xfuser_cpu_compat

    apply_xfuser_cpu_compat()  # before xfuser is imported: it probes for an accelerator then
    from xfuser.config import xFuserArgs
    from xfuser.core.distributed import init_distributed_environment, initialize_runtime_state

    init_distributed_environment(rank=dist.get_rank(), world_size=dist.get_world_size())
    args = xFuserArgs(
        model="",
        ulysses_degree=ulysses,
        ring_degree=ring,
        use_cfg_parallel=cfg,
        attention_backend="SDPA_FLASH" if ring > 1 else None,
    )
    engine_config, _ = args.create_config()
    engine_config.runtime_config.dtype = torch.float32
    config = tiny_model("z_image").config  # a mapping: xfuser reads the heads as "n_heads" in it
    initialize_runtime_state(SimpleNamespace(transformer=SimpleNamespace(config=config)), engine_config)


def _layout_runs(configs: tuple[str, ...], batch: int) -> dict[str, Any]:
    """Under the current layout: a plain run of the wrapper, one X-Slim run per config (each
    enabled then disabled), and a plain run after them; what xfuser ran."""
    from xfuser.core.distributed import (
        get_classifier_free_guidance_world_size,
        get_ring_parallel_world_size,
        get_ulysses_parallel_world_size,
    )

    from xslim_xdit.integrations.xfuser import enable_xslim_xdit

    xmodel = _wrapped()
    state = {k: v.clone() for k, v in xmodel.state_dict().items()}
    res: dict[str, Any] = {"plain": sample(xmodel, "z_image", steps=STEPS, batch=batch)}
    for which in configs:
        eng = enable_xslim_xdit(xmodel, XSlimConfig(**CONFIGS[which]), num_inference_steps=STEPS)
        x = sample(xmodel, "z_image", steps=STEPS, batch=batch)
        res[which] = {**_log(eng), "x": x, "collectives": eng.sync.collectives}
        disable_xslim(xmodel)
    res["after"] = sample(xmodel, "z_image", steps=STEPS, batch=batch)  # plain again, after disabling
    res["weights_kept"] = all(torch.equal(v, state[k]) for k, v in xmodel.state_dict().items())
    res["degrees"] = (
        get_ulysses_parallel_world_size(),
        get_ring_parallel_world_size(),
        get_classifier_free_guidance_world_size(),
    )
    return res


def _token_refusal() -> str | None:
    """A config with token steps under Ulysses 2: refused before any work."""
    from xslim_xdit.integrations.xfuser import enable_xslim_xdit

    xmodel = _wrapped()
    try:
        enable_xslim_xdit(xmodel, XSlimConfig(polish="token"), num_inference_steps=STEPS)
    except ConfigError as e:
        return str(e)
    disable_xslim(xmodel)
    return None


def zimage_cases(rank: int, world: int) -> dict[str, Any]:
    """Every case of one 2-rank launch; a case that raises is recorded as ``{"error": traceback}``
    (the others still run)."""
    from xslim_xdit.integrations.xfuser_runtime import reset_xfuser_parallel_state

    dist.init_process_group("gloo")
    out: dict[str, Any] = {}
    try:
        for layout, (ulysses, ring, cfg, configs, batch) in LAYOUTS.items():
            _init_runtime(ulysses, ring, cfg)
            try:
                out[layout] = _layout_runs(configs, batch)
                if layout == "ulysses2":
                    out["ulysses2/token"] = _token_refusal()
            except Exception:  # recorded: the test shows it; later layouts' collectives still pair up
                out[layout] = {"error": traceback.format_exc()}
            if layout in PIPE_LAYOUTS:
                try:
                    out[f"{layout}/pipeline"] = _xfuser_pipeline()
                except Exception:
                    out[f"{layout}/pipeline"] = {"error": traceback.format_exc()}
            reset_xfuser_parallel_state()
        return out
    finally:
        dist.destroy_process_group()
