"""Post-hoc EMA in training: the averages in the train step, their snapshots, resuming, and the
reconstruction on another topology; sampling uses it with sampling.ema_sigma_rel."""

import functools
import glob
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import checkpointing, parallel, phema, posthoc_ema, sampling, train
from diffusion_jax import task as task_lib
from tests.conftest import tiny_toy_config, xla_flags
from tests.test_train import ListWriter

WIDTHS = (0.05, 0.1)


def phema_config(num_steps=6):
  config = tiny_toy_config()
  config.training.num_steps = num_steps
  config.training.checkpoint_every = 2
  config.training.phema_sigma_rels = WIDTHS
  config.training.phema_snapshot_every = 2
  config.training.lr_schedule = 'constant'  # so that stopping at step 4, then 6, is a resume
  return config


def read_snapshot(workdir, step, config, mesh):
  target = task_lib.abstract_train_state(config, task_lib.create_task(config), mesh).params
  manager = posthoc_ema.create_manager(workdir, read_only=True)
  try:
    abstract = tuple(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                                 sharding=x.sharding), target)
                     for _ in WIDTHS)
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    out = manager.restore(step, args=ocp.args.Composite(
        profiles=ocp.args.PyTreeRestore(
            item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract)),
        meta=ocp.args.JsonRestore()))
  finally:
    manager.close()
  return jax.device_get(out['profiles']), dict(out['meta'])


@pytest.fixture(scope='module')
def straight(tmp_path_factory):
  """A 6-step run on 4 devices with post-hoc EMA, snapshots every 2 steps."""
  workdir = str(tmp_path_factory.mktemp('phema') / 'straight')
  state = train.train_and_evaluate(phema_config(), workdir, writer=ListWriter())
  return workdir, state


def test_snapshots_hold_the_tracked_averages(straight):
  workdir, state = straight
  found = posthoc_ema.snapshots(workdir)
  assert [s for s, _ in found] == [2, 4, 6]
  assert found[0][1]['sigma_rels'] == list(WIDTHS)
  np.testing.assert_allclose(found[0][1]['gammas'], [phema.sigma_rel_to_gamma(w) for w in WIDTHS])
  profiles, _ = read_snapshot(workdir, 6, phema_config(), parallel.create_mesh())
  live = state.phema_params
  for a, b in zip(jax.tree.leaves(profiles), jax.tree.leaves(live)):
    np.testing.assert_array_equal(a, b)
  # Two parameter copies, one per width, beside params and ema_params.
  assert len(live) == 2 and all(jax.tree.structure(a) == jax.tree.structure(state.params)
                                for a in live)


def _toward(average, value, w):
  """One step of an average: average + w (value - average)."""
  return average + w * (value - average)


def test_the_averages_follow_the_parameters_of_every_step(tmp_path):
  """Averages tracked in training equal the recursion run on the parameters step by step."""
  config = phema_config(num_steps=3)
  config.training.log_every = 1
  states, workdir = [], str(tmp_path / 'run')
  for n in (1, 2, 3):
    config.training.num_steps = n
    states.append(jax.device_get(train.train_and_evaluate(config, workdir, writer=ListWriter())))
  gamma = phema.sigma_rel_to_gamma(WIDTHS[1])
  expected = states[0].params  # beta(1) = 0
  for t in (2, 3):
    w = 1 - (1 - 1 / t) ** (gamma + 1)
    expected = jax.tree.map(functools.partial(_toward, w=w), expected, states[t - 1].params)
  tracked = states[-1].phema_params[1]
  for a, b in zip(jax.tree.leaves(tracked), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_resumed_snapshots_and_averages_are_bitwise_those_of_a_straight_run(straight, tmp_path):
  workdir, state = straight
  resumed = str(tmp_path / 'resumed')
  train.train_and_evaluate(phema_config(num_steps=4), resumed, writer=ListWriter())
  again = train.train_and_evaluate(phema_config(num_steps=6), resumed, writer=ListWriter())
  for a, b in zip(jax.tree.leaves(again.phema_params), jax.tree.leaves(state.phema_params)):
    np.testing.assert_array_equal(a, b)
  mesh = parallel.create_mesh()
  for step in (2, 4, 6):
    a, _ = read_snapshot(workdir, step, phema_config(), mesh)
    b, _ = read_snapshot(resumed, step, phema_config(), mesh)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_array_equal(x, y)


def test_snapshots_of_four_devices_reconstruct_on_one(straight):
  workdir, state = straight
  config = phema_config()
  mesh1 = parallel.create_mesh(jax.devices()[:1])
  target = task_lib.abstract_train_state(config, task_lib.create_task(config), mesh1).params
  params, step, weights = posthoc_ema.reconstruct(workdir, WIDTHS[0], target)
  assert step == 6 and weights.shape == (3, 2)
  stored = state.phema_params[0]
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(stored)):
    assert a.sharding.device_set == {jax.devices()[0]}
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)  # a stored width: itself
  mid, step, _ = posthoc_ema.reconstruct(workdir, 0.07, target, step=4)
  assert step == 4 and all(np.all(np.isfinite(x)) for x in jax.tree.leaves(mid))


