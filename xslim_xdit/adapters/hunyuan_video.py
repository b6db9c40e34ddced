"""HunyuanVideo (``HunyuanVideoTransformer3DModel``): 20 double-stream then 40 single-stream blocks.
Blocks return ``(image, text)``; the joint sequence is ``[img, txt]`` (the single-stream processor
concatenates it itself before ``to_k``), with RoPE on the video tokens only and a key mask for the
padded text.

``HunyuanVideoPipeline`` (diffusers 0.42): 50 steps by default (the presets' step count), embedded
guidance (guidance-distilled: one call per step); with a negative prompt and ``true_cfg_scale > 1``
a second call per step in ``cache_context("uncond")``, a branch with caches of its own."""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

import torch

from ..schedule import Schedule
from .base import register_adapter
from .joint import TwoStreamAdapter


@register_adapter
class HunyuanVideoAdapter(TwoStreamAdapter):
    name = "hunyuan_video"
    model_class_names = ("HunyuanVideoTransformer3DModel",)
    block_output = "img_txt"
    text_position = "last"
    #: TeaCache's polynomial for HunyuanVideo
    rescale_polynomial = (7.33226126e2, -4.01131952e2, 6.75869174e1, -3.14987800, 9.61237896e-2)
    #: X-Slim's published 50-step schedules (XSLIM_SPEC.md section 1); the block thresholds are
    #: absolute, tuned on HunyuanVideo's activations, one per stack
    presets = MappingProxyType(
        {
            "hunyuan_video-slow": {
                "schedule": Schedule(
                    50, (0, 1, 2, 3, 4, 5, 7, 10, 13, 16, 29, 42, 45, 48, 49), (20, 33), (24, 38)
                ),
                "token_ratio": 0.5,
                "block_thresh": (12.0, 25.0),
                "block_thresh_scale": "absolute",
            },
            "hunyuan_video-fast": {
                "schedule": Schedule(50, (0, 1, 2, 3, 4, 8, 12, 27, 39, 44, 48, 49), (21,), (16, 33)),
                "token_ratio": 0.8,
                "block_thresh": (12.0, 25.0),
                "block_thresh_scale": "absolute",
            },
        }
    )
    tiny_config = MappingProxyType(
        dict(
            in_channels=4,
            out_channels=4,
            num_attention_heads=2,
            attention_head_dim=16,
            num_layers=2,
            num_single_layers=2,
            num_refiner_layers=1,
            patch_size=1,
            patch_size_t=1,
            text_embed_dim=16,
            pooled_projection_dim=8,
            rope_axes_dim=(4, 6, 6),
        )
    )

    def tiny_inputs(
        self, batch: int = 1, seed: int = 0, frames: int = 2, height: int = 4, width: int = 4
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """``frames x height x width`` video latents and 5 text tokens, the last one padding."""
        g = torch.Generator().manual_seed(seed)
        text_len = 5
        x = torch.randn(batch, 4, frames, height, width, generator=g)
        mask = torch.ones(batch, text_len, dtype=torch.long)
        mask[:, -1] = 0  # one padded text token: exercises the key mask
        return x, {
            "encoder_hidden_states": torch.randn(batch, text_len, 16, generator=g),
            "encoder_attention_mask": mask,
            "pooled_projections": torch.randn(batch, 8, generator=g),
            "guidance": torch.full((batch,), 3500.0),
        }
