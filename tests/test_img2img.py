"""img2img and inpainting with ``strength < 1`` (issue 10, point 3): the run is the steps that
actually run, not the ``num_inference_steps`` asked for; schedules and presets are mapped onto
those steps; the last step runs in full; forced full is the plain pipeline bit for bit."""

from __future__ import annotations

import pytest
import torch

from xslim_xdit import Schedule, XSlimConfig, disable_xslim, enable_xslim
from xslim_xdit.testing import pipelines as tiny_pipelines

ASKED, STRENGTH = 8, 0.5  # FLUX's img2img runs int(8 * 0.5) = 4 steps


def _pipeline(kind: str):
    from diffusers import FluxImg2ImgPipeline, FluxInpaintPipeline

    base = tiny_pipelines.tiny_pipeline("flux")
    cls = {"img2img": FluxImg2ImgPipeline, "inpaint": FluxInpaintPipeline}[kind]
    pipe = cls(**base.components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run(pipe, kind: str):
    g = torch.Generator().manual_seed(3)
    image = torch.rand(1, 3, 16, 16, generator=g)
    extra = {"mask_image": (torch.rand(1, 1, 16, 16, generator=g) > 0.5).float()} if kind == "inpaint" else {}
    calls = []
    handle = pipe.transformer.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        with torch.no_grad():
            out = pipe(
                "a cat",
                image=image,
                strength=STRENGTH,
                num_inference_steps=ASKED,
                height=16,
                width=16,
                output_type="latent",
                generator=torch.Generator().manual_seed(0),
                max_sequence_length=8,
                **extra,
            ).images
    finally:
        handle.remove()
    return out, len(calls)


@pytest.mark.parametrize("kind", ["img2img", "inpaint"])
def test_partial_strength_runs_the_steps_that_run(kind):
    pipe = _pipeline(kind)
    plain, calls = _run(pipe, kind)
    assert calls == int(ASKED * STRENGTH)
    engine = enable_xslim(pipe, XSlimConfig(warmup_steps=ASKED))
    forced, _ = _run(pipe, kind)
    assert torch.equal(forced, plain)
    assert engine.num_steps == calls
    disable_xslim(pipe)
    # a schedule written for the asked step count is mapped onto the steps that run, last one full
    asked = Schedule(ASKED, full_steps=(0, 7), token_steps=(3,))
    engine = enable_xslim(pipe, XSlimConfig(mode="schedule", schedule=asked))
    cached, _ = _run(pipe, kind)
    kinds = engine.statistics.summary()["kinds"]
    disable_xslim(pipe)
    assert kinds == ["full", "token", "skip", "full"], kinds
    assert torch.isfinite(cached).all()
