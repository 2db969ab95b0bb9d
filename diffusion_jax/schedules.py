"""Noise schedules as pure functions.

`get_betas` turns a schedule name into the betas of a discrete forward process, and
`Schedule.from_betas` precomputes every per-timestep coefficient the forward process, the
posterior and the samplers need. The schedule is a pytree of jnp arrays, so it can be closed over
or passed through `jit` freely. Coefficients are computed in float64 NumPy (as the DDPM reference
does) and stored as float32.
"""

from __future__ import annotations

import inspect
import math
from typing import Callable

import flax.struct
import jax.numpy as jnp
import numpy as np

MAX_BETA = 0.999  # improved-DDPM clip: keeps the last steps from being singular


def _betas_from_alpha_bar(alpha_bar: Callable[[np.ndarray], np.ndarray],
                          num_timesteps: int) -> np.ndarray:
  """Betas whose cumulative product of (1 - beta) follows `alpha_bar` on [0, 1]."""
  t = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
  abar = alpha_bar(t)
  return np.minimum(1.0 - abar[1:] / abar[:-1], MAX_BETA)


def linear_betas(num_timesteps: int, beta_start: float = 1e-4,
                 beta_end: float = 0.02) -> np.ndarray:
  """DDPM (Ho et al. 2020): betas evenly spaced from `beta_start` to `beta_end`."""
  return np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)


def cosine_betas(num_timesteps: int, s: float = 0.008) -> np.ndarray:
  """Improved DDPM (Nichol & Dhariwal 2021): alpha_bar(t) = cos((t + s) / (1 + s) * pi/2)^2."""
  def alpha_bar(t):
    return np.cos((t + s) / (1 + s) * math.pi / 2) ** 2 / math.cos(s / (1 + s) * math.pi / 2) ** 2
  return _betas_from_alpha_bar(alpha_bar, num_timesteps)


def offset_cosine_betas(num_timesteps: int, max_signal_rate: float = 0.95,
                        min_signal_rate: float = 0.02) -> np.ndarray:
  """The Keras DDIM recipe: signal rate cos(angle), angle linear in t.

  The signal rate sqrt(alpha_bar) is `max_signal_rate` at the first timestep and
  `min_signal_rate` at the last, so neither end is pure signal or pure noise.
  """
  start, end = math.acos(max_signal_rate), math.acos(min_signal_rate)
  angles = start + np.linspace(0.0, 1.0, num_timesteps, dtype=np.float64) * (end - start)
  abar = np.cos(angles) ** 2
  return 1.0 - abar / np.concatenate([[1.0], abar[:-1]])


def sigmoid_betas(num_timesteps: int, start: float = -3.0, end: float = 3.0,
                  tau: float = 1.0) -> np.ndarray:
  """Sigmoid schedule of Chen (2023), "On the importance of noise scheduling"."""
  def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))
  v_start, v_end = sigmoid(start / tau), sigmoid(end / tau)

  def alpha_bar(t):
    return (v_end - sigmoid((t * (end - start) + start) / tau)) / (v_end - v_start)
  return _betas_from_alpha_bar(alpha_bar, num_timesteps)


_BETA_FNS = {
    'linear': linear_betas,
    'cosine': cosine_betas,
    'offset_cosine': offset_cosine_betas,
    'sigmoid': sigmoid_betas,
}
SCHEDULES = tuple(_BETA_FNS)


def get_betas(name: str, num_timesteps: int, **kwargs) -> np.ndarray:
  """Betas [num_timesteps] (float64, in (0, 1)) of the schedule called `name`."""
  if name not in _BETA_FNS:
    raise ValueError(f'diffusion.schedule={name!r} is unknown; choose one of {SCHEDULES}.')
  return _BETA_FNS[name](num_timesteps, **kwargs)


@flax.struct.dataclass
class Schedule:
  """Per-timestep coefficients of a discrete diffusion, each a float32 array [T]."""
  betas: jnp.ndarray
  alphas_cumprod: jnp.ndarray
  alphas_cumprod_prev: jnp.ndarray  # alpha_bar_{t-1}, with alpha_bar_{-1} = 1
  sqrt_alphas_cumprod: jnp.ndarray
  sqrt_one_minus_alphas_cumprod: jnp.ndarray
  posterior_variance: jnp.ndarray  # beta~_t of q(x_{t-1} | x_t, x_0)
  posterior_log_variance_clipped: jnp.ndarray  # log beta~_t with beta~_0 replaced by beta~_1
  posterior_mean_coef1: jnp.ndarray  # multiplies x_0
  posterior_mean_coef2: jnp.ndarray  # multiplies x_t

  @property
  def num_timesteps(self) -> int:
    return self.betas.shape[0]

  @classmethod
  def from_betas(cls, betas) -> 'Schedule':
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or not np.all((betas > 0) & (betas <= 1)):
      raise ValueError('betas must be a 1-D array with values in (0, 1].')
    alphas = 1.0 - betas
    abar = np.cumprod(alphas)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
    # beta~_0 is 0, whose log is -inf: DDPM clips it to beta~_1.
    post_logvar = np.log(np.concatenate([post_var[1:2], post_var[1:]]))
    arrays = dict(
        betas=betas,
        alphas_cumprod=abar,
        alphas_cumprod_prev=abar_prev,
        sqrt_alphas_cumprod=np.sqrt(abar),
        sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - abar),
        posterior_variance=post_var,
        posterior_log_variance_clipped=post_logvar,
        posterior_mean_coef1=betas * np.sqrt(abar_prev) / (1.0 - abar),
        posterior_mean_coef2=(1.0 - abar_prev) * np.sqrt(alphas) / (1.0 - abar),
    )
    return cls(**{k: jnp.asarray(v, dtype=jnp.float32) for k, v in arrays.items()})


def kwargs_from_config(diffusion_config) -> dict:
  """diffusion.schedule_kwargs, 'name=value,name=value' (e.g. 'beta_end=0.01'), as a dict of
  floats; each name must be a parameter of diffusion.schedule's function."""
  text = diffusion_config.get('schedule_kwargs', '') or ''
  name = diffusion_config.schedule
  allowed = [p for p in inspect.signature(_BETA_FNS[name]).parameters if p != 'num_timesteps']
  out = {}
  for part in (p.strip() for p in str(text).split(',') if p.strip()):
    key, sep, value = part.partition('=')
    key = key.strip()
    try:
      out[key] = float(value)
    except ValueError:
      sep = ''
    if not sep or key not in allowed:
      raise ValueError(f'diffusion.schedule_kwargs={text!r}: {part!r} is not name=number with a '
                       f'name the {name} schedule takes ({", ".join(allowed) or "none"}).')
  return out


def from_config(diffusion_config) -> Schedule:
  """The Schedule of a config's `diffusion` group (schedule, num_timesteps, schedule_kwargs)."""
  if diffusion_config.schedule not in _BETA_FNS:
    raise ValueError(f'diffusion.schedule={diffusion_config.schedule!r} is unknown; choose one '
                     f'of {SCHEDULES}.')
  return Schedule.from_betas(get_betas(diffusion_config.schedule, diffusion_config.num_timesteps,
                                       **kwargs_from_config(diffusion_config)))
