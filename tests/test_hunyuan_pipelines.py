"""HunyuanVideo's diffusers pipelines with X-Slim enabled on the pipeline, prompt embeddings given
(:mod:`xslim_xdit.testing.hunyuan_pipelines`):

- ``HunyuanVideoPipeline`` guidance-distilled (embedded guidance, one call per step) and with true
  CFG (a second call per step in ``cache_context("uncond")``: two branches);
- ``HunyuanVideo15Pipeline`` (text-to-video) and ``HunyuanVideo15ImageToVideoPipeline`` (a
  reference image in the condition latents and the image embeddings): CFG by the pipeline's
  guider, two calls per step in ``cache_context("pred_cond")`` / ``("pred_uncond")``.
"""

from __future__ import annotations

from pipeline_suite import PipelineTesterMixin

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
