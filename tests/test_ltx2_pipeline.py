"""``LTX2Pipeline`` (video and audio) with X-Slim enabled on the pipeline, prompt embeddings given
to its text connectors (:mod:`xslim_xdit.testing.ltx2_pipelines`): CFG batched into one call per
step, and the pipeline's full guidance (CFG, spatio-temporal guidance with a perturbed block,
modality isolation: three calls per step, each a ``cache_context`` of its own). The audio is the
blocks' second stream (skip steps move it along its own cached residual, token steps compute it
in full); both outputs are compared; ``LTX2ImageToVideoPipeline`` too. Every level runs: skip,
block and token refresh (see ``adapters/ltx2.py``).

The pipeline steps the audio latents with a deep copy of its scheduler: the copy must step itself,
not the scheduler X-Slim hooks (a shared hook stepped the video scheduler twice per step)."""

from __future__ import annotations

import copy

import torch
from pipeline_suite import PipelineTesterMixin

from xslim_xdit import XSlimConfig, disable_xslim, enable_xslim
from xslim_xdit.testing.ltx2_pipelines import tiny_ltx2_pipeline


class TestLTX2Pipeline(PipelineTesterMixin):
    def build(self):
        return tiny_ltx2_pipeline()


class TestLTX2PipelineFullGuidance(PipelineTesterMixin):
    branches = 3  # cond_uncond (batched CFG), uncond_stg, uncond_modality
    # measured 0.12 (video) and 0.026 (audio), against 0.050 and 0.007 with CFG alone: the pipeline
    # adds three guidance deltas in x0 space (CFG 3, STG 1, modality 3), each amplifying the reuse
    # error of its branches
    relative_error = 0.3

    def build(self):
        return tiny_ltx2_pipeline(guidance="all")


class TestLTX2ImageToVideoPipeline(PipelineTesterMixin):
    """``LTX2ImageToVideoPipeline``: the image conditions the first latent frame, whose tokens get
    the timestep 0 (a per-token video timestep: the probe's modulation, and on token steps the
    selected tokens' modulation, is per token)."""

    def build(self):
        return tiny_ltx2_pipeline(image_to_video=True)


def test_a_deep_copy_of_the_hooked_scheduler_steps_itself():
    pipe, _ = tiny_ltx2_pipeline()
    engine = enable_xslim(pipe, XSlimConfig(warn=0.5, crit=1.0, polish="auto"))
    scheduler = pipe.scheduler
    scheduler.set_timesteps(4)
    twin = copy.deepcopy(scheduler)
    twin.set_timesteps(4)
    sample = torch.zeros(1, 2)
    twin.step(torch.ones(1, 2), twin.timesteps[0], sample)
    twin.step(torch.ones(1, 2), twin.timesteps[1], sample)
    assert twin.step_index == 2 and scheduler.step_index is None  # the hooked one did not move
    assert engine.clock._steps_done == 0  # and the engine counted no step
    disable_xslim(pipe)
    assert not {"set_timesteps", "set_begin_index", "step"} & set(vars(scheduler))
