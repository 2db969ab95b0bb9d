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

from diffusion_jax import processes, samplers, schedules, step_tables, timesteps

BETAS = schedules.get_betas('linear', 1000)
SCHED = schedules.Schedule.from_betas(BETAS)
ABAR = np.cumprod(1.0 - BETAS)
X_T = np.random.default_rng(0).standard_normal((16, 3))


def smooth_eps(x, t):
  """Any smooth function of (x, t) will do; works on NumPy and jax arrays, t [B]."""
  t = t[:, None] * 1.0
  return 0.8 * np.tanh(x * (1.0 + t / 1000.0)) + 0.1 * np.cos(t / 100.0) if isinstance(
      x, np.ndarray) else 0.8 * jnp.tanh(x * (1.0 + t / 1000.0)) + 0.1 * jnp.cos(t / 100.0)


DDPM = processes.DDPM(SCHED)
CONTINUOUS = {'vp': processes.VP('cosine'), 'flow': processes.Flow(), 'edm': processes.EDM()}


def smooth_denoiser(process):
  """A smooth data prediction D(x, t) = (x - sigma_t eps(x, t)) / alpha_t on `process`, with
  t rescaled to DDPM's [0, 1000) for smooth_eps; NumPy float64 or jax."""
  scale = 1.0 if process.discrete else 1000.0 / process.t_max

  def denoise(x, t):
    t = np.full(len(x), t) * 1.0 if np.ndim(t) == 0 else t
    a, s = process.alpha_sigma(t)
    return (x - s[:, None] * smooth_eps(x, t * scale)) / a[:, None]
  return denoise


def data_prediction(x, t, process=DDPM):
  """D(x, t), float64."""
  if process is DDPM:
    t = int(round(t))
    a, s = math.sqrt(ABAR[t]), math.sqrt(1 - ABAR[t])
    return (x - s * smooth_eps(x, np.full(len(x), t))) / a
  return smooth_denoiser(process)(x, float(t))


def path(num_steps, spacing, process=DDPM):
  """Decreasing times and their alpha, sigma, lambda, with alpha = 1, sigma = 0 appended."""
  if process is DDPM:
    ts = list(timesteps.sampler_timesteps(ABAR, num_steps, spacing)[::-1])
    alpha = [math.sqrt(ABAR[t]) for t in ts] + [1.0]
    sigma = [math.sqrt(1 - ABAR[t]) for t in ts] + [0.0]
  else:
    ts = list(timesteps.sampler_times(process, num_steps, spacing))
    a, s = process.alpha_sigma(np.array(ts))
    alpha, sigma = list(a) + [1.0], list(s) + [0.0]
  lam = [math.log(a / s) for a, s in zip(alpha[:-1], sigma[:-1])] + [math.inf]
  return ts, alpha, sigma, lam


def ours_on(process, sampler, num_steps, spacing, key=1, **settings):
  """The trajectory of `sampler` on a continuous process with the smooth denoiser, float64."""
  with jax.enable_x64(True):
    _, traj = samplers.sample(smooth_denoiser(process), process, jnp.asarray(X_T),
                              jax.random.PRNGKey(key), sampler=sampler, num_steps=num_steps,
                              spacing=spacing, clip_x0=False, return_trajectory=True,
                              **settings)
    return np.asarray(traj)


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


def dpm_solver_pp_reference(num_steps, order, spacing, stochastic=False, key=1, process=DDPM):
  ts, alpha, sigma, lam = path(num_steps, spacing, process)
  n = len(ts)
  x = math.hypot(alpha[0], sigma[0]) * X_T  # the chain's start: 1 on VP processes
  ms, frames = [], [x.copy()]
  for i in range(n):
    ms.insert(0, data_prediction(x, ts[i], process))  # newest first
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


def unipc_reference(num_steps, order, spacing, process=DDPM):
  ts, alpha, sigma, lam = path(num_steps, spacing, process)
  n = len(ts)
  x = math.hypot(alpha[0], sigma[0]) * X_T  # the chain's start: 1 on VP processes
  ms, frames, start, last_order = [], [x.copy()], None, None
  for i in range(n):
    m_new = data_prediction(x, ts[i], process)  # at the predicted point, before correcting it
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


# --- the solvers on continuous processes ---------------------------------------------------------

