"""Training: the data-parallel step, EMA, resume, any-topology restore, preemption, NaNs, TFDS."""

import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from diffusion_jax import checkpointing, input_pipeline, parallel, sources, train, warm_start
from diffusion_jax import task as task_lib
from tests.conftest import tiny_image_config, tiny_toy_config


class ListWriter:
  """Collects what train_and_evaluate reports."""

  def __init__(self, on_write=None):
    self.scalars, self.on_write = {}, on_write

  def write_scalars(self, step, scalars):
    self.scalars[step] = dict(scalars)
    if self.on_write:
      self.on_write(step)

  def write_images(self, step, images):
    pass

  def flush(self):
    pass


def losses_on(devices, config, num_steps=3, fsdp=1):
  """(loss per step, final state) of `num_steps` steps on `devices`, `fsdp` of them sharing the
  state."""
  config.parallel.fsdp = fsdp
  mesh = parallel.create_mesh(devices, fsdp=fsdp)
  task = task_lib.create_task(config)
  state = task_lib.create_train_state(config, task, mesh)
  step = train.make_train_step(config, task, mesh)
  batches = input_pipeline.create_iterator(config, mesh)
  out = []
  for _ in range(num_steps):
    state, metrics = step(state, next(batches))
    out.append(float(metrics['loss']))
  return np.array(out), state


def test_one_and_four_devices_give_the_same_losses(image_config):
  assert jax.device_count() == 4
  one, state1 = losses_on(jax.devices()[:1], image_config)
  four, state4 = losses_on(jax.devices(), image_config)
  np.testing.assert_allclose(one, four, rtol=2e-5)
  for a, b in zip(jax.tree.leaves(jax.device_get(state1.params)),
                  jax.tree.leaves(jax.device_get(state4.params))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_devices_draw_different_noise():
  mesh = parallel.create_mesh()

  def per_device(state, batch):
    keys = train._example_keys(jax.random.PRNGKey(0), batch.shape[0])
    noise = jax.vmap(lambda k: jax.random.normal(k, (3,)))(keys)
    # Gather through a psum (an all_gather's result is not known to be replicated).
    rows = parallel.device_index() * batch.shape[0] + jnp.arange(batch.shape[0])
    return state, jax.lax.psum(jnp.zeros((8, 3)).at[rows].set(noise), parallel.BATCH_AXES)

  fn = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(), parallel.batch_spec()),
                             out_specs=(P(), P())))
  _, noise = fn(jnp.zeros(()), jnp.zeros((8,)))
  noise = np.asarray(noise)
  assert noise.shape == (8, 3)
  assert len({tuple(row) for row in noise.round(6)}) == 8


def test_toy2d_loss_falls(tmp_path):
  config = tiny_toy_config()
  config.training.num_steps = 300
  config.training.log_every = 50
  config.training.checkpoint_every = 300
  writer = ListWriter()
  train.train_and_evaluate(config, str(tmp_path), writer=writer)
  losses = [writer.scalars[s]['loss'] for s in sorted(writer.scalars)]
  assert losses[-1] < 0.75 * losses[0], losses
  for key in ('grad_norm', 'learning_rate', 'steps_per_sec', 'images_per_sec', 'eta_min'):
    assert key in writer.scalars[300]


def test_resume_is_bitwise_identical(tmp_path):
  config = tiny_image_config()
  config.training.num_steps = 6
  config.training.log_every = 1
  straight = ListWriter()
  final = train.train_and_evaluate(config, str(tmp_path / 'a'), writer=straight)

  config.training.num_steps = 4
  first = ListWriter()
  train.train_and_evaluate(config, str(tmp_path / 'b'), writer=first)
  config.training.num_steps = 6
  second = ListWriter()
  resumed = train.train_and_evaluate(config, str(tmp_path / 'b'), writer=second)
  assert sorted(second.scalars) == [5, 6]
  for step in range(1, 7):
    got = (first.scalars if step <= 4 else second.scalars)[step]['loss']
    assert got == straight.scalars[step]['loss'], step
  for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(a, b)


def test_four_device_checkpoint_restores_on_one_device(tmp_path):
  config = tiny_image_config()
  state = train.train_and_evaluate(config, str(tmp_path), writer=ListWriter())
  mesh1 = parallel.create_mesh(jax.devices()[:1])
  task = task_lib.create_task(config)
  manager = checkpointing.create_manager(str(tmp_path), read_only=True)
  restored = checkpointing.restore(manager, task_lib.abstract_train_state(config, task, mesh1))
  manager.close()
  assert int(restored.step) == config.training.num_steps
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
    assert b.sharding.device_set == {jax.devices()[0]}
    np.testing.assert_array_equal(a, b)


