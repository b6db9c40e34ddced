"""FLUX.2 (``Flux2Transformer2DModel``): 8 double-stream blocks (separate text and image weights,
joint attention over ``[text, image]``) then 48 single-stream "parallel" blocks (attention and MLP
share one fused input projection ``to_qkv_mlp_proj`` and one output projection). Unlike FLUX.1,
the adaLN modulation is computed once per call outside the blocks (``double_stream_modulation_*``,
``single_stream_modulation``) and passed in (``temb_mod_img``/``temb_mod_txt``/``temb_mod``). The
double blocks return ``(text, image)``; the model then concatenates ``[text, image]`` and calls the
single blocks with that one sequence (``encoder_hidden_states=None``), each returning it whole.
RoPE is FLUX's real form over 4 axes ``(t, h, w, l)``, one table over ``[text, image]``, applied
after the query/key RMS norms. Timesteps are the pipeline's ``t / 1000``, in [0, 1].

X-Slim sees both stacks through the same two streams: the image stream is the noisy image tokens
and the text stream the text tokens (and the reference-image tokens, see below); for the single
blocks the adapter splits the joint sequence (its text length is the double blocks' text length
of the same call) and joins it again. The single blocks' attention has no ``to_k``/``to_v``: its
token processor records the key and value rows from the fused projection itself on full steps.

Reference images (``Flux2Pipeline(image=...)``) put their tokens after the noisy ones in
``hidden_states``, told apart by their time coordinate in ``img_ids`` (the noisy image's is 0, the
references' 10, 20, ...); the pipeline keeps only the noisy rows of the output. They travel with the
text stream, so the token level never selects or reuses them: every token-refresh step computes
the text and the reference tokens fresh. The KV-cache mode of ``Flux2KleinKVPipeline``
(``kv_cache_mode``) moves the reference tokens out of the sequence after the first step (the
sequence changes length between steps, and the attention processors take the cache as extra
arguments): it is refused at every level, when the model is called.

Pipelines (diffusers 0.42 defaults): ``Flux2Pipeline`` 50 steps, guidance-distilled
(``guidance_scale=4.0`` is embedded, one transformer call per step; the pipeline's example for
FLUX.2-dev uses 50 steps and 2.5); ``Flux2KleinPipeline`` 50 steps with true CFG
(``cache_context("cond")``/``("uncond")``). No preset and no rescale polynomial:
none is published for FLUX.2.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from .attention import TokenContext, _TokenProcessor, apply_rope_bshd, rope_rows, rows_with_tail
from .base import BlockCall, BlockStack, ModelAdapter, _put_arg, register_adapter


@dataclass
class _Layout:
    """The current transformer call's sequence layout."""

    n_txt: int = 0  # text tokens (the double blocks' ``encoder_hidden_states``)
    n_ref: int = 0  # reference-image tokens after the noisy image tokens
    n_ids: int = 0  # image rows of the model's call (``img_ids``), before any sequence sharding


#: The layout of each model's current call, shared by every adapter instance (the engine's, a test's
#: hooks): keyed by the model's two block lists, which both map to one layout.
_LAYOUTS: weakref.WeakKeyDictionary[nn.Module, _Layout] = weakref.WeakKeyDictionary()


def _layout_of(blocks: nn.Module) -> _Layout:
    layout = _LAYOUTS.get(blocks)
    if layout is None:
        raise RuntimeError("family 'flux2': the adapter's stacks() were not read for this model")
    return layout


def _split(stack: BlockStack, out: Any, layout: _Layout) -> tuple[torch.Tensor, torch.Tensor]:
    """A block's output (or input) as (noisy image tokens, [text, reference tokens])."""
    n_txt, n_ref = layout.n_txt, layout.n_ref
    if stack.name == "double":
        txt, hidden = out
    else:  # the joint sequence [text, image, reference]
        txt, hidden = out[:, :n_txt], out[:, n_txt:]
    if not n_ref:
        return hidden, txt
    n = hidden.shape[1] - n_ref
    return hidden[:, :n], torch.cat([txt, hidden[:, n:]], 1)


def _join(stack: BlockStack, img: torch.Tensor, txt: torch.Tensor, layout: _Layout) -> Any:
    """The inverse of :func:`_split`: ``(text, [image, reference])`` or ``[text, image, reference]``."""
    n_txt = layout.n_txt
    text, hidden = txt[:, :n_txt], (torch.cat([img, txt[:, n_txt:]], 1) if txt.shape[1] > n_txt else img)
    return (text, hidden) if stack.name == "double" else torch.cat([text, hidden], 1)


