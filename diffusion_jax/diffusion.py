"""The Gaussian diffusion itself: forward process, parameterisations, losses, variational bound.

Everything here is a pure function of arrays, a process (`processes.py`) or, for the discrete
chain's posterior and bound, a `Schedule`, and, where noise is drawn, a PRNG key. Images are float
arrays [B, ...] in [-1, 1]; t is a process time [B] (for `ddpm` the integer index in [0, T)).

A network is seen only as `predict(net_input, net_time) -> prediction` of the configured type;
`process.net_input` / `process.net_time` say what it receives, and `x0_from_prediction` is the one
conversion from any prediction type to the data prediction D = x0_hat that samplers use. With
x_t = alpha x0 + sigma eps, sigma~ = sigma / alpha:

  eps   eps                                 x0 = (x_t - sigma eps) / alpha
  x0    x0                                  x0 = x0
  v     alpha eps - sigma x0                x0 = (alpha x_t - sigma v) / (alpha^2 + sigma^2)
  flow  eps - x0 (the velocity of flow)     x0 = (x_t - sigma u) / (alpha + sigma)
  edm   F of D = c_skip x_t / alpha + c_out F, c_skip = sd^2 / (sigma~^2 + sd^2),
        c_out = sigma~ sd / sqrt(sigma~^2 + sd^2), sd = sigma_data (Karras et al. 2022, Table 1,
        on x_t / alpha, whose noise level is sigma~)

Every loss weighting is a weight w(t) on the data-space error ||D - x0||^2, applied to the
prediction's own error through (dD/dprediction)^2 (`x0_error_scale`), except `none`, which is the
plain mean squared error of the prediction (DDPM's L_simple for eps):
  min_snr   min(SNR, gamma)                              (Hang et al. 2023)
  sigmoid   SNR sigmoid(b - lambda), lambda = log SNR     (Kingma & Gao 2023; Hoogeboom et al. 2024)
  edm       (sigma~^2 + sd^2) / (sigma~ sd)^2            (Karras et al. 2022)
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

from diffusion_jax.schedules import Schedule

PREDICTION_TYPES = ('eps', 'x0', 'v', 'flow', 'edm')
LOSS_TYPES = ('l2', 'l1')
LOSS_WEIGHTINGS = ('none', 'min_snr', 'sigmoid', 'edm')

Array = jnp.ndarray
PredictFn = Callable[[Array, Array], Array]


def extract(coef: Array, t: Array, x_shape) -> Array:
  """coef[t] [B] reshaped to [B, 1, ..., 1] so that it broadcasts against x [B, ...]."""
  return coef[t].reshape((t.shape[0],) + (1,) * (len(x_shape) - 1))


def column(a: Array, ndim: int) -> Array:
  """[B] -> [B, 1, ..., 1] with `ndim` dimensions in all."""
  return jnp.reshape(a, (-1,) + (1,) * (ndim - 1))


# --- the one conversion between predictions ------------------------------------------------------

def _edm_coefficients(alpha, sigma, sigma_data):
  """(c_skip, c_out) of EDM's preconditioning at noise level sigma~ = sigma / alpha."""
  st = sigma / alpha
  c_skip = sigma_data ** 2 / (st ** 2 + sigma_data ** 2)
  c_out = st * sigma_data / jnp.sqrt(st ** 2 + sigma_data ** 2)
  return c_skip, c_out


def x0_from_prediction(prediction_type: str, pred: Array, x_t: Array, alpha: Array,
                       sigma: Array, sigma_data: float = 0.5) -> Array:
  """The data prediction D implied by a network output of `prediction_type` (table above).

  alpha, sigma broadcast against x_t (e.g. [B, 1, ...])."""
  if prediction_type == 'eps':
    return (x_t - sigma * pred) / alpha
  if prediction_type == 'x0':
    return pred
  if prediction_type == 'v':
    return (alpha * x_t - sigma * pred) / (alpha ** 2 + sigma ** 2)
  if prediction_type == 'flow':
    return (x_t - sigma * pred) / (alpha + sigma)
  if prediction_type == 'edm':
    c_skip, c_out = _edm_coefficients(alpha, sigma, sigma_data)
    return c_skip * x_t / alpha + c_out * pred
  raise ValueError(f'diffusion.prediction_type={prediction_type!r} is unknown; '
                   f'choose one of {PREDICTION_TYPES}.')


