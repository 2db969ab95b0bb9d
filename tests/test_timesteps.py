"""Each spacing gives the timesteps its docstring writes down (T = 1000, S = 10, worked by hand)."""

import numpy as np
import pytest

from diffusion_jax import schedules, timesteps

ABAR = np.cumprod(1.0 - schedules.get_betas('linear', 1000))


@pytest.mark.parametrize('spacing,expected', [
    ('leading', [0, 100, 200, 300, 400, 500, 600, 700, 800, 900]),  # i * (T // S)
    ('uniform', [0, 100, 200, 300, 400, 500, 600, 700, 800, 900]),  # the old name of leading
    ('trailing', [99, 199, 299, 399, 499, 599, 699, 799, 899, 999]),  # round(T - iT/S) - 1
    # round(linspace(0, 999, 11)) = 0, 99.9, 199.8, ..., 499.5 (to even: 500), 599.4, ..., 999
    ('linspace', [100, 200, 300, 400, 500, 599, 699, 799, 899, 999]),
    # floor(i^2 * 800 / 81): 9.88, 39.5, 88.9, 158.0, 246.9, 355.6, 483.9, 632.1, 800
    ('quadratic', [0, 9, 39, 88, 158, 246, 355, 483, 632, 800]),
])
def test_documented_timesteps(spacing, expected):
  np.testing.assert_array_equal(timesteps.sampler_timesteps(ABAR, 10, spacing), expected)


def test_karras_sigmas_follow_eq_5():
  mid = ((10.0 ** (1 / 7) + 0.1 ** (1 / 7)) / 2) ** 7
  np.testing.assert_allclose(timesteps.karras_sigmas(0.1, 10.0, 3), [10.0, mid, 0.1])


def test_karras_timesteps_are_the_nearest_trained_noise_levels():
  sig = np.sqrt((1 - ABAR) / ABAR)
  got = timesteps.sampler_timesteps(ABAR, 10, 'karras')
  assert got[0] == 0 and got[-1] == 999 and len(got) == 10
  wanted = timesteps.karras_sigmas(sig[0], sig[-1], 10)[::-1]
  for t, s in zip(got, wanted):
    # No other trained timestep is nearer in log sigma than half a step of t.
    gap = np.abs(np.log(sig) - np.log(s))
    assert gap[t] <= np.sort(gap)[1] + 1e-12, (t, s)
  # Denser than uniform at low noise (Karras et al.'s point): the second is below T / S.
  assert got[1] < 100


def test_logsnr_timesteps_are_evenly_spaced_in_log_snr():
  lam = -np.log(np.sqrt((1 - ABAR) / ABAR))
  got = timesteps.sampler_timesteps(ABAR, 12, 'logsnr')
  assert got[0] == 0 and got[-1] == 999 and len(got) == 12
  wanted = np.linspace(lam[0], lam[-1], 12)
  for t, target in zip(got, wanted):
    gap = np.abs(lam - target)
    assert gap[t] <= np.sort(gap)[1] + 1e-12, (t, target)


def test_repeated_timesteps_are_dropped():
  quad = timesteps.sampler_timesteps(ABAR, 1000, 'quadratic')
  assert len(quad) < 1000 and np.all(np.diff(quad) > 0)
  for spacing in timesteps.SPACINGS:
    got = timesteps.sampler_timesteps(ABAR, 1, spacing)
    assert len(got) == 1 and 0 <= got[0] < 1000
