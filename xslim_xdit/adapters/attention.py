"""Token refresh inside attention: queries for the refreshed tokens only, against a K/V cache.

On full steps a forward hook on the self-attention's ``to_k``/``to_v`` records the raw
(pre-norm, pre-RoPE) key and value rows of the image tokens; the computation itself is the
model's own. On a token-refresh step the block runs on the selected image tokens (and all text
tokens), and the processors below:

1. project queries, keys and values for those tokens only,
2. splice the new image K/V rows into the cache at the tokens' positions (per sample),
3. apply the key norm and RoPE to the full key sequence and the query norm and RoPE (at the
   tokens' true positions) to the queries,
4. attend the few queries to all keys, and project the output of those rows only.

Unselected tokens keep the K/V of the last step that computed them. Text tokens are always
fresh: their K/V are recomputed every refresh. When no refresh is active every processor
delegates to the model's original processor, so full steps are untouched.

Under sequence parallelism the keys and values are gathered across the shards
(``TokenContext.gather``); under PipeFusion the joint processor hands the call's image K/V to
PipeFusion's patch buffer and attends to the whole image it returns (``TokenContext.kv_buffer``).
The shared state (:class:`TokenContext`), the K/V recorders, :class:`TokenAttentionHooks` and the
row helpers live in :mod:`xslim_xdit.adapters.token_context` and are re-exported here.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .token_context import (
    AttentionFn,
    GatherFn,
    KVBufferFn,
    TokenAttentionHooks,
    TokenContext,
    _image_rows,
    flat_rows,
    gather_rows,
    install_kv_recorders,
    no_gather,
    rows_with_tail,
    sdpa_bshd,
    splice,
)

__all__ = [
    "AttentionFn",
    "GatherFn",
    "JointAttnTokenProcessor",
    "KVBufferFn",
    "SelfAttnTokenProcessor",
    "TokenAttentionHooks",
    "TokenContext",
    "WanSelfAttnTokenProcessor",
    "apply_rope_bshd",
    "flat_rows",
    "gather_rows",
    "install_kv_recorders",
    "no_gather",
    "rope_rows",
    "rows_with_tail",
    "sdpa_bshd",
    "splice",
    "wan_rope_bshd",
]


def rope_rows(freqs: tuple[torch.Tensor, torch.Tensor], index: torch.Tensor, offset: int) -> tuple:
    """Per-sample RoPE rows ``offset + index`` of ``(cos, sin)`` tables shaped (S, D)."""
    cos, sin = freqs
    pos = index + offset
    return cos[pos], sin[pos]  # (B, k, D)


def apply_rope_bshd(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE as diffusers' ``apply_rotary_emb(use_real=True, use_real_unbind_dim=-1)`` computes it,
    with per-sample tables: ``x`` (B, S, H, D), ``cos``/``sin`` (S, D) or (B, S, D)."""
    if cos.dim() == 2:
        cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    else:
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    cos, sin = cos.to(x.device), sin.to(x.device)
    x_real, x_imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    x_rotated = torch.stack([-x_imag, x_real], dim=-1).flatten(3)
    return (x.float() * cos + x_rotated.float() * sin).to(x.dtype)


