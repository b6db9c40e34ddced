"""HunyuanVideo (``HunyuanVideoTransformer3DModel``): 20 double-stream then 40 single-stream blocks.
Blocks return ``(image, text)``; the joint sequence is ``[img, txt]`` (the single-stream processor
concatenates it itself before ``to_k``), with RoPE on the video tokens only and a key mask for the
padded text."""

from __future__ import annotations

from .base import register_adapter
from .joint import TwoStreamAdapter


@register_adapter
class HunyuanVideoAdapter(TwoStreamAdapter):
    name = "hunyuan_video"
    model_class_names = ("HunyuanVideoTransformer3DModel",)
    block_output = "img_txt"
    text_position = "last"
