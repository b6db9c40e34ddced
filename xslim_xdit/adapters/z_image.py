"""Z-Image (``ZImageTransformer2DModel``; Z-Image-Turbo): a single-stream model over lists of
per-sample latents. Each sample's image patches (padded to a multiple of 32 tokens) run through
``noise_refiner`` (2 blocks, image tokens only, timestep-modulated), the caption through
``context_refiner`` (2 blocks, text only, no modulation); then 30 main ``layers`` run over one
sequence per sample, ``[image, caption]`` (padded across the batch, with a key mask). Every block
is ``ZImageTransformerBlock``: self-attention with query/key RMS norms and complex RoPE whose
table is per sample and per token (``freqs_cis``, (batch, tokens, head_dim / 2)), modulated by
a scale and a tanh gate (no shift) from the shared ``adaln_input``. Blocks return the sequence.

X-Slim manages ``noise_refiner`` then ``layers`` (32 of 34 blocks) with one image stream: the
refiner's input, and the first rows of the main layers' sequence (as many as the refiner's image
tokens in the same call); the caption rows are the main layers' text stream, always computed by a
token-refresh step, and ``context_refiner`` (text only) runs every step, as it is.

The model's timestep ``t`` is ``(1000 - t_scheduler) / 1000``: it *rises* from 0 to 1 over a run.
The family's units are the noise level ``1 - t`` (falling from 1, as the step clock expects): the
adapter reads a call's timestep as ``1 - t`` and the tiny model's loop passes ``t = 1 - sigma``.

xfuser's ``xFuserZImageTransformer2DWrapper`` (Ulysses, Ring, CFG parallel; step and block
levels): its sequence parallelism chunks the noise refiner's image and the main layers' ``[image,
caption]`` sequence separately (all-gathering between them), so a rank's refiner rows are not its
image rows of the main layers (tiny model, 2 ranks: refiner rows 0-31 / 32-63; main layers' shards
of 48 rows, image rows 0-47 / 48-63). X-Slim's image stream on each rank is its image rows of the
main layers' shard, through the whole depth: the adapter moves the noise refiner's input and
output into that layout and back (one all-gather of the image each way, a tensor moved once is not
moved again; :mod:`xslim_xdit.adapters._z_image_shards`), so the stack residual, the probe's and the blocks' partial
sums all cover the same rows, which partition the image over the ranks. The token level stays
refused there (``token_sequence_parallel_refusal``); ``per_sample=True`` too. CFG parallel (the
wrapper splits the batch, one guidance half per rank) needs nothing of the adapter.

Omni mode (``x`` as nested lists: SigLIP features and per-token noise masks, the sequence ordered
``[caption, image, siglip]``) is refused, at every level.

Pipeline (diffusers 0.42 defaults): ``ZImagePipeline`` 50 steps with ``guidance_scale=5.0`` (CFG
batched in one call: the transformer gets the conditional and unconditional samples together);
the pipeline's own example runs Z-Image-Turbo with ``num_inference_steps=8, guidance_scale=0.0``
(one call per step). No preset and no rescale polynomial: none is published for Z-Image.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, fields
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from ._z_image_shards import (
    Layout,
    ShardedRefinerCall,
    is_xfuser_wrapper,
    note_shards,
    to_refiner_layout,
    to_sequence_layout,
)
from .attention import TokenContext, _TokenProcessor, no_gather
from .base import BlockCall, BlockStack, ModelAdapter, _put_arg, register_adapter

#: The layout of each model's current call, shared by every adapter instance, keyed by the model's
#: two managed block lists (both map to one layout).
_LAYOUTS: weakref.WeakKeyDictionary[nn.Module, Layout] = weakref.WeakKeyDictionary()


def z_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """RoPE as ``ZSingleStreamAttnProcessor`` applies it: ``x`` (B, S, H, D), ``freqs`` complex
    (B, S, D/2) per sample and token."""
    x_c = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(x_c * freqs.unsqueeze(2)).flatten(3).type_as(x)


@dataclass
class _UnifiedCall(BlockCall):
    """A main-layer call: the image rows and the caption rows of the one sequence, as two streams."""

    def with_streams(self, img: torch.Tensor, txt: torch.Tensor | None) -> tuple[tuple, dict]:
        assert txt is not None
        args, kwargs = list(self.args), dict(self.kwargs)
        _put_arg(self.signature, args, kwargs, "x", torch.cat([img, txt], 1))
        return tuple(args), kwargs


class ZImageTokenProcessor(_TokenProcessor):
    """Token refresh for ``ZSingleStreamAttnProcessor``: the block runs on the selected image tokens
    (then, in the main layers, every caption token); queries for those rows, at their positions'
    RoPE rows, against the image K/V cache with the selected rows spliced in and the fresh caption
    K/V; the key mask over the whole sequence, as the model built it."""

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        freqs_cis: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        ctx = self.ctx
        if ctx.index is None:
            return self.original(
                attn, hidden_states, encoder_hidden_states, attention_mask, freqs_cis, *args, **kwargs
            )
        if encoder_hidden_states is not None or args or kwargs:
            raise NotImplementedError("family 'z_image': token refresh supports the self-attention only")
        if ctx.gather is not no_gather:
            raise NotImplementedError(
                "family 'z_image': token refresh (level 'token') under sequence parallelism is not supported "
                f"({ZImageAdapter.token_sequence_parallel_refusal}); use polish='block' or 'none', or a "
                "schedule without token steps"
            )
        idx = ctx.index
        b, k_sel = idx.shape
        n_txt = hidden_states.shape[1] - k_sel  # caption rows after the image rows (main layers)

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.unflatten(-1, (attn.heads, -1))

        q = heads(attn.to_q(hidden_states))
        k_new, v_new = attn.to_k(hidden_states), attn.to_v(hidden_states)
        k_img, v_img = self._cached_kv(attn, k_new[:, :k_sel], v_new[:, :k_sel])
        n_img = k_img.shape[1]
        k = heads(torch.cat([k_img, k_new[:, k_sel:]], 1))
        v = heads(torch.cat([v_img, v_new[:, k_sel:]], 1))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if freqs_cis is not None:  # (B, S, D/2) over the whole sequence: keys all, queries their rows
            txt_pos = torch.arange(n_img, n_img + n_txt, device=idx.device).expand(b, n_txt)
            pos = torch.cat([idx, txt_pos], 1)
            k = z_rope(k, freqs_cis)
            q = z_rope(q, freqs_cis[torch.arange(b, device=idx.device)[:, None], pos])
        mask = attention_mask
        if mask is not None and mask.ndim == 2:
            mask = mask[:, None, None, :]
        self._count_queries(k_sel)
        out = ctx.attention(q, k, v, mask).flatten(2, 3).to(q.dtype)
        out = attn.to_out[0](out)
        if len(attn.to_out) > 1:
            out = attn.to_out[1](out)
        return out


@register_adapter
class ZImageAdapter(ModelAdapter):
    name = "z_image"
    #: X-Slim's image stream under xfuser's wrapper is each rank's image rows of the main layers'
    #: shard, not the noise refiner's shard (the adapter moves the refiner's rows with all-gathers)
    token_sequence_parallel_refusal = (
        "under xfuser's Z-Image wrapper each rank's image stream is its image rows of the main layers' "
        "shard (unequal: 48 and 16 of 64 on the tiny model), not the noise refiner's shard, so a token "
        "step would run the noise refiner on selected rows that other ranks hold (with their RoPE and "
        "mask rows) and select within unequal shards, which the adapter does not do"
    )
    model_class_names = ("ZImageTransformer2DModel",)
    tiny_config = MappingProxyType(
        dict(
            all_patch_size=(2,),
            all_f_patch_size=(1,),
            in_channels=4,
            dim=32,
            n_layers=3,
            n_refiner_layers=1,
            n_heads=2,
            n_kv_heads=2,
            cap_feat_dim=24,
            axes_dims=[4, 6, 6],  # sums to the head dimension
            axes_lens=[128, 16, 16],
        )
    )
    timestep_max = 1.0

    def tiny_inputs(
        self, batch: int = 1, seed: int = 0, height: int = 16, width: int = 16, text_len: int = 6
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """``height x width`` latents (2x2 patches: 64 image tokens, no padding at the default size)
        and ``text_len`` caption tokens per sample, the last sample's 34 (padded to 64, the others
        to 32: the main layers' sequences then differ in length, and get a key mask)."""
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(batch, 4, 1, height, width, generator=g)
        caps = [
            torch.randn(34 if i == batch - 1 and batch > 1 else text_len, 24, generator=g)
            for i in range(batch)
        ]
        return x, {"cap_feats": caps}

    def timestep_input(self, t: float, batch: int) -> torch.Tensor:
        """The noise level ``t`` in the family's units, one value per sample; :meth:`tiny_forward`
        passes the model its ``1 - t``."""
        return torch.full((batch,), t).to(self.timestep_dtype)

    def tiny_forward(
        self, model: nn.Module, x: torch.Tensor, timestep: torch.Tensor, cond: Any
    ) -> torch.Tensor:
        """As ``ZImagePipeline`` calls the transformer: a list of per-sample latents and captions, the
        model's rising ``t = 1 - sigma``."""
        out = model(list(x.unbind(0)), 1.0 - timestep, cond["cap_feats"], return_dict=False)[0]
        return torch.stack(out)

    def timestep(self, model: nn.Module, args: tuple, kwargs: dict) -> float | None:
        """The call's noise level ``1 - t`` (the model's ``t`` rises over a run); refuses omni mode."""
        x = kwargs.get("x", args[0] if args else None)
        if isinstance(x, list | tuple) and x and isinstance(x[0], list | tuple):
            raise NotImplementedError(
                "family 'z_image': omni mode (nested latents with SigLIP features and per-token noise "
                "masks, the sequence ordered [caption, image, siglip]) is not supported at any level"
            )
        if is_xfuser_wrapper(model):
            note_shards(_LAYOUTS.setdefault(model.noise_refiner, Layout()), args, kwargs)
        t = kwargs.get("t", args[1] if len(args) > 1 else None)
        if t is None:
            return super().timestep(model, args, kwargs)
        if isinstance(t, torch.Tensor):
            return 1.0 - float(t.reshape(-1)[0].item()) if t.numel() else None
        return 1.0 - float(t)

    def stacks(self, model: nn.Module) -> list[BlockStack]:
        layout = _LAYOUTS.setdefault(model.noise_refiner, Layout())
        _LAYOUTS[model.layers] = layout
        return [
            BlockStack("noise_refiner", model.noise_refiner, "noise_refiner", img_arg="x"),
            BlockStack(
                "layers",
                model.layers,
                "layers",
                img_arg="x",
                txt_arg="x",
                output="img_txt",
                attn_text_position="last",
            ),
        ]

    def parse_call(self, stack: BlockStack, sig: Any, args: tuple, kwargs: dict) -> BlockCall:
        layout = _LAYOUTS[stack.blocks]
        call = super().parse_call(stack, sig, args, kwargs)  # main layers: img and txt read the sequence
        state = {f.name: getattr(call, f.name) for f in fields(BlockCall)}
        geometry = layout.shards
        if stack.name == "noise_refiner":
            if geometry is not None:  # X-Slim's image stream: this rank's rows of the main layers
                state["img"] = to_sequence_layout(layout, call.img)
                call = ShardedRefinerCall(**state, layout=layout)
            layout.n_img = call.img.shape[1]
            return call
        seq, n = call.img, layout.n_img
        if geometry is not None:
            layout.moved.clear()  # the noise refiner is done for this call
            if seq.shape[1] != geometry.seq_rows:
                raise RuntimeError(
                    f"family 'z_image': xfuser's wrapper gave the main layers {seq.shape[1]} rows; "
                    f"expected {geometry.seq_rows} ({geometry.n_seq} tokens over {geometry.world} ranks)"
                )
        layout.n_txt = seq.shape[1] - n  # the model's own call: the whole sequence
        state["img"], state["txt"] = seq[:, :n], seq[:, n:]
        return _UnifiedCall(**state)

    def split_output(self, stack: BlockStack, out: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        if stack.name == "noise_refiner":
            layout = _LAYOUTS[stack.blocks]
            return (out if layout.shards is None else to_sequence_layout(layout, out)), None
        # on a token step the sequence holds the selected image rows and every caption row
        n_txt = _LAYOUTS[stack.blocks].n_txt
        return out[:, : out.shape[1] - n_txt], out[:, out.shape[1] - n_txt :]

    def make_output(self, stack: BlockStack, img: torch.Tensor, txt: torch.Tensor | None) -> Any:
        if stack.name != "noise_refiner":
            return torch.cat([img, txt], 1)
        layout = _LAYOUTS[stack.blocks]
        return img if layout.shards is None else to_refiner_layout(layout, img)

    def select_samples(self, call: BlockCall, index: torch.Tensor) -> BlockCall:
        if isinstance(call, ShardedRefinerCall) or (
            call.stack.name == "layers" and _LAYOUTS[call.stack.blocks].shards is not None
        ):
            raise NotImplementedError(
                "family 'z_image': per_sample=True under xfuser's sequence-parallel Z-Image wrapper is "
                "not supported (the noise refiner's rows are moved between two shard layouts); use "
                "per_sample=False"
            )
        return super().select_samples(call, index)

    def modulated_input(self, block: nn.Module, call: BlockCall) -> torch.Tensor:
        arguments = call.bound.arguments
        if arguments.get("noise_mask") is not None or not block.modulation:
            raise NotImplementedError("family 'z_image': the probe needs the global modulation")
        scale = 1.0 + block.adaLN_modulation(arguments["adaln_input"]).unsqueeze(1).chunk(4, dim=2)[0]
        return block.attention_norm1(call.img) * scale

    def self_attention(self, block: nn.Module) -> nn.Module:
        return block.attention

    def token_processor(self, attn: nn.Module, stack: BlockStack, ctx: TokenContext) -> Any:
        return ZImageTokenProcessor(attn.processor, ctx, stack.attn_text_position)
