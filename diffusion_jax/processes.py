"""Forward processes in continuous time: x_t = alpha(t) x0 + sigma(t) eps, eps ~ N(0, I).

  ddpm  the discrete VP chain of a beta schedule (`schedules.py`): t is the integer index in
        [0, T) (carried as a float), alpha = sqrt(abar_t), sigma = sqrt(1 - abar_t); the network
        receives t itself, as it always did
  vp    continuous VP (alpha^2 + sigma^2 = 1), diffusion.schedule `cosine`
        (alpha^2 = cos^2(pi/2 (t + s) / (1 + s)) / cos^2(pi/2 s / (1 + s)), s = 0.008) or `linear`
        (log alpha^2 = -(b0 t + (b1 - b0) t^2 / 2), b0 = 0.1, b1 = 20; Song et al. 2021), t in
        [1e-3, t_max]; the network receives 1000 t
  flow  rectified flow / flow matching: alpha = 1 - t, sigma = t, t in [1e-3, 1 - 1e-3]; the
        network receives 1000 t (SD3)
  edm   Karras et al. (2022): alpha = 1, sigma = t in [0.002, 80]; the network receives
        c_in x with c_in = 1 / sqrt(sigma^2 + sigma_data^2) and 1000 c_noise, c_noise = ln(sigma)/4
        (Table 1; scaled by 1000 so that DDPM's sinusoidal embedding resolves it)

Every process is also described by its log-SNR lambda(t) = log(alpha^2 / sigma^2), decreasing in
t, and by sigma~ = sigma / alpha = exp(-lambda / 2), the noise level of x / alpha (Karras et al.'s
sigma). `t_of_logsnr` inverts lambda, so a time drawn on one process's scale (EDM's log-normal
sigma, SD3's logit-normal flow time, a Karras grid) maps onto any other; the ends of the sampling
and training range are `t_min` and `t_max`.

`alpha_sigma` and `t_of_logsnr` take NumPy arrays (float64, for the samplers' tables) or jax
arrays (in jitted code); the ddpm process reads its coefficients from the float32 Schedule there,
as DDPM always has.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import schedules

PROCESSES = ('ddpm', 'vp', 'flow', 'edm')
VP_SCHEDULES = ('cosine', 'linear')
NET_TIME_SCALE = 1000.0  # continuous time (or EDM's c_noise) as the network sees it
_COSINE_S = 0.008
_VP_LINEAR = (0.1, 20.0)  # beta_min, beta_max of Song et al.'s VP SDE


def _xp(a):
  return np if isinstance(a, (np.ndarray, float, int, np.floating)) else jnp


def logsnr_of(alpha, sigma):
  """lambda = log(alpha^2 / sigma^2)."""
  xp = _xp(alpha)
  return 2.0 * (xp.log(alpha) - xp.log(sigma))


class Process:
  """x_t = alpha(t) x0 + sigma(t) eps. Subclasses define alpha_sigma, t_of_logsnr, net_time."""
  name: str = ''
  discrete = False  # ddpm: times are integer indices
  t_min: float = 0.0
  t_max: float = 1.0
  sigma_data: float = 0.5
  scales_input = False  # edm: the network sees x / sqrt(sigma^2 + alpha^2 sigma_data^2)

  def alpha_sigma(self, t):
    raise NotImplementedError

  def t_of_logsnr(self, logsnr):
    raise NotImplementedError

  def net_time(self, t):
    """The noise level as the network receives it, float [B]."""
    return NET_TIME_SCALE * t

  def net_interval(self, t, r):
    """A step from t to r as a network with a second time input receives it: net_time(t) -
    net_time(r), float [B]."""
    return self.net_time(t) - self.net_time(r)

  def logsnr(self, t):
    return logsnr_of(*self.alpha_sigma(t))

  def sigma_tilde(self, t):
    alpha, sigma = self.alpha_sigma(t)
    return sigma / alpha

  def net_input(self, x, t):
    """The network's input for x_t: x_t itself, or c_in x_t on processes that scale it."""
    if not self.scales_input:
      return x
    alpha, sigma = self.alpha_sigma(t)
    c_in = 1.0 / jnp.sqrt(sigma ** 2 + (alpha * self.sigma_data) ** 2)
    return x * c_in.reshape((-1,) + (1,) * (x.ndim - 1)).astype(x.dtype)

  def clip_t(self, t):
    xp = _xp(t)
    return xp.clip(t, self.t_min, self.t_max)


