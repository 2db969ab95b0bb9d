"""The laws of training times on every process, and the time grids of continuous processes,
against the distributions and formulas that define them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import processes, schedules, timesteps

DDPM = processes.DDPM(schedules.Schedule.from_betas(schedules.get_betas('cosine', 1000)))
FLOW, EDM, VP = processes.Flow(), processes.EDM(), processes.VP('linear')
N = 40_000
KEYS = jax.random.split(jax.random.PRNGKey(0), N)
INDEX = jnp.arange(N)


def draw(process, method, **kwargs):
  return np.asarray(processes.training_times(process, KEYS, INDEX, N, method, **kwargs),
                    np.float64)


def test_uniform_ddpm_times_are_the_integer_draws_ddpm_always_made():
  t = processes.training_times(DDPM, KEYS[:64], INDEX[:64], 64, 'uniform')
  old = jax.vmap(lambda k: jax.random.randint(jax.random.fold_in(k, 0), (), 0, 1000,
                                              jnp.int32))(KEYS[:64])
  assert t.dtype == jnp.int32
  np.testing.assert_array_equal(t, old)


@pytest.mark.parametrize('process', [FLOW, EDM, VP], ids=lambda p: p.name)
def test_uniform_and_stratified_cover_the_range(process):
  lo, hi = process.t_min, process.t_max
  u = (draw(process, 'uniform') - lo) / (hi - lo)
  assert u.min() >= 0 and u.max() <= 1
  np.testing.assert_allclose(np.histogram(u, 10, (0, 1))[0] / N, 0.1, atol=0.01)
  b = 64
  s = np.asarray(processes.training_times(process, KEYS[:b], INDEX[:b], b, 'stratified'))
  s = (s - lo) / (hi - lo) * b
  # Example i of the batch lies in the i-th of b equal strata (float32 times: a little slack).
  assert np.all(s >= np.arange(b) - 1e-3) and np.all(s <= np.arange(b) + 1 + 1e-3)


@pytest.mark.parametrize('process,method,mean,std', [
    (FLOW, 'logit_normal', 0.0, 1.0),  # SD3: flow time t = sigmoid(n), n ~ N(0, 1)
    (EDM, 'lognormal', -1.2, 1.2),  # EDM: ln sigma ~ N(P_mean, P_std)
    (VP, 'logit_normal', 0.5, 0.8),
])
def test_log_noise_level_is_normal(process, method, mean, std):
  t = draw(process, method, mean=mean, std=std)
  log_sigma = np.log(process.sigma_tilde(t))
  inside = (t > process.t_min) & (t < process.t_max)  # the range clips the far tails
  assert inside.mean() > 0.99
  np.testing.assert_allclose(np.median(log_sigma), mean, atol=0.03)
  q16, q84 = np.percentile(log_sigma, [15.87, 84.13])
  np.testing.assert_allclose((q84 - q16) / 2, std, rtol=0.03)
  if process is FLOW:  # the same law written as SD3 writes it: t = sigmoid(n)
    n = mean + std * np.asarray(jax.vmap(lambda k: jax.random.normal(
        jax.random.fold_in(k, 0)))(KEYS), np.float64)
    np.testing.assert_allclose(t, np.clip(1 / (1 + np.exp(-n)), 1e-3, 1 - 1e-3), rtol=1e-5,
                               atol=1e-6)


def test_ddpm_draws_other_laws_as_integer_timesteps():
  t = draw(DDPM, 'logit_normal')
  np.testing.assert_array_equal(t, np.round(t))
  assert t.min() >= 0 and t.max() <= 999


def test_time_shift_multiplies_the_noise_level():
  """SD3's shift: t' = s t / (1 + (s - 1) t) on flow time, i.e. sigma~' = s sigma~."""
  t = draw(FLOW, 'uniform')
  shifted = draw(FLOW, 'uniform', shift=3.0)
  want = np.clip(3 * t / (1 + 2 * t), FLOW.t_min, FLOW.t_max)
  np.testing.assert_allclose(shifted, want, rtol=1e-4, atol=1e-6)


def test_continuous_grids_follow_their_formulas():
  s = 7
  t = timesteps.sampler_times(EDM, s, 'karras')
  rho = 7.0
  ramp = np.linspace(0, 1, s)
  want = (80 ** (1 / rho) + ramp * (0.002 ** (1 / rho) - 80 ** (1 / rho))) ** rho  # EDM eq. 5
  np.testing.assert_allclose(t, want, rtol=1e-9)
  np.testing.assert_allclose(timesteps.sampler_times(FLOW, s, 'uniform'),
                             np.linspace(FLOW.t_max, FLOW.t_min, s), rtol=1e-12)
  lam = VP.logsnr(timesteps.sampler_times(VP, s, 'logsnr'))
  np.testing.assert_allclose(np.diff(lam), np.diff(lam)[0], rtol=1e-6)
  # SD3: flow times evenly spaced, then t' = shift t / (1 + (shift - 1) t).
  u = np.linspace(FLOW.t_max, FLOW.t_min, s)
  np.testing.assert_allclose(timesteps.sampler_times(FLOW, s, 'shifted', 3.0),
                             np.minimum(3 * u / (1 + 2 * u), FLOW.t_max), rtol=1e-9)
  with pytest.raises(ValueError, match='sampling.spacing'):
    timesteps.sampler_times(FLOW, s, 'quadratic')


def test_a_shift_that_piles_times_onto_t_max_drops_the_repeats():
  t = timesteps.sampler_times(FLOW, 10, 'shifted', 1000.0)
  assert np.all(np.diff(t) < 0) and len(t) < 10 and t[0] == FLOW.t_max
