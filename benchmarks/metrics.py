"""Image-quality metrics for the cache benchmarks.

- :func:`psnr` / :func:`psnr_per_image`: PSNR of each image pair on ``[0, 1]`` pixels, averaged over
  images (``inf`` for identical images).
- :func:`ssim`: torchmetrics' structural similarity, mean over images.
- :func:`frechet_distance` / :func:`frechet_distance_from_stats`: Frechet distance between the
  Gaussians fitted to two feature sets (the formula of FID), computed with symmetric eigen
  decompositions, which stay real and finite for singular covariances.
- :func:`sample_quality`: classifier accuracy of generated digits and their Frechet distance to
  real digits, in the features of :mod:`benchmarks.testbeds.digits_classifier`.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from benchmarks.testbeds.digits_classifier import DigitsClassifier

ArrayLike = torch.Tensor | np.ndarray


def _as_float_tensor(x: ArrayLike) -> torch.Tensor:
    return torch.as_tensor(x).detach().to("cpu", torch.float64)


def psnr_per_image(a: ArrayLike, b: ArrayLike, data_range: float = 1.0) -> torch.Tensor:
    """PSNR in dB of each image pair (first dimension = images), ``inf`` where the images are equal.

    Args:
        a: Images ``(N, ...)`` in ``[0, data_range]``.
        b: Images of the same shape.
        data_range: Peak value (1.0 for ``[0, 1]`` pixels).

    Returns:
        float64 tensor ``(N,)``.
    """
    a, b = _as_float_tensor(a), _as_float_tensor(b)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.ndim < 2:
        raise ValueError("expected a batch of images (N, ...)")
    mse = (a - b).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(data_range**2 / mse)  # mse == 0 -> +inf


def psnr(a: ArrayLike, b: ArrayLike, data_range: float = 1.0) -> float:
    """Mean over images of the per-image PSNR (dB); ``inf`` if any pair is identical.

    Per-image averaging (rather than the PSNR of the pooled MSE) is the convention of the cache
    papers this project compares with.
    """
    return float(psnr_per_image(a, b, data_range).mean())


def ssim(
    a: ArrayLike, b: ArrayLike, data_range: float = 1.0, kernel_size: int = 7, sigma: float = 1.5
) -> float:
    """Mean over images of torchmetrics' SSIM (Gaussian window).

    Args:
        a: Images ``(N, C, H, W)`` in ``[0, data_range]``.
        b: Images of the same shape.
        data_range: Peak value.
        kernel_size: Gaussian window side; 7 (instead of the usual 11) suits the 16x16 digits.
        sigma: Gaussian window standard deviation.
    """
    from torchmetrics.functional.image import structural_similarity_index_measure

    a, b = _as_float_tensor(a), _as_float_tensor(b)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {tuple(a.shape)} vs {tuple(b.shape)}")
    values = structural_similarity_index_measure(
        a, b, data_range=data_range, kernel_size=kernel_size, sigma=sigma, reduction="none"
    )
    return float(torch.as_tensor(values).mean())


def _sqrtm_psd(m: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite matrix (negative eigenvalues clipped)."""
    m = (m + m.T) / 2
    w, v = np.linalg.eigh(m)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance_from_stats(
    mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike
) -> float:
    """Frechet distance ``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))`` between two Gaussians.

    ``tr((S1 S2)^(1/2))`` is computed as ``tr((S1^(1/2) S2 S1^(1/2))^(1/2))``, whose argument is
    symmetric PSD, so the result is real even when the covariances are singular.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise ValueError("mean/covariance shapes differ")
    r1 = _sqrtm_psd(s1)
    inner = r1 @ s2 @ r1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0.0, None)).sum()
    diff = mu1 - mu2
    value = diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean
    return float(max(value, 0.0))


def gaussian_stats(feats: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of features ``(N, D)``, in float64."""
    f = np.asarray(_as_float_tensor(feats).numpy(), np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError("features must be (N >= 2, D)")
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(feats_a: ArrayLike, feats_b: ArrayLike) -> float:
    """Frechet distance between Gaussians fitted to two feature sets ``(N, D)`` and ``(M, D)``."""
    mu1, s1 = gaussian_stats(feats_a)
    mu2, s2 = gaussian_stats(feats_b)
    return frechet_distance_from_stats(mu1, s1, mu2, s2)


@functools.lru_cache(maxsize=4)
def _real_features(split: str) -> torch.Tensor:
    from benchmarks.testbeds.digits import load_digits_images
    from benchmarks.testbeds.digits_classifier import classify

    images, _ = load_digits_images(split)
    _, feats = classify((images + 1) / 2)
    return feats


def sample_quality(
    images: ArrayLike,
    labels: ArrayLike,
    classifier: DigitsClassifier | None = None,
    real_split: str = "test",
) -> dict[str, float]:
    """Classifier accuracy of generated digits and their Frechet distance to real digits.

    Args:
        images: Generated images ``(N, 1, 16, 16)`` in ``[0, 1]``.
        labels: Requested class of each image ``(N,)``.
        classifier: A :class:`~benchmarks.testbeds.digits_classifier.DigitsClassifier`; the
            committed one by default.
        real_split: Real digits to compare with: ``"test"`` (360 held out), ``"train"`` or ``"all"``.

    Returns:
        ``{"accuracy", "frechet_distance", "n"}``. The Frechet distance is in the classifier's
        64-d penultimate features; it is biased upwards for small ``N`` (compare runs with equal ``N``).
    """
    from benchmarks.testbeds.digits_classifier import classify

    labels_t = torch.as_tensor(labels).reshape(-1).long().cpu()
    logits, feats = classify(images, classifier)
    if logits.shape[0] != labels_t.shape[0]:
        raise ValueError("images and labels differ in length")
    acc = (logits.argmax(1) == labels_t).double().mean().item()
    real = (
        _real_features(real_split)
        if classifier is None
        else _classifier_real_features(classifier, real_split)
    )
    return {"accuracy": acc, "frechet_distance": frechet_distance(feats, real), "n": float(labels_t.shape[0])}


def _classifier_real_features(classifier: DigitsClassifier, split: str) -> torch.Tensor:
    from benchmarks.testbeds.digits import load_digits_images
    from benchmarks.testbeds.digits_classifier import classify

    images, _ = load_digits_images(split)
    return classify((images + 1) / 2, classifier)[1]
