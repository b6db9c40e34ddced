"""Qwen-Image and Qwen-Image-Edit (``QwenImageTransformer2DModel``): one stack of 60 dual-stream
blocks (separate image and text weights, per-stream adaLN modulation from the block's own
``img_mod``/``txt_mod``, one joint attention over ``[text, image]``). Blocks take the text as a
second stream and return ``(text, image)``. RoPE is complex (``use_real=False``): a table for the
image tokens and one for the text tokens, applied per stream after the query/key RMS norms. The
text has a key mask (``encoder_hidden_states_mask``). Timesteps are the pipeline's ``t / 1000``,
in [0, 1].

Qwen-Image-Edit puts the reference image's tokens after the noisy image tokens in
``hidden_states`` (``img_shapes`` per sample: the noisy image's shape first, then the reference
images'); the pipeline keeps only the noisy rows of the output. X-Slim treats the reference tokens
as a condition: they travel with the text stream (concatenated after the text), so they are never
skipped by the token level and never selected as "image tokens", and every token-refresh step
computes them (and the text) fresh. Qwen-Image-Edit-2511 (``zero_cond_t=True``) modulates the
reference tokens with the timestep 0 (``modulate_index``); a token-refresh step gives the selected
tokens and the reference tokens their rows of that index.

Pipelines (diffusers 0.42 defaults): ``QwenImagePipeline`` and ``QwenImageEditPipeline``, 50 steps,
true classifier-free guidance (``true_cfg_scale=4.0`` when a negative prompt is given): two
transformer calls per step in ``cache_context("cond")`` and ``("uncond")``, each a branch of its
own caches and K/V.

Under xDiT's sequence parallelism (``xFuserQwenImageTransformerWrapper`` chunks the image and the
text) a token step attends this shard's queries to every shard's K/V, gathered after RoPE; like
xfuser's processor it attends without a mask, so a padded text is refused there.

No preset and no rescale polynomial: none is published for Qwen-Image (the TeaCache ports for
ComfyUI and vLLM-Omni reuse FLUX.1's polynomial unchanged, marked as to be tuned).
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from .attention import TokenContext, _TokenProcessor, gather_rows, no_gather, rows_with_tail
from .base import BlockCall, BlockStack, ModelAdapter, _put_arg, register_adapter


def qwen_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """RoPE as diffusers' ``apply_rotary_emb_qwen(use_real=False)`` computes it: ``x`` (B, S, H, D),
    ``freqs`` complex (S, D/2) shared by the batch or (B, S, D/2) per sample."""
    freqs = freqs.unsqueeze(-2)  # broadcast over heads
    x_c = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(x_c * freqs.to(x.device)).flatten(3).type_as(x)


@dataclass
class _Layout:
    """The current transformer call's image layout: noisy image tokens then reference tokens."""

    n_ref: int = 0  # reference-image tokens after the noisy ones (Qwen-Image-Edit), per sample
    n_txt: int = 0  # text tokens of the current call
    n_ids: int = 0  # image tokens of the model's call (all of ``img_shapes``), before any sharding


#: The layout of each model's current call, shared by every adapter instance (the engine's, a test's
#: hooks), keyed by the model's block list.
_LAYOUTS: weakref.WeakKeyDictionary[nn.Module, _Layout] = weakref.WeakKeyDictionary()


@dataclass
class _QwenCall(BlockCall):
    """A block call whose image stream is the noisy tokens only: the reference tokens travel at the
    end of the text stream; a token-refresh step gives the selected and reference tokens their rows
    of ``modulate_index``."""

    layout: _Layout = field(default_factory=_Layout, repr=False)
    ctx: TokenContext | None = field(default=None, repr=False)

    def with_streams(self, img: torch.Tensor, txt: torch.Tensor | None) -> tuple[tuple, dict]:
        assert txt is not None
        n_txt = self.layout.n_txt
        hidden = torch.cat([img, txt[:, n_txt:]], 1) if txt.shape[1] > n_txt else img
        args, kwargs = list(self.args), dict(self.kwargs)
        _put_arg(self.signature, args, kwargs, "hidden_states", hidden)
        _put_arg(self.signature, args, kwargs, "encoder_hidden_states", txt[:, :n_txt])
        index = self.bound.arguments.get("modulate_index")
        ctx = self.ctx
        if (
            index is not None
            and ctx is not None
            and ctx.index is not None
            and img.shape[1] != self.img.shape[1]
        ):
            n = self.img.shape[1]
            rows = torch.cat([gather_rows(index, ctx.index, ctx.flat), index[:, n:]], 1)
            _put_arg(self.signature, args, kwargs, "modulate_index", rows)
        return tuple(args), kwargs


