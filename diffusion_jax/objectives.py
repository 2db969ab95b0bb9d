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
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from diffusion_jax import diffusion

Array = jnp.ndarray
OBJECTIVES = ('denoise', 'meanflow')
FORWARD_MODE = ('meanflow',)  # objectives that take jax.jvp of the network
MEANFLOW_PROCESSES = ('flow',)  # the linear path z_t = (1 - t) x + t eps of the paper


def check(objective: str, process_name: str, prediction_type: str,
          interval_embedding: bool) -> None:
  """Refuses an objective on a process, parameterisation or network it is not defined for."""
  if objective not in OBJECTIVES:
    raise ValueError(f'training.objective={objective!r} is unknown; choose one of {OBJECTIVES}.')
  if objective != 'meanflow':
    return
  if process_name not in MEANFLOW_PROCESSES:
    raise ValueError(f'training.objective=meanflow is defined on the flow path z_t = (1 - t) x + '
                     f't eps, not diffusion.process={process_name}; set diffusion.process=flow.')
  if prediction_type != 'flow':
    raise ValueError('training.objective=meanflow trains an average velocity: set '
                     f'diffusion.prediction_type=flow (not {prediction_type!r}).')
  if not interval_embedding:
    raise ValueError('training.objective=meanflow needs the step\'s end as a second input: set '
                     'model.interval_embedding=True.')


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