@dataclass
class _Flux2Call(BlockCall):
    """A block call in the two canonical streams; called again, it gives the block its own layout."""

    layout: _Layout = field(default_factory=_Layout, repr=False)

    def with_streams(self, img: torch.Tensor, txt: torch.Tensor | None) -> tuple[tuple, dict]:
        assert txt is not None
        args, kwargs = list(self.args), dict(self.kwargs)
        joined = _join(self.stack, img, txt, self.layout)
        if self.stack.name == "double":
            _put_arg(self.signature, args, kwargs, "hidden_states", joined[1])
            _put_arg(self.signature, args, kwargs, "encoder_hidden_states", joined[0])
        else:
            _put_arg(self.signature, args, kwargs, "hidden_states", joined)
        return tuple(args), kwargs


class Flux2DoubleTokenProcessor(_TokenProcessor):
    """Token refresh for ``Flux2AttnProcessor`` (double blocks): queries for the selected image
    tokens, the reference tokens after them and every text token, against the image K/V cache
    with those rows spliced in and the fresh text K/V, RoPE at the rows' true positions in
    ``[text, image]``."""

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: Any = None,
        **kwargs: Any,
    ) -> Any:
        # ``Flux2Attention.forward`` drops (with a warning) the keyword arguments this signature does
        # not name, as it does for the original processor; the KV-cache processors' arguments
        # (``kv_cache``, ...) come only with ``kv_cache_mode``, refused in ``Flux2Adapter.timestep``
        ctx = self.ctx
        if ctx.index is None:
            return self.original(
                attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb, **kwargs
            )
        if kwargs:  # none reach here (see above); refuse rather than ignore one that would
            raise NotImplementedError(f"family 'flux2': token refresh does not take {sorted(kwargs)}")
        if getattr(attn, "fused_projections", False):
            raise NotImplementedError("family 'flux2': token refresh does not support fused QKV projections")
        if encoder_hidden_states is None or attention_mask is not None:
            raise NotImplementedError(
                "family 'flux2': token refresh supports the unmasked joint attention only"
            )
        idx = ctx.index
        n_ref = hidden_states.shape[1] - idx.shape[1]

        q, k, v, q_t, k_t, v_t = self._dual_stream_qkv(attn, hidden_states, encoder_hidden_states, tail=n_ref)
        rows = rows_with_tail(idx, k.shape[1], n_ref)
        n_txt = encoder_hidden_states.shape[1]
        k_all = torch.cat([k_t, k], 1)
        if image_rotary_emb is not None:
            cos, sin = image_rotary_emb  # over [text, image]
            k_all = apply_rope_bshd(k_all, cos, sin)
            q_t = apply_rope_bshd(q_t, cos[:n_txt], sin[:n_txt])
            q = apply_rope_bshd(q, *rope_rows((cos, sin), rows, n_txt))
        # under sequence parallelism each rank holds a shard of both streams (xfuser's FLUX.2 wrapper
        # splits the text too): gather the keys, roped with each rank's own positions
        k_all = torch.cat([ctx.gather(k_all[:, :n_txt], "txt"), ctx.gather(k_all[:, n_txt:], "img")], 1)
        v_all = torch.cat([ctx.gather(v_t, "txt"), ctx.gather(v, "img")], 1)
        self._count_queries(idx.shape[1])
        out = ctx.attention(torch.cat([q_t, q], 1), k_all, v_all, None)
        out = out.flatten(2, 3).to(q.dtype)
        out_img = attn.to_out[1](attn.to_out[0](out[:, n_txt:]))
        return out_img, attn.to_add_out(out[:, :n_txt])


