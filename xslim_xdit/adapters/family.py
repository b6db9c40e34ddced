"""What an adapter knows about its family beyond the block layout the engine reads.

:class:`FamilyDescription` is a base of :class:`~xslim_xdit.adapters.base.ModelAdapter`; an
adapter module sets these class attributes (or overrides the methods) next to its layout, so one
file holds everything about a family:

- ``rescale_polynomial``: TeaCache's polynomial for this family's step indicator; a config names it
  by the family's name (``XSlimConfig(rescale="flux")``).
- ``presets``: published schedules, ``{"<family>-<variant>": {config field: value}}``, reached
  through ``XSlimConfig.from_preset`` and :data:`xslim_xdit.PRESETS`.
- ``tiny_config`` (or an override of :meth:`FamilyDescription.tiny_model`) and
  :meth:`FamilyDescription.tiny_inputs`: a small random model and its inputs, for the tests and
  the ``--tiny`` examples (see :mod:`xslim_xdit.testing`).
- ``timestep_max`` and ``timestep_dtype``: the units the transformer takes its timestep in.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import torch
from torch import nn


class FamilyDescription:
    """Presets, rescale polynomial, timestep units and tiny test model of a model family.

    Example:
        >>> from xslim_xdit.adapters import adapter_named
        >>> flux = adapter_named("flux")
        >>> sorted(flux.presets), flux.timesteps(4)
        (['flux-fast', 'flux-slow'], [1.0, 0.75, 0.5, 0.25])
        >>> x, cond = flux.tiny_inputs(batch=1, height=2, width=3)
        >>> tuple(x.shape), sorted(cond)
        ((1, 6, 8), ['encoder_hidden_states', 'img_ids', 'pooled_projections', 'txt_ids'])
    """

    name: str = "base"
    model_class_names: tuple[str, ...] = ()
    #: TeaCache's rescale polynomial of the raw indicator (highest degree first), or None
    rescale_polynomial: tuple[float, ...] | None = None
    #: published schedules by name (each name starts with ``"<name>-"``): the config fields each sets
    presets: Mapping[str, Mapping[str, Any]] = MappingProxyType({})
    #: keyword arguments of the tiny random model (the diffusers class ``model_class_names[0]``);
    #: None when the family has no tiny model (then :meth:`tiny_model` must be overridden to have one)
    tiny_config: Mapping[str, Any] | None = None
    #: the transformer takes timesteps in ``[0, timestep_max]``, as tensors of ``timestep_dtype``
    timestep_max: float = 999.0
    timestep_dtype: torch.dtype = torch.float32

    @classmethod
    def has_tiny_model(cls) -> bool:
        """Whether the family declares a tiny model (a ``tiny_config`` or its own :meth:`tiny_model`).

        Example:
            >>> from xslim_xdit.adapters import adapter_named
            >>> type(adapter_named("dit")).has_tiny_model()
            True
        """
        return cls.tiny_config is not None or cls.tiny_model is not FamilyDescription.tiny_model

    def tiny_model(self, seed: int = 0, **overrides: Any) -> nn.Module:
        """A small random model of the family in eval mode, weights drawn from ``seed``.

        The default builds the diffusers class ``model_class_names[0]`` from ``tiny_config``
        updated with ``overrides``.

        Example:
            >>> from xslim_xdit.adapters import adapter_named
            >>> len(adapter_named("pixart").tiny_model(num_layers=2).transformer_blocks)
            2
        """
        if self.tiny_config is None:
            raise NotImplementedError(f"family {self.name!r} declares no tiny model (tiny_config is None)")
        import diffusers

        torch.manual_seed(seed)
        model_class = getattr(diffusers, self.model_class_names[0])
        return model_class(**{**self.tiny_config, **overrides}).eval()

    def tiny_inputs(self, batch: int = 1, seed: int = 0, **shape: int) -> tuple[torch.Tensor, dict[str, Any]]:
        """Initial latents for the tiny model and the conditioning keyword arguments of every call.

        ``shape`` takes the family's size arguments (``height``, ``width``, ...); an argument the
        family does not know is refused with a ``TypeError`` naming it.

        Example:
            >>> from xslim_xdit.adapters import adapter_named
            >>> x, cond = adapter_named("hunyuan_video").tiny_inputs(batch=2, frames=1)
            >>> tuple(x.shape), tuple(cond["encoder_attention_mask"].shape)
            ((2, 4, 1, 4, 4), (2, 5))
        """
        raise NotImplementedError(f"family {self.name!r} declares no tiny inputs")

    def timesteps(self, steps: int) -> list[float]:
        """``steps`` decreasing timesteps in the family's units, from ``timestep_max`` down.

        Example:
            >>> from xslim_xdit.adapters import adapter_named
            >>> adapter_named("pixart").timesteps(4)
            [999.0, 749.25, 499.5, 249.75]
        """
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an integer >= 1; got {steps!r}")
        return [self.timestep_max * (1.0 - i / steps) for i in range(steps)]

    def timestep_input(self, t: float, batch: int) -> torch.Tensor:
        """The timestep ``t`` as the transformer takes it: one value per sample.

        Example:
            >>> from xslim_xdit.adapters import adapter_named
            >>> adapter_named("dit").timestep_input(874.125, batch=2)
            tensor([874, 874])
        """
        return torch.full((batch,), t).to(self.timestep_dtype)

    def tiny_forward(
        self, model: nn.Module, x: torch.Tensor, timestep: torch.Tensor, cond: Mapping[str, Any]
    ) -> torch.Tensor:
        """One call of the tiny model: its prediction for latents ``x`` at ``timestep``.

        Example:
            >>> from xslim_xdit.adapters import adapter_named
            >>> dit = adapter_named("dit")
            >>> x, cond = dit.tiny_inputs()
            >>> tuple(dit.tiny_forward(dit.tiny_model(), x, dit.timestep_input(500.0, 1), cond).shape)
            (1, 4, 8, 8)
        """
        return model(x, timestep=timestep, return_dict=False, **cond)[0]
