"""The forward process, the posterior, parameterisations, losses and the variational bound."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import diffusion, processes, schedules

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


PROCESSES = {
    'ddpm': processes.DDPM(SCHED),
    'vp_cosine': processes.VP('cosine'),
    'vp_linear': processes.VP('linear'),
    'flow': processes.Flow(),
    'edm': processes.EDM(),
}
SD = 0.5  # sigma_data


def times(process):
  """Five times across the process's range, float64 (integers on the ddpm process)."""
  t = np.linspace(process.t_min, process.t_max, 5)
  return np.round(t) if process.discrete else t


def closed_forms(process, t):
  """alpha, sigma [5, 1] written here from each process's definition, float64."""
  if process.name == 'ddpm':
    abar = np.cumprod(1 - schedules.get_betas('linear', 1000))[t.astype(int)]
    a, s = np.sqrt(abar), np.sqrt(1 - abar)
  elif process.name == 'vp' and process.kind == 'cosine':
    f = lambda u: np.cos((u + 0.008) / 1.008 * np.pi / 2) ** 2
    abar = f(t) / f(0.0)
    a, s = np.sqrt(abar), np.sqrt(1 - abar)
  elif process.name == 'vp':
    abar = np.exp(-(0.1 * t + 0.5 * (20 - 0.1) * t ** 2))
    a, s = np.sqrt(abar), np.sqrt(1 - abar)
  elif process.name == 'flow':
    a, s = 1 - t, t
  else:
    a, s = np.ones_like(t), t
  return a[:, None], s[:, None]


@pytest.mark.parametrize('name', list(PROCESSES))
def test_processes_have_their_closed_forms_and_invert_their_log_snr(name):
  process = PROCESSES[name]
  t = times(process)
  a, s = closed_forms(process, t)
  got_a, got_s = process.alpha_sigma(t)
  rtol = 1e-6 if process.discrete else 1e-12  # the Schedule keeps its betas in float32
  np.testing.assert_allclose(got_a, a[:, 0], rtol=rtol)
  np.testing.assert_allclose(got_s, s[:, 0], rtol=rtol)
  back = process.t_of_logsnr(np.log(a[:, 0] ** 2 / s[:, 0] ** 2))
  np.testing.assert_allclose(back, t, rtol=1e-9, atol=1e-6 if process.discrete else 1e-9)
  # The float32 path used in jitted code agrees with the float64 one.
  ja, js = process.alpha_sigma(jnp.asarray(t, jnp.float32))
  np.testing.assert_allclose(ja, a[:, 0], rtol=2e-5, atol=1e-6)
  np.testing.assert_allclose(js, s[:, 0], rtol=2e-5, atol=1e-6)


def reference_target(pt, x0, eps, a, s):
  """Each parameterisation's target from its paper, NumPy float64."""
  st = s / a
  if pt == 'eps':
    return eps
  if pt == 'x0':
    return x0
  if pt == 'v':  # Salimans & Ho 2022: v = alpha eps - sigma x0
    return a * eps - s * x0
  if pt == 'flow':  # the velocity of x_t = (1 - t) x0 + t eps, eps - x0
    return eps - x0
  # EDM (Karras et al. 2022, Table 1 and eq. 8) on x / alpha, noise level sigma~:
  c_skip = SD ** 2 / (st ** 2 + SD ** 2)
  c_out = st * SD / np.sqrt(st ** 2 + SD ** 2)
  return (x0 - c_skip * (a * x0 + s * eps) / a) / c_out