def training_target(prediction_type: str, x0: Array, noise: Array, alpha: Array, sigma: Array,
                    sigma_data: float = 0.5) -> Array:
  """What a network of `prediction_type` should output at x_t = alpha x0 + sigma noise."""
  if prediction_type == 'eps':
    return noise
  if prediction_type == 'x0':
    return x0
  if prediction_type == 'v':
    return alpha * noise - sigma * x0
  if prediction_type == 'flow':
    return noise - x0
  if prediction_type == 'edm':
    c_skip, c_out = _edm_coefficients(alpha, sigma, sigma_data)
    return (x0 - c_skip * (alpha * x0 + sigma * noise) / alpha) / c_out
  raise ValueError(f'diffusion.prediction_type={prediction_type!r} is unknown; '
                   f'choose one of {PREDICTION_TYPES}.')


def x0_error_scale(prediction_type: str, alpha: Array, sigma: Array,
                   sigma_data: float = 0.5) -> Array:
  """|dD / dprediction| at fixed x_t: an error e in the prediction is an error of size scale * e
  in D."""
  if prediction_type == 'eps':
    return sigma / alpha
  if prediction_type == 'x0':
    return jnp.ones_like(alpha)
  if prediction_type == 'v':
    return sigma / (alpha ** 2 + sigma ** 2)
  if prediction_type == 'flow':
    return sigma / (alpha + sigma)
  if prediction_type == 'edm':
    return _edm_coefficients(alpha, sigma, sigma_data)[1]
  raise ValueError(f'diffusion.prediction_type={prediction_type!r} is unknown; '
                   f'choose one of {PREDICTION_TYPES}.')


def denoiser(predict: PredictFn, process, prediction_type: str) -> Callable[..., Array]:
  """The network as the samplers' `denoise_fn(x_t, t) -> D` (float32 [B, ...]), t [B].

  A network with a second time input (trained for steps, e.g. MeanFlow) is also given the end of
  the step, `denoise_fn(x_t, t, t_end)`; `predict` then receives the step as a third argument
  (`process.net_interval`), and its output converts as the prediction at t: for an average
  velocity u, D = x_t - t u, whose Euler step to t_end is x_t - (t - t_end) u.
  """
  def denoise_fn(x_t, t, *t_end):
    compute = jnp.promote_types(x_t.dtype, jnp.float32)  # float64 when x_t is
    interval = tuple(process.net_interval(t, r) for r in t_end)
    pred = predict(process.net_input(x_t, t), process.net_time(t), *interval).astype(compute)
    alpha, sigma = (column(a, x_t.ndim).astype(compute) for a in process.alpha_sigma(t))
    return x0_from_prediction(prediction_type, pred, x_t.astype(compute), alpha, sigma,
                              process.sigma_data)
  return denoise_fn


def eps_fn_from(predict: PredictFn, process, prediction_type: str) -> PredictFn:
  """The network as a noise predictor `eps_fn(x_t, t) -> eps_hat` (the variational bound's form).
  """
  def eps_fn(x_t, t):
    pred = predict(process.net_input(x_t, t), process.net_time(t)).astype(x_t.dtype)
    if prediction_type == 'eps':
      return pred
    alpha, sigma = (column(a, x_t.ndim) for a in process.alpha_sigma(t))
    x0 = x0_from_prediction(prediction_type, pred, x_t, alpha, sigma, process.sigma_data)
    return (x_t - alpha * x0) / sigma
  return eps_fn


# --- training loss -------------------------------------------------------------------------------

def x0_weight(weighting: str, alpha: Array, sigma: Array, *, min_snr_gamma: float = 5.0,
              sigmoid_bias: float = 0.0, sigma_data: float = 0.5) -> Array:
  """The weight on ||D - x0||^2 of a loss weighting other than `none` (table above)."""
  snr = jnp.square(alpha / sigma)
  if weighting == 'min_snr':
    return jnp.minimum(snr, min_snr_gamma)
  if weighting == 'sigmoid':
    return snr * jax.nn.sigmoid(sigmoid_bias - jnp.log(snr))
  if weighting == 'edm':
    st2 = jnp.square(sigma / alpha)
    return (st2 + sigma_data ** 2) / (st2 * sigma_data ** 2)
  raise ValueError(f'diffusion.loss_weighting={weighting!r} is unknown; '
                   f'choose one of {LOSS_WEIGHTINGS}.')


def prediction_weight(weighting: str, prediction_type: str, alpha: Array, sigma: Array,
                      **kwargs) -> Array:
  """The weight on the prediction's own squared error: 1 for `none`, else
  x0_weight * x0_error_scale^2."""
  if weighting == 'none':
    return jnp.ones_like(alpha)
  scale = x0_error_scale(prediction_type, alpha, sigma, kwargs.get('sigma_data', 0.5))
  return x0_weight(weighting, alpha, sigma, **kwargs) * jnp.square(scale)


