"""DDPM ancestral and DDIM sampling, one `lax.scan` core for both.

Every reverse step of either sampler has the same form:
    eps_hat = eps_fn(x_t, t)
    x0_hat  = (x_t - sqrt(1 - abar_t) eps_hat) / sqrt(abar_t), optionally clipped to [-1, 1]
    x_prev  = c_x0 * x0_hat + c_xt * x_t + sigma * z,   z ~ N(0, I)
so a sampler is just its table of (t, c_x0, c_xt, sigma), built here in NumPy float64:
  * DDPM: c_x0, c_xt are the posterior-mean coefficients of q(x_{t-1} | x_t, x_0) and sigma^2 is
    the posterior variance ('small') or beta_t ('large'), with no noise at t = 0.
  * DDIM: x_prev = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma^2) eps_hat + sigma z with
    sigma = eta * sqrt((1 - abar_prev) / (1 - abar_t)) * sqrt(1 - abar_t / abar_prev), where
    eps_hat is re-expressed through x0_hat and x_t (so clipping x0 keeps the step consistent).
With S = T and eta = 1 DDIM's table equals DDPM 'small'.

Samplers see the network only as `eps_fn(x_t, t) -> eps_hat` (t int32 [B]).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import diffusion
from diffusion_jax.schedules import Schedule

Array = jnp.ndarray
EpsFn = Callable[[Array, Array], Array]


class ReverseSteps(NamedTuple):
  """The table of a reverse chain, in the order it runs (t decreasing); each [S]."""
  t: np.ndarray  # int32 timesteps
  coef_x0: np.ndarray
  coef_xt: np.ndarray
  sigma: np.ndarray


def _np(schedule: Schedule, name: str) -> np.ndarray:
  return np.asarray(getattr(schedule, name), dtype=np.float64)


def ddpm_steps(schedule: Schedule, variance: str = 'small') -> ReverseSteps:
  """All T ancestral steps. variance: 'small' (posterior beta~_t) or 'large' (beta_t)."""
  if variance == 'small':
    var = _np(schedule, 'posterior_variance')
  elif variance == 'large':
    var = _np(schedule, 'betas').copy()
  else:
    raise ValueError(f"sampling.variance={variance!r} is unknown; choose 'small' or 'large'.")
  var[0] = 0.0  # the last step returns the posterior mean
  t = np.arange(schedule.num_timesteps)[::-1]
  return ReverseSteps(t.astype(np.int32), _np(schedule, 'posterior_mean_coef1')[t],
                      _np(schedule, 'posterior_mean_coef2')[t], np.sqrt(var[t]))


def ddim_timesteps(num_timesteps: int, num_steps: int, spacing: str = 'uniform') -> np.ndarray:
  """The DDIM paper's timestep subsequence, increasing: uniform i * (T // S), or quadratic."""
  if not 1 <= num_steps <= num_timesteps:
    raise ValueError(f'sampling.num_steps={num_steps} must lie in [1, {num_timesteps}] '
                     '(diffusion.num_timesteps).')
  if spacing == 'uniform':
    return np.arange(num_steps) * (num_timesteps // num_steps)
  if spacing == 'quadratic':
    # The paper's sequence repeats its first timesteps when S is large; a repeated timestep is
    # a no-op step (abar_prev = abar), so the repeats are dropped: fewer network calls, the
    # same samples.
    return np.unique((np.linspace(0, np.sqrt(num_timesteps * 0.8), num_steps) ** 2)
                     .astype(np.int64))
  raise ValueError(f"sampling.spacing={spacing!r} is unknown; choose 'uniform' or 'quadratic'.")


def ddim_steps(schedule: Schedule, num_steps: int, eta: float = 0.0,
               spacing: str = 'uniform') -> ReverseSteps:
  """S DDIM steps with stochasticity eta (0: deterministic DDIM, 1: DDPM-like)."""
  seq = ddim_timesteps(schedule.num_timesteps, num_steps, spacing)
  abar_all = _np(schedule, 'alphas_cumprod')
  abar = abar_all[seq]
  abar_prev = np.concatenate([[1.0], abar_all[seq[:-1]]])  # abar = 1 before the first step
  sigma = eta * np.sqrt((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev))
  c_eps = np.sqrt(np.maximum(1 - abar_prev - sigma ** 2, 0.0))
  # eps_hat = (x_t - sqrt(abar) x0_hat) / sqrt(1 - abar), folded into the x0 and x_t terms.
  coef_xt = c_eps / np.sqrt(1 - abar)
  coef_x0 = np.sqrt(abar_prev) - coef_xt * np.sqrt(abar)
  r = slice(None, None, -1)
  return ReverseSteps(seq[r].astype(np.int32), coef_x0[r], coef_xt[r], sigma[r])


def run_reverse(eps_fn: EpsFn, schedule: Schedule, steps: ReverseSteps, x_T: Array, rng: Array,
                *, clip_x0: bool | float = True, return_trajectory: bool = False):
  """Runs a reverse chain as one lax.scan.

  Args:
    x_T: the starting noise [B, ...].
    clip_x0: clip each x0_hat to [-1, 1] (True, for images in [-1, 1]), to [-c, c] (a number
      c, e.g. for 2-D data in their own coordinates), or not at all (False / 0).
  Returns:
    x_0 [B, ...], or (x_0, trajectory [S + 1, B, ...] from x_T to x_0) when asked.
  """
  dtype = x_T.dtype
  table = tuple(jnp.asarray(a, jnp.float32 if a.dtype.kind == 'f' else jnp.int32)
                for a in steps)
  batch = x_T.shape[0]

  def step(x, inputs):
    i, t, c_x0, c_xt, sigma = inputs
    t_vec = jnp.full((batch,), t, jnp.int32)
    eps = eps_fn(x, t_vec).astype(jnp.float32)
    x0 = diffusion.x0_from_eps(schedule, x, t_vec, eps)
    if clip_x0:
      bound = 1.0 if clip_x0 is True else float(clip_x0)
      x0 = jnp.clip(x0, -bound, bound)
    z = jax.random.normal(jax.random.fold_in(rng, i), x.shape, jnp.float32)
    x = (c_x0 * x0 + c_xt * x + sigma * z).astype(dtype)
    return x, (x if return_trajectory else None)

  x0, traj = jax.lax.scan(step, x_T, (jnp.arange(len(steps.t)),) + table)
  if return_trajectory:
    return x0, jnp.concatenate([x_T[None], traj], axis=0)
  return x0


def ddpm_sample(eps_fn: EpsFn, schedule: Schedule, x_T: Array, rng: Array, *,
                clip_x0: bool | float = True, variance: str = 'small',
                return_trajectory: bool = False):
  """Ancestral sampling over all T steps (Ho et al. 2020, Algorithm 2)."""
  return run_reverse(eps_fn, schedule, ddpm_steps(schedule, variance), x_T, rng,
                     clip_x0=clip_x0, return_trajectory=return_trajectory)


def ddim_sample(eps_fn: EpsFn, schedule: Schedule, x_T: Array, rng: Array, *, num_steps: int,
                eta: float = 0.0, spacing: str = 'uniform', clip_x0: bool | float = True,
                return_trajectory: bool = False):
  """DDIM (Song et al. 2020) over `num_steps` timesteps; eta=0 is deterministic given x_T."""
  return run_reverse(eps_fn, schedule, ddim_steps(schedule, num_steps, eta, spacing), x_T, rng,
                     clip_x0=clip_x0, return_trajectory=return_trajectory)