class _TokenProcessor:
    """Common part: delegation to the original processor when no refresh is active."""

    #: the sequence's dimension in the K/V that xfuser's processor for this attention keeps in
    #: PipeFusion's patch buffer: 1 for ``(batch, rows, heads, dim)`` (xfuser's FLUX processor)
    buffer_seq_dim = 1

    def __init__(self, original: Any, ctx: TokenContext, text_position: str) -> None:
        self.original = original
        self.ctx = ctx
        self.text_position = text_position
        #: this attention's K/V pair, handed over by eager code before a token-refresh call
        #: (:meth:`TokenAttentionHooks.stage`): the compiled block then reads no dict keyed by
        #: the attention's identity (each block would get a graph of its own)
        self.kv_pair: list[torch.Tensor | None] | None = None
        self.kv_staged = False

    def _count_queries(self, rows: int) -> None:
        """``TokenContext.query_rows`` (statistics and tests), counted in eager runs only: an int
        that changes every step would guard a compiled block's graph."""
        if not torch.compiler.is_compiling():
            self.ctx.query_rows += rows

    def _through_patch_buffer(self, attn: nn.Module, k: torch.Tensor, v: torch.Tensor) -> tuple:
        """PipeFusion (``TokenContext.kv_buffer`` set): the call's image K/V ``(batch, rows,
        heads, dim)`` (every row of its patch, the refreshed ones spliced in, after norm and RoPE)
        written into xfuser's buffer in the layout xfuser's own processor keeps there (a full
        step writes it, so a token step must match), and the whole image's K/V back, ``(batch,
        rows, heads, dim)``. Without PipeFusion: ``k, v`` unchanged."""
        kv_buffer = self.ctx.kv_buffer
        if kv_buffer is None:
            return k, v
        if self.buffer_seq_dim == 1:
            return kv_buffer(attn, k, v, 1)
        k, v = kv_buffer(attn, k.transpose(1, 2), v.transpose(1, 2), self.buffer_seq_dim)
        return k.transpose(1, 2), v.transpose(1, 2)

    def _cached_kv(self, attn: nn.Module, k_new: torch.Tensor, v_new: torch.Tensor, tail: int = 0) -> tuple:
        """The cached image K/V with the new rows spliced in: the selected tokens' rows, then (with
        ``tail``) the last ``tail`` rows of the cache, which every refresh computes (reference-image
        tokens that follow the image tokens, a condition)."""
        pair = self.kv_pair if self.kv_staged else self.ctx.kv.get((self.ctx.branch, id(attn)))
        if pair is None or pair[0] is None or pair[1] is None:
            raise RuntimeError("token refresh before any full step recorded the K/V cache")
        if pair[0].shape[0] != k_new.shape[0]:  # else an index error deep in the splice, or SDPA's
            raise RuntimeError(
                f"token refresh: the K/V cache holds {pair[0].shape[0]} samples and this call "
                f"{k_new.shape[0]}: the batch changed within a run of one guidance branch; start a new "
                "run (engine.start_run) or use polish='block' or a schedule without token steps"
            )
        idx = self.ctx.index
        assert idx is not None
        flat = self.ctx.flat
        if tail:
            idx, flat = rows_with_tail(idx, pair[0].shape[1], tail), None
        k = splice(pair[0], idx, k_new, flat)
        v = splice(pair[1], idx, v_new, flat)
        pair[0], pair[1] = k, v  # the refreshed rows stay fresh for later refreshes
        return k, v

    def _dual_stream_qkv(
        self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, tail: int = 0
    ) -> tuple[torch.Tensor, ...]:
        """The dual-stream attention's six projections on a token-refresh call, each as
        ``(batch, rows, heads, head_dim)`` and through the norms the attention has: the computed image
        rows' queries, the image K/V cache with those rows spliced in (:meth:`_cached_kv`, ``tail``
        as there), and the text's queries, keys and values (``add_*_proj``), all fresh."""

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.unflatten(-1, (attn.heads, -1))

        def normed(norm_name: str, x: torch.Tensor) -> torch.Tensor:
            norm = getattr(attn, norm_name, None)
            return norm(x) if norm is not None else x

        q = heads(attn.to_q(hidden_states))
        k, v = self._cached_kv(attn, attn.to_k(hidden_states), attn.to_v(hidden_states), tail=tail)
        txt = encoder_hidden_states
        q_t, k_t, v_t = heads(attn.add_q_proj(txt)), heads(attn.add_k_proj(txt)), heads(attn.add_v_proj(txt))
        return (
            normed("norm_q", q),
            normed("norm_k", heads(k)),
            heads(v),
            normed("norm_added_q", q_t),
            normed("norm_added_k", k_t),
            v_t,
        )


class SelfAttnTokenProcessor(_TokenProcessor):
    """For diffusers' ``Attention`` used as plain self-attention (DiT, PixArt ``attn1``)."""

    #: xfuser's ``xFuserAttnProcessor2_0`` keeps ``(batch, heads, rows, dim)`` in the buffer
    buffer_seq_dim = 2

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        if self.ctx.index is None:
            return self.original(
                attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs
            )
        if encoder_hidden_states is not None or attention_mask is not None or attn.group_norm is not None:
            raise NotImplementedError("token refresh supports unmasked self-attention only")
        b, n_q, _ = hidden_states.shape
        q = attn.to_q(hidden_states)
        k, v = self._cached_kv(attn, attn.to_k(hidden_states), attn.to_v(hidden_states))
        head_dim = k.shape[-1] // attn.heads
        q = q.view(b, -1, attn.heads, head_dim)
        k = k.view(b, -1, attn.heads, head_dim)
        v = v.view(b, -1, attn.heads, head_dim)
        if attn.norm_q is not None:
            q = attn.norm_q(q.transpose(1, 2)).transpose(1, 2)
        if attn.norm_k is not None:
            k = attn.norm_k(k.transpose(1, 2)).transpose(1, 2)
        k, v = self.ctx.gather(k, "img"), self.ctx.gather(v, "img")
        # PipeFusion: the patch's K/V into xfuser's buffer, the queries attend to the whole image
        k, v = self._through_patch_buffer(attn, k, v)
        self._count_queries(n_q)
        out = self.ctx.attention(q, k, v, None).reshape(b, n_q, -1).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


