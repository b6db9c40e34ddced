"""LTX-2 (``LTX2VideoTransformer3DModel``, audio and video in one model): one stack of
``LTX2VideoTransformerBlock`` s, each carrying two latent streams, the video tokens and the audio
tokens, and returning both ``(video, audio)``. In a block each stream has its own adaLN
modulation, self-attention (RoPE inside ``LTX2AudioVideoAttnProcessor``), cross-attention to its
own text embeddings and feed-forward; then audio-to-video (video queries, audio keys) and
video-to-audio (audio queries, video keys) cross-attention couple them. The model's output is
both streams' predictions, each denoised by the pipeline.

What X-Slim does with the audio stream: it is the block's second stream (``txt_arg``), so

- **full and block steps** compute it or move it along each reused block's cached audio residual,
  as any second stream;
- **skip steps** move it along its own cached stack residual (``text_output_used``: the output
  reads the audio, so, unlike a text stream, it cannot pass through unchanged);
- **token steps** refresh the selected video tokens only and keep the audio stream fully fresh:
  every audio token is computed in every block (its self-attention, its text cross-attention,
  its feed-forward, and its video-to-audio cross-attention with queries for every audio token).

Token refresh (:class:`LTX2TokenProcessor`, on three attentions of each block): the block runs on
the selected video tokens (and all audio tokens), and wherever attention reads video tokens as
keys and values, a per-block K/V cache of every video token (recorded from ``to_k``/``to_v`` on
full steps) gets the selected tokens' fresh rows spliced in, as the other families' token
processors do for self-attention:

- ``attn1`` (video self-attention): queries for the selected tokens, with their rows of the video
  RoPE tables; keys (RMS-normed, RoPE over the whole video) and values from the spliced cache;
- ``video_to_audio_attn`` (audio queries, video keys and values): queries for every audio token
  against the spliced video K/V cache, the cross-attention RoPE over the whole video on the keys;
- ``audio_to_video_attn`` (video queries, audio keys and values): the selected tokens' queries
  with their rows of the cross-attention RoPE tables, against every (fresh) audio token;
- ``attn2`` (video queries, text keys) runs unchanged on the selected tokens, and the per-token
  modulation (``temb`` and the cross-attention ``temb_ca_*`` when the timestep is per token, as
  in the conditioning pipelines) follows the selected tokens (:class:`_LTX2TokenCall`).

The unselected video tokens keep the K/V of the last step that computed them; the audio reads
them (through ``video_to_audio_attn``) as of then. Both RoPE layouts (``rope_type``
``"interleaved"``, ``"split"``), LTX-2.3's gated attention and spatio-temporal guidance
(``LTX2PerturbedAttnProcessor``: perturbed samples take their value rows) are served; the
``audio_to_video_attn`` K/V (audio) are recorded with the others but never spliced (the audio is
computed in full). Masks on these attentions
(``video_self_attention_mask``, ``a2v``/``v2a`` cross-attention masks: the IC-LoRA pipeline) are
refused on token steps (``NotImplementedError``).

Under xDiT's sequence parallelism (``xFuserLTX2VideoTransformer3DWrapper``: the video chunked, the
audio whole on every rank) ``attn1`` gathers the shards' K/V; xfuser's ``video_to_audio_attn``
gathers the video before its projections, so its cache holds the whole video, and a token step
splices every rank's selected rows in at their global positions (:meth:`LTX2TokenProcessor._whole_video_kv`).

The pipelines call the transformer once per guidance kind (``cache_context("cond_uncond")``, CFG
batched; ``"uncond_stg"`` with spatio-temporal guidance blocks perturbed; ``"uncond_modality"``
with the cross-modal attention off): each is a branch with caches of its own. Timesteps are the
flow-matching scheduler's, in [0, 1000]. Defaults of the diffusers pipelines: 30 steps
(``LTX2Pipeline``, ``LTX2ConditionPipeline``), 8 for the distilled HDR LoRA pipeline.

No preset and no rescale polynomial: none is published for LTX-2.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from .attention import TokenContext, _TokenProcessor, gather_rows, splice
from .base import BlockCall, BlockStack, ModelAdapter, _put_arg, register_adapter

_AUDIO_TOKENS = 5  # of the tiny inputs


@register_adapter
class LTX2Adapter(ModelAdapter):
    name = "ltx2"
    model_class_names = ("LTX2VideoTransformer3DModel",)
    text_output_used = True  # the audio prediction is an output
    tiny_config = MappingProxyType(
        dict(
            in_channels=4,
            out_channels=4,
            num_attention_heads=2,
            attention_head_dim=8,
            cross_attention_dim=16,
            audio_in_channels=4,
            audio_out_channels=4,
            audio_num_attention_heads=2,
            audio_attention_head_dim=4,
            audio_cross_attention_dim=8,
            num_layers=4,
            caption_channels=16,
            base_height=64,
            base_width=64,
        )
    )
    timestep_max = 1000.0

    def tiny_inputs(
        self, batch: int = 1, seed: int = 0, frames: int = 2, height: int = 4, width: int = 4
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Both latent streams in one tensor, so that a sampling loop denoises both: ``frames x
        height x width`` video tokens then 5 audio tokens, 4 channels each (the tiny model's
        video and audio channels agree); 6 text tokens for each stream, and the grid sizes the
        model computes its RoPE coordinates from. :meth:`tiny_forward` splits and joins them."""
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(batch, frames * height * width + _AUDIO_TOKENS, 4, generator=g)
        return x, {
            "encoder_hidden_states": torch.randn(batch, 6, 16, generator=g),
            "audio_encoder_hidden_states": torch.randn(batch, 6, 16, generator=g),
            "num_frames": frames,
            "height": height,
            "width": width,
            "audio_num_frames": _AUDIO_TOKENS,
        }

    def tiny_forward(
        self, model: nn.Module, x: torch.Tensor, timestep: torch.Tensor, cond: Mapping[str, Any]
    ) -> torch.Tensor:
        """Both predictions, video tokens then audio tokens (see :meth:`tiny_inputs`)."""
        n_video = x.shape[1] - cond["audio_num_frames"]
        video, audio = model(
            hidden_states=x[:, :n_video],
            audio_hidden_states=x[:, n_video:],
            timestep=timestep,
            return_dict=False,
            **cond,
        )
        return torch.cat([video, audio], 1)

    def stacks(self, model: nn.Module) -> list[BlockStack]:
        return [
            BlockStack(
                "blocks",
                model.transformer_blocks,
                "transformer_blocks",
                txt_arg="audio_hidden_states",
                output="img_txt",
            )
        ]

    def modulated_input(self, block: nn.Module, call: BlockCall) -> torch.Tensor:
        # as the block's video self-attention input: LayerNorm, then its adaLN shift and scale
        h, temb = call.img, call.bound.arguments["temb"]
        shift, scale = block.get_mod_params(block.scale_shift_table, temb, h.shape[0])[:2]
        return block.norm1(h) * (1 + scale) + shift

    def __init__(self) -> None:
        self._token_ctx: TokenContext | None = None  # the engine's, once token refresh is installed

    def timestep(self, model: nn.Module, args: tuple, kwargs: dict) -> float | None:
        """A timestep per video token, ``(batch, tokens)`` (the conditioning pipelines: the
        conditioning frames' tokens at 0): the step's timestep is the largest of the first
        sample's."""
        t = kwargs.get("timestep", args[4] if len(args) > 4 else None)
        if isinstance(t, torch.Tensor) and t.ndim == 2 and t.numel():
            return float(t[0].max().item())
        return super().timestep(model, args, kwargs)

    def self_attention(self, block: nn.Module) -> nn.Module:
        return block.attn1

    def token_attentions(self, block: nn.Module) -> tuple[nn.Module, ...]:
        # the video self-attention, and the two cross-modal attentions: video-to-audio reads every
        # video token as keys and values, audio-to-video takes video queries with per-token RoPE
        return (block.attn1, block.video_to_audio_attn, block.audio_to_video_attn)

    def token_processor(self, attn: nn.Module, stack: BlockStack, ctx: TokenContext) -> Any:
        self._token_ctx = ctx  # the per-token modulation follows the selected tokens
        role = _ROLES.get(_attention_name(stack, attn), "video_self")
        return LTX2TokenProcessor(attn.processor, ctx, role)

    def parse_call(self, stack: BlockStack, sig: Any, args: tuple, kwargs: dict) -> BlockCall:
        call = super().parse_call(stack, sig, args, kwargs)
        if self._token_ctx is None:
            return call
        state = {f.name: getattr(call, f.name) for f in fields(BlockCall)}
        return _LTX2TokenCall(**state, ctx=self._token_ctx)


