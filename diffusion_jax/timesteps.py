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
"""

from __future__ import annotations

import numpy as np

SPACINGS = ('leading', 'uniform', 'trailing', 'linspace', 'quadratic', 'karras', 'logsnr')
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


def sampler_timesteps(alphas_cumprod: np.ndarray, num_steps: int,
                      spacing: str = 'leading') -> np.ndarray:
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
  elif spacing == 'karras':
    sig = sigmas(alphas_cumprod)
    wanted = karras_sigmas(sig[0], sig[-1], s)
    steps = np.round(np.interp(np.log(wanted), np.log(sig), np.arange(t)))
  elif spacing == 'logsnr':
    log_sigma = np.log(sigmas(alphas_cumprod))  # increasing in t: -lambda
    wanted = np.linspace(log_sigma[0], log_sigma[-1], s)
    steps = np.round(np.interp(wanted, log_sigma, np.arange(t)))
  else:
    raise ValueError(f'sampling.spacing={spacing!r} is unknown; choose one of {SPACINGS}.')
  return np.unique(steps.astype(np.int64))
