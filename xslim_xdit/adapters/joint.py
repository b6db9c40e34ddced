"""The shape FLUX and HunyuanVideo share: a double-stream stack (separate text and image weights,
joint attention) followed by a single-stream stack (text and image concatenated)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .attention import JointAttnTokenProcessor, TokenContext
from .base import BlockCall, BlockStack, ModelAdapter, OutputLayout, TextPosition


class TwoStreamAdapter(ModelAdapter):
    """Subclasses say how their blocks return the streams and where the text sits in the
    joint sequence (``"first"``: ``[txt, img]``, ``"last"``: ``[img, txt]``)."""

    block_output: OutputLayout = "txt_img"
    text_position: TextPosition = "first"

    def stacks(self, model: nn.Module) -> list[BlockStack]:
        common: dict[str, Any] = {"txt_arg": "encoder_hidden_states", "output": self.block_output}
        return [
            BlockStack("double", model.transformer_blocks, "transformer_blocks", **common),
            BlockStack(
                "single",
                model.single_transformer_blocks,
                "single_transformer_blocks",
                attn_text_position=self.text_position,
                **common,
            ),
        ]

    def modulated_input(self, block: nn.Module, call: BlockCall) -> torch.Tensor:
        return block.norm1(call.img, emb=call.bound.arguments["temb"])[0]

    def self_attention(self, block: nn.Module) -> nn.Module:
        return block.attn

    def token_processor(self, attn: nn.Module, stack: BlockStack, ctx: TokenContext) -> Any:
        return JointAttnTokenProcessor(attn.processor, ctx, self.text_position)
