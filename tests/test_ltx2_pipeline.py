"""``LTX2Pipeline`` (video and audio) with X-Slim enabled on the pipeline, prompt embeddings given
to its text connectors (:mod:`xslim_xdit.testing.ltx2_pipelines`): CFG batched into one call per
step, and the pipeline's full guidance (CFG, spatio-temporal guidance with a perturbed block,
modality isolation: three calls per step, each a ``cache_context`` of its own). The audio is the
blocks' second stream (skip steps move it along its own cached residual); both outputs are
compared; ``LTX2ImageToVideoPipeline`` too. Token refresh is refused (see ``adapters/ltx2.py``): skip and block levels run.

The pipeline steps the audio latents with a deep copy of its scheduler: the copy must step itself,
not the scheduler X-Slim hooks (a shared hook stepped the video scheduler twice per step)."""

from __future__ import annotations

import copy

import pytest
import torch
from pipeline_suite import PipelineTesterMixin, pipeline_state

from xslim_xdit import ConfigError, XSlimConfig, disable_xslim, enable_xslim, get_engine
from xslim_xdit.testing.ltx2_pipelines import tiny_ltx2_pipeline


class TestLTX2Pipeline(PipelineTesterMixin):
    polish = "block"

    def build(self):
        return tiny_ltx2_pipeline()


class TestLTX2PipelineFullGuidance(PipelineTesterMixin):
    polish = "block"
    branches = 3  # cond_uncond (batched CFG), uncond_stg, uncond_modality
    # measured 0.19 (video) and 0.065 (audio), against 0.044 and 0.020 with CFG alone: the pipeline
    # adds three guidance deltas in x0 space (CFG 3, STG 1, modality 3), each amplifying the reuse
    # error of its branches (one skipped step alone: 0.032 against 0.013)
    relative_error = 0.3

    def build(self):
        return tiny_ltx2_pipeline(guidance="all")


class TestLTX2ImageToVideoPipeline(PipelineTesterMixin):
    """``LTX2ImageToVideoPipeline``: the image conditions the first latent frame, whose tokens get
    the timestep 0 (a per-token video timestep: the probe's modulation is per token)."""

    polish = "block"

    def build(self):
        return tiny_ltx2_pipeline(image_to_video=True)


def test_token_refresh_is_refused_before_anything_is_attached():
    pipe, _ = tiny_ltx2_pipeline()
    before = pipeline_state(pipe)
    with pytest.raises(ConfigError, match="family 'ltx2': token refresh .level 'token'. is not"):
        enable_xslim(pipe, XSlimConfig(polish="token"))
    assert pipeline_state(pipe) == before and get_engine(pipe) is None


def test_a_deep_copy_of_the_hooked_scheduler_steps_itself():
    pipe, _ = tiny_ltx2_pipeline()
    engine = enable_xslim(pipe, XSlimConfig(warn=0.5, crit=1.0, polish="block"))
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
