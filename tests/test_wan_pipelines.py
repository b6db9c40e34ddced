"""Wan through its diffusers pipeline: Wan 2.1 (``WanPipeline``, one transformer) and Wan 2.2
A14B's two experts (``transformer`` above the boundary timestep, ``transformer_2`` below it).

With 8 steps of the tiny pipeline's scheduler (shift 3) and ``boundary_ratio=0.7`` the timesteps
are 1000, 948, 883, 801 (``transformer``) then 694, 548, 338, 9 (``transformer_2``): the switch
step is step 4. Blocks that really ran are counted with independent forward hooks.
"""

from __future__ import annotations

import PIL.Image
import pytest
import torch
from torch import nn

from xslim_xdit import (
    Schedule,
    XSlimConfig,
    XSlimPipelineWrapper,
    disable_xslim,
    enable_xslim,
    get_engine,
    get_engines,
)
from xslim_xdit.adapters import UnsupportedModelError
from xslim_xdit.testing.pipelines import TINY_WAN_CALL_KWARGS, tiny_wan_pipeline

STEPS = 8
SWITCH = 4  # first step of transformer_2 (see the module docstring)
FORCED_FULL = XSlimConfig(warn=1e-12, crit=2e-12, polish="auto")


def run(pipe) -> torch.Tensor:
    if type(pipe).__name__ == "WanImageToVideoPipeline":
        # prompt embeddings given: the I2V pipeline's prompt cleaning needs ftfy
        g = torch.Generator().manual_seed(1)
        return pipe(
            image=PIL.Image.fromarray((torch.rand(32, 32, 3, generator=g) * 255).to(torch.uint8).numpy()),
            prompt_embeds=torch.randn(1, 8, 16, generator=g),
            negative_prompt_embeds=torch.randn(1, 8, 16, generator=g),
            num_inference_steps=STEPS,
            output_type="latent",
            generator=torch.Generator().manual_seed(0),
            **TINY_WAN_CALL_KWARGS,
        ).frames
    return pipe(
        "a cat",
        negative_prompt="a dog",
        num_inference_steps=STEPS,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
        **TINY_WAN_CALL_KWARGS,
    ).frames


class BlockCounter:
    """Per transformer call, how many of the model's blocks ran: forward pre-hooks on each block's
    self-attention (a block's own pre-hooks fire even when X-Slim reuses its output), not the
    engine's statistics."""

    def __init__(self, model: nn.Module) -> None:
        self.calls: list[int] = []
        self.handles = [model.register_forward_pre_hook(lambda *_: self.calls.append(0))]
        for blk in model.blocks:
            self.handles.append(blk.attn1.register_forward_pre_hook(self._count))

    def _count(self, *_: object) -> None:
        self.calls[-1] += 1

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _hook_counts(model: nn.Module) -> list[int]:
    return [len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()]


def test_wan21_pipeline_forced_full_is_bit_identical_and_disable_restores():
    pipe = tiny_wan_pipeline()
    ref = run(pipe)
    eng = enable_xslim(pipe, FORCED_FULL)
    assert list(get_engines(pipe)) == ["transformer"]  # no transformer_2: one engine
    out = run(pipe)
    assert torch.equal(out, ref)
    assert eng.statistics.summary()["full"] == STEPS and eng.statistics.summary()["calls"] == 2 * STEPS
    enable_xslim(pipe, XSlimConfig(warn=0.5, crit=1.0, polish="auto", warmup_steps=1))
    cached = run(pipe)
    kinds = get_engine(pipe).statistics.summary()["kinds"]
    disable_xslim(pipe)
    assert not torch.equal(cached, ref) and kinds[-1] == "full" and set(kinds) - {"full"}
    assert torch.equal(run(pipe), ref)
    assert "set_timesteps" not in vars(pipe.scheduler) and "step" not in vars(pipe.scheduler)


def test_two_experts_forced_full_is_bit_identical_and_disable_restores_both():
    pipe = tiny_wan_pipeline(experts=2)
    hooks_before = [_hook_counts(pipe.transformer), _hook_counts(pipe.transformer_2)]
    ref = run(pipe)
    eng = enable_xslim(pipe, FORCED_FULL)
    engines = get_engines(pipe)
    assert list(engines) == ["transformer", "transformer_2"] and engines["transformer"] is eng
    assert engines["transformer_2"] is not eng and engines["transformer_2"].model is pipe.transformer_2
    out = run(pipe)
    disable_xslim(pipe)
    assert torch.equal(out, ref)
    high, low = (e.statistics.run_records() for e in engines.values())
    assert [r.step for r in high if r.branch == 0] == list(range(SWITCH))
    assert [r.step for r in low if r.branch == 0] == list(range(SWITCH, STEPS))
    assert all(r.kind == "full" for r in high + low)
    assert get_engines(pipe) == {}
    assert [_hook_counts(pipe.transformer), _hook_counts(pipe.transformer_2)] == hooks_before
    assert not {"set_timesteps", "set_begin_index", "step"} & set(vars(pipe.scheduler))
    assert torch.equal(run(pipe), ref)


