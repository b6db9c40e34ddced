"""``CogVideoXImageToVideoPipeline`` with X-Slim enabled on the pipeline: the image's latents
concatenated to the noisy latents along the channels, CFG batched into one call per step
(``cache_context("cond_uncond")``: one branch), prompts through the tiny T5 encoder
(:func:`xslim_xdit.testing.cogvideox_pipelines.tiny_cogvideox_pipeline`)."""

from __future__ import annotations

import PIL.Image
import torch
from pipeline_suite import PipelineTesterMixin

from xslim_xdit.testing.cogvideox_pipelines import TINY_COGVIDEOX_CALL_KWARGS, tiny_cogvideox_pipeline


class TestCogVideoXImageToVideoPipeline(PipelineTesterMixin):
    def build(self):
        pipe = tiny_cogvideox_pipeline(image_to_video=True)
        pipe.set_progress_bar_config(disable=True)
        pixels = torch.rand(64, 64, 3, generator=torch.Generator().manual_seed(3)) * 255
        kwargs = dict(
            image=PIL.Image.fromarray(pixels.to(torch.uint8).numpy()),
            prompt="a cat",
            negative_prompt="a dog",
            output_type="latent",
            **TINY_COGVIDEOX_CALL_KWARGS,
        )
        return pipe, kwargs