class DDPM(Process):
  """The discrete chain of `schedule` (T steps); t = the index."""
  name = 'ddpm'
  discrete = True

  def __init__(self, schedule: schedules.Schedule):
    self.schedule = schedule
    self.num_timesteps = schedule.num_timesteps
    self.t_max = float(self.num_timesteps - 1)
    # float64 from the betas: the float32 abar leaves 1 - abar at small t a few digits.
    self.alphas_cumprod64 = np.cumprod(1.0 - np.asarray(schedule.betas, np.float64))
    self._logsnr64 = np.log(self.alphas_cumprod64) - np.log1p(-self.alphas_cumprod64)

  def alpha_sigma(self, t):
    """At the integer t of the chain, its table; between them (the probability-flow ODE's
    times), the log-SNR interpolated linearly in t, so that alpha and sigma are continuous."""
    if isinstance(t, (np.ndarray, float, int, np.floating)):
      abar = self.alphas_cumprod64[np.asarray(np.round(t), np.int64)]
      return np.sqrt(abar), np.sqrt(1.0 - abar)
    i = jnp.round(t).astype(jnp.int32)
    table = self.schedule.sqrt_alphas_cumprod[i], self.schedule.sqrt_one_minus_alphas_cumprod[i]
    if jnp.issubdtype(jnp.asarray(t).dtype, jnp.integer):
      return table
    logsnr = jnp.interp(t, jnp.arange(self.num_timesteps, dtype=jnp.asarray(t).dtype),
                        jnp.asarray(self._logsnr64, jnp.asarray(t).dtype))
    on_grid = t == jnp.round(t)
    return (jnp.where(on_grid, table[0], jnp.sqrt(jax.nn.sigmoid(logsnr))),
            jnp.where(on_grid, table[1], jnp.sqrt(jax.nn.sigmoid(-logsnr))))

  def t_of_logsnr(self, logsnr):
    """The (fractional) index where the table's log-SNR, decreasing in t, equals `logsnr`."""
    xp = _xp(logsnr)
    table = self._logsnr64 if xp is np else jnp.asarray(self._logsnr64, jnp.float32)
    return xp.interp(-logsnr, -table, xp.arange(self.num_timesteps, dtype=table.dtype))

  def net_time(self, t):
    return t


class VP(Process):
  """Continuous variance-preserving process, cosine or linear (see the module docstring)."""
  name = 'vp'
  t_min = 1e-3

  def __init__(self, schedule: str = 'cosine'):
    if schedule not in VP_SCHEDULES:
      raise ValueError(f'diffusion.schedule={schedule!r} has no continuous form; with '
                       f'diffusion.process=vp choose one of {VP_SCHEDULES}.')
    self.kind = schedule
    # cosine: alpha reaches 0 at t = 1; stop where DPM-Solver's cosine VP stops (lambda ~ -10).
    self.t_max = 0.9946 if schedule == 'cosine' else 1.0

  def _log_alpha2(self, t):
    xp = _xp(t)
    if self.kind == 'cosine':
      s = _COSINE_S
      return 2.0 * (xp.log(xp.cos(math.pi / 2 * (t + s) / (1 + s)))
                    - math.log(math.cos(math.pi / 2 * s / (1 + s))))
    b0, b1 = _VP_LINEAR
    return -(b0 * t + 0.5 * (b1 - b0) * t ** 2)

  def alpha_sigma(self, t):
    xp = _xp(t)
    log_a2 = self._log_alpha2(t)
    return xp.exp(0.5 * log_a2), xp.sqrt(-xp.expm1(log_a2))

  def t_of_logsnr(self, logsnr):
    xp = _xp(logsnr)
    log_a2 = -xp.logaddexp(0.0, -logsnr)  # alpha^2 = sigmoid(lambda)
    if self.kind == 'cosine':
      s = _COSINE_S
      c = xp.exp(0.5 * log_a2) * math.cos(math.pi / 2 * s / (1 + s))
      return xp.arccos(c) * 2 / math.pi * (1 + s) - s
    b0, b1 = _VP_LINEAR
    return (-b0 + xp.sqrt(b0 ** 2 - 2.0 * (b1 - b0) * log_a2)) / (b1 - b0)


