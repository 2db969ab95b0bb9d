"""Training objectives beside the denoising loss: what a train step minimises per example.

`denoise` is `diffusion.loss_per_example`: the network at noise level t predicts the data (in
any parameterisation), the objective of every multi-step sampler.

`meanflow` (Geng et al. 2025, "Mean Flows for One-step Generative Modeling") trains a network
with a second time input for the average velocity of the flow path z_t = (1 - t) x + t eps over
[r, t],

  u(z_t, r, t) = 1 / (t - r) int_r^t v(z_s, s) ds,   v = eps - x,

so that one step z_r = z_t - (t - r) u is exact. Differentiating (t - r) u = int_r^t v ds in t
gives the MeanFlow identity u = v - (t - r) d/dt u, with the total derivative
d/dt u = v . d_z u + d_t u, one Jacobian-vector product of the network along (v, 0, 1) in
(z, r, t). The loss regresses u_theta on the identity's right-hand side under stop-gradient,
with the paper's adaptive weight sg(1 / (|delta|^2 + c)^p) (p = 1: a robust, Cauchy-like loss).
With r = t the target is v: plain flow matching, which the paper keeps for most examples
(`training.meanflow_ratio` of pairs have r != t; 0.25 in its ablation). For a class-conditional
network, guidance is trained into it (the paper's eq. 13): v is replaced by
w v + (1 - w) u_theta(z_t, t, t | no label) for labelled examples, so that sampling at scale 1
gives the guided samples of scale w.

The network sees the step as `interval` = net_time(t) - net_time(r) (`Process.net_interval`,
the models' `interval_embedding`); the samplers' Euler row with the row's end time r is the
MeanFlow step, because the flow conversion of u, D = z_t - t u, gives
z_r = (r / t) z_t + (1 - r / t) D = z_t - (t - r) u.

`shortcut` (Frans et al. 2024, "One Step Diffusion via Shortcut Models") trains the same
network, u(z_t, r, t) on the flow path, without a JVP: most examples are flow matching at a step
of length 0 (r = t, target v), the rest (`training.shortcut_ratio`, the paper's 1/4) are
self-consistent: a step of length 2d equals two steps of length d,

  u(z_t, t - 2d, t) <- sg((u(z_t, t - d, t) + u(z', t - 2d, t - d)) / 2),
  z' = z_t - d u(z_t, t - d, t),

with 2d in {1, 1/2, ..., 2 / M} (M = `training.shortcut_max_steps`, 128) and t on the grid of
multiples of 2d (`shortcut_times`). It samples with the same Euler rows as MeanFlow.

`consistency` trains a consistency function on EDM's process (x_t = x + t eps, t = sigma):
f(x_t, t) = D(x_t, t), the preconditioned data prediction, which meets the boundary condition
f(x, 0) = x (c_skip(0) = 1, c_out(0) = 0). For a pair r < t on one noise draw the loss is
w(t, r) d(f(x_t, t), sg f(x_r, r)) (`consistency_loss_per_example`) with the pseudo-Huber
distance d(a, b) = sqrt(|a - b|^2 + c^2) - c; f(x_0, 0) = x itself. The pairs:
  ict  Song & Dhariwal 2023 ("Improved Techniques for Training Consistency Models"): adjacent
       levels of N Karras levels (rho = 7), N doubling from 10 to 1280 over the run, the lower
       one drawn with the log-normal weights of its interval, w = 1 / (t - r)
       (`ict_levels`, `ict_times`).
  ect  Geng et al. 2024 ("Consistency Models Made Easy"): t log-normal,
       r = max(t (1 - n(t) / q^(stage + 1)), 0), n(t) = 1 + 8 sigmoid(-t), so r = 0 (the
       denoising loss of a diffusion model) at the start and r -> t as stages pass; meant to
       start from a trained diffusion run (`training.init_from`); w = 1 / t^2 + 1 / sigma_data^2
       (`ect_times`, `ect_weight`).
Consistency models sample with the `consistency` table: at each level the data prediction,
noised afresh to the next level (Song et al. 2023, Algorithm 1).
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

from diffusion_jax import diffusion, processes

Array = jnp.ndarray
OBJECTIVES = ('denoise', 'meanflow', 'shortcut', 'consistency')
FORWARD_MODE = ('meanflow',)  # objectives that take jax.jvp of the network
STEP_OBJECTIVES = ('meanflow', 'shortcut')  # average velocities, on the flow path
CONSISTENCY_SCHEDULES = ('ict', 'ect')
ICT_LEVELS = (10, 1280)  # iCT's discretisation: N doubles from the first to the second
RHO = 7.0  # the Karras levels' exponent
ECT_K, ECT_B = 8.0, 1.0  # ECT's n(t) = 1 + k sigmoid(-b t)


def check(objective: str, process_name: str, prediction_type: str,
          interval_embedding: bool) -> None:
  """Refuses an objective on a process, parameterisation or network it is not defined for."""
  if objective not in OBJECTIVES:
    raise ValueError(f'training.objective={objective!r} is unknown; choose one of {OBJECTIVES}.')
  if objective in STEP_OBJECTIVES:
    if process_name != 'flow':
      raise ValueError(f'training.objective={objective} is defined on the flow path z_t = '
                       f'(1 - t) x + t eps, not diffusion.process={process_name}; set '
                       'diffusion.process=flow.')
    if prediction_type != 'flow':
      raise ValueError(f'training.objective={objective} trains an average velocity: set '
                       f'diffusion.prediction_type=flow (not {prediction_type!r}).')
    if not interval_embedding:
      raise ValueError(f'training.objective={objective} needs the step\'s end as a second '
                       'input: set model.interval_embedding=True.')
  if objective == 'consistency':
    if process_name != 'edm':
      raise ValueError('training.objective=consistency is defined on EDM\'s process x_t = x + '
                       f'sigma eps (iCT, ECT), not diffusion.process={process_name}; set '
                       'diffusion.process=edm.')
    if prediction_type != 'edm':
      raise ValueError('training.objective=consistency needs a data prediction with f(x, 0) = x: '
                       'set diffusion.prediction_type=edm (EDM\'s preconditioning), not '
                       f'{prediction_type!r}.')


def meanflow_times(t1: Array, t2: Array, coin: Array, ratio: float) -> tuple[Array, Array]:
  """(t, r) [B] from two draws of the training-time law: t the later, r the earlier of them for
  the examples whose `coin` (uniform [B]) is below `ratio`, r = t for the rest."""
  t, r = jnp.maximum(t1, t2), jnp.minimum(t1, t2)
  return t, jnp.where(coin < ratio, r, t)


def trained_in_guidance(u_null: Callable[[Array], Array], keep: Array,
                        scale: float) -> Callable[[Array, Array], Array]:
  """MeanFlow's guidance trained into a class-conditional network (its eq. 13): (z, v) ->
  scale v + (1 - scale) u_null(z) for the examples where `keep` [B] is True (their label was
  kept), v for the rest; u_null(z) is the network's velocity at a step of length 0 without a
  label."""
  def guided_v(z: Array, v: Array) -> Array:
    mixed = scale * v + (1.0 - scale) * u_null(z).astype(v.dtype)
    return jnp.where(diffusion.column(keep, v.ndim), mixed, v)
  return guided_v


def meanflow_loss_per_example(u_fn: Callable[[Array, Array, Array], Array], x0: Array,
                              noise: Array, t: Array, r: Array, *, weight_power: float = 1.0,
                              weight_eps: float = 1e-3,
                              guided_v: Callable[[Array, Array], Array] | None = None) -> Array:
  """The MeanFlow loss of each example [B].

  Args:
    u_fn: (z [B, ...], t [B], r [B]) -> the network's average velocity [B, ...] (process times;
      the network must pass `jax.jvp`: build it with `forward_mode`).
    x0, noise: data and standard normal noise [B, ...].
    t, r: the step's start and end [B], t >= r (`meanflow_times`).
    weight_power, weight_eps: the adaptive weight sg(1 / (|delta|^2 + eps)^p); p = 0 is the
      plain squared error.
    guided_v: (z, v) -> the velocity to use instead of v (`trained_in_guidance`), or None.
  Returns:
    [B] (float32, float64 for float64 inputs): sg(w) |delta|^2, with |delta|^2 the mean
    squared error over the dimensions.
  """
  tc = diffusion.column(t, x0.ndim)
  z = (1.0 - tc) * x0 + tc * noise
  v = noise - x0
  if guided_v is not None:
    v = jax.lax.stop_gradient(guided_v(z, v))
  u, du_dt = jax.jvp(u_fn, (z, t, r), (v, jnp.ones_like(t), jnp.zeros_like(r)))
  target = jax.lax.stop_gradient(v - (tc - diffusion.column(r, x0.ndim)) * du_dt)
  compute = jnp.promote_types(u.dtype, jnp.float32)  # float32, or float64 for float64 inputs
  err = jnp.mean(jnp.square(u.astype(compute) - target.astype(compute)),
                 axis=tuple(range(1, x0.ndim)))
  if weight_power:
    err = err * jax.lax.stop_gradient(1.0 / (err + weight_eps) ** weight_power)
  return err



# --- shortcut models ------------------------------------------------------------------------------

def shortcut_times(u_level: Array, u_slot: Array, max_steps: int) -> tuple[Array, Array]:
  """(t, r) [B] of self-consistency examples: the step 2d = t - r = 2^-k with k uniform in
  {0, ..., log2(max_steps) - 1} (from `u_level`, uniform [B]) and t = 2d j with j uniform in
  {1, ..., 1 / (2d)} (from `u_slot`): the step lies on its own grid, which ends at 0."""
  levels = int(round(math.log2(max_steps)))
  k = jnp.minimum(jnp.floor(u_level * levels), levels - 1)
  slots = jnp.exp2(k)  # 1 / (2d)
  j = jnp.minimum(jnp.floor(u_slot * slots), slots - 1) + 1.0
  return j / slots, (j - 1.0) / slots


def shortcut_loss_per_example(u_fn: Callable[[Array, Array, Array], Array], x0: Array,
                              noise: Array, t: Array, r: Array, consistent: int) -> Array:
  """The shortcut model's loss of each example [B].

  Args:
    u_fn: (z [b, ...], t [b], r [b]) -> the network's average velocity over [r, t].
    x0, noise: data and standard normal noise [B, ...].
    t, r: the step of each example [B]: the first `consistent` examples are self-consistency
      examples (`shortcut_times`), the rest flow matching (r = t: their target is v = eps - x).
    consistent: how many; a static number, so the two bootstrap calls run on those only.
  Returns:
    [B] (float32, float64 for float64 inputs): the mean squared error over the dimensions.
  """
  tc = diffusion.column(t, x0.ndim)
  z = (1.0 - tc) * x0 + tc * noise
  target = noise - x0
  if consistent:
    zc, tb, rb = z[:consistent], t[:consistent], r[:consistent]
    mid = 0.5 * (tb + rb)
    first = u_fn(zc, tb, mid)
    second = u_fn(zc - diffusion.column(tb - mid, zc.ndim) * first.astype(zc.dtype), mid, rb)
    both = 0.5 * (first + second).astype(target.dtype)
    target = jnp.concatenate([both, target[consistent:]])
  target = jax.lax.stop_gradient(target)
  u = u_fn(z, t, r)
  compute = jnp.promote_types(u.dtype, jnp.float32)
  return jnp.mean(jnp.square(u.astype(compute) - target.astype(compute)),
                  axis=tuple(range(1, x0.ndim)))


# --- consistency training ------------------------------------------------------------------------

def karras_levels(count: Array, size: int, sigma_min: float, sigma_max: float) -> Array:
  """The first `count` of `size` slots hold N = count Karras levels, increasing from sigma_min
  to sigma_max (rho = 7); the rest repeat sigma_max. [size] (count may be traced)."""
  i = jnp.arange(size) * 1.0  # float32 (float64 where enabled)
  frac = jnp.minimum(i / jnp.maximum(count - 1.0, 1.0), 1.0)
  lo, hi = sigma_min ** (1.0 / RHO), sigma_max ** (1.0 / RHO)
  return (lo + frac * (hi - lo)) ** RHO


def ict_levels(step: Array, num_steps: int, stages: int) -> Array:
  """iCT's number of levels at `step`: N = min(s0 2^floor(step / K'), s1) + 1 with
  K' = floor(num_steps / stages) and (s0, s1) = ICT_LEVELS (the paper: stages = 8)."""
  s0, s1 = ICT_LEVELS
  per_stage = max(num_steps // stages, 1)
  return jnp.minimum(s0 * jnp.exp2(jnp.floor(step / per_stage)), s1) + 1.0


def ict_pair_mass(n_levels: Array, sigma_min: float, sigma_max: float, mean: float,
                  std: float) -> tuple[Array, Array]:
  """(levels [L], mass [L - 1]) with L = ICT_LEVELS[1] + 1 slots: the N = `n_levels` Karras
  levels (`karras_levels`) and the unnormalised probability of the pair (sigma_i, sigma_{i+1}),
  erf((log sigma_{i+1} - mean) / (sqrt 2 std)) - erf((log sigma_i - mean) / (sqrt 2 std)),
  0 beyond the N - 1 pairs."""
  size = ICT_LEVELS[1] + 1
  sigmas = karras_levels(n_levels, size, sigma_min, sigma_max)
  cdf = jax.scipy.special.erf((jnp.log(sigmas) - mean) / (math.sqrt(2.0) * std))
  return sigmas, jnp.where(jnp.arange(size - 1) < n_levels - 1, cdf[1:] - cdf[:-1], 0.0)


def ict_times(key: Array, n_levels: Array, sigma_min: float, sigma_max: float,
              mean: float, std: float) -> tuple[Array, Array]:
  """One (t, r) pair of adjacent levels, t = sigma_{i+1}, r = sigma_i, drawn with the
  probabilities of `ict_pair_mass`."""
  sigmas, mass = ict_pair_mass(n_levels, sigma_min, sigma_max, mean, std)
  i = jax.random.categorical(key, jnp.log(jnp.maximum(mass, 1e-30)))
  return sigmas[i + 1], sigmas[i]


def ect_times(t: Array, step: Array, num_steps: int, stages: int, q: float) -> Array:
  """ECT's r [B] for noise levels t [B] at `step`: max(t (1 - n(t) / q^(stage + 1)), 0) with
  n(t) = 1 + 8 sigmoid(-t) and stage = floor(step / (num_steps / stages))."""
  stage = jnp.floor(step / max(num_steps // stages, 1))
  n = 1.0 + ECT_K * jax.nn.sigmoid(-ECT_B * t)
  return jnp.maximum(t * (1.0 - n / q ** (stage + 1.0)), 0.0)


def ect_weight(t: Array, sigma_data: float) -> Array:
  """ECT's weight 1 / t^2 + 1 / sigma_data^2 [B]."""
  return (t ** 2 + sigma_data ** 2) / (t * sigma_data) ** 2


def consistency_loss_per_example(f: Callable[[Array, Array], Array], x0: Array, noise: Array,
                                 t: Array, r: Array, weight: Array, huber_c: float) -> Array:
  """Consistency training's loss of each example [B].

  Args:
    f: (x [B, ...], sigma [B]) -> the data prediction (the consistency function).
    x0, noise: data and standard normal noise [B, ...], one noise draw for both levels.
    t, r: noise levels [B], t > r >= 0; at r = 0 the target is x0 itself (f(x, 0) = x).
    weight: w(t, r) [B].
    huber_c: c of the pseudo-Huber distance sqrt(|a - b|^2 + c^2) - c, |.| the Euclidean norm
      over all dimensions (iCT: 0.00054 sqrt(dimensions)); 0 is the Euclidean distance.
  Returns:
    [B] (float32, float64 for float64 inputs): weight d(f(x_t, t), sg f(x_r, r)).
  """
  column = lambda a: diffusion.column(a, x0.ndim)
  clean = r <= 0.0
  # f at r > 0 only; the placeholder level of the others is never used.
  target = f(x0 + column(r) * noise, jnp.where(clean, t, r)).astype(x0.dtype)
  target = jax.lax.stop_gradient(jnp.where(column(clean), x0, target))
  out = f(x0 + column(t) * noise, t)
  compute = jnp.promote_types(out.dtype, jnp.float32)
  sq = jnp.sum(jnp.square(out.astype(compute) - target.astype(compute)),
               axis=tuple(range(1, x0.ndim)))
  return weight.astype(compute) * (jnp.sqrt(sq + huber_c ** 2) - huber_c)


def consistency_times(tc, process, keys, index, step):
  """(t, r, weight) [b] of consistency training's pairs at `step`, one key [b, 2] per example:
  training.consistency_schedule's (`ict_times`, `ect_times`), the noise levels' law
  training.lognormal_mean and lognormal_std."""
  if tc.consistency_schedule == 'ict':
    n = ict_levels(step, tc.num_steps, tc.consistency_stages)
    t, r = jax.vmap(lambda k: ict_times(
        jax.random.fold_in(k, 3), n, process.t_min, process.t_max, tc.lognormal_mean,
        tc.lognormal_std))(keys)
    return t, r, 1.0 / (t - r)
  t = processes.training_times(process, keys, index, tc.batch_size, method='lognormal',
                               mean=tc.lognormal_mean, std=tc.lognormal_std)
  r = ect_times(t, step, tc.num_steps, tc.consistency_stages, tc.consistency_q)
  return t, r, ect_weight(t, process.sigma_data)
