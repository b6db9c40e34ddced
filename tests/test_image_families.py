"""The per-family suite on the image families' variants that their tiny configs do not cover, and
the checks that are particular to them: Qwen-Image-Edit's reference-image tokens (after the noisy
ones in ``hidden_states``, always computed, never a token the token level selects) and
Qwen-Image-Edit-2511's per-token modulation index (``zero_cond_t``)."""

from __future__ import annotations

import pytest
import torch
from family_suite import FamilyTesterMixin

from xslim_xdit import Schedule, XSlimConfig, disable_xslim, enable_xslim
from xslim_xdit.adapters import adapter_for, adapter_named
from xslim_xdit.testing import sample, tiny_model

REFERENCE_ROWS = 2  # a 2 x 4 reference image after the 4 x 4 noisy one: 8 reference tokens


class _ReferenceTokensMixin(FamilyTesterMixin):
    """A family whose tiny inputs take ``reference`` rows of reference-image tokens."""

    text_rows_inside: dict[str, int] = {}  # per stack: text rows inside the attention's hidden_states

    def sample(self, model, steps=None):
        return sample(
            model, self.family, steps=steps or self.steps, batch=self.batch, reference=REFERENCE_ROWS
        )

    def test_each_level_matches_what_ran(self):
        """Every token step's attention gets the selected noisy tokens and every reference token
        (counted by hooks of its own); the noisy tokens are the ones selected."""
        model = self.model()
        adapter = adapter_for(model)
        rows: list[list[int]] = []
        handles = [model.register_forward_pre_hook(lambda *_: rows.append([]))]
        for stack in adapter.stacks(model):
            text = self.text_rows_inside.get(stack.name, 0)
            for blk in stack.blocks:
                handles.append(
                    adapter.self_attention(blk).register_forward_pre_hook(
                        lambda _m, a, kw, text=text: rows[-1].append(kw["hidden_states"].shape[1] - text),
                        with_kwargs=True,
                    )
                )
        schedule = Schedule(self.steps, full_steps=(0, 1, 4, 7), block_steps=(2,), token_steps=(3, 5))
        cfg = XSlimConfig(mode="schedule", schedule=schedule, token_ratio=0.25, block_thresh=2.0)
        eng = enable_xslim(model, cfg, num_inference_steps=self.steps)
        self.sample(model)
        disable_xslim(model)
        for h in handles:
            h.remove()
        recs = eng.statistics.run_records()
        assert [r.kind for r in recs] == ["full", "full", "block", "token", "full", "token", "skip", "full"]
        n_noisy, n_ref, nb = 16, REFERENCE_ROWS * 4, recs[0].blocks_total
        for i, r in enumerate(recs):
            if r.kind == "full":
                assert rows[i] == [n_noisy + n_ref] * nb
            elif r.kind == "token":
                assert r.token_count == 4  # a quarter of the 16 noisy tokens, none of the reference
                assert rows[i] == [4 + n_ref] * nb and r.flops < r.flops_full
            elif r.kind == "skip":
                assert rows[i] == []
            elif r.kind == "block":
                assert 0 < len(rows[i]) < nb


class TestQwenImageEditFamily(_ReferenceTokensMixin):
    """Qwen-Image-Edit-2511: reference tokens in the image stream, modulated at timestep 0."""

    family = "qwen_image"

    def model(self):
        return tiny_model("qwen_image", zero_cond_t=True)


class TestFlux2ReferenceImageFamily(_ReferenceTokensMixin):
    """FLUX.2 with a reference image (time coordinate 10 in ``img_ids``), through both stacks."""

    family = "flux2"
    text_rows_inside = {"single": 6}


