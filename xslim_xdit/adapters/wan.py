"""Wan 2.1 (``WanTransformer3DModel``): one stack of blocks over the video tokens. Each block
modulates with a shared ``(batch, 6, dim)`` timestep projection plus its own ``scale_shift_table``
(adaLN, in float32), runs self-attention (``attn1``: RMS norm of queries and keys across heads,
then Wan's RoPE over frames, height and width), cross-attention to the text (``attn2``: the text
is a condition, not a stream; image-to-video models put the CLIP image tokens in front of the text
and attend to them through ``add_k_proj``/``add_v_proj``) and a feed-forward. Blocks return the
video tokens alone. Timesteps are the flow-matching scheduler's, in [0, 1000].

Wan 2.2 TI2V (same class) passes a timestep per token, so ``temb`` is ``(batch, tokens, 6, dim)``:
the step's timestep is the largest of the first sample's (the conditioning frame's tokens are at
0), and a token-refresh step gives the selected tokens their rows of ``temb``.

Wan 2.2 A14B (T2V and I2V) runs two of these transformers in one loop: ``WanPipeline`` /
``WanImageToVideoPipeline`` call ``transformer`` while the timestep is at or above
``boundary_ratio * 1000`` (the checkpoint's ``boundary_ratio``; diffusers' modular Wan 2.2
blocks default to 0.875) and
``transformer_2`` below. ``enable_xslim(pipe)`` gives each its own engine (caches, K/V,
controller, statistics; :func:`xslim_xdit.get_engines`), both following the shared scheduler's
steps, so one schedule indexes the whole run; the second expert's first step finds nothing cached
and runs in full, and the first expert's caches are freed there. ``calibrate(pipe, ...)`` covers
the whole run (both experts profiled, each one's steps planned against its own, the switch step
full; the result applies to both). Defaults of the diffusers pipelines: 50
steps (``WanPipeline``, ``WanImageToVideoPipeline``), guidance 5.

No preset and no rescale polynomial: TeaCache4Wan2.1 publishes polynomials per checkpoint, but for
the timestep embedding as its indicator, not block 0's modulated input that X-Slim probes.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from .attention import TokenContext, WanSelfAttnTokenProcessor, gather_rows
from .base import BlockCall, BlockStack, ModelAdapter, _put_arg, register_adapter


@dataclass
class _PerTokenTembCall(BlockCall):
    """A Wan 2.2 TI2V block call (``temb`` per token, ``(batch, tokens, 6, dim)``): called again
    on the selected tokens of a token-refresh step, it gets their rows of ``temb``."""

    ctx: TokenContext | None = field(default=None, repr=False)
    temb_pos: int | None = None  # position of ``temb`` among the positional arguments, else keyword

    def with_streams(self, img: torch.Tensor, txt: torch.Tensor | None) -> tuple[tuple, dict]:
        args, kwargs = super().with_streams(img, txt)
        ctx = self.ctx
        if ctx is None or ctx.index is None or img.shape[1] == self.img.shape[1]:
            return args, kwargs
        temb = args[self.temb_pos] if self.temb_pos is not None else kwargs["temb"]
        args_list = list(args)
        _put_arg(self.signature, args_list, kwargs, "temb", gather_rows(temb, ctx.index, ctx.flat))
        return tuple(args_list), kwargs


@register_adapter
class WanAdapter(ModelAdapter):
    name = "wan"
    model_class_names = ("WanTransformer3DModel",)
    tiny_config = MappingProxyType(
        dict(
            patch_size=(1, 2, 2),
            num_attention_heads=2,
            attention_head_dim=12,  # Wan's RoPE splits a head into frame, height, width: 4 + 4 + 4
            in_channels=4,
            out_channels=4,
            text_dim=16,
            freq_dim=32,
            ffn_dim=32,
            num_layers=3,
            cross_attn_norm=True,
            rope_max_seq_len=32,
        )
    )
    timestep_max = 1000.0

    def __init__(self) -> None:
        self._token_ctx: TokenContext | None = None  # the engine's, once token refresh is installed

    def tiny_inputs(
        self,
        batch: int = 1,
        seed: int = 0,
        frames: int = 2,
        height: int = 8,
        width: int = 8,
        image_tokens: int = 0,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """``frames x height x width`` video latents (2x2 spatial patches) and 6 text tokens; with
        ``image_tokens`` (an image-to-video model: ``image_dim=8``), that many CLIP image tokens and
        the 512 text tokens Wan's I2V attention assumes."""
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(batch, 4, frames, height, width, generator=g)
        text_len = 512 if image_tokens else 6
        cond: dict[str, Any] = {"encoder_hidden_states": torch.randn(batch, text_len, 16, generator=g)}
        if image_tokens:
            cond["encoder_hidden_states_image"] = torch.randn(batch, image_tokens, 8, generator=g)
        return x, cond

    def timestep(self, model: nn.Module, args: tuple, kwargs: dict) -> float | None:
        """Wan 2.2 TI2V passes a timestep per token, ``(batch, tokens)``, the conditioning frame's
        tokens at 0: the step's timestep is the largest of the first sample's."""
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        if isinstance(t, torch.Tensor) and t.ndim == 2 and t.numel():
            return float(t[0].max().item())
        return super().timestep(model, args, kwargs)

    def parse_call(self, stack: BlockStack, sig: Any, args: tuple, kwargs: dict) -> BlockCall:
        call = super().parse_call(stack, sig, args, kwargs)
        if self._token_ctx is None:
            return call
        temb_pos = 2 if len(args) > 2 else None  # forward(hidden_states, encoder_hidden_states, temb, ...)
        temb = args[2] if temb_pos is not None else kwargs.get("temb")
        if not (isinstance(temb, torch.Tensor) and temb.ndim == 4):
            return call
        state = {f.name: getattr(call, f.name) for f in fields(BlockCall)}
        return _PerTokenTembCall(**state, ctx=self._token_ctx, temb_pos=temb_pos)

    def stacks(self, model: nn.Module) -> list[BlockStack]:
        return [BlockStack("blocks", model.blocks, attr="blocks")]

    def modulated_input(self, block: nn.Module, call: BlockCall) -> torch.Tensor:
        h, temb = call.img, call.bound.arguments["temb"]
        if temb.ndim == 4:  # Wan 2.2 TI2V: a timestep per token, (batch, tokens, 6, dim)
            shift, scale = (block.scale_shift_table.unsqueeze(0) + temb.float()).chunk(6, dim=2)[:2]
            shift, scale = shift.squeeze(2), scale.squeeze(2)
        else:  # (batch, 6, dim)
            shift, scale = (block.scale_shift_table + temb.float()).chunk(6, dim=1)[:2]
        return (block.norm1(h.float()) * (1 + scale) + shift).type_as(h)

    def self_attention(self, block: nn.Module) -> nn.Module:
        return block.attn1

    def token_processor(self, attn: nn.Module, stack: BlockStack, ctx: TokenContext) -> Any:
        self._token_ctx = ctx  # Wan 2.2 TI2V's per-token temb follows the selected tokens
        return WanSelfAttnTokenProcessor(attn.processor, ctx, "none")
