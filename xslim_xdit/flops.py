"""Counting the floating-point work a call really did, memoised by call shape.

torch's ``FlopCounterMode`` counts matrix products exactly but, on CPU, does not know the fused
attention kernel ``_scaled_dot_product_flash_attention_for_cpu``; we add its formula (the same
one torch uses for the CUDA kernels) locally, without touching torch's global registry.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count


def _sdpa_formula(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, **kwargs: Any) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _custom_mapping() -> dict[Any, Any]:
    mapping: dict[Any, Any] = {}
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is not None:
        mapping[op] = _sdpa_formula
    return mapping


def counter() -> FlopCounterMode:
    """A silent ``FlopCounterMode`` that also counts CPU fused attention."""
    return FlopCounterMode(display=False, custom_mapping=_custom_mapping())


class FlopMeter:
    """Runs a callable and returns its FLOPs, counting each distinct ``key`` only once.

    Example:
        >>> meter = FlopMeter()
        >>> lin = torch.nn.Linear(4, 3, bias=False)
        >>> flops, _ = meter.run(("lin", 2), lambda: lin(torch.ones(2, 4)))
        >>> flops
        48
    """

    def __init__(self) -> None:
        self.cache: dict[Hashable, int] = {}

    def run(self, key: Hashable, fn: Callable[[], Any]) -> tuple[int, Any]:
        if key in self.cache:
            return self.cache[key], fn()
        with counter() as mode:
            out = fn()
        self.cache[key] = int(mode.get_total_flops())
        return self.cache[key], out
