"""Post-hoc EMA math (EDM2, Appendix C) against closed forms, integrals and synthetic runs."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate

from diffusion_jax import phema


@pytest.mark.parametrize('sigma_rel', [0.02, 0.05, 0.1, 0.17, 0.25, 0.3])
def test_sigma_rel_and_gamma_round_trip(sigma_rel):
  gamma = phema.sigma_rel_to_gamma(sigma_rel)
  assert phema.gamma_to_sigma_rel(gamma) == pytest.approx(sigma_rel, rel=1e-9)
  s = sigma_rel ** -2  # gamma is a root of the cubic of EDM2 eq. 126
  assert gamma ** 3 + 7 * gamma ** 2 + (16 - s) * gamma + (12 - s) == pytest.approx(0, abs=1e-6)
  # and the width of tau^gamma on [0, 1] (EDM2 eq. 123) is sigma_rel, by integration:
  mean = (gamma + 1) / (gamma + 2)
  var = (gamma + 1) / (gamma + 3) - mean ** 2
  assert math.sqrt(var) == pytest.approx(sigma_rel, rel=1e-9)
  with pytest.raises(ValueError, match='sigma_rel'):
    phema.sigma_rel_to_gamma(0.31)


def track(values, sigma_rels):
  """Tracked averages of a trajectory values [T, ...] (float64), after each step."""
  with jax.enable_x64(True):
    ema = phema.power_ema(sigma_rels)
    averages = ema.init(jnp.asarray(values[0]))
    out = []
    for t, v in enumerate(values, start=1):
      averages = ema.update(averages, jnp.asarray(v), t)
      out.append([np.asarray(a) for a in averages])
  return out


def test_tracked_profile_is_the_power_function_average():
  rng = np.random.default_rng(0)
  values = np.cumsum(rng.standard_normal((1000, 3)), axis=0) + np.linspace(0, 5, 1000)[:, None]
  gamma = phema.sigma_rel_to_gamma(0.1)
  got = track(values, [0.1])
  tau = np.arange(1, 1001, dtype=np.float64)
  for t in (1, 10, 250, 1000):
    # The recursion's exact weights: (tau^(g+1) - (tau-1)^(g+1)) / t^(g+1).
    w = (tau[:t] ** (gamma + 1) - (tau[:t] - 1) ** (gamma + 1)) / t ** (gamma + 1)
    np.testing.assert_allclose(got[t - 1][0], w @ values[:t], rtol=1e-10)
  # The closed form (g+1)/t^(g+1) sum tau^g theta(tau) is its continuous limit: its weights sum
  # to 1 + (g+1)/(2t) (1.004 here), and it agrees to that order.
  closed = (gamma + 1) / 1000 ** (gamma + 1) * (tau ** gamma) @ values
  assert (gamma + 1) / 1000 ** (gamma + 1) * np.sum(tau ** gamma) == pytest.approx(
      1 + (gamma + 1) / 2000, rel=1e-4)
  np.testing.assert_allclose(got[-1][0], closed, rtol=(gamma + 1) / 2000 + 1e-3)


def test_float32_tracking_keeps_the_newest_weight_at_large_steps():
  gamma = phema.sigma_rel_to_gamma(0.05)
  for t in (1, 2, 1000, 100_000, 1_000_000):
    exact = 1 - (1 - 1 / t) ** (gamma + 1)  # float64
    got = float(phema.one_minus_beta(gamma, t, jnp.float32))
    assert got == pytest.approx(exact, rel=1e-5), t


def test_inner_products_are_integrals_of_the_profiles():
  def profile(tau, t, g):
    return (g + 1) * tau ** g / t ** (g + 1) if tau <= t else 0.0

  def product(tau, t_a, g_a, t_b, g_b):
    return profile(tau, t_a, g_a) * profile(tau, t_b, g_b)

  for (t_a, s_a), (t_b, s_b) in [((100, 0.05), (300, 0.1)), ((500, 0.1), (200, 0.05)),
                                 ((400, 0.2), (400, 0.02))]:
    g_a, g_b = phema.sigma_rel_to_gamma(s_a), phema.sigma_rel_to_gamma(s_b)
    numeric = integrate.quad(product, 0, min(t_a, t_b), args=(t_a, g_a, t_b, g_b), limit=200)[0]
    assert phema.profile_inner_products(t_a, g_a, t_b, g_b) == pytest.approx(numeric, rel=1e-7)


def test_a_stored_profile_reconstructs_to_itself():
  steps = np.repeat(np.arange(100, 1001, 100), 2)
  gammas = np.tile([phema.sigma_rel_to_gamma(0.05), phema.sigma_rel_to_gamma(0.1)], 10)
  w = phema.reconstruction_weights(steps, gammas, 0.05, 500)
  one_hot = np.zeros(20)
  one_hot[8] = 1.0  # (step 500, sigma_rel 0.05)
  np.testing.assert_allclose(w, one_hot, atol=1e-6)
  assert w.sum() == pytest.approx(1.0)


def test_a_third_width_is_reconstructed_from_two_stored_ones():
  """A synthetic run (a drifting random walk, as parameters under SGD noise) tracks 0.05, 0.10
  and 0.07; the 0.07 average at the end is rebuilt from snapshots of the other two alone."""
  rng = np.random.default_rng(1)
  t_end, every = 2000, 100
  values = (np.cumsum(rng.standard_normal((t_end, 64)), axis=0) * 0.1
            + np.sin(np.arange(1, t_end + 1) / 300.0)[:, None] * rng.standard_normal(64))
  tracked = track(values, [0.05, 0.1, 0.07])
  steps = np.arange(every, t_end + 1, every)
  snaps = np.stack([tracked[s - 1][j] for s in steps for j in (0, 1)])  # [40, 64]
  gammas = np.tile([phema.sigma_rel_to_gamma(0.05), phema.sigma_rel_to_gamma(0.1)], len(steps))
  w = phema.reconstruction_weights(np.repeat(steps, 2), gammas, 0.07, t_end)
  target = tracked[-1][2]
  scale = np.linalg.norm(target - values.mean(0))
  err = np.linalg.norm(w @ snaps - target) / scale
  err_05 = np.linalg.norm(tracked[-1][0] - target) / scale
  err_10 = np.linalg.norm(tracked[-1][1] - target) / scale
  assert err < 1e-3, err  # measured 1.1e-4 (relative to the average's distance from the mean)
  assert err < 0.01 * min(err_05, err_10), (err, err_05, err_10)  # those are 0.13 and 0.17
