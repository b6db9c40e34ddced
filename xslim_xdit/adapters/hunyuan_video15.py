"""HunyuanVideo 1.5 (``HunyuanVideo15Transformer3DModel``, T2V and I2V): one stack of double-stream
blocks (54 in the released 8.3B model; no single-stream stack, unlike HunyuanVideo 1.0). A block
takes the video tokens and the condition tokens as two streams with weights of their own and
returns ``(video, condition)``. The condition sequence is built before the blocks: the valid
image-embedding tokens (I2V), ByT5 tokens and the MLLM text tokens first, then the padding of each,
with one key mask ``(batch, condition tokens)``. The attention (``HunyuanVideo15AttnProcessor2_0``)
runs over ``[video, condition]``: queries and keys RMS-normed per head, RoPE on the video rows only
(the model computes the tables itself, over frames x height x width), the condition through
``add_q/k/v_proj``; the processor turns the key mask into a mask over query and key pairs (a
padded condition token neither attends nor is attended to).

Token refresh uses the HunyuanVideo processor (:class:`JointAttnTokenProcessor`, condition last,
RoPE on video rows) with the pair mask built for the rows it attends: the selected video rows and
every condition row as queries, every video and condition row as keys.

Timesteps are the flow-matching scheduler's, in [0, 1000]. Defaults of the diffusers pipelines:
50 steps (``HunyuanVideo15Pipeline`` and ``HunyuanVideo15ImageToVideoPipeline``).

No preset and no rescale polynomial: X-Slim publishes schedules for HunyuanVideo 1.0 only (its
thresholds are absolute, tuned on 1.0's activations and 20 + 40 blocks), and 1.0's TeaCache
polynomial was fitted on 1.0's activations; none is published for 1.5's.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from .attention import JointAttnTokenProcessor, TokenContext
from .base import BlockCall, BlockStack, ModelAdapter, register_adapter


class HunyuanVideo15TokenProcessor(JointAttnTokenProcessor):
    """:class:`JointAttnTokenProcessor` (``[video, condition]``, RoPE on the video rows) with
    HunyuanVideo 1.5's mask: the block passes the condition's key mask ``(batch, condition)``,
    which the original processor expands to pairs of valid rows; here the same pairs are formed
    for the refreshed queries (video rows are always valid)."""

    def __init__(self, original: Any, ctx: TokenContext) -> None:
        super().__init__(original, ctx, "last")

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: Any = None,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        ctx = self.ctx
        if ctx.index is None or attention_mask is None:
            return super().__call__(
                attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb, *args, **kwargs
            )
        cond_valid = attention_mask.bool()
        attend = ctx.attention

        def attend_valid_pairs(
            q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, _mask: torch.Tensor | None
        ) -> torch.Tensor:
            n_cond = cond_valid.shape[1]

            def valid(rows: int) -> torch.Tensor:  # video rows first, all valid; then the condition
                return torch.cat([cond_valid.new_ones(cond_valid.shape[0], rows - n_cond), cond_valid], 1)

            pairs = valid(q.shape[1])[:, None, :, None] & valid(k.shape[1])[:, None, None, :]
            return attend(q, k, v, pairs)

        ctx.attention = attend_valid_pairs  # for this call only: the parent attends through it
        try:
            return super().__call__(
                attn, hidden_states, encoder_hidden_states, None, image_rotary_emb, *args, **kwargs
            )
        finally:
            ctx.attention = attend


@register_adapter
class HunyuanVideo15Adapter(ModelAdapter):
    name = "hunyuan_video15"
    model_class_names = ("HunyuanVideo15Transformer3DModel",)
    tiny_config = MappingProxyType(
        dict(
            in_channels=4,
            out_channels=4,
            num_attention_heads=2,
            attention_head_dim=16,
            num_layers=3,
            num_refiner_layers=1,
            mlp_ratio=2.0,
            patch_size=1,
            patch_size_t=1,
            text_embed_dim=16,
            text_embed_2_dim=8,
            image_embed_dim=8,
            rope_axes_dim=(4, 6, 6),
        )
    )
    timestep_max = 1000.0

    def tiny_model(self, seed: int = 0, **overrides: Any) -> nn.Module:
        """The diffusers class from ``tiny_config``, with a narrow ByT5 projection: the class fixes
        its hidden width at 2048, which would make the projection (run once per call, before the
        blocks) outweigh the tiny blocks' FLOPs, unlike the real model where the blocks dominate."""
        from diffusers.models.transformers.transformer_hunyuan_video15 import (
            HunyuanVideo15ByT5TextProjection,
        )

        model = super().tiny_model(seed, **overrides)
        cfg = model.config
        model.context_embedder_2 = HunyuanVideo15ByT5TextProjection(
            cfg.text_embed_2_dim, 16, cfg.num_attention_heads * cfg.attention_head_dim
        ).eval()
        return model

    def tiny_inputs(
        self,
        batch: int = 1,
        seed: int = 0,
        frames: int = 2,
        height: int = 4,
        width: int = 4,
        image: bool = False,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """``frames x height x width`` video latents; 5 MLLM text tokens (the last one padding), 3
        ByT5 tokens (the last one padding) and 2 image-embedding tokens: all zero (text-to-video:
        the model masks them out), or with ``image`` random (image-to-video: valid tokens, placed
        first in the condition sequence)."""
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(batch, 4, frames, height, width, generator=g)
        mask, mask_2 = torch.ones(batch, 5, dtype=torch.long), torch.ones(batch, 3, dtype=torch.long)
        mask[:, -1] = 0  # padded tokens: exercise the pair mask
        mask_2[:, -1] = 0
        return x, {
            "encoder_hidden_states": torch.randn(batch, 5, 16, generator=g),
            "encoder_attention_mask": mask,
            "encoder_hidden_states_2": torch.randn(batch, 3, 8, generator=g),
            "encoder_attention_mask_2": mask_2,
            "image_embeds": torch.randn(batch, 2, 8, generator=g) if image else torch.zeros(batch, 2, 8),
        }

    def stacks(self, model: nn.Module) -> list[BlockStack]:
        # the condition enters the attention through add_k/v_proj: to_k/to_v see video rows only
        return [
            BlockStack(
                "double",
                model.transformer_blocks,
                "transformer_blocks",
                txt_arg="encoder_hidden_states",
                output="img_txt",
            )
        ]

    def modulated_input(self, block: nn.Module, call: BlockCall) -> torch.Tensor:
        return block.norm1(call.img, emb=call.bound.arguments["temb"])[0]

    def self_attention(self, block: nn.Module) -> nn.Module:
        return block.attn

    def token_processor(self, attn: nn.Module, stack: BlockStack, ctx: TokenContext) -> Any:
        return HunyuanVideo15TokenProcessor(attn.processor, ctx)