@pytest.mark.parametrize(
    "config",
    [
        # the schedule skips the switch step: the second expert has nothing cached there
        XSlimConfig(
            mode="schedule",
            schedule=Schedule(STEPS, full_steps=(0, 7), token_steps=(2, 5)),
            token_ratio=0.5,
        ),
        XSlimConfig(warn=0.5, crit=1.0, polish="auto", warmup_steps=1),  # online, eager to skip
    ],
    ids=["schedule", "online"],
)
def test_two_experts_have_their_own_caches_and_the_switch_step_runs_in_full(config):
    pipe = tiny_wan_pipeline(experts=2)
    counters = [BlockCounter(pipe.transformer), BlockCounter(pipe.transformer_2)]
    wrapped = XSlimPipelineWrapper(pipe, config)
    engines = get_engines(pipe)
    # each expert's caches after its own calls (the first expert's are freed at the switch step,
    # the second's by disabling)
    held: list[dict] = [{}, {}]
    handles = [
        m.register_forward_hook(lambda *_, i=i, e=e: held.__setitem__(i, dict(e.branches)))
        for i, (m, e) in enumerate(zip((pipe.transformer, pipe.transformer_2), engines.values(), strict=True))
    ]
    run(pipe)
    for h in handles:
        h.remove()
    combined = wrapped.get_cache_statistics()
    caches = held
    assert engines["transformer"].branches == {}  # freed at the switch
    token_kv = [e.token_ctx for e in engines.values()]
    wrapped.disable_xslim()
    for c in counters:
        c.remove()
    high, low = (e.statistics.run_records() for e in engines.values())
    nb = len(pipe.transformer.blocks)
    # every call of each model is in its own engine's records, and the blocks it reports ran
    for counter, recs in zip(counters, (high, low), strict=True):
        assert counter.calls == [r.blocks_computed for r in recs]
        assert len(recs) == 2 * len({r.step for r in recs})  # cond and uncond every step
    switch = [r for r in low if r.step == SWITCH]
    assert [r.kind for r in switch] == ["full", "full"] and counters[1].calls[:2] == [nb, nb]
    assert all(r.kind == "full" for r in low if r.step == STEPS - 1)
    assert {r.kind for r in high + low} - {"full"}, "something was reused"
    # each engine holds caches of its own model's activations (for both guidance branches)
    assert sorted(caches[0]) == sorted(caches[1]) == [0, 1]
    assert all(c[b].residual is not None for c in caches for b in (0, 1))
    assert caches[0][0] is not caches[1][0] and caches[0][0].residual is not caches[1][0].residual
    if config.mode == "schedule":
        assert "no cache yet" in switch[0].reason  # the schedule said skip; nothing to reuse
        assert [r.kind for r in low if r.branch == 0] == ["full", "token", "skip", "full"]
        assert token_kv[0] is not token_kv[1]  # K/V recorded per expert
    # the combined view: every step once, in order, FLOPs of both experts
    s = combined.summary()
    assert s["steps"] == STEPS and s["calls"] == 2 * STEPS
    assert s["kinds"] == [r.kind for r in sorted(high + low, key=lambda r: r.step) if r.branch == 0]
    assert s["flops_full"] == sum(r.flops_full for r in high + low)


def test_two_experts_image_to_video():
    """Wan 2.2 A14B I2V (``WanImageToVideoPipeline``): its ``cache_context`` names no step, so
    each expert counts the shared scheduler's steps; forced full is the plain pipeline, and with
    a schedule the second expert's first step runs in full."""
    pipe = tiny_wan_pipeline(experts=2, image_to_video=True)
    ref = run(pipe)
    enable_xslim(pipe, FORCED_FULL)
    out = run(pipe)
    steps = [
        [r.step for r in e.statistics.run_records() if r.branch == 0] for e in get_engines(pipe).values()
    ]
    assert torch.equal(out, ref) and steps == [list(range(SWITCH)), list(range(SWITCH, STEPS))]
    schedule = Schedule(STEPS, full_steps=(0, 7), block_steps=(3, 6), token_steps=(2, 5))
    enable_xslim(pipe, XSlimConfig(mode="schedule", schedule=schedule, token_ratio=0.5, block_thresh=2.0))
    cached = run(pipe)
    kinds = [
        [r.kind for r in e.statistics.run_records() if r.branch == 0] for e in get_engines(pipe).values()
    ]
    disable_xslim(pipe)
    assert kinds == [["full", "skip", "token", "block"], ["full", "token", "block", "full"]]
    assert not torch.equal(cached, ref) and torch.equal(run(pipe), ref)


def test_a_replaced_scheduler_is_followed_by_both_experts():
    """The I2V pipeline names no step in its cache_context: steps are the scheduler's step()
    calls. A scheduler replaced between runs is noticed at the first expert's first call and
    re-hooked for both, so the second expert still sees steps 4..7 (not 0..3)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe = tiny_wan_pipeline(experts=2, image_to_video=True)
    config = XSlimConfig(mode="schedule", schedule=Schedule(STEPS, full_steps=(0,)))  # all else skips
    enable_xslim(pipe, config)
    run(pipe)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    run(pipe)
    engines = get_engines(pipe)
    low = [(r.step, r.kind) for r in engines["transformer_2"].statistics.run_records() if r.branch == 0]
    disable_xslim(pipe)
    assert low == [(4, "full"), (5, "skip"), (6, "skip"), (7, "skip")]  # as the schedule says
    assert not {"set_timesteps", "set_begin_index", "step"} & set(vars(pipe.scheduler))


def test_an_unsupported_second_expert_leaves_the_pipeline_untouched():
    pipe = tiny_wan_pipeline(experts=2)
    pipe.transformer_2 = nn.Linear(2, 2)
    with pytest.raises(UnsupportedModelError):
        enable_xslim(pipe, FORCED_FULL)
    assert get_engines(pipe) == {} and "set_timesteps" not in vars(pipe.scheduler)
