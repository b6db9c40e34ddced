"""Tiny random-weight transformers of each model family, and a sampling loop for them.

Used by the tests, the ``--tiny`` examples and the multi-rank checks: small enough to run in a
fraction of a second on a CPU, shaped like the real models (stacks, joint attention, RoPE). Each
family declares its tiny model, inputs and timestep units in its adapter module
(:class:`~xslim_xdit.adapters.family.FamilyDescription`); the functions here look the family up by
name. :mod:`xslim_xdit.testing.pipelines` builds whole tiny diffusers pipelines and
:mod:`xslim_xdit.testing.xfuser` sets xfuser up in a test process.

Example:
    >>> model = tiny_model("dit")
    >>> out = sample(model, "dit", steps=3, batch=1, seed=0)
    >>> tuple(out.shape)
    (1, 4, 8, 8)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..adapters import adapter_named, registered_adapters

__all__ = [
    "FAMILIES",
    "denoise",
    "families",
    "make_batch_inputs",
    "make_inputs",
    "sample",
    "tiny_model",
    "timesteps_for",
]


def families() -> tuple[str, ...]:
    """The names of the registered families that declare a tiny model, in registration order.

    Example:
        >>> {"dit", "flux", "hunyuan_video", "pixart"} <= set(families())
        True
    """
    return tuple(a.name for a in registered_adapters() if a.has_tiny_model())


#: The families with a tiny model registered when this module was first imported (the package's
#: own); :func:`families` also lists those registered since.
FAMILIES: tuple[str, ...] = families()


def tiny_model(family: str, seed: int = 0, **overrides: Any) -> nn.Module:
    """A small random transformer of ``family`` in eval mode; ``overrides`` change its config.

    Example:
        >>> model = tiny_model("flux", num_single_layers=1)
        >>> len(model.transformer_blocks), len(model.single_transformer_blocks)
        (2, 1)
    """
    return adapter_named(family).tiny_model(seed, **overrides)


def make_inputs(family: str, batch: int = 1, seed: int = 0, **shape: int) -> tuple[torch.Tensor, dict]:
    """Initial latents and the fixed conditioning kwargs for :func:`sample`; ``shape`` takes the
    family's size arguments (FLUX: ``height``, ``width``, ``text_len``).

    Example:
        >>> x, cond = make_inputs("flux", batch=2, height=4, width=4)
        >>> tuple(x.shape), tuple(cond["encoder_hidden_states"].shape)
        ((2, 16, 8), (2, 6, 24))
    """
    return adapter_named(family).tiny_inputs(batch, seed, **shape)


def make_batch_inputs(family: str, seeds: list[int], **shape: int) -> tuple[torch.Tensor, dict]:
    """The inputs of each seed alone (:func:`make_inputs` with ``batch=1``), stacked into one
    batch: row ``i`` of the batch is what seed ``seeds[i]`` gives a single run. Tensors shared by
    the batch (FLUX's position ids) are kept once; a class label is the seed's (mod 10), so the
    samples differ in conditioning too.

    Example:
        >>> x, cond = make_batch_inputs("flux", [0, 1], height=4, width=4)
        >>> torch.equal(x[1:], make_inputs("flux", seed=1, height=4, width=4)[0]), tuple(cond["img_ids"].shape)
        (True, (16, 3))
        >>> make_batch_inputs("dit", [3, 12])[1]["class_labels"].tolist()
        [3, 2]
    """
    xs, conds = zip(*(make_inputs(family, batch=1, seed=s, **shape) for s in seeds), strict=True)
    cond: dict[str, Any] = {}
    for k, v in conds[0].items():
        if k == "class_labels":
            cond[k] = torch.tensor([s % 10 for s in seeds])
        elif isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == 1:
            cond[k] = torch.cat([c[k] for c in conds])
        else:  # shared by the batch
            cond[k] = v
    return torch.cat(xs), cond


def timesteps_for(family: str, steps: int) -> list[float]:
    """Decreasing timesteps in the unit each family's transformer expects.

    Example:
        >>> timesteps_for("dit", 2), timesteps_for("flux", 2)
        ([999.0, 499.5], [1.0, 0.5])
    """
    return adapter_named(family).timesteps(steps)


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
    """A plain Euler-like loop: ``x <- x - dt * model(x, t)``; returns the final latents.

    Example:
        >>> tuple(sample(tiny_model("pixart"), "pixart", steps=2, batch=2).shape)
        (2, 4, 8, 8)
    """
    x, cond = adapter_named(family).tiny_inputs(batch, seed, **shape)
    return denoise(model, family, x, cond, steps, callback)


@torch.no_grad()
def denoise(
    model: nn.Module,
    family: str,
    x: torch.Tensor,
    cond: dict[str, Any],
    steps: int = 8,
    callback: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """:func:`sample`'s loop from given latents ``x`` and conditioning ``cond`` (e.g. from
    :func:`make_batch_inputs`).

    Example:
        >>> x, cond = make_batch_inputs("dit", [0, 1])
        >>> tuple(denoise(tiny_model("dit"), "dit", x, cond, steps=2).shape)
        (2, 4, 8, 8)
    """
    adapter = adapter_named(family)
    for i, t in enumerate(adapter.timesteps(steps)):
        out = adapter.tiny_forward(model, x, adapter.timestep_input(t, x.shape[0]), cond)
        x = x - (1.0 / steps) * out
        if callback is not None:
            callback(i, x)
    return x
