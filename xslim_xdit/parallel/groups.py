"""Sequence-parallel helpers: the collectives token refresh needs inside attention."""

from __future__ import annotations

from collections.abc import Callable

import torch


class SequenceParallelGather:
    """All-gather key/value rows along the sequence over the sequence-parallel group.

    On a token-refresh step each rank attends its few query tokens to the keys of the whole
    sequence: the shards' keys (already normed and RoPE'd with their own positions) are
    gathered. Attention does not depend on the order of the keys, so the rank-major order of the
    gathered rows is as good as the original one. Text rows are gathered only when the text is
    split across ranks (``text_split()``); replicated text is already whole.

    Example:
        >>> g = SequenceParallelGather(group=None, text_split=lambda: False)  # doctest: +SKIP
    """

    def __init__(self, group: object, text_split: Callable[[], bool]) -> None:
        import torch.distributed as dist

        self.group = group
        self.world = dist.get_world_size(group)
        self.text_split = text_split
        self.collectives = 0

    def __call__(self, x: torch.Tensor, stream: str) -> torch.Tensor:
        if self.world == 1 or (stream == "txt" and not self.text_split()):
            return x
        import torch.distributed as dist

        parts = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        self.collectives += 1
        return torch.cat(parts, dim=1)
