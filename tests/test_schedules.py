"""Schedules: the DESIGN.md contract and the closed forms."""

import math

import numpy as np
import pytest

from diffusion_jax import schedules


@pytest.mark.parametrize('name', schedules.SCHEDULES)
def test_alphas_cumprod_is_cumulative_product(name):
  betas = schedules.get_betas(name, 1000)
  s = schedules.Schedule.from_betas(betas)
  np.testing.assert_allclose(s.alphas_cumprod, np.cumprod(1.0 - betas), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(s.alphas_cumprod_prev[0], 1.0)
  np.testing.assert_allclose(s.alphas_cumprod_prev[1:], s.alphas_cumprod[:-1], rtol=1e-6)
  assert np.all((betas > 0) & (betas <= 0.999))
  assert np.all(np.diff(np.asarray(s.alphas_cumprod)) < 0)


def test_linear_is_ddpm():
  np.testing.assert_allclose(schedules.get_betas('linear', 1000), np.linspace(1e-4, 0.02, 1000))


def test_cosine_endpoints_and_clip():
  t_steps = 1000
  betas = schedules.get_betas('cosine', t_steps)
  abar = np.cumprod(1 - betas)
  f = lambda t: math.cos((t / t_steps + 0.008) / 1.008 * math.pi / 2) ** 2
  np.testing.assert_allclose(abar[0], f(1) / f(0), rtol=1e-10)
  np.testing.assert_allclose(abar[499], f(500) / f(0), rtol=1e-8)
  assert betas.max() == pytest.approx(0.999)  # the final beta is clipped
  assert abar[-1] < 1e-6


def test_offset_cosine_signal_rate_endpoints():
  abar = np.cumprod(1 - schedules.get_betas('offset_cosine', 1000))
  np.testing.assert_allclose(np.sqrt(abar[0]), 0.95, rtol=1e-10)
  np.testing.assert_allclose(np.sqrt(abar[-1]), 0.02, rtol=1e-8)
  # The angle is linear in t, so the signal rate is a cosine of a linear function.
  angles = np.arccos(np.sqrt(abar))
  np.testing.assert_allclose(np.diff(angles, 2), 0.0, atol=1e-9)


def test_sigmoid_is_monotone_and_reaches_noise():
  abar = np.cumprod(1 - schedules.get_betas('sigmoid', 1000))
  assert abar[0] > 0.99 and abar[-1] < 1e-3


def test_posterior_coefficients_match_formulas():
  betas = schedules.get_betas('linear', 100)
  s = schedules.Schedule.from_betas(betas)
  abar = np.cumprod(1 - betas)
  abar_prev = np.concatenate([[1.0], abar[:-1]])
  var = betas * (1 - abar_prev) / (1 - abar)
  np.testing.assert_allclose(s.posterior_variance, var, rtol=1e-5)
  np.testing.assert_allclose(s.posterior_log_variance_clipped[0], np.log(var[1]), rtol=1e-5)
  np.testing.assert_allclose(s.posterior_mean_coef1, betas * np.sqrt(abar_prev) / (1 - abar),
                             rtol=1e-5)
  np.testing.assert_allclose(s.posterior_mean_coef2,
                             (1 - abar_prev) * np.sqrt(1 - betas) / (1 - abar), rtol=1e-5)


def test_unknown_schedule_names_the_setting():
  with pytest.raises(ValueError, match='diffusion.schedule'):
    schedules.get_betas('quadratic-ish', 10)
