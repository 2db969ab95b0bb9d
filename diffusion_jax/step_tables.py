"""The tables of every sampler, built in NumPy float64: DDPM, DDIM, DPM-Solver++ and UniPC.

All of them are one scheme, which `samplers.run_reverse` runs as one lax.scan. Row i holds a
timestep t_i and coefficients; with D the data (x0) prediction of the network at (x, t_i),
optionally clipped, and `hist` the last K of them (newest first):

    hist   <- [D, hist[0], ..., hist[K-2]]
    anchor  = corr_x x + corr_prev anchor + corr_d . hist      (UniC corrector; else anchor = x)
    x      <- coef_xt anchor + coef_x0 . hist + sigma z,  z ~ N(0, I)

With alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t) and lambda_t = log(alpha_t / sigma_t),
a step from s to t has h = lambda_t - lambda_s:

  DDPM       posterior mean coefficients of q(x_{t-1} | x_t, x0); sigma^2 = beta~_t ('small') or
             beta_t ('large'); no noise at t = 0 (K = 1)
  DDIM       x' = sqrt(abar') D + sqrt(1 - abar' - s^2) eps(D) + s z,
             s = eta sqrt((1 - abar') / (1 - abar)) sqrt(1 - abar / abar') (K = 1)
  DPM-Solver++ (Lu et al. 2022, data prediction, multistep), with D1 = (D_0 - D_1) / r0,
             r0 = h_prev / h, and phi = e^(-h) - 1:
             order 1: x' = sigma_t / sigma_s x - alpha_t phi D_0                 (= DDIM, eta 0)
             order 2: ... - alpha_t phi D1 / 2                                   (Algorithm 2)
             order 3: ... - alpha_t phi D_0 + alpha_t (phi / h + 1) D1'
                          - alpha_t ((phi + h) / h^2 - 1/2) D2                   (DPM-Solver's 3M)
             stochastic (the SDE form, "2M SDE"): sigma_t / sigma_s e^(-h) x + alpha_t (1 - e^(-2h))
             (D_0 + D1 / 2) + sigma_t sqrt(1 - e^(-2h)) z; order 3 adds the 3M SDE terms
  UniPC      (Zhao et al. 2023, data prediction, B(h) = e^h - 1 "bh2"): the UniP-p predictor,
             and after every step but the last the UniC corrector, which moves the point the
             predictor started from using the network's output at the new point (no extra call)

The multistep solvers use lower orders while their history fills and at the end: the last step
goes to sigma = 0 with order 1 and so returns the data prediction D itself; DPM-Solver++ with
fewer than 15 steps also takes the second-to-last at order <= 2, UniPC always steps at order
<= the steps left (both as the reference implementations do).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from diffusion_jax import timesteps
from diffusion_jax.schedules import Schedule

SAMPLERS = ('ddpm', 'ddim', 'dpm_solver++', 'unipc')
MAX_ORDER = 3
_LOWER_ORDER_FINAL_BELOW = 15  # DPM-Solver++: fewer steps than this end at orders 2, 1


class ReverseSteps(NamedTuple):
  """A sampler's table, in the order it runs (t decreasing): S rows, K history slots."""
  t: np.ndarray  # int32 [S]
  corr_x: np.ndarray  # [S]
  corr_prev: np.ndarray  # [S]
  corr_d: np.ndarray  # [S, K]
  coef_xt: np.ndarray  # [S]
  coef_x0: np.ndarray  # [S, K]
  sigma: np.ndarray  # [S]

  @property
  def num_calls(self) -> int:
    """Network calls the table makes: one per row."""
    return len(self.t)


def alphas_cumprod64(schedule: Schedule) -> np.ndarray:
  """abar [T] in float64, recomputed from the betas (the Schedule's own abar is float32, which
  leaves 1 - abar at small t with only a few significant digits)."""
  return np.cumprod(1.0 - np.asarray(schedule.betas, np.float64))