@pytest.mark.parametrize('name', list(CONTINUOUS))
@pytest.mark.parametrize('order', [2, 3])
@pytest.mark.parametrize('spacing', ['logsnr', 'karras'])
def test_solvers_on_continuous_processes_step_by_step(name, order, spacing):
  """DPM-Solver++ (ODE and SDE) and UniPC are defined in log-SNR: on every process they follow
  the same papers' updates with that process's alpha, sigma."""
  process = CONTINUOUS[name]
  tol = dict(rtol=1e-9, atol=1e-9)
  np.testing.assert_allclose(ours_on(process, 'dpm_solver++', 12, spacing, order=order),
                             dpm_solver_pp_reference(12, order, spacing, process=process), **tol)
  np.testing.assert_allclose(
      ours_on(process, 'dpm_solver++', 12, spacing, order=order, stochastic=True),
      dpm_solver_pp_reference(12, order, spacing, stochastic=True, process=process), **tol)
  np.testing.assert_allclose(ours_on(process, 'unipc', 12, spacing, order=order),
                             unipc_reference(12, order, spacing, process=process), **tol)


# --- Euler, Heun, EDM's stochastic sampler and Euler-Maruyama ------------------------------------
# References written from Karras et al. (2022), Algorithms 1 and 2, which run on x~ = x / alpha
# with noise level sigma~ = sigma / alpha and denoiser D(alpha x~, t); their x_0 ~ N(0, t_0^2 I)
# and first noise raise are the chain's documented start, sqrt(alpha^2 + sigma^2) x_T at the
# raised level.

def edm_reference(process, num_steps, spacing, churn=0.0, tmin=0.0, tmax=math.inf, s_noise=1.0,
                  key=1):
  ts = list(timesteps.sampler_times(process, num_steps, spacing))
  denoise = smooth_denoiser(process) if process is not DDPM else data_prediction
  st = lambda t: float(process.sigma_tilde(np.float64(t)))

  def raised(t):  # Algorithm 2, lines 4-5: t-hat = (1 + gamma) t_i
    gamma = min(churn / len(ts), math.sqrt(2) - 1) if tmin <= st(t) <= tmax else 0.0
    if gamma == 0:
      return t
    t_hat = float(process.t_of_logsnr(-2 * np.log(st(t) * (1 + gamma))))
    return float(process.clip_t(round(t_hat) if process.discrete else t_hat))
  alpha = lambda t: float(process.alpha_sigma(np.float64(t))[0])
  t_hat = raised(ts[0])
  a0, s0 = process.alpha_sigma(np.float64(t_hat))
  xt = math.sqrt(a0 ** 2 + s0 ** 2) * X_T / a0  # x~-hat of the first step
  row = 0
  for i, t in enumerate(ts):
    if i > 0:  # raise the noise level of x~_i: the noise of the row before
      t_hat = raised(t)
      xt = xt + s_noise * math.sqrt(max(st(t_hat) ** 2 - st(t) ** 2, 0)) * noise(key, row - 1)
    d = (xt - denoise(alpha(t_hat) * xt, t_hat)) / st(t_hat)
    if i == len(ts) - 1:  # to sigma = 0: the Euler step gives D
      xt = xt - st(t_hat) * d
      break
    t_next = ts[i + 1]
    x_bar = xt + (st(t_next) - st(t_hat)) * d
    d_next = (x_bar - denoise(alpha(t_next) * x_bar, t_next)) / st(t_next)
    xt = xt + (st(t_next) - st(t_hat)) * (d + d_next) / 2
    row += 2
  return xt  # alpha = 1 at sigma = 0


def ours_edm(process, num_steps, spacing, key=1, **churn):
  with jax.enable_x64(True):
    denoise = smooth_denoiser(process) if process is not DDPM else data_prediction_jax
    sampler = 'edm' if churn else 'heun'
    return np.asarray(samplers.sample(denoise, process, jnp.asarray(X_T),
                                      jax.random.PRNGKey(key), sampler=sampler,
                                      num_steps=num_steps, spacing=spacing, clip_x0=False,
                                      **churn))


def data_prediction_jax(x, t):
  abar = jnp.asarray(ABAR)[jnp.round(t).astype(jnp.int32)][:, None]
  return (x - jnp.sqrt(1 - abar) * smooth_eps(x, t)) / jnp.sqrt(abar)