@pytest.mark.parametrize("family", ["qwen_image", "flux2"])
def test_reference_tokens_are_fresh_on_token_steps(family):
    """With the reference latents changed before a token step, the token step's prediction for
    the noisy tokens sees the new reference (it is a condition, recomputed every step), so it
    differs from the same schedule run with the reference left unchanged."""

    def run(change: bool) -> torch.Tensor:
        model = tiny_model(family)
        fam = adapter_named(family)
        x, cond = fam.tiny_inputs(batch=1, reference=REFERENCE_ROWS)
        schedule = Schedule(3, full_steps=(0, 1), token_steps=(2,))
        eng = enable_xslim(
            model, XSlimConfig(mode="schedule", schedule=schedule, token_ratio=0.25), num_inference_steps=3
        )
        outs = []
        with torch.no_grad():
            for i, t in enumerate(fam.timesteps(3)):
                if change and i == 2:
                    cond = {**cond, "reference_latents": cond["reference_latents"] + 1.0}
                outs.append(fam.tiny_forward(model, x, fam.timestep_input(t, 1), cond))
        disable_xslim(model)
        assert [r.kind for r in eng.statistics.run_records()] == ["full", "full", "token"]
        return outs[-1]

    assert not torch.equal(run(True), run(False))


def test_z_image_shard_geometry_under_xfusers_wrapper():
    """xfuser's Z-Image wrapper chunks the noise refiner's image and the main layers' ``[image,
    caption]`` sequence separately: each rank's image rows of the main layers' shard (X-Slim's
    image stream there, tests/test_parallel_xdit_zimage.py) partition the image, in rank order."""
    from xslim_xdit.adapters._z_image_shards import ShardGeometry

    spans = [ShardGeometry(r, 2, 64, 96).image_rows(r) for r in range(2)]
    assert spans == [(0, 48), (48, 64)]  # 48-row shards: rank 1 holds 16 image rows, then the caption
    four = ShardGeometry(0, 4, 128, 192)
    assert [four.image_rows(r) for r in range(4)] == [(0, 48), (48, 96), (96, 128), (128, 128)]
    assert four.refiner_rows == 32 and four.seq_rows == 48


@pytest.mark.parametrize("family", ["qwen_image", "flux2"])
def test_reference_tokens_in_a_sharded_sequence_are_refused(family):
    """A block that sees fewer image rows than the model's call (a sequence-parallel shard) while
    reference tokens are present: refused, naming the family."""
    model = tiny_model(family)
    fam = adapter_named(family)
    x, cond = fam.tiny_inputs(batch=1, reference=REFERENCE_ROWS)
    enable_xslim(model, XSlimConfig(), num_inference_steps=2)
    blocks = model.transformer_blocks
    handle = blocks[
        0
    ].register_forward_pre_hook(  # the shard a rank would see: half the rows
        lambda _m, a, kw: (
            a,
            {**kw, "hidden_states": kw["hidden_states"][:, : kw["hidden_states"].shape[1] // 2]},
        ),
        with_kwargs=True,
        prepend=True,
    )
    try:
        with pytest.raises(NotImplementedError, match=f"family '{family}'.*sharded"), torch.no_grad():
            fam.tiny_forward(model, x, fam.timestep_input(1.0, 1), cond)
    finally:
        handle.remove()
        disable_xslim(model)


def test_flux2_kv_cache_mode_is_refused():
    """Flux2KleinKVPipeline's reference K/V cache mode changes the sequence between steps and
    passes the cache to the processors: refused when the model is called, naming the family."""
    model = tiny_model("flux2")
    fam = adapter_named("flux2")
    x, cond = fam.tiny_inputs(batch=1)
    enable_xslim(model, XSlimConfig(), num_inference_steps=2)
    try:
        with pytest.raises(NotImplementedError, match="family 'flux2'.*kv_cache_mode"), torch.no_grad():
            model(x, timestep=fam.timestep_input(1.0, 1), kv_cache_mode="cached", return_dict=False, **cond)
    finally:
        disable_xslim(model)
    with torch.no_grad():  # and nothing is left behind: the plain model runs
        assert model(x, timestep=fam.timestep_input(1.0, 1), return_dict=False, **cond)[0].shape == x.shape
