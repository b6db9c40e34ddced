"""A tiny FLUX ControlNet on the digits FLUX testbed (issue 10, point 1: ControlNet quality).

A :class:`diffusers.FluxControlNetModel` with 1 double-stream and 1 single-stream block
(``from_transformer``: its blocks start as copies of the testbed's first ones, its output
projections at zero) is trained on top of the FROZEN testbed transformer
(:mod:`benchmarks.testbeds.flux_testbed`) by ``train_flux_controlnet.py``. The control signal is
synthetic: the target digit averaged over 4x4 pixel cells (a 4x4 thumbnail, upsampled back to
16x16 by repetition, :func:`control_signal`), packed like the image (:func:`~.flux_testbed.pack`,
64 tokens x 4 channels) and given as ``controlnet_cond``, as ``FluxControlNetPipeline`` gives the
packed VAE latents of its control image.

:class:`DigitsFluxControlNetPipeline` runs the ControlNet once per step on the same batch
``[cond; uncond]`` as the transformer and passes its ``controlnet_block_samples`` /
``controlnet_single_block_samples`` to the transformer call, as ``FluxControlNetPipeline`` does.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import FluxControlNetModel, FluxTransformer2DModel

from benchmarks.testbeds.flux_testbed import DigitsFluxPipeline, pack

CONTROL_CELL = 4
"""Side of the pixel cells the control signal averages over (16x16 -> 4x4 thumbnail)."""
DEFAULT_CONTROLNET_CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "digits_flux_controlnet"
"""Folder of the committed ControlNet (``controlnet/``, loaded with the ``digits_flux`` testbed)."""


def control_signal(images: torch.Tensor, cell: int = CONTROL_CELL) -> torch.Tensor:
    """The synthetic control of digits ``(B, 1, 16, 16)`` in ``[-1, 1]``: each ``cell x cell``
    block replaced by its mean (a blurred, downsampled digit), same shape and range."""
    small = F.avg_pool2d(images, cell)
    return F.interpolate(small, scale_factor=cell, mode="nearest")


def make_controlnet(
    transformer: FluxTransformer2DModel, double: int = 1, single: int = 1
) -> FluxControlNetModel:
    """A ControlNet of ``double`` + ``single`` blocks from the testbed transformer (its blocks,
    embedders and heads copied; ``controlnet_x_embedder`` and the output blocks zero)."""
    cfg = transformer.config
    return FluxControlNetModel.from_transformer(
        transformer,
        num_layers=double,
        num_single_layers=single,
        attention_head_dim=cfg.attention_head_dim,
        num_attention_heads=cfg.num_attention_heads,
    )


class DigitsFluxControlNetPipeline(DigitsFluxPipeline):
    """:class:`~.flux_testbed.DigitsFluxPipeline` with a ControlNet.

    ``__call__`` takes ``control`` (``(B, 1, 16, 16)`` in ``[-1, 1]``, e.g. :func:`control_signal`
    of a digit) and ``controlnet_conditioning_scale``. Each step the ControlNet runs on the
    transformer's inputs plus the packed control (repeated for the unconditional half) and its
    block samples go to the transformer call. Without ``control`` the pipeline is the plain one.
    """

    model_cpu_offload_seq = "text_encoder->controlnet->transformer"

    def __init__(
        self, transformer: Any, scheduler: Any, text_encoder: Any, controlnet: FluxControlNetModel
    ) -> None:
        super().__init__(transformer=transformer, scheduler=scheduler, text_encoder=text_encoder)
        self.register_modules(controlnet=controlnet)
        self._control_tokens: torch.Tensor | None = None
        self._control_scale = 1.0

    @classmethod
    def from_checkpoint(  # type: ignore[override]
        cls,
        path: str | Path | None = None,
        torch_dtype: torch.dtype = torch.float32,
        controlnet_path: str | Path | None = None,
    ) -> DigitsFluxControlNetPipeline:
        """The testbed checkpoint (``path``, default the committed ``digits_flux``) with the
        ControlNet of ``controlnet_path`` (default :data:`DEFAULT_CONTROLNET_CHECKPOINT`)."""
        base = DigitsFluxPipeline.from_checkpoint(path, torch_dtype)
        cpath = Path(controlnet_path) if controlnet_path is not None else DEFAULT_CONTROLNET_CHECKPOINT
        controlnet = FluxControlNetModel.from_pretrained(cpath / "controlnet", torch_dtype=torch_dtype)
        return cls(
            transformer=base.transformer,
            scheduler=base.scheduler,
            text_encoder=base.text_encoder,
            controlnet=controlnet.eval(),
        )

    def _extra_transformer_kwargs(self, kwargs: dict) -> dict:
        if self._control_tokens is None:
            return {}
        x = kwargs["hidden_states"]
        cond = self._control_tokens
        if cond.shape[0] != x.shape[0]:  # [cond; uncond]
            cond = cond.repeat(x.shape[0] // cond.shape[0], 1, 1)
        blocks, singles = self.controlnet(
            controlnet_cond=cond, conditioning_scale=self._control_scale, return_dict=False, **kwargs
        )
        return {"controlnet_block_samples": blocks, "controlnet_single_block_samples": singles}

    @torch.no_grad()
    def __call__(  # type: ignore[override]
        self,
        class_labels: Sequence[int] | torch.Tensor,
        *args: Any,
        control: torch.Tensor | None = None,
        controlnet_conditioning_scale: float = 1.0,
        **kwargs: Any,
    ) -> torch.Tensor | np.ndarray:
        """Generate digits (the arguments of :meth:`DigitsFluxPipeline.__call__`), guided by
        ``control`` ``(B, 1, 16, 16)`` through the ControlNet at ``controlnet_conditioning_scale``."""
        if control is not None:
            n = torch.as_tensor(class_labels).reshape(-1).shape[0]
            if control.shape[0] != n:
                raise ValueError(f"control has {control.shape[0]} images for {n} labels")
            self._control_tokens = pack(control.to(self._execution_device, self.transformer.dtype))
            self._control_scale = controlnet_conditioning_scale
        try:
            return super().__call__(class_labels, *args, **kwargs)
        finally:
            self._control_tokens = None