#: the block attribute of each attention with a token processor, and what it does on token steps
_ROLES = {"attn1": "video_self", "video_to_audio_attn": "v2a", "audio_to_video_attn": "a2v"}


def _attention_name(stack: BlockStack, attn: nn.Module) -> str:
    for blk in stack.blocks:
        for name in _ROLES:
            if getattr(blk, name, None) is attn:
                return name
    raise ValueError(
        "LTX-2 token refresh: the attention is none of a block's attn1, video_to_audio_attn, audio_to_video_attn"
    )


#: the block arguments that carry the video stream's modulation, ``(batch, 1 or video tokens, ...)``
_VIDEO_PER_TOKEN = ("temb", "temb_ca_scale_shift", "temb_ca_gate")
#: video attention masks a token step cannot restrict to the selected rows (refused there)
_VIDEO_MASKS = ("self_attention_mask", "a2v_cross_attention_mask", "v2a_cross_attention_mask")


@dataclass
class _LTX2TokenCall(BlockCall):
    """An LTX-2 block call that, called again on the selected video tokens of a token-refresh
    step, gives them their rows of the per-token video modulation (``temb`` and the cross-modal
    ``temb_ca_*`` are ``(batch, video tokens, ...)`` when the pipeline passes a timestep per
    token; ``(batch, 1, ...)`` broadcasts and is passed as it is)."""

    ctx: TokenContext | None = field(default=None, repr=False)

    def with_streams(self, img: torch.Tensor, txt: torch.Tensor | None) -> tuple[tuple, dict]:
        args, kwargs = super().with_streams(img, txt)
        ctx = self.ctx
        n = self.img.shape[1]
        if ctx is None or ctx.index is None or img.shape[1] == n:
            return args, kwargs
        bound = self.bound.arguments
        for name in _VIDEO_MASKS:
            if bound.get(name) is not None:
                raise NotImplementedError(
                    f"LTX-2 token refresh with {name} is not supported (the IC-LoRA pipeline's masks); use "
                    "polish='block' or a schedule without token steps"
                )
        args_list = list(args)
        for name in _VIDEO_PER_TOKEN:
            value = bound.get(name)
            if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[1] == n > 1:
                _put_arg(self.signature, args_list, kwargs, name, gather_rows(value, ctx.index, ctx.flat))
        return tuple(args_list), kwargs


