"""Which trained timesteps a few-step sampler visits: the spacings of DDIM and the solvers.

Every spacing turns (T training timesteps, S sampler steps) into increasing integer timesteps
in [0, T), one network call each; the samplers run them from the largest down and then step to
abar = 1 (sigma = 0). Timesteps that a spacing repeats are dropped (a repeated timestep is a
step of length 0), so `quadratic` and `karras` can give fewer than S of them:

  leading    t_i = i * (T // S), i = 0 .. S-1 (the DDIM paper; `uniform` is its old name)
  trailing   t_i = round(T - i * T / S) - 1, i = 0 .. S-1 (starts at T - 1)
  linspace   round(linspace(0, T - 1, S + 1)) from the top, its last entry (0) dropped
  quadratic  floor((i * sqrt(0.8 T) / (S - 1))^2), i = 0 .. S-1 (the DDIM paper's CIFAR-10 choice)
  karras     sigma_i = (smax^(1/rho) + i / (S - 1) (smin^(1/rho) - smax^(1/rho)))^rho, rho = 7
             (Karras et al. 2022), between the schedule's sigma(0) and sigma(T - 1), where
             sigma(t) = sqrt((1 - abar_t) / abar_t); each sigma_i is mapped to the trained
             timestep nearest to it in log sigma (interpolated, then rounded)
  logsnr     lambda_i evenly spaced from lambda(T - 1) to lambda(0), lambda = -log sigma the
             half log-SNR (DPM-Solver's "logSNR" steps), mapped to trained timesteps the same way
  shifted    SD3's grid: flow times u_i = sigma~ / (1 + sigma~) evenly spaced, then shifted,
             u' = s u / (1 + (s - 1) u) (sigma~ multiplied by s), mapped the same way

On a continuous process (`processes.py`) `sampler_times` gives S decreasing times in
[t_min, t_max] instead: `uniform` (= `linspace`) evenly in the process's own t, `karras`,
`logsnr` and `shifted` as above between the ends of its range, and `trailing` evenly in t from
t_max down towards 0 without visiting t_min, t_i = t_max (1 - i / S) (every call its own equal
share of the path: the grid of few-step MeanFlow sampling); leading and quadratic are for the
ddpm process only.
"""

from __future__ import annotations

import numpy as np

SPACINGS = ('leading', 'uniform', 'trailing', 'linspace', 'quadratic', 'karras', 'logsnr',
            'shifted')
CONTINUOUS_SPACINGS = ('uniform', 'linspace', 'trailing', 'karras', 'logsnr', 'shifted')
KARRAS_RHO = 7.0


def sigmas(alphas_cumprod: np.ndarray) -> np.ndarray:
  """sigma(t) = sqrt((1 - abar_t) / abar_t) [T], the noise-to-signal ratio, increasing in t."""
  abar = np.asarray(alphas_cumprod, np.float64)
  return np.sqrt((1.0 - abar) / abar)


def karras_sigmas(sigma_min: float, sigma_max: float, num_steps: int,
                  rho: float = KARRAS_RHO) -> np.ndarray:
  """Karras et al. (2022), eq. 5: `num_steps` noise levels from sigma_max down to sigma_min."""
  ramp = np.linspace(0.0, 1.0, num_steps) if num_steps > 1 else np.zeros(1)
  lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
  return (hi + ramp * (lo - hi)) ** rho


def shifted_sigmas(sigma_min: float, sigma_max: float, num_steps: int,
                   shift: float = 1.0) -> np.ndarray:
  """SD3's grid: `num_steps` noise levels sigma~ whose flow times sigma~ / (1 + sigma~) are evenly
  spaced from sigma_max's down to sigma_min's, each then multiplied by `shift`."""
  u = np.linspace(sigma_max / (1 + sigma_max), sigma_min / (1 + sigma_min), num_steps)
  return shift * u / (1 - u)


def _wanted_sigmas(sig_lo: float, sig_hi: float, num_steps: int, spacing: str,
                   shift: float) -> np.ndarray:
  """Decreasing noise levels sigma~ of the grids defined by noise level, between two ends."""
  if spacing == 'karras':
    return karras_sigmas(sig_lo, sig_hi, num_steps)
  if spacing == 'logsnr':
    return np.exp(np.linspace(np.log(sig_hi), np.log(sig_lo), num_steps))
  return shifted_sigmas(sig_lo, sig_hi, num_steps, shift)


