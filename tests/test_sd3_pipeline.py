"""``StableDiffusion3Pipeline`` with X-Slim enabled on the pipeline: SD3 (no query/key norm),
SD3.5 Large (query/key RMS norm) and SD3.5 Medium (dual-attention blocks, which refuse token
refresh: skip and block levels there), CFG batched into one transformer call per step (one
branch), prompt embeddings given (:mod:`xslim_xdit.testing.sd3_pipelines`)."""

from __future__ import annotations

import torch
from pipeline_suite import FORCED_FULL, PipelineTesterMixin

from xslim_xdit import Schedule, XSlimConfig
from xslim_xdit.testing.sd3_pipelines import tiny_sd3_pipeline


class TestSD3Pipeline(PipelineTesterMixin):
    def build(self):
        return tiny_sd3_pipeline("sd3")


class TestSD35LargePipeline(PipelineTesterMixin):
    def build(self):
        return tiny_sd3_pipeline("sd35")


class TestSD35MediumPipeline(PipelineTesterMixin):
    polish = "block"  # dual-attention blocks refuse token refresh

    def build(self):
        return tiny_sd3_pipeline("sd35_medium")


class TestSD35MediumSkipLayerGuidance(PipelineTesterMixin):
    """SD3.5 Medium's skip-layer guidance: on steps 1..4 (``i > 0`` and ``i < 0.7 * 6``) a second
    transformer call without ``cache_context``, the text branch alone with block 1 left out
    (``skip_layers``): the scheduler's steps make it the step's branch 1, with caches of its own
    (the blocks it runs). Forced full stays bit-identical; under the schedule it runs its levels
    from its first step, which runs in full."""

    polish = "block"
    slg_steps = (1, 2, 3, 4)

    def build(self):
        pipe, kwargs = tiny_sd3_pipeline("sd35_medium")
        kwargs.update(skip_guidance_layers=[1], skip_layer_guidance_start=0.0, skip_layer_guidance_stop=0.7)
        return pipe, kwargs

    def test_forced_full_is_bit_identical(self):
        ref, _, ref_counter = self.run()
        out, engine, counter = self.run(FORCED_FULL)
        assert torch.equal(out[0], ref[0]) and counter.calls == ref_counter.calls
        recs = engine.statistics.run_records()
        assert [(r.step, r.branch) for r in recs] == [
            (s, b) for s in range(self.steps) for b in range(2 if s in self.slg_steps else 1)
        ]
        assert {r.kind for r in recs} == {"full"}
        # the skip-layer call runs every block but block 1
        assert [r.blocks_computed for r in recs if r.branch == 1] == [2] * len(self.slg_steps)

    def test_every_level_runs_and_stays_close(self):
        ref, _, _ = self.run()
        schedule = Schedule(self.steps, full_steps=(0, 1, 5), block_steps=(2,))  # 3, 4: skip
        out, engine, counter = self.run(XSlimConfig(mode="schedule", schedule=schedule, block_thresh=2.0))
        recs = engine.statistics.run_records()
        assert [(r.step, r.branch, r.kind) for r in recs if r.branch == 1] == [
            (1, 1, "full"),
            (2, 1, "block"),
            (3, 1, "skip"),
            (4, 1, "skip"),
        ]
        assert counter.blocks_per_call() == [r.blocks_computed for r in recs]
        assert torch.linalg.vector_norm(out[0] - ref[0]) < 0.25 * torch.linalg.vector_norm(ref[0])
