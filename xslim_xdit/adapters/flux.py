"""FLUX.1 (``FluxTransformer2DModel``): 19 double-stream blocks (separate text and image weights,
joint attention) then 38 single-stream blocks (text and image concatenated, text first). Blocks
return ``(text, image)``; RoPE covers the joint sequence ``[txt, img]``. Timesteps are in [0, 1]."""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

import torch

from ..schedule import Schedule
from .base import register_adapter
from .joint import TwoStreamAdapter


@register_adapter
class FluxAdapter(TwoStreamAdapter):
    name = "flux"
    model_class_names = ("FluxTransformer2DModel",)
    block_output = "txt_img"
    text_position = "first"
    #: TeaCache's polynomial for FLUX.1-dev
    rescale_polynomial = (4.98651651e2, -2.83781631e2, 5.58554382e1, -3.82021401, 2.64230861e-1)
    #: X-Slim's published 50-step schedules (XSLIM_SPEC.md section 1); the block thresholds are
    #: absolute, tuned on FLUX.1-dev's activations, one per stack
    presets = MappingProxyType(
        {
            "flux-slow": {
                "schedule": Schedule(50, (0, 1, 2, 3, 4, 6, 18, 23, 30, 44, 47, 49), (9, 36), (13, 41)),
                "token_ratio": 0.5,
                "block_thresh": (1.5, 10.0),
                "block_thresh_scale": "absolute",
            },
            "flux-fast": {
                "schedule": Schedule(50, (0, 1, 2, 3, 6, 27, 44, 49), (), (11, 18, 36)),
                "token_ratio": 0.7,
                "block_thresh": (1.5, 10.0),
                "block_thresh_scale": "absolute",
            },
        }
    )
    tiny_config = MappingProxyType(
        dict(
            patch_size=1,
            in_channels=8,
            num_layers=2,
            num_single_layers=3,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=24,
            pooled_projection_dim=16,
            axes_dims_rope=(4, 6, 6),
        )
    )
    timestep_max = 1.0

    def reference_tokens(self, model: Any, args: tuple, kwargs: dict) -> torch.Tensor | None:
        """FLUX Kontext appends the reference image's tokens to the latent tokens and marks them
        with a first position id of 1 (the output latents have 0); the pipeline keeps the output
        rows only.

        Example:
            >>> ids = torch.zeros(6, 3)
            >>> ids[4:, 0] = 1
            >>> FluxAdapter().reference_tokens(None, (), {"img_ids": ids}).tolist()
            [False, False, False, False, True, True]
        """
        ids = kwargs.get("img_ids")
        if not isinstance(ids, torch.Tensor) or ids.dim() not in (2, 3) or ids.shape[-1] < 1:
            return None
        if ids.dim() == 3:  # the deprecated batched form: the same ids for every sample
            ids = ids[0]
        ref = ids[:, 0] != 0
        return ref if bool(ref.any()) else None

    def tiny_inputs(
        self, batch: int = 1, seed: int = 0, height: int = 8, width: int = 8, text_len: int = 6
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """``height x width`` packed image tokens with their position ids, ``text_len`` text tokens."""
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(batch, height * width, 8, generator=g)
        img_ids = torch.zeros(height, width, 3)
        img_ids[..., 1] = torch.arange(height)[:, None]
        img_ids[..., 2] = torch.arange(width)[None, :]
        return x, {
            "encoder_hidden_states": torch.randn(batch, text_len, 24, generator=g),
            "pooled_projections": torch.randn(batch, 16, generator=g),
            "img_ids": img_ids.reshape(-1, 3),
            "txt_ids": torch.zeros(text_len, 3),
        }
