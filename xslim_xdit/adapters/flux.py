"""FLUX.1 (``FluxTransformer2DModel``): 19 double-stream blocks (separate text and image weights,
joint attention) then 38 single-stream blocks (text and image concatenated, text first). Blocks
return ``(text, image)``; RoPE covers the joint sequence ``[txt, img]``."""

from __future__ import annotations

from .base import register_adapter
from .joint import TwoStreamAdapter


@register_adapter
class FluxAdapter(TwoStreamAdapter):
    name = "flux"
    model_class_names = ("FluxTransformer2DModel",)
    block_output = "txt_img"
    text_position = "first"
