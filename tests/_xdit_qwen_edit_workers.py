"""Rank functions running the tiny Qwen-Image-Edit through xfuser's ``xFuserQwenImageEditPipeline``
under CFG parallel 2 (its transformer xfuser's ``xFuserQwenImageTransformerWrapper``, as xfuser's
runner loads it), on CPU with gloo, and the single-device ``QwenImageEditPipeline`` references.

xfuser's pipeline runs the parent pipeline's single-branch path on both ranks, the negative
prompt swapped into ``prompt`` on CFG rank 0, and combines the all-gathered predictions in a
forward hook; so both ranks' calls are named ``cache_context("cond")``. ``enable_xslim_xdit``
names them by CFG rank (``"uncond"`` on rank 0, ``"cond"`` on rank 1) so that the lead-branch
rule applies; the ``*/unwired`` cases keep xfuser's names (the plain sums).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from xslim_xdit import Schedule, XSlimConfig, XSlimPipelineWrapper, get_engines
from xslim_xdit.testing.edit_pipelines import reference_area, tiny_qwen_edit_pipeline

STEPS = 6
#: online, block polish: full, skip and block steps on the tiny model
ONLINE = dict(warn=0.12, crit=0.3, polish="block", warmup_steps=1, block_first_n=0, block_thresh=1.0)
#: every level: full, block (2), token (3) and skip (4) steps
SCHEDULE = dict(mode="schedule", schedule=Schedule(STEPS, (0, 1, 5), (2,), (3,)), token_ratio=0.5)
#: the branches far apart: a long, channel-skewed negative prompt (64 tokens against the
#: prompt's 6; each channel scaled by exp(3 z)), under which the unconditional branch ranks the
#: blocks differently from the conditional one. Scaling the negative embeddings as a whole (the
#: Wan test's x 30) changes nothing here: Qwen-Image's ``txt_norm`` (an RMSNorm) removes the scale.
STRONG_THRESHOLD = 1.1
#: case -> (config fields, negative prompt: "plain", "strong" or "none"); "unguided": no negative
#: prompt, so one call per step, and xfuser's pipeline runs the same branch on both ranks
CASES: dict[str, tuple[dict[str, Any], str]] = {
    "online": (ONLINE, "plain"),
    "schedule": (SCHEDULE, "plain"),
    "strong": ({**ONLINE, "block_thresh": STRONG_THRESHOLD}, "strong"),
    "unguided": (ONLINE, "none"),
}


def case(which: str) -> tuple[dict[str, Any], str]:
    """The config fields and the negative prompt of case ``which``: a key of :data:`CASES`, or
    ``"block_<block_thresh>_<negative>"`` (:data:`ONLINE` at that threshold)."""
    if which in CASES:
        return CASES[which]
    _, thresh, negative = which.split("_")
    return {**ONLINE, "block_thresh": float(thresh)}, negative


def strong_negative(width: int) -> torch.Tensor:
    """64 negative prompt tokens of ``width`` channels, each channel scaled by ``exp(3 z)``."""
    tokens = torch.randn(1, 64, width, generator=torch.Generator().manual_seed(5))
    return tokens * torch.exp(3 * torch.randn(width, generator=torch.Generator().manual_seed(3)))


def _call(pipe: Any, negative: str) -> torch.Tensor:
    """The tiny edit call (6 steps, true CFG 4.0), every prompt token valid: xfuser's Qwen-Image
    processor attends without a key mask, so a padded token would be attended under xfuser and
    not on one device (docs/parallel.md). ``negative``: the tiny pipeline's 5 tokens ("plain"),
    :func:`strong_negative` ("strong"), or none ("none": no guidance)."""
    _, kwargs = tiny_qwen_edit_pipeline()
    kwargs["prompt_embeds_mask"] = torch.ones_like(kwargs["prompt_embeds_mask"])
    if negative == "strong":
        kwargs["negative_prompt_embeds"] = strong_negative(kwargs["negative_prompt_embeds"].shape[-1])
        kwargs["negative_prompt_embeds_mask"] = torch.ones(1, 64, dtype=torch.long)
    elif negative == "none":
        del kwargs["negative_prompt_embeds"], kwargs["negative_prompt_embeds_mask"], kwargs["true_cfg_scale"]
    with reference_area(64 * 64), torch.no_grad():
        return pipe(num_inference_steps=STEPS, **kwargs).images


def _result(pipe: Any, wrapper: type, which: str, wired: bool = True) -> dict[str, Any]:
    """A plain run, then one through ``wrapper(pipe, config)``: the decision log, the indicator
    of each step's first call (branch 0: one device's ``"cond"``, a rank's only branch), the
    latents, and a plain run after disabling. ``wired=False``: the room reads xfuser's own call names (both ``"cond"``)."""
    cfg, negative = case(which)
    plain = _call(pipe, negative)
    wrapped = wrapper(pipe, XSlimConfig(**cfg))
    (engine,) = get_engines(pipe).values()
    if not wired:
        engine.room.branch_name = lambda clock=engine.clock: clock.name
    x = _call(wrapped, negative)
    records = engine.statistics.run_records()
    res = {
        # the branch the room read for the run's last call (a "cond" call on every rank)
        "branch": engine.room.branch_name() if engine.room.branch_name is not None else None,
        "log": engine.statistics.decision_log(),
        "indicators": [r.indicator for r in records if r.branch == 0],
        "calls": len(records),
        "x": x,
        "plain": plain,
        "collectives": engine.sync.collectives,
    }
    wrapped.disable_xslim()
    res["after"] = _call(pipe, negative)  # disabled: the pipeline runs as before enabling
    return res