class Flux2SingleTokenProcessor(_TokenProcessor):
    """Token refresh for ``Flux2ParallelSelfAttnProcessor`` (single blocks, one fused projection
    for attention and MLP): the block runs on ``[text, selected, reference]``; the attention's
    queries are those rows, its keys and values the cache with the selected and reference rows
    spliced in and the fresh text rows; the MLP half runs on the same rows. On full steps it records
    the image rows' raw keys and values from the fused projection (the attention has no
    ``to_k``/``to_v`` for the shared recorders to hook)."""

    def __init__(self, original: Any, ctx: TokenContext, layout: _Layout) -> None:
        super().__init__(original, ctx, "first")
        self.layout = layout

    def _qkv_mlp(self, attn: nn.Module, proj: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """As the original processor splits the fused projection: q, k, v (flat) and the MLP half."""
        qkv_dim = 3 * attn.inner_dim
        mlp_dim = attn.mlp_hidden_dim * attn.mlp_mult_factor
        local_qkv = proj.shape[-1] * qkv_dim // (qkv_dim + mlp_dim)
        qkv, mlp = torch.split(proj, [local_qkv, proj.shape[-1] - local_qkv], dim=-1)
        return (*qkv.chunk(3, dim=-1), mlp)

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: Any = None,
        **kwargs: Any,
    ) -> Any:
        ctx = self.ctx
        if ctx.index is None:
            if not ctx.record:
                return self.original(attn, hidden_states, attention_mask, image_rotary_emb, **kwargs)
            n_txt = self.layout.n_txt

            def record(_m: nn.Module, _inp: Any, proj: torch.Tensor) -> None:
                _, k, v, _ = self._qkv_mlp(attn, proj)
                ctx.kv[(ctx.branch, id(attn))] = [k[:, n_txt:].detach(), v[:, n_txt:].detach()]

            handle = attn.to_qkv_mlp_proj.register_forward_hook(record)
            try:  # the model's own computation; the hook only reads the projection
                return self.original(attn, hidden_states, attention_mask, image_rotary_emb, **kwargs)
            finally:
                handle.remove()
        if kwargs:  # none reach here (see above); refuse rather than ignore one that would
            raise NotImplementedError(f"family 'flux2': token refresh does not take {sorted(kwargs)}")
        if attention_mask is not None:
            raise NotImplementedError("family 'flux2': token refresh supports the unmasked attention only")
        idx = ctx.index
        n_txt, n_ref = self.layout.n_txt, self.layout.n_ref
        q, k_new, v_new, mlp = self._qkv_mlp(attn, attn.to_qkv_mlp_proj(hidden_states))
        k_img, v_img = self._cached_kv(attn, k_new[:, n_txt:], v_new[:, n_txt:], tail=n_ref)
        rows = rows_with_tail(idx, k_img.shape[1], n_ref)

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.unflatten(-1, (-1, attn.head_dim))

        q = attn.norm_q(heads(q))
        k = attn.norm_k(heads(torch.cat([k_new[:, :n_txt], k_img], 1)))
        v = heads(torch.cat([v_new[:, :n_txt], v_img], 1))
        if image_rotary_emb is not None:
            cos, sin = image_rotary_emb  # over [text, image]
            k = apply_rope_bshd(k, cos, sin)
            q_img = apply_rope_bshd(q[:, n_txt:], *rope_rows((cos, sin), rows, n_txt))
            q = torch.cat([apply_rope_bshd(q[:, :n_txt], cos[:n_txt], sin[:n_txt]), q_img], 1)
        k = torch.cat([ctx.gather(k[:, :n_txt], "txt"), ctx.gather(k[:, n_txt:], "img")], 1)
        v = torch.cat([ctx.gather(v[:, :n_txt], "txt"), ctx.gather(v[:, n_txt:], "img")], 1)
        self._count_queries(idx.shape[1])
        out = ctx.attention(q, k, v, None).flatten(2, 3).to(q.dtype)
        return attn.to_out(torch.cat([out, attn.mlp_act_fn(mlp)], dim=-1))


