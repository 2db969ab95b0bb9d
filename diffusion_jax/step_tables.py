"""The tables of every sampler, built in NumPy float64: DDPM, DDIM, DPM-Solver++, UniPC, Euler,
Heun, EDM's stochastic sampler and Euler-Maruyama, on every process (`processes.py`).

All of them are one scheme, which `samplers.run_reverse` runs as one lax.scan. The chain starts
at x = init_scale x_T (x_T ~ N(0, I); init_scale = sqrt(alpha^2 + sigma^2) at the first time, the
spread of x_t for data of unit variance: 1 on VP processes). Row i holds a time t_i and
coefficients; with D the data (x0) prediction of the network at (x, t_i), optionally clipped, and
`hist` the last K of them (newest first):

    hist   <- [D, hist[0], ..., hist[K-2]]
    anchor  = corr_x x + corr_prev anchor + corr_d . hist      (UniC, Heun; else anchor = x)
    x      <- coef_xt anchor + coef_x0 . hist + sigma z,  z ~ N(0, I)

With alpha_t, sigma_t the process's rates, lambda_t = log(alpha_t / sigma_t) and
sigma~_t = sigma_t / alpha_t, a step from s to t has h = lambda_t - lambda_s:

  DDPM       posterior mean coefficients of q(x_{t-1} | x_t, x0); sigma^2 = beta~_t ('small') or
             beta_t ('large'); no noise at t = 0 (K = 1); the ddpm process only
  DDIM       x' = alpha' D + sqrt(sigma'^2 - s^2) eps(D) + s z, eps(D) = (x - alpha D) / sigma,
             s = eta alpha' sigma~' sqrt(sigma~^2 - sigma~'^2) / sigma~ (Song et al. 2020, eq. 12;
             on VP processes eta sqrt((1 - abar') / (1 - abar)) sqrt(1 - abar / abar')) (K = 1)
  Euler      Karras et al. (2022) Algorithm 1 without its correction, on x~ = x / alpha with noise
             level sigma~: x~' = x~ + (sigma~' - sigma~) (x~ - D) / sigma~. This is DDIM with
             eta = 0, step for step (their Section 3), and so is the Euler step of a flow in t
  Heun       Algorithm 1: the Euler step to x-bar, a second call D' there, and
             x~' = x~ + (sigma~' - sigma~) (d + d') / 2 with d' = (x-bar~ - D') / sigma~'; the
             step to sigma = 0 stays Euler (two calls per step but the last)
  EDM        Algorithm 2: before each step with S_tmin <= sigma~_i <= S_tmax the noise level is
             raised to sigma-hat = (1 + gamma) sigma~_i, gamma = min(S_churn / S, sqrt(2) - 1),
             by adding S_noise sqrt(sigma-hat^2 - sigma~_i^2) z (at the end of the row before),
             then a Heun step from sigma-hat
  Euler-Maruyama  the reverse SDE with the noise level as time (Karras et al. eq. 6 with
             beta = sigma~' / sigma~, the SDE of Song et al. 2021):
             x~' = x~ + 2 (sigma~' - sigma~) (x~ - D) / sigma~ + sqrt(2 sigma~ (sigma~ - sigma~')) z
  DPM-Solver++ (Lu et al. 2022, data prediction, multistep), with D1 = (D_0 - D_1) / r0,
             r0 = h_prev / h, and phi = e^(-h) - 1:
             order 1: x' = sigma_t / sigma_s x - alpha_t phi D_0                 (= DDIM, eta 0)
             order 2: ... - alpha_t phi D1 / 2                                   (Algorithm 2)
             order 3: ... - alpha_t phi D_0 + alpha_t (phi / h + 1) D1'
                          - alpha_t ((phi + h) / h^2 - 1/2) D2                   (DPM-Solver's 3M)
             stochastic (the SDE form, "2M SDE"): sigma_t / sigma_s e^(-h) x + alpha_t (1 - e^(-2h))
             (D_0 + D1 / 2) + sigma_t sqrt(1 - e^(-2h)) z; order 3 adds the 3M SDE terms
  Consistency  DDIM with s = sigma': x' = alpha' D + sigma' z, the data prediction noised afresh
             (Song et al. 2023, Algorithm 1); one row is one-step generation
  UniPC      (Zhao et al. 2023, data prediction, B(h) = e^h - 1 "bh2"): the UniP-p predictor,
             and after every step but the last the UniC corrector, which moves the point the
             predictor started from using the network's output at the new point (no extra call)

Every step is linear in x, the earlier data predictions and fresh noise, which is why one scan
runs them all; the x~ forms above become x-space coefficients through x = alpha x~. Every sampler
ends with a step to sigma = 0 (alpha = 1) that returns the data prediction D itself. The
multistep solvers use lower orders while their history fills and at the end; DPM-Solver++ with
fewer than 15 steps also takes the second-to-last at order <= 2, UniPC always steps at order
<= the steps left (both as the reference implementations do).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from diffusion_jax import processes, timesteps

SAMPLERS = ('ddpm', 'ddim', 'dpm_solver++', 'unipc', 'euler', 'heun', 'edm', 'euler_maruyama',
            'consistency')
MAX_ORDER = 3
_LOWER_ORDER_FINAL_BELOW = 15  # DPM-Solver++: fewer steps than this end at orders 2, 1


class ReverseSteps(NamedTuple):
  """A sampler's table, in the order it runs (t decreasing): S rows, K history slots."""
  t: np.ndarray  # float64 [S]: the process time of each network call
  corr_x: np.ndarray  # [S]
  corr_prev: np.ndarray  # [S]
  corr_d: np.ndarray  # [S, K]
  coef_xt: np.ndarray  # [S]
  coef_x0: np.ndarray  # [S, K]
  sigma: np.ndarray  # [S]
  init_scale: float = 1.0  # the chain starts at init_scale x_T
  # Inpainting (`editing.for_inpainting`; None otherwise): the rates of x after each row, where
  # the known pixels are imposed, and RePaint's forward jump after it,
  # x <- renoise_scale x + renoise_sigma z.
  alpha_next: np.ndarray | None = None  # [S]
  sigma_next: np.ndarray | None = None  # [S]
  renoise_scale: np.ndarray | None = None  # [S]
  renoise_sigma: np.ndarray | None = None  # [S]

  @property
  def num_calls(self) -> int:
    """Network calls the table makes: one per row."""
    return len(self.t)