def _plain_table(t, coef_xt, coef_x0, sigma) -> ReverseSteps:
  """Rows without a corrector and with the newest prediction only (K = 1)."""
  s = len(t)
  return ReverseSteps(np.asarray(t, np.int32), np.ones(s), np.zeros(s), np.zeros((s, 1)),
                      np.asarray(coef_xt, np.float64),
                      np.asarray(coef_x0, np.float64).reshape(s, 1),
                      np.asarray(sigma, np.float64))


def ddpm_steps(schedule: Schedule, variance: str = 'small') -> ReverseSteps:
  """All T ancestral steps. variance: 'small' (posterior beta~_t) or 'large' (beta_t)."""
  betas = np.asarray(schedule.betas, np.float64)
  abar = alphas_cumprod64(schedule)
  abar_prev = np.concatenate([[1.0], abar[:-1]])
  if variance == 'small':
    var = betas * (1.0 - abar_prev) / (1.0 - abar)
  elif variance == 'large':
    var = betas.copy()
  else:
    raise ValueError(f"sampling.variance={variance!r} is unknown; choose 'small' or 'large'.")
  var[0] = 0.0  # the last step returns the posterior mean
  coef_x0 = betas * np.sqrt(abar_prev) / (1.0 - abar)
  coef_xt = (1.0 - abar_prev) * np.sqrt(1.0 - betas) / (1.0 - abar)
  t = np.arange(schedule.num_timesteps)[::-1]
  return _plain_table(t, coef_xt[t], coef_x0[t], np.sqrt(var[t]))


def ddim_steps(schedule: Schedule, num_steps: int, eta: float = 0.0,
               spacing: str = 'leading') -> ReverseSteps:
  """S DDIM steps with stochasticity eta (0: deterministic DDIM, 1: DDPM-like)."""
  abar_all = alphas_cumprod64(schedule)
  seq = timesteps.sampler_timesteps(abar_all, num_steps, spacing)
  abar = abar_all[seq]
  abar_prev = np.concatenate([[1.0], abar_all[seq[:-1]]])  # abar = 1 before the first step
  sigma = eta * np.sqrt((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev))
  c_eps = np.sqrt(np.maximum(1 - abar_prev - sigma ** 2, 0.0))
  # eps_hat = (x_t - sqrt(abar) x0_hat) / sqrt(1 - abar), folded into the x0 and x_t terms.
  coef_xt = c_eps / np.sqrt(1 - abar)
  coef_x0 = np.sqrt(abar_prev) - coef_xt * np.sqrt(abar)
  r = slice(None, None, -1)
  return _plain_table(seq[r], coef_xt[r], coef_x0[r], sigma[r])


def _log_snr_path(schedule: Schedule, num_steps: int, spacing: str):
  """Decreasing timesteps [S] and alpha, sigma, lambda at each and at the end (sigma = 0):
  [S + 1], the last entries alpha = 1, sigma = 0, lambda = inf."""
  abar_all = alphas_cumprod64(schedule)
  seq = timesteps.sampler_timesteps(abar_all, num_steps, spacing)[::-1]
  abar = np.concatenate([abar_all[seq], [1.0]])
  alpha, sigma = np.sqrt(abar), np.sqrt(1.0 - abar)
  with np.errstate(divide='ignore'):
    lam = np.log(alpha) - np.log(sigma)
  return seq, alpha, sigma, lam


def _check_order(order: int) -> None:
  if order not in range(1, MAX_ORDER + 1):
    raise ValueError(f'sampling.solver_order={order} must be 1, 2 or 3.')


def _final_row(k: int):
  """The last step, to sigma = 0 at order 1: x' = D."""
  coef_x0 = np.zeros(k)
  coef_x0[0] = 1.0
  return 0.0, coef_x0, 0.0


