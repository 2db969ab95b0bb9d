"""The probability-flow ODE of any process, solved to a tolerance: adaptive sampling and
likelihoods (Song et al. 2021; Chen et al. 2018; Grathwohl et al. 2019).

Every process x_t = alpha x0 + sigma eps is written here in y = x / alpha and u = log sigma~
(sigma~ = sigma / alpha): y = x0 + e^u eps on all of them, and the probability-flow ODE is

    dy/du = y - D(alpha y, t(u)),

with D the data prediction (Karras et al. 2022, eq. 4, in log sigma~). The ODE is solved in u
because its vector field is then O(1) over the whole range, from the noise (sigma~ of 80 to
10^3) down to the data (sigma~ of 10^-2 or 10^-3): in t it grows like 1 / alpha at the noisy
end of VP and flow, in sigma~ like 1 / sigma~ near the data, and one embedded Runge-Kutta
pair's error control then has to chase scales that differ by 10^5. DPM-Solver steps in
lambda = -2u for the same reason.

The solver is diffrax's `diffeqsolve`, Tsit5 (a 5(4) embedded pair) with a `PIDController`,
each example of a batch with its own steps (vmap), so that the network calls of every sample are
counted. This is the one sampler that is not a table of `step_tables`: its steps are chosen
while it runs, so it lives beside `samplers.run_reverse`, not inside it; it shares the
denoiser, guidance and the process's conversions with every other sampler.

Likelihood: the change of variables along the ODE, data -> noise, gives

    log p_0(x0) = log N(y(u_max); 0, (1 + e^{2 u_max}) I) + int_{u_min}^{u_max} div_y f du,

f = y - D, div_y f = d - div_y D, from y(u_min) = x0; the prior is the process's noise end
(in x: N(0, (alpha^2 + sigma^2) I), where every sampler starts). div_y D is exact (the trace,
one vector-Jacobian product per dimension) for small d, else Hutchinson's estimate
E[p^T J p] with Rademacher or Gaussian probes p, fixed along each path. Both use `jax.vjp`, which
every layer supports (the fused GroupNorm and the lean attention have custom VJPs).
"""

from __future__ import annotations

import math
from typing import Callable

import diffrax
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import processes

Array = jnp.ndarray
DenoiseFn = Callable[[Array, Array], Array]
SAMPLER = 'adaptive'  # its name among the samplers (sampling.sampler)
PROBES = ('rademacher', 'gaussian')
# Network calls of Tsit5 in diffrax: 6 per step tried (7 stages, the first shared with the
# previous step's last), 1 at the start (the first step size is chosen from it), and for a
# sample 1 more at the end, its data prediction (counted in tests/test_ode.py).
CALLS_PER_STEP, START_CALLS = 6, 1


def u_range(process: processes.Process) -> tuple[float, float]:
  """(u_min, u_max) = log sigma~ at the process's t_min and t_max."""
  sigma_tilde = process.sigma_tilde(np.asarray([process.t_min, process.t_max], np.float64))
  return float(np.log(sigma_tilde[0])), float(np.log(sigma_tilde[1]))


def at(process: processes.Process, u: Array) -> tuple[Array, Array]:
  """(t, alpha) at u = log sigma~: the process time and its signal scale."""
  logsnr = -2.0 * u
  t = process.t_of_logsnr(logsnr)
  return t, process.alpha_sigma(t)[0]


def _denoise_one(denoise_fn: DenoiseFn, process, u, y):
  """D for one example y [...] at u, as a function of y: the network sees x = alpha y."""
  t, alpha = at(process, u)
  return denoise_fn((alpha * y)[None].astype(y.dtype), jnp.reshape(t, (1,)).astype(y.dtype))[0]


def _controller(rtol: float, atol: float) -> diffrax.PIDController:
  return diffrax.PIDController(rtol=rtol, atol=atol)


# Nothing differentiates through a solve here, so its loop needs no checkpointing: ForwardMode
# runs a plain while loop (diffrax's default, RecursiveCheckpointAdjoint, checkpoints it for
# reverse mode), which took 104 s against 183 s for the likelihoods of 64 digits (the digits
# U-Net, rtol 1e-3) on a 2-core CPU.
_LOOP = diffrax.ForwardMode()


def sample(denoise_fn: DenoiseFn, process: processes.Process, x_T: Array, *, rtol: float = 1e-3,
           atol: float = 1e-3, clip_x0: bool | float = True, max_steps: int = 4096):
  """Samples by solving the probability-flow ODE from noise to data to a tolerance.

  Args:
    denoise_fn: (x_t [B, ...], t float [B]) -> the data prediction D [B, ...].
    x_T: standard normal noise [B, ...]; the solve starts at sqrt(alpha^2 + sigma^2) x_T, as
      every sampler does.
    rtol, atol: the step control's tolerances on y = x / alpha.
    clip_x0: clip the final data prediction (True: to [-1, 1]; a number c: to [-c, c]). The
      predictions inside the solve are not clipped: a clipped vector field is not smooth, and
      the error control would stall on its kinks.
  Returns:
    (x_0 [B, ...], network calls of each sample int32 [B]).
  """
  u_min, u_max = u_range(process)
  term = diffrax.ODETerm(lambda u, y, _: y - _denoise_one(denoise_fn, process, u, y))

  def solve(y_T):
    return diffrax.diffeqsolve(term, diffrax.Tsit5(), u_max, u_min, None, y_T,
                               stepsize_controller=_controller(rtol, atol), max_steps=max_steps,
                               adjoint=_LOOP)

  y_T = x_T * jnp.sqrt(1.0 + jnp.exp(2.0 * u_max)).astype(x_T.dtype)
  solution = jax.vmap(solve)(y_T)
  y_0 = solution.ys[:, -1]
  t_0, alpha_0 = at(process, jnp.full((x_T.shape[0],), u_min, x_T.dtype))
  x0 = denoise_fn((alpha_0.reshape((-1,) + (1,) * (x_T.ndim - 1)) * y_0).astype(x_T.dtype), t_0)
  if clip_x0:
    bound = 1.0 if clip_x0 is True else float(clip_x0)
    x0 = jnp.clip(x0, -bound, bound)
  return x0, network_calls(solution)


