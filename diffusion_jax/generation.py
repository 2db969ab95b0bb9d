"""Generation from a model: the network as the samplers' `eps_fn` (with classifier-free
guidance), and the jitted, device-sharded generator that training previews, `--mode=sample`,
`--mode=eval`, the notebook and the figures all use.

The samplers themselves (`samplers`) are pure math over an `eps_fn(x_t, t)`; this module is where
a config, a network and its parameters meet them.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import diffusion, metric_logging, parallel, samplers
from diffusion_jax.task import Task


def guided_eps_fn(cond_eps_fn: samplers.EpsFn, uncond_eps_fn: samplers.EpsFn,
                  scale: float) -> samplers.EpsFn:
  """Classifier-free guidance (Ho & Salimans 2022): eps_u + scale * (eps_c - eps_u).

  scale = 1 gives the conditional model; 0 the unconditional one.
  """
  def eps_fn(x_t, t):
    eps_c, eps_u = cond_eps_fn(x_t, t), uncond_eps_fn(x_t, t)
    return eps_u + scale * (eps_c - eps_u)
  return eps_fn


def make_eps_fn(task: Task, params, labels, config) -> samplers.EpsFn:
  """The network as `eps_fn(x_t, t)`, with classifier-free guidance when it is conditional.

  labels: int32 [B] (the class of each sample) or None for an unconditional model.
  """
  pt = config.diffusion.prediction_type

  def predict_with(lab):
    return lambda x_t, t: task.model.apply({'params': params}, x_t, t, lab, train=False)
  eps_cond = diffusion.eps_fn_from(predict_with(labels), task.schedule, pt)
  scale = config.sampling.guidance_scale
  if not task.info.num_classes or scale == 1.0:
    return eps_cond
  null = jnp.full_like(labels, task.info.num_classes)
  eps_uncond = diffusion.eps_fn_from(predict_with(null), task.schedule, pt)
  return guided_eps_fn(eps_cond, eps_uncond, scale)


def make_generate_fn(config, task: Task, mesh, *, num_steps: int | None = None,
                     return_trajectory: bool = False) -> Callable:
  """generate(params, rng, n) -> float32 [n, ...] samples (and [S+1, n, ...] trajectory).

  Runs the configured sampler (sampling.sampler, .eta, .spacing, .clip_x0, .variance) in
  global batches of sampling.batch_size, rounded up to a whole number per device and split over
  the mesh's devices. With `log_progress=True` each batch is logged with the rate and time left.
  """
  sc = config.sampling
  steps = num_steps or sc.num_steps
  shape = tuple(task.info.shape)

  def run(params, rng, label_offset, batch):
    x_t = jax.random.normal(jax.random.fold_in(rng, 0), (batch,) + shape)
    x_t = jax.lax.with_sharding_constraint(x_t, parallel.batch_sharding(mesh))
    labels = None
    if task.info.num_classes:
      labels = (jnp.full((batch,), sc.label, jnp.int32) if sc.label >= 0 else
                (label_offset + jnp.arange(batch, dtype=jnp.int32)) % task.info.num_classes)
    eps_fn = make_eps_fn(task, params, labels, config)
    noise_rng = jax.random.fold_in(rng, 1)
    if sc.sampler == 'ddpm':
      return samplers.ddpm_sample(eps_fn, task.schedule, x_t, noise_rng, clip_x0=sc.clip_x0,
                                  variance=sc.variance, return_trajectory=return_trajectory)
    return samplers.ddim_sample(eps_fn, task.schedule, x_t, noise_rng, num_steps=steps,
                                eta=sc.eta, spacing=sc.spacing, clip_x0=sc.clip_x0,
                                return_trajectory=return_trajectory)

  compiled = jax.jit(run, static_argnums=3, out_shardings=parallel.replicated(mesh))

  def generate(params, rng, n: int, *, log_progress: bool = False):
    batch = parallel.round_up(min(sc.batch_size, n), mesh.size)
    num_batches = math.ceil(n / batch)
    progress = metric_logging.Progress(num_batches, items_per_step=batch, unit='batch',
                                       label='sampling')
    outs = []
    for i in range(num_batches):
      outs.append(jax.device_get(compiled(params, jax.random.fold_in(rng, i), i * batch, batch)))
      if log_progress:
        progress.log(i + 1)
    if return_trajectory:
      return (np.concatenate([o[0] for o in outs])[:n],
              np.concatenate([o[1] for o in outs], axis=1)[:, :n])
    return np.concatenate(outs)[:n]

  return generate
