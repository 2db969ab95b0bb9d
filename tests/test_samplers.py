"""Samplers against the exact denoiser of Gaussian data.

For x0 ~ N(mu, s^2 I) the optimal noise predictor is
  eps*(x_t, t) = sqrt(1 - abar_t) (x_t - sqrt(abar_t) mu) / (abar_t s^2 + 1 - abar_t),
so a correct sampler must return samples with mean mu and standard deviation s.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import processes, samplers, schedules, step_tables, timesteps

MU = jnp.array([0.6, -0.4])
S = 0.3
N = 20_000
SCHED = schedules.Schedule.from_betas(schedules.get_betas('linear', 1000))


def exact_eps(x_t, t):
  abar = SCHED.alphas_cumprod[t][:, None]
  return jnp.sqrt(1 - abar) * (x_t - jnp.sqrt(abar) * MU) / (abar * S ** 2 + 1 - abar)


def x_T(seed=0):
  return jax.random.normal(jax.random.PRNGKey(seed), (N, 2))


def check_moments(x):
  x = np.asarray(x)
  np.testing.assert_allclose(x.mean(0), MU, atol=4 * S / np.sqrt(N) + 2e-3)
  np.testing.assert_allclose(x.std(0), S, rtol=0.02)


@pytest.mark.parametrize('variance', ['small', 'large'])
def test_ddpm_recovers_gaussian(variance):
  x0 = jax.jit(lambda xt, r: samplers.ddpm_sample(exact_eps, SCHED, xt, r, clip_x0=False,
                                                  variance=variance))(x_T(), jax.random.PRNGKey(1))
  check_moments(x0)


def ddim_chain_moments(seq, eta):
  """Exact mean and std of DDIM's output for the Gaussian data, propagated in float64 through
  the paper's update (Song et al. 2020, eq. 12), written out independently of samplers.py:
    x' = sqrt(abar') x0_hat + sqrt(1 - abar' - sigma^2) eps_hat + sigma z.
  Every step is affine in x, so mean and variance propagate exactly."""
  abar_all = np.cumprod(1 - schedules.get_betas('linear', 1000))
  mu, m, v = np.asarray(MU, np.float64), np.zeros(2), np.ones(2)
  for i in reversed(range(len(seq))):
    ab = abar_all[seq[i]]
    abp = abar_all[seq[i - 1]] if i else 1.0
    k = np.sqrt(1 - ab) / (ab * S ** 2 + 1 - ab)  # eps_hat = k (x - sqrt(ab) mu)
    x0_a = (1 - np.sqrt(1 - ab) * k) / np.sqrt(ab)  # x0_hat = x0_a x + x0_b
    x0_b = np.sqrt(1 - ab) * k * mu
    sig = eta * np.sqrt((1 - abp) / (1 - ab) * (1 - ab / abp))
    c = np.sqrt(1 - abp - sig ** 2)
    a = np.sqrt(abp) * x0_a + c * k
    b = np.sqrt(abp) * x0_b - c * k * np.sqrt(ab) * mu
    m, v = a * m + b, a * a * v + sig ** 2
  return m, np.sqrt(v)


@pytest.mark.parametrize('eta', [0.0, 1.0])
@pytest.mark.parametrize('spacing', ['uniform', 'quadratic'])
def test_ddim_50_steps_has_the_exact_chain_moments(eta, spacing):
  """50 DDIM steps are a coarse discretisation: on data this narrow (s = 0.3) the chain itself
  is under-dispersed (std 0.275 at eta 0, 0.253 at eta 1). The sampler must match those exact
  moments within sampling error; a wrong coefficient moves them by far more."""
  x0 = np.asarray(samplers.ddim_sample(exact_eps, SCHED, x_T(), jax.random.PRNGKey(2),
                                       num_steps=50, eta=eta, spacing=spacing, clip_x0=False))
  mean, std = ddim_chain_moments(
      timesteps.sampler_timesteps(processes.DDPM(SCHED).alphas_cumprod64, 50, spacing), eta)
  np.testing.assert_allclose(x0.mean(0), mean, atol=4 * S / np.sqrt(N))
  np.testing.assert_allclose(x0.std(0), std, rtol=0.015)


@pytest.mark.parametrize('eta', [0.0, 1.0])
def test_ddim_converges_to_the_data_distribution(eta):
  x0 = samplers.ddim_sample(exact_eps, SCHED, x_T(), jax.random.PRNGKey(2), num_steps=1000,
                            eta=eta, clip_x0=False)
  check_moments(x0)


def test_ddim_eta0_is_deterministic_given_x_T():
  a = samplers.ddim_sample(exact_eps, SCHED, x_T(), jax.random.PRNGKey(3), num_steps=20)
  b = samplers.ddim_sample(exact_eps, SCHED, x_T(), jax.random.PRNGKey(4), num_steps=20)
  np.testing.assert_array_equal(a, b)
  c = samplers.ddim_sample(exact_eps, SCHED, x_T(), jax.random.PRNGKey(4), num_steps=20, eta=1.0)
  assert float(jnp.abs(c - b).max()) > 1e-3


def test_ddim_full_steps_eta1_is_ddpm_small():
  ddim = step_tables.ddim_steps(SCHED, 1000, eta=1.0)
  ddpm = step_tables.ddpm_steps(SCHED, 'small')
  np.testing.assert_array_equal(ddim.t, ddpm.t)
  for a, b in zip(ddim[1:], ddpm[1:]):
    if a is not None or b is not None:  # (the inpainting columns are None in both)
      np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-7)
  # The same table and the same noise: the same samples, up to float rounding.
  rng = jax.random.PRNGKey(5)
  a = samplers.ddim_sample(exact_eps, SCHED, x_T(), rng, num_steps=1000, eta=1.0, clip_x0=False)
  b = samplers.ddpm_sample(exact_eps, SCHED, x_T(), rng, clip_x0=False)
  np.testing.assert_allclose(a, b, atol=2e-3)


def test_ddim_timesteps_follow_the_paper():
  abar = processes.DDPM(SCHED).alphas_cumprod64
  np.testing.assert_array_equal(timesteps.sampler_timesteps(abar, 4, 'uniform'), [0, 250, 500, 750])
  steps = step_tables.ddim_steps(SCHED, 4)
  np.testing.assert_array_equal(steps.t, [750, 500, 250, 0])
  # abar = 1 before the first step: the last update returns x0_hat exactly.
  assert steps.coef_x0[-1, 0] == pytest.approx(1.0) and steps.coef_xt[-1] == pytest.approx(0.0)
  assert steps.sigma[-1] == 0.0


def test_trajectory_and_clipping():
  x0, traj = samplers.ddim_sample(exact_eps, SCHED, 5 * x_T()[:16], jax.random.PRNGKey(0),
                                  num_steps=10, return_trajectory=True)
  assert traj.shape == (11, 16, 2)
  np.testing.assert_array_equal(traj[0], 5 * x_T()[:16])
  np.testing.assert_array_equal(traj[-1], x0)
  assert float(jnp.abs(x0).max()) <= 1.0 + 1e-6  # the last step returns the clipped x0_hat


def test_bad_settings_name_the_field():
  abar = processes.DDPM(SCHED).alphas_cumprod64
  with pytest.raises(ValueError, match='sampling.num_steps'):
    timesteps.sampler_timesteps(abar, 0)
  with pytest.raises(ValueError, match='sampling.spacing'):
    timesteps.sampler_timesteps(abar, 10, 'cubic')
  with pytest.raises(ValueError, match='sampling.variance'):
    step_tables.ddpm_steps(SCHED, 'medium')
  with pytest.raises(ValueError, match='sampling.solver_order'):
    step_tables.dpm_solver_pp_steps(SCHED, 10, order=4)
  with pytest.raises(ValueError, match='sampling.sampler'):
    step_tables.build('lms', SCHED, num_steps=10)


# The fast solvers, with the exact denoiser on the cosine schedule. Their last step returns the
# data prediction at the smallest timestep they visit, which shrinks the std by
# s / sqrt(s^2 + sigma(t_min)^2): with 20 linspace steps t_min = 50, where the cosine schedule's
# sigma = 0.05 (the linear schedule's is 0.17, too coarse for data as narrow as s = 0.3).
COSINE = schedules.Schedule.from_betas(schedules.get_betas('cosine', 1000))
S_WIDE = 0.5


def exact_eps_cosine(x_t, t):
  abar = COSINE.alphas_cumprod[t][:, None]
  return (jnp.sqrt(1 - abar) * (x_t - jnp.sqrt(abar) * MU)
          / (abar * S_WIDE ** 2 + 1 - abar))


def check_within_two_percent(x):
  x = np.asarray(x)
  np.testing.assert_allclose(x.mean(0), MU, rtol=0.02)
  np.testing.assert_allclose(x.std(0), S_WIDE, rtol=0.02)


@pytest.mark.parametrize('sampler', ['dpm_solver++', 'unipc'])
@pytest.mark.parametrize('order', [2, 3])
def test_solvers_carry_the_noise_onto_the_data_in_20_steps(sampler, order):
  sample = samplers.unipc_sample if sampler == 'unipc' else samplers.dpm_solver_pp_sample
  x0 = sample(exact_eps_cosine, COSINE, x_T(), jax.random.PRNGKey(1), num_steps=20,
              order=order, spacing='linspace', clip_x0=False)
  check_within_two_percent(x0)


def test_stochastic_dpm_solver_pp_recovers_the_gaussian():
  x0 = samplers.dpm_solver_pp_sample(exact_eps_cosine, COSINE, x_T(), jax.random.PRNGKey(1),
                                     num_steps=50, order=2, stochastic=True, clip_x0=False)
  check_within_two_percent(x0)
  again = samplers.dpm_solver_pp_sample(exact_eps_cosine, COSINE, x_T(), jax.random.PRNGKey(2),
                                        num_steps=50, order=2, stochastic=True, clip_x0=False)
  assert float(jnp.abs(again - x0).mean()) > 1e-2  # it does draw noise


def test_solvers_clip_the_data_prediction():
  x0 = samplers.unipc_sample(exact_eps, SCHED, 5 * x_T()[:64], None, num_steps=8, clip_x0=0.5)
  assert float(jnp.abs(x0).max()) <= 0.5 + 1e-6
  x0 = samplers.dpm_solver_pp_sample(exact_eps, SCHED, 5 * x_T()[:64], None, num_steps=8,
                                     order=3, clip_x0=0.5)
  assert float(jnp.abs(x0).max()) <= 0.5 + 1e-6


# Every sampler on every process, with the exact denoiser of x0 ~ N(MU, S_WIDE^2 I):
#   D(x_t, t) = MU + alpha S^2 / (alpha^2 S^2 + sigma^2) (x_t - alpha MU).
PROCESSES = {'ddpm': processes.DDPM(COSINE), 'vp': processes.VP('cosine'),
             'flow': processes.Flow(), 'edm': processes.EDM()}
SAMPLER_SETTINGS = {  # steps enough for 3% (first-order and SDE samplers need many)
    'ddim': dict(num_steps=200, spacing='logsnr'),
    'euler': dict(num_steps=200, spacing='logsnr'),
    'heun': dict(num_steps=50, spacing='logsnr'),
    'edm': dict(num_steps=80, spacing='logsnr', s_churn=10.0),
    'euler_maruyama': dict(num_steps=1000, spacing='logsnr'),
    'dpm_solver++': dict(num_steps=30, spacing='logsnr', order=2),
    'dpm_solver++ SDE': dict(num_steps=50, spacing='logsnr', order=2, stochastic=True),
    'unipc': dict(num_steps=30, spacing='logsnr', order=2),
}


def exact_denoiser(process):
  def denoise(x_t, t):
    a, s = (v[:, None] for v in process.alpha_sigma(t))
    return MU + a * S_WIDE ** 2 / (a ** 2 * S_WIDE ** 2 + s ** 2) * (x_t - a * MU)
  return denoise


@pytest.mark.parametrize('name', list(SAMPLER_SETTINGS))
@pytest.mark.parametrize('process', list(PROCESSES))
def test_every_sampler_on_every_process_recovers_the_gaussian(process, name):
  proc = PROCESSES[process]
  settings = dict(SAMPLER_SETTINGS[name])
  sampler = name.split()[0]
  run = jax.jit(lambda x, r: samplers.sample(exact_denoiser(proc), proc, x, r, sampler=sampler,
                                             clip_x0=False, **settings))
  x = np.asarray(run(x_T(), jax.random.PRNGKey(3)))
  np.testing.assert_allclose(x.mean(0), MU, rtol=0.03)
  np.testing.assert_allclose(x.std(0), S_WIDE, rtol=0.03)
