"""The sampling loop shared by the testbed pipelines: class labels in, true CFG, ``[0, 1]`` out.

:class:`ClassConditionalPipeline` holds what every testbed pipeline (DiT, FLUX, FLUX.2,
HunyuanVideo, Wan, emoji FLUX, FLUX ControlNet) does alike: ONE ``__call__`` that checks the
arguments, draws (or checks) the initial noise, denoises and maps ``[-1, 1]`` to ``[0, 1]``, and
ONE denoising loop (:meth:`ClassConditionalPipeline._denoise`): classifier-free guidance either
batched (``self.transformer`` ONCE per step on ``[cond; uncond]``, as the DiT, FLUX and
HunyuanVideo pipelines of diffusers) or as two calls in ``cache_context("cond")`` /
``cache_context("uncond")`` (as the Wan and FLUX.2 pipelines), ``uncond + s * (cond - uncond)``,
one scheduler step. Each pipeline gives its sample shape and its :meth:`_sample`: timesteps and
the transformer's arguments. :class:`ClassTokenPipeline` adds the learned class-token "text
encoder" of the FLUX, FLUX.2, HunyuanVideo and Wan testbeds and their checkpoint loading.
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
    """Base of the testbed pipelines (see the module docstring).

    Subclasses set :attr:`null_class` and :attr:`default_guidance_scale` and implement
    :meth:`_sample_shape` and :meth:`_sample`; :meth:`__call__` is the same for all.
    """

    null_class: int
    """Class index of the unconditional label appended for classifier-free guidance."""
    default_guidance_scale: float
    """Guidance scale of a call that gives none (the testbed's ``DEFAULT_GUIDANCE_SCALE``)."""

    @torch.no_grad()
    def __call__(
        self,
        class_labels: Sequence[int] | torch.Tensor,
        num_inference_steps: int = 50,
        guidance_scale: float | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pt",
        progress: bool = True,
        latents: torch.Tensor | None = None,
        **sample_options: Any,
    ) -> torch.Tensor | np.ndarray:
        """Generate samples of the given classes.

        Args:
            class_labels: Class per sample; the batch size is its length.
            num_inference_steps: Sampler steps.
            guidance_scale: Classifier-free guidance scale (default :attr:`default_guidance_scale`);
                ``<= 1`` runs the conditional half only.
            generator: Seeds the initial noise ``randn(B, *sample_shape)``, so the same seed gives
                the same starting noise for any step count.
            output_type: ``"pt"`` for ``(B, C, ...)``, ``"np"`` for channels last ``(B, ..., C)``.
            progress: Show the tqdm progress bar.
            latents: Optional initial noise ``(B, *sample_shape)`` used instead of drawing it.
            **sample_options: The testbed's own options of the sample shape (the video testbeds:
                ``num_frames``); an unknown one raises ``TypeError``.

        Returns:
            Samples in ``[0, 1]``.

        Example::

            images = DigitsFluxPipeline.from_checkpoint()([0, 1, 2], num_inference_steps=50)
            images.shape  # (3, 1, 16, 16)
        """
        scale = self.default_guidance_scale if guidance_scale is None else guidance_scale
        shape = self._sample_shape(**sample_options)
        labels, latents = self._prepare(class_labels, output_type, shape, generator, latents)
        self.set_progress_bar_config(disable=not progress)
        samples = self._sample(labels, latents, num_inference_steps, scale)
        return self._output(samples, output_type)

    def _sample_shape(self) -> tuple[int, ...]:
        """The shape of one sample (and of its initial noise), channels first."""
        raise NotImplementedError

    def _sample(self, labels: torch.Tensor, latents: torch.Tensor, steps: int, scale: float) -> torch.Tensor:
        """Denoise the initial noise ``latents`` ``(B, *sample_shape)`` of ``labels`` ``(B,)`` in
        ``steps`` steps at guidance ``scale``; return the fp32 samples in ``[-1, 1]``, same shape."""
        raise NotImplementedError

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
        predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        predict_uncond: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        step_context: Callable[[int], dict[str, Any]] | None = None,
        *,
        two_calls: bool = False,
    ) -> torch.Tensor:
        """Run the scheduler's timesteps, guidance ``uncond + s * (cond - uncond)`` when
        ``guidance_scale > 1``, then :meth:`_step`.

        Batched (DiT, FLUX, HunyuanVideo): ONE ``predict(model_input, t)`` per step on ``[x; x]``
        (or ``x`` without guidance), its halves ``[cond; uncond]``. ``two_calls`` (Wan, FLUX.2, as
        their diffusers pipelines): ``predict(x, t)`` inside
        ``transformer.cache_context("cond", **step_context(i))``, then, with guidance,
        ``predict_uncond(x, t)`` inside ``cache_context("uncond", ...)`` (no context arguments
        without ``step_context``).
        """
        do_cfg = guidance_scale > 1.0
        if two_calls and do_cfg and predict_uncond is None:
            raise ValueError("predict_uncond is needed for guidance with two_calls")
        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            if not two_calls:
                model_input = torch.cat([latents, latents]) if do_cfg else latents
                prediction = predict(model_input, t)
                if do_cfg:
                    cond, uncond = prediction.chunk(2)
                    prediction = uncond + guidance_scale * (cond - uncond)
            else:
                context = step_context(i) if step_context is not None else {}
                with self.transformer.cache_context("cond", **context):
                    prediction = predict(latents, t)
                if do_cfg:
                    with self.transformer.cache_context("uncond", **context):
                        uncond = predict_uncond(latents, t)  # type: ignore[misc]
                    prediction = uncond + guidance_scale * (prediction - uncond)
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
    (the ``text_encoder``), sampled with :attr:`scheduler_cls` (flow-matching Euler by default)."""

    model_cpu_offload_seq = "text_encoder->transformer"

    def __init__(self, transformer: Any, scheduler: Any, text_encoder: ClassTokenEncoder) -> None:
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler, text_encoder=text_encoder)

    transformer_cls: Any = None
    """The transformer's model class (``from_pretrained`` of ``transformer/``)."""
    scheduler_cls: Any = FlowMatchEulerDiscreteScheduler
    """The sampler's class (``from_pretrained`` of ``scheduler/``)."""
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
        scheduler = cls.scheduler_cls.from_pretrained(path / "scheduler")
        return cls(transformer=transformer.eval(), scheduler=scheduler, text_encoder=text_encoder.eval())