@register_adapter
class Flux2Adapter(ModelAdapter):
    name = "flux2"
    model_class_names = ("Flux2Transformer2DModel",)
    tiny_config = MappingProxyType(
        dict(
            patch_size=1,
            in_channels=8,
            num_layers=2,
            num_single_layers=3,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=24,
            timestep_guidance_channels=32,
            axes_dims_rope=(4, 4, 4, 4),  # sums to the head dimension
        )
    )
    timestep_max = 1.0

    def tiny_inputs(
        self,
        batch: int = 1,
        seed: int = 0,
        height: int = 4,
        width: int = 4,
        text_len: int = 6,
        reference: int = 0,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """``height x width`` image tokens with their ``(t, h, w, l)`` ids, ``text_len`` text tokens
        (ids ``(0, 0, 0, l)``), guidance 4; with ``reference``, a reference image of ``reference x
        width`` tokens at time coordinate 10, passed as ``reference_latents`` (see :meth:`tiny_forward`)."""
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(batch, height * width, 8, generator=g)

        def ids(t: int, h: int) -> torch.Tensor:
            grid = torch.zeros(h, width, 4)
            grid[..., 0] = t
            grid[..., 1] = torch.arange(h)[:, None]
            grid[..., 2] = torch.arange(width)[None, :]
            return grid.reshape(-1, 4)

        txt_ids = torch.zeros(text_len, 4)
        txt_ids[:, 3] = torch.arange(text_len)
        img_ids = ids(0, height) if not reference else torch.cat([ids(0, height), ids(10, reference)])
        cond: dict[str, Any] = {
            "encoder_hidden_states": torch.randn(batch, text_len, 24, generator=g),
            "img_ids": img_ids.expand(batch, -1, -1),
            "txt_ids": txt_ids.expand(batch, -1, -1),
            "guidance": torch.full((batch,), 4.0),
        }
        if reference:
            cond["reference_latents"] = torch.randn(batch, reference * width, 8, generator=g)
        return x, cond

    def tiny_forward(
        self, model: nn.Module, x: torch.Tensor, timestep: torch.Tensor, cond: Any
    ) -> torch.Tensor:
        """As ``Flux2Pipeline`` calls the transformer: the reference latents after the noisy ones,
        the prediction for the noisy ones kept."""
        cond = dict(cond)
        ref = cond.pop("reference_latents", None)
        hidden = x if ref is None else torch.cat([x, ref], 1)
        return model(hidden, timestep=timestep, return_dict=False, **cond)[0][:, : x.shape[1]]

    def timestep(self, model: nn.Module, args: tuple, kwargs: dict) -> float | None:
        """The call's timestep (refusing the KV-cache mode); reads the call's reference tokens too (``img_ids`` rows with a
        nonzero time coordinate, after the noisy image's), which its block calls then use."""
        if kwargs.get("kv_cache_mode") is not None:
            raise NotImplementedError(
                "family 'flux2': the reference K/V cache mode (kv_cache_mode, Flux2KleinKVPipeline) is not "
                "supported at any level; disable X-Slim for this pipeline"
            )
        ids = kwargs.get("img_ids")
        n_ref = 0
        if isinstance(ids, torch.Tensor):
            t = (ids[0] if ids.ndim == 3 else ids)[:, 0]
            n_ref = int((t != 0).sum())
            if n_ref and bool((t[-n_ref:] == 0).any()):
                raise NotImplementedError(
                    "family 'flux2': reference-image tokens must follow the noisy image tokens in img_ids"
                )
        layout = self._model_layout(model)
        layout.n_ref = n_ref
        layout.n_ids = int(ids.shape[-2]) if isinstance(ids, torch.Tensor) else 0
        return super().timestep(model, args, kwargs)

    def _model_layout(self, model: nn.Module) -> _Layout:
        for stack in self.stacks(model):  # registers the model's layout on first sight
            return _layout_of(stack.blocks)
        raise AssertionError("unreachable")

    def parse_call(self, stack: BlockStack, sig: Any, args: tuple, kwargs: dict) -> BlockCall:
        call = super().parse_call(stack, sig, args, kwargs)
        layout = _layout_of(stack.blocks)
        if stack.name == "double":
            assert call.txt is not None
            layout.n_txt = call.txt.shape[1]
            if not layout.n_ref:
                return call
            if call.img.shape[1] != layout.n_ids:
                raise NotImplementedError(
                    "family 'flux2': reference-image tokens with the sequence sharded over ranks (xDiT "
                    "sequence parallelism) are not supported: the shards do not end with them"
                )
            img, txt = _split(stack, (call.txt, call.img), layout)
        else:
            if call.txt is not None:  # the model passes the joint sequence with encoder_hidden_states=None
                raise NotImplementedError("family 'flux2': single blocks called with a separate text stream")
            img, txt = _split(stack, call.img, layout)
        state = {f.name: getattr(call, f.name) for f in fields(BlockCall)}
        state["img"], state["txt"] = img, txt
        return _Flux2Call(**state, layout=layout)

    def split_output(self, stack: BlockStack, out: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        return _split(stack, out, _layout_of(stack.blocks))

    def make_output(self, stack: BlockStack, img: torch.Tensor, txt: torch.Tensor | None) -> Any:
        assert txt is not None
        return _join(stack, img, txt, _layout_of(stack.blocks))

    def stacks(self, model: nn.Module) -> list[BlockStack]:
        layout = _LAYOUTS.setdefault(model.transformer_blocks, _Layout())
        _LAYOUTS[model.single_transformer_blocks] = layout
        common: dict[str, Any] = {"txt_arg": "encoder_hidden_states", "output": "txt_img"}
        return [
            BlockStack("double", model.transformer_blocks, "transformer_blocks", **common),
            BlockStack(
                "single",
                model.single_transformer_blocks,
                "single_transformer_blocks",
                attn_text_position="first",
                **common,
            ),
        ]

    def modulated_input(self, block: nn.Module, call: BlockCall) -> torch.Tensor:
        from diffusers.models.transformers.transformer_flux2 import Flux2Modulation

        (shift, scale, _), _ = Flux2Modulation.split(call.bound.arguments["temb_mod_img"], 2)
        return (1 + scale) * block.norm1(call.img) + shift

    def self_attention(self, block: nn.Module) -> nn.Module:
        return block.attn

    def token_processor(self, attn: nn.Module, stack: BlockStack, ctx: TokenContext) -> Any:
        if stack.name == "double":
            return Flux2DoubleTokenProcessor(attn.processor, ctx, "none")
        return Flux2SingleTokenProcessor(attn.processor, ctx, _layout_of(stack.blocks))