def _init_scale(alpha: np.ndarray, sigma: np.ndarray) -> float:
  return float(np.sqrt(alpha[0] ** 2 + sigma[0] ** 2))


def _plain_table(t, coef_xt, coef_x0, sigma, init_scale=1.0) -> ReverseSteps:
  """Rows without a corrector and with the newest prediction only (K = 1)."""
  s = len(t)
  return ReverseSteps(np.asarray(t, np.float64), np.ones(s), np.zeros(s), np.zeros((s, 1)),
                      np.asarray(coef_xt, np.float64),
                      np.asarray(coef_x0, np.float64).reshape(s, 1),
                      np.asarray(sigma, np.float64), init_scale)


def ddpm_steps(process, variance: str = 'small', strength: float = 1.0) -> ReverseSteps:
  """All T ancestral steps of the ddpm process (with strength < 1 the last int(T strength)).
  variance: 'small' (posterior beta~_t) or 'large' (beta_t)."""
  process = processes.as_process(process)
  if not process.discrete:
    raise ValueError(f'sampling.sampler=ddpm runs the T steps of the discrete chain, which '
                     f'diffusion.process={process.name} has not; use sampling.sampler=ddim with '
                     'sampling.eta=1 (ancestral steps) or euler_maruyama.')
  betas = np.asarray(process.schedule.betas, np.float64)
  abar = process.alphas_cumprod64
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
  t = timesteps.started(np.arange(process.num_timesteps)[::-1], strength)
  return _plain_table(t, coef_xt[t], coef_x0[t], np.sqrt(var[t]))


def _path(process, times: np.ndarray):
  """alpha, sigma, lambda at decreasing `times` [S] and at the end (sigma = 0): [S + 1], the
  last entries alpha = 1, sigma = 0, lambda = inf."""
  process = processes.as_process(process)
  alpha, sigma = process.alpha_sigma(np.asarray(times, np.float64))
  alpha, sigma = np.append(alpha, 1.0), np.append(sigma, 0.0)
  with np.errstate(divide='ignore'):
    lam = np.log(alpha) - np.log(sigma)
  return alpha, sigma, lam


def _log_snr_path(process, num_steps: int, spacing: str, shift: float = 1.0,
                  strength: float = 1.0):
  """Decreasing times [S] of the spacing and alpha, sigma, lambda ([S + 1], see `_path`)."""
  process = processes.as_process(process)
  seq = timesteps.sampler_times(process, num_steps, spacing, shift, strength)
  return (seq,) + _path(process, seq)


