"""DiT (``DiTTransformer2DModel``): one stack of adaLN-Zero blocks over image tokens, class-conditional."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .attention import SelfAttnTokenProcessor, TokenContext
from .base import BlockCall, BlockStack, ModelAdapter, register_adapter


@register_adapter
class DiTAdapter(ModelAdapter):
    name = "dit"
    model_class_names = ("DiTTransformer2DModel",)

    def stacks(self, model: nn.Module) -> list[BlockStack]:
        return [BlockStack("blocks", model.transformer_blocks)]

    def modulated_input(self, block: nn.Module, call: BlockCall) -> torch.Tensor:
        a = call.bound.arguments
        h = call.img
        return block.norm1(h, a.get("timestep"), a.get("class_labels"), hidden_dtype=h.dtype)[0]

    def self_attention(self, block: nn.Module) -> nn.Module:
        return block.attn1

    def token_processor(self, attn: nn.Module, stack: BlockStack, ctx: TokenContext) -> Any:
        return SelfAttnTokenProcessor(attn.processor, ctx, "none")
