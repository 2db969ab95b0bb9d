"""task: optimizer and EMA helpers, the initial state, and restoring a run's EMA parameters,
including a checkpoint written before the module layout changed (tests/fixtures/toy2d_step2)."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from diffusion_jax import checkpointing, parallel, run_config, sampling, train
from diffusion_jax import task as task_lib
from tests.conftest import tiny_image_config
from tests.test_train import ListWriter

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures', 'toy2d_step2')


def test_ema_ramp_and_update():
  config = tiny_image_config()
  tc = config.training
  assert float(task_lib.ema_decay(tc, jnp.int32(0))) == pytest.approx(0.1)
  assert float(task_lib.ema_decay(tc, jnp.int32(10 ** 7))) == pytest.approx(tc.ema_decay)
  tc.ema_warmup = False
  assert float(task_lib.ema_decay(tc, jnp.int32(0))) == pytest.approx(tc.ema_decay)


def test_learning_rate_warmup_then_cosine():
  config = tiny_image_config()
  tc = config.training
  tc.learning_rate, tc.warmup_steps, tc.num_steps, tc.lr_schedule = 1.0, 10, 110, 'cosine'
  lr = task_lib.learning_rate_schedule(tc)
  assert float(lr(0)) == 0.0 and float(lr(5)) == pytest.approx(0.5)
  assert float(lr(10)) == pytest.approx(1.0) and float(lr(60)) == pytest.approx(0.5, abs=1e-6)
  assert float(lr(110)) == pytest.approx(0.0, abs=1e-6)


def test_created_state_is_the_pure_init_replicated(image_config):
  """create_train_state (compiled without backend optimisations on CPU) matches init_train_state
  compiled as usual, and is replicated over the mesh."""
  mesh = parallel.create_mesh()
  task = task_lib.create_task(image_config)
  state = task_lib.create_train_state(image_config, task, mesh)
  reference = jax.jit(lambda: task_lib.init_train_state(image_config, task))()
  assert state.params['conv_in']['kernel'].sharding.is_fully_replicated
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(reference)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  assert int(state.step) == 0 and np.array_equal(state.rng, reference.rng)


def test_restore_ema_params_equals_the_full_restore(tmp_path, image_config):
  state = train.train_and_evaluate(image_config, str(tmp_path), writer=ListWriter())
  mesh = parallel.create_mesh(jax.devices()[:1])
  task = task_lib.create_task(image_config)
  params, step = task_lib.restore_ema_params(image_config, task, mesh, str(tmp_path), step=2)
  manager = checkpointing.create_manager(str(tmp_path), read_only=True)
  full = checkpointing.restore(manager, task_lib.abstract_train_state(image_config, task, mesh), 2)
  manager.close()
  assert step == 2 and int(state.step) == 4
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(full.ema_params)):
    assert a.sharding.device_set == {jax.devices()[0]}
    np.testing.assert_array_equal(a, b)


def test_checkpoint_of_the_old_layout_restores_resumes_and_samples(tmp_path):
  """A run written by diffusion_jax 0.1.0 (before `task` and `generation` existed)."""
  workdir = str(tmp_path / 'run')
  shutil.copytree(FIXTURE, workdir)
  config = run_config.load_config(workdir)
  mesh = parallel.create_mesh()
  task = task_lib.create_task(config)
  params, step = task_lib.restore_ema_params(config, task, mesh, workdir)
  assert step == 2
  with np.load(os.path.join(FIXTURE, 'ema_params_step2.npz')) as f:
    expected = {k: f[k] for k in f.files}
  got = traverse_util.flatten_dict(jax.device_get(params), sep='/')
  assert sorted(got) == sorted(expected)
  for key, value in expected.items():
    np.testing.assert_array_equal(got[key], value, err_msg=key)

  config.training.num_steps = 3
  config.training.checkpoint_every = 1
  resumed = ListWriter()
  state = train.train_and_evaluate(config, workdir, writer=resumed)
  assert int(state.step) == 3 and sorted(resumed.scalars) == [3]
  assert np.isfinite(resumed.scalars[3]['loss'])
  out = sampling.sample(config, workdir)
  assert out['step'] == 3
  with np.load(out['npz']) as f:
    assert f['points'].shape == (config.sampling.num_samples, 2)


DDPM_FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures',
                            'toy2d_ddpm_step2')


def test_a_ddpm_run_from_before_continuous_time_samples_and_resumes_as_it_did(tmp_path):
  """A run written before `diffusion.process` existed: its config reads as the ddpm process,
  --mode=sample gives the samples that version wrote, and resuming logs its step-3 loss."""
  workdir = str(tmp_path / 'run')
  shutil.copytree(DDPM_FIXTURE, workdir)
  config = run_config.load_config(workdir)
  assert config.diffusion.process == 'ddpm' and config.diffusion.loss_weighting == 'none'
  out = sampling.sample(config, workdir)
  with np.load(out['npz']) as got, np.load(os.path.join(DDPM_FIXTURE, 'samples_step2.npz')) as f:
    np.testing.assert_allclose(got['points'], f['points'], rtol=1e-5, atol=1e-6)

  with open(os.path.join(DDPM_FIXTURE, 'resumed_metrics.json')) as f:
    expected = json.load(f)['step3']
  config.training.num_steps = 3
  config.training.checkpoint_every = 1
  resumed = ListWriter()
  train.train_and_evaluate(config, workdir, writer=resumed)
  for key in ('loss', 'grad_norm'):
    assert resumed.scalars[3][key] == pytest.approx(expected[key], rel=1e-5), key
