"""The one narrow interface through which every X-Slim decision passes.

The engine never calls torch.distributed itself. At each decision point it hands this object
(1) the *partial sums* behind an indicator, packed in one tensor, and gets back their exact
global sums, and (2) the decision as integers, and gets back the integers every rank will act
on. On one device both are identities.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class DecisionSync:
    """Base class: no collectives. Subclasses reduce over process groups.

    Attributes:
        collectives: number of collective calls issued so far.
        bytes_sent: payload bytes handed to those collectives.

    Example:
        >>> sync = LocalSync()
        >>> sync.sum_partials(torch.tensor([1.0, 2.0])).tolist()
        [1.0, 2.0]
        >>> sync.agree([3, 1])
        [3, 1]
    """

    def __init__(self) -> None:
        self.collectives = 0
        self.bytes_sent = 0

    @property
    def is_distributed(self) -> bool:
        return False

    def sum_partials(self, partials: torch.Tensor) -> torch.Tensor:
        """Exact global sums of per-rank partial sums (float64 on the wire)."""
        return partials

    def sum_block_partials(self, partials: torch.Tensor) -> torch.Tensor:
        """Like :meth:`sum_partials`, for per-block statistics; pipeline stages contribute the
        rows of the blocks they own (the others are zero), so the sum is the whole depth."""
        return self.sum_partials(partials)

    def agree(self, values: Sequence[int]) -> list[int]:
        """The integers every rank acts on (rank 0's, on every rank of the decision group)."""
        return [int(v) for v in values]

    def reset_counters(self) -> None:
        self.collectives = 0
        self.bytes_sent = 0


class LocalSync(DecisionSync):
    """Single device, no torch.distributed: every call is an identity."""
