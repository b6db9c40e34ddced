"""CogVideoX (``CogVideoXTransformer3DModel``: CogVideoX 2B/5B 1.0 and 1.5, T2V and I2V): one stack
of ``CogVideoXBlock`` s. Each block takes the video tokens and the text tokens as two streams and
returns ``(video, text)``; both share one set of weights: ``norm1`` (``CogVideoXLayerNormZero``)
modulates each stream with its own shift/scale from the timestep embedding, the self-attention
(``CogVideoXAttnProcessor2_0``) runs over ``[text, video]`` with one ``to_q/to_k/to_v``, a
LayerNorm of queries and keys per head, and RoPE on the video rows only (the 5B models; the 2B
model has no RoPE, its sin-cos position embedding is added before the blocks); the feed-forward
runs on ``[text, video]`` too. The pipeline computes the RoPE tables and passes them to the
transformer as ``image_rotary_emb``, shaped ``(video tokens, head_dim)``.

Token refresh: the block runs on the selected video tokens and every text token (every layer but
attention is per token); :class:`CogVideoXTokenProcessor` computes queries for those rows, splices
the selected rows' keys and values into the video K/V cache, recomputes the text K/V, and
attends. The text stays always fresh, as in every family. Under xDiT's sequence parallelism
(``xFuserCogVideoXPipeline`` splits the video by rows and the text by tokens) the processor attends
this shard's queries to every shard's K/V, gathered after RoPE (``docs/parallel.md``).

Timesteps: the pipelines' ``CogVideoXDDIMScheduler`` / ``CogVideoXDPMScheduler`` give integers in
[0, 999]. Defaults of the diffusers pipelines: 50 steps (``CogVideoXPipeline``,
``CogVideoXImageToVideoPipeline``, ``CogVideoXVideoToVideoPipeline``), guidance 6.

No preset and no rescale polynomial: X-Slim publishes schedules for FLUX and HunyuanVideo only,
and no polynomial is published for the indicator X-Slim probes here (block 0's modulated input,
``norm1``'s video output); coefficients fitted for another indicator or checkpoint would not apply.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from .attention import TokenContext, _TokenProcessor, apply_rope_bshd, rope_rows
from .base import BlockCall, BlockStack, ModelAdapter, register_adapter


class CogVideoXTokenProcessor(_TokenProcessor):
    """Token refresh for ``CogVideoXAttnProcessor2_0``: the joint sequence is ``[text, video]``,
    projected by the same ``to_q/to_k/to_v``; queries and keys get the per-head LayerNorm, then
    RoPE on the video rows (at their true positions for the selected queries). Returns
    ``(video rows, text rows)`` as the original does."""

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        ctx = self.ctx
        if ctx.index is None:
            return self.original(
                attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb, *args, **kwargs
            )
        if getattr(attn, "fused_projections", False):
            raise NotImplementedError(
                "family 'cogvideox': token refresh does not support fused QKV projections; unfuse them"
            )
        # xfuser's attention wrapper (``xFuserAttentionWrapper.forward``) passes this keyword to every
        # processor; it wraps CogVideoX's ``attn1`` with False (True is Latte's temporal attention)
        temporal = kwargs.pop("latte_temporal_attention", False)
        if encoder_hidden_states is None or attention_mask is not None or args or kwargs or temporal:
            raise NotImplementedError(
                "family 'cogvideox': token refresh supports the unmasked joint attention of CogVideoXBlock only"
            )

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.unflatten(-1, (attn.heads, -1))

        txt = encoder_hidden_states
        n_txt, n_sel = txt.shape[1], hidden_states.shape[1]
        q_img, q_txt = heads(attn.to_q(hidden_states)), heads(attn.to_q(txt))
        k_img, v_img = self._cached_kv(attn, attn.to_k(hidden_states), attn.to_v(hidden_states))
        k_img, v_img = heads(k_img), heads(v_img)
        k_txt, v_txt = heads(attn.to_k(txt)), heads(attn.to_v(txt))
        if attn.norm_q is not None:  # LayerNorm over head_dim: per row and head, any layout
            q_img, q_txt = attn.norm_q(q_img), attn.norm_q(q_txt)
        if attn.norm_k is not None:
            k_img, k_txt = attn.norm_k(k_img), attn.norm_k(k_txt)
        if image_rotary_emb is not None:  # tables over the video tokens only; the text has none
            cos, sin = image_rotary_emb
            k_img = apply_rope_bshd(k_img, cos, sin)
            assert ctx.index is not None
            q_img = apply_rope_bshd(q_img, *rope_rows((cos, sin), ctx.index, 0))
        # Under sequence parallelism (xfuser's pipeline splits the video by rows and the text by
        # tokens) the queries of this shard attend to every shard's keys: gathered after RoPE, which
        # each rank applied with its shard's table. Identity on one device.
        k_img, v_img = ctx.gather(k_img, "img"), ctx.gather(v_img, "img")
        k_txt, v_txt = ctx.gather(k_txt, "txt"), ctx.gather(v_txt, "txt")
        self._count_queries(n_sel)
        out = ctx.attention(
            torch.cat([q_txt, q_img], 1), torch.cat([k_txt, k_img], 1), torch.cat([v_txt, v_img], 1), None
        )
        out = attn.to_out[1](attn.to_out[0](out.flatten(2, 3).to(q_img.dtype)))
        return out[:, n_txt:], out[:, :n_txt]


@register_adapter
class CogVideoXAdapter(ModelAdapter):
    name = "cogvideox"
    model_class_names = ("CogVideoXTransformer3DModel",)
    tiny_config = MappingProxyType(
        dict(
            num_attention_heads=2,
            attention_head_dim=16,  # 3D RoPE splits a head into frames 4, height 6, width 6
            in_channels=4,
            out_channels=4,
            time_embed_dim=16,
            text_embed_dim=16,
            num_layers=3,
            sample_width=8,
            sample_height=8,
            sample_frames=5,  # 2 latent frames (temporal compression 4)
            patch_size=2,
            max_text_seq_length=6,
            use_rotary_positional_embeddings=True,  # as CogVideoX-5B
        )
    )
    timestep_dtype = torch.long  # CogVideoX's DDIM/DPM schedulers: integer timesteps in [0, 999]

    def tiny_inputs(
        self,
        batch: int = 1,
        seed: int = 0,
        frames: int = 2,
        height: int = 8,
        width: int = 8,
        rope: bool = True,
        patch_size_t: int | None = None,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """``frames x height x width`` latents laid out as CogVideoX takes them (batch, frames,
        channels, height, width; 2x2 patches), 6 text tokens, and the RoPE tables the pipeline
        would compute for that grid (omitted when the tiny model is built without RoPE, as the 2B
        model is: ``tiny_model("cogvideox", use_rotary_positional_embeddings=False)`` and
        ``tiny_inputs(rope=False)``). ``patch_size_t``: the tables of CogVideoX 1.5's layout
        (frames in patches of ``patch_size_t``, as ``tiny_model("cogvideox", patch_size_t=2)``)."""
        from diffusers.models.embeddings import get_3d_rotary_pos_embed

        g = torch.Generator().manual_seed(seed)
        x = torch.randn(batch, frames, 4, height, width, generator=g)
        cond: dict[str, Any] = {"encoder_hidden_states": torch.randn(batch, 6, 16, generator=g)}
        grid = (height // 2, width // 2)
        if rope and patch_size_t is None:  # CogVideoX 1.0, as its pipeline computes the tables
            cond["image_rotary_emb"] = get_3d_rotary_pos_embed(
                embed_dim=16, crops_coords=((0, 0), grid), grid_size=grid, temporal_size=frames
            )
        elif rope:  # CogVideoX 1.5: frames in patches of patch_size_t, tables sliced from the base grid
            cond["image_rotary_emb"] = get_3d_rotary_pos_embed(
                embed_dim=16,
                crops_coords=None,
                grid_size=grid,
                temporal_size=(frames + patch_size_t - 1) // patch_size_t,
                grid_type="slice",
                max_size=(4, 4),  # sample_height // patch_size, sample_width // patch_size
            )
        return x, cond

    def stacks(self, model: nn.Module) -> list[BlockStack]:
        return [
            BlockStack(
                "blocks",
                model.transformer_blocks,
                "transformer_blocks",
                txt_arg="encoder_hidden_states",
                output="img_txt",
                # the processor concatenates [text, video] before to_k/to_v: the K/V recorders
                # drop the first n_txt rows
                attn_text_position="first",
            )
        ]

    def modulated_input(self, block: nn.Module, call: BlockCall) -> torch.Tensor:
        return block.norm1(call.img, call.txt, call.bound.arguments["temb"])[0]

    def self_attention(self, block: nn.Module) -> nn.Module:
        return block.attn1

    def token_processor(self, attn: nn.Module, stack: BlockStack, ctx: TokenContext) -> Any:
        return CogVideoXTokenProcessor(attn.processor, ctx, "first")
