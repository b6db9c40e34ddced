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
- **token refresh is refused** (``ConfigError`` naming the family and the level), for two reasons
  each sufficient: the video-to-audio cross-attention's audio queries read every video token as
  keys (run on the selected video tokens only, the audio would attend to those alone), and the
  video stream's per-token inputs (the RoPE tables and cross-attention RoPE tables; the timestep
  embedding per token in the conditioning pipelines) would have to follow the selected tokens.

The pipelines call the transformer once per guidance kind (``cache_context("cond_uncond")``, CFG
batched; ``"uncond_stg"`` with spatio-temporal guidance blocks perturbed; ``"uncond_modality"``
with the cross-modal attention off): each is a branch with caches of its own. Timesteps are the
flow-matching scheduler's, in [0, 1000]. Defaults of the diffusers pipelines: 30 steps
(``LTX2Pipeline``, ``LTX2ConditionPipeline``), 8 for the distilled HDR LoRA pipeline.

No preset and no rescale polynomial: none is published for LTX-2.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from .base import BlockCall, BlockStack, ModelAdapter, register_adapter

_AUDIO_TOKENS = 5  # of the tiny inputs


@register_adapter
class LTX2Adapter(ModelAdapter):
    name = "ltx2"
    model_class_names = ("LTX2VideoTransformer3DModel",)
    text_output_used = True  # the audio prediction is an output
    token_refusal = (
        "its video-to-audio cross-attention reads every video token as keys, and its video tokens "
        "carry per-token RoPE tables that a subset would have to follow"
    )
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

    def self_attention(self, block: nn.Module) -> nn.Module:
        return block.attn1
