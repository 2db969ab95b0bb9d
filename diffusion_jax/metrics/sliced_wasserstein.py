"""The sliced Wasserstein distance between two point sets, in NumPy float64.

SW_2(a, b) = sqrt(mean over unit directions u of W_2(u.a, u.b)^2), where the 1-D W_2 between
two equally large samples is the root mean square of their sorted differences. It is a true
distance between distributions, cheap in any dimension, and sensitive to the shape of 2-D data
(a Swiss roll drawn too thin or with its arms joined scores badly), so it judges the toy runs.
"""

from __future__ import annotations

import numpy as np


def directions(dim: int, num: int, rng: np.random.Generator | int = 0) -> np.ndarray:
  """`num` unit vectors [num, dim]: evenly spaced angles in [0, pi) for dim = 2 (exact and
  repeatable), uniformly random otherwise."""
  if dim == 2:
    angle = np.arange(num) * np.pi / num
    return np.stack([np.cos(angle), np.sin(angle)], axis=1)
  rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
  u = rng.standard_normal((num, dim))
  return u / np.linalg.norm(u, axis=1, keepdims=True)


def sliced_wasserstein(a: np.ndarray, b: np.ndarray, num_directions: int = 256,
                       rng: np.random.Generator | int = 0) -> float:
  """SW_2 between point sets a [N, D] and b [N, D] (the same N)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.ndim != 2 or a.shape != b.shape:
    raise ValueError(f'sliced_wasserstein needs two point sets of the same shape [N, D], got '
                     f'{a.shape} and {b.shape}.')
  if not (np.isfinite(a).all() and np.isfinite(b).all()):
    raise ValueError('sliced_wasserstein: the points are not all finite.')
  u = directions(a.shape[1], num_directions, rng)
  pa, pb = np.sort(a @ u.T, axis=0), np.sort(b @ u.T, axis=0)
  return float(np.sqrt(np.mean((pa - pb) ** 2)))