def ddim_steps(process, num_steps: int, eta: float = 0.0, spacing: str = 'leading',
               shift: float = 1.0, strength: float = 1.0, fresh: bool = False) -> ReverseSteps:
  """S DDIM steps with stochasticity eta (0: deterministic DDIM, 1: DDPM-like); `fresh`: s =
  sigma' (consistency sampling) at the first S of the spacing's S + 1 times, whose last, the
  lowest level, is where a consistency function is the identity."""
  seq, alpha, sigma, _ = _log_snr_path(process, num_steps + fresh, spacing, shift, strength)
  if fresh:
    seq, (alpha, sigma, _) = seq[:-1], _path(process, seq[:-1])
  a, s, a_next, s_next = alpha[:-1], sigma[:-1], alpha[1:], sigma[1:]
  st, st_next = s / a, s_next / a_next
  noise = (s_next if fresh else
           eta * a_next * st_next * np.sqrt(np.maximum(st ** 2 - st_next ** 2, 0.0)) / st)
  coef_xt = np.sqrt(np.maximum(s_next ** 2 - noise ** 2, 0.0)) / s
  coef_x0 = a_next - coef_xt * a
  return _plain_table(seq, coef_xt, coef_x0, noise, _init_scale(alpha, sigma))


def _check_order(order: int) -> None:
  if order not in range(1, MAX_ORDER + 1):
    raise ValueError(f'sampling.solver_order={order} must be 1, 2 or 3.')


def _final_row(k: int):
  """The last step, to sigma = 0 at order 1: x' = D."""
  coef_x0 = np.zeros(k)
  coef_x0[0] = 1.0
  return 0.0, coef_x0, 0.0


def dpm_solver_pp_steps(process, num_steps: int, order: int = 2, spacing: str = 'linspace',
                        stochastic: bool = False, shift: float = 1.0,
                        strength: float = 1.0) -> ReverseSteps:
  """DPM-Solver++(order M) multistep, or its SDE form, over `num_steps` times."""
  _check_order(order)
  seq, alpha, sigma, lam = _log_snr_path(process, num_steps, spacing, shift, strength)
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
  return ReverseSteps(seq, np.ones(s), np.zeros(s), np.zeros((s, k)), coef_xt, coef_x0, noise,
                      _init_scale(alpha, sigma))


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


def unipc_steps(process, num_steps: int, order: int = 2, spacing: str = 'linspace',
                shift: float = 1.0, strength: float = 1.0) -> ReverseSteps:
  """UniPC-p (bh2, data prediction) over `num_steps` times, the UniC corrector after every step
  but the last."""
  _check_order(order)
  seq, alpha, sigma, lam = _log_snr_path(process, num_steps, spacing, shift, strength)
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
  return ReverseSteps(seq, table['corr_x'], table['corr_prev'], corr_d, table['coef_xt'],
                      coef_x0, np.zeros(s), _init_scale(alpha, sigma))


def _raised(process, t: float, gamma: float):
  """The time whose noise level is (1 + gamma) sigma~(t) (rounded to a timestep on the ddpm
  process, kept within the process's range) and its alpha, sigma."""
  if gamma <= 0:
    return (t,) + tuple(float(v) for v in process.alpha_sigma(np.float64(t)))
  st = process.sigma_tilde(np.float64(t)) * (1.0 + gamma)
  t_hat = process.t_of_logsnr(-2.0 * np.log(st))
  t_hat = float(process.clip_t(np.round(t_hat) if process.discrete else t_hat))
  return (t_hat,) + tuple(float(v) for v in process.alpha_sigma(np.float64(t_hat)))


