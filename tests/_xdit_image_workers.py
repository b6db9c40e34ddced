"""Rank functions running the tiny FLUX.2 and Qwen-Image transformers through xfuser's own
sequence-parallel wrappers (``xFuserFlux2Transformer2DWrapper``, ``xFuserQwenImageTransformerWrapper``:
image and text tokens sharded over the ranks), on CPU with gloo, and the single-device references
they are compared with.

One launch runs every case (two spawned ranks importing xfuser take most of a minute on a loaded
CPU): Ulysses 2, then Ring 2 (xfuser's groups torn down and rebuilt in between), each family with
a schedule and with the online controller; then FLUX.2 under PipeFusion 2 through xfuser's
``xFuserFlux2Pipeline`` (synchronous, step and block levels). Qwen-Image runs the step and block levels here; its
token level under Ulysses 2 and Ring 2 is tested in tests/test_parallel_xdit_sp_token.py."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from xslim_xdit import Schedule, XSlimConfig, disable_xslim, enable_xslim
from xslim_xdit.adapters import adapter_named
from xslim_xdit.testing import denoise, sample, tiny_model

STEPS = 10
#: every level: full, block, token and skip steps
SCHEDULE = dict(mode="schedule", schedule=Schedule(STEPS, (0, 1, 5, 9), (2, 7), (3, 4, 6)), token_ratio=0.5)
#: online thresholds under which the tiny FLUX.2 reaches every level (skip, block, token, full)
ONLINE = dict(warn=0.12, crit=0.26, polish="auto", warmup_steps=2, partial_reset=0.3, token_ratio=0.5)
#: Qwen-Image: full, block and skip steps (its token level: tests/test_parallel_xdit_sp_token.py)
QWEN_SCHEDULE = dict(mode="schedule", schedule=Schedule(STEPS, (0, 1, 5, 9), (2, 3, 6, 7)))
#: online, block polish: skip, block (two different masks) and full steps on the tiny Qwen-Image
QWEN_ONLINE = dict(warn=0.12, crit=0.26, polish="block", warmup_steps=2, partial_reset=0.3)
#: FLUX.2 under PipeFusion 2 (xFuserFlux2Pipeline, synchronous: warm-up steps = steps, one patch);
#: no token level (refused under PipeFusion)
PP_STEPS = 6
PP_CONFIGS = {
    "schedule": dict(mode="schedule", schedule=Schedule(PP_STEPS, (0, 1, 5), (2, 4))),
    "online": dict(warn=0.12, crit=0.26, polish="block", warmup_steps=2, partial_reset=0.3),
}
#: (Ulysses, Ring) degrees, in the order one launch runs them
LAYOUTS = {"ulysses2": (2, 1), "ring2": (1, 2)}


def config(which: str, sp: int, family: str = "flux2") -> XSlimConfig:
    """The run's config; ``sp`` token groups make the single device select tokens within each
    rank's shard, as the ranks do."""
    table = {
        ("flux2", "schedule"): SCHEDULE,
        ("flux2", "online"): ONLINE,
        ("qwen_image", "schedule"): QWEN_SCHEDULE,
        ("qwen_image", "online"): QWEN_ONLINE,
    }
    if (family, which) not in table:
        raise ValueError(f"(family, which): one of {sorted(table)}; got {(family, which)!r}")
    return XSlimConfig(token_groups=sp, **table[family, which])


def qwen_inputs() -> tuple[torch.Tensor, dict[str, Any]]:
    """The tiny Qwen-Image's inputs (16 image, 6 text tokens) with every text token valid:
    xfuser's Qwen-Image processor accepts the attention mask and does not use it (its USP call
    takes none), so a padded text token would be attended there and not on one device (read in
    xfuser 0.7's ``transformer_qwen.py``, not measured)."""
    x, cond = adapter_named("qwen_image").tiny_inputs()
    cond["encoder_hidden_states_mask"] = torch.ones_like(cond["encoder_hidden_states_mask"])
    return x, cond


def single_device_qwen(which: str) -> dict[str, Any]:
    """The tiny Qwen-Image on one device, with X-Slim (``which``) and without."""
    m = tiny_model("qwen_image")
    eng = enable_xslim(m, config(which, 2, "qwen_image"), num_inference_steps=STEPS)
    x = denoise(m, "qwen_image", *qwen_inputs(), STEPS)
    log = eng.statistics.decision_log()
    disable_xslim(m)
    return {"log": log, "x": x, "plain": denoise(m, "qwen_image", *qwen_inputs(), STEPS)}


def single_device(sp: int, which: str) -> dict:
    m = tiny_model("flux2")
    eng = enable_xslim(m, config(which, sp), num_inference_steps=STEPS)
    x = sample(m, "flux2", steps=STEPS)
    log = eng.statistics.decision_log()
    disable_xslim(m)
    return {"log": log, "x": x, "plain": sample(m, "flux2", steps=STEPS)}


