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

from diffusion_jax import diffusion, metric_logging, parallel, samplers, step_tables
from diffusion_jax.task import Task


def guide(eps_cond: jnp.ndarray, eps_uncond: jnp.ndarray, scale: float) -> jnp.ndarray:
  """Classifier-free guidance (Ho & Salimans 2022): eps_u + scale * (eps_c - eps_u).

  scale = 1 gives the conditional model; 0 the unconditional one.
  """
  return eps_uncond + scale * (eps_cond - eps_uncond)


def sample_labels(index, label: int, num_classes: int):
  """The class asked of sample number `index` (int array, NumPy or jax): `label` for all when
  it is >= 0 (sampling.label), else the classes in turn, index % num_classes."""
  return index * 0 + label if label >= 0 else index % num_classes


def make_eps_fn(task: Task, params, labels, config) -> samplers.EpsFn:
  """The network as `eps_fn(x_t, t)`, with classifier-free guidance when it is conditional.

  labels: int32 [B] (the class of each sample) or None for an unconditional model. With
  guidance (sampling.guidance_scale != 1) the conditional and the unconditional ("null" label
  num_classes) predictions come from one network call on a doubled batch, each example next to
  its unconditional twin so that every device keeps its own rows.
  """
  pt = config.diffusion.prediction_type
  scale = config.sampling.guidance_scale

  def eps_with(lab):
    predict = lambda x_t, t: task.model.apply({'params': params}, x_t, t, lab, train=False)
    return diffusion.eps_fn_from(predict, task.schedule, pt)

  if not task.info.num_classes or scale == 1.0:
    return eps_with(labels)
  null = jnp.full_like(labels, task.info.num_classes)
  eps_pairs = eps_with(_interleave(labels, null))

  def eps_fn(x_t, t):
    eps = eps_pairs(_interleave(x_t, x_t), _interleave(t, t))
    eps = eps.reshape((x_t.shape[0], 2) + x_t.shape[1:])
    return guide(eps[:, 0], eps[:, 1], scale)
  return eps_fn


def _interleave(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
  """[B, ...] and [B, ...] -> [2B, ...] with rows a_0, b_0, a_1, b_1, ..."""
  return jnp.stack([a, b], axis=1).reshape((2 * a.shape[0],) + a.shape[1:])


def reverse_steps(config, task: Task, *, sampler: str | None = None,
                  num_steps: int | None = None) -> step_tables.ReverseSteps:
  """The table of the configured sampler (sampling.sampler, .num_steps, .eta, .solver_order,
  .spacing, .stochastic, .variance), or of `sampler` / `num_steps` when given."""
  sc = config.sampling
  return step_tables.build(sampler or sc.sampler, task.schedule,
                           num_steps=num_steps or sc.num_steps, eta=sc.eta,
                           order=sc.solver_order, spacing=sc.spacing,
                           stochastic=sc.stochastic, variance=sc.variance)


def make_generate_fn(config, task: Task, mesh, *, sampler: str | None = None,
                     num_steps: int | None = None, return_trajectory: bool = False) -> Callable:
  """generate(params, rng, n) -> float32 [n, ...] samples (and [S+1, n, ...] trajectory).

  Runs the configured sampler (or `sampler` with `num_steps`, see `reverse_steps`) in global
  batches of sampling.batch_size, rounded up to a whole number per device and split over the
  mesh's devices. Sample i of a conditional model is of class `sample_labels(i, ...)`. With
  `log_progress=True` each batch is logged with the rate and time left. `generate.num_calls`
  is the number of network calls per sample.
  """
  sc = config.sampling
  steps = reverse_steps(config, task, sampler=sampler, num_steps=num_steps)
  shape = tuple(task.info.shape)

  def run(params, rng, label_offset, batch):
    x_t = jax.random.normal(jax.random.fold_in(rng, 0), (batch,) + shape)
    x_t = jax.lax.with_sharding_constraint(x_t, parallel.batch_sharding(mesh))
    labels = None
    if task.info.num_classes:
      index = label_offset + jnp.arange(batch, dtype=jnp.int32)
      labels = sample_labels(index, sc.label, task.info.num_classes)
    eps_fn = make_eps_fn(task, params, labels, config)
    return samplers.run_reverse(eps_fn, task.schedule, steps, x_t, jax.random.fold_in(rng, 1),
                                clip_x0=sc.clip_x0, return_trajectory=return_trajectory)

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

  generate.num_calls = steps.num_calls
  return generate
