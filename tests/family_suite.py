"""The per-family suite: every model family gets the same checks, from one mixin.

As diffusers' model tester mixins do, a test class opts a family in with one line::

    class TestMyFamily(FamilyTesterMixin):
        family = "my_family"  # a registered adapter's name

and inherits every ``test_*`` below, run on the family's tiny model (``tiny_config`` or
``tiny_model``, ``tiny_inputs`` and the timestep units, all from the family's adapter module).
``test_families.py`` opts in every family the package registers; ``test_family_in_one_file.py``
defines a family of its own and opts it in. The checks read only what the adapter declares and
what independent hooks observe, so a family needs no numbers written here.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import pytest
import torch
from _helpers import AttentionCounter
from torch import nn

from xslim_xdit import PRESETS, ConfigError, Schedule, XSlimConfig, disable_xslim, enable_xslim
from xslim_xdit.adapters import adapter_for, adapter_named
from xslim_xdit.config import RESCALE_POLYNOMIALS
from xslim_xdit.testing import make_inputs, sample, tiny_model


def _restorable_state(model: nn.Module) -> list[Any]:
    """What X-Slim changes while enabled and must give back: instance attributes of the blocks,
    attention processors, and the hooks on the model, the blocks and the attention projections."""
    adapter = adapter_for(model)
    state: list[Any] = [len(model._forward_pre_hooks), len(model._forward_hooks)]
    for stack in adapter.stacks(model):
        for blk in stack.blocks:
            attn = adapter.self_attention(blk)
            state += [dict(blk.__dict__), len(blk._forward_pre_hooks), len(blk._forward_hooks)]
            state += [attn.processor, dict(attn.__dict__)]
            state += [len(m._forward_hooks) for m in attn.modules()]
    return state


class FamilyTesterMixin:
    """The checks every model family must pass. Subclasses set :attr:`family`."""

    #: name of a registered adapter that declares a tiny model
    family: str = ""
    steps = 8
    batch = 2

    # ------------------------------------------------------------------ helpers
    @property
    def has_token_level(self) -> bool:
        """The family's adapter serves the token level on this model (SD3.5 Medium's
        dual-attention blocks refuse it when X-Slim is enabled)."""
        return adapter_named(self.family).token_refusal_for(self.model()) == ""

    @property
    def polish(self) -> str:
        """Every polish level the family has."""
        return "auto" if self.has_token_level else "block"

    def model(self) -> nn.Module:
        return tiny_model(self.family)

    def sample(self, model: nn.Module, steps: int | None = None) -> torch.Tensor:
        return sample(model, self.family, steps=steps or self.steps, batch=self.batch)

    def block_calls(self, model: nn.Module) -> list[tuple[Any, nn.Module, Any]]:
        """(stack, first block, its BlockCall) of each stack, from one plain forward."""
        adapter = adapter_for(model)
        seen, handles = [], []
        for stack in adapter.stacks(model):
            blk = stack.blocks[0]
            sig = inspect.signature(blk.forward)

            def hook(_m, args, kwargs, stack=stack, blk=blk, sig=sig):
                if not any(s.name == stack.name for s, _, _ in seen):
                    seen.append((stack, blk, adapter.parse_call(stack, sig, args, kwargs)))

            handles.append(blk.register_forward_pre_hook(hook, with_kwargs=True))
        self.sample(model, steps=1)
        for h in handles:
            h.remove()
        return seen

    def image_tokens(self, model: nn.Module) -> int:
        """Image tokens per sample, as block 0 sees them."""
        return self.block_calls(model)[0][2].img.shape[1]

    # ------------------------------------------------------------------ the suite
    def test_adapter_finds_the_streams(self):
        model = self.model()
        adapter = adapter_for(model)
        assert type(adapter) is type(adapter_named(self.family))
        stacks = adapter.stacks(model)
        assert stacks and all(len(s.blocks) > 0 for s in stacks)
        calls = self.block_calls(model)
        assert [s.name for s, _, _ in calls] == [s.name for s in stacks]  # every stack ran
        for stack, blk, call in calls:
            assert call.img.dim() == 3 and call.img.shape[0] == self.batch, stack.name
            assert (call.txt is not None) == (stack.txt_arg is not None), stack.name
            out_img, out_txt = adapter.split_output(stack, blk(*call.args, **call.kwargs))
            assert out_img.shape == call.img.shape and (out_txt is None) == (call.txt is None)
            assert isinstance(adapter.self_attention(blk), nn.Module)
            assert hasattr(adapter.self_attention(blk), "processor")
        stack0, blk0, call0 = calls[0]
        assert adapter.modulated_input(blk0, call0).shape == call0.img.shape

    def test_timesteps_are_read_back_in_the_family_units(self):
        adapter = adapter_named(self.family)
        ts = adapter.timesteps(self.steps)
        assert ts[0] == adapter.timestep_max and ts == sorted(set(ts), reverse=True) and ts[-1] > 0
        x, cond = make_inputs(self.family, self.batch)
        t = adapter.timestep_input(ts[1], self.batch)
        assert t.shape == (self.batch,) and t.dtype == adapter.timestep_dtype
        read = adapter.timestep(self.model(), (x,), {"timestep": t, **cond})
        assert read == float(t[0])  # what the engine tells steps apart by

    def test_presets_and_polynomial_reach_the_config(self):
        adapter = adapter_named(self.family)
        assert {p for p in PRESETS if p.startswith(f"{self.family}-")} == set(adapter.presets)
        assert (self.family in RESCALE_POLYNOMIALS) == (adapter.rescale_polynomial is not None)
        if adapter.rescale_polynomial is not None:
            cfg = XSlimConfig(rescale=self.family)
            assert cfg.rescale_coefficients() == tuple(adapter.rescale_polynomial)
        for name in adapter.presets:
            cfg = XSlimConfig.from_preset(name)
            assert cfg.mode == "schedule" and cfg == XSlimConfig(preset=name)

    def test_presets_run_their_schedule(self):
        presets = adapter_named(self.family).presets
        if not presets:
            # No published schedule: none may be reachable under the family's name either.
            assert not [n for n in PRESETS if n.startswith(f"{self.family}-")]
            with pytest.raises(ConfigError, match="preset"):
                XSlimConfig.from_preset(f"{self.family}-fast")
            return
        model = self.model()
        for name in presets:
            eng = enable_xslim(model, XSlimConfig.from_preset(name), num_inference_steps=self.steps)
            self.sample(model)
            disable_xslim(model)
            schedule = XSlimConfig.from_preset(name).schedule.rescaled(self.steps)
            kinds = [r.kind for r in eng.statistics.run_records()]
            assert kinds == [schedule.kind_of(i) for i in range(self.steps)], name

    def test_disabled_is_bit_identical(self):
        model = self.model()
        before = _restorable_state(model)
        ref = self.sample(model)
        enable_xslim(
            model, XSlimConfig(warn=0.5, crit=1.0, polish=self.polish), num_inference_steps=self.steps
        )
        cached = self.sample(model)
        disable_xslim(model)
        again = self.sample(model)
        assert torch.equal(again, ref)
        assert not torch.equal(cached, ref)  # caching did change something while on
        assert _restorable_state(model) == before

    def test_forced_full_is_bit_identical(self):
        model = self.model()
        ref = self.sample(model)
        cfg = XSlimConfig(warn=1e-12, crit=2e-12, polish=self.polish)
        eng = enable_xslim(model, cfg, num_inference_steps=self.steps)
        out = self.sample(model)
        disable_xslim(model)
        assert torch.equal(out, ref)
        assert eng.statistics.summary()["full"] == self.steps
        assert eng.statistics.summary()["flops_fraction"] == 1.0

    def test_online_decisions_match_the_statistics(self):
        model = self.model()
        cfg = XSlimConfig(warn=0.05, crit=0.5, polish=self.polish, warmup_steps=2)
        eng = enable_xslim(model, cfg, num_inference_steps=self.steps)
        self.sample(model)
        disable_xslim(model)
        recs, summary = eng.statistics.run_records(), eng.statistics.summary()
        kinds = [r.kind for r in recs]
        assert len(kinds) == self.steps and kinds[:2] == ["full", "full"] and kinds[-1] == "full"
        assert all(summary[k] == kinds.count(k) for k in ("full", "block", "token", "skip"))
        fraction = sum(r.flops for r in recs) / sum(r.flops_full for r in recs)
        assert summary["flops_fraction"] == pytest.approx(fraction)

    def test_each_level_matches_what_ran(self):
        model = self.model()
        n_img = self.image_tokens(model)
        ratio = 0.5
        token_steps = (3, 5) if self.has_token_level else ()  # else skipped
        schedule = Schedule(self.steps, full_steps=(0, 1, 4, 7), block_steps=(2,), token_steps=token_steps)
        cfg = XSlimConfig(mode="schedule", schedule=schedule, token_ratio=ratio, block_thresh=2.0)
        counter = AttentionCounter(model)
        eng = enable_xslim(model, cfg, num_inference_steps=self.steps)
        self.sample(model)
        disable_xslim(model)
        counter.remove()
        recs = eng.statistics.run_records()
        nb = counter.num_blocks
        t = "token" if self.has_token_level else "skip"
        assert [r.kind for r in recs] == ["full", "full", "block", t, "full", t, "skip", "full"]
        assert counter.blocks_per_call() == [r.blocks_computed for r in recs]
        k = math.ceil(ratio * n_img)
        for i, r in enumerate(recs):
            ran = counter.blocks_per_call()[i]
            if r.kind == "full":
                assert ran == nb and counter.rows_per_call()[i] == nb * n_img
            elif r.kind == "skip":
                assert ran == 0 and r.flops < 0.2 * r.flops_full
            elif r.kind == "token":
                assert ran == nb and set(counter.per_block(i).values()) == {k}  # k queries per block
                assert r.token_count == k and r.tokens_computed == self.batch * k * nb
                assert r.flops < r.flops_full
            elif r.kind == "block":
                assert sum(r.blocks_mask) == ran < nb
                assert [g for g, _ in counter.calls[i]] == [g for g, c in enumerate(r.blocks_mask) if c]
                assert r.flops < r.flops_full
        summary = eng.statistics.summary()
        tokens = 2 if self.has_token_level else 0
        assert (summary["skip"], summary["token"], summary["block"], summary["full"]) == (
            3 - tokens,
            tokens,
            1,
            4,
        )
        assert 0 < summary["flops_fraction"] < 1

    def test_the_token_level_is_served_or_refused_before_anything_is_attached(self):
        model = self.model()
        before = _restorable_state(model)
        if self.has_token_level:
            # Offered: enabling installs the token processors, disabling gives everything back.
            enable_xslim(model, XSlimConfig(polish="token"), num_inference_steps=self.steps)
            assert _restorable_state(model) != before
            disable_xslim(model)
            assert _restorable_state(model) == before
            return
        with pytest.raises(
            ConfigError, match=f"family '{self.family}': token refresh .level 'token'. is not"
        ):
            enable_xslim(model, XSlimConfig(polish="token"), num_inference_steps=self.steps)
        assert _restorable_state(model) == before

    def test_token_refresh_at_ratio_one_equals_full(self):
        """All tokens refreshed against a fully replaced K/V cache is the full computation: checks
        the splice, RoPE at true positions, text ordering and masks of the family's processor."""
        model = self.model()
        ref = self.sample(model, steps=6)
        if not self.has_token_level:
            # No token level: "auto" (which may pick it) is refused too, and the model is untouched.
            before = _restorable_state(model)
            with pytest.raises(ConfigError, match="level 'token'"):
                enable_xslim(model, XSlimConfig(polish="auto"), num_inference_steps=6)
            assert _restorable_state(model) == before
            torch.testing.assert_close(self.sample(model, steps=6), ref, rtol=0, atol=0)
            return
        schedule = Schedule(6, full_steps=(0, 1, 5), block_steps=(2,), token_steps=(3, 4))
        cfg = XSlimConfig(mode="schedule", schedule=schedule, token_ratio=1.0, block_thresh=1e-9)
        eng = enable_xslim(model, cfg, num_inference_steps=6)
        out = self.sample(model, steps=6)
        disable_xslim(model)
        assert [r.kind for r in eng.statistics.run_records()][2:5] == ["block", "token", "token"]
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
