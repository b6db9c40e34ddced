"""The per-family suite on the variants of the Wan and SD3 families that their tiny configs do not
cover: SD3.0 (no query/key norm), SD3.5 Medium (dual-attention blocks: token refresh refused,
skip and block levels served), Wan 2.1 image-to-video (CLIP image tokens through ``attn2``'s
added K/V) and Wan 2.2 TI2V's per-token timesteps. Then what the families' pipelines do around
the transformer: SD3.5's skip-layer guidance call, SD3's ControlNet samples between blocks, half
precision, and guidance branches called separately (each with K/V of its own)."""

from __future__ import annotations

import pytest
import torch
from _helpers import AttentionCounter
from family_suite import FamilyTesterMixin, _restorable_state

from xslim_xdit import Schedule, XSlimConfig, disable_xslim, enable_xslim
from xslim_xdit.config import ConfigError
from xslim_xdit.testing import sample, tiny_model


class TestSD30Family(FamilyTesterMixin):
    """SD3.0: the joint attention without query/key norms."""

    family = "sd3"

    def model(self):
        return tiny_model("sd3", qk_norm=None)


class TestWanImageToVideoFamily(FamilyTesterMixin):
    """Wan 2.1 I2V: the cross-attention also attends to CLIP image tokens (added K/V)."""

    family = "wan"

    def model(self):
        return tiny_model("wan", image_dim=8, added_kv_proj_dim=24)

    def sample(self, model, steps=None):
        return sample(model, self.family, steps=steps or self.steps, batch=self.batch, image_tokens=3)


@torch.no_grad()
def _sample_per_token_timesteps(model, steps: int, batch: int) -> torch.Tensor:
    """Wan 2.2 TI2V's loop: a timestep per video token, the first frame's tokens (the conditioning
    image) at 0, as the pipeline's ``expand_timesteps`` passes them."""
    from xslim_xdit.adapters import adapter_named

    wan = adapter_named("wan")
    x, cond = wan.tiny_inputs(batch=batch)  # 2 frames of 4x4 patches
    for t in wan.timesteps(steps):
        timestep = torch.full((batch, 32), t)
        timestep[:, :16] = 0.0
        x = x - (1.0 / steps) * model(x, timestep=timestep, return_dict=False, **cond)[0]
    return x


class TestWanPerTokenTimestepFamily(FamilyTesterMixin):
    """Wan 2.2 TI2V: a timestep per token (``temb`` of shape (batch, tokens, 6, dim)); the step
    is read as the largest timestep, and token refresh gives the selected tokens their ``temb``."""

    family = "wan"

    def model(self):
        # 6 blocks: with a timestep per token the embedding's cost grows with the tokens, and a
        # skipped step is checked to cost under a fifth of a full one
        return tiny_model("wan", num_layers=6)

    def sample(self, model, steps=None):
        return _sample_per_token_timesteps(model, steps or self.steps, self.batch)

    def test_the_step_timestep_is_the_largest_of_the_first_sample(self):
        from xslim_xdit.adapters import adapter_named

        t = torch.tensor([[0.0, 0.0, 750.0], [0.0, 0.0, 250.0]])
        assert adapter_named("wan").timestep(self.model(), (None, t), {}) == 750.0


