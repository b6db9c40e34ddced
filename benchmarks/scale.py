"""Full-scale speed benchmark: X-Slim's step kinds on random weights at the real models' shapes.

Usage::

    python -m benchmarks.scale --out scale_out                       # CPU: reduced default, a few minutes
    python -m benchmarks.scale --models flux --scale 1 --out s       # the real FLUX.1-dev shape (GPU)
    python -m benchmarks.scale --width 256 --blocks 6 --tokens 256   # explicit reduced shape

What it measures, per model (FLUX.1-dev, HunyuanVideo, Wan 2.1 14B; diffusers classes built from
their published configs with random weights):

* the wall time of one step of each kind X-Slim runs, through the real engine
  (:func:`xslim_xdit.enable_xslim` with a :class:`~xslim_xdit.Schedule` that forces the kind):
  the plain model (no engine), a full step under the engine, a skip step, a block refresh at the
  presets' block thresholds (and at a fixed ``stack_mean`` threshold of 2.0, about every other
  block), and token refreshes at ratios 0.5, 0.7 and the presets' own ratios;
* the FLOPs of each of those calls, from the engine's own FlopMeter (its statistics records);
* the per-step fixed cost: what a skip step still costs (embeddings, output layer, the engine's
  bookkeeping) and what the engine adds to a full step;
* the cache memory each level holds after its run, measured: the bytes of the distinct tensor
  storages the engine's caches reference (every device), and on CUDA also what the allocator
  holds with the engine attached minus what it holds after ``disable_xslim``, and the peak;
* the wall-clock and FLOP speedups of each published preset, composed from the measured per-kind
  costs and the preset's 50-step schedule, and their ratio (wall / FLOP).

Timing: warm-up calls first (they also carry the FLOP count, which runs under torch's
``FlopCounterMode``), then ``--repeats`` timed calls of the kind; ``torch.cuda.synchronize``
around every timed call on GPU. Output: a printed table, ``scale.json`` and ``scale.md`` in
``--out``.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

HEAD_DIM = 128  # every model here uses 128-wide heads; their RoPE axes sum to it, so it stays fixed


# ---------------------------------------------------------------------------------------------
# The models: published configs and the token counts of their standard outputs
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenGrid:
    """The transformer's token layout for one output: latent frames x rows x columns after the
    VAE and the patch embedding, and the text tokens."""

    frames: int
    rows: int
    cols: int
    text: int
    derivation: str

    @property
    def image_tokens(self) -> int:
        return self.frames * self.rows * self.cols


@dataclass(frozen=True)
class ModelSpec:
    """One real model: its diffusers class, published config, block stacks and token grid.

    ``stack_keys`` name the config fields holding each block stack's depth, in forward order;
    ``width_keys`` the fields scaled with the hidden width (besides the head count).
    """

    name: str  # X-Slim family name
    label: str
    class_name: str
    config: dict[str, Any]
    stack_keys: tuple[str, ...]
    heads_key: str
    width_keys: tuple[str, ...]
    grid: Callable[[int], TokenGrid]  # pixel frames -> grid
    default_frames: int
    patch: tuple[int, int]  # (temporal, spatial) patch of the transformer
    timestep_max: float

    @property
    def width(self) -> int:
        return int(self.config[self.heads_key]) * HEAD_DIM

    @property
    def depths(self) -> tuple[int, ...]:
        return tuple(int(self.config[k]) for k in self.stack_keys)


def _flux_grid(frames: int) -> TokenGrid:
    # 1024x1024 image; the VAE downsamples by 8 (128x128 latents, 16 channels) and FLUX packs 2x2
    # latent patches into one token of 64 channels: 64x64 = 4096 image tokens; T5 gives 512.
    return TokenGrid(
        1, 64, 64, 512, "1024x1024 px / VAE 8 = 128x128 latents, 2x2 packing -> 64x64 = 4096; T5 512"
    )


def _video_grid(frames: int, text: int, name: str) -> TokenGrid:
    # 1280x720 px; the causal video VAE keeps the first frame and compresses time by 4 and space
    # by 8: (frames-1)/4+1 latent frames of 90x160; the patch embedding takes 2x2 spatial patches.
    lat_frames = (frames - 1) // 4 + 1
    return TokenGrid(
        lat_frames,
        45,
        80,
        text,
        f"720p {frames} frames: VAE (t/4, s/8) -> {lat_frames}x90x160 latents, patch 1x2x2 -> "
        f"{lat_frames}x45x80 = {lat_frames * 3600}; {name} text {text}",
    )


SPECS: dict[str, ModelSpec] = {
    "flux": ModelSpec(
        name="flux",
        label="FLUX.1-dev",
        class_name="FluxTransformer2DModel",
        config=dict(
            patch_size=1,
            in_channels=64,
            num_layers=19,
            num_single_layers=38,
            attention_head_dim=128,
            num_attention_heads=24,
            joint_attention_dim=4096,
            pooled_projection_dim=768,
            guidance_embeds=True,
            axes_dims_rope=(16, 56, 56),
        ),
        stack_keys=("num_layers", "num_single_layers"),
        heads_key="num_attention_heads",
        width_keys=(),
        grid=_flux_grid,
        default_frames=1,
        patch=(1, 1),
        timestep_max=1.0,
    ),
    "hunyuan_video": ModelSpec(
        name="hunyuan_video",
        label="HunyuanVideo",
        class_name="HunyuanVideoTransformer3DModel",
        config=dict(
            in_channels=16,
            out_channels=16,
            num_attention_heads=24,
            attention_head_dim=128,
            num_layers=20,
            num_single_layers=40,
            num_refiner_layers=2,
            mlp_ratio=4.0,
            patch_size=2,
            patch_size_t=1,
            qk_norm="rms_norm",
            guidance_embeds=True,
            text_embed_dim=4096,
            pooled_projection_dim=768,
            rope_theta=256.0,
            rope_axes_dim=(16, 56, 56),
        ),
        stack_keys=("num_layers", "num_single_layers"),
        heads_key="num_attention_heads",
        width_keys=(),
        grid=lambda f: _video_grid(f, 256, "LLaVA-Llama"),
        default_frames=129,
        patch=(1, 2),
        timestep_max=1000.0,
    ),
    "wan": ModelSpec(
        name="wan",
        label="Wan 2.1 14B",
        class_name="WanTransformer3DModel",
        config=dict(
            patch_size=(1, 2, 2),
            num_attention_heads=40,
            attention_head_dim=128,
            in_channels=16,
            out_channels=16,
            text_dim=4096,
            freq_dim=256,
            ffn_dim=13824,
            num_layers=40,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            eps=1e-6,
            rope_max_seq_len=1024,
        ),
        stack_keys=("num_layers",),
        heads_key="num_attention_heads",
        width_keys=("ffn_dim",),
        grid=lambda f: _video_grid(f, 512, "umT5"),
        default_frames=81,
        patch=(1, 2),
        timestep_max=1000.0,
    ),
}


# ---------------------------------------------------------------------------------------------
# Shapes: full or reduced
# ---------------------------------------------------------------------------------------------


@dataclass
class Shape:
    """The shape one model runs at (reduced or real), and how it was derived."""

    width: int
    depths: tuple[int, ...]
    grid: TokenGrid
    reduced: bool
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "width": self.width,
            "heads": self.width // HEAD_DIM,
            "blocks_per_stack": list(self.depths),
            "image_tokens": self.grid.image_tokens,
            "text_tokens": self.grid.text,
            "token_grid": [self.grid.frames, self.grid.rows, self.grid.cols],
            "reduced": self.reduced,
            "note": self.note,
        }


def split_depth(total: int, depths: tuple[int, ...]) -> tuple[int, ...]:
    """``total`` blocks split over the stacks in the real model's proportion, at least one each.

    Example:
        >>> split_depth(6, (19, 38)), split_depth(1, (20, 40)), split_depth(5, (40,))
        ((2, 4), (1, 1), (5,))
    """
    real = sum(depths)
    out = [max(1, round(total * d / real)) for d in depths[:-1]]
    out.append(max(1, total - sum(out)))
    return tuple(out)


def shrink_grid(grid: TokenGrid, tokens: int) -> TokenGrid:
    """A grid of about ``tokens`` image tokens with the real one's aspect (frames shrink with
    the cube root of the factor, rows and columns with the rest); text tokens scale with the
    image tokens (at least 8, the real count at most).

    Example:
        >>> g = shrink_grid(_flux_grid(1), 256)
        >>> (g.frames, g.rows, g.cols, g.text)
        (1, 16, 16, 32)
    """
    factor = tokens / grid.image_tokens
    if factor >= 1:
        return grid
    frames = max(1, round(grid.frames * factor ** (1 / 3))) if grid.frames > 1 else 1
    per_frame = tokens / frames
    rows = max(1, round(math.sqrt(per_frame * grid.rows / grid.cols)))
    cols = max(1, round(per_frame / rows))
    text = min(grid.text, max(8, round(grid.text * factor)))
    return TokenGrid(
        frames, rows, cols, text, f"reduced from {grid.image_tokens} image tokens ({grid.derivation})"
    )


def resolve_shape(
    spec: ModelSpec,
    *,
    scale: float | None,
    width: int | None,
    blocks: int | None,
    tokens: int | None,
    frames: int | None,
    on_gpu: bool,
) -> Shape:
    """The shape to run: the real one on GPU (or with ``--scale 1``), the CPU default otherwise
    (width 256, an eighth of the blocks, 256 image tokens), each overridden by its flag."""
    real_grid = spec.grid(frames or spec.default_frames)
    if scale is None:
        scale = 1.0 if on_gpu else None
    if scale is not None:
        w = max(HEAD_DIM, round(spec.width * scale / HEAD_DIM) * HEAD_DIM)
        total = max(len(spec.depths), round(sum(spec.depths) * scale))
        n = max(1, round(real_grid.image_tokens * scale))
    else:  # the CPU default: a few minutes for all three models on one core
        w, total, n = 2 * HEAD_DIM, max(len(spec.depths), round(sum(spec.depths) / 8)), 256
    w = width if width is not None else w
    total = blocks if blocks is not None else total
    n = tokens if tokens is not None else n
    depths = spec.depths if total >= sum(spec.depths) else split_depth(total, spec.depths)
    grid = real_grid if n >= real_grid.image_tokens else shrink_grid(real_grid, n)
    # a shorter clip than the model's standard one is a reduced shape too
    reduced = w != spec.width or depths != spec.depths or grid != spec.grid(spec.default_frames)
    return Shape(w, depths, grid, reduced, grid.derivation)


# ---------------------------------------------------------------------------------------------
# Building a random model fast
# ---------------------------------------------------------------------------------------------


def model_config(spec: ModelSpec, shape: Shape) -> dict[str, Any]:
    """The diffusers config at ``shape`` (head width fixed at 128, head count from the width)."""
    cfg = dict(spec.config)
    factor = shape.width / spec.width
    cfg[spec.heads_key] = shape.width // HEAD_DIM
    for k in spec.width_keys:
        cfg[k] = max(HEAD_DIM, round(cfg[k] * factor / 64) * 64)
    for k, d in zip(spec.stack_keys, shape.depths, strict=True):
        cfg[k] = d
    return cfg


def build_model(
    spec: ModelSpec, shape: Shape, device: torch.device, dtype: torch.dtype, seed: int
) -> nn.Module:
    """The model with random weights, built without the constructors' slow initialisation.

    It is built on the ``meta`` device (no memory, no init), cast to ``dtype`` there (modules the
    class keeps in fp32, ``_keep_in_fp32_modules``, stay fp32 as ``from_pretrained`` keeps them),
    materialised with ``to_empty`` on ``device`` and then filled in place: matrices from
    ``N(0, 1/fan_in)`` so activations keep their scale through the depth, norm weights 1, biases
    0. Non-persistent buffers (Wan's RoPE tables) hold garbage after ``to_empty``; their modules
    are rebuilt on the device.
    """
    import diffusers

    cls = getattr(diffusers, spec.class_name)
    with torch.device("meta"):
        model = cls(**model_config(spec, shape))
    nn.Module.to(model, dtype)  # diffusers' own .to() warns about fp32 modules we handle just below
    keep = tuple(getattr(cls, "_keep_in_fp32_modules", None) or ())
    if keep and dtype != torch.float32:
        for name, p in model.named_parameters():  # by name part: modules and bare parameters alike
            if any(k in name.split(".") for k in keep):
                p.data = p.data.float()
    model = model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                fan_in = p[0].numel()
                p.normal_(0.0, fan_in**-0.5, generator=gen)
            elif "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()
    _rebuild_buffers(model, device)
    return model.eval().requires_grad_(False)


def _rebuild_buffers(model: nn.Module, device: torch.device) -> None:
    """Recompute the buffers ``to_empty`` left uninitialised (only Wan's RoPE has any here)."""
    for name, mod in list(model.named_modules()):
        if type(mod).__name__ == "WanRotaryPosEmbed":
            from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

            fresh = WanRotaryPosEmbed(mod.attention_head_dim, mod.patch_size, mod.max_seq_len).to(device)
            parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            setattr(parent, name.rpartition(".")[2], fresh)
    left = [n for n, b in model.named_buffers() if b.device.type == "meta"]
    if left:
        raise RuntimeError(f"buffers left on the meta device: {left}")
    unknown = [n for n, _ in model.named_buffers() if "rope" not in n]
    if unknown:  # another class with buffers: they would be garbage, refuse rather than time it
        raise RuntimeError(f"{type(model).__name__}: buffers without a rebuild rule: {unknown}")


def make_inputs(
    spec: ModelSpec, shape: Shape, device: torch.device, dtype: torch.dtype, seed: int
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Latents and the conditioning kwargs of one sample at ``shape`` (the real input widths)."""
    g = torch.Generator(device=device).manual_seed(seed)
    grid, cfg = shape.grid, spec.config

    def randn(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=g, device=device, dtype=torch.float32).to(dtype)

    if spec.name == "flux":
        ids = torch.zeros(grid.rows, grid.cols, 3, device=device)
        ids[..., 1] = torch.arange(grid.rows, device=device)[:, None]
        ids[..., 2] = torch.arange(grid.cols, device=device)[None, :]
        return randn(1, grid.image_tokens, cfg["in_channels"]), {
            "encoder_hidden_states": randn(1, grid.text, cfg["joint_attention_dim"]),
            "pooled_projections": randn(1, cfg["pooled_projection_dim"]),
            "img_ids": ids.reshape(-1, 3).to(dtype),
            "txt_ids": torch.zeros(grid.text, 3, device=device, dtype=dtype),
            "guidance": torch.full((1,), 3.5, device=device, dtype=dtype),
        }
    p = spec.patch[1]
    x = randn(1, cfg["in_channels"], grid.frames, grid.rows * p, grid.cols * p)
    if spec.name == "hunyuan_video":
        return x, {
            "encoder_hidden_states": randn(1, grid.text, cfg["text_embed_dim"]),
            "encoder_attention_mask": torch.ones(1, grid.text, device=device, dtype=torch.long),
            "pooled_projections": randn(1, cfg["pooled_projection_dim"]),
            "guidance": torch.full((1,), 6000.0, device=device, dtype=dtype),  # 6.0 x 1000, as the pipeline
        }
    return x, {"encoder_hidden_states": randn(1, grid.text, cfg["text_dim"])}


# ---------------------------------------------------------------------------------------------
# Measuring one step kind through the engine
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Kind:
    """One step kind to time: ``kind`` among plain/full/skip/block/token, with its settings."""

    label: str
    kind: str
    token_ratio: float = 0.5
    block_thresh: tuple[float, ...] = (2.0,)
    block_scale: str = "stack_mean"
    note: str = ""


def kinds_for(spec: ModelSpec, token_ratios: list[float]) -> list[Kind]:
    """The kinds measured for one model: plain, full, skip, block refreshes at the presets'
    thresholds and at ``stack_mean`` 2.0, token refreshes at ``token_ratios`` and the presets'."""
    from xslim_xdit import PRESETS

    presets = {n: p for n, p in PRESETS.items() if n.startswith(spec.name + "-")}
    out = [
        Kind("plain", "plain", note="the model without X-Slim"),
        Kind("full", "full", note="a full step under the engine"),
        Kind("skip", "skip"),
    ]
    seen_thresh: set[tuple[float, ...]] = set()
    for name, p in sorted(presets.items()):
        sched = p["schedule"]
        thresh = tuple(p.get("block_thresh", (2.0,)))
        if sched.block_steps and thresh not in seen_thresh:
            seen_thresh.add(thresh)
            out.append(
                Kind(
                    f"block@{','.join(f'{t:g}' for t in thresh)}",
                    "block",
                    block_thresh=thresh,
                    block_scale=p.get("block_thresh_scale", "stack_mean"),
                    note=f"{name}'s block thresholds (absolute: the block count depends on the weights)",
                )
            )
    out.append(Kind("block@mean2", "block", note="stack_mean threshold 2.0: about every other block"))
    ratios = list(token_ratios)
    for p in presets.values():
        if p["schedule"].token_steps and p.get("token_ratio") not in ratios:
            ratios.append(float(p["token_ratio"]))
    for r in sorted(set(ratios)):
        out.append(Kind(f"token@{r:g}", "token", token_ratio=r))
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _tensors(obj: Any, depth: int = 0) -> list[torch.Tensor]:
    """Every tensor reachable from ``obj`` through containers and plain object attributes."""
    if depth > 6 or obj is None:
        return []
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v, depth + 1)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v, depth + 1)]
    if hasattr(obj, "__dict__") and not isinstance(obj, (nn.Module, type)) and not callable(obj):
        return [t for v in vars(obj).values() for t in _tensors(v, depth + 1)]
    return []


