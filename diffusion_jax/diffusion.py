"""The Gaussian diffusion itself: forward process, posterior, parameterisations, losses, VLB.

Everything here is a pure function of a `Schedule`, arrays and, where noise is drawn, a PRNG key.
Images are float arrays [B, ...] in [-1, 1]; timesteps `t` are int32 [B] in [0, T).
A network is seen only as `apply(x_t, t) -> prediction` of the configured type
(`eps`, `x0` or `v`); `eps_fn_from` turns it into the `eps_fn(x_t, t)` that samplers take.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from diffusion_jax.schedules import Schedule

PREDICTION_TYPES = ('eps', 'x0', 'v')
LOSS_TYPES = ('l2', 'l1')

Array = jnp.ndarray
PredictFn = Callable[[Array, Array], Array]


def extract(coef: Array, t: Array, x_shape) -> Array:
  """coef[t] [B] reshaped to [B, 1, ..., 1] so that it broadcasts against x [B, ...]."""
  return coef[t].reshape((t.shape[0],) + (1,) * (len(x_shape) - 1))


# --- forward process q(x_t | x_0) and posterior q(x_{t-1} | x_t, x_0) ---------------------------

def q_mean_variance(schedule: Schedule, x0: Array, t: Array):
  """Mean [B, ...], variance and log-variance [B, 1, ...] of q(x_t | x_0)."""
  mean = extract(schedule.sqrt_alphas_cumprod, t, x0.shape) * x0
  var = 1.0 - extract(schedule.alphas_cumprod, t, x0.shape)
  return mean, var, jnp.log(var)


def q_sample(schedule: Schedule, x0: Array, t: Array, noise: Array) -> Array:
  """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise."""
  return (extract(schedule.sqrt_alphas_cumprod, t, x0.shape) * x0
          + extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0.shape) * noise)


def q_posterior(schedule: Schedule, x0: Array, x_t: Array, t: Array):
  """Mean [B, ...], variance and clipped log-variance [B, 1, ...] of q(x_{t-1} | x_t, x_0)."""
  mean = (extract(schedule.posterior_mean_coef1, t, x_t.shape) * x0
          + extract(schedule.posterior_mean_coef2, t, x_t.shape) * x_t)
  var = extract(schedule.posterior_variance, t, x_t.shape)
  log_var = extract(schedule.posterior_log_variance_clipped, t, x_t.shape)
  return mean, var, log_var


# --- conversions between eps, x0 and v -----------------------------------------------------------
# With a = sqrt(abar_t), s = sqrt(1 - abar_t): x_t = a x0 + s eps and v = a eps - s x0.

def _rates(schedule: Schedule, t: Array, shape):
  return (extract(schedule.sqrt_alphas_cumprod, t, shape),
          extract(schedule.sqrt_one_minus_alphas_cumprod, t, shape))


def x0_from_eps(schedule: Schedule, x_t: Array, t: Array, eps: Array) -> Array:
  a, s = _rates(schedule, t, x_t.shape)
  return (x_t - s * eps) / a


def eps_from_x0(schedule: Schedule, x_t: Array, t: Array, x0: Array) -> Array:
  a, s = _rates(schedule, t, x_t.shape)
  return (x_t - a * x0) / s


def v_from_eps(schedule: Schedule, x0: Array, t: Array, eps: Array) -> Array:
  a, s = _rates(schedule, t, x0.shape)
  return a * eps - s * x0


def x0_from_v(schedule: Schedule, x_t: Array, t: Array, v: Array) -> Array:
  a, s = _rates(schedule, t, x_t.shape)
  return a * x_t - s * v


def eps_from_v(schedule: Schedule, x_t: Array, t: Array, v: Array) -> Array:
  a, s = _rates(schedule, t, x_t.shape)
  return s * x_t + a * v


def eps_from_prediction(schedule: Schedule, prediction_type: str, x_t: Array, t: Array,
                        pred: Array) -> Array:
  """The noise estimate implied by a network output of `prediction_type`."""
  if prediction_type == 'eps':
    return pred
  if prediction_type == 'x0':
    return eps_from_x0(schedule, x_t, t, pred)
  if prediction_type == 'v':
    return eps_from_v(schedule, x_t, t, pred)
  raise ValueError(f'diffusion.prediction_type={prediction_type!r} is unknown; '
                   f'choose one of {PREDICTION_TYPES}.')


def eps_fn_from(predict: PredictFn, schedule: Schedule, prediction_type: str) -> PredictFn:
  """Wraps a network of any prediction type into the samplers' `eps_fn(x_t, t) -> eps_hat`."""
  def eps_fn(x_t, t):
    pred = predict(x_t, t)
    return eps_from_prediction(schedule, prediction_type, x_t, t, pred.astype(x_t.dtype))
  return eps_fn


# --- training loss -------------------------------------------------------------------------------

def snr(schedule: Schedule, t: Array) -> Array:
  """Signal-to-noise ratio abar_t / (1 - abar_t), [B]."""
  abar = schedule.alphas_cumprod[t]
  return abar / (1.0 - abar)


def min_snr_weight(schedule: Schedule, t: Array, prediction_type: str, gamma: float) -> Array:
  """Min-SNR-gamma weights [B] (Hang et al. 2023), expressed for each prediction target.

  The weight on the x0-space error is min(SNR, gamma); converted to the eps target it is
  min(SNR, gamma) / SNR, and to the v target min(SNR, gamma) / (SNR + 1).
  """
  ratio = snr(schedule, t)
  clipped = jnp.minimum(ratio, gamma)
  return {'eps': clipped / ratio, 'x0': clipped, 'v': clipped / (ratio + 1.0)}[prediction_type]