def _pp_call(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The tiny ``Flux2Pipeline``'s call (prompt embeddings, latent output), seeded afresh."""
    return dict(kwargs, num_inference_steps=PP_STEPS, generator=torch.Generator().manual_seed(3))


def single_device_pipefusion(which: str) -> dict[str, Any]:
    """The tiny ``Flux2Pipeline`` on one device, with X-Slim (``which``) and without."""
    from xslim_xdit.testing.image_pipelines import tiny_image_pipeline

    pipe, kwargs = tiny_image_pipeline("flux2")
    with torch.no_grad():
        plain = pipe(**_pp_call(kwargs)).images
    eng = enable_xslim(pipe, XSlimConfig(**PP_CONFIGS[which]))
    with torch.no_grad():
        x = pipe(**_pp_call(kwargs)).images
    log = eng.statistics.decision_log()
    disable_xslim(pipe)
    return {"log": log, "x": x, "plain": plain}


def _flux2_pipefusion() -> dict[str, Any]:
    """xfuser's ``xFuserFlux2Pipeline`` with PipeFusion 2 (its own transformer wrapper splits the
    blocks into two stages): a plain run, then each X-Slim config. The last stage returns the
    latents; the first returns None."""
    from xfuser.model_executor.pipelines.pipeline_flux2 import xFuserFlux2Pipeline

    from xslim_xdit.integrations.xfuser import enable_xslim_xdit
    from xslim_xdit.testing.image_pipelines import tiny_image_pipeline
    from xslim_xdit.testing.xfuser import xfuser_engine_config

    pipe, kwargs = tiny_image_pipeline("flux2")
    engine_config, _ = xfuser_engine_config(
        torch.float32,
        height=64,
        width=64,
        num_inference_steps=PP_STEPS,
        max_sequence_length=kwargs["prompt_embeds"].shape[1],
        pipefusion_parallel_degree=2,
        num_pipeline_patch=1,
        warmup_steps=PP_STEPS,  # synchronous: PipeFusion's asynchronous patches are stale by design
    )
    xpipe = xFuserFlux2Pipeline(pipe, engine_config)
    with torch.no_grad():
        plain = xpipe(**_pp_call(kwargs))
    out: dict[str, Any] = {}
    for which, cfg in PP_CONFIGS.items():
        eng = enable_xslim_xdit(xpipe, XSlimConfig(**cfg))
        with torch.no_grad():
            x = xpipe(**_pp_call(kwargs))
        out[which] = {
            "log": eng.statistics.decision_log(),
            "x": None if x is None else x.images,
            "plain": None if plain is None else plain.images,
            "stage": eng.pipeline.stage,
            "messages": eng.pipeline.messages,
        }
        eng.pipeline.close()
        disable_xslim(xpipe)
    return out


def _xfuser_run(model: torch.nn.Module, family: str, which: str) -> dict[str, Any]:
    """One X-Slim run of xfuser's wrapper of ``family`` under the current layout, and a plain one."""
    from xfuser.core.distributed import get_ring_parallel_world_size, get_ulysses_parallel_world_size
    from xfuser.model_executor.models.transformers.transformer_flux2 import (
        xFuserFlux2Transformer2DWrapper,
    )
    from xfuser.model_executor.models.transformers.transformer_qwen import (
        xFuserQwenImageTransformerWrapper,
    )

    from xslim_xdit.integrations.xfuser import enable_xslim_xdit

    wrapper = {"flux2": xFuserFlux2Transformer2DWrapper, "qwen_image": xFuserQwenImageTransformerWrapper}[
        family
    ]
    xmodel = wrapper.from_config(model.config)
    xmodel.load_state_dict(model.state_dict())
    xmodel.eval()

    def run() -> torch.Tensor:
        if family == "qwen_image":
            return denoise(xmodel, family, *qwen_inputs(), STEPS)
        return sample(xmodel, family, steps=STEPS)

    plain = run()
    eng = enable_xslim_xdit(xmodel, config(which, 1, family))  # each rank selects within its shard
    eng.default_steps = STEPS
    x = run()
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


def image_cases(rank: int, world: int) -> dict[str, Any]:
    """Every case of one 2-rank launch on the tiny FLUX.2 and Qwen-Image (16 image, 6 text tokens
    each), keyed ``"<family>/<layout>/<which>"``."""
    from xslim_xdit.integrations.xfuser_runtime import init_xfuser_runtime, reset_xfuser_parallel_state

    dist.init_process_group("gloo")
    out: dict[str, Any] = {}
    try:
        models = {family: tiny_model(family) for family in ("flux2", "qwen_image")}
        for layout, (ulysses, ring) in LAYOUTS.items():
            # 4 x 4 image tokens: 64 x 64 pixels (2 x 2 packed latents, VAE factor 8), 6 text
            # tokens; Ring gets SDPA_FLASH on CPU (init_xfuser_runtime: Ring needs the log-sum-exp)
            init_xfuser_runtime(
                models["flux2"],
                height=64,
                width=64,
                max_condition_sequence_length=6,
                ulysses_degree=ulysses,
                ring_degree=ring,
            )
            for family, model in models.items():
                for which in ("schedule", "online"):
                    out[f"{family}/{layout}/{which}"] = _xfuser_run(model, family, which)
            reset_xfuser_parallel_state()
        for which, res in _flux2_pipefusion().items():
            out[f"flux2/pipefusion2/{which}"] = res
        return out
    finally:
        dist.destroy_process_group()
