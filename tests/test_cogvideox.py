"""CogVideoX beyond its tiny config (which ``test_families.py`` runs through the whole family
suite): the 2B layout without RoPE, CogVideoX 1.5's temporal patches, and ``CogVideoXPipeline`` (guidance batched into one call,
``CogVideoXDPMScheduler``)."""

from __future__ import annotations

import torch
from family_suite import FamilyTesterMixin

from xslim_xdit import Schedule, XSlimConfig, disable_xslim, enable_xslim
from xslim_xdit.testing import sample, tiny_model
from xslim_xdit.testing.pipelines import TINY_COGVIDEOX_CALL_KWARGS, tiny_cogvideox_pipeline


class TestCogVideoX2BFamily(FamilyTesterMixin):
    """CogVideoX-2B: no RoPE (a sin-cos position embedding added before the blocks): the token
    processor's attention without rotary tables."""

    family = "cogvideox"

    def model(self):
        return tiny_model("cogvideox", use_rotary_positional_embeddings=False)

    def sample(self, model, steps=None):
        return sample(model, self.family, steps=steps or self.steps, batch=self.batch, rope=False)


class TestCogVideoX15Family(FamilyTesterMixin):
    """CogVideoX 1.5: two latent frames per temporal patch (``patch_size_t=2``), RoPE tables
    sliced from the base grid, no patch bias."""

    family = "cogvideox"

    def model(self):
        return tiny_model("cogvideox", patch_size_t=2, patch_bias=False)

    def sample(self, model, steps=None):
        return sample(
            model, self.family, steps=steps or self.steps, batch=self.batch, frames=4, patch_size_t=2
        )


def _run(pipe, steps: int = 8) -> torch.Tensor:
    return pipe(
        "a cat",
        negative_prompt="a dog",
        num_inference_steps=steps,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
        **TINY_COGVIDEOX_CALL_KWARGS,
    ).frames


def test_pipeline_forced_full_is_bit_identical_and_each_level_runs():
    pipe = tiny_cogvideox_pipeline()
    ref = _run(pipe)
    eng = enable_xslim(pipe, XSlimConfig(warn=1e-12, crit=2e-12, polish="auto"))
    out = _run(pipe)
    assert torch.equal(out, ref) and eng.statistics.summary()["full"] == 8
    schedule = Schedule(8, full_steps=(0, 1, 4, 7), block_steps=(2,), token_steps=(3, 5))
    eng = enable_xslim(
        pipe, XSlimConfig(mode="schedule", schedule=schedule, token_ratio=0.5, block_thresh=2.0)
    )
    cached = _run(pipe)
    disable_xslim(pipe)
    recs = eng.statistics.run_records()
    # one call per step (both guidance branches in one batch of 2)
    assert [r.kind for r in recs] == ["full", "full", "block", "token", "full", "token", "skip", "full"]
    assert all(r.branch == 0 for r in recs) and recs[3].token_count == 16  # half of 32 video tokens
    assert not torch.equal(cached, ref) and torch.isfinite(cached).all()
    assert torch.equal(_run(pipe), ref)