class QwenDoubleStreamTokenProcessor(_TokenProcessor):
    """Token refresh for ``QwenDoubleStreamAttnProcessor2_0`` (and xfuser's
    ``xFuserQwenDoubleStreamAttnProcessor``): queries for the selected image tokens, the reference
    tokens (after them in ``hidden_states``) and every text token, against the image K/V cache with
    the selected and reference rows spliced in, and the fresh text K/V; the joint sequence ordered
    ``[text, image]``, each stream roped with its own table at its true positions."""

    _mask_seen: torch.Tensor | None = None
    _mask_valid: bool = True

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_hidden_states_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: Any = None,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        ctx = self.ctx
        if ctx.index is None:
            return self.original(
                attn,
                hidden_states,
                encoder_hidden_states,
                encoder_hidden_states_mask,
                attention_mask,
                image_rotary_emb,
                *args,
                **kwargs,
            )
        if getattr(attn, "fused_projections", False):
            raise NotImplementedError(
                "family 'qwen_image': token refresh does not support fused QKV projections"
            )
        if attention_mask is not None and encoder_hidden_states_mask is None and ctx.gather is not no_gather:
            # xfuser's Qwen-Image wrapper passes its joint mask ([the whole text's mask, this shard's
            # image]) as attention_mask, and its processor attends without any mask: so does a token
            # step, which is exact when every text token is valid; a padded prompt is refused
            if not self._all_valid(attention_mask):
                raise NotImplementedError(
                    "family 'qwen_image': token refresh under xfuser's sequence parallelism with padded text "
                    "tokens (encoder_hidden_states_mask with zeros) is not supported: xfuser's attention "
                    "attends them on full steps; use polish='block' or 'none', or a prompt without padding"
                )
            attention_mask = None
        if encoder_hidden_states is None or attention_mask is not None or args or kwargs:
            raise NotImplementedError(
                "family 'qwen_image': token refresh supports the joint attention with a text key mask only"
            )
        idx = ctx.index
        b, k_sel = idx.shape
        n_ref = hidden_states.shape[1] - k_sel  # reference tokens follow the selected ones

        q, k, v, q_t, k_t, v_t = self._dual_stream_qkv(attn, hidden_states, encoder_hidden_states, tail=n_ref)
        # positions of the computed rows in the image sequence: the selected, then every reference row
        rows = rows_with_tail(idx, k.shape[1], n_ref)
        if image_rotary_emb is not None:
            img_freqs, txt_freqs = image_rotary_emb
            k = qwen_rope(k, img_freqs)  # every image key at its position
            q = qwen_rope(q, img_freqs.to(q.device)[rows])  # the queries at theirs, per sample
            q_t, k_t = qwen_rope(q_t, txt_freqs), qwen_rope(k_t, txt_freqs)
        # Under sequence parallelism (xfuser's wrapper chunks the image and the text over the ranks)
        # the queries of this shard attend to every shard's keys: gathered after RoPE, which each
        # rank applied with its shard's tables. Identity on one device.
        k, v = ctx.gather(k, "img"), ctx.gather(v, "img")
        k_t, v_t = ctx.gather(k_t, "txt"), ctx.gather(v_t, "txt")
        mask = None
        if encoder_hidden_states_mask is not None:
            keys = torch.ones(b, k.shape[1], dtype=torch.bool, device=k.device)
            mask = torch.cat([encoder_hidden_states_mask.bool(), keys], 1)[:, None, None, :]
        self._count_queries(k_sel)
        n_txt = encoder_hidden_states.shape[1]
        out = ctx.attention(torch.cat([q_t, q], 1), torch.cat([k_t, k], 1), torch.cat([v_t, v], 1), mask)
        out = out.flatten(2, 3).to(q.dtype)
        out_txt, out_img = out[:, :n_txt], out[:, n_txt:]
        out_img = attn.to_out[0](out_img.contiguous())
        if len(attn.to_out) > 1:
            out_img = attn.to_out[1](out_img)
        return out_img, attn.to_add_out(out_txt.contiguous())

    def _all_valid(self, mask: torch.Tensor) -> bool:
        """Whether a joint mask keeps every key; xfuser's wrapper builds one mask per call and
        passes it to every block, so it is read (a device sync) once per call, not per block."""
        if self._mask_seen is not mask:
            self._mask_seen, self._mask_valid = mask, bool(mask.all())
        return self._mask_valid


def _image_tokens(shapes: Any) -> list[int]:
    """Tokens per image of one sample's ``img_shapes`` entry (a list of (frames, h, w), or one)."""
    if shapes and isinstance(shapes[0], int):
        shapes = [shapes]
    return [math.prod(s) for s in shapes]