def dpm_solver_pp_steps(schedule: Schedule, num_steps: int, order: int = 2,
                        spacing: str = 'linspace', stochastic: bool = False) -> ReverseSteps:
  """DPM-Solver++(order M) multistep, or its SDE form, over `num_steps` timesteps."""
  _check_order(order)
  seq, alpha, sigma, lam = _log_snr_path(schedule, num_steps, spacing)
  s, k = len(seq), MAX_ORDER
  coef_xt, coef_x0, noise = np.zeros(s), np.zeros((s, k)), np.zeros(s)
  for i in range(s):
    m = min(order, i + 1)
    if s < _LOWER_ORDER_FINAL_BELOW and i == s - 2:
      m = min(m, 2)
    if i == s - 1:
      coef_xt[i], coef_x0[i], noise[i] = _final_row(k)
      continue
    h = lam[i + 1] - lam[i]
    a = alpha[i + 1]
    # Weights of D_0 and of the difference terms D1, D2 in x'.
    if stochastic:
      coef_xt[i] = sigma[i + 1] / sigma[i] * math.exp(-h)
      noise[i] = sigma[i + 1] * math.sqrt(-math.expm1(-2 * h))
      h_eff = 2 * h
      w0 = -a * math.expm1(-h_eff)
    else:
      coef_xt[i] = sigma[i + 1] / sigma[i]
      h_eff = h
      w0 = -a * math.expm1(-h)
    d = np.zeros(k)  # x0 coefficients of D_0, D_1, D_2
    d[0] = w0
    if m == 2:
      r0 = (lam[i] - lam[i - 1]) / h
      w1 = 0.5 * w0  # midpoint form: x' += w0 D1 / 2, D1 = (D_0 - D_1) / r0
      d[0] += w1 / r0
      d[1] -= w1 / r0
    elif m == 3:
      r0, r1 = (lam[i] - lam[i - 1]) / h, (lam[i - 1] - lam[i - 2]) / h
      phi = math.expm1(-h_eff)
      w1 = a * (phi / h_eff + 1.0)  # x' += w1 D1' - w2 D2
      w2 = a * ((phi + h_eff) / h_eff ** 2 - 0.5)
      # D1_0 = (D_0 - D_1) / r0, D1_1 = (D_1 - D_2) / r1,
      # D1' = D1_0 + r0 / (r0 + r1) (D1_0 - D1_1), D2 = (D1_0 - D1_1) / (r0 + r1).
      d1_0 = np.array([1.0, -1.0, 0.0]) / r0
      d1_1 = np.array([0.0, 1.0, -1.0]) / r1
      d += w1 * (d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)) - w2 * (d1_0 - d1_1) / (r0 + r1)
    coef_x0[i] = d
  s_ones = np.ones(s)
  return ReverseSteps(seq.astype(np.int32), s_ones, np.zeros(s), np.zeros((s, k)), coef_xt,
                      coef_x0, noise)


def _unipc_rhos(lam: np.ndarray, t: int, s0: int, previous: list, corrector: bool):
  """UniPC's weights for a step from lambda[s0] to lambda[t] using the earlier points
  `previous` (indices into lam): (rks [p-1], rhos, h, h_phi_1, B_h)."""
  h = lam[t] - lam[s0]
  hh = -h  # data prediction
  h_phi_1 = math.expm1(hh)
  b_h = math.expm1(hh)  # bh2
  rks = [(lam[j] - lam[s0]) / h for j in previous] + [1.0]
  p = len(rks)
  rows, b, h_phi_k, factorial = [], [], h_phi_1 / hh - 1.0, 1
  for n in range(1, p + 1):
    rows.append(np.power(rks, n - 1))
    b.append(h_phi_k * factorial / b_h)
    factorial *= n + 1
    h_phi_k = h_phi_k / hh - 1.0 / factorial
  r_mat, b = np.array(rows), np.array(b)
  if corrector:
    rhos = np.array([0.5]) if p == 1 else np.linalg.solve(r_mat, b)
  else:
    rhos = (np.zeros(0) if p == 1 else np.array([0.5]) if p == 2 else
            np.linalg.solve(r_mat[:-1, :-1], b[:-1]))
  return np.array(rks[:-1]), rhos, h_phi_1, b_h