def single_device(which: str) -> dict[str, Any]:
    """Diffusers' ``QwenImageEditPipeline`` on one device (both branches each step)."""
    pipe, _ = tiny_qwen_edit_pipeline()
    return _result(pipe, XSlimPipelineWrapper, which)


def _xfuser_pipe() -> Any:
    """xfuser's runtime under CFG parallel 2 (no SP), then ``xFuserQwenImageEditPipeline`` with
    the tiny pipeline's components, the transformer copied into xfuser's
    ``xFuserQwenImageTransformerWrapper`` (same weights)."""
    from xslim_xdit.integrations.xfuser_runtime import init_xfuser_runtime

    base, _ = tiny_qwen_edit_pipeline()
    # 64 x 64 px output; the 6 prompt tokens (the runtime's text length is not read without SP)
    init_xfuser_runtime(
        base.transformer, height=64, width=64, max_condition_sequence_length=6, use_cfg_parallel=True
    )
    from xfuser.model_executor.models.transformers.transformer_qwen import xFuserQwenImageTransformerWrapper
    from xfuser.model_executor.pipelines.pipeline_qwen_image_edit import xFuserQwenImageEditPipeline

    wrapped = xFuserQwenImageTransformerWrapper.from_config(base.transformer.config)
    wrapped.load_state_dict(base.transformer.state_dict())
    pipe = xFuserQwenImageEditPipeline(**{**base.components, "transformer": wrapped.eval()})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def qwen_edit_cfg_cases(
    rank: int, world: int, cases: tuple[str, ...], unwired: tuple[str, ...]
) -> dict[str, Any]:
    """Every case of one 2-rank launch under CFG parallel 2, keyed ``"cfg2/<which>"`` (and
    ``"cfg2/<which>/unwired"`` for ``unwired``)."""
    dist.init_process_group("gloo")
    out: dict[str, Any] = {}
    try:
        pipe = _xfuser_pipe()
        from xfuser.core.distributed import (
            get_classifier_free_guidance_rank,
            get_classifier_free_guidance_world_size,
        )

        from xslim_xdit.integrations.xfuser import XSlimXFuserWrapper

        out["cfg"] = (get_classifier_free_guidance_world_size(), get_classifier_free_guidance_rank())
        for which in cases:
            out[f"cfg2/{which}"] = _result(pipe, XSlimXFuserWrapper, which)
        for which in unwired:
            out[f"cfg2/{which}/unwired"] = _result(pipe, XSlimXFuserWrapper, which, wired=False)
        return out
    finally:
        dist.destroy_process_group()
