"""Rank functions running tiny Wan through xfuser's own sequence-parallel wrapper
(``xFuserWanTransformer3DWrapper``: the video tokens sharded over the SP group, Ulysses/Ring
attention in the self-attention, the text whole on every rank), on CPU with gloo, and the
single-device references they are compared with.

One launch runs every case (two spawned ranks importing xfuser take most of a minute on a loaded
CPU): the bare transformer under Ulysses 2 and Ring 2 (xfuser's groups torn down and rebuilt in
between), each with the online controller and with a schedule, the Wan 2.2 A14B two-expert
``WanPipeline`` under Ulysses 2, and Wan 2.2 A14B I2V in xfuser's ``xFuserWanImageToVideoPipeline``
under CFG parallel 2 (its only Wan pipeline with CFG parallelism).
"""

from __future__ import annotations

import functools
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist

from xslim_xdit import Schedule, XSlimConfig, XSlimPipelineWrapper, disable_xslim, enable_xslim, get_engines
from xslim_xdit.testing import sample, tiny_model

STEPS = 10
#: online thresholds under which the tiny Wan (2 x 8 x 8 latents: 32 tokens) reaches every level
ONLINE = dict(warn=0.12, crit=0.26, polish="auto", warmup_steps=2, partial_reset=0.3, token_ratio=0.5)
#: every level: full, block, token and skip steps
SCHEDULE = dict(mode="schedule", schedule=Schedule(STEPS, (0, 1, 5, 9), (2, 7), (3, 4, 6)), token_ratio=0.5)
#: the two-expert pipeline's steps (the tiny scheduler switches experts at step 4 of 8, see
#: tests/test_wan_pipelines.py); each expert refreshes tokens and blocks, the switch step is full
PIPE_STEPS = 8
PIPE_SCHEDULE = dict(
    mode="schedule",
    schedule=Schedule(PIPE_STEPS, (0, 4, 7), (2, 6), (1, 5)),
    token_ratio=0.5,
)
#: online on the I2V pipeline (8 steps, an expert switch at step 4)
I2V_ONLINE = dict(warn=0.12, crit=0.26, polish="auto", warmup_steps=1, token_ratio=0.5)
#: issue #11, block polish under CFG parallel: with the negative prompt embeddings x 30 the two
#: branches rank their blocks differently; these thresholds chose other masks under CFG parallel
#: than on one device before the lead-branch rule (docs/parallel.md)
I2V_BLOCK = dict(warn=0.12, crit=0.26, polish="block", warmup_steps=1, block_first_n=0)
I2V_BLOCK_THRESHOLDS = (0.9, 1.1)
I2V_BLOCK_CASES = tuple(f"i2v_block_{t}" for t in I2V_BLOCK_THRESHOLDS)
NEGATIVE_SCALE = 30.0
#: the layouts of the bare transformer, in the order one launch runs them
LAYOUTS = {"ulysses2": (2, 1), "ring2": (1, 2)}


def config(which: str, sp: int) -> XSlimConfig:
    """The run's config; ``sp`` token groups make the single device select tokens within each
    rank's shard, as the ranks do (contiguous chunks of the flattened video tokens).
    ``"i2v_block_<thresh>"``: :data:`I2V_BLOCK` with that ``block_thresh``."""
    if which.startswith("i2v_block_"):
        return XSlimConfig(block_thresh=float(which.removeprefix("i2v_block_")), **I2V_BLOCK)
    table = {"online": ONLINE, "schedule": SCHEDULE, "pipeline": PIPE_SCHEDULE, "i2v_online": I2V_ONLINE}
    return XSlimConfig(token_groups=sp, **table[which])


def single_device(sp: int, which: str) -> dict[str, Any]:
    """The bare tiny Wan on one device, with X-Slim (``which``) and without."""
    m = tiny_model("wan")
    eng = enable_xslim(m, config(which, sp), num_inference_steps=STEPS)
    x = sample(m, "wan", steps=STEPS)
    log = eng.statistics.decision_log()
    disable_xslim(m)
    return {"log": log, "x": x, "plain": sample(m, "wan", steps=STEPS)}


def _run_pipe(call: Any) -> torch.Tensor:
    from xslim_xdit.testing.pipelines import TINY_WAN_CALL_KWARGS

    return call(
        "a cat",
        negative_prompt="a dog",
        num_inference_steps=PIPE_STEPS,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
        **TINY_WAN_CALL_KWARGS,
    ).frames


