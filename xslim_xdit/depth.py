"""The model's depth as the decision sees it, and the block mask over it.

A PipeFusion stage holds a slice of the depth; the block statistics of a whole image are summed
over its patches; the whole-depth block mask is read from the reduced per-block partial sums. The
decision room (:mod:`xslim_xdit.decision`) and the per-sample room use these alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .caches import BranchCaches
from .config import XSlimConfig
from .controller import select_blocks


@dataclass(frozen=True)
class DepthLayout:
    """The whole model's depth as the decision sees it (a PipeFusion stage holds a slice).

    ``stacks``: each block stack's global ``[start, end)``; ``managed_from``: blocks before this
    global index always run (block 0 when it is the probe, ``first_block_residual``)."""

    stacks: tuple[tuple[int, int], ...]
    managed_from: int = 0

    @property
    def total_blocks(self) -> int:
        return self.stacks[-1][1] if self.stacks else 0

    @classmethod
    def flat(cls, num_blocks: int, managed_from: int = 0) -> DepthLayout:
        """One stack of ``num_blocks`` blocks."""
        return cls(((0, num_blocks),), managed_from)


def image_block_partials(caches: BranchCaches, parts: Sequence[BranchCaches] = ()) -> torch.Tensor:
    """The block statistics ``(blocks, 2)`` of the whole image: ``caches.block_mag``, or with
    ``parts`` (PipeFusion's patches) the sum over the parts that hold statistics (after the
    switch to patches runs in full, every patch holds those of the same last full step).

    Example:
        >>> a, b = BranchCaches(linear=False), BranchCaches(linear=False)
        >>> a.block_mag, b.block_mag = torch.ones(2, 2), torch.ones(2, 2)
        >>> image_block_partials(a, (a, b)).tolist()
        [[2.0, 2.0], [2.0, 2.0]]
    """
    mags = [c.block_mag for c in parts if c.block_mag is not None] if parts else [caches.block_mag]
    assert mags and mags[0] is not None
    total = mags[0].to(torch.float64).clone()
    for m in mags[1:]:
        total += m.to(total.device, torch.float64)  # type: ignore[union-attr]
    return total


def depth_mask(config: XSlimConfig, layout: DepthLayout, sums: torch.Tensor) -> list[bool]:
    """The whole-depth block mask (``True``: compute) from the reduced per-block partial sums
    ``sums`` (blocks, 2): each stack walks its managed blocks' mean residual magnitudes.

    Example:
        >>> cfg = XSlimConfig(block_thresh=2.0, block_first_n=1)
        >>> depth_mask(cfg, DepthLayout.flat(4), torch.tensor([[1.0, 1.0]] * 4))
        [True, False, True, False]
    """
    mags = (sums[:, 0] / sums[:, 1].clamp_min(1)).tolist()
    compute: list[bool] = []
    for si, (start, end) in enumerate(layout.stacks):
        managed = [g for g in range(start, end) if g >= layout.managed_from]
        compute += [True] * (end - start - len(managed))
        compute += select_blocks(
            [mags[g] for g in managed],
            config.block_threshold(si),
            config.block_first_n,
            config.block_thresh_scale,
        )
    return compute
