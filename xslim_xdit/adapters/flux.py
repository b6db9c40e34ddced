"""FLUX.1 (``FluxTransformer2DModel``): 19 double-stream blocks (separate text and image weights,
joint attention) then 38 single-stream blocks (text and image concatenated, text first). RoPE
covers the joint sequence ``[txt, img]``."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .attention import JointAttnTokenProcessor, TokenContext
from .base import BlockCall, BlockStack, ModelAdapter, register_adapter


@register_adapter
class FluxAdapter(ModelAdapter):
    name = "flux"
    model_class_names = ("FluxTransformer2DModel",)

    def stacks(self, model: nn.Module) -> list[BlockStack]:
        return [
            BlockStack(
                "double",
                model.transformer_blocks,
                "transformer_blocks",
                txt_arg="encoder_hidden_states",
                output="txt_img",
            ),
            BlockStack(
                "single",
                model.single_transformer_blocks,
                "single_transformer_blocks",
                txt_arg="encoder_hidden_states",
                output="txt_img",
                attn_text_position="first",
            ),
        ]

    def modulated_input(self, block: nn.Module, call: BlockCall) -> torch.Tensor:
        return block.norm1(call.img, emb=call.bound.arguments["temb"])[0]

    def self_attention(self, block: nn.Module) -> nn.Module:
        return block.attn

    def token_processor(self, attn: nn.Module, stack: BlockStack, ctx: TokenContext) -> Any:
        return JointAttnTokenProcessor(attn.processor, ctx, "first")
