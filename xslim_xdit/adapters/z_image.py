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

xfuser's ``xFuserZImageTransformer2DWrapper`` is refused (its sequence parallelism shards the
refiner's input and the unified sequence separately). Omni mode (``x`` as nested lists: SigLIP features and per-token noise masks, the sequence ordered
``[caption, image, siglip]``) is refused, at every level.

Pipeline (diffusers 0.42 defaults): ``ZImagePipeline`` 50 steps with ``guidance_scale=5.0`` (CFG
batched in one call: the transformer gets the conditional and unconditional samples together);
the pipeline's own example runs Z-Image-Turbo with ``num_inference_steps=8, guidance_scale=0.0``
(one call per step). No preset and no rescale polynomial: none is published for Z-Image.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from .attention import TokenContext, _TokenProcessor, no_gather
from .base import BlockCall, BlockStack, ModelAdapter, _put_arg, register_adapter


@dataclass
class _Layout:
    """The current call's image tokens per sample (the noise refiner's sequence length)."""

    n_img: int = 0
    n_txt: int = 0  # caption rows after them in the main layers' sequence (batch padding included)
    #: under xfuser's sequence-parallel wrapper: this call's shard geometry (None on one device)
    shards: _ShardGeometry | None = None
    #: (noise-refiner shard, the same rows in the main layers' layout) pairs of the current call,
    #: compared by identity: a tensor moved once is not moved again
    moved: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)