def cache_storage_bytes(engine: Any) -> int:
    """Bytes of the distinct storages the engine's caches hold (a view keeps its whole storage
    alive, so storages are counted, not views; a storage shared by two caches counts once)."""
    seen: dict[tuple[str, int], int] = {}
    roots: list[Any] = [list(engine.branches.values())]
    if engine.token_ctx is not None:
        roots.append(engine.token_ctx.kv)
    for t in _tensors(roots):
        s = t.untyped_storage()
        seen[(t.device.type, s.data_ptr())] = s.nbytes()
    return sum(seen.values())


def measure_kind(
    model: nn.Module,
    spec: ModelSpec,
    kind: Kind,
    x0: torch.Tensor,
    cond: dict[str, Any],
    *,
    warmup: int,
    repeats: int,
) -> dict[str, Any]:
    """Run ``2 + warmup + repeats`` steps: two full steps (the caches and the slope exist after
    them), then the kind; time the last ``repeats`` calls. Returns times, FLOPs and memory."""
    from xslim_xdit import Schedule, XSlimConfig, disable_xslim, enable_xslim

    device = x0.device
    n = 2 + warmup + repeats
    forced = tuple(range(2, n))
    engine = None
    if kind.kind != "plain":
        full = tuple(range(n)) if kind.kind == "full" else (0, 1)
        sched = Schedule(
            n,
            full,
            block_steps=forced if kind.kind == "block" else (),
            token_steps=forced if kind.kind == "token" else (),
        )
        cfg = XSlimConfig(
            mode="schedule",
            schedule=sched,
            token_ratio=kind.token_ratio,
            block_thresh=kind.block_thresh,
            block_thresh_scale=kind.block_scale,  # type: ignore[arg-type]
        )
        engine = enable_xslim(model, cfg, num_inference_steps=n, count_flops=True)
        engine.start_run(n)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    times: list[float] = []
    x = x0.clone()
    try:
        with torch.no_grad():
            for i in range(n):
                t = spec.timestep_max * (1.0 - i / n)
                ts = torch.full((1,), t, device=device, dtype=x.dtype)
                _sync(device)
                t0 = time.perf_counter()
                out = model(x, timestep=ts, return_dict=False, **cond)[0]
                _sync(device)
                times.append(time.perf_counter() - t0)
                x = (x.float() - (1.0 / n) * out.float()).to(x.dtype)  # an Euler step, as a sampler would
                del out
        finite = bool(torch.isfinite(x).all())
        res: dict[str, Any] = {
            "kind": kind.kind,
            "note": kind.note,
            "seconds": times[2 + warmup :],
            "seconds_median": statistics.median(times[2 + warmup :]),
            "output_finite": finite,
        }
        if kind.kind != "plain":
            res["token_ratio"] = kind.token_ratio if kind.kind == "token" else None
            res["block_thresh"] = list(kind.block_thresh) if kind.kind == "block" else None
        if engine is not None:
            recs = engine.statistics.run_records()
            last = recs[-1]
            kinds = {r.kind for r in recs[2:]}
            if kinds != {kind.kind}:
                raise RuntimeError(f"{kind.label}: the engine ran {sorted(kinds)} instead of {kind.kind!r}")
            res.update(
                flops=last.flops,
                flops_full=last.flops_full,
                flops_fraction=last.flops / last.flops_full if last.flops_full else None,
                blocks_computed=last.blocks_computed,
                blocks_total=last.blocks_total,
                token_count=last.token_count,
                bookkeeping_seconds_per_step=engine.statistics.bookkeeping_seconds / n,
                cache_bytes_engine=dict(engine.cache_bytes()),
                cache_storage_bytes=cache_storage_bytes(engine),
            )
            if device.type == "cuda":
                held = torch.cuda.memory_allocated(device)
                res["cuda_peak_bytes_over_base"] = torch.cuda.max_memory_allocated(device) - base
        else:
            res["flops"] = None
    finally:
        if engine is not None:
            disable_xslim(model)
    if engine is not None and device.type == "cuda":
        del engine
        gc.collect()  # the engine's hooks and closures form cycles: free its caches now, not later
        torch.cuda.empty_cache()
        # what the allocator freed when the caches went: the caches' memory, measured
        res["cuda_cache_bytes"] = held - torch.cuda.memory_allocated(device)
    return res