def unipc_steps(schedule: Schedule, num_steps: int, order: int = 2,
                spacing: str = 'linspace') -> ReverseSteps:
  """UniPC-p (bh2, data prediction) over `num_steps` timesteps, the UniC corrector after every
  step but the last."""
  _check_order(order)
  seq, alpha, sigma, lam = _log_snr_path(schedule, num_steps, spacing)
  s, k = len(seq), MAX_ORDER + 1
  orders = [min(order, i + 1, s - i) for i in range(s)]
  table = {name: np.zeros(s) for name in ('corr_x', 'corr_prev', 'coef_xt')}
  corr_d, coef_x0 = np.zeros((s, k)), np.zeros((s, k))
  for i in range(s):
    # Corrector of x_i: from x_{i-1} (the predictor's start) with the new prediction D_i in
    # hist[0], D_{i-1} in hist[1], D_{i-1-j} in hist[1 + j].
    if i == 0:
      table['corr_x'][i] = 1.0
    else:
      p = orders[i - 1]
      rks, rhos, h_phi_1, b_h = _unipc_rhos(lam, i, i - 1, [i - 1 - j for j in range(1, p)],
                                            corrector=True)
      a = alpha[i]
      table['corr_prev'][i] = sigma[i] / sigma[i - 1]
      d = np.zeros(k)
      d[1] = -a * h_phi_1
      for j, (rk, rho) in enumerate(zip(rks, rhos[:-1]), start=1):
        d[1 + j] -= a * b_h * rho / rk
        d[1] += a * b_h * rho / rk
      d[0] -= a * b_h * rhos[-1]
      d[1] += a * b_h * rhos[-1]
      corr_d[i] = d
    # Predictor from the corrected x_i to t_{i+1}, with D_i in hist[0], D_{i-j} in hist[j].
    if i == s - 1:
      table['coef_xt'][i], coef_x0[i], _ = _final_row(k)
      continue
    p = orders[i]
    rks, rhos, h_phi_1, b_h = _unipc_rhos(lam, i + 1, i, [i - j for j in range(1, p)],
                                          corrector=False)
    a = alpha[i + 1]
    table['coef_xt'][i] = sigma[i + 1] / sigma[i]
    d = np.zeros(k)
    d[0] = -a * h_phi_1
    for j, (rk, rho) in enumerate(zip(rks, rhos), start=1):
      d[j] -= a * b_h * rho / rk
      d[0] += a * b_h * rho / rk
    coef_x0[i] = d
  return ReverseSteps(seq.astype(np.int32), table['corr_x'], table['corr_prev'], corr_d,
                      table['coef_xt'], coef_x0, np.zeros(s))


def build(sampler: str, schedule: Schedule, *, num_steps: int, eta: float = 0.0,
          order: int = 2, spacing: str = 'leading', stochastic: bool = False,
          variance: str = 'small') -> ReverseSteps:
  """The table of the sampler called `sampler` (one of SAMPLERS) with these settings; DDPM
  always runs all T steps and ignores num_steps, spacing and order."""
  if sampler == 'ddpm':
    return ddpm_steps(schedule, variance)
  if sampler == 'ddim':
    return ddim_steps(schedule, num_steps, eta, spacing)
  if sampler == 'dpm_solver++':
    return dpm_solver_pp_steps(schedule, num_steps, order, spacing, stochastic)
  if sampler == 'unipc':
    return unipc_steps(schedule, num_steps, order, spacing)
  raise ValueError(f'sampling.sampler={sampler!r} is unknown; choose one of {SAMPLERS}.')