EDM_PROCESSES = [DDPM] + list(CONTINUOUS.values())


@pytest.mark.parametrize('process', EDM_PROCESSES, ids=lambda p: p.name)
@pytest.mark.parametrize('num_steps', [1, 2, 9])
def test_heun_is_edm_algorithm_1(process, num_steps):
  spacing = 'karras'
  ref = edm_reference(process, num_steps, spacing)
  # rtol 1e-8: at the flow's sigma~ = 999, x~ = x / alpha magnifies round-off a thousandfold.
  np.testing.assert_allclose(ours_edm(process, num_steps, spacing), ref, rtol=1e-8, atol=1e-8)
  table = step_tables.build('heun', process, num_steps=num_steps, spacing=spacing)
  assert table.num_calls == 2 * len(timesteps.sampler_times(process, num_steps, spacing)) - 1


@pytest.mark.parametrize('process', EDM_PROCESSES, ids=lambda p: p.name)
def test_edm_sampler_is_edm_algorithm_2(process):
  churn = dict(s_churn=40.0, s_tmin=0.05, s_tmax=50.0, s_noise=1.003)
  ref = edm_reference(process, 10, 'karras', churn=40.0, tmin=0.05, tmax=50.0, s_noise=1.003)
  np.testing.assert_allclose(ours_edm(process, 10, 'karras', **churn), ref, rtol=1e-8,
                             atol=1e-8)
  assert not np.allclose(ref, edm_reference(process, 10, 'karras'))  # the churn does something


@pytest.mark.parametrize('process', EDM_PROCESSES, ids=lambda p: p.name)
def test_euler_maruyama_step_by_step(process):
  """Karras et al. eq. 6 with beta = sigma~' / sigma~ and t = sigma~, integrated by
  Euler-Maruyama: x~' = x~ + 2 (s' - s) (x~ - D) / s + sqrt(2 s (s - s')) z."""
  ts = list(timesteps.sampler_times(process, 15, 'karras'))
  denoise = smooth_denoiser(process) if process is not DDPM else data_prediction
  a, s = (np.asarray(v, np.float64) for v in process.alpha_sigma(np.array(ts, np.float64)))
  xt = math.sqrt(a[0] ** 2 + s[0] ** 2) * X_T / a[0]
  for i, t in enumerate(ts):
    d = denoise(a[i] * xt, t)
    if i == len(ts) - 1:
      xt = d
      break
    s_now, s_next = s[i] / a[i], s[i + 1] / a[i + 1]
    xt = (xt + 2 * (s_next - s_now) * (xt - d) / s_now
          + math.sqrt(2 * s_now * (s_now - s_next)) * noise(1, i))
  with jax.enable_x64(True):
    den = smooth_denoiser(process) if process is not DDPM else data_prediction_jax
    got = samplers.sample(den, process, jnp.asarray(X_T), jax.random.PRNGKey(1),
                          sampler='euler_maruyama', num_steps=15, spacing='karras',
                          clip_x0=False)
  np.testing.assert_allclose(np.asarray(got), xt, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize('process', [DDPM] + list(CONTINUOUS.values()), ids=lambda p: p.name)
def test_euler_is_ddim_and_on_a_flow_the_euler_step_in_t(process):
  """Karras et al. Section 3: DDIM is Euler on x~ with noise level sigma~. On the flow process
  that is also the plain Euler step in t with the velocity (x - D) / t (diffusers'
  FlowMatchEulerDiscreteScheduler)."""
  euler = step_tables.build('euler', process, num_steps=8, spacing='logsnr')
  ddim = step_tables.build('ddim', process, num_steps=8, spacing='logsnr')
  for a, b in zip(euler, ddim):
    np.testing.assert_array_equal(a, b)
  if process.name == 'flow':
    ts = list(timesteps.sampler_times(process, 8, 'logsnr')) + [0.0]
    denoise = smooth_denoiser(process)
    x = math.hypot(1 - ts[0], ts[0]) * X_T  # the chain's start
    for t, t_next in zip(ts[:-1], ts[1:]):
      velocity = (x - denoise(x, t)) / t
      x = x + (t_next - t) * velocity
    np.testing.assert_allclose(ours_on(process, 'euler', 8, 'logsnr')[-1], x, rtol=1e-9,
                               atol=1e-9)
