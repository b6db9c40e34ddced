"""The sampling loop shared by the testbed pipelines: class labels in, batched true CFG, ``[0, 1]`` out.

:class:`ClassConditionalPipeline` holds what :class:`~benchmarks.testbeds.digits.DigitsDiTPipeline`,
:class:`~benchmarks.testbeds.flux_testbed.DigitsFluxPipeline` and
:class:`~benchmarks.testbeds.video_testbed.MovingDigitsVideoPipeline` do alike: check the
arguments, draw (or check) the initial noise, append the null class for classifier-free guidance,
run ``self.transformer`` ONCE per step on ``[cond; uncond]``, combine
``uncond + s * (cond - uncond)``, step the scheduler, and map ``[-1, 1]`` to ``[0, 1]``. Each
pipeline keeps its own ``__call__`` (its timesteps and its transformer's arguments).
:class:`ClassTokenPipeline` adds the learned class-token "text encoder" of the FLUX and
HunyuanVideo testbeds and their checkpoint loading.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from diffusers.utils.torch_utils import randn_tensor

from benchmarks.testbeds.class_tokens import ClassTokenEncoder


class ClassConditionalPipeline(DiffusionPipeline):
    """Base of the testbed pipelines (see the module docstring); subclasses set :attr:`null_class`."""

    null_class: int
    """Class index of the unconditional label appended for classifier-free guidance."""

    def _prepare(
        self,
        class_labels: Sequence[int] | torch.Tensor,
        output_type: str,
        sample_shape: tuple[int, ...],
        generator: torch.Generator | list[torch.Generator] | None,
        latents: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Check ``output_type``; return the labels ``(B,)`` and the initial noise ``(B, *sample_shape)``
        (drawn with ``generator``, or ``latents`` checked and moved to the transformer's device and dtype)."""
        if output_type not in ("pt", "np"):
            raise ValueError(f"output_type must be 'pt' or 'np', got {output_type!r}")
        device = self._execution_device
        dtype = self.transformer.dtype
        labels = torch.as_tensor(class_labels, dtype=torch.long, device=device).reshape(-1)
        shape = (labels.shape[0], *sample_shape)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        else:
            if tuple(latents.shape) != shape:
                raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
            latents = latents.to(device=device, dtype=dtype)
        return labels, latents

    def _cfg_labels(self, labels: torch.Tensor, guidance_scale: float) -> torch.Tensor:
        """``[labels; null]`` when guidance is on (``guidance_scale > 1``), else ``labels``."""
        if guidance_scale > 1.0:
            return torch.cat([labels, torch.full_like(labels, self.null_class)])
        return labels

    def _step(self, prediction: torch.Tensor, t: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """One scheduler step."""
        return self.scheduler.step(prediction, t, latents, return_dict=False)[0]

    def _denoise(
        self,
        latents: torch.Tensor,
        guidance_scale: float,
        progress: bool,
        predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """Run the scheduler's timesteps: one ``predict(model_input, t)`` per step on ``[x; x]`` (or
        ``x`` without guidance), guidance combined, then :meth:`_step`."""
        do_cfg = guidance_scale > 1.0
        self.set_progress_bar_config(disable=not progress)
        for t in self.progress_bar(self.scheduler.timesteps):
            model_input = torch.cat([latents, latents]) if do_cfg else latents
            prediction = predict(model_input, t)
            if do_cfg:
                cond, uncond = prediction.chunk(2)
                prediction = uncond + guidance_scale * (cond - uncond)
            latents = self._step(prediction, t, latents)
        return latents

    def _output(self, samples: torch.Tensor, output_type: str) -> torch.Tensor | np.ndarray:
        """``[-1, 1]`` samples ``(B, C, ...)`` to ``[0, 1]``; ``"np"`` puts the channels last."""
        samples = (samples / 2 + 0.5).clamp(0, 1)
        self.maybe_free_model_hooks()
        if output_type == "np":
            return samples.cpu().permute(0, *range(2, samples.ndim), 1).numpy()
        return samples


class ClassTokenPipeline(ClassConditionalPipeline):
    """A :class:`ClassConditionalPipeline` whose class goes through a :class:`ClassTokenEncoder`
    (the ``text_encoder``), sampled with a ``FlowMatchEulerDiscreteScheduler``."""

    model_cpu_offload_seq = "text_encoder->transformer"

    def __init__(
        self, transformer: Any, scheduler: FlowMatchEulerDiscreteScheduler, text_encoder: ClassTokenEncoder
    ) -> None:
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler, text_encoder=text_encoder)

    transformer_cls: Any = None
    """The transformer's model class (``from_pretrained`` of ``transformer/``)."""
    default_checkpoint: Path
    """The committed checkpoint folder."""

    @classmethod
    def from_checkpoint(cls, path: str | Path | None = None, torch_dtype: torch.dtype = torch.float32) -> Any:
        """Load a checkpoint folder written by the testbed's training script.

        Args:
            path: Folder with ``transformer/``, ``text_encoder/`` and ``scheduler/`` subfolders
                (default: :attr:`default_checkpoint`, the committed one).
            torch_dtype: Compute dtype; fp16-stored weights are upcast (fp32 by default).
        """
        path = Path(path) if path is not None else cls.default_checkpoint
        transformer = cls.transformer_cls.from_pretrained(path / "transformer", torch_dtype=torch_dtype)
        text_encoder = ClassTokenEncoder.from_pretrained(path / "text_encoder", torch_dtype=torch_dtype)
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(path / "scheduler")
        return cls(transformer=transformer.eval(), scheduler=scheduler, text_encoder=text_encoder.eval())