def network_calls(solution: diffrax.Solution) -> Array:
  """Network calls of a (vmapped) Tsit5 solve, int32 [B]: its steps tried, the first step's
  choice and the final data prediction."""
  return (CALLS_PER_STEP * solution.stats['num_steps'] + START_CALLS + 1).astype(jnp.int32)


def probes_for(rng: Array, shape: tuple, count: int, kind: str = 'rademacher') -> Array:
  """[count, *shape] probes of Hutchinson's estimator, E[p p^T] = I; count 0: the standard
  basis (the exact trace, prod(shape) of them)."""
  if count == 0:
    size = math.prod(shape)
    return jnp.eye(size, dtype=jnp.float32).reshape((size,) + tuple(shape))
  if kind == 'rademacher':
    return jax.random.rademacher(rng, (count,) + tuple(shape), jnp.float32)
  if kind == 'gaussian':
    return jax.random.normal(rng, (count,) + tuple(shape), jnp.float32)
  raise ValueError(f'eval.ode_probe_kind={kind!r} is unknown; choose one of {PROBES}.')


def log_likelihood(denoise_fn: DenoiseFn, process: processes.Process, x0: Array, rng: Array, *,
                   probes: int = 1, probe_kind: str = 'rademacher', rtol: float = 1e-5,
                   atol: float = 1e-5, max_steps: int = 4096):
  """log p(x0) in nats of each example under the model's probability-flow ODE.

  Args:
    x0: data [B, ...] in the model's coordinates (images in [-1, 1], dequantised by the caller).
    probes: Hutchinson probes per example (fixed along its path); 0 for the exact divergence
      (one vector-Jacobian product per dimension: for 2-D data).
  Returns:
    (log p [B] in nats, network calls of each example int32 [B]: forward passes, each with the
    probes' backward passes).
  """
  u_min, u_max = u_range(process)
  shape = x0.shape[1:]
  dim = math.prod(shape)
  exact = probes == 0
  keys = jax.random.split(rng, x0.shape[0])

  def field(u, state, probe):
    y, _ = state
    d, vjp = jax.vjp(lambda v: _denoise_one(denoise_fn, process, u, v), y)
    jt_p = jax.vmap(vjp)(probe.astype(y.dtype))[0]
    trace = jnp.sum(probe * jt_p) if exact else jnp.sum(probe * jt_p) / probe.shape[0]
    return y - d, dim - trace

  term = diffrax.ODETerm(field)

  def solve(x, key):
    probe = probes_for(key, shape, probes, probe_kind).astype(x.dtype)
    state = (x, jnp.zeros((), x.dtype))
    return diffrax.diffeqsolve(term, diffrax.Tsit5(), u_min, u_max, None, state, args=probe,
                               stepsize_controller=_controller(rtol, atol), max_steps=max_steps,
                               adjoint=_LOOP)

  solution = jax.vmap(solve)(x0, keys)
  y_T, delta = solution.ys[0][:, -1], solution.ys[1][:, -1]
  var_T = 1.0 + math.exp(2.0 * u_max)
  flat = y_T.reshape(y_T.shape[0], -1)
  log_prior = -0.5 * (jnp.sum(flat ** 2, axis=1) / var_T + dim * math.log(2 * math.pi * var_T))
  return log_prior + delta, network_calls(solution) - 1


# 8-bit data in the model's coordinates: level k is at k / 127.5 - 1, a bin of this width.
BIN_WIDTH_8BIT = 2.0 / 255.0


def dequantize(x: Array, rng: Array, bin_width: float = BIN_WIDTH_8BIT) -> Array:
  """Uniform dequantisation: each value spread uniformly over its bin, [x - w/2, x + w/2)."""
  return x + (jax.random.uniform(rng, x.shape, x.dtype) - 0.5) * bin_width


def bits_per_dim(log_p: Array, dim: int, bin_width: float | None = BIN_WIDTH_8BIT) -> Array:
  """Bits per dimension from log p (nats) of dequantised data: the probability of a level is at
  least p times its bin's volume, log P >= log p + dim log w (Theis et al. 2016), so this bounds
  the discrete data's bits/dim from above. bin_width None: continuous data, -log p / (dim ln 2).
  """
  volume = 0.0 if bin_width is None else dim * math.log(bin_width)
  return -(log_p + volume) / (dim * math.log(2.0))