def test_sigterm_saves_and_exits(tmp_path):
  config = tiny_image_config()
  config.training.num_steps = 100
  config.training.log_every = 1
  config.training.checkpoint_every = 50
  writer = ListWriter(on_write=lambda step: step == 3 and os.kill(os.getpid(), signal.SIGTERM))
  state = train.train_and_evaluate(config, str(tmp_path), writer=writer)
  # The signal lands while step 3 is being logged; the loop notices it after the next step.
  stopped = int(state.step)
  assert stopped == 4
  manager = checkpointing.create_manager(str(tmp_path), read_only=True)
  assert manager.latest_step() == stopped
  task = task_lib.create_task(config)
  restored = checkpointing.restore(
      manager, task_lib.abstract_train_state(config, task, parallel.create_mesh()))
  manager.close()
  assert int(restored.step) == stopped
  assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handler is removed again


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  config = tiny_image_config()
  config.training.num_steps = 4
  config.training.log_every = 2
  config.training.checkpoint_every = 2
  config.training.grad_clip = 0.0
  train.train_and_evaluate(config, str(tmp_path), writer=ListWriter())  # saves 2 and 4
  # Resumed with a learning rate this large, the loss goes to inf/nan within a few steps.
  config.training.num_steps = 12
  config.training.learning_rate = 1e30
  config.training.warmup_steps = 0
  with pytest.raises(FloatingPointError, match=r'last good checkpoint \(step 4\)'):
    train.train_and_evaluate(config, str(tmp_path), writer=ListWriter())
  manager = checkpointing.create_manager(str(tmp_path), read_only=True)
  assert list(manager.all_steps()) == [2, 4]  # nothing from the diverged steps was saved
  task = task_lib.create_task(config)
  target = task_lib.abstract_train_state(config, task, parallel.create_mesh())
  for step in (2, 4):
    restored = checkpointing.restore(manager, target, step)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(restored.params))
  manager.close()


def test_non_finite_loss_before_any_checkpoint_says_so(tmp_path):
  config = tiny_image_config()
  config.training.num_steps = 8
  config.training.checkpoint_every = 8
  config.training.grad_clip = 0.0
  config.training.learning_rate, config.training.warmup_steps = 1e30, 0
  with pytest.raises(FloatingPointError, match='No checkpoint had been written yet'):
    train.train_and_evaluate(config, str(tmp_path), writer=ListWriter())


def test_one_step_on_mock_tfds_flowers(tmp_path, monkeypatch):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(sources, '_network_reachable', lambda *a, **k: True)
  config = tiny_image_config('tfds', image_size=8, channels=3)
  config.data.name = 'oxford_flowers102'
  config.data.data_dir = str(tmp_path / 'tfds')
  config.training.num_steps = 1
  config.training.log_every = 1
  config.training.checkpoint_every = 1
  writer = ListWriter()
  with tfds.testing.mock_data(num_examples=16):
    state = train.train_and_evaluate(config, str(tmp_path / 'run'), writer=writer)
  assert int(state.step) == 1 and np.isfinite(writer.scalars[1]['loss'])


def test_steps_per_call_matches_single_steps(image_config):
  single, _ = losses_on(jax.devices(), image_config, num_steps=4)
  image_config.training.steps_per_call = 2
  mesh = parallel.create_mesh()
  task = task_lib.create_task(image_config)
  state = task_lib.create_train_state(image_config, task, mesh)
  step = train.make_train_step(image_config, task, mesh)
  batches = input_pipeline.create_iterator(image_config, mesh)
  last = []
  for _ in range(2):
    state, metrics = step(state, next(batches))
    last.append(float(metrics['loss']))
  np.testing.assert_allclose(last, single[[1, 3]], rtol=2e-5)
  assert int(state.step) == 4


def test_gradient_norm_does_not_depend_on_the_device_count(image_config):
  """The gradient is the global batch's mean, not a sum over devices (Adam would hide a factor
  of the device count; gradient clipping and the logged norm would not)."""
  norms = []
  for devices in (jax.devices()[:1], jax.devices()):
    mesh = parallel.create_mesh(devices)
    task = task_lib.create_task(image_config)
    state = task_lib.create_train_state(image_config, task, mesh)
    step = train.make_train_step(image_config, task, mesh)
    _, metrics = step(state, next(input_pipeline.create_iterator(image_config, mesh)))
    norms.append(float(metrics['grad_norm']))
  np.testing.assert_allclose(norms[0], norms[1], rtol=1e-4)


def test_init_from_starts_from_another_runs_ema_parameters(tmp_path, tiny_digits_run):
  """training.init_from: the parameters, their EMA and averages start as the other run's EMA
  parameters (a new interval embedding keeps its initialisation), the optimizer fresh; a network
  of other sizes or other data is refused with the parameter or field that differs."""
  config, workdir = tiny_digits_run
  mesh = parallel.create_mesh()
  theirs, _ = task_lib.restore_ema_params(config, task_lib.create_task(config), mesh, workdir)
  config = tiny_image_config()
  config.model.interval_embedding = True
  task = task_lib.create_task(config)
  fresh = task_lib.create_train_state(config, task, mesh)
  state = warm_start.start_from_run(config, task, mesh, fresh, workdir)
  flat = lambda tree: dict(jax.tree_util.tree_leaves_with_path(jax.device_get(tree)))
  ours, loaded, before = flat(state.params), flat(theirs), flat(fresh.params)
  assert set(loaded) < set(ours)
  for path, value in ours.items():
    np.testing.assert_array_equal(value, loaded[path] if path in loaded else before[path])
  for a, b in zip(jax.tree.leaves(state.ema_params), jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(state.opt_state), jax.tree.leaves(fresh.opt_state)):
    np.testing.assert_array_equal(a, b)
  wider = tiny_image_config()
  wider.model.channels *= 2
  task = task_lib.create_task(wider)
  with pytest.raises(ValueError, match=r'its parameter .* has shape .* model settings must agree'):
    warm_start.start_from_run(wider, task, mesh, task_lib.abstract_train_state(wider, task, mesh),
                              workdir)
  other = tiny_image_config()
  other.data.image_size = 16
  with pytest.raises(ValueError, match='data.image_size=8.*start from a run of the same data'):
    warm_start.start_from_run(other, None, mesh, None, workdir)
  with pytest.raises(ValueError, match='holds no trained run'):
    warm_start.start_from_run(config, None, mesh, None, str(tmp_path))
