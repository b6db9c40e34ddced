"""A tiny class-conditional DiT on scikit-learn's digits: the offline testbed for cache benchmarks.

No pretrained diffusion weights can be downloaded here, so the benchmarks run on a small
:class:`diffusers.DiTTransformer2DModel` trained in pixel space on scikit-learn's bundled digits
(1797 images, 8x8, 10 classes), upsampled to 16x16 and scaled to ``[-1, 1]``.

The model is an epsilon-predicting DiT trained with a DDPM noise schedule and sampled with DDIM
(eta = 0) and classifier-free guidance, the same recipe as DiT-XL/2 in diffusers'
:class:`~diffusers.DiTPipeline`: the conditional and the unconditional branch run batched in ONE
transformer forward per denoising step.

Null class: ``DiTTransformer2DModel`` builds one ``LabelEmbedding(num_classes, dim, 0.1)`` per
block, whose table has ``num_classes + 1`` rows; row ``num_classes`` (here 10) is the null class
(``LabelEmbedding.token_drop`` maps dropped labels to ``self.num_classes``). DiTPipeline uses 1000
for the same reason (``num_embeds_ada_norm=1000``). The built-in dropout draws independently in
every block, so training disables it and drops labels once per sample instead (see
:func:`disable_builtin_label_dropout`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DiTTransformer2DModel
from diffusers.models.embeddings import LabelEmbedding

from benchmarks.testbeds.sampling import ClassConditionalPipeline

IMAGE_SIZE = 16
"""Side of the (square, 1-channel) images the model works on."""
NUM_CLASSES = 10
"""Number of digit classes."""
NULL_CLASS = NUM_CLASSES
"""Class index of the unconditional ("null") label used by classifier-free guidance."""
DEFAULT_GUIDANCE_SCALE = 6.0
"""Default classifier-free guidance scale: high enough that 25 and 50 DDIM steps differ by ~30 dB PSNR
(a testbed sensitive to skipped steps) while samples stay recognisable (see ``checkpoints/digits_dit/eval_*.json``)."""
DEFAULT_CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "digits_dit"
"""Folder of the committed checkpoint (``transformer/`` and ``scheduler/`` subfolders)."""
SPLIT_SEED = 0
"""Seed of the fixed train/test split shared by the DiT and the classifier."""
TEST_FRACTION = 0.2
"""Fraction of the 1797 digits held out as the real test set."""


def load_digits_images(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Load scikit-learn's digits as 16x16 images in ``[-1, 1]``.

    The 8x8 images (values 0..16) are scaled to ``[0, 1]``, upsampled bilinearly to 16x16
    (``align_corners=False``) and mapped to ``[-1, 1]``. The split is a fixed stratified split
    (seed :data:`SPLIT_SEED`, :data:`TEST_FRACTION` held out) shared by the DiT and the classifier.

    Args:
        split: ``"train"``, ``"test"`` or ``"all"``.

    Returns:
        ``(images, labels)``: float32 tensor ``(N, 1, 16, 16)`` in ``[-1, 1]`` and int64 labels ``(N,)``.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.from_numpy(digits.images.astype(np.float32) / 16.0)[:, None]
    x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    x = (x.clamp(0.0, 1.0) * 2.0 - 1.0).contiguous()
    y = torch.from_numpy(digits.target.astype(np.int64))
    if split == "all":
        return x, y
    idx_train, idx_test = train_test_split(
        np.arange(len(y)), test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=digits.target
    )
    if split == "train":
        idx = torch.from_numpy(idx_train)
    elif split == "test":
        idx = torch.from_numpy(idx_test)
    else:
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    return x[idx], y[idx]


def make_transformer(
    width: int = 128, num_layers: int = 6, head_dim: int = 32, patch_size: int = 2
) -> DiTTransformer2DModel:
    """Build an untrained pixel-space DiT for 16x16 1-channel digits.

    Args:
        width: Hidden size (``num_attention_heads * attention_head_dim``).
        num_layers: Number of DiT blocks.
        head_dim: Attention head dimension (``width`` must be a multiple of it).
        patch_size: Patch side; 2 gives 64 tokens.

    Returns:
        A ``DiTTransformer2DModel`` with ``in_channels = out_channels = 1`` (no learned sigma) and
        ``num_embeds_ada_norm = 10`` (null class 10).
    """
    if width % head_dim:
        raise ValueError(f"width {width} is not a multiple of head_dim {head_dim}")
    return DiTTransformer2DModel(
        num_attention_heads=width // head_dim,
        attention_head_dim=head_dim,
        in_channels=1,
        out_channels=1,
        num_layers=num_layers,
        sample_size=IMAGE_SIZE,
        patch_size=patch_size,
        num_embeds_ada_norm=NUM_CLASSES,
    )


def disable_builtin_label_dropout(transformer: DiTTransformer2DModel) -> None:
    """Switch off the per-block label dropout built into ``DiTTransformer2DModel``.

    Every block owns a ``LabelEmbedding`` that, in training mode, drops labels with its own random
    draw, so one sample could be conditional in some blocks and unconditional in others. Training
    instead replaces labels by :data:`NULL_CLASS` once per sample. The embedding tables keep their
    null row (their size is fixed at construction).
    """
    for module in transformer.modules():
        if isinstance(module, LabelEmbedding):
            module.dropout_prob = 0.0


class DigitsDiTPipeline(ClassConditionalPipeline):
    """Class-conditional DDIM sampling with classifier-free guidance for the digits DiT.

    Mirrors :class:`diffusers.DiTPipeline` without a VAE (pixel space): after
    ``scheduler.set_timesteps(num_inference_steps)``, every step calls ``self.transformer`` exactly
    once on the batch ``[cond; uncond]`` (conditional labels first, then :data:`NULL_CLASS`) with
    the same latents in both halves, and combines ``eps = uncond + s * (cond - uncond)``. With
    ``guidance_scale <= 1`` only the conditional half is run.

    Args:
        transformer: The trained ``DiTTransformer2DModel``.
        scheduler: A ``DDIMScheduler`` (eta = 0 is used).
    """

    model_cpu_offload_seq = "transformer"
    null_class = NULL_CLASS
    default_guidance_scale = DEFAULT_GUIDANCE_SCALE

    def __init__(self, transformer: DiTTransformer2DModel, scheduler: DDIMScheduler) -> None:
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler)

    @classmethod
    def from_checkpoint(
        cls, path: str | Path = DEFAULT_CHECKPOINT, torch_dtype: torch.dtype = torch.float32
    ) -> DigitsDiTPipeline:
        """Load a checkpoint folder written by ``train_digits_dit.py``.

        Args:
            path: Folder with ``transformer/`` (``DiTTransformer2DModel.save_pretrained``) and
                ``scheduler/`` (``DDIMScheduler.save_pretrained``) subfolders.
            torch_dtype: Compute dtype; weights stored in fp16 are upcast (fp32 by default).

        Returns:
            The pipeline, transformer in eval mode.
        """
        path = Path(path)
        transformer = DiTTransformer2DModel.from_pretrained(path / "transformer", torch_dtype=torch_dtype)
        transformer.eval()
        scheduler = DDIMScheduler.from_pretrained(path / "scheduler")
        return cls(transformer=transformer, scheduler=scheduler)

    def _sample_shape(self) -> tuple[int, ...]:
        """``(C, H, W)`` of the transformer: ``(1, 16, 16)``."""
        size = self.transformer.config.sample_size
        return (self.transformer.config.in_channels, size, size)

    def _sample(self, labels: torch.Tensor, latents: torch.Tensor, steps: int, scale: float) -> torch.Tensor:
        """DDIM from ``latents * init_noise_sigma``, one batched CFG call per step."""
        latents = latents * self.scheduler.init_noise_sigma
        labels_input = self._cfg_labels(labels, scale)
        device = self._execution_device

        def predict(model_input: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            model_input = self.scheduler.scale_model_input(model_input, t)
            timesteps = t.reshape(1).to(device).expand(model_input.shape[0])
            return self.transformer(model_input, timestep=timesteps, class_labels=labels_input).sample

        self.scheduler.set_timesteps(steps, device=device)
        return self._denoise(latents, scale, predict).float()

    def _step(self, prediction: torch.Tensor, t: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """One DDIM step (eta = 0)."""
        return self.scheduler.step(prediction, t, latents, eta=0.0).prev_sample