class JointAttnTokenProcessor(_TokenProcessor):
    """For FLUX and HunyuanVideo attention: double-stream (text through ``add_*_proj``) and
    single-stream (text concatenated with the image tokens), with RoPE on image tokens.

    ``text_position`` says where the text sits in the joint sequence: ``"first"`` (FLUX:
    ``[txt, img]``, RoPE over the whole joint sequence) or ``"last"`` (HunyuanVideo:
    ``[img, txt]``, RoPE over image tokens only).
    """

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
        if ctx.index is None:
            return self.original(
                attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb, *args, **kwargs
            )
        if getattr(attn, "fused_projections", False):
            raise NotImplementedError("token refresh does not support fused QKV projections; unfuse them")
        idx = ctx.index
        txt_first = self.text_position == "first"
        double = getattr(attn, "add_q_proj", None) is not None and encoder_hidden_states is not None
        if not double and encoder_hidden_states is not None:
            # HunyuanVideo's single-stream processor concatenates the streams itself.
            hidden_states = torch.cat([hidden_states, encoder_hidden_states], dim=1)
        n_txt = encoder_hidden_states.shape[1] if encoder_hidden_states is not None else ctx.n_txt
        if double:
            img_in, txt_in = hidden_states, encoder_hidden_states
        elif txt_first:
            txt_in, img_in = hidden_states[:, :n_txt], hidden_states[:, n_txt:]
        else:
            img_in, txt_in = hidden_states[:, : hidden_states.shape[1] - n_txt], hidden_states[:, -n_txt:]

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.unflatten(-1, (attn.heads, -1))

        if double:
            q_img, k_img, v_img, q_txt, k_txt, v_txt = self._dual_stream_qkv(attn, img_in, txt_in)
        else:
            q_all = heads(
                attn.to_q(torch.cat([txt_in, img_in], 1) if txt_first else torch.cat([img_in, txt_in], 1))
            )
            k_new = attn.to_k(torch.cat([txt_in, img_in], 1) if txt_first else torch.cat([img_in, txt_in], 1))
            v_new = attn.to_v(torch.cat([txt_in, img_in], 1) if txt_first else torch.cat([img_in, txt_in], 1))
            k_new_img, v_new_img = (
                _image_rows(k_new, n_txt, self.text_position),
                _image_rows(v_new, n_txt, self.text_position),
            )
            k_txt = k_new[:, :n_txt] if txt_first else k_new[:, k_new.shape[1] - n_txt :]
            v_txt = v_new[:, :n_txt] if txt_first else v_new[:, v_new.shape[1] - n_txt :]
            k_img, v_img = self._cached_kv(attn, k_new_img, v_new_img)
            q_all = attn.norm_q(q_all) if attn.norm_q is not None else q_all
            k_img, v_img, k_txt, v_txt = heads(k_img), heads(v_img), heads(k_txt), heads(v_txt)
            if attn.norm_k is not None:
                k_img, k_txt = attn.norm_k(k_img), attn.norm_k(k_txt)
            n_sel = img_in.shape[1]
            q_txt = q_all[:, :n_txt] if txt_first else q_all[:, n_sel:]
            q_img = q_all[:, n_txt:] if txt_first else q_all[:, :n_sel]

        # RoPE: queries at their true positions, keys over the whole sequence.
        if image_rotary_emb is not None:
            cos, sin = image_rotary_emb
            if txt_first:  # FLUX: tables cover [txt, img]
                k_roped = apply_rope_bshd(torch.cat([k_txt, k_img], 1), cos, sin)
                k_txt, k_img = k_roped[:, :n_txt], k_roped[:, n_txt:]
                qc, qs = rope_rows((cos, sin), idx, n_txt)
                q_img = apply_rope_bshd(q_img, qc, qs)
                q_txt = apply_rope_bshd(q_txt, cos[:n_txt], sin[:n_txt])
            else:  # HunyuanVideo: tables cover image tokens only; text has no RoPE
                k_img = apply_rope_bshd(k_img, cos, sin)
                qc, qs = rope_rows((cos, sin), idx, 0)
                q_img = apply_rope_bshd(q_img, qc, qs)
        # Under sequence parallelism each rank holds a shard of the keys: gather them (after
        # RoPE, which each rank applied with its own positions). Identity on one device.
        k_img, v_img = ctx.gather(k_img, "img"), ctx.gather(v_img, "img")
        k_txt, v_txt = ctx.gather(k_txt, "txt"), ctx.gather(v_txt, "txt")
        # PipeFusion: the patch's K/V (refreshed rows spliced in) go into xfuser's buffer at the
        # patch's rows, so later patches see them; the queries attend to the whole image
        k_img, v_img = self._through_patch_buffer(attn, k_img, v_img)
        k_full = torch.cat([k_txt, k_img], 1) if txt_first else torch.cat([k_img, k_txt], 1)
        v_full = torch.cat([v_txt, v_img], 1) if txt_first else torch.cat([v_img, v_txt], 1)
        q = torch.cat([q_txt, q_img], 1) if txt_first else torch.cat([q_img, q_txt], 1)
        self._count_queries(q_img.shape[1])
        out = ctx.attention(q, k_full, v_full, attention_mask).flatten(2, 3).to(q.dtype)
        n_sel = q_img.shape[1]
        if txt_first:
            out_txt, out_img = out[:, :n_txt], out[:, n_txt:]
        else:
            out_img, out_txt = out[:, :n_sel], out[:, n_sel:]
        if double:
            out_img = attn.to_out[1](attn.to_out[0](out_img.contiguous()))
            out_txt = attn.to_add_out(out_txt.contiguous())
            return out_img, out_txt
        if encoder_hidden_states is not None:
            # HunyuanVideo single-stream: returns the two parts; it has no output projection.
            if getattr(attn, "to_out", None) is not None:
                out_img = attn.to_out[1](attn.to_out[0](out_img))
            if getattr(attn, "to_add_out", None) is not None:
                out_txt = attn.to_add_out(out_txt)
            return out_img, out_txt
        return torch.cat([out_txt, out_img], 1) if txt_first else torch.cat([out_img, out_txt], 1)


