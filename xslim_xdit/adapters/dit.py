"""DiT (``DiTTransformer2DModel``): one stack of adaLN-Zero blocks over image tokens, class-conditional."""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from .attention import SelfAttnTokenProcessor, TokenContext
from .base import BlockCall, BlockStack, ModelAdapter, register_adapter


@register_adapter
class DiTAdapter(ModelAdapter):
    name = "dit"
    model_class_names = ("DiTTransformer2DModel",)
    tiny_config = MappingProxyType(
        dict(
            num_attention_heads=2,
            attention_head_dim=8,
            in_channels=4,
            out_channels=4,
            num_layers=4,
            sample_size=8,
            patch_size=2,
            num_embeds_ada_norm=10,
        )
    )
    timestep_dtype = torch.long  # class-conditional DiT embeds integer timesteps in [0, 999]

    def tiny_inputs(self, batch: int = 1, seed: int = 0) -> tuple[torch.Tensor, dict[str, Any]]:
        """8x8 latents (16 patch tokens) and a class label per sample."""
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(batch, 4, 8, 8, generator=g)
        return x, {"class_labels": torch.arange(batch) % 10}

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