class TestSD35MediumFamily(FamilyTesterMixin):
    """SD3.5 Medium: blocks 0 and 1 have a second self-attention ``attn2``. Token refresh is
    refused with an error naming the family and the level; skip and block levels run."""

    family = "sd3"
    block_only = dict(polish="block")

    def model(self):
        return tiny_model("sd3", dual_attention_layers=(0, 1))

    def test_disabled_is_bit_identical(self):
        model = self.model()
        before = _restorable_state(model)
        ref = self.sample(model)
        enable_xslim(
            model, XSlimConfig(warn=0.5, crit=1.0, **self.block_only), num_inference_steps=self.steps
        )
        cached = self.sample(model)
        disable_xslim(model)
        assert torch.equal(self.sample(model), ref) and not torch.equal(cached, ref)
        assert _restorable_state(model) == before

    def test_online_decisions_match_the_statistics(self):
        model = self.model()
        cfg = XSlimConfig(warn=0.05, crit=0.5, warmup_steps=2, **self.block_only)
        eng = enable_xslim(model, cfg, num_inference_steps=self.steps)
        self.sample(model)
        disable_xslim(model)
        kinds = [r.kind for r in eng.statistics.run_records()]
        assert len(kinds) == self.steps and kinds[:2] == ["full", "full"] and kinds[-1] == "full"
        assert "token" not in kinds
        assert all(eng.statistics.summary()[k] == kinds.count(k) for k in ("full", "block", "skip"))

    def test_each_level_matches_what_ran(self):
        """Skip and block levels: what ran is what the statistics say."""
        model = self.model()
        schedule = Schedule(self.steps, full_steps=(0, 1, 4, 7), block_steps=(2, 5))
        counter = AttentionCounter(model)
        eng = enable_xslim(
            model,
            XSlimConfig(mode="schedule", schedule=schedule, block_thresh=2.0),
            num_inference_steps=self.steps,
        )
        self.sample(model)
        disable_xslim(model)
        counter.remove()
        recs = eng.statistics.run_records()
        assert [r.kind for r in recs] == ["full", "full", "block", "skip", "full", "block", "skip", "full"]
        assert counter.blocks_per_call() == [r.blocks_computed for r in recs]
        for i, r in enumerate(recs):
            if r.kind == "block":
                assert [g for g, _ in counter.calls[i]] == [g for g, c in enumerate(r.blocks_mask) if c]
                assert 0 < counter.blocks_per_call()[i] < counter.num_blocks

    def test_token_refresh_at_ratio_one_equals_full(self):
        """Replaced: token refresh is refused on the dual-attention blocks, clearly and before any
        work starts (when X-Slim is enabled, not at the run's first token step), for a schedule
        with token steps and for the online ``polish="auto"``; the model is left unchanged."""
        model = self.model()
        before = _restorable_state(model)
        ref = self.sample(model, steps=6)
        schedule = Schedule(6, full_steps=(0, 1, 5), token_steps=(3, 4))
        for cfg in (
            XSlimConfig(mode="schedule", schedule=schedule, token_ratio=1.0),
            XSlimConfig(polish="auto"),
        ):
            with pytest.raises(
                ConfigError,
                match=r"family 'sd3': token refresh \(level 'token'\).*dual-attention blocks \[0, 1\]",
            ):
                enable_xslim(model, cfg, num_inference_steps=6)
            assert _restorable_state(model) == before
        assert torch.equal(self.sample(model, steps=6), ref)
        # block polish still runs on this model
        eng = enable_xslim(model, XSlimConfig(polish="block"), num_inference_steps=6)
        self.sample(model, steps=6)
        assert len(eng.statistics.run_records()) == 6
        disable_xslim(model)
        assert torch.equal(self.sample(model, steps=6), ref)
        assert _restorable_state(model) == before


@torch.no_grad()
def _sample_with_skip_layer_guidance(model, steps: int = 6) -> torch.Tensor:
    """SD3.5's skip-layer guidance: per step a plain call and a call with ``skip_layers`` (those
    blocks are not called at all), combined as the pipeline does."""
    from xslim_xdit.adapters import adapter_named

    sd3 = adapter_named("sd3")
    x, cond = sd3.tiny_inputs(batch=2)
    for t in sd3.timesteps(steps):
        tt = sd3.timestep_input(t, 2)
        out = model(x, timestep=tt, return_dict=False, **cond)[0]
        slg = model(x, timestep=tt, return_dict=False, skip_layers=[1, 2], **cond)[0]
        x = x - (1.0 / steps) * (out + 0.5 * (out - slg))
    return x