def wan_rope_bshd(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE as ``WanAttnProcessor`` computes it (interleaved pairs; tables repeat-interleaved):
    ``x`` (B, S, H, D), ``cos``/``sin`` (1 or B, S, 1, D)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class WanSelfAttnTokenProcessor(_TokenProcessor):
    """For Wan's self-attention (``WanAttention`` as ``attn1``): RMS norm of the queries and keys
    across heads (before the head split), then Wan's RoPE over the video tokens; the text enters
    through the block's cross-attention, which runs unchanged on the selected tokens."""

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        ctx = self.ctx
        if ctx.index is None:
            return self.original(
                attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb, *args, **kwargs
            )
        if getattr(attn, "fused_projections", False):
            raise NotImplementedError("token refresh does not support fused QKV projections; unfuse them")
        if encoder_hidden_states is not None or attention_mask is not None or args or kwargs:
            raise NotImplementedError("token refresh supports Wan's unmasked self-attention (attn1) only")
        n_q = hidden_states.shape[1]
        q = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
        k, v = self._cached_kv(attn, attn.to_k(hidden_states), attn.to_v(hidden_states))
        k, v = attn.norm_k(k).unflatten(2, (attn.heads, -1)), v.unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:  # tables (1, S, 1, D) over the whole video: keys all, queries at idx
            cos, sin = rotary_emb
            k = wan_rope_bshd(k, cos, sin)
            q = wan_rope_bshd(q, cos[0][ctx.index], sin[0][ctx.index])
        k, v = ctx.gather(k, "img"), ctx.gather(v, "img")
        self._count_queries(n_q)
        out = ctx.attention(q, k, v, None).flatten(2, 3).type_as(q)
        return attn.to_out[1](attn.to_out[0](out))