def edm_steps(process, num_steps: int, spacing: str = 'karras', shift: float = 1.0, *,
              s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = math.inf,
              s_noise: float = 1.0, strength: float = 1.0) -> ReverseSteps:
  """Karras et al. (2022) Algorithm 2 over `num_steps` noise levels (2 num_steps - 1 network
  calls); with s_churn = 0 it is Algorithm 1, the deterministic Heun sampler."""
  process = processes.as_process(process)
  seq = timesteps.sampler_times(process, num_steps, spacing, shift, strength)
  n = len(seq)
  alpha, sigma, _ = _path(process, seq)
  st = sigma / alpha  # sigma~ [n + 1], 0 at the end
  gamma = min(s_churn / n, math.sqrt(2.0) - 1.0)
  hats = [_raised(process, seq[i], gamma if s_tmin <= st[i] <= s_tmax else 0.0)
          for i in range(n)]
  rows = []  # (t, corr_x, corr_prev, coef_xt, coef_x0 [2], noise)
  for i in range(n):
    t_hat, a_hat, s_hat = hats[i]
    st_hat = s_hat / a_hat
    a_next = alpha[i + 1]
    r = st[i + 1] / st_hat
    if i == n - 1:  # Euler to sigma = 0: x = D
      rows.append((t_hat, 1.0, 0.0, 0.0, [1.0, 0.0], 0.0))
      break
    # Row A, at x-hat: the Euler step to x-bar at sigma~_{i+1}; x-hat stays the anchor.
    rows.append((t_hat, 1.0, 0.0, a_next * r / a_hat, [a_next * (1.0 - r), 0.0], 0.0))
    # Row B, at x-bar: the Heun correction from x-hat with D_i (hist[1]) and D' (hist[0]),
    # then the next step's raise of the noise level (x = alpha x~ changes alpha with the time).
    q = (r - 1.0) / 2.0
    t_up, a_up, s_up = hats[i + 1]
    up = a_up / a_next
    extra = a_up * s_noise * math.sqrt(max((s_up / a_up) ** 2 - st[i + 1] ** 2, 0.0))
    rows.append((seq[i + 1], 0.0, 1.0, up * a_next * r / a_hat,
                 [-up * a_next * q / r, up * a_next * q * (1.0 - 2.0 * r) / r], extra))
  t, corr_x, corr_prev, coef_xt, coef_x0, noise = (np.array(c, np.float64) for c in zip(*rows))
  a0, s0 = hats[0][1], hats[0][2]
  return ReverseSteps(t, corr_x, corr_prev, np.zeros_like(coef_x0), coef_xt, coef_x0, noise,
                      float(np.sqrt(a0 ** 2 + s0 ** 2)))


def euler_maruyama_steps(process, num_steps: int, spacing: str = 'karras',
                         shift: float = 1.0, strength: float = 1.0) -> ReverseSteps:
  """Euler-Maruyama on the reverse SDE (see the module docstring) over `num_steps` times."""
  seq, alpha, sigma, _ = _log_snr_path(process, num_steps, spacing, shift, strength)
  st = sigma / alpha
  r = st[1:] / st[:-1]
  ratio = alpha[1:] / alpha[:-1]
  coef_xt = ratio * (2.0 * r - 1.0)
  coef_x0 = 2.0 * alpha[1:] * (1.0 - r)
  noise = alpha[1:] * np.sqrt(2.0 * st[:-1] * (st[:-1] - st[1:]))
  coef_xt[-1], coef_x0[-1], noise[-1] = 0.0, 1.0, 0.0  # to sigma = 0: x = D
  return _plain_table(seq, coef_xt, coef_x0, noise, _init_scale(alpha, sigma))


def num_steps_for_calls(sampler: str, calls: int) -> int:
  """The sampling.num_steps that spends at most `calls` network calls (heun and edm call the
  network twice per step but the last)."""
  return max(1, (calls + 1) // 2) if sampler in ('heun', 'edm') else calls


def build(sampler: str, process, *, num_steps: int, eta: float = 0.0, order: int = 2,
          spacing: str = 'leading', stochastic: bool = False, variance: str = 'small',
          shift: float = 1.0, s_churn: float = 0.0, s_tmin: float = 0.0,
          s_tmax: float = math.inf, s_noise: float = 1.0,
          strength: float = 1.0) -> ReverseSteps:
  """The table of the sampler called `sampler` (one of SAMPLERS) with these settings on
  `process` (a Schedule stands for its ddpm process). DDPM always runs all T steps and
  ignores num_steps, spacing and order; heun and edm make 2 num_steps - 1 network calls.
  strength < 1 keeps the last int(S strength) times of the grid (`timesteps.started`)."""
  if sampler == 'ddpm':
    return ddpm_steps(process, variance, strength)
  if sampler in ('ddim', 'euler'):
    return ddim_steps(process, num_steps, eta if sampler == 'ddim' else 0.0, spacing, shift,
                      strength)
  if sampler == 'dpm_solver++':
    return dpm_solver_pp_steps(process, num_steps, order, spacing, stochastic, shift, strength)
  if sampler == 'unipc':
    return unipc_steps(process, num_steps, order, spacing, shift, strength)
  if sampler in ('heun', 'edm'):
    churn = dict(s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise)
    return edm_steps(process, num_steps, spacing, shift, strength=strength,
                     **(churn if sampler == 'edm' else {}))
  if sampler == 'euler_maruyama':
    return euler_maruyama_steps(process, num_steps, spacing, shift, strength)
  if sampler == 'consistency':
    return ddim_steps(process, num_steps, 0.0, spacing, shift, strength, fresh=True)
  raise ValueError(f'sampling.sampler={sampler!r} is unknown; choose one of {SAMPLERS}.')
