"""Distances between two sets of network features (FID and KID), in NumPy float64.

FID (Heusel et al. 2017) is the Fréchet distance between Gaussians fitted to two feature sets,
    ||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)),
computed with symmetric eigendecompositions (exact, and fast for D = 2048; the same value as
pytorch-fid's sqrtm wherever that converges). KID (Binkowski et al. 2018) is the unbiased MMD^2
estimate with the cubic kernel k(x, y) = (x.y / d + 1)^3, averaged over random subsets; unlike
FID it is unbiased in the number of samples, so it stays comparable for small sample sizes.

Features are [N, D] arrays (D = 2048 for Inception pool3); statistics are saved as .npz with
keys `mu` [D] and `sigma` [D, D], the format of pytorch-fid's precomputed statistics.
"""

from __future__ import annotations

import pathlib

import numpy as np


def _features(x, name: str) -> np.ndarray:
  x = np.asarray(x, dtype=np.float64)
  if x.ndim != 2 or x.shape[0] < 2:
    raise ValueError(f'{name} must be features [N, D] with N >= 2, got shape {x.shape}.')
  if not np.isfinite(x).all():
    raise ValueError(f'{name} has non-finite values; check the images fed to the network.')
  return x


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
  """features [N, D] -> (mu [D], sigma [D, D]) float64; sigma is the N - 1 normalised covariance.

  FID needs N well above D for a full-rank sigma: the usual 50k samples for D = 2048.
  """
  x = _features(features, 'features')
  return x.mean(axis=0), np.cov(x, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2): mu [D], sigma [D, D]; >= 0.

    d^2 = |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2)).

  The last trace is the sum of the square roots of the eigenvalues of sigma1 sigma2, which
  equal those of the symmetric PSD matrix sigma1^(1/2) sigma2 sigma1^(1/2); two symmetric
  eigendecompositions give it exactly, also for singular covariances (fewer samples than
  feature dimensions), in seconds where a general matrix square root (scipy's sqrtm, as in
  pytorch-fid) takes minutes for D = 2048 on a small CPU. The two agree to float precision
  wherever sqrtm converges.
  """
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape or mu1.ndim != 1:
    raise ValueError(f'mu1 {mu1.shape} and mu2 {mu2.shape} must be vectors of the same length; '
                     'were both computed from features of the same network layer?')
  if sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
    raise ValueError(f'sigma1 {sigma1.shape} and sigma2 {sigma2.shape} must both be '
                     f'{mu1.shape * 2} to match mu.')
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * _trace_sqrt_product(
      sigma1, sigma2))


def _psd_sqrt(a: np.ndarray) -> np.ndarray:
  """The symmetric square root of a symmetric PSD matrix (round-off negatives set to 0)."""
  w, v = np.linalg.eigh((a + a.T) / 2)
  return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def _trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
  """tr((sigma1 sigma2)^(1/2)) for symmetric PSD sigma1, sigma2 [D, D]."""
  root = _psd_sqrt(sigma1)
  eig = np.linalg.eigvalsh(root @ sigma2 @ root)
  return float(np.sqrt(np.clip(eig, 0.0, None)).sum())


def _mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
  """Unbiased MMD^2 of equal-size samples x, y [m, d] under k(a, b) = (a.b / d + 1)^3."""
  m, d = x.shape
  k_xx = (x @ x.T / d + 1) ** 3
  k_yy = (y @ y.T / d + 1) ** 3
  k_xy = (x @ y.T / d + 1) ** 3
  # Within-sample sums leave out i == j: k(x_i, x_i) has a different expectation.
  within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
  return float(within - 2 * k_xy.mean())


def kid(features_a, features_b, *, num_subsets: int = 100, subset_size: int = 1000,
        rng: np.random.Generator | int) -> tuple[float, float]:
  """Kernel Inception Distance: (mean, std) of the unbiased MMD^2 over random subsets.

  features_a [N_a, D], features_b [N_b, D]. Each subset draws min(subset_size, N_a, N_b) rows of
  each set without replacement. The mean can be slightly negative when the sets match; papers
  usually report it x 1e3. rng: a np.random.Generator or a seed.
  """
  a, b = _features(features_a, 'features_a'), _features(features_b, 'features_b')
  if a.shape[1] != b.shape[1]:
    raise ValueError(f'features_a has D={a.shape[1]} but features_b has D={b.shape[1]}; '
                     'both must come from the same network layer.')
  if num_subsets < 1 or subset_size < 2:
    raise ValueError(f'kid needs num_subsets >= 1 and subset_size >= 2, got num_subsets='
                     f'{num_subsets}, subset_size={subset_size}.')
  rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
  m = min(subset_size, a.shape[0], b.shape[0])
  mmds = np.array([
      _mmd2_unbiased(a[rng.choice(a.shape[0], m, replace=False)],
                     b[rng.choice(b.shape[0], m, replace=False)])
      for _ in range(num_subsets)])
  return float(mmds.mean()), float(mmds.std())


def save_statistics(path: str | pathlib.Path, mu, sigma) -> None:
  """Writes mu [D] and sigma [D, D] (float64) to exactly `path` as an .npz."""
  mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
  if mu.ndim != 1 or sigma.shape != mu.shape * 2:
    raise ValueError(f'save_statistics wants mu [D] and sigma [D, D], got {mu.shape} and '
                     f'{sigma.shape}.')
  with open(path, 'wb') as f:  # a file object: np.savez would append '.npz' to a bare name
    np.savez(f, mu=mu, sigma=sigma)


def load_statistics(path: str | pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
  """(mu [D], sigma [D, D]) float64 from an .npz with keys `mu` and `sigma`.

  Works for files from `save_statistics` and for pytorch-fid's precomputed statistics.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f'No FID statistics at {path}; compute them from reference features '
                            'with feature_statistics and save_statistics.')
  try:
    z = np.load(path)
  except (OSError, ValueError) as e:
    raise ValueError(f'{path} is not an .npz of FID statistics ({e}).') from e
  if not isinstance(z, np.lib.npyio.NpzFile):
    raise ValueError(f'{path} is a single .npy array, not an .npz with keys "mu" and "sigma".')
  with z:
    if 'mu' not in z.files or 'sigma' not in z.files:
      raise ValueError(f'{path} holds {z.files}, not FID statistics with keys "mu" and "sigma".')
    mu, sigma = z['mu'].astype(np.float64), z['sigma'].astype(np.float64)
  if mu.ndim != 1 or sigma.shape != mu.shape * 2:
    raise ValueError(f'{path} has mu {mu.shape} and sigma {sigma.shape}, not [D] and [D, D].')
  return mu, sigma