def test_sd3_skip_layer_guidance_branch():
    """The skip-layer-guidance call is a branch of its own: forced full is bit-identical, and
    token refresh at ratio 1 (all blocks computed on the block step) equals the full computation."""
    model = tiny_model("sd3", num_layers=4)
    ref = _sample_with_skip_layer_guidance(model)
    eng = enable_xslim(model, XSlimConfig(warn=1e-12, crit=2e-12, polish="auto"), num_inference_steps=6)
    assert torch.equal(_sample_with_skip_layer_guidance(model), ref)
    disable_xslim(model)
    assert [r.kind for r in eng.statistics.run_records()] == ["full"] * 12  # two calls per step
    schedule = Schedule(6, full_steps=(0, 1, 5), block_steps=(2,), token_steps=(3, 4))
    cfg = XSlimConfig(mode="schedule", schedule=schedule, token_ratio=1.0, block_thresh=1e-9)
    eng = enable_xslim(model, cfg, num_inference_steps=6)
    out = _sample_with_skip_layer_guidance(model)
    disable_xslim(model)
    assert [r.kind for r in eng.statistics.run_records()][4:10] == ["block", "block"] + ["token"] * 4
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("family", ["wan", "sd3"])
def test_every_level_runs_in_half_precision(family, dtype):
    """Skip, block and token steps in bf16 and fp16: the K/V cache and the residuals keep the
    model's dtype and the output stays finite."""
    from xslim_xdit.testing import make_inputs, timesteps_for

    model = tiny_model(family).to(dtype)
    schedule = Schedule(10, full_steps=(0, 1, 5, 9), block_steps=(2, 6), token_steps=(3, 7))
    eng = enable_xslim(model, XSlimConfig(mode="schedule", schedule=schedule), num_inference_steps=10)
    x, cond = make_inputs(family, batch=2)
    cond = {k: v.to(dtype) for k, v in cond.items()}
    outs = []
    with torch.no_grad():
        for t in timesteps_for(family, 10):
            outs.append(model(x.to(dtype), timestep=torch.tensor([t, t]), return_dict=False, **cond)[0])
    kinds = [r.kind for r in eng.statistics.run_records()]
    dtypes = {st.residual.dtype for st in eng.branches.values()}
    dtypes |= {t.dtype for pair in eng.token_ctx.kv.values() for t in pair if t is not None}
    disable_xslim(model)
    assert {"skip", "block", "token", "full"} <= set(kinds)
    assert dtypes == {dtype}
    assert all(torch.isfinite(o).all() for o in outs)


def test_a_branch_of_another_batch_size_refreshes_tokens_against_its_own_kv():
    """SD3.5's skip-layer guidance call carries the conditional half of the batch only: its token
    steps splice into K/V of its own (each guidance branch keeps its own K/V), so both branches
    run their token steps, and the plain branch's outputs do not depend on the other branch."""
    from xslim_xdit.adapters import adapter_named

    sd3 = adapter_named("sd3")
    schedule = Schedule(4, full_steps=(0, 1, 3), token_steps=(2,))

    def run(with_skip_layer_branch: bool):
        model = tiny_model("sd3")
        x, cond = sd3.tiny_inputs(batch=2)
        engine = enable_xslim(
            model, XSlimConfig(mode="schedule", schedule=schedule, token_ratio=0.5), num_inference_steps=4
        )
        outs = []
        with torch.no_grad():
            for t in sd3.timesteps(4):
                outs.append(model(x, timestep=sd3.timestep_input(t, 2), return_dict=False, **cond)[0])
                if with_skip_layer_branch:
                    half = {k: v[:1] for k, v in cond.items()}
                    model(
                        x[:1], timestep=sd3.timestep_input(t, 1), return_dict=False, skip_layers=[1], **half
                    )
        records = [(r.step, r.branch, r.kind) for r in engine.statistics.run_records()]
        disable_xslim(model)
        return outs, records

    alone, _ = run(False)
    together, records = run(True)
    assert [(s, b, k) for s, b, k in records if s == 2] == [(2, 0, "token"), (2, 1, "token")]
    for a, b in zip(alone, together, strict=True):
        assert torch.equal(a, b)