def eps_weight(weighting: str, prediction_type: str, alpha: Array, sigma: Array,
               **kwargs) -> Array:
  """The weight on ||eps - eps_hat||^2 that the loss of (weighting, prediction_type) amounts to
  at each noise level: every loss here is this weight on one and the same error (Kingma & Gao
  2023), so together with the density of the training times over log-SNR it compares them."""
  scale = x0_error_scale(prediction_type, alpha, sigma, kwargs.get('sigma_data', 0.5))
  return (prediction_weight(weighting, prediction_type, alpha, sigma, **kwargs)
          * jnp.square(sigma / alpha / scale))


def loss_per_example(predict: PredictFn, process, x0: Array, t: Array, noise: Array,
                     *, prediction_type: str = 'eps', loss_type: str = 'l2',
                     weighting: str = 'none', min_snr_gamma: float = 5.0,
                     sigmoid_bias: float = 0.0) -> Array:
  """The denoising loss of each example [B]: the weighted mean over pixels of
  |target - prediction|^p.

  With the ddpm process, prediction_type='eps', loss_type='l2' and no weighting this is DDPM's
  L_simple, ||eps - eps_theta||^2.
  """
  alpha, sigma = process.alpha_sigma(t)
  a, s = column(alpha, x0.ndim), column(sigma, x0.ndim)
  x_t = a * x0 + s * noise
  pred = predict(process.net_input(x_t, t), process.net_time(t)).astype(jnp.float32)
  err = pred - training_target(prediction_type, x0, noise, a, s, process.sigma_data)
  if loss_type == 'l2':
    per_pixel = jnp.square(err)
  elif loss_type == 'l1':
    per_pixel = jnp.abs(err)
  else:
    raise ValueError(f'diffusion.loss={loss_type!r} is unknown; choose one of {LOSS_TYPES}.')
  loss = jnp.mean(per_pixel, axis=tuple(range(1, x0.ndim)))
  if weighting != 'none':
    loss = loss * prediction_weight(weighting, prediction_type, alpha, sigma,
                                    min_snr_gamma=min_snr_gamma, sigmoid_bias=sigmoid_bias,
                                    sigma_data=process.sigma_data)
  return loss


# --- the discrete chain: q(x_t | x_0), the posterior q(x_{t-1} | x_t, x_0) -----------------------
# With a = sqrt(abar_t), s = sqrt(1 - abar_t): x_t = a x0 + s eps.

def _rates(schedule: Schedule, t: Array, shape):
  return (extract(schedule.sqrt_alphas_cumprod, t, shape),
          extract(schedule.sqrt_one_minus_alphas_cumprod, t, shape))


def q_mean_variance(schedule: Schedule, x0: Array, t: Array):
  """Mean [B, ...], variance and log-variance [B, 1, ...] of q(x_t | x_0)."""
  mean = extract(schedule.sqrt_alphas_cumprod, t, x0.shape) * x0
  var = 1.0 - extract(schedule.alphas_cumprod, t, x0.shape)
  return mean, var, jnp.log(var)


def q_sample(schedule: Schedule, x0: Array, t: Array, noise: Array) -> Array:
  """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise."""
  a, s = _rates(schedule, t, x0.shape)
  return a * x0 + s * noise


def q_posterior(schedule: Schedule, x0: Array, x_t: Array, t: Array):
  """Mean [B, ...], variance and clipped log-variance [B, 1, ...] of q(x_{t-1} | x_t, x_0)."""
  mean = (extract(schedule.posterior_mean_coef1, t, x_t.shape) * x0
          + extract(schedule.posterior_mean_coef2, t, x_t.shape) * x_t)
  var = extract(schedule.posterior_variance, t, x_t.shape)
  log_var = extract(schedule.posterior_log_variance_clipped, t, x_t.shape)
  return mean, var, log_var


def x0_from_eps(schedule: Schedule, x_t: Array, t: Array, eps: Array) -> Array:
  a, s = _rates(schedule, t, x_t.shape)
  return x0_from_prediction('eps', eps, x_t, a, s)


def snr(schedule: Schedule, t: Array) -> Array:
  """Signal-to-noise ratio abar_t / (1 - abar_t), [B]."""
  abar = schedule.alphas_cumprod[t]
  return abar / (1.0 - abar)


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
