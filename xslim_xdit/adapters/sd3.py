"""Stable Diffusion 3 / 3.5 (``SD3Transformer2DModel``): one stack of MMDiT blocks
(``JointTransformerBlock``) with separate image and text weights and one joint attention over
``[image, text]`` (``JointAttnProcessor2_0``: text through ``add_q/k/v_proj``, no RoPE; the
position embedding is added to the patches before the blocks). Blocks take the text as a second
stream and return ``(text, image)``; the last block is ``context_pre_only`` (no text update, it
returns ``None`` for the text and its attention has no ``to_add_out``). SD3.5 adds an RMS norm of
queries and keys (``qk_norm="rms_norm"``) and, in SD3.5 Medium's first blocks
(``dual_attention_layers``), a second self-attention ``attn2`` over the image tokens alone.
Timesteps are the flow-matching scheduler's, in [0, 1000].

Token refresh is refused on dual-attention blocks: ``attn2`` has no K/V cache, so its queries for
the selected tokens would attend among themselves only. Skip and block levels serve every variant.

``StableDiffusion3Pipeline`` batches classifier-free guidance into one call per step (one branch).
Its skip-layer guidance (SD3.5 Medium: ``skip_guidance_layers``) adds, on the steps it covers, a
second call without ``cache_context``: the scheduler's steps make it the step's branch 1, with
caches of its own, whose first call runs in full. A call that leaves out block 0 is not decided
(the decision is taken at block 0): it runs as the plain model and is not recorded; one that
leaves out the last block never completes a cache, so it always runs in full.

No preset and no rescale polynomial: none is published for SD3 or SD3.5 (the pipeline's default is
28 steps).
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from .attention import TokenContext, _TokenProcessor
from .base import BlockCall, BlockStack, ModelAdapter, register_adapter


class SD3JointAttnTokenProcessor(_TokenProcessor):
    """Token refresh for ``JointAttnProcessor2_0`` as SD3's joint blocks call it: queries for the
    selected image tokens and every text token, against the image K/V cache and the fresh text
    K/V, the joint sequence ordered ``[image, text]``."""

    def __init__(self, original: Any, ctx: TokenContext, dual_attention: bool) -> None:
        super().__init__(original, ctx, "none")
        self.dual_attention = dual_attention

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        ip_hidden_states: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        # ``Attention.forward`` passes only the keyword arguments this signature names: IP-Adapter's
        # ``ip_hidden_states`` and ``temb`` are named so that they reach the original processor.
        ctx = self.ctx
        if ctx.index is None:
            if ip_hidden_states is not None or temb is not None:
                kwargs = {**kwargs, "ip_hidden_states": ip_hidden_states, "temb": temb}
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        if self.dual_attention:
            raise NotImplementedError(
                "family 'sd3': token refresh (level 'token') is not supported on SD3.5 dual-attention "
                "blocks (dual_attention_layers): their second self-attention attn2 has no K/V cache; "
                "use polish='block' or 'none', or a schedule without token steps"
            )
        if getattr(attn, "fused_projections", False):
            raise NotImplementedError("family 'sd3': token refresh does not support fused QKV projections")
        if (
            encoder_hidden_states is None
            or attention_mask is not None
            or ip_hidden_states is not None
            or args
        ):
            raise NotImplementedError(
                "family 'sd3': token refresh supports the joint attention without mask or IP-Adapter only"
            )

        n_q = hidden_states.shape[1]
        q, k, v, q_t, k_t, v_t = self._dual_stream_qkv(attn, hidden_states, encoder_hidden_states)
        k, v = ctx.gather(k, "img"), ctx.gather(v, "img")
        k_t, v_t = ctx.gather(k_t, "txt"), ctx.gather(v_t, "txt")
        self._count_queries(n_q)
        out = ctx.attention(torch.cat([q, q_t], 1), torch.cat([k, k_t], 1), torch.cat([v, v_t], 1), None)
        out = out.flatten(2, 3).to(q.dtype)
        out_img, out_txt = out[:, :n_q], out[:, n_q:]
        if not attn.context_pre_only:
            out_txt = attn.to_add_out(out_txt)
        return attn.to_out[1](attn.to_out[0](out_img)), out_txt


@register_adapter
class SD3Adapter(ModelAdapter):
    name = "sd3"
    model_class_names = ("SD3Transformer2DModel",)
    #: SD3.5 Large's layout (query/key RMS norm, no dual attention); SD3.0 is ``qk_norm=None``,
    #: SD3.5 Medium adds ``dual_attention_layers``
    tiny_config = MappingProxyType(
        dict(
            sample_size=8,
            patch_size=2,
            in_channels=4,
            num_layers=3,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=24,
            caption_projection_dim=16,
            pooled_projection_dim=16,
            out_channels=4,
            pos_embed_max_size=8,
            qk_norm="rms_norm",
        )
    )
    timestep_max = 1000.0

    def tiny_inputs(self, batch: int = 1, seed: int = 0) -> tuple[torch.Tensor, dict[str, Any]]:
        """8x8 latents (16 patch tokens), 6 text tokens and a pooled text embedding per sample."""
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(batch, 4, 8, 8, generator=g)
        return x, {
            "encoder_hidden_states": torch.randn(batch, 6, 24, generator=g),
            "pooled_projections": torch.randn(batch, 16, generator=g),
        }

    def stacks(self, model: nn.Module) -> list[BlockStack]:
        return [
            BlockStack(
                "joint",
                model.transformer_blocks,
                "transformer_blocks",
                txt_arg="encoder_hidden_states",
                output="txt_img",
            )
        ]

    def modulated_input(self, block: nn.Module, call: BlockCall) -> torch.Tensor:
        return block.norm1(call.img, emb=call.bound.arguments["temb"])[0]

    def self_attention(self, block: nn.Module) -> nn.Module:
        return block.attn

    def token_refusal_for(self, model: nn.Module) -> str:
        dual = [
            i for i, blk in enumerate(model.transformer_blocks) if getattr(blk, "attn2", None) is not None
        ]
        if dual:
            return (
                f"SD3.5 dual-attention blocks {dual} (dual_attention_layers): their second "
                "self-attention attn2 has no K/V cache"
            )
        return ""

    def token_processor(self, attn: nn.Module, stack: BlockStack, ctx: TokenContext) -> Any:
        dual = any(blk.attn is attn and getattr(blk, "attn2", None) is not None for blk in stack.blocks)
        return SD3JointAttnTokenProcessor(attn.processor, ctx, dual)
