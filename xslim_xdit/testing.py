"""Tiny random-weight transformers of each supported family, and a sampling loop for them.

Used by the tests, the ``--tiny`` examples and the multi-rank checks: small enough to run in a
fraction of a second on a CPU, shaped like the real models (stacks, joint attention, RoPE).

Example:
    >>> model, inputs = tiny_model("dit"), None
    >>> out = sample(model, "dit", steps=3, batch=1, seed=0)
    >>> tuple(out.shape)
    (1, 4, 8, 8)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

FAMILIES = ("dit", "pixart", "flux", "hunyuan_video")


#: Per family: the diffusers transformer class and the keyword arguments of its tiny version.
_TINY_MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "dit": (
        "DiTTransformer2DModel",
        dict(
            num_attention_heads=2,
            attention_head_dim=8,
            in_channels=4,
            out_channels=4,
            num_layers=4,
            sample_size=8,
            patch_size=2,
            num_embeds_ada_norm=10,
        ),
    ),
    "pixart": (
        "PixArtTransformer2DModel",
        dict(
            num_attention_heads=2,
            attention_head_dim=8,
            in_channels=4,
            out_channels=4,
            num_layers=4,
            sample_size=8,
            patch_size=2,
            cross_attention_dim=16,
            caption_channels=24,
            norm_type="ada_norm_single",
            use_additional_conditions=False,
        ),
    ),
    "flux": (
        "FluxTransformer2DModel",
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
        ),
    ),
    "hunyuan_video": (
        "HunyuanVideoTransformer3DModel",
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
        ),
    ),
}


def tiny_model(family: str, seed: int = 0, **overrides: Any) -> nn.Module:
    """A small random transformer of ``family`` (one of :data:`FAMILIES`), in eval mode."""
    torch.manual_seed(seed)
    if family not in _TINY_MODELS:
        raise ValueError(f"family must be one of {FAMILIES}; got {family!r}")
    import diffusers

    class_name, kw = _TINY_MODELS[family]
    return getattr(diffusers, class_name)(**{**kw, **overrides}).eval()


def make_inputs(family: str, batch: int = 1, seed: int = 0, **shape: int) -> tuple[torch.Tensor, dict]:
    """Initial latents and the fixed conditioning kwargs for :func:`sample`."""
    g = torch.Generator().manual_seed(seed)
    if family == "dit":
        x = torch.randn(batch, 4, 8, 8, generator=g)
        return x, {"class_labels": torch.arange(batch) % 10}
    if family == "pixart":
        x = torch.randn(batch, 4, 8, 8, generator=g)
        return x, {
            "encoder_hidden_states": torch.randn(batch, 6, 24, generator=g),
            "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
        }
    if family == "flux":
        h = shape.get("height", 8)
        w = shape.get("width", 8)
        txt = shape.get("text_len", 6)
        x = torch.randn(batch, h * w, 8, generator=g)
        img_ids = torch.zeros(h, w, 3)
        img_ids[..., 1] = torch.arange(h)[:, None]
        img_ids[..., 2] = torch.arange(w)[None, :]
        return x, {
            "encoder_hidden_states": torch.randn(batch, txt, 24, generator=g),
            "pooled_projections": torch.randn(batch, 16, generator=g),
            "img_ids": img_ids.reshape(-1, 3),
            "txt_ids": torch.zeros(txt, 3),
        }
    if family == "hunyuan_video":
        frames, h, w, txt = shape.get("frames", 2), shape.get("height", 4), shape.get("width", 4), 5
        x = torch.randn(batch, 4, frames, h, w, generator=g)
        mask = torch.ones(batch, txt, dtype=torch.long)
        mask[:, -1] = 0  # one padded text token: exercises the key mask
        return x, {
            "encoder_hidden_states": torch.randn(batch, txt, 16, generator=g),
            "encoder_attention_mask": mask,
            "pooled_projections": torch.randn(batch, 8, generator=g),
            "guidance": torch.full((batch,), 3500.0),
        }
    raise ValueError(f"family must be one of {FAMILIES}; got {family!r}")


def timesteps_for(family: str, steps: int) -> list[float]:
    """Decreasing timesteps in the unit each family's transformer expects."""
    if family in ("flux",):
        return [1.0 - i / steps for i in range(steps)]  # FLUX takes t in [0, 1]
    return [999.0 * (1.0 - i / steps) for i in range(steps)]


@torch.no_grad()
def sample(
    model: nn.Module,
    family: str,
    steps: int = 8,
    batch: int = 1,
    seed: int = 0,
    callback: Callable[[int, torch.Tensor], None] | None = None,
    **shape: int,
) -> torch.Tensor:
    """A plain Euler-like loop: ``x <- x - dt * model(x, t)``; returns the final latents."""
    x, cond = make_inputs(family, batch, seed, **shape)
    ts = timesteps_for(family, steps)
    for i, t in enumerate(ts):
        tt = torch.full((batch,), t)
        if family == "dit":
            tt = tt.long()
        out = model(x, timestep=tt, return_dict=False, **cond)[0]
        x = x - (1.0 / steps) * out
        if callback is not None:
            callback(i, x)
    return x