@pytest.mark.parametrize('name', list(PROCESSES))
@pytest.mark.parametrize('pt', diffusion.PREDICTION_TYPES)
def test_every_prediction_converts_to_the_data_and_back(name, pt):
  """Round trips in float64: the target of each type converts to x0 exactly, and
  x0_error_scale is the size of that conversion's derivative."""
  process = PROCESSES[name]
  t = times(process)
  a, s = closed_forms(process, t)
  rng = np.random.default_rng(0)
  x0, eps = rng.uniform(-1, 1, (5, 3)), rng.standard_normal((5, 3))
  x_t = a * x0 + s * eps
  with jax.enable_x64(True):
    target = np.asarray(diffusion.training_target(pt, x0, eps, a, s, SD))
    np.testing.assert_allclose(target, reference_target(pt, x0, eps, a, s), rtol=1e-10,
                               atol=1e-10)
    back = np.asarray(diffusion.x0_from_prediction(pt, target, x_t, a, s, SD))
    np.testing.assert_allclose(back, x0, rtol=1e-9, atol=1e-9)
    delta = 1e-6
    moved = np.asarray(diffusion.x0_from_prediction(pt, target + delta, x_t, a, s, SD))
    scale = np.asarray(diffusion.x0_error_scale(pt, a, s, SD))
    np.testing.assert_allclose(np.abs(moved - back) / delta, np.broadcast_to(scale, back.shape),
                               rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize('name', list(PROCESSES))
@pytest.mark.parametrize('pt', diffusion.PREDICTION_TYPES)
def test_loss_is_zero_for_the_exact_prediction(name, pt):
  process = PROCESSES[name]
  process.sigma_data = SD
  k = jax.random.split(jax.random.PRNGKey(3), 2)
  x0 = jax.random.uniform(k[0], (5, 2))
  noise = jax.random.normal(k[1], x0.shape)
  t = jnp.asarray(times(process), jnp.float32)
  a, s = (np.asarray(v, np.float64)[:, None] for v in process.alpha_sigma(t))
  target = reference_target(pt, np.asarray(x0, np.float64), np.asarray(noise, np.float64), a, s)
  exact = lambda x, tt: jnp.asarray(target, jnp.float32)
  loss = diffusion.loss_per_example(exact, process, x0, t, noise, prediction_type=pt)
  np.testing.assert_allclose(loss, 0.0, atol=1e-6 * max(1.0, float(np.abs(target).max())))
  l2 = diffusion.loss_per_example(lambda x, tt: exact(x, tt) + 0.5, process, x0, t, noise,
                                  prediction_type=pt)
  l1 = diffusion.loss_per_example(lambda x, tt: exact(x, tt) + 0.5, process, x0, t, noise,
                                  prediction_type=pt, loss_type='l1')
  np.testing.assert_allclose(l2, 0.25, rtol=1e-3)
  np.testing.assert_allclose(l1, 0.5, rtol=1e-3)


def test_the_network_sees_what_each_process_documents():
  seen = {}

  def predict(x_in, t_net):
    seen['x'], seen['t'] = x_in, t_net
    return jnp.zeros_like(x_in)
  x = jnp.full((2, 3), 2.0)
  for process, t, want_x, want_t in (
      (PROCESSES['ddpm'], jnp.array([3.0, 700.0]), 2.0, [3.0, 700.0]),
      (PROCESSES['flow'], jnp.array([0.25, 0.5]), 2.0, [250.0, 500.0]),
      (PROCESSES['edm'], jnp.array([0.5, 80.0]), None, None)):
    diffusion.denoiser(predict, process, 'eps')(x, t)
    if want_x is None:  # EDM: c_in x, 1000 ln(sigma) / 4
      want_x = 2.0 / np.sqrt(np.array([0.5, 80.0]) ** 2 + SD ** 2)[:, None]
      want_t = 250.0 * np.log([0.5, 80.0])
    np.testing.assert_allclose(np.broadcast_to(seen['x'], (2, 3)),
                               np.broadcast_to(want_x, (2, 3)), rtol=1e-6)
    np.testing.assert_allclose(seen['t'], want_t, rtol=1e-6)


@pytest.mark.parametrize('pt', diffusion.PREDICTION_TYPES)
def test_loss_weightings_are_their_closed_forms_on_the_data_error(pt):
  """Each weighting, on the prediction's own squared error, equals the paper's weight on
  ||D - x0||^2: min_snr min(SNR, gamma), sigmoid SNR sigmoid(b - log SNR), edm
  (sigma~^2 + sd^2) / (sigma~ sd)^2; `none` is the prediction's plain error."""
  process = PROCESSES['ddpm']
  t = times(process)[1:]
  a, s = closed_forms(process, t)
  a, s = a[:, 0], s[:, 0]
  snr = a ** 2 / s ** 2
  st = s / a
  want = {
      'min_snr': np.minimum(snr, 5.0),
      'sigmoid': snr / (1 + np.exp(np.log(snr) - 2.0)),
      'edm': (st ** 2 + SD ** 2) / (st * SD) ** 2,
  }
  with jax.enable_x64(True):
    scale = np.asarray(diffusion.x0_error_scale(pt, a, s, SD))
    for weighting, x0_weight in want.items():
      got = diffusion.prediction_weight(weighting, pt, a, s, min_snr_gamma=5.0,
                                        sigmoid_bias=2.0, sigma_data=SD)
      np.testing.assert_allclose(got, x0_weight * scale ** 2, rtol=1e-9)
    np.testing.assert_allclose(diffusion.prediction_weight('none', pt, a, s), 1.0)
    # The Min-SNR weights per target (Hang et al. 2023) on a VP process.
    if pt in ('eps', 'x0', 'v'):
      old = {'eps': np.minimum(snr, 5) / snr, 'x0': np.minimum(snr, 5),
             'v': np.minimum(snr, 5) / (snr + 1)}[pt]
      np.testing.assert_allclose(diffusion.prediction_weight('min_snr', pt, a, s), old,
                                 rtol=1e-9)


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
  abar = sched.alphas_cumprod
  exact = lambda xt, t: ((xt - jnp.sqrt(abar[t])[:, None] * 0.5)
                         / jnp.sqrt(1 - abar[t])[:, None])
  bpd = np.asarray(diffusion.bits_per_dim(exact, sched, x0, jax.random.PRNGKey(0)))
  prior = np.asarray(diffusion.prior_bpd(sched, x0))
  dec_std = math.exp(0.5 * float(sched.posterior_log_variance_clipped[0]))
  # The decoder's mean is x0 exactly, so its NLL is that of the central bin.
  import scipy.stats  # pylint: disable=g-import-not-at-top
  p = scipy.stats.norm.cdf(1 / 255, scale=dec_std) - scipy.stats.norm.cdf(-1 / 255, scale=dec_std)
  np.testing.assert_allclose(bpd, prior - math.log2(p), rtol=1e-3)


def test_every_loss_is_a_weight_on_the_noise_error():
  """eps_weight in closed form: L_simple 1, x0-prediction 1 / SNR, Min-SNR min(SNR, gamma) / SNR,
  EDM's (sigma^2 + sd^2) / sd^2 (alpha = 1), and the flow velocity (alpha + sigma)^2 / alpha^2."""
  with jax.enable_x64(True):
    a, s = closed_forms(PROCESSES['ddpm'], times(PROCESSES['ddpm'])[1:])
    snr = (a / s) ** 2
    np.testing.assert_allclose(diffusion.eps_weight('none', 'eps', a, s), 1.0)
    np.testing.assert_allclose(diffusion.eps_weight('none', 'x0', a, s), 1 / snr, rtol=1e-9)
    np.testing.assert_allclose(diffusion.eps_weight('min_snr', 'v', a, s, min_snr_gamma=5.0),
                               np.minimum(snr, 5) / snr, rtol=1e-9)
    a, s = closed_forms(PROCESSES['edm'], times(PROCESSES['edm']))
    np.testing.assert_allclose(diffusion.eps_weight('edm', 'edm', a, s, sigma_data=SD),
                               (s ** 2 + SD ** 2) / SD ** 2, rtol=1e-9)
    a, s = closed_forms(PROCESSES['flow'], times(PROCESSES['flow']))
    np.testing.assert_allclose(diffusion.eps_weight('none', 'flow', a, s), ((a + s) / a) ** 2,
                               rtol=1e-9)
