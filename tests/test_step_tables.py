"""DPM-Solver++ and UniPC step by step against float64 NumPy implementations written here from
the papers' update rules (Lu et al. 2022, Algorithm 2 and the 3M/SDE forms; Zhao et al. 2023,
UniPC-p with B(h) = e^h - 1), for an arbitrary smooth eps function. The references loop over the
steps with explicit histories of data predictions; the code under test builds coefficient tables
and runs them as one lax.scan, so agreement to float64 round-off checks the tables."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import samplers, schedules, step_tables, timesteps

BETAS = schedules.get_betas('linear', 1000)
SCHED = schedules.Schedule.from_betas(BETAS)
ABAR = np.cumprod(1.0 - BETAS)
X_T = np.random.default_rng(0).standard_normal((16, 3))


def smooth_eps(x, t):
  """Any smooth function of (x, t) will do; works on NumPy and jax arrays, t [B]."""
  t = t[:, None] * 1.0
  return 0.8 * np.tanh(x * (1.0 + t / 1000.0)) + 0.1 * np.cos(t / 100.0) if isinstance(
      x, np.ndarray) else 0.8 * jnp.tanh(x * (1.0 + t / 1000.0)) + 0.1 * jnp.cos(t / 100.0)


def data_prediction(x, t):
  """D(x, t) = (x - sigma_t eps) / alpha_t, float64."""
  a, s = math.sqrt(ABAR[t]), math.sqrt(1 - ABAR[t])
  return (x - s * smooth_eps(x, np.full(len(x), t))) / a


def path(num_steps, spacing):
  """Decreasing timesteps and their alpha, sigma, lambda, with alpha = 1, sigma = 0 appended."""
  ts = list(timesteps.sampler_timesteps(ABAR, num_steps, spacing)[::-1])
  alpha = [math.sqrt(ABAR[t]) for t in ts] + [1.0]
  sigma = [math.sqrt(1 - ABAR[t]) for t in ts] + [0.0]
  lam = [math.log(a / s) for a, s in zip(alpha[:-1], sigma[:-1])] + [math.inf]
  return ts, alpha, sigma, lam


def ours(sampler, num_steps, order, spacing, stochastic=False, key=1):
  with jax.enable_x64(True):
    # The schedule in float64 throughout (the tables read its betas, the sampler its rates).
    sched = SCHED.replace(betas=jnp.asarray(BETAS), sqrt_alphas_cumprod=jnp.sqrt(ABAR),
                          sqrt_one_minus_alphas_cumprod=jnp.sqrt(1 - ABAR))
    x_T = jnp.asarray(X_T)
    if sampler == 'unipc':
      _, traj = samplers.unipc_sample(smooth_eps, sched, x_T, None, num_steps=num_steps,
                                      order=order, spacing=spacing, clip_x0=False,
                                      return_trajectory=True)
    else:
      _, traj = samplers.dpm_solver_pp_sample(
          smooth_eps, sched, x_T, jax.random.PRNGKey(key), num_steps=num_steps, order=order,
          spacing=spacing, stochastic=stochastic, clip_x0=False, return_trajectory=True)
    return np.asarray(traj)


def noise(key, i):
  """The z of step i, as the sampler draws it (float64)."""
  with jax.enable_x64(True):
    return np.asarray(jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(key), i),
                                        X_T.shape, jnp.float64))


def dpm_solver_pp_reference(num_steps, order, spacing, stochastic=False, key=1):
  ts, alpha, sigma, lam = path(num_steps, spacing)
  n = len(ts)
  x, ms, frames = X_T.copy(), [], [X_T.copy()]
  for i in range(n):
    ms.insert(0, data_prediction(x, ts[i]))  # newest first
    if i == n - 1:  # to sigma = 0: x = D
      x = ms[0]
      frames.append(x)
      break
    m = min(order, i + 1)
    if n < 15 and i == n - 2:
      m = min(m, 2)
    h = lam[i + 1] - lam[i]
    a_t = alpha[i + 1]
    if not stochastic:
      phi_1 = math.expm1(-h)
      base = sigma[i + 1] / sigma[i] * x - a_t * phi_1 * ms[0]
      if m == 1:
        x = base
      elif m == 2:  # Algorithm 2: D = (1 + 1/(2r)) m0 - 1/(2r) m1
        r = (lam[i] - lam[i - 1]) / h
        d = (1 + 1 / (2 * r)) * ms[0] - 1 / (2 * r) * ms[1]
        x = sigma[i + 1] / sigma[i] * x - a_t * phi_1 * d
      else:
        r0, r1 = (lam[i] - lam[i - 1]) / h, (lam[i - 1] - lam[i - 2]) / h
        d1_0, d1_1 = (ms[0] - ms[1]) / r0, (ms[1] - ms[2]) / r1
        d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
        d2 = (d1_0 - d1_1) / (r0 + r1)
        phi_2 = phi_1 / h + 1
        phi_3 = phi_2 / h - 0.5
        x = base + a_t * phi_2 * d1 - a_t * phi_3 * d2
    else:  # the SDE: exact in the linear part, with its own noise
      e2 = -math.expm1(-2 * h)  # 1 - e^(-2h)
      x_new = sigma[i + 1] / sigma[i] * math.exp(-h) * x + a_t * e2 * ms[0]
      if m == 2:
        r = (lam[i] - lam[i - 1]) / h
        x_new += 0.5 * a_t * e2 * (ms[0] - ms[1]) / r
      elif m == 3:
        hh = 2 * h
        r0, r1 = (lam[i] - lam[i - 1]) / h, (lam[i - 1] - lam[i - 2]) / h
        d1_0, d1_1 = (ms[0] - ms[1]) / r0, (ms[1] - ms[2]) / r1
        phi_2 = math.expm1(-hh) / hh + 1
        phi_3 = phi_2 / hh - 0.5
        x_new += a_t * (phi_2 * (d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1))
                        - phi_3 * (d1_0 - d1_1) / (r0 + r1))
      x = x_new + sigma[i + 1] * math.sqrt(e2) * noise(key, i)
    frames.append(x)
  return np.stack(frames)


def unipc_coefficients(lam, t, s0, earlier, p, corrector):
  """rks and rhos of UniPC-p (bh2, data prediction) for a step lambda[s0] -> lambda[t]."""
  h = lam[t] - lam[s0]
  hh = -h
  b_h = math.expm1(hh)
  rks = np.array([(lam[j] - lam[s0]) / h for j in earlier] + [1.0])
  # phi_k of hh, as h phi_k(hh) k! scaled: g_k = hh * phi_{k+1}(hh) * k!
  phi = [None, math.expm1(hh) / hh]
  for k in range(1, p + 1):
    phi.append((phi[k] - 1 / math.factorial(k)) / hh)
  g = np.array([hh * phi[k + 1] * math.factorial(k) for k in range(1, p + 1)]) / b_h
  r_mat = np.array([rks ** (k - 1) for k in range(1, p + 1)])
  if corrector:
    rhos = np.array([0.5]) if p == 1 else np.linalg.solve(r_mat, g)
  else:
    rhos = np.array([]) if p == 1 else np.array([0.5]) if p == 2 else np.linalg.solve(
        r_mat[:-1, :-1], g[:-1])
  return rks[:-1], rhos, math.expm1(hh), b_h


def unipc_reference(num_steps, order, spacing):
  ts, alpha, sigma, lam = path(num_steps, spacing)
  n = len(ts)
  x, ms, frames, start, last_order = X_T.copy(), [], [X_T.copy()], None, None
  for i in range(n):
    m_new = data_prediction(x, ts[i])  # at the predicted point, before correcting it
    if i > 0:  # UniC: correct x_i from the predictor's start, with the new output
      p = last_order
      rks, rhos, phi_1, b_h = unipc_coefficients(lam, i, i - 1, [i - 1 - k for k in range(1, p)],
                                                 p, corrector=True)
      corr = sum(rho * (ms[k] - ms[0]) / rk for k, (rk, rho) in enumerate(zip(rks, rhos), 1))
      x = (sigma[i] / sigma[i - 1] * start - alpha[i] * phi_1 * ms[0]
           - alpha[i] * b_h * (corr + rhos[-1] * (m_new - ms[0])))
    ms.insert(0, m_new)
    p = min(order, i + 1, n - i)
    start, last_order = x, p
    if i == n - 1:
      x = ms[0]
    else:
      rks, rhos, phi_1, b_h = unipc_coefficients(lam, i + 1, i, [i - k for k in range(1, p)], p,
                                                 corrector=False)
      pred = sum(rho * (ms[k] - ms[0]) / rk for k, (rk, rho) in enumerate(zip(rks, rhos), 1))
      x = sigma[i + 1] / sigma[i] * x - alpha[i + 1] * phi_1 * ms[0] - alpha[i + 1] * b_h * pred
    frames.append(x)
  return np.stack(frames)


CASES = [(s, o, sp) for s in (5, 12, 20) for o in (1, 2, 3) for sp in ('linspace', 'karras')]


@pytest.mark.parametrize('num_steps,order,spacing', CASES)
def test_dpm_solver_pp_step_by_step(num_steps, order, spacing):
  np.testing.assert_allclose(ours('dpm', num_steps, order, spacing),
                             dpm_solver_pp_reference(num_steps, order, spacing),
                             rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize('num_steps,order,spacing', CASES)
def test_dpm_solver_pp_sde_step_by_step(num_steps, order, spacing):
  np.testing.assert_allclose(ours('dpm', num_steps, order, spacing, stochastic=True),
                             dpm_solver_pp_reference(num_steps, order, spacing, stochastic=True),
                             rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize('num_steps,order,spacing', CASES)
def test_unipc_step_by_step(num_steps, order, spacing):
  np.testing.assert_allclose(ours('unipc', num_steps, order, spacing),
                             unipc_reference(num_steps, order, spacing), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize('spacing', timesteps.SPACINGS)
def test_order_one_is_ddim_eta_zero_on_the_same_timesteps(spacing):
  ddim = step_tables.ddim_steps(SCHED, 10, 0.0, spacing)
  for solver in (step_tables.dpm_solver_pp_steps(SCHED, 10, 1, spacing),
                 step_tables.unipc_steps(SCHED, 10, 1, spacing)):
    np.testing.assert_array_equal(solver.t, ddim.t)
    np.testing.assert_allclose(solver.coef_xt, ddim.coef_xt, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(solver.coef_x0[:, 0], ddim.coef_x0[:, 0], rtol=1e-12, atol=1e-12)
    assert np.all(solver.coef_x0[:, 1:] == 0) and np.all(solver.sigma == 0)
  x_T = jnp.asarray(X_T, jnp.float32)
  a = samplers.ddim_sample(smooth_eps, SCHED, x_T, None, num_steps=10, spacing=spacing,
                           clip_x0=False)
  b = samplers.dpm_solver_pp_sample(smooth_eps, SCHED, x_T, None, num_steps=10, order=1,
                                    spacing=spacing, clip_x0=False)
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_the_last_step_returns_the_data_prediction():
  for table in (step_tables.dpm_solver_pp_steps(SCHED, 7, 3),
                step_tables.dpm_solver_pp_steps(SCHED, 7, 2, stochastic=True),
                step_tables.unipc_steps(SCHED, 7, 3)):
    assert table.coef_xt[-1] == 0 and table.sigma[-1] == 0
    np.testing.assert_array_equal(table.coef_x0[-1], np.eye(table.coef_x0.shape[1])[0])
    assert table.num_calls == 7
