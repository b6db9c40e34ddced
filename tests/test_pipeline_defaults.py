"""Each tested pipeline's default step count is the one its family's adapter documents, and a
family's presets are schedules of that many steps; HunyuanVideo's published preset runs its
schedule through ``HunyuanVideoPipeline`` at the pipeline's default 50 steps."""

from __future__ import annotations

import inspect
import sys

import diffusers
import pytest
import torch

from xslim_xdit import XSlimConfig, disable_xslim, enable_xslim
from xslim_xdit.adapters import adapter_named
from xslim_xdit.testing.hunyuan_pipelines import tiny_hunyuan_video_pipeline

#: pipeline class -> (family, its default num_inference_steps in diffusers 0.42)
DEFAULT_STEPS = {
    "StableDiffusion3Pipeline": ("sd3", 28),
    "HunyuanVideoPipeline": ("hunyuan_video", 50),
    "HunyuanVideo15Pipeline": ("hunyuan_video15", 50),
    "HunyuanVideo15ImageToVideoPipeline": ("hunyuan_video15", 50),
    "LTX2Pipeline": ("ltx2", 30),
    "LTX2ImageToVideoPipeline": ("ltx2", 30),
    "QwenImageEditPipeline": ("qwen_image", 50),
    "CogVideoXImageToVideoPipeline": ("cogvideox", 50),
}


@pytest.mark.parametrize("pipeline", sorted(DEFAULT_STEPS))
def test_the_adapter_documents_the_pipeline_default_steps(pipeline):
    family, steps = DEFAULT_STEPS[pipeline]
    default = inspect.signature(getattr(diffusers, pipeline).__call__).parameters["num_inference_steps"]
    assert default.default == steps
    adapter = adapter_named(family)
    doc = " ".join(sys.modules[type(adapter).__module__].__doc__.split())
    assert f"{steps} steps" in doc, f"adapters/{family}.py names no default of {steps} steps"
    for name, preset in adapter.presets.items():
        assert preset["schedule"].num_steps == steps, name


def test_hunyuan_video_preset_runs_its_schedule_through_the_pipeline():
    pipe, kwargs = tiny_hunyuan_video_pipeline()
    config = XSlimConfig.from_preset("hunyuan_video-fast")
    engine = enable_xslim(pipe, config)
    with torch.no_grad():
        pipe(num_inference_steps=50, **kwargs)
    disable_xslim(pipe)
    recs = engine.statistics.run_records()
    schedule = adapter_named("hunyuan_video").presets["hunyuan_video-fast"]["schedule"]
    assert [r.step for r in recs] == list(range(50))
    assert [r.kind for r in recs] == [schedule.kind_of(s) for s in range(50)]
    assert engine.statistics.summary()["flops_fraction"] < 0.5
