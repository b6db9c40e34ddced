"""HunyuanVideo (``HunyuanVideoTransformer3DModel``): 20 double-stream then 40 single-stream blocks;
the joint sequence is ``[img, txt]`` with RoPE on the video tokens only and a key mask for the
padded text."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .attention import JointAttnTokenProcessor, TokenContext
from .base import BlockCall, BlockStack, ModelAdapter, register_adapter


@register_adapter
class HunyuanVideoAdapter(ModelAdapter):
    name = "hunyuan_video"
    model_class_names = ("HunyuanVideoTransformer3DModel",)

    def stacks(self, model: nn.Module) -> list[BlockStack]:
        return [
            BlockStack(
                "double",
                model.transformer_blocks,
                "transformer_blocks",
                txt_arg="encoder_hidden_states",
                output="img_txt",
            ),
            BlockStack(
                "single",
                model.single_transformer_blocks,
                "single_transformer_blocks",
                txt_arg="encoder_hidden_states",
                output="img_txt",
                # the single-stream processor concatenates [img, txt] itself before to_k
                attn_text_position="last",
            ),
        ]

    def modulated_input(self, block: nn.Module, call: BlockCall) -> torch.Tensor:
        return block.norm1(call.img, emb=call.bound.arguments["temb"])[0]

    def self_attention(self, block: nn.Module) -> nn.Module:
        return block.attn

    def token_processor(self, attn: nn.Module, stack: BlockStack, ctx: TokenContext) -> Any:
        return JointAttnTokenProcessor(attn.processor, ctx, "last")
