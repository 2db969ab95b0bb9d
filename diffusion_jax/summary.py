"""--mode=summary: parameter count, activation shapes and train-step FLOPs, without training.

Everything is abstract (jax.eval_shape, and XLA's cost analysis of the lowered train step), so
it takes seconds even for large models and allocates no parameters.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from diffusion_jax import config_checks, input_pipeline, latents, parallel, train
from diffusion_jax import task as task_lib
from diffusion_jax.models.autoencoder import AutoencoderKL, ResnetBlock, SpatialAttention
from diffusion_jax.models.dit import DiTBlock
from diffusion_jax.models.layers import AttentionBlock, ResBlock

# The blocks whose outputs the summary lists.
BLOCKS = (ResBlock, AttentionBlock, DiTBlock, ResnetBlock, SpatialAttention)


def parameter_count(params) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(params))


def activation_shapes(task, batch: int = 1) -> list[tuple[str, tuple]]:
  """(module path, output shape) of every block in `BLOCKS`, in call order."""
  info = task.info
  x = jax.ShapeDtypeStruct((batch,) + tuple(info.shape), jnp.float32)
  t = jax.ShapeDtypeStruct((batch,), jnp.int32)
  labels = jax.ShapeDtypeStruct((batch,), jnp.int32) if info.num_classes else None

  def run(x, t, labels):
    params = task_lib.init_params(task.model, info, jax.random.PRNGKey(0))
    inputs = (x,) if isinstance(task.model, AutoencoderKL) else (x, t, labels)
    kwargs = {} if isinstance(task.model, AutoencoderKL) else {'train': False}
    _, state = task.model.apply(
        {'params': params}, *inputs, mutable=['intermediates'], **kwargs,
        capture_intermediates=lambda mdl, name: (name == '__call__' and
                                                 isinstance(mdl, BLOCKS)))
    return state['intermediates']

  def walk(node, path):
    # Flax records intermediates in call order; tree_flatten would sort them by name.
    if isinstance(node, tuple):  # the captured outputs of one module
      return [('/'.join(path[:-1]), node[0].shape)]
    return [row for key, child in node.items() for row in walk(child, path + [key])]
  return walk(jax.eval_shape(run, x, t, labels), [])


def compiled_train_step(config, task, mesh):
  """The train step compiled for the state and batches training would have on `mesh`."""
  state = task_lib.abstract_train_state(config, task, mesh)
  batch = input_pipeline.abstract_batch(config, mesh, task.info.shape)
  return train.make_train_step(config, task, mesh).lower(state, batch).compile()


def train_step_flops(config, task, mesh, compiled=None) -> float:
  """XLA's FLOP count of one compiled train step on the global batch (all devices)."""
  compiled = compiled or compiled_train_step(config, task, mesh)
  return compiled_flops(compiled, mesh.size) / config.training.steps_per_call


def train_step_memory(compiled) -> dict:
  """XLA's memory analysis of a compiled train step, bytes per device: `state` (its
  arguments: the state's shards and the batch's) and `temporaries`."""
  stats = compiled.memory_analysis()
  return {'state': int(stats.argument_size_in_bytes), 'temporaries': int(stats.temp_size_in_bytes)}


def forward_flops(task, params) -> float:
  """XLA's FLOP count of one network call on one image, from the lowered program (uncompiled)
  for the abstract `params`; papers that quote GFLOPs of a network (DiT) count multiply-adds,
  about half of it."""
  info = task.info
  x = jax.ShapeDtypeStruct((1,) + tuple(info.shape), jnp.float32)
  t = jax.ShapeDtypeStruct((1,), jnp.int32)
  labels = jax.ShapeDtypeStruct((1,), jnp.int32) if info.num_classes else None
  if isinstance(task.model, AutoencoderKL):  # encoding and decoding
    return _flops(jax.jit(lambda p, x: task.model.apply({'params': p}, x)).lower(
        params, x).cost_analysis())
  lowered = jax.jit(lambda p, x, t, y: task.model.apply({'params': p}, x, t, y)).lower(
      params, x, t, labels)
  return _flops(lowered.cost_analysis())


def autoencoder_summary(config) -> dict:
  """A latent run's autoencoder (its shape only, no weights read): parameters, and the FLOPs of
  encoding and of decoding one image."""
  model = latents.model_of(config)
  size = config.data.image_size
  x = jax.ShapeDtypeStruct((1, size, size, model.in_channels), jnp.float32)
  params = jax.eval_shape(lambda v: model.init(jax.random.PRNGKey(0), v)['params'], x)
  z = jax.ShapeDtypeStruct((1,) + latents.latent_shape(config), jnp.float32)
  cost = lambda method, inputs: _flops(jax.jit(lambda p, v: model.apply(
      {'params': p}, v, method=method)).lower(params, inputs).cost_analysis())
  return {'params': parameter_count(params), 'encode_flops': cost(AutoencoderKL.encode, x),
          'decode_flops': cost(AutoencoderKL.decode, z)}


def compiled_flops(compiled, num_devices: int = 1) -> float:
  """XLA's FLOP count of a compiled per-device program, times the devices that run it."""
  return _flops(compiled.cost_analysis()) * num_devices


def _flops(cost) -> float:
  """The 'flops' of XLA's cost analysis (a dict, or a list with one per program)."""
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get('flops', 0.0))


def summarize(config) -> dict:
  """Prints and returns params, activation shapes and FLOPs per image of a train step."""
  mesh = parallel.create_mesh(fsdp=config.parallel.fsdp)
  config_checks.validate(config, mesh.size)
  task = task_lib.create_task(config)
  params = jax.eval_shape(
      lambda: task_lib.init_params(task.model, task.info, jax.random.PRNGKey(0)))
  n_params = parameter_count(params)
  shapes = activation_shapes(task)
  compiled = compiled_train_step(config, task, mesh)
  flops = train_step_flops(config, task, mesh, compiled)
  memory = train_step_memory(compiled)
  per_image = flops / config.training.batch_size
  forward = forward_flops(task, params)
  name = 'autoencoder' if task_lib.is_autoencoder(config) else config.model.architecture
  print(f'model: {name}  data: {config.data.source} '
        f'{tuple(task.info.shape)}  classes: {task.info.num_classes}')
  print(f'params: {n_params}')
  stages = {}
  if task_lib.is_latent(config):
    stages = {'autoencoder': autoencoder_summary(config)}
    ae = stages['autoencoder']
    print(f'autoencoder ({config.latent.autoencoder}): params {ae["params"]}, encoding '
          f'{ae["encode_flops"] / 1e9:.3f} GFLOP and decoding {ae["decode_flops"] / 1e9:.3f} '
          f'GFLOP per image; both stages: {n_params + ae["params"]} params')
  print('activations (batch 1):')
  for name, shape in shapes:
    print(f'  {name:<24} {tuple(shape)}')
  print(f'forward FLOPs per image: {forward:.4g} ({forward / 2e9:.3f} G multiply-adds)')
  print(f'train step FLOPs per image: {per_image:.4g} ({per_image / 1e9:.3f} GFLOP; '
        f'{flops / 1e9:.2f} GFLOP per global batch of {config.training.batch_size})')
  print(f'train step memory per device ({mesh.size} devices, parallel.fsdp='
        f'{mesh.shape[parallel.FSDP_AXIS]}): state and batch {memory["state"] / 2**20:.1f} MiB, '
        f'temporaries {memory["temporaries"] / 2**20:.1f} MiB')
  return {'params': n_params, 'activations': shapes, 'flops_per_image': per_image,
          'forward_flops_per_image': forward, 'train_step_memory': memory, **stages}
