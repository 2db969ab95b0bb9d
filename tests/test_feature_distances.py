"""Tests for FID / KID: closed forms, the unbiased MMD^2 formula, and the statistics files."""

from __future__ import annotations

import numpy as np
import pytest

from diffusion_jax.metrics.feature_distances import (feature_statistics, frechet_distance, kid,
                                                     load_statistics, save_statistics)


def _random_spd(rng: np.random.Generator, d: int) -> np.ndarray:
  a = rng.normal(size=(d, d))
  return a @ a.T / d + 0.1 * np.eye(d)


def test_frechet_distance_diagonal_closed_form():
  rng = np.random.default_rng(0)
  d = 6
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  s1, s2 = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
  expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
  assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_commuting_closed_form():
  # Same eigenvectors, different eigenvalues: sqrt(s1 s2) = Q diag(sqrt(a b)) Q^T.
  rng = np.random.default_rng(1)
  d = 5
  q, _ = np.linalg.qr(rng.normal(size=(d, d)))
  a, b = rng.uniform(0.2, 2.0, d), rng.uniform(0.2, 2.0, d)
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  got = frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
  expected = np.sum((mu1 - mu2) ** 2) + np.sum(a + b - 2 * np.sqrt(a * b))
  assert got == pytest.approx(expected, rel=1e-8)


def test_frechet_distance_zero_for_identical_and_symmetric():
  rng = np.random.default_rng(2)
  d = 8
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
  assert abs(frechet_distance(mu1, s1, mu1, s1)) < 1e-8
  forward, backward = frechet_distance(mu1, s1, mu2, s2), frechet_distance(mu2, s2, mu1, s1)
  assert forward > 0
  assert forward == pytest.approx(backward, rel=1e-8)


def test_frechet_distance_equals_pytorch_fids_sqrtm_formula():
  """General (non-commuting) full-rank covariances: the value pytorch-fid computes with sqrtm."""
  from scipy import linalg  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(4)
  x, y = rng.normal(size=(200, 16)), rng.normal(size=(200, 16)) @ rng.normal(size=(16, 16)) + 0.5
  mu1, s1 = feature_statistics(x)
  mu2, s2 = feature_statistics(y)
  covmean = linalg.sqrtm(s1 @ s2).real
  want = (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
  assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-9)


def test_frechet_distance_rank_deficient_covariances_stay_finite():
  # Fewer samples than dimensions, as with a small eval run: both covariances are singular.
  rng = np.random.default_rng(3)
  x, y = rng.normal(size=(5, 12)), rng.normal(size=(5, 12)) + 1.0
  with np.errstate(all='ignore'):
    value = frechet_distance(*feature_statistics(x), *feature_statistics(y))
  assert np.isfinite(value) and value > 0


def test_frechet_distance_rejects_mismatched_shapes():
  with pytest.raises(ValueError, match='same length'):
    frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_feature_statistics_matches_numpy():
  x = np.random.default_rng(4).normal(size=(50, 3)).astype(np.float32)
  mu, sigma = feature_statistics(x)
  assert mu.dtype == sigma.dtype == np.float64
  np.testing.assert_allclose(mu, x.mean(0), rtol=1e-6)
  np.testing.assert_allclose(sigma, np.cov(x.T.astype(np.float64)), rtol=1e-10)
  with pytest.raises(ValueError, match='N >= 2'):
    feature_statistics(x[:1])


def _mmd2_unbiased_loops(x: np.ndarray, y: np.ndarray) -> float:
  """The textbook U-statistic, one kernel evaluation at a time."""
  m, d = x.shape
  k = lambda a, b: (a @ b / d + 1.0) ** 3  # noqa: E731
  xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
  yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
  xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
  return xx + yy - 2 * xy


def test_kid_single_full_subset_equals_direct_formula():
  rng = np.random.default_rng(5)
  x, y = rng.normal(size=(15, 4)), rng.normal(size=(15, 4)) * 1.5 + 0.3
  # One subset of all points is a permutation of each set; the U-statistic ignores order.
  mean, std = kid(x, y, num_subsets=1, subset_size=1000, rng=0)
  assert mean == pytest.approx(_mmd2_unbiased_loops(x, y), rel=1e-10)
  assert std == 0.0


def test_kid_near_zero_for_same_distribution_and_positive_when_shifted():
  rng = np.random.default_rng(6)
  a, b = rng.normal(size=(400, 16)), rng.normal(size=(400, 16))
  shifted = rng.normal(size=(400, 16)) + 0.5
  same_mean, same_std = kid(a, b, num_subsets=20, subset_size=200, rng=1)
  shift_mean, shift_std = kid(a, shifted, num_subsets=20, subset_size=200, rng=1)
  assert abs(same_mean) < 0.05
  assert shift_mean > 0.5 and shift_mean > 20 * abs(same_mean)
  assert same_std >= 0 and shift_std >= 0


def test_kid_clamps_subset_size_and_is_reproducible():
  rng = np.random.default_rng(7)
  a, b = rng.normal(size=(30, 5)), rng.normal(size=(12, 5))
  first = kid(a, b, num_subsets=3, subset_size=1000, rng=np.random.default_rng(9))
  assert first == kid(a, b, num_subsets=3, subset_size=1000, rng=np.random.default_rng(9))
  with pytest.raises(ValueError, match='same network layer'):
    kid(a, rng.normal(size=(12, 6)), rng=0)


def test_statistics_round_trip(tmp_path):
  rng = np.random.default_rng(8)
  mu, sigma = rng.normal(size=4), _random_spd(rng, 4)
  path = tmp_path / 'ref_stats'  # no suffix: must be written to exactly this name
  save_statistics(path, mu, sigma)
  mu2, sigma2 = load_statistics(path)
  np.testing.assert_array_equal(mu, mu2)
  np.testing.assert_array_equal(sigma, sigma2)


def test_load_statistics_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match='feature_statistics'):
    load_statistics(tmp_path / 'missing.npz')
  wrong = tmp_path / 'wrong.npz'
  np.savez(wrong, mean=np.zeros(3))
  with pytest.raises(ValueError, match='"mu" and "sigma"'):
    load_statistics(wrong)
