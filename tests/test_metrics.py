"""Unit tests of benchmarks.metrics against closed-form values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from benchmarks.metrics import (
    frechet_distance,
    frechet_distance_from_stats,
    psnr,
    psnr_per_image,
    sample_quality,
    ssim,
)


def _images(seed: int = 0, n: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 16, 16, generator=g, dtype=torch.float64)


def test_identical_images_psnr_inf_ssim_one() -> None:
    x = _images()
    assert psnr(x, x) == math.inf
    assert torch.isinf(psnr_per_image(x, x)).all()
    assert ssim(x, x) == pytest.approx(1.0, abs=1e-6)


def test_constant_shift_psnr_is_analytic() -> None:
    # b = a + c with no clipping: MSE = c^2, so PSNR = 10 log10(1 / c^2) = -20 log10(c) dB.
    a = 0.5 * _images(1)
    for c in (0.1, 0.01, 0.03):
        expected = -20.0 * math.log10(c)
        assert psnr(a, a + c) == pytest.approx(expected, abs=1e-9)
        assert psnr(a + c, a) == pytest.approx(expected, abs=1e-9)


def test_psnr_averages_per_image() -> None:
    # Two images shifted by 0.1 (20 dB) and 0.01 (40 dB): per-image mean is 30 dB, not the pooled value.
    a = 0.5 * _images(2, n=2)
    b = a.clone()
    b[0] += 0.1
    b[1] += 0.01
    assert psnr(a, b) == pytest.approx(30.0, abs=1e-9)
    np.testing.assert_allclose(psnr_per_image(a, b).numpy(), [20.0, 40.0], atol=1e-9)


def test_ssim_drops_for_different_images() -> None:
    assert ssim(_images(3), _images(4)) < 0.5


def test_frechet_distance_diagonal_gaussians_analytic() -> None:
    # Commuting (diagonal) covariances: FD = |mu1 - mu2|^2 + sum_i (sqrt(s1_i) - sqrt(s2_i))^2.
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    s1, s2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    expected = 1.0 + 0.0 + 4.0 + (1.0 - 2.0) ** 2 + (2.0 - 1.0) ** 2 + 0.0
    assert frechet_distance_from_stats(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(
        expected, abs=1e-10
    )


def test_frechet_distance_general_matches_scipy_sqrtm() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 5)), rng.normal(size=(5, 5))
    s1, s2 = a @ a.T + 0.1 * np.eye(5), b @ b.T + 0.1 * np.eye(5)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    expected = float((mu1 - mu2) @ (mu1 - mu2) + np.trace(s1 + s2 - 2 * covmean))
    assert frechet_distance_from_stats(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)


def test_frechet_distance_singular_covariance_is_finite() -> None:
    # Rank-deficient covariances (e.g. dead ReLU features) stay real and finite.
    s = np.diag([1.0, 0.0, 0.0])
    assert frechet_distance_from_stats(np.zeros(3), s, np.zeros(3), s) == pytest.approx(0.0, abs=1e-12)
    assert frechet_distance_from_stats(np.zeros(3), s, np.ones(3), np.zeros((3, 3))) == pytest.approx(4.0)


def test_frechet_distance_of_samples() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2000, 4))
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-6)
    # Samples from N(0, I) and N(m, 4 I) in 4-d: FD = |m|^2 + 4 * (1 - 2)^2 = 4 + 4 = 8.
    y = rng.normal(size=(20000, 4))
    z = 1.0 + 2.0 * rng.normal(size=(20000, 4))
    assert frechet_distance(y, z) == pytest.approx(8.0, rel=0.05)


def test_sample_quality_on_real_digits() -> None:
    # Real held-out digits are classified almost perfectly and are close to the real train digits.
    from benchmarks.testbeds.digits import load_digits_images

    x, y = load_digits_images("test")
    q_test = sample_quality((x + 1) / 2, y, real_split="train")
    assert q_test["accuracy"] > 0.97
    noise = torch.rand(x.shape, generator=torch.Generator().manual_seed(0))
    q_noise = sample_quality(noise, y, real_split="train")
    assert q_noise["frechet_distance"] > 10 * q_test["frechet_distance"]
