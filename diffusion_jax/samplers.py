"""Sampling as one `lax.scan` over a sampler's table: DDPM, DDIM, DPM-Solver++ and UniPC.

The tables, and the scheme every row follows, are in `step_tables` (NumPy float64); the
timestep spacings are in `timesteps`. `run_reverse` is the only loop: per row one network call,
the x0 prediction D (optionally clipped), the multistep history of D and the corrector's anchor
carried in the scan state. What a table never uses (a corrector, a history longer than one,
noise) is left out of the compiled step, so DDIM costs what it did before the solvers came.

Samplers see the network only as `eps_fn(x_t, t) -> eps_hat` (t int32 [B]).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import diffusion, step_tables
from diffusion_jax.schedules import Schedule
from diffusion_jax.step_tables import ReverseSteps

Array = jnp.ndarray
EpsFn = Callable[[Array, Array], Array]


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
  dtype, batch = x_T.dtype, x_T.shape[0]
  compute = jnp.promote_types(dtype, jnp.float32)  # float32, or float64 for float64 inputs
  # Only the history slots some row reads, and the corrector and noise only if some row uses them.
  used = np.flatnonzero(np.any(steps.coef_x0 != 0, 0) | np.any(steps.corr_d != 0, 0))
  k = int(used.max()) + 1 if used.size else 1
  corrects = bool(np.any(steps.corr_x != 1) or np.any(steps.corr_prev != 0) or
                  np.any(steps.corr_d != 0))
  noisy = bool(np.any(steps.sigma != 0))
  real = lambda a: jnp.asarray(a, compute)
  rows = (jnp.arange(steps.num_calls), jnp.asarray(steps.t, jnp.int32), real(steps.corr_x),
          real(steps.corr_prev), real(steps.corr_d[:, :k]), real(steps.coef_xt),
          real(steps.coef_x0[:, :k]), real(steps.sigma))

  def combine(coefs, hist):  # sum_j coefs[j] * hist[j]
    return jnp.tensordot(coefs, hist, axes=1)

  def step(carry, row):
    x, anchor, hist = carry
    i, t, corr_x, corr_prev, corr_d, coef_xt, coef_x0, sigma = row
    t_vec = jnp.full((batch,), t, jnp.int32)
    eps = eps_fn(x, t_vec).astype(compute)
    x0 = diffusion.x0_from_eps(schedule, x.astype(compute), t_vec, eps)
    if clip_x0:
      bound = 1.0 if clip_x0 is True else float(clip_x0)
      x0 = jnp.clip(x0, -bound, bound)
    hist = jnp.concatenate([x0[None], hist[:-1]]) if k > 1 else x0[None]
    if corrects:
      anchor = corr_x * x + corr_prev * anchor + combine(corr_d, hist)
    else:
      anchor = x.astype(compute)
    new = coef_xt * anchor + combine(coef_x0, hist)
    if noisy:
      new = new + sigma * jax.random.normal(jax.random.fold_in(rng, i), x.shape, compute)
    new = new.astype(dtype)
    return (new, anchor, hist), (new if return_trajectory else None)

  init = (x_T, x_T.astype(compute), jnp.zeros((k,) + x_T.shape, compute))
  (x0, _, _), traj = jax.lax.scan(step, init, rows)
  if return_trajectory:
    return x0, jnp.concatenate([x_T[None], traj], axis=0)
  return x0


def ddpm_sample(eps_fn: EpsFn, schedule: Schedule, x_T: Array, rng: Array, *,
                clip_x0: bool | float = True, variance: str = 'small',
                return_trajectory: bool = False):
  """Ancestral sampling over all T steps (Ho et al. 2020, Algorithm 2)."""
  return run_reverse(eps_fn, schedule, step_tables.ddpm_steps(schedule, variance), x_T, rng,
                     clip_x0=clip_x0, return_trajectory=return_trajectory)


def ddim_sample(eps_fn: EpsFn, schedule: Schedule, x_T: Array, rng: Array, *, num_steps: int,
                eta: float = 0.0, spacing: str = 'leading', clip_x0: bool | float = True,
                return_trajectory: bool = False):
  """DDIM (Song et al. 2020) over `num_steps` timesteps; eta=0 is deterministic given x_T."""
  steps = step_tables.ddim_steps(schedule, num_steps, eta, spacing)
  return run_reverse(eps_fn, schedule, steps, x_T, rng, clip_x0=clip_x0,
                     return_trajectory=return_trajectory)


def dpm_solver_pp_sample(eps_fn: EpsFn, schedule: Schedule, x_T: Array, rng: Array, *,
                         num_steps: int, order: int = 2, spacing: str = 'linspace',
                         stochastic: bool = False, clip_x0: bool | float = True,
                         return_trajectory: bool = False):
  """DPM-Solver++ (Lu et al. 2022) multistep of `order` 1-3 in `num_steps` network calls;
  `stochastic` runs its SDE form (DPM-Solver++(2M) SDE at order 2), which draws noise from rng."""
  steps = step_tables.dpm_solver_pp_steps(schedule, num_steps, order, spacing, stochastic)
  return run_reverse(eps_fn, schedule, steps, x_T, rng, clip_x0=clip_x0,
                     return_trajectory=return_trajectory)


def unipc_sample(eps_fn: EpsFn, schedule: Schedule, x_T: Array, rng: Array, *, num_steps: int,
                 order: int = 2, spacing: str = 'linspace', clip_x0: bool | float = True,
                 return_trajectory: bool = False):
  """UniPC (Zhao et al. 2023; B(h) = e^h - 1) of `order` 1-3 in `num_steps` network calls;
  deterministic given x_T (rng is not used)."""
  steps = step_tables.unipc_steps(schedule, num_steps, order, spacing)
  return run_reverse(eps_fn, schedule, steps, x_T, rng, clip_x0=clip_x0,
                     return_trajectory=return_trajectory)