def started(times: np.ndarray, strength: float) -> np.ndarray:
  """The last int(S strength) of S decreasing `times`: image-to-image (SDEdit, Meng et al. 2022)
  starts part-way down a sampler's grid, at the noise level of its first kept time, and makes
  that many steps, as diffusers' img2img does. strength 1 keeps them all."""
  if not 0.0 < strength <= 1.0:
    raise ValueError(f'sampling.strength={strength} must lie in (0, 1] (1: plain sampling).')
  keep = int(len(times) * strength + 1e-9)
  if keep < 1:
    raise ValueError(f'sampling.strength={strength} keeps none of the {len(times)} times of the '
                     f'grid; raise it to at least {1.0 / len(times):.3g} or raise '
                     'sampling.num_steps.')
  return times[len(times) - keep:]


def sampler_times(process, num_steps: int, spacing: str, shift: float = 1.0,
                  strength: float = 1.0) -> np.ndarray:
  """The times [S] a sampler visits on `process`, decreasing, float64 (see the module docstring).
  On the ddpm process they are the integer timesteps of `sampler_timesteps`. With strength < 1
  only the last int(S strength) of them (`started`)."""
  if strength != 1.0:
    return started(sampler_times(process, num_steps, spacing, shift), strength)
  if process.discrete:
    return sampler_timesteps(process.alphas_cumprod64, num_steps, spacing, shift)[::-1] * 1.0
  if spacing not in CONTINUOUS_SPACINGS:
    raise ValueError(f'sampling.spacing={spacing!r} picks integer timesteps of the ddpm '
                     f'process; on diffusion.process={process.name} choose one of '
                     f'{CONTINUOUS_SPACINGS}.')
  if num_steps < 1:
    raise ValueError(f'sampling.num_steps={num_steps} must be at least 1.')
  if spacing in ('uniform', 'linspace'):
    return np.linspace(process.t_max, process.t_min, num_steps)
  if spacing == 'trailing':
    return process.t_max * (1.0 - np.arange(num_steps) / num_steps)
  ends = process.sigma_tilde(np.array([process.t_min, process.t_max]))
  wanted = _wanted_sigmas(ends[0], ends[1], num_steps, spacing, shift)
  times = process.clip_t(process.t_of_logsnr(-2.0 * np.log(wanted)))
  return np.unique(times)[::-1]  # a shift can push several onto t_max: a step of length 0


def sampler_timesteps(alphas_cumprod: np.ndarray, num_steps: int,
                      spacing: str = 'leading', shift: float = 1.0) -> np.ndarray:
  """The increasing int64 timesteps of `spacing` (see the module docstring) for S = num_steps.

  alphas_cumprod: abar [T] of the schedule (only `karras` reads its values).
  """
  num_timesteps = len(alphas_cumprod)
  if not 1 <= num_steps <= num_timesteps:
    raise ValueError(f'sampling.num_steps={num_steps} must lie in [1, {num_timesteps}] '
                     '(diffusion.num_timesteps).')
  t, s = num_timesteps, num_steps
  if spacing in ('leading', 'uniform'):
    steps = np.arange(s) * (t // s)
  elif spacing == 'trailing':
    steps = np.round(t - np.arange(s) * t / s) - 1
  elif spacing == 'linspace':
    steps = np.round(np.linspace(0, t - 1, s + 1))[1:]
  elif spacing == 'quadratic':
    steps = np.floor(np.linspace(0, np.sqrt(t * 0.8), s) ** 2)
  elif spacing in ('karras', 'logsnr', 'shifted'):
    sig = sigmas(alphas_cumprod)
    wanted = _wanted_sigmas(sig[0], sig[-1], s, spacing, shift)
    steps = np.round(np.interp(np.log(wanted), np.log(sig), np.arange(t)))
  else:
    raise ValueError(f'sampling.spacing={spacing!r} is unknown; choose one of {SPACINGS}.')
  return np.unique(steps.astype(np.int64))
