"""Sampling as one `lax.scan` over a sampler's table: every sampler on every process.

The tables, and the scheme every row follows, are in `step_tables` (NumPy float64); the
time grids are in `timesteps`. `run_reverse` is the only loop: per row one network call,
the data prediction D (optionally clipped), the multistep history of D and the corrector's anchor
carried in the scan state. What a table never uses (a corrector, a history longer than one,
noise) is left out of the compiled step, so DDIM costs what it did before the solvers came.

`run_reverse` and `sample` see the network only as `denoise_fn(x_t, t) -> D` (t: the process
time, float [B]; `diffusion.denoiser` builds it from a network of any prediction type), or as
`denoise_fn(x_t, t, t_end)` for a network trained for steps (MeanFlow), told each row's end. The
`*_sample` functions of the discrete chain take a noise predictor `eps_fn(x_t, t)` with t int32
[B] and a Schedule, as they always have.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import diffusion, processes, step_tables
from diffusion_jax.schedules import Schedule
from diffusion_jax.step_tables import ReverseSteps

Array = jnp.ndarray
EpsFn = Callable[[Array, Array], Array]
DenoiseFn = Callable[[Array, Array], Array]


def run_reverse(denoise_fn: DenoiseFn, steps: ReverseSteps, x_T: Array, rng: Array,
                *, clip_x0: bool | float = True, return_trajectory: bool = False,
                x_start: Array | None = None, known: tuple[Array, Array] | None = None,
                row_ends: np.ndarray | None = None):
  """Runs a reverse chain as one lax.scan.

  Args:
    denoise_fn: (x_t [B, ...], t float [B]) -> the data prediction D [B, ...].
    x_T: standard normal noise [B, ...]; the chain starts at steps.init_scale x_T.
    clip_x0: clip each x0_hat to [-1, 1] (True, for images in [-1, 1]), to [-c, c] (a number
      c, e.g. for 2-D data in their own coordinates), or not at all (False / 0).
    x_start: where the chain starts instead [B, ...] (image-to-image: an image noised to the
      level of the table's first time, `editing.noised`).
    known: inpainting, (image [B, ...], keep [B, ...] or broadcastable, 1 where the pixel is
      known): after every row x <- keep (alpha' image + sigma' z) + (1 - keep) x at the row's
      output level, then RePaint's forward jump where the table has one. The table must come
      from `editing.for_inpainting`.
    row_ends: for a network that is told where its step ends (MeanFlow's average velocity),
      the time each row steps to, float [S] (`row_ends`): the network is called as
      `denoise_fn(x_t, t, t_end)`. None: `denoise_fn(x_t, t)`.
  Returns:
    x_0 [B, ...], or (x_0, trajectory [S + 1, B, ...] from the start to x_0) when asked.
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
  rows = (jnp.arange(steps.num_calls), real(steps.t), real(steps.corr_x),
          real(steps.corr_prev), real(steps.corr_d[:, :k]), real(steps.coef_xt),
          real(steps.coef_x0[:, :k]), real(steps.sigma))
  if row_ends is not None:
    rows += (real(row_ends),)
  if known is not None:
    if steps.alpha_next is None:
      raise ValueError('inpainting needs the table of editing.for_inpainting.')
    image, keep = (jnp.asarray(a, compute) for a in known)
    rows += (real(steps.alpha_next), real(steps.sigma_next), real(steps.renoise_scale),
             real(steps.renoise_sigma))
    renoises = bool(np.any(steps.renoise_sigma != 0) or np.any(steps.renoise_scale != 1))

  def combine(coefs, hist):  # sum_j coefs[j] * hist[j]
    return jnp.tensordot(coefs, hist, axes=1)

  def step(carry, row):
    x, anchor, hist = carry
    i, t, corr_x, corr_prev, corr_d, coef_xt, coef_x0, sigma = row[:8]
    end = () if row_ends is None else (jnp.full((batch,), row[8], compute),)
    x0 = denoise_fn(x, jnp.full((batch,), t, compute), *end).astype(compute)
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
    if known is not None:
      alpha_next, sigma_next, renoise_scale, renoise_sigma = row[-4:]
      draw = lambda j: jax.random.normal(jax.random.fold_in(jax.random.fold_in(rng, i), j),
                                         x.shape, compute)
      new = keep * (alpha_next * image + sigma_next * draw(1)) + (1.0 - keep) * new
      if renoises:
        new = renoise_scale * new + renoise_sigma * draw(2)
    new = new.astype(dtype)
    return (new, anchor, hist), (new if return_trajectory else None)

  if x_start is not None:
    x_T = x_start.astype(dtype)
  elif steps.init_scale != 1.0:
    x_T = (x_T * steps.init_scale).astype(dtype)
  init = (x_T, x_T.astype(compute), jnp.zeros((k,) + x_T.shape, compute))
  (x0, _, _), traj = jax.lax.scan(step, init, rows)
  if return_trajectory:
    return x0, jnp.concatenate([x_T[None], traj], axis=0)
  return x0


def row_ends(steps: ReverseSteps, process) -> np.ndarray:
  """The time each row of a one-call-per-step table (ddim, euler; inpainting: the level of its
  blend) steps to, float64 [S], 0 (the data) after the last: what a network trained for steps
  is told (MeanFlow: that Euler row with u(x_t, t_end, t) is its trained update)."""
  if steps.alpha_next is None:
    return np.append(steps.t[1:], 0.0)
  noisy = steps.sigma_next > 0
  lam = 2.0 * np.log(steps.alpha_next / np.where(noisy, steps.sigma_next, 1.0))
  return np.where(noisy, processes.as_process(process).t_of_logsnr(lam), 0.0)


def sample(denoise_fn: DenoiseFn, process: processes.Process, x_T: Array, rng: Array, *,
           sampler: str, clip_x0: bool | float = True, return_trajectory: bool = False,
           **settings):
  """Any sampler (`step_tables.SAMPLERS`) on any process: `settings` are those of
  `step_tables.build` (num_steps, eta, order, spacing, stochastic, shift, s_churn, ...)."""
  steps = step_tables.build(sampler, process, **settings)
  return run_reverse(denoise_fn, steps, x_T, rng, clip_x0=clip_x0,
                     return_trajectory=return_trajectory)


def _eps_sample(eps_fn: EpsFn, schedule: Schedule, x_T: Array, rng: Array, sampler: str, *,
                clip_x0, return_trajectory, **settings):
  """`sample` on the ddpm process of `schedule`, with a noise predictor of integer timesteps."""
  process = processes.DDPM(schedule)
  denoise_fn = diffusion.denoiser(lambda x, t: eps_fn(x, t.astype(jnp.int32)), process, 'eps')
  return sample(denoise_fn, process, x_T, rng, sampler=sampler, clip_x0=clip_x0,
                return_trajectory=return_trajectory, **settings)


def ddpm_sample(eps_fn: EpsFn, schedule: Schedule, x_T: Array, rng: Array, *,
                clip_x0: bool | float = True, variance: str = 'small',
                return_trajectory: bool = False):
  """Ancestral sampling over all T steps (Ho et al. 2020, Algorithm 2)."""
  return _eps_sample(eps_fn, schedule, x_T, rng, 'ddpm', num_steps=schedule.num_timesteps,
                     variance=variance, clip_x0=clip_x0, return_trajectory=return_trajectory)


def ddim_sample(eps_fn: EpsFn, schedule: Schedule, x_T: Array, rng: Array, *, num_steps: int,
                eta: float = 0.0, spacing: str = 'leading', clip_x0: bool | float = True,
                return_trajectory: bool = False):
  """DDIM (Song et al. 2020) over `num_steps` timesteps; eta=0 is deterministic given x_T."""
  return _eps_sample(eps_fn, schedule, x_T, rng, 'ddim', num_steps=num_steps, eta=eta,
                     spacing=spacing, clip_x0=clip_x0, return_trajectory=return_trajectory)


def dpm_solver_pp_sample(eps_fn: EpsFn, schedule: Schedule, x_T: Array, rng: Array, *,
                         num_steps: int, order: int = 2, spacing: str = 'linspace',
                         stochastic: bool = False, clip_x0: bool | float = True,
                         return_trajectory: bool = False):
  """DPM-Solver++ (Lu et al. 2022) multistep of `order` 1-3 in `num_steps` network calls;
  `stochastic` runs its SDE form (DPM-Solver++(2M) SDE at order 2), which draws noise from rng."""
  return _eps_sample(eps_fn, schedule, x_T, rng, 'dpm_solver++', num_steps=num_steps,
                     order=order, spacing=spacing, stochastic=stochastic, clip_x0=clip_x0,
                     return_trajectory=return_trajectory)


def unipc_sample(eps_fn: EpsFn, schedule: Schedule, x_T: Array, rng: Array, *, num_steps: int,
                 order: int = 2, spacing: str = 'linspace', clip_x0: bool | float = True,
                 return_trajectory: bool = False):
  """UniPC (Zhao et al. 2023; B(h) = e^h - 1) of `order` 1-3 in `num_steps` network calls;
  deterministic given x_T (rng is not used)."""
  return _eps_sample(eps_fn, schedule, x_T, rng, 'unipc', num_steps=num_steps, order=order,
                     spacing=spacing, clip_x0=clip_x0, return_trajectory=return_trajectory)