def training_target(schedule: Schedule, prediction_type: str, x0: Array, t: Array,
                    noise: Array) -> Array:
  if prediction_type == 'eps':
    return noise
  if prediction_type == 'x0':
    return x0
  if prediction_type == 'v':
    return v_from_eps(schedule, x0, t, noise)
  raise ValueError(f'diffusion.prediction_type={prediction_type!r} is unknown; '
                   f'choose one of {PREDICTION_TYPES}.')


def loss_per_example(predict: PredictFn, schedule: Schedule, x0: Array, t: Array, noise: Array,
                     *, prediction_type: str = 'eps', loss_type: str = 'l2',
                     min_snr_gamma: Optional[float] = None) -> Array:
  """The denoising loss of each example [B]: mean over pixels of |target - prediction|^p.

  With prediction_type='eps' and loss_type='l2' this is DDPM's L_simple, ||eps - eps_theta||^2.
  """
  x_t = q_sample(schedule, x0, t, noise)
  pred = predict(x_t, t).astype(jnp.float32)
  err = pred - training_target(schedule, prediction_type, x0, t, noise)
  if loss_type == 'l2':
    per_pixel = jnp.square(err)
  elif loss_type == 'l1':
    per_pixel = jnp.abs(err)
  else:
    raise ValueError(f'training.loss={loss_type!r} is unknown; choose one of {LOSS_TYPES}.')
  loss = jnp.mean(per_pixel, axis=tuple(range(1, x0.ndim)))
  if min_snr_gamma:
    loss = loss * min_snr_weight(schedule, t, prediction_type, min_snr_gamma)
  return loss


# --- variational bound ---------------------------------------------------------------------------

def normal_kl(mean1, logvar1, mean2, logvar2):
  """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats."""
  return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                + jnp.square(mean1 - mean2) * jnp.exp(-logvar2))


def _approx_standard_normal_cdf(x):
  # The tanh approximation used by DDPM's reference code; exact to ~1e-4.
  return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
  """log p(x) elementwise for 8-bit data x in [-1, 1] under a Gaussian discretised to 256 bins.

  The outermost bins extend to -inf and +inf (DDPM's decoder L_0).
  """
  centered = x - means
  inv_stdv = jnp.exp(-log_scales)
  cdf_plus = _approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
  cdf_min = _approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
  log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
  log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
  log_cdf_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
  return jnp.where(x < -0.999, log_cdf_plus,
                   jnp.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def _mean_flat(x):
  return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def vlb_term(eps_fn: PredictFn, schedule: Schedule, x0: Array, t: Array, noise: Array,
             *, variance: str = 'small') -> Array:
  """The bound term L_t [B] in bits/dim: KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)), or the
  decoder's negative log-likelihood at t = 0. The model's variance is fixed (DDPM's
  'small' = posterior variance, or 'large' = beta_t)."""
  x_t = q_sample(schedule, x0, t, noise)
  eps = eps_fn(x_t, t)
  x0_hat = jnp.clip(x0_from_eps(schedule, x_t, t, eps), -1.0, 1.0)
  true_mean, _, true_logvar = q_posterior(schedule, x0, x_t, t)
  model_mean, _, model_logvar = q_posterior(schedule, x0_hat, x_t, t)
  if variance == 'large':
    # DDPM's 'large' variance uses beta_t, with beta~_1 in place of beta_0.
    large = jnp.log(jnp.concatenate([schedule.posterior_variance[1:2], schedule.betas[1:]]))
    model_logvar = extract(large, t, x_t.shape)
  kl = _mean_flat(normal_kl(true_mean, true_logvar, model_mean, model_logvar)) / math.log(2.0)
  nll = -_mean_flat(discretized_gaussian_log_likelihood(
      x0, model_mean, 0.5 * model_logvar)) / math.log(2.0)
  return jnp.where(t == 0, nll, kl)


def prior_bpd(schedule: Schedule, x0: Array) -> Array:
  """KL(q(x_T | x_0) || N(0, I)) in bits/dim [B]."""
  t = jnp.full((x0.shape[0],), schedule.num_timesteps - 1, jnp.int32)
  mean, _, logvar = q_mean_variance(schedule, x0, t)
  return _mean_flat(normal_kl(mean, logvar, 0.0, 0.0)) / math.log(2.0)


def bits_per_dim(eps_fn: PredictFn, schedule: Schedule, x0: Array, rng: Array,
                 *, variance: str = 'small') -> Array:
  """The full variational bound in bits/dim [B]: prior + sum over every t of L_t.

  One network call per timestep, run as a lax.scan; x0 in [-1, 1] holds 8-bit data.
  """
  def body(total, t_scalar):
    t = jnp.full((x0.shape[0],), t_scalar, jnp.int32)
    noise = jax.random.normal(jax.random.fold_in(rng, t_scalar), x0.shape, x0.dtype)
    return total + vlb_term(eps_fn, schedule, x0, t, noise, variance=variance), None

  terms, _ = jax.lax.scan(body, jnp.zeros(x0.shape[0]),
                          jnp.arange(schedule.num_timesteps, dtype=jnp.int32))
  return terms + prior_bpd(schedule, x0)
