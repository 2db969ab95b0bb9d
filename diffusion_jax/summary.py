"""--mode=summary: parameter count, activation shapes and train-step FLOPs, without training.

Everything is abstract (jax.eval_shape, and XLA's cost analysis of the lowered train step), so
it takes seconds even for large models and allocates no parameters.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from diffusion_jax import config_checks, input_pipeline, parallel, train
from diffusion_jax import task as task_lib
from diffusion_jax.models.layers import AttentionBlock, ResBlock


def parameter_count(params) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(params))


def activation_shapes(task, batch: int = 1) -> list[tuple[str, tuple]]:
  """(module path, output shape) of every ResBlock and attention block, in call order."""
  info = task.info
  x = jax.ShapeDtypeStruct((batch,) + tuple(info.shape), jnp.float32)
  t = jax.ShapeDtypeStruct((batch,), jnp.int32)
  labels = jax.ShapeDtypeStruct((batch,), jnp.int32) if info.num_classes else None

  def run(x, t, labels):
    params = task_lib.init_params(task.model, info, jax.random.PRNGKey(0))
    _, state = task.model.apply(
        {'params': params}, x, t, labels, train=False, mutable=['intermediates'],
        capture_intermediates=lambda mdl, name: (name == '__call__' and
                                                 isinstance(mdl, (ResBlock, AttentionBlock))))
    return state['intermediates']

  def walk(node, path):
    # Flax records intermediates in call order; tree_flatten would sort them by name.
    if isinstance(node, tuple):  # the captured outputs of one module
      return [('/'.join(path[:-1]), node[0].shape)]
    return [row for key, child in node.items() for row in walk(child, path + [key])]
  return walk(jax.eval_shape(run, x, t, labels), [])


def train_step_flops(config, task, mesh) -> float:
  """XLA's FLOP count of one compiled train step on the global batch (all devices)."""
  state = task_lib.abstract_train_state(config, task, mesh)
  batch = input_pipeline.abstract_batch(config, mesh)
  compiled = train.make_train_step(config, task, mesh).lower(state, batch).compile()
  return compiled_flops(compiled, mesh.size) / config.training.steps_per_call


def compiled_flops(compiled, num_devices: int = 1) -> float:
  """XLA's FLOP count of a compiled per-device program, times the devices that run it."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get('flops', 0.0)) * num_devices


def summarize(config) -> dict:
  """Prints and returns params, activation shapes and FLOPs per image of a train step."""
  mesh = parallel.create_mesh()
  config_checks.validate(config, mesh.size)
  task = task_lib.create_task(config)
  params = jax.eval_shape(
      lambda: task_lib.init_params(task.model, task.info, jax.random.PRNGKey(0)))
  n_params = parameter_count(params)
  shapes = activation_shapes(task)
  flops = train_step_flops(config, task, mesh)
  per_image = flops / config.training.batch_size
  print(f'model: {config.model.architecture}  data: {config.data.source} '
        f'{tuple(task.info.shape)}  classes: {task.info.num_classes}')
  print(f'params: {n_params}')
  print('activations (batch 1):')
  for name, shape in shapes:
    print(f'  {name:<24} {tuple(shape)}')
  print(f'train step FLOPs per image: {per_image:.4g} ({per_image / 1e9:.3f} GFLOP; '
        f'{flops / 1e9:.2f} GFLOP per global batch of {config.training.batch_size})')
  return {'params': n_params, 'activations': shapes, 'flops_per_image': per_image}