_SAME_INPUTS_REUSE = {
    "skip": XSlimConfig(mode="schedule", schedule=Schedule(3, full_steps=(0, 2)), extrapolate="none"),
    "block": XSlimConfig(
        mode="schedule", schedule=Schedule(3, full_steps=(0, 2), block_steps=(1,)), block_thresh=100.0
    ),
    "token": XSlimConfig(
        mode="schedule", schedule=Schedule(3, full_steps=(0, 2), token_steps=(1,)), token_ratio=0.01
    ),
}


@pytest.mark.parametrize("level", sorted(_SAME_INPUTS_REUSE))
def test_sd3_controlnet_residuals_with_the_same_inputs_reproduce_the_full_step(level):
    """SD3's ControlNet samples are added to the image stream between blocks (not after the last,
    ``context_pre_only`` block): with the same inputs twice, a step reusing the full step's
    residuals gives the full step's output (the samples are counted once)."""
    from xslim_xdit.testing import make_inputs

    model = tiny_model("sd3")
    x, cond = make_inputs("sd3", seed=3)
    g = torch.Generator().manual_seed(5)
    control = [torch.randn(1, 16, 16, generator=g) for _ in range(2)]
    eng = enable_xslim(model, _SAME_INPUTS_REUSE[level], num_inference_steps=3)
    eng.clock.follow_scheduler()  # the steps are told apart as a scheduler tells them (same timestep)
    outs = []
    with torch.no_grad():
        for _ in range(2):
            out = model(x, timestep=torch.tensor([500.0]), block_controlnet_hidden_states=control, **cond)
            outs.append(out.sample)
            eng.clock.step_done()
    kinds = eng.statistics.summary()["kinds"]
    disable_xslim(model)
    assert kinds[0] == "full" and kinds[1] == level, kinds
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-4)


def test_token_refresh_of_a_branch_does_not_depend_on_the_other_branch():
    """Wan's pipeline calls the transformer once per guidance branch (``cache_context("cond")`` /
    ``("uncond")``). Each branch has caches of its own, and the first branch decides the step: so
    the first branch's outputs must be the same whether or not a second branch runs. They are
    with skip, block and token steps (the K/V cache, too, is kept per branch; it was one per
    model, so a branch's token step read the other branch's K/V for its unrefreshed tokens)."""
    from xslim_xdit.adapters import adapter_named

    wan, model = adapter_named("wan"), tiny_model("wan")
    x0, cond = wan.tiny_inputs(batch=1)
    uncond = {"encoder_hidden_states": 3 * torch.randn_like(cond["encoder_hidden_states"])}
    schedule = Schedule(6, full_steps=(0, 1, 5), token_steps=(2, 3, 4))

    def first_branch(two_branches: bool) -> list[torch.Tensor]:
        enable_xslim(
            model, XSlimConfig(mode="schedule", schedule=schedule, token_ratio=0.5), num_inference_steps=6
        )
        x, outs = x0, []
        with torch.no_grad():
            for t in wan.timesteps(6):
                timestep = wan.timestep_input(t, 1)
                with model.cache_context("cond"):
                    out = model(x, timestep=timestep, return_dict=False, **cond)[0]
                if two_branches:
                    with model.cache_context("uncond"):
                        model(x, timestep=timestep, return_dict=False, **uncond)
                outs.append(out)
                x = x - out / 6
        disable_xslim(model)
        return outs

    for alone, with_second in zip(first_branch(False), first_branch(True), strict=True):
        torch.testing.assert_close(with_second, alone, rtol=0, atol=1e-6)