_UNSET: Any = object()


def _rope_rows(
    freqs: tuple[torch.Tensor, torch.Tensor], index: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``index`` (batch, k) of LTX-2's RoPE tables: ``(batch or 1, tokens, dim)``
    (``rope_type="interleaved"``) or ``(batch or 1, heads, tokens, dim)`` (``"split"``)."""

    def rows(t: torch.Tensor) -> torch.Tensor:
        split = t.dim() == 4
        x = t.transpose(1, 2) if split else t
        x = x.expand(index.shape[0], *x.shape[1:])
        out = gather_rows(x, index)
        return out.transpose(1, 2) if split else out

    return rows(freqs[0]), rows(freqs[1])


def _rope(attn: nn.Module, x: torch.Tensor, freqs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The attention's RoPE, as ``LTX2AudioVideoAttnProcessor`` applies it."""
    from diffusers.models.transformers.transformer_ltx2 import (
        apply_interleaved_rotary_emb,
        apply_split_rotary_emb,
    )

    if attn.rope_type == "interleaved":
        return apply_interleaved_rotary_emb(x, freqs)
    if attn.rope_type == "split":
        return apply_split_rotary_emb(x, freqs)
    return x


class LTX2TokenProcessor(_TokenProcessor):
    """LTX-2's token processor for one attention of a block (``role``): ``"video_self"``
    (``attn1``), ``"v2a"`` (``video_to_audio_attn``: audio queries, video K/V) or ``"a2v"``
    (``audio_to_video_attn``: video queries, audio K/V). Outside a token step it delegates to the
    attention's own processor (``LTX2AudioVideoAttnProcessor`` or, in spatio-temporal guidance
    blocks, ``LTX2PerturbedAttnProcessor``); see the module docstring for what each role does on a
    token step."""

    def __init__(self, original: Any, ctx: TokenContext, role: str) -> None:
        super().__init__(original, ctx, "none")
        self.role = role

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        query_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        key_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        perturbation_mask: Any = _UNSET,
        all_perturbed: Any = _UNSET,
    ) -> torch.Tensor:
        # the perturbation arguments only when the block passed them (the default processor has none)
        extra = {
            k: v
            for k, v in (("perturbation_mask", perturbation_mask), ("all_perturbed", all_perturbed))
            if v is not _UNSET
        }
        ctx = self.ctx
        if ctx.index is None:
            return self.original(
                attn,
                hidden_states,
                encoder_hidden_states,
                attention_mask,
                query_rotary_emb,
                key_rotary_emb,
                **extra,
            )
        if attention_mask is not None:
            raise NotImplementedError("LTX-2 token refresh supports unmasked video attention only")
        if getattr(attn, "fused_projections", False):
            raise NotImplementedError("token refresh does not support fused QKV projections; unfuse them")
        if self.role == "a2v":
            # the selected video tokens' queries against every audio token (fresh): only the
            # queries' RoPE rows follow the tokens
            q_rope = None if query_rotary_emb is None else _rope_rows(query_rotary_emb, ctx.index)
            return self.original(
                attn, hidden_states, encoder_hidden_states, None, q_rope, key_rotary_emb, **extra
            )
        video = hidden_states if self.role == "video_self" else encoder_hidden_states
        assert video is not None, (
            "video_to_audio_attn is called with the video tokens as encoder_hidden_states"
        )
        gate_logits = attn.to_gate_logits(hidden_states) if attn.to_gate_logits is not None else None
        mask = extra.get("perturbation_mask")
        perturbed = extra.get("all_perturbed", False)
        if perturbed is None:
            perturbed = bool(torch.all(mask == 0)) if mask is not None else False
        if self.role == "video_self" and bool(perturbed):
            # spatio-temporal guidance on every sample: the attention is the value projection of
            # each token's own row (no keys are read; a full step records none either)
            out = attn.to_v(video)
        else:
            value_new = attn.to_v(video)
            # xfuser's video-to-audio processor (``gather_kv``) all-gathers the video before its
            # projections: its cache holds every rank's tokens, and so must a token step's keys
            whole = self.role == "v2a" and bool(getattr(self.original, "gather_kv", False))
            if whole:
                k, v, key_rotary_emb = self._whole_video_kv(attn, attn.to_k(video), value_new, key_rotary_emb)
            else:  # every video token (of this rank's shard), these rows fresh
                k, v = self._cached_kv(attn, attn.to_k(video), value_new)
            q = attn.norm_q(attn.to_q(hidden_states))
            k = attn.norm_k(k)
            if query_rotary_emb is not None:
                if self.role == "video_self":  # keys over the whole video, queries at their rows
                    k = _rope(attn, k, query_rotary_emb if key_rotary_emb is None else key_rotary_emb)
                    q = _rope(attn, q, _rope_rows(query_rotary_emb, ctx.index))
                else:  # audio queries (all), video keys (all)
                    k = _rope(attn, k, key_rotary_emb if key_rotary_emb is not None else query_rotary_emb)
                    q = _rope(attn, q, query_rotary_emb)
            q, k, v = (t.unflatten(2, (attn.heads, -1)) for t in (q, k, v))
            if not whole:  # under sequence parallelism: every shard's keys (identity on one device)
                k, v = ctx.gather(k, "img"), ctx.gather(v, "img")
            if self.role == "video_self":
                self._count_queries(q.shape[1])
            out = ctx.attention(q, k, v, None).flatten(2, 3).to(q.dtype)
            if self.role == "video_self" and mask is not None:
                out = torch.lerp(value_new, out, mask)  # the perturbed samples: their value rows
        if gate_logits is not None:
            gates = 2.0 * torch.sigmoid(gate_logits)  # as LTX-2.3's gated attention
            out = (out.unflatten(2, (attn.heads, -1)) * gates.unsqueeze(-1)).flatten(2, 3)
        return attn.to_out[1](attn.to_out[0](out))

    def _whole_video_kv(
        self,
        attn: nn.Module,
        key_new: torch.Tensor,
        value_new: torch.Tensor,
        key_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """Under xfuser's sequence parallelism, for ``video_to_audio_attn``: the whole video's K/V
        cache (rank-major shards, as xfuser's gather recorded it on full steps) with every rank's
        selected rows spliced in at their global positions (shards are equal: xfuser pads the
        video), and the key RoPE tables of this shard gathered over the ranks alike."""
        ctx = self.ctx
        pair = ctx.kv.get((ctx.branch, id(attn)))
        if pair is None or pair[0] is None or pair[1] is None:
            raise RuntimeError("token refresh before any full step recorded the K/V cache")
        index = ctx.index
        assert index is not None
        if pair[0].shape[0] != key_new.shape[0]:  # as _cached_kv: else an index error in the splice
            raise RuntimeError(
                f"token refresh: the K/V cache holds {pair[0].shape[0]} samples and this call "
                f"{key_new.shape[0]}: the batch changed within a run of one guidance branch; start a new run"
            )
        picked = ctx.gather(index.unsqueeze(-1), "img").squeeze(-1)  # (batch, ranks * k)
        ranks = picked.shape[1] // index.shape[1]
        shard = pair[0].shape[1] // ranks
        offsets = torch.arange(ranks, device=picked.device).repeat_interleave(index.shape[1]) * shard
        picked = picked + offsets
        k = splice(pair[0], picked, ctx.gather(key_new, "img"))
        v = splice(pair[1], picked, ctx.gather(value_new, "img"))
        pair[0], pair[1] = k, v  # the refreshed rows stay fresh for later refreshes
        if key_rotary_emb is not None:  # "split" tables (batch, heads, tokens, dim): tokens at dim 2
            key_rotary_emb = tuple(  # type: ignore[assignment]
                ctx.gather(t.transpose(1, 2).contiguous(), "img").transpose(1, 2)
                if t.dim() == 4
                else ctx.gather(t.contiguous(), "img")
                for t in key_rotary_emb
            )
        return k, v, key_rotary_emb