def test_sampling_uses_the_reconstruction(straight):
  workdir, _ = straight
  config = phema_config()
  config.sampling.ema_sigma_rel = 0.07
  out = sampling.sample(config, workdir)
  assert out['step'] == 6
  with np.load(out['npz']) as f:
    assert np.all(np.isfinite(f['points']))
  config.sampling.checkpoint_step = 4
  assert sampling.sample(config, workdir)['step'] == 4


def test_without_snapshots_the_error_names_the_setting(tmp_path):
  config = tiny_toy_config()
  workdir = str(tmp_path / 'plain')
  train.train_and_evaluate(config, workdir, writer=ListWriter())
  config.sampling.ema_sigma_rel = 0.07
  with pytest.raises(FileNotFoundError, match='training.phema_sigma_rels'):
    sampling.sample(config, workdir)
  assert not os.path.exists(posthoc_ema.snapshot_dir(workdir))


@pytest.mark.parametrize('damage', ['', '{"sigma_rels": [0.05'])
def test_an_unreadable_snapshot_meta_is_named_with_the_fix(straight, tmp_path, damage):
  workdir = str(tmp_path / 'run')
  shutil.copytree(straight[0], workdir)
  meta_files = [f for f in glob.glob(os.path.join(posthoc_ema.snapshot_dir(workdir), '4', 'meta',
                                                  '**'), recursive=True) if os.path.isfile(f)]
  assert meta_files
  for f in meta_files:
    with open(f, 'w') as out:
      out.write(damage)
  with pytest.raises(RuntimeError, match=r'snapshot .*phema/4 cannot be read.*mv .*phema/4 '
                     r'.*phema/4.unreadable.*ema_sigma_rel=0'):
    posthoc_ema.snapshots(workdir)
  assert [s for s, _ in posthoc_ema.snapshots(workdir, up_to=2)] == [2]  # the others read


def test_posthoc_ema_study_writes_table_plot_and_results(straight):
  import json  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  workdir, _ = straight
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, XLA_FLAGS=xla_flags(1))
  proc = subprocess.run([sys.executable, os.path.join(root, 'experiments', 'posthoc_ema.py'),
                         f'--workdir={workdir}', '--sigma_rels=0.05,0.07,0.1',
                         '--num_samples=300'], cwd=root, env=env, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert '| sigma_rel 0.070 |' in proc.stdout and 'training.ema_decay=0.999' in proc.stdout
  with open(os.path.join(workdir, 'posthoc_ema', 'results.json')) as f:
    results = json.load(f)
  assert [r['sigma_rel'] for r in results['rows']] == [0.05, 0.07, 0.1]
  assert all(np.isfinite(r['ratio']) and r['step'] == 6 for r in results['rows'])
  assert results['baseline']['step'] == 6 and np.isfinite(results['baseline']['ratio'])
  assert os.path.getsize(os.path.join(workdir, 'posthoc_ema', 'quality_vs_sigma_rel.png')) > 1000


def test_the_train_step_holds_two_more_parameter_copies_and_nothing_else():
  from diffusion_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  sizes = {}
  for widths in ((), WIDTHS):
    config = tiny_toy_config()
    config.model.hidden = 64  # parameters large enough to see next to the batch
    config.training.phema_sigma_rels = widths
    mesh = parallel.create_mesh()
    task = task_lib.create_task(config)
    state = task_lib.abstract_train_state(config, task, mesh)
    compiled = train.make_train_step(config, task, mesh).lower(
        state, input_pipeline.abstract_batch(config, mesh)).compile()
    stats = compiled.memory_analysis()
    sizes[len(widths)] = (stats.argument_size_in_bytes, stats.temp_size_in_bytes,
                          sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state.params)))
  (arg0, temp0, params), (arg2, temp2, _) = sizes[0], sizes[2]
  assert arg2 - arg0 == 2 * params  # the two averages, donated like the rest of the state
  assert temp2 <= temp0 + params // 4, (temp0, temp2, params)  # updated in place


def test_checkpoints_with_flat_averages_still_resume(straight, tmp_path):
  """Checkpoints written when each average was one flat vector (the leaves raveled and
  concatenated) restore with the averages as trees, equal to the flattened ones."""
  _, state = straight
  flat = tuple(jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(a)])
               for a in state.phema_params)
  manager = checkpointing.create_manager(str(tmp_path))
  checkpointing.save(manager, 6, state.replace(phema_params=flat))
  checkpointing.wait_until_finished(manager)
  config = phema_config()
  target = task_lib.abstract_train_state(config, task_lib.create_task(config),
                                         parallel.create_mesh())
  restored = checkpointing.restore_or_keep(manager, target,
                                           restore_fn=task_lib.restore_train_state)
  manager.close()
  for a, b, want in zip(jax.tree.leaves(restored.phema_params),
                        jax.tree.leaves(state.phema_params),
                        jax.tree.leaves(target.phema_params)):
    np.testing.assert_array_equal(a, b)
    assert a.sharding == want.sharding
  np.testing.assert_array_equal(restored.step, state.step)