@dataclass(frozen=True)
class _ShardGeometry:
    """How xfuser's Z-Image wrapper shards one call over the sequence-parallel group: the noise
    refiner's image (``n_img`` rows, padded to a multiple of ``world``) and the main layers'
    ``[image, caption]`` sequence (``n_seq`` rows, padded likewise) are chunked separately, rank
    ``rank`` holding chunk ``rank`` of each (``_chunk_and_pad_sequence``)."""

    rank: int
    world: int
    n_img: int
    n_seq: int

    @property
    def refiner_rows(self) -> int:
        return -(-self.n_img // self.world)

    @property
    def seq_rows(self) -> int:
        return -(-self.n_seq // self.world)

    def image_rows(self, rank: int) -> tuple[int, int]:
        """The image rows ``[start, end)`` in ``rank``'s shard of the main layers' sequence."""
        start = min(rank * self.seq_rows, self.n_img)
        return start, min(start + self.seq_rows, self.n_img)


#: The layout of each model's current call, shared by every adapter instance, keyed by the model's
#: two managed block lists (both map to one layout).
_LAYOUTS: weakref.WeakKeyDictionary[nn.Module, _Layout] = weakref.WeakKeyDictionary()


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


def _sp_all_gather(x: torch.Tensor) -> torch.Tensor:
    """``x`` of every sequence-parallel rank, concatenated along the rows in rank order."""
    from xfuser.core.distributed import get_sp_group  # only reached under xfuser's wrapper

    return get_sp_group().all_gather(x.contiguous(), dim=1)


def _to_sequence_layout(layout: _Layout, shard: torch.Tensor) -> torch.Tensor:
    """The noise refiner's shard ``(B, refiner_rows, D)`` -> this rank's image rows of the main
    layers' shard (one all-gather of the image, unless ``shard`` was moved already)."""
    for refiner, rows in layout.moved:
        if refiner is shard:
            return rows
    geometry = layout.shards
    assert geometry is not None
    if shard.shape[1] != geometry.refiner_rows:
        raise RuntimeError(
            f"family 'z_image': xfuser's wrapper gave the noise refiner {shard.shape[1]} rows; expected "
            f"{geometry.refiner_rows} ({geometry.n_img} image tokens over {geometry.world} ranks)"
        )
    start, end = geometry.image_rows(geometry.rank)
    rows = _sp_all_gather(shard)[:, start:end]
    layout.moved.append((shard, rows))
    return rows


def _to_refiner_layout(layout: _Layout, rows: torch.Tensor) -> torch.Tensor:
    """This rank's image rows of the main layers' shard -> the noise refiner's shard (one
    all-gather, padded to rank 0's row count; the refiner's padding rows are zeros, as xfuser's)."""
    for refiner, moved in layout.moved:
        if moved is rows:
            return refiner
    geometry = layout.shards
    assert geometry is not None
    spans = [geometry.image_rows(r) for r in range(geometry.world)]
    width = spans[0][1] - spans[0][0]  # rank 0 holds the most image rows
    pad = rows.new_zeros(rows.shape[0], width - rows.shape[1], *rows.shape[2:])
    gathered = _sp_all_gather(torch.cat([rows, pad], 1))
    parts = [gathered[:, r * width : r * width + end - start] for r, (start, end) in enumerate(spans)]
    n = geometry.refiner_rows
    tail = rows.new_zeros(rows.shape[0], n * geometry.world - geometry.n_img, *rows.shape[2:])
    shard = torch.cat([*parts, tail], 1)[:, geometry.rank * n : (geometry.rank + 1) * n]
    layout.moved.append((shard, rows))
    return shard


@dataclass
class _ShardedRefinerCall(BlockCall):
    """A noise-refiner call under xfuser's sequence-parallel wrapper: ``img`` is this rank's image
    rows in the main layers' layout (X-Slim's one image stream); the block runs on its own shard."""

    layout: _Layout | None = field(default=None, repr=False)

    def with_streams(self, img: torch.Tensor, txt: torch.Tensor | None) -> tuple[tuple, dict]:
        assert self.layout is not None
        args, kwargs = list(self.args), dict(self.kwargs)
        _put_arg(self.signature, args, kwargs, "x", _to_refiner_layout(self.layout, img))
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
                "(not tested with xfuser's wrapper); use polish='block' or 'none', or a schedule without token steps"
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
        ctx.query_rows += k_sel
        out = ctx.attention(q, k, v, mask).flatten(2, 3).to(q.dtype)
        out = attn.to_out[0](out)
        if len(attn.to_out) > 1:
            out = attn.to_out[1](out)
        return out


def _is_xfuser_wrapper(model: nn.Module) -> bool:
    return any(c.__name__ == "xFuserZImageTransformer2DWrapper" for c in type(model).__mro__)


def _note_shards(model: nn.Module, args: tuple, kwargs: dict) -> None:
    """Record how xfuser's wrapper will shard this call (:class:`_ShardGeometry`; None without
    sequence parallelism), from the call's latents and captions as ``patchify_and_embed`` pads them
    (image and caption each to a multiple of ``SEQ_MULTI_OF``), after the wrapper's CFG split."""
    from diffusers.models.transformers.transformer_z_image import SEQ_MULTI_OF
    from xfuser.core.distributed import (
        get_classifier_free_guidance_rank,
        get_classifier_free_guidance_world_size,
        get_sequence_parallel_rank,
        get_sequence_parallel_world_size,
    )

    layout = _LAYOUTS.setdefault(model.noise_refiner, _Layout())
    layout.moved.clear()
    world = get_sequence_parallel_world_size()
    if world <= 1:
        layout.shards = None
        return

    def arg(name: str, pos: int, default: Any) -> Any:
        return kwargs[name] if name in kwargs else args[pos] if len(args) > pos else default

    x, caps = list(arg("x", 0, [])), list(arg("cap_feats", 2, []))
    patch, f_patch = arg("patch_size", 3, 2), arg("f_patch_size", 4, 1)
    cfg = get_classifier_free_guidance_world_size()
    if cfg > 1:  # the wrapper keeps this rank's guidance half of the batch
        b, r = len(x) // cfg, get_classifier_free_guidance_rank()
        x, caps = x[r * b : (r + 1) * b], caps[r * b : (r + 1) * b]

    def padded(n: int) -> int:
        return n + (-n) % SEQ_MULTI_OF

    n_img = {padded((s[1] // f_patch) * (s[2] // patch) * (s[3] // patch)) for s in (t.shape for t in x)}
    if len(n_img) != 1:
        raise NotImplementedError(
            "family 'z_image': samples of different sizes in one call under xfuser's sequence-parallel "
            f"wrapper are not supported (image tokens per sample: {sorted(n_img)})"
        )
    n = n_img.pop()
    layout.shards = _ShardGeometry(
        get_sequence_parallel_rank(), world, n, max(n + padded(len(c)) for c in caps)
    )


@register_adapter
class ZImageAdapter(ModelAdapter):
    name = "z_image"
    token_sequence_parallel_refusal = "xfuser's Z-Image wrapper shards the sequence in a way not supported"
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
        if _is_xfuser_wrapper(model):
            _note_shards(model, args, kwargs)
        t = kwargs.get("t", args[1] if len(args) > 1 else None)
        if t is None:
            return super().timestep(model, args, kwargs)
        if isinstance(t, torch.Tensor):
            return 1.0 - float(t.reshape(-1)[0].item()) if t.numel() else None
        return 1.0 - float(t)

    def stacks(self, model: nn.Module) -> list[BlockStack]:
        layout = _LAYOUTS.setdefault(model.noise_refiner, _Layout())
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
                state["img"] = _to_sequence_layout(layout, call.img)
                call = _ShardedRefinerCall(**state, layout=layout)
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
            return (out if layout.shards is None else _to_sequence_layout(layout, out)), None
        # on a token step the sequence holds the selected image rows and every caption row
        n_txt = _LAYOUTS[stack.blocks].n_txt
        return out[:, : out.shape[1] - n_txt], out[:, out.shape[1] - n_txt :]

    def make_output(self, stack: BlockStack, img: torch.Tensor, txt: torch.Tensor | None) -> Any:
        if stack.name != "noise_refiner":
            return torch.cat([img, txt], 1)
        layout = _LAYOUTS[stack.blocks]
        return img if layout.shards is None else _to_refiner_layout(layout, img)

    def select_samples(self, call: BlockCall, index: torch.Tensor) -> BlockCall:
        if isinstance(call, _ShardedRefinerCall) or (
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
