"""Z-Image under xfuser's sequence-parallel ``xFuserZImageTransformer2DWrapper``: where each rank's
rows are, and how the noise refiner's shard moves to the rank's image rows of the main layers'
shard (X-Slim's one image stream there) and back. See :mod:`xslim_xdit.adapters.z_image`.

Example (the tiny model's call on 2 ranks: 64 image rows, a 32-row caption):
    >>> g = ShardGeometry(rank=1, world=2, n_img=64, n_seq=96)
    >>> g.refiner_rows, g.seq_rows, [g.image_rows(r) for r in range(2)]
    (32, 48, [(0, 48), (48, 64)])
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .base import BlockCall, _put_arg


@dataclass
class Layout:
    """The current call's image tokens per sample (the noise refiner's sequence length)."""

    n_img: int = 0
    n_txt: int = 0  # caption rows after them in the main layers' sequence (batch padding included)
    #: under xfuser's sequence-parallel wrapper: this call's shard geometry (None on one device)
    shards: ShardGeometry | None = None
    #: (noise-refiner shard, the same rows in the main layers' layout) pairs of the current call,
    #: compared by identity: a tensor moved once is not moved again
    moved: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)


@dataclass(frozen=True)
class ShardGeometry:
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


def _sp_all_gather(x: torch.Tensor) -> torch.Tensor:
    """``x`` of every sequence-parallel rank, concatenated along the rows in rank order."""
    from xfuser.core.distributed import get_sp_group  # only reached under xfuser's wrapper

    return get_sp_group().all_gather(x.contiguous(), dim=1)


def to_sequence_layout(layout: Layout, shard: torch.Tensor) -> torch.Tensor:
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


def to_refiner_layout(layout: Layout, rows: torch.Tensor) -> torch.Tensor:
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
class ShardedRefinerCall(BlockCall):
    """A noise-refiner call under xfuser's sequence-parallel wrapper: ``img`` is this rank's image
    rows in the main layers' layout (X-Slim's one image stream); the block runs on its own shard."""

    layout: Layout | None = field(default=None, repr=False)

    def with_streams(self, img: torch.Tensor, txt: torch.Tensor | None) -> tuple[tuple, dict]:
        assert self.layout is not None
        args, kwargs = list(self.args), dict(self.kwargs)
        _put_arg(self.signature, args, kwargs, "x", to_refiner_layout(self.layout, img))
        return tuple(args), kwargs


def is_xfuser_wrapper(model: nn.Module) -> bool:
    """Whether ``model`` is xfuser's Z-Image wrapper (by class name: xfuser is not imported here)."""
    return any(c.__name__ == "xFuserZImageTransformer2DWrapper" for c in type(model).__mro__)


def note_shards(layout: Layout, args: tuple, kwargs: dict) -> None:
    """Record how xfuser's wrapper will shard this call (:class:`ShardGeometry`; None without
    sequence parallelism), from the call's latents and captions as ``patchify_and_embed`` pads them
    (image and caption each to a multiple of ``SEQ_MULTI_OF``), after the wrapper's CFG split."""
    from diffusers.models.transformers.transformer_z_image import SEQ_MULTI_OF
    from xfuser.core.distributed import (
        get_classifier_free_guidance_rank,
        get_classifier_free_guidance_world_size,
        get_sequence_parallel_rank,
        get_sequence_parallel_world_size,
    )

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
    layout.shards = ShardGeometry(
        get_sequence_parallel_rank(), world, n, max(n + padded(len(c)) for c in caps)
    )