def _run_i2v(call: Any, negative_scale: float = 1.0) -> torch.Tensor:
    """Wan 2.2 A14B I2V's call (prompt embeddings given: the I2V pipeline's prompt cleaning
    needs ftfy), as tests/test_wan_pipelines.py makes it; ``negative_scale`` scales the negative
    prompt embeddings (x 30: the branches' per-block magnitudes rank differently)."""
    import PIL.Image

    from xslim_xdit.testing.pipelines import TINY_WAN_CALL_KWARGS

    g = torch.Generator().manual_seed(1)
    return call(
        image=PIL.Image.fromarray((torch.rand(32, 32, 3, generator=g) * 255).to(torch.uint8).numpy()),
        prompt_embeds=torch.randn(1, 8, 16, generator=g),
        negative_prompt_embeds=torch.randn(1, 8, 16, generator=g) * negative_scale,
        num_inference_steps=PIPE_STEPS,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
        **TINY_WAN_CALL_KWARGS,
    ).frames


def _pipe_result(
    pipe: Any, cfg: XSlimConfig, wrapper: type, run: Any = None, lead_rule: bool = True
) -> dict[str, Any]:
    """Plain run, then a run through ``wrapper(pipe, cfg)`` (X-Slim's pipeline wrapper, or its
    xDiT one): both experts' decision logs. ``lead_rule=False``: the rooms are not told the
    calls' guidance branches (the summed rule from before issue #11's lead-branch rule)."""
    run = run or _run_pipe
    plain = run(pipe)
    wrapped = wrapper(pipe, cfg)
    engines = get_engines(pipe)
    if not lead_rule:
        for e in engines.values():
            e.room.branch_name = None
    x = run(wrapped)
    res = {
        "logs": {name: e.statistics.decision_log() for name, e in engines.items()},
        # the step indicator each decision read (branch 0: one device's first branch, a rank's own)
        "indicators": {
            name: [r.indicator for r in e.statistics.run_records() if r.branch == 0]
            for name, e in engines.items()
        },
        # transformer calls per expert: two per step on one device (both guidance branches), one
        # per rank under CFG parallel
        "calls": {name: len(e.statistics.run_records()) for name, e in engines.items()},
        "x": x,
        "plain": plain,
        "collectives": sum(e.sync.collectives for e in engines.values()),
    }
    wrapped.disable_xslim()
    return res


def single_device_pipeline(sp: int) -> dict[str, Any]:
    """Wan 2.2 A14B's two experts in a ``WanPipeline`` on one device."""
    from xslim_xdit.testing.pipelines import tiny_wan_pipeline

    pipe = tiny_wan_pipeline(experts=2)
    pipe.set_progress_bar_config(disable=True)
    return _pipe_result(pipe, config("pipeline", sp), XSlimPipelineWrapper)


def _i2v_run_for(which: str) -> Any:
    """The I2V call of case ``which``: the block-polish cases scale the negative embeddings."""
    if which.startswith("i2v_block_"):
        return functools.partial(_run_i2v, negative_scale=NEGATIVE_SCALE)
    return _run_i2v


def single_device_i2v(which: str) -> dict[str, Any]:
    """Wan 2.2 A14B I2V's two experts in diffusers' ``WanImageToVideoPipeline`` on one device."""
    from xslim_xdit.testing.pipelines import tiny_wan_pipeline

    pipe = tiny_wan_pipeline(experts=2, image_to_video=True)
    pipe.set_progress_bar_config(disable=True)
    return _pipe_result(pipe, config(which, 1), XSlimPipelineWrapper, _i2v_run_for(which))


def _xfuser_wan(model: torch.nn.Module) -> torch.nn.Module:
    """xfuser's Wan wrapper with ``model``'s config and weights (after the runtime set-up, which
    makes xfuser importable without an accelerator)."""
    from xfuser.model_executor.models.transformers.transformer_wan import xFuserWanTransformer3DWrapper

    wrapped = xFuserWanTransformer3DWrapper.from_config(model.config)
    wrapped.load_state_dict(model.state_dict())
    return wrapped.eval()


