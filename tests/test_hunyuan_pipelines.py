"""HunyuanVideo's diffusers pipelines with X-Slim enabled on the pipeline, prompt embeddings given
(:mod:`xslim_xdit.testing.hunyuan_pipelines`):

- ``HunyuanVideoPipeline`` guidance-distilled (embedded guidance, one call per step) and with true
  CFG (a second call per step in ``cache_context("uncond")``: two branches);
- ``HunyuanVideo15Pipeline`` (text-to-video) and ``HunyuanVideo15ImageToVideoPipeline`` (a
  reference image in the condition latents and the image embeddings): CFG by the pipeline's
  guider, two calls per step in ``cache_context("pred_cond")`` / ``("pred_uncond")``.
"""

from __future__ import annotations

import torch
from diffusers import ClassifierFreeGuidance
from pipeline_suite import PipelineTesterMixin

from xslim_xdit import Schedule, XSlimConfig
from xslim_xdit.testing.hunyuan_pipelines import tiny_hunyuan_video15_pipeline, tiny_hunyuan_video_pipeline


class TestHunyuanVideoPipeline(PipelineTesterMixin):
    def build(self):
        return tiny_hunyuan_video_pipeline()


class TestHunyuanVideoPipelineTrueCFG(PipelineTesterMixin):
    branches = 2

    def build(self):
        return tiny_hunyuan_video_pipeline(true_cfg=True)


class TestHunyuanVideo15Pipeline(PipelineTesterMixin):
    branches = 2

    def build(self):
        return tiny_hunyuan_video15_pipeline()


class TestHunyuanVideo15ImageToVideoPipeline(PipelineTesterMixin):
    branches = 2

    def build(self):
        return tiny_hunyuan_video15_pipeline(image_to_video=True)


class TestHunyuanVideo15GuidanceStopsHalfway(PipelineTesterMixin):
    """The guider's CFG stops after half the steps (``stop=0.5``): steps 0-2 call the transformer
    in ``pred_cond`` and ``pred_uncond``, steps 3-5 in ``pred_cond`` only; the branches are the
    contexts' names, so the conditional branch keeps its caches across the change."""

    calls = [(s, b) for s in range(6) for b in ((0, 1) if s < 3 else (0,))]

    def build(self):
        pipe, kwargs = tiny_hunyuan_video15_pipeline()
        pipe.guider = ClassifierFreeGuidance(guidance_scale=6.0, stop=0.5)
        return pipe, kwargs

    def test_forced_full_is_bit_identical(self):
        ref, _, ref_counter = self.run()
        out, engine, counter = self.run(XSlimConfig(warn=1e-12, crit=2e-12, polish="auto"))
        assert torch.equal(out[0], ref[0]) and counter.calls == ref_counter.calls
        recs = engine.statistics.run_records()
        assert [(r.step, r.branch) for r in recs] == self.calls and {r.kind for r in recs} == {"full"}

    def test_every_level_runs_and_stays_close(self):
        ref, _, _ = self.run()
        schedule = Schedule(6, full_steps=(0, 1, 5), block_steps=(2,), token_steps=(3,))  # 4: skip
        config = XSlimConfig(mode="schedule", schedule=schedule, token_ratio=0.5, block_thresh=2.0)
        out, engine, counter = self.run(config)
        recs = engine.statistics.run_records()
        kinds = ["full", "full", "block", "token", "skip", "full"]
        assert [(r.step, r.branch, r.kind) for r in recs] == [(s, b, kinds[s]) for s, b in self.calls]
        assert counter.blocks_per_call() == [r.blocks_computed for r in recs]
        assert torch.linalg.vector_norm(out[0] - ref[0]) < 0.1 * torch.linalg.vector_norm(ref[0])