class Flow(Process):
  """Rectified flow: alpha = 1 - t, sigma = t."""
  name = 'flow'
  t_min, t_max = 1e-3, 1.0 - 1e-3

  def alpha_sigma(self, t):
    return 1.0 - t, t

  def t_of_logsnr(self, logsnr):
    xp = _xp(logsnr)
    return 1.0 / (1.0 + xp.exp(0.5 * logsnr))  # sigma~ / (1 + sigma~)


class EDM(Process):
  """Karras et al. (2022): alpha = 1, sigma = t."""
  name = 'edm'
  scales_input = True

  def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0,
               sigma_data: float = 0.5):
    if not 0 < sigma_min < sigma_max:
      raise ValueError(f'diffusion.sigma_min={sigma_min} and diffusion.sigma_max={sigma_max} '
                       'must satisfy 0 < sigma_min < sigma_max.')
    self.t_min, self.t_max, self.sigma_data = sigma_min, sigma_max, sigma_data

  def alpha_sigma(self, t):
    return t * 0.0 + 1.0, t

  def t_of_logsnr(self, logsnr):
    return _xp(logsnr).exp(-0.5 * logsnr)

  def net_time(self, t):
    return NET_TIME_SCALE * 0.25 * jnp.log(t)


def as_process(process_or_schedule) -> Process:
  """A Process as it is, a Schedule as its ddpm process."""
  if isinstance(process_or_schedule, schedules.Schedule):
    return DDPM(process_or_schedule)
  return process_or_schedule


def from_config(diffusion_config) -> Process:
  """The process of a config's `diffusion` group (process, schedule, sigma_min/max/data)."""
  name = diffusion_config.get('process', 'ddpm')
  if name == 'ddpm':
    process = DDPM(schedules.from_config(diffusion_config))
  elif name == 'vp':
    process = VP(diffusion_config.schedule)
  elif name == 'flow':
    process = Flow()
  elif name == 'edm':
    process = EDM(diffusion_config.get('sigma_min', 0.002),
                  diffusion_config.get('sigma_max', 80.0))
  else:
    raise ValueError(f'diffusion.process={name!r} is unknown; choose one of {PROCESSES}.')
  # sigma_data serves every process: the edm prediction type and weighting use it too.
  process.sigma_data = diffusion_config.get('sigma_data', 0.5)
  return process


# --- training times ------------------------------------------------------------------------------

TIME_SAMPLINGS = ('uniform', 'logit_normal', 'lognormal', 'stratified')


def training_times(process: Process, keys, index, global_batch: int, method: str = 'uniform', *,
                   mean: float = 0.0, std: float = 1.0, shift: float = 1.0):
  """The time of each example [b] of a training batch, one key [b, 2] each.

    uniform       t uniform on [t_min, t_max] (ddpm: an integer index uniform on [0, T), drawn
                  as DDPM always drew it)
    stratified    as uniform, with example `index` of the global batch in the index-th of
                  `global_batch` equal strata, so every batch covers the whole range
    logit_normal  log sigma~ ~ N(mean, std): SD3's logit-normal over flow time
                  t = sigma~ / (1 + sigma~) (Esser et al. 2024)
    lognormal     the same law with EDM's P_mean, P_std (Karras et al. 2022)

  `shift` != 1 multiplies every sigma~ by it (SD3's time shift). Times are kept within
  [t_min, t_max] and rounded to indices on the ddpm process.
  """
  draw = lambda fn: jax.vmap(lambda k: fn(jax.random.fold_in(k, 0)))(keys)
  if method == 'uniform' and process.discrete and shift == 1.0:
    return draw(lambda k: jax.random.randint(k, (), 0, process.num_timesteps, jnp.int32))
  if method in ('uniform', 'stratified'):
    u = draw(jax.random.uniform)
    if method == 'stratified':
      u = (index + u) / global_batch
    if process.discrete:
      t = jnp.minimum(jnp.floor(u * process.num_timesteps), process.t_max)
    else:
      t = process.t_min + u * (process.t_max - process.t_min)
  elif method in ('logit_normal', 'lognormal'):
    log_sigma = mean + std * draw(jax.random.normal)
    t = process.t_of_logsnr(-2.0 * log_sigma)
  else:
    raise ValueError(f'training.time_sampling={method!r} is unknown; choose one of '
                     f'{TIME_SAMPLINGS}.')
  if shift != 1.0:
    t = process.t_of_logsnr(process.logsnr(process.clip_t(t)) - 2.0 * math.log(shift))
  if process.discrete:
    t = jnp.round(t)
  return process.clip_t(t)