@register_adapter
class QwenImageAdapter(ModelAdapter):
    name = "qwen_image"
    model_class_names = ("QwenImageTransformer2DModel",)
    tiny_config = MappingProxyType(
        dict(
            patch_size=2,
            in_channels=16,  # 4 latent channels packed 2x2, as the pipeline packs them
            out_channels=4,
            num_layers=3,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=24,
            axes_dims_rope=(4, 6, 6),  # sums to the head dimension
        )
    )
    timestep_max = 1.0

    def __init__(self) -> None:
        self._token_ctx: TokenContext | None = None

    def tiny_inputs(
        self,
        batch: int = 1,
        seed: int = 0,
        height: int = 4,
        width: int = 4,
        text_len: int = 6,
        reference: int = 0,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """``height x width`` packed image tokens, ``text_len`` text tokens (the last one padding,
        masked); with ``reference``, a reference image of ``reference x width`` tokens
        (Qwen-Image-Edit), passed as ``reference_latents`` (see :meth:`tiny_forward`)."""
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(batch, height * width, 16, generator=g)
        mask = torch.ones(batch, text_len, dtype=torch.long)
        mask[:, -1] = 0  # one padded text token: exercises the key mask
        shapes = [(1, height, width)] + ([(1, reference, width)] if reference else [])
        cond: dict[str, Any] = {
            "encoder_hidden_states": torch.randn(batch, text_len, 24, generator=g),
            "encoder_hidden_states_mask": mask,
            "img_shapes": [shapes] * batch,
        }
        if reference:
            cond["reference_latents"] = torch.randn(batch, reference * width, 16, generator=g)
        return x, cond

    def tiny_forward(
        self, model: nn.Module, x: torch.Tensor, timestep: torch.Tensor, cond: Any
    ) -> torch.Tensor:
        """As ``QwenImageEditPipeline`` calls the transformer: the reference latents after the
        noisy ones, the prediction for the noisy ones kept."""
        cond = dict(cond)
        ref = cond.pop("reference_latents", None)
        hidden = x if ref is None else torch.cat([x, ref], 1)
        return model(hidden, timestep=timestep, return_dict=False, **cond)[0][:, : x.shape[1]]

    def timestep(self, model: nn.Module, args: tuple, kwargs: dict) -> float | None:
        """The call's timestep; reads the call's image layout too (how many reference tokens follow
        the noisy ones, from ``img_shapes``), which the block calls of this call then use."""
        shapes = kwargs.get("img_shapes")
        per_image = _image_tokens(shapes[0]) if shapes else []
        self.stacks(model)  # registers the model's layout on first sight
        layout = _LAYOUTS[model.transformer_blocks]
        layout.n_ref, layout.n_ids = sum(per_image[1:]), sum(per_image)
        return super().timestep(model, args, kwargs)

    def parse_call(self, stack: BlockStack, sig: Any, args: tuple, kwargs: dict) -> BlockCall:
        call = super().parse_call(stack, sig, args, kwargs)
        layout = _LAYOUTS[stack.blocks]
        layout.n_txt = call.txt.shape[1] if call.txt is not None else 0
        if not layout.n_ref and self._token_ctx is None:
            return call  # no reference tokens, no token refresh: the block's own streams
        state = {f.name: getattr(call, f.name) for f in fields(BlockCall)}
        if layout.n_ref:
            if call.img.shape[1] != layout.n_ids:
                raise NotImplementedError(
                    "family 'qwen_image': reference-image tokens with the sequence sharded over ranks (xDiT "
                    "sequence parallelism) are not supported: the shards do not end with them"
                )
            hidden, n = call.img, call.img.shape[1] - layout.n_ref
            state["img"], state["txt"] = hidden[:, :n], torch.cat([call.txt, hidden[:, n:]], 1)
        return _QwenCall(**state, layout=layout, ctx=self._token_ctx)

    def split_output(self, stack: BlockStack, out: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        txt, hidden = out
        n_ref = _LAYOUTS[stack.blocks].n_ref
        if not n_ref:
            return hidden, txt
        n = hidden.shape[1] - n_ref
        return hidden[:, :n], torch.cat([txt, hidden[:, n:]], 1)

    def make_output(self, stack: BlockStack, img: torch.Tensor, txt: torch.Tensor | None) -> Any:
        assert txt is not None
        n_txt = _LAYOUTS[stack.blocks].n_txt
        if txt.shape[1] == n_txt:
            return txt, img
        return txt[:, :n_txt], torch.cat([img, txt[:, n_txt:]], 1)

    def stacks(self, model: nn.Module) -> list[BlockStack]:
        _LAYOUTS.setdefault(model.transformer_blocks, _Layout())
        return [
            BlockStack(
                "blocks",
                model.transformer_blocks,
                "transformer_blocks",
                txt_arg="encoder_hidden_states",
                output="txt_img",
            )
        ]

    def modulated_input(self, block: nn.Module, call: BlockCall) -> torch.Tensor:
        arguments = call.bound.arguments
        index = arguments.get("modulate_index")
        img = call.img
        if index is not None:
            index = index[:, : img.shape[1]]
        mod1 = block.img_mod(arguments["temb"]).chunk(2, dim=-1)[0]
        return block._modulate(block.img_norm1(img), mod1, index)[0]

    def self_attention(self, block: nn.Module) -> nn.Module:
        return block.attn

    def token_processor(self, attn: nn.Module, stack: BlockStack, ctx: TokenContext) -> Any:
        self._token_ctx = ctx
        return QwenDoubleStreamTokenProcessor(attn.processor, ctx, "none")
