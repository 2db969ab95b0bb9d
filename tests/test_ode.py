"""The probability-flow ODE against closed forms: Gaussian data N(0, S) with its exact denoiser.

In y = x / alpha at noise level s = sigma~ the data are N(0, S + s^2 I), the ODE's flow maps
those marginals onto each other exactly, and log p and the samples have closed forms, in float64.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import ode, processes, schedules

DIM = 4
ROT = np.linalg.qr(np.random.default_rng(0).normal(size=(DIM, DIM)))[0]
VARIANCES = np.array([0.05, 0.2, 0.5, 1.5])  # eigenvalues of S
COV = ROT @ np.diag(VARIANCES) @ ROT.T

PROCESSES = {
    'ddpm': lambda: processes.DDPM(schedules.Schedule.from_betas(
        schedules.get_betas('linear', 1000))),
    'vp': lambda: processes.VP('cosine'),
    'flow': processes.Flow,
    'edm': processes.EDM,
}


def exact_denoiser(process):
  """D(x_t, t) = S (S + s^2 I)^{-1} x_t / alpha: the posterior mean of x0 under N(0, S)."""
  def denoise_fn(x, t):
    alpha, sigma = process.alpha_sigma(t)
    s2 = (sigma / alpha) ** 2
    gain = VARIANCES / (VARIANCES + s2[:, None])  # [B, DIM] in the eigenbasis
    y = x / alpha[:, None]
    return ((y @ ROT) * gain) @ ROT.T
  return denoise_fn


def log_normal(x, cov):
  """log N(x; 0, cov) of each row, float64."""
  _, logdet = np.linalg.slogdet(cov)
  quad = np.einsum('bi,ij,bj->b', x, np.linalg.inv(cov), x)
  return -0.5 * (quad + logdet + x.shape[1] * math.log(2 * math.pi))


@pytest.mark.parametrize('name', list(PROCESSES))
def test_the_adaptive_solve_reaches_the_closed_form_to_its_tolerance(name):
  with jax.enable_x64(True):
    process = PROCESSES[name]()
    x_T = jax.random.normal(jax.random.PRNGKey(0), (64, DIM), jnp.float64)
    rtol = 1e-6
    x0, calls = jax.jit(lambda x: ode.sample(exact_denoiser(process), process, x, rtol=rtol,
                                             atol=rtol, clip_x0=False))(x_T)
    u_min, u_max = ode.u_range(process)
    s_min2, s_max2 = math.exp(2 * u_min), math.exp(2 * u_max)
    # y_T = sqrt(1 + s_max^2) x_T flows to y = sqrt((S + s_min^2) / (S + s_max^2)) y_T; the last
    # data prediction multiplies it by S / (S + s_min^2). In the eigenbasis, per coordinate:
    z_T = np.asarray(x_T) @ ROT * math.sqrt(1 + s_max2)
    z_0 = z_T * np.sqrt((VARIANCES + s_min2) / (VARIANCES + s_max2)) * (
        VARIANCES / (VARIANCES + s_min2))
    expected = z_0 @ ROT.T
    np.testing.assert_allclose(np.asarray(x0), expected, rtol=0, atol=2e-4)
    assert calls.shape == (64,) and np.all(np.asarray(calls) > 2 + 1)


@pytest.mark.parametrize('name', ['ddpm', 'flow', 'edm'])
def test_the_likelihood_is_the_closed_form(name):
  with jax.enable_x64(True):
    process = PROCESSES[name]()
    u_min, u_max = ode.u_range(process)
    s_min2, s_max2 = math.exp(2 * u_min), math.exp(2 * u_max)
    x0 = np.random.default_rng(1).multivariate_normal(np.zeros(DIM), COV, size=16)
    log_p, calls = jax.jit(lambda x: ode.log_likelihood(
        exact_denoiser(process), process, x, jax.random.PRNGKey(0), probes=0, rtol=1e-7,
        atol=1e-7))(jnp.asarray(x0))
    log_p = np.asarray(log_p)
    # What the ODE computes: the flow of N(0, S + s_min^2 I) onto N(0, S + s_max^2 I), whose
    # end point is scored by the prior N(0, (1 + s_max^2) I).
    flow_end = x0 @ ROT * np.sqrt((VARIANCES + s_max2) / (VARIANCES + s_min2))
    computed = (log_normal(flow_end, (1 + s_max2) * np.eye(DIM))
                + 0.5 * np.sum(np.log((VARIANCES + s_max2) / (VARIANCES + s_min2))))
    np.testing.assert_allclose(log_p, computed, rtol=1e-6, atol=1e-6)
    # Against the data's own density: within 1% in bits/dim.
    truth = log_normal(x0, COV)
    bpd, bpd_truth = (ode.bits_per_dim(v, DIM, bin_width=None) for v in (log_p, truth))
    assert np.all(np.abs(bpd - bpd_truth) <= 0.01 * np.abs(bpd_truth)), (bpd, bpd_truth)
    assert np.all(np.asarray(calls) > 0)


def test_hutchinsons_estimate_is_unbiased():
  """Rademacher and Gaussian probes: the mean over many paths of the same point is the exact
  log p within three standard errors (the rotated covariance makes the Jacobian non-diagonal,
  so a single probe is not exact)."""
  with jax.enable_x64(True):
    process = processes.Flow()
    x0 = jnp.tile(jnp.asarray([[0.3, -0.2, 0.5, 0.1]], jnp.float64), (128, 1))
    exact, _ = ode.log_likelihood(exact_denoiser(process), process, x0[:1],
                                  jax.random.PRNGKey(0), probes=0, rtol=1e-5, atol=1e-5)
    for kind in ode.PROBES:
      estimate, _ = ode.log_likelihood(exact_denoiser(process), process, x0,
                                       jax.random.PRNGKey(1), probes=1, probe_kind=kind,
                                       rtol=1e-5, atol=1e-5)
      estimate = np.asarray(estimate)
      assert estimate.std() > 1e-3  # the probes do vary the estimate
      stderr = estimate.std() / math.sqrt(len(estimate))
      assert abs(estimate.mean() - float(exact[0])) < 3 * stderr, (kind, estimate.mean(), exact)


def test_the_network_calls_reported_are_those_made():
  counted = []
  process = processes.Flow()
  exact = exact_denoiser(process)

  def counting(x, t):
    jax.debug.callback(lambda n: counted.append(int(n)), x.shape[0])
    return exact(x, t)
  with jax.enable_x64(True):  # as the other tests here (diffrax keeps traces across the switch)
    x = jax.random.normal(jax.random.PRNGKey(0), (1, DIM), jnp.float64)
    _, calls = ode.sample(counting, process, x, rtol=1e-3, atol=1e-3, clip_x0=False)
    jax.effects_barrier()
    assert int(calls[0]) == len(counted) > 10
    counted.clear()
    _, calls = ode.log_likelihood(counting, process, x, jax.random.PRNGKey(0))
    jax.effects_barrier()
    assert int(calls[0]) == len(counted) > 10


def test_dequantisation_and_bits_per_dim():
  x = jnp.asarray(np.arange(256) / 127.5 - 1.0, jnp.float32)[:, None]
  noisy = ode.dequantize(x, jax.random.PRNGKey(0))
  assert np.all(np.abs(np.asarray(noisy - x)) <= ode.BIN_WIDTH_8BIT / 2 + 1e-7)
  # A uniform density over [-1 - w/2, 1 + w/2] is log(1 / (256 w)) per dim: 8 bits exactly.
  w = ode.BIN_WIDTH_8BIT
  log_p = 3 * math.log(1 / (256 * w))
  assert float(ode.bits_per_dim(log_p, 3)) == pytest.approx(8.0)
