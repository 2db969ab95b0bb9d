"""The forward process, the posterior, parameterisations, losses and the variational bound."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import diffusion, schedules

SCHED = schedules.Schedule.from_betas(schedules.get_betas('linear', 1000))


def test_q_sample_has_closed_form_mean_and_variance():
  x0 = jnp.array([0.7, -0.3])
  n = 200_000
  t = jnp.full((n,), 400, jnp.int32)
  noise = jax.random.normal(jax.random.PRNGKey(0), (n, 2))
  xt = np.asarray(diffusion.q_sample(SCHED, jnp.broadcast_to(x0, (n, 2)), t, noise))
  abar = float(SCHED.alphas_cumprod[400])
  np.testing.assert_allclose(xt.mean(0), math.sqrt(abar) * np.asarray(x0), atol=5e-3)
  np.testing.assert_allclose(xt.var(0), 1 - abar, rtol=1e-2)


def test_posterior_is_bayes_rule_for_gaussian_data():
  """For a point mass x0 the joint of (x_{t-1}, x_t) is Gaussian: condition it directly."""
  x0 = jnp.array([[0.5]])
  for t in (1, 10, 500, 999):
    abar_prev = float(SCHED.alphas_cumprod_prev[t])
    beta = float(SCHED.betas[t])
    # x_{t-1} ~ N(sqrt(abar_prev) x0, 1 - abar_prev); x_t | x_{t-1} ~ N(sqrt(1-beta) x_{t-1}, beta)
    m1, v1 = math.sqrt(abar_prev) * 0.5, 1 - abar_prev
    a = math.sqrt(1 - beta)
    x_t = 0.3
    # Bayes: precision-weighted combination.
    var = 1 / (1 / v1 + a * a / beta)
    mean = var * (m1 / v1 + a * x_t / beta)
    got_mean, got_var, got_logvar = diffusion.q_posterior(
        SCHED, x0, jnp.array([[x_t]]), jnp.array([t], jnp.int32))
    np.testing.assert_allclose(float(got_mean[0, 0]), mean, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(float(got_var[0, 0]), var, rtol=1e-4)
    np.testing.assert_allclose(float(got_logvar[0, 0]), math.log(var), rtol=1e-4)


def test_posterior_matches_empirical_conditional():
  """Monte Carlo: draw (x_{t-1}, x_t) from the forward chain and regress x_{t-1} on x_t."""
  t = 300
  n = 400_000
  k1, k2 = jax.random.split(jax.random.PRNGKey(1))
  x0 = 0.8
  abar_prev = float(SCHED.alphas_cumprod_prev[t])
  beta = float(SCHED.betas[t])
  x_prev = math.sqrt(abar_prev) * x0 + math.sqrt(1 - abar_prev) * jax.random.normal(k1, (n,))
  x_t = math.sqrt(1 - beta) * x_prev + math.sqrt(beta) * jax.random.normal(k2, (n,))
  x_prev, x_t = np.asarray(x_prev), np.asarray(x_t)
  slope, intercept = np.polyfit(x_t, x_prev, 1)
  resid_var = np.var(x_prev - (slope * x_t + intercept))
  np.testing.assert_allclose(slope, float(SCHED.posterior_mean_coef2[t]), rtol=2e-2)
  np.testing.assert_allclose(intercept, float(SCHED.posterior_mean_coef1[t]) * x0, atol=5e-3)
  np.testing.assert_allclose(resid_var, float(SCHED.posterior_variance[t]), rtol=2e-2)


def test_eps_x0_v_round_trips():
  k = jax.random.split(jax.random.PRNGKey(2), 2)
  x0 = jax.random.uniform(k[0], (6, 4, 4, 3), minval=-1, maxval=1)
  eps = jax.random.normal(k[1], x0.shape)
  t = jnp.array([0, 1, 10, 400, 900, 999], jnp.int32)
  xt = diffusion.q_sample(SCHED, x0, t, eps)
  v = diffusion.v_from_eps(SCHED, x0, t, eps)
  np.testing.assert_allclose(diffusion.x0_from_eps(SCHED, xt, t, eps), x0, atol=2e-3)
  np.testing.assert_allclose(diffusion.eps_from_x0(SCHED, xt, t, x0), eps, atol=2e-3)
  np.testing.assert_allclose(diffusion.x0_from_v(SCHED, xt, t, v), x0, atol=1e-5)
  np.testing.assert_allclose(diffusion.eps_from_v(SCHED, xt, t, v), eps, atol=1e-5)
  for pt, pred in (('eps', eps), ('x0', x0), ('v', v)):
    np.testing.assert_allclose(diffusion.eps_from_prediction(SCHED, pt, xt, t, pred), eps,
                               atol=2e-3)


@pytest.mark.parametrize('prediction_type', diffusion.PREDICTION_TYPES)
def test_loss_is_zero_for_the_exact_prediction(prediction_type):
  k = jax.random.split(jax.random.PRNGKey(3), 2)
  x0 = jax.random.uniform(k[0], (4, 2))
  noise = jax.random.normal(k[1], x0.shape)
  t = jnp.array([5, 50, 500, 950], jnp.int32)
  target = diffusion.training_target(SCHED, prediction_type, x0, t, noise)
  loss = diffusion.loss_per_example(lambda x, tt: target, SCHED, x0, t, noise,
                                    prediction_type=prediction_type)
  np.testing.assert_allclose(loss, 0.0, atol=1e-12)
  l2 = diffusion.loss_per_example(lambda x, tt: target + 0.5, SCHED, x0, t, noise,
                                  prediction_type=prediction_type)
  l1 = diffusion.loss_per_example(lambda x, tt: target + 0.5, SCHED, x0, t, noise,
                                  prediction_type=prediction_type, loss_type='l1')
  np.testing.assert_allclose(l2, 0.25, rtol=1e-6)
  np.testing.assert_allclose(l1, 0.5, rtol=1e-6)


def test_min_snr_weights():
  t = jnp.array([10, 500, 990], jnp.int32)
  snr = np.asarray(diffusion.snr(SCHED, t))
  gamma = 5.0
  np.testing.assert_allclose(diffusion.min_snr_weight(SCHED, t, 'eps', gamma),
                             np.minimum(snr, gamma) / snr, rtol=1e-5)
  np.testing.assert_allclose(diffusion.min_snr_weight(SCHED, t, 'x0', gamma),
                             np.minimum(snr, gamma), rtol=1e-5)
  np.testing.assert_allclose(diffusion.min_snr_weight(SCHED, t, 'v', gamma),
                             np.minimum(snr, gamma) / (snr + 1), rtol=1e-5)


def test_normal_kl_closed_form_and_zero():
  assert float(diffusion.normal_kl(0.3, 0.1, 0.3, 0.1)) == pytest.approx(0.0, abs=1e-7)
  m1, lv1, m2, lv2 = 0.2, math.log(0.5), -0.1, math.log(2.0)
  want = math.log(math.sqrt(2.0 / 0.5)) + (0.5 + 0.3 ** 2) / (2 * 2.0) - 0.5
  assert float(diffusion.normal_kl(m1, lv1, m2, lv2)) == pytest.approx(want, rel=1e-6)


def test_discretized_likelihood_sums_to_one_over_256_bins():
  values = jnp.linspace(-1.0, 1.0, 256)
  logp = diffusion.discretized_gaussian_log_likelihood(values, jnp.float32(0.1),
                                                       jnp.float32(math.log(0.3)))
  assert float(jnp.exp(logp).sum()) == pytest.approx(1.0, abs=2e-3)


def test_bits_per_dim_of_the_exact_denoiser_of_a_point_mass():
  """For data at one point, the exact eps predictor makes every KL term ~0 (small variance):
  the bound is then the prior term plus the decoder's NLL, both computable."""
  sched = schedules.Schedule.from_betas(schedules.get_betas('linear', 50, beta_end=0.3))
  x0 = jnp.full((2, 3), 0.5)
  exact = lambda xt, t: diffusion.eps_from_x0(sched, xt, t, jnp.full_like(xt, 0.5))
  bpd = np.asarray(diffusion.bits_per_dim(exact, sched, x0, jax.random.PRNGKey(0)))
  prior = np.asarray(diffusion.prior_bpd(sched, x0))
  dec_std = math.exp(0.5 * float(sched.posterior_log_variance_clipped[0]))
  # The decoder's mean is x0 exactly, so its NLL is that of the central bin.
  import scipy.stats  # pylint: disable=g-import-not-at-top
  p = scipy.stats.norm.cdf(1 / 255, scale=dec_std) - scipy.stats.norm.cdf(-1 / 255, scale=dec_std)
  np.testing.assert_allclose(bpd, prior - math.log2(p), rtol=1e-3)
