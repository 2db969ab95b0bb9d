"""`training.init_from`: a run that starts from another run's EMA parameters (fine-tuning;
ECT's consistency tuning of a trained diffusion run)."""

from __future__ import annotations

from absl import logging
import jax
import jax.numpy as jnp
from flax import traverse_util

from diffusion_jax import run_config, task as task_lib
from diffusion_jax.task import Task, TrainState

# What a run started from another (training.init_from) must share with it: its data.
INIT_SHARES = ('data.source', 'data.name', 'data.image_size', 'data.channels')


def start_from_run(config, task: Task, mesh, state: TrainState, workdir: str) -> TrainState:
  """`state` with the parameters (and their EMA and averages) taken from the EMA parameters of
  the run in `workdir` (its latest checkpoint), the optimizer fresh: fine-tuning, or ECT from a
  diffusion run. Parameters this network has and that run lacks (e.g. a new interval embedding)
  keep their initialisation; a parameter of that run this network lacks, or of another shape,
  stops the start with its name."""
  other = run_config.trained_config(workdir)
  if other is None:
    raise ValueError(f'training.init_from={workdir!r} holds no trained run (no config.json); '
                     'point it at a workdir that training wrote.')
  diffs = run_config.differences(other, config, INIT_SHARES)
  if diffs:
    field, (theirs, ours) = next(iter(diffs.items()))
    raise ValueError(f'training.init_from={workdir!r} was trained with {field}={theirs!r}, this '
                     f'run with {ours!r}; start from a run of the same data.')
  params, step = task_lib.restore_ema_params(other, task_lib.create_task(other), mesh, workdir)
  merged = merged_params(state.params, params, workdir)
  merged = jax.device_put(merged, jax.tree.map(lambda x: x.sharding, state.params))
  logging.info('Started from the EMA parameters of %s at step %d.', workdir, step)
  copy = lambda: jax.tree.map(jnp.copy, merged)  # the step donates each tree: no shared buffers
  return state.replace(params=merged, ema_params=copy(), opt_state=task.tx.init(merged),
                       phema_params=task_lib.power_ema(config).init(copy()))


def merged_params(fresh, loaded, source: str):
  """`fresh` with every leaf that `loaded` also has replaced by it (same tree paths)."""
  ours, theirs = traverse_util.flatten_dict(fresh, sep='/'), traverse_util.flatten_dict(
      loaded, sep='/')
  for name, value in theirs.items():
    if name not in ours:
      raise ValueError(f'training.init_from={source!r}: its parameter {name} has no place in '
                       'this network; the two runs\' model settings must agree.')
    if ours[name].shape != value.shape:
      raise ValueError(f'training.init_from={source!r}: its parameter {name} has shape '
                       f'{tuple(value.shape)}, this network\'s {tuple(ours[name].shape)}; the two '
                       'runs\' model settings must agree.')
  new = sorted(set(ours) - set(theirs))
  if new:
    logging.info('Parameters not in %s, kept as initialised: %s', source, ', '.join(new))
  ours.update({name: value.astype(ours[name].dtype) for name, value in theirs.items()})
  return traverse_util.unflatten_dict(ours, sep='/')
