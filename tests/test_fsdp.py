"""The state sharded over the mesh's 'fsdp' axis: specs, equal training on every mesh shape,
per-device memory, and checkpoints that restore on another mesh."""

import os

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from diffusion_jax import (checkpointing, input_pipeline, metric_logging, parallel, summary)
from diffusion_jax import task as task_lib
from tests.conftest import tiny_image_config
from tests.test_train import losses_on


def tiny_dit_config():
  config = tiny_image_config()
  config.model.architecture = 'dit'
  config.model.hidden = 32
  config.model.num_layers = 2
  config.model.num_heads = 4
  config.model.patch_size = 2
  config.model.qk_norm = True
  config.training.phema_sigma_rels = (0.1,)
  config.training.phema_snapshot_every = 2
  return config


def test_fsdp_spec_splits_the_largest_dividing_axis():
  assert parallel.fsdp_spec((32, 96), 1) == P()
  assert parallel.fsdp_spec((32, 96), 4) == P(None, 'fsdp')
  assert parallel.fsdp_spec((96, 32), 4) == P('fsdp')
  assert parallel.fsdp_spec((3, 3, 5, 16), 4) == P(None, None, None, 'fsdp')
  assert parallel.fsdp_spec((3,), 4) == P()  # nothing divides: replicated
  assert parallel.fsdp_spec((), 4) == P()
  with pytest.raises(ValueError, match='parallel.fsdp=3'):
    parallel.create_mesh(jax.devices(), fsdp=3)


def run(config, data, fsdp, num_steps=3):
  """(losses, state) on a data x fsdp mesh of the first data * fsdp devices."""
  return losses_on(jax.devices()[:data * fsdp], config, num_steps, fsdp=fsdp)


@pytest.mark.parametrize('make_config,shapes', [
    (tiny_dit_config, ((4, 1), (2, 2), (1, 4))),
    (tiny_image_config, ((4, 1), (1, 4))),  # the U-Net: biases of 1 channel stay whole
])
def test_every_mesh_shape_trains_alike(make_config, shapes):
  """4x1, 2x2 and 1x4 (data x fsdp): the same losses and parameters to float32 round-off."""
  results = {shape: run(make_config(), *shape) for shape in shapes}
  losses, state = results[(4, 1)]
  for shape in shapes[1:]:
    np.testing.assert_allclose(results[shape][0], losses, rtol=2e-5)
    for a, b in zip(jax.tree.leaves(jax.device_get(results[shape][1])),
                    jax.tree.leaves(jax.device_get(state))):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  # At fsdp = 4 every large array is split: a device holds a quarter of it.
  sharded = results[(1, 4)][1]
  kernel = max(jax.tree.leaves(sharded.params), key=lambda x: x.size)
  assert kernel.addressable_shards[0].data.size == kernel.size // 4
  assert all(a.addressable_shards[0].data.size == a.size // 4
             for a in jax.tree.leaves(sharded.phema_params))


def state_bytes_per_device(config, fsdp):
  """XLA's memory analysis of the compiled train step: its arguments (state and batch) on one
  device, less the batch."""
  config.parallel.fsdp = fsdp
  mesh = parallel.create_mesh(jax.devices(), fsdp=fsdp)
  task = task_lib.create_task(config)
  memory = summary.train_step_memory(summary.compiled_train_step(config, task, mesh))
  batch = input_pipeline.abstract_batch(config, mesh)
  batch_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(batch)) // mesh.size
  return memory['state'] - batch_bytes


def test_fsdp_4_holds_a_quarter_of_the_state_per_device():
  config = tiny_dit_config()
  config.model.hidden = 64
  whole, split = state_bytes_per_device(config, 1), state_bytes_per_device(config, 4)
  assert split <= 0.3 * whole, (split, whole)


def test_checkpoint_of_one_mesh_restores_on_others(tmp_path):
  """Written at 2x2, restored at 1x1 and 4x1: the same arrays, now laid out for that mesh."""
  config = tiny_dit_config()
  _, state = run(config, 2, 2, num_steps=2)
  manager = checkpointing.create_manager(str(tmp_path))
  checkpointing.save(manager, 2, state)
  checkpointing.wait_until_finished(manager)
  want = jax.device_get(state)
  for devices, fsdp in ((1, 1), (4, 1), (4, 4)):
    config.parallel.fsdp = fsdp
    mesh = parallel.create_mesh(jax.devices()[:devices], fsdp=fsdp)
    task = task_lib.create_task(config)
    restored = checkpointing.restore(manager, task_lib.abstract_train_state(config, task, mesh))
    shardings = task_lib.state_shardings(config, task, mesh)
    for a, b, s in zip(jax.tree.leaves(restored), jax.tree.leaves(want),
                       jax.tree.leaves(shardings)):
      assert a.sharding == s
      np.testing.assert_array_equal(np.asarray(a), b)
  manager.close()


def test_dit_through_launch_trains_sharded_and_samples_on_any_mesh(tmp_path):
  """A DiT trained at 2x2 (with a preview from the sharded EMA), sampled on 1 and 4 devices:
  the same samples; then resumed at 4x1 (data parallelism only)."""
  from tests.test_launch import launch, overrides  # pylint: disable=g-import-not-at-top
  config = tiny_dit_config()
  config.training.sample_every = 4
  workdir = str(tmp_path / 'run')
  flags = ['--config=configs/digits_dit.py', f'--workdir={workdir}'] + overrides(config)
  launch(*flags, '--config.parallel.fsdp=2', devices=4)
  assert os.path.exists(os.path.join(workdir, 'samples', 'train_00000004.png'))
  samples = []
  for devices in (1, 4):
    launch(*flags, '--mode=sample', devices=devices)
    with np.load(os.path.join(workdir, 'samples', 'samples.npz')) as f:
      samples.append(f['images'].astype(np.int32))
  # uint8 pixels: float32 round-off between the meshes may move one across a rounding edge.
  difference = np.abs(samples[0] - samples[1])
  assert difference.max() <= 1 and np.mean(difference > 0) < 0.01
  launch(*flags, '--config.training.num_steps=6', '--config.parallel.fsdp=1', devices=4)
  records = metric_logging.read_metrics(workdir)
  assert [r['step'] for r in records if 'loss' in r][-1] == 6