def _init_wan_runtime(model: torch.nn.Module, ulysses: int, ring: int, cfg: bool = False) -> None:
    """xfuser's config, groups and runtime state as its Wan runner builds them (as
    examples/wan_example.py does): without ``set_input_parameters``, whose patch arithmetic takes
    an integer ``patch_size`` (Wan's is a 3-tuple: TypeError); the Wan wrapper shards the video
    tokens itself. Ring gets SDPA_FLASH (Ring needs the log-sum-exp; the CPU compat layer routes it)."""
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
        use_cfg_parallel=cfg,
    )
    engine_config, _ = args.create_config()
    engine_config.runtime_config.dtype = torch.float32
    config = SimpleNamespace(**dict(model.config))
    initialize_runtime_state(SimpleNamespace(transformer=SimpleNamespace(config=config)), engine_config)


def _bare(which: str) -> dict[str, Any]:
    """One X-Slim run of the bare wrapped transformer under the current layout."""
    from xslim_xdit.integrations.xfuser import enable_xslim_xdit

    xmodel = _xfuser_wan(tiny_model("wan"))
    plain = sample(xmodel, "wan", steps=STEPS)
    eng = enable_xslim_xdit(xmodel, config(which, 1))  # each rank selects within its own shard
    eng.default_steps = STEPS
    x = sample(xmodel, "wan", steps=STEPS)
    res = {"log": eng.statistics.decision_log(), "x": x, "plain": plain, "collectives": eng.sync.collectives}
    disable_xslim(xmodel)
    # the layout xfuser really ran (a Ring case must not silently run as Ulysses)
    from xfuser.core.distributed import get_ring_parallel_world_size, get_ulysses_parallel_world_size

    res["degrees"] = (get_ulysses_parallel_world_size(), get_ring_parallel_world_size())
    return res


def wan_cases(rank: int, world: int) -> dict[str, Any]:
    """Every Wan case of one 2-rank launch, keyed ``"<layout>/<which>"``."""
    from xslim_xdit.integrations.xfuser import XSlimXFuserWrapper
    from xslim_xdit.integrations.xfuser_runtime import reset_xfuser_parallel_state
    from xslim_xdit.testing.pipelines import TINY_WAN_CALL_KWARGS, tiny_wan_pipeline

    dist.init_process_group("gloo")
    out: dict[str, Any] = {}
    try:
        model = tiny_model("wan")
        for layout, (ulysses, ring) in LAYOUTS.items():
            _init_wan_runtime(model, ulysses, ring)
            for which in ("online", "schedule"):
                out[f"{layout}/{which}"] = _bare(which)
            if layout == "ulysses2":  # Wan 2.2 A14B: both experts in xfuser's wrapper, an engine each
                pipe = tiny_wan_pipeline(experts=2)
                pipe.transformer = _xfuser_wan(pipe.transformer)
                pipe.transformer_2 = _xfuser_wan(pipe.transformer_2)
                pipe.set_progress_bar_config(disable=True)
                assert TINY_WAN_CALL_KWARGS["height"] == 32  # 2 x 2 x 2 = 8 video tokens: 4 per rank
                out["ulysses2/pipeline"] = _pipe_result(pipe, config("pipeline", 1), XSlimXFuserWrapper)
            reset_xfuser_parallel_state()
        # CFG parallel 2: xfuser's Wan I2V pipeline puts one guidance branch on each rank
        _init_wan_runtime(model, 1, 1, cfg=True)
        from xfuser.model_executor.pipelines.pipeline_wan_i2v import xFuserWanImageToVideoPipeline

        base = tiny_wan_pipeline(experts=2, image_to_video=True)
        pipe = xFuserWanImageToVideoPipeline(
            **base.components,
            boundary_ratio=base.config.boundary_ratio,
            expand_timesteps=base.config.expand_timesteps,
        )
        pipe.transformer = _xfuser_wan(base.transformer)
        pipe.transformer_2 = _xfuser_wan(base.transformer_2)
        pipe.set_progress_bar_config(disable=True)
        from xfuser.core.distributed import get_classifier_free_guidance_world_size

        for which in ("pipeline", "i2v_online", *I2V_BLOCK_CASES):
            out[f"cfg2/{which}"] = _pipe_result(
                pipe, config(which, 1), XSlimXFuserWrapper, _i2v_run_for(which)
            )
            out[f"cfg2/{which}"]["cfg_degree"] = get_classifier_free_guidance_world_size()
        # the summed rule once, to show the block cases tell the two rules apart
        which = I2V_BLOCK_CASES[0]
        out[f"cfg2/{which}/summed"] = _pipe_result(
            pipe, config(which, 1), XSlimXFuserWrapper, _i2v_run_for(which), lead_rule=False
        )
        return out
    finally:
        dist.destroy_process_group()
