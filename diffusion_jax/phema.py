"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion
Models", EDM2, Appendix C): power-function averages of the parameters, and the least-squares
reconstruction of an average of any width from snapshots of two of them.

A power-function average of the parameter trajectory theta(1), theta(2), ... weights step tau
by tau^gamma; it is tracked with

    avg(t) = beta(t) avg(t - 1) + (1 - beta(t)) theta(t),   beta(t) = (1 - 1/t)^(gamma + 1),

which gives theta(tau) the weight (tau^(gamma+1) - (tau-1)^(gamma+1)) / t^(gamma+1), close to
(gamma + 1) tau^gamma / t^(gamma+1). Its width relative to t is
sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))), and gamma is the largest real root of
gamma^3 + 7 gamma^2 + (16 - sigma_rel^-2) gamma + (12 - sigma_rel^-2).

A snapshot of profile gamma_i at step t_i has the weight profile p_i(tau) = (gamma_i + 1)
tau^gamma_i / t_i^(gamma_i + 1) on [0, t_i]; the inner product of two profiles is
<p_a, p_b> = (g_a + 1)(g_b + 1) (t_a / t_b)^e / ((g_a + g_b + 1) max(t_a, t_b)), e = g_b if
t_a < t_b else -g_a. The average of a target (sigma_rel, t) is sum_i w_i snapshot_i with
w = A^-1 b, A_ij = <p_i, p_j>, b_i = <p_i, p_target>: the least-squares fit in profile space,
scaled so that the weights sum to 1 (as EDM2's implementation does).

Tracking is a pair of pure functions (`init`, `update`) like an optax transformation, so the
train step carries the averages in its state; everything else is NumPy float64.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np


MAX_SIGMA_REL = 0.3  # the widest power-function average: sigma_rel = 0.3003 at gamma = -0.38


def sigma_rel_to_gamma(sigma_rel: float) -> float:
  """The exponent gamma of the power function whose relative width is sigma_rel (EDM2 eq. 126)."""
  if not 0.0 < sigma_rel <= MAX_SIGMA_REL:
    raise ValueError(f'sigma_rel={sigma_rel} must lie in (0, {MAX_SIGMA_REL}]: no power-function '
                     'average is wider (EDM2 uses 0.05 and 0.10 for training, 0.02-0.25 after).')
  s = float(sigma_rel) ** -2
  return float(np.roots([1.0, 7.0, 16.0 - s, 12.0 - s]).real.max())


def gamma_to_sigma_rel(gamma: float) -> float:
  """The relative width of the power function tau^gamma (EDM2 eq. 123)."""
  gamma = float(gamma)
  return float(np.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3))))


def one_minus_beta(gamma: float, step, dtype=jnp.float32) -> Any:
  """1 - beta(t) at training step `step` (1-based: the step just taken), beta = (1 - 1/t)^(gamma+1),
  as -expm1((gamma + 1) log1p(-1/t)): in float32 the plain formula loses 1 - 1/t to rounding,
  which biases the weight of the newest parameters by ~t * 6e-8 (0.6% at step 100,000)."""
  t = jnp.asarray(step, dtype)
  return -jnp.expm1((gamma + 1.0) * jnp.log1p(-1.0 / t))


class PowerEMA(NamedTuple):
  """Power-function averages of a parameter tree, one per gamma, as pure functions.

  Each average is a tree shaped like the parameters, so it is laid out over devices as they are
  (split over the mesh's 'fsdp' axis, `parallel.state_shardings`). Checkpoints written before
  kept each average as one flat vector (`unflatten` reads them).
  """
  gammas: tuple

  def init(self, params) -> tuple:
    """One copy of `params` per profile (the first update overwrites them: beta(1) = 0)."""
    return tuple(jax.tree.map(jnp.copy, params) for _ in self.gammas)

  def update(self, averages: tuple, params, step) -> tuple:
    """The averages after training step `step` (1-based), whose parameters are `params`."""
    def one(avg, gamma):
      def leaf(a, p):
        return (a + one_minus_beta(gamma, step, a.dtype) * (p.astype(a.dtype) - a)).astype(a.dtype)
      return jax.tree.map(leaf, avg, params)
    return tuple(one(a, g) for a, g in zip(averages, self.gammas))


def unflatten(flat: jnp.ndarray, like) -> Any:
  """A flat average (the parameters' leaves raveled and concatenated in tree order, the layout
  of older checkpoints) as a tree shaped like the parameter tree `like` (arrays or structs)."""
  leaves, treedef = jax.tree.flatten(like)
  bounds = np.cumsum([int(np.prod(x.shape)) for x in leaves])[:-1]
  parts = jnp.split(flat, bounds) if len(leaves) > 1 else [flat]
  return jax.tree.unflatten(treedef, [p.reshape(x.shape) for p, x in zip(parts, leaves)])


def power_ema(sigma_rels: Sequence[float]) -> PowerEMA:
  return PowerEMA(tuple(sigma_rel_to_gamma(s) for s in sigma_rels))


def profile_inner_products(t_a, g_a, t_b, g_b) -> np.ndarray:
  """<p_a, p_b> for arrays of snapshot steps t and exponents g (broadcast), float64."""
  t_a, g_a, t_b, g_b = (np.asarray(x, np.float64) for x in (t_a, g_a, t_b, g_b))
  e = np.where(t_a < t_b, g_b, -g_a)
  return ((g_a + 1) * (g_b + 1) * (t_a / t_b) ** e
          / ((g_a + g_b + 1) * np.maximum(t_a, t_b)))


def reconstruction_weights(steps: Sequence[int], gammas: Sequence[float], target_sigma_rel: float,
                           target_step: int) -> np.ndarray:
  """Weights [n] of the snapshots (steps[i], gammas[i]) whose sum best matches the power-function
  average of width target_sigma_rel at target_step; they sum to 1."""
  t = np.asarray(steps, np.float64)
  g = np.asarray(gammas, np.float64)
  if t.shape != g.shape or t.ndim != 1 or not len(t):
    raise ValueError('reconstruction needs at least one snapshot (steps and gammas, same length).')
  g_target = sigma_rel_to_gamma(target_sigma_rel)
  a = profile_inner_products(t[:, None], g[:, None], t[None, :], g[None, :])
  b = profile_inner_products(t, g, float(target_step), g_target)
  w = np.linalg.lstsq(a, b, rcond=None)[0]
  return w / w.sum()
