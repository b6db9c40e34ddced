"""Counting the floating-point work a call really did (the engine's
:class:`~xslim_xdit.observers.FlopMeter` memoises it by call shape).

torch's ``FlopCounterMode`` counts matrix products exactly but, on CPU, does not know the fused
attention kernel ``_scaled_dot_product_flash_attention_for_cpu``; we add its formula (the same
one torch uses for the CUDA kernels) locally, without touching torch's global registry.
"""

from __future__ import annotations

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
    """A silent ``FlopCounterMode`` that also counts CPU fused attention.

    Example:
        >>> lin = torch.nn.Linear(4, 3, bias=False)
        >>> with counter() as mode:
        ...     _ = lin(torch.ones(2, 4))
        >>> mode.get_total_flops()
        48
    """
    return FlopCounterMode(display=False, custom_mapping=_custom_mapping())