# ---------------------------------------------------------------------------------------------
# One model
# ---------------------------------------------------------------------------------------------


def preset_ratios(spec: ModelSpec, kinds: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Wall-clock and FLOP speedups of each published preset of the family, composed from the
    measured per-kind costs and the preset's 50-step schedule (wall: against 50 plain steps)."""
    from xslim_xdit import PRESETS

    out: dict[str, dict[str, Any]] = {}
    for name, p in sorted(PRESETS.items()):
        if not name.startswith(spec.name + "-"):
            continue
        sched = p["schedule"]
        thresh = ",".join(f"{t:g}" for t in p.get("block_thresh", (2.0,)))
        label = {
            "full": "full",
            "skip": "skip",
            "block": f"block@{thresh}",
            "token": f"token@{float(p.get('token_ratio', 0.5)):g}",
        }
        counts = {k: 0 for k in label}
        for s in range(sched.num_steps):
            counts[sched.kind_of(s)] += 1
        failed = [
            label[k] for k, c in counts.items() if c and "error" in kinds.get(label[k], {"error": "missing"})
        ]
        if failed:
            out[name] = {"steps": sched.num_steps, "counts": counts, "error": f"needs {failed}, which failed"}
            continue
        wall = sum(c * kinds[label[k]]["seconds_median"] for k, c in counts.items())
        flops = sum(c * kinds[label[k]]["flops"] for k, c in counts.items())
        plain_wall = sched.num_steps * kinds["plain"]["seconds_median"]
        full_flops = sched.num_steps * kinds["full"]["flops"]
        ws, fs = plain_wall / wall, full_flops / flops
        out[name] = {
            "steps": sched.num_steps,
            "counts": counts,
            "kinds_used": {k: label[k] for k, c in counts.items() if c},
            "wall_speedup": ws,
            "flop_speedup": fs,
            "wall_over_flop": ws / fs,
        }
    return out


def _denoise(model: nn.Module, spec: ModelSpec, x0: torch.Tensor, cond: dict[str, Any], n: int) -> float:
    """``n`` Euler steps from ``x0``; the wall time of the whole loop (synchronised on GPU)."""
    device = x0.device
    x = x0.clone()
    _sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(n):
            ts = torch.full((1,), spec.timestep_max * (1.0 - i / n), device=device, dtype=x.dtype)
            out = model(x, timestep=ts, return_dict=False, **cond)[0]
            x = (x.float() - (1.0 / n) * out.float()).to(x.dtype)
    _sync(device)
    return time.perf_counter() - t0


def preset_runs(
    model: nn.Module, spec: ModelSpec, x0: torch.Tensor, cond: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    """Each published preset of the family run end to end (its 50-step schedule through the
    engine), against 50 plain steps: measured wall-clock speedup, X-Slim's FLOP fraction of the
    run, and their ratio. FLOPs come from a first run with the FlopMeter on; the timed run has it
    off, so the count's own cost is not timed."""
    from xslim_xdit import PRESETS, XSlimConfig, disable_xslim, enable_xslim

    out: dict[str, dict[str, Any]] = {}
    names = sorted(n for n in PRESETS if n.startswith(spec.name + "-"))
    if not names:
        return out
    steps = PRESETS[names[0]]["schedule"].num_steps
    _denoise(model, spec, x0, cond, 2)  # warm-up
    plain = _denoise(model, spec, x0, cond, steps)
    for name in names:
        cfg = XSlimConfig.from_preset(name)
        try:
            engine = enable_xslim(model, cfg, num_inference_steps=steps, count_flops=True)
            engine.start_run(steps)
            _denoise(model, spec, x0, cond, steps)
            summary = engine.statistics.summary()
            engine = enable_xslim(model, cfg, num_inference_steps=steps, count_flops=False)
            engine.start_run(steps)
            wall = _denoise(model, spec, x0, cond, steps)
        except Exception as e:  # noqa: BLE001 - recorded; the other presets still run
            out[name] = {"steps": steps, "error": f"{type(e).__name__}: {e}"}
            continue
        finally:
            disable_xslim(model)
        ws, fs = plain / wall, 1.0 / summary["flops_fraction"]
        out[name] = {
            "steps": steps,
            "plain_seconds": plain,
            "seconds": wall,
            "counts": {k: summary[k] for k in ("full", "block", "token", "skip")},
            "wall_speedup": ws,
            "flop_speedup": fs,
            "wall_over_flop": ws / fs,
        }
    return out


def run_model(
    spec: ModelSpec,
    shape: Shape,
    *,
    device: torch.device,
    dtype: torch.dtype,
    token_ratios: list[float],
    warmup: int,
    repeats: int,
    seed: int,
    progress: bool,
    on_kind: Callable[[dict[str, Any]], None] | None = None,
    run_presets: bool = False,
) -> dict[str, Any]:
    """Build one model at ``shape`` and measure every kind; the model's part of ``scale.json``.
    ``on_kind`` is called with the kinds measured so far after each one (partial results)."""
    t0 = time.perf_counter()
    model = build_model(spec, shape, device, dtype, seed)
    build_seconds = time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters())
    x0, cond = make_inputs(spec, shape, device, dtype, seed)
    kinds: dict[str, dict[str, Any]] = {}
    for kind in tqdm(kinds_for(spec, token_ratios), desc=f"[{spec.label}] kinds", disable=not progress):
        try:
            kinds[kind.label] = measure_kind(model, spec, kind, x0, cond, warmup=warmup, repeats=repeats)
        except Exception as e:  # noqa: BLE001 - one failing kind (on a GPU run we get once) must not lose the rest
            if kind.kind in ("plain", "full", "skip"):
                raise  # every other number is relative to these
            kinds[kind.label] = {"kind": kind.kind, "error": f"{type(e).__name__}: {e}"}
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if on_kind is not None:
            on_kind(kinds)
    kinds["plain"]["flops"] = kinds["full"]["flops"]  # the same computation; the engine counts it
    measured = preset_runs(model, spec, x0, cond) if run_presets else {}
    plain, full, skip = (kinds[k]["seconds_median"] for k in ("plain", "full", "skip"))
    out = {
        "label": spec.label,
        "diffusers_class": spec.class_name,
        "real_config": spec.config,
        "config": model_config(spec, shape),
        "shape": shape.to_dict(),
        "real_tokens": spec.grid(spec.default_frames).derivation,
        "parameters": params,
        "build_seconds": build_seconds,
        "kinds": kinds,
        "fixed_cost": {
            "skip_step_seconds": skip,
            "skip_over_plain": skip / plain,
            "engine_overhead_full_seconds": full - plain,
            "engine_overhead_full_fraction": (full - plain) / plain,
            "decision_seconds_per_step": statistics.median(
                k["bookkeeping_seconds_per_step"]
                for k in kinds.values()
                if "bookkeeping_seconds_per_step" in k
            ),
        },
        "presets": preset_ratios(spec, kinds),
        # the presets run end to end (--preset-runs): measured, not composed
        "presets_measured": measured,
        # what each reuse level holds once it has run (step: the stack residual and its slope;
        # block: a residual per block; token: K/V per block and the token history), measured
        "cache_memory_per_level": {
            level: {
                "kind": label,
                "storage_bytes": kinds[label].get("cache_storage_bytes"),
                "cuda_bytes": kinds[label].get("cuda_cache_bytes"),
            }
            for level, label in (
                ("step", "skip"),
                ("block", "block@mean2"),
                (
                    "token",
                    max(
                        (k for k in kinds if k.startswith("token@")),
                        key=lambda k: (("error" not in kinds[k]), kinds[k].get("token_ratio") or 0.0),
                    ),
                ),
            )
        },
    }
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------


def _bytes(n: int | None) -> str:
    """Bytes in a readable unit (``-`` where not measured)."""
    if n is None:
        return "-"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def model_table(m: dict[str, Any]) -> list[str]:
    """Markdown lines for one model: per-kind costs, then presets."""
    plain = m["kinds"]["plain"]["seconds_median"]
    full_flops = m["kinds"]["full"]["flops"]
    lines = [
        "| kind | ms/step | wall vs plain | GFLOP | FLOPs vs full | blocks | tokens | cache (storage) | cache (CUDA) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for label, k in m["kinds"].items():
        if "error" in k:
            lines.append(f"| {label} | failed: {k['error'][:120]} | | | | | | | |")
            continue
        fl = k.get("flops")
        lines.append(
            f"| {label} | {1e3 * k['seconds_median']:.2f} | {k['seconds_median'] / plain:.3f} | "
            f"{'-' if fl is None else f'{fl / 1e9:.2f}'} | "
            f"{'-' if not fl or not full_flops else f'{fl / full_flops:.3f}'} | "
            f"{k.get('blocks_computed', '-')}/{k.get('blocks_total', '-')} | {k.get('token_count') or '-'} | "
            f"{_bytes(k.get('cache_storage_bytes'))} | {_bytes(k.get('cuda_cache_bytes'))} |"
        )
    per_level = ", ".join(
        f"{level} {_bytes(v['storage_bytes'])}"
        + (f" (CUDA {_bytes(v['cuda_bytes'])})" if v["cuda_bytes"] else "")
        for level, v in m["cache_memory_per_level"].items()
    )
    lines += ["", f"Cache memory per level (measured after the level's run): {per_level}."]
    fc = m["fixed_cost"]
    lines += [
        "",
        f"Fixed cost: a skip step takes {1e3 * fc['skip_step_seconds']:.2f} ms "
        f"({fc['skip_over_plain']:.1%} of a plain step); the engine adds "
        f"{1e3 * fc['engine_overhead_full_seconds']:.2f} ms ({fc['engine_overhead_full_fraction']:+.1%}) to a full "
        f"step; decisions take {1e3 * fc['decision_seconds_per_step']:.3f} ms per step.",
    ]
    if m["presets"]:
        lines += [
            "",
            "| preset | full/block/token/skip | wall speedup | FLOP speedup | wall/FLOP |",
            "| --- | --- | --- | --- | --- |",
        ]
        for name, p in m["presets"].items():
            c = p["counts"]
            if "error" in p:
                lines.append(
                    f"| {name} | {c['full']}/{c['block']}/{c['token']}/{c['skip']} | {p['error']} | | |"
                )
                continue
            lines.append(
                f"| {name} | {c['full']}/{c['block']}/{c['token']}/{c['skip']} | {p['wall_speedup']:.2f}x | "
                f"{p['flop_speedup']:.2f}x | {p['wall_over_flop']:.3f} |"
            )
        lines.append("")
        lines.append("Composed from the per-kind costs above (wall against 50 plain steps).")
        if m.get("presets_measured"):
            lines += [
                "",
                "| preset, run end to end | full/block/token/skip | wall speedup | FLOP speedup | wall/FLOP |",
                "| --- | --- | --- | --- | --- |",
            ]
            for name, p in m["presets_measured"].items():
                if "error" in p:
                    lines.append(f"| {name} | failed: {p['error'][:120]} | | | |")
                    continue
                c = p["counts"]
                lines.append(
                    f"| {name} | {c['full']}/{c['block']}/{c['token']}/{c['skip']} | {p['wall_speedup']:.2f}x | "
                    f"{p['flop_speedup']:.2f}x | {p['wall_over_flop']:.3f} |"
                )
    else:
        lines += ["", "No published X-Slim preset for this family: no preset ratios."]
    return lines


def markdown(results: dict[str, Any]) -> str:
    """The whole report as markdown."""
    meta = results["meta"]
    lines = [
        "# X-Slim at scale: step kinds on random weights",
        "",
        f"Device {meta['device']} ({meta['device_name']}), {meta['dtype']}, torch {meta['torch']}, "
        f"diffusers {meta['diffusers']}; load average {meta['load_average_before']} -> {meta['load_average_after']} "
        f"on {meta['cpu_count']} CPUs; {meta['warmup']} warm-up + {meta['repeats']} timed calls per kind.",
        "",
    ]
    for m in results["models"].values():
        s = m["shape"]
        lines += [
            f"## {m['label']} ({m['diffusers_class']}, {m['parameters'] / 1e9:.3f} B parameters)",
            "",
            f"Shape: width {s['width']} ({s['heads']} heads x {HEAD_DIM}), blocks {s['blocks_per_stack']}, "
            f"{s['image_tokens']} image + {s['text_tokens']} text tokens (grid {s['token_grid']})"
            + (f" - REDUCED ({s['note']})" if s["reduced"] else " - the real shape")
            + f". The model's standard output: {m['real_tokens']}.",
            "",
            *model_table(m),
            "",
        ]
    for name, why in results.get("failed", {}).items():
        lines += [f"## {name}: failed", "", f"`{why}`", ""]
    return "\n".join(lines)


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def _positive_float(name: str, lo: float, hi: float) -> Callable[[str], float]:
    def parse(s: str) -> float:
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{name} must be a number in ({lo:g}, {hi:g}]; got {s!r}"
            ) from None
        if not lo < v <= hi:
            raise argparse.ArgumentTypeError(f"{name} must be in ({lo:g}, {hi:g}]; got {v:g}")
        return v

    return parse


def _int_at_least(name: str, lo: int) -> Callable[[str], int]:
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer >= {lo}; got {s!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"{name} must be an integer >= {lo}; got {v}")
        return v

    return parse


def _width(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        v = 0
    if v < HEAD_DIM or v % HEAD_DIM:
        raise argparse.ArgumentTypeError(
            f"--width must be a positive multiple of {HEAD_DIM} (the head width); got {s!r}"
        )
    return v


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.scale",
        description="Time X-Slim's step kinds (full, skip, block refresh, token refresh) through the real "
        "engine on random-weight FLUX.1-dev / HunyuanVideo / Wan 2.1 14B transformers at their real shapes "
        "(GPU default) or a reduced shape (CPU default); FLOPs from the engine's FlopMeter, cache memory "
        "measured, wall/FLOP ratios of the published presets. Writes scale.json and scale.md.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", type=Path, default=Path("scale_out"), help="output folder")
    p.add_argument(
        "--models", default="flux,hunyuan_video,wan", help=f"comma-separated, among {sorted(SPECS)}"
    )
    p.add_argument(
        "--device", default="auto", help="'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:1'"
    )
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="weights and activations")
    p.add_argument(
        "--scale",
        type=_positive_float("--scale", 0.0, 1.0),
        default=None,
        help="shrink width, block count and image tokens by this factor, in (0, 1] "
        "(default: 1 on GPU; on CPU width 256, 1/8 of the blocks, 256 image tokens)",
    )
    p.add_argument(
        "--width", type=_width, default=None, help="hidden width, a multiple of 128 (overrides --scale)"
    )
    p.add_argument(
        "--blocks",
        type=_int_at_least("--blocks", 1),
        default=None,
        help="total transformer blocks, split over the stacks in the real proportion (overrides --scale)",
    )
    p.add_argument(
        "--tokens", type=_int_at_least("--tokens", 1), default=None, help="image tokens (overrides --scale)"
    )
    p.add_argument(
        "--frames",
        type=_int_at_least("--frames", 1),
        default=None,
        help="pixel frames of the video models' 720p clip (default: HunyuanVideo 129, Wan 81)",
    )
    p.add_argument(
        "--token-ratios", default="0.5,0.7", help="token-refresh ratios in (0, 1] (the presets' are added)"
    )
    p.add_argument("--warmup", type=_int_at_least("--warmup", 1), default=1, help="untimed calls per kind")
    p.add_argument("--repeats", type=_int_at_least("--repeats", 1), default=3, help="timed calls per kind")
    p.add_argument(
        "--preset-runs",
        action="store_true",
        help="also run each published preset end to end (50 steps, twice) against 50 plain steps",
    )
    p.add_argument("--seed", type=int, default=0, help="weights and inputs seed")
    p.add_argument(
        "--threads",
        type=_int_at_least("--threads", 1),
        default=None,
        help="torch CPU threads (default: torch's)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return p


def _device(arg: str) -> torch.device:
    if arg == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(arg)
    except RuntimeError:
        raise SystemExit(f"--device must be 'auto', 'cpu' or 'cuda[:N]'; got {arg!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available here (use --device cpu or auto)")
    return dev


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns 0 when every model ran."""
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in SPECS]
    if unknown or not names:
        raise SystemExit(
            f"--models must be a comma-separated list among {sorted(SPECS)}; got {args.models!r}"
        )
    try:
        ratios = [float(r) for r in args.token_ratios.split(",") if r.strip()]
    except ValueError:
        raise SystemExit(f"--token-ratios must be numbers in (0, 1]; got {args.token_ratios!r}") from None
    if not all(0 < r <= 1 for r in ratios):
        raise SystemExit(f"--token-ratios must be numbers in (0, 1]; got {args.token_ratios!r}")
    device = _device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    import diffusers

    results: dict[str, Any] = {
        "meta": {
            "command": "python -m benchmarks.scale " + " ".join(argv if argv is not None else sys.argv[1:]),
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else platform.processor() or platform.machine(),
            "dtype": args.dtype,
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "warmup": args.warmup,
            "repeats": args.repeats,
            "load_average_before": _loadavg(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "weights": "random (N(0, 1/fan_in)); timings and FLOPs are the real model's, quality is not measured",
        },
        "models": {},
        "failed": {},
        # kinds measured of a model still running (a time limit that stops the process keeps them)
        "partial": {},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    for name in names:
        spec = SPECS[name]
        shape = resolve_shape(
            spec,
            scale=args.scale,
            width=args.width,
            blocks=args.blocks,
            tokens=args.tokens,
            frames=args.frames,
            on_gpu=device.type == "cuda",
        )

        def write_partial(kinds: dict[str, Any], name: str = name, shape: Shape = shape) -> None:
            results["partial"][name] = {"shape": shape.to_dict(), "kinds": kinds}
            (args.out / "scale.json").write_text(json.dumps(results, indent=1, default=str))

        try:
            results["models"][name] = run_model(
                spec,
                shape,
                device=device,
                dtype=dtype,
                token_ratios=ratios,
                warmup=args.warmup,
                repeats=args.repeats,
                seed=args.seed,
                progress=not args.no_progress,
                on_kind=write_partial,
                run_presets=args.preset_runs,
            )
            results["partial"].pop(name, None)
        except torch.cuda.OutOfMemoryError as e:  # one model too large must not lose the others
            results["failed"][name] = f"out of memory: {e}"
            torch.cuda.empty_cache()
        # written after each model: a run cut short by a time limit keeps what it measured
        results["meta"]["load_average_after"] = _loadavg()
        results["meta"]["seconds"] = time.perf_counter() - t_start
        (args.out / "scale.json").write_text(json.dumps(results, indent=1, default=str))
        (args.out / "scale.md").write_text(markdown(results))
    print(markdown(results))
    print(
        f"\nwrote {args.out / 'scale.json'} and {args.out / 'scale.md'} ({results['meta']['seconds']:.0f} s)"
    )
    return 0 if not results["failed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
