"""The drill: faults and bad input through launch.py, as a user meets them.

Every case ends in recovery, or in one line (`launch.py --mode=...: <Error>: ...`) that names the
setting, file or directory at fault; and what was written before (checkpoints, samples) is
still there and restorable. Runs share one tiny trained toy2d workdir, copied per case.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pytest
from PIL import Image

from diffusion_jax import checkpointing, files, metric_logging, parallel, workdir_lock
from diffusion_jax import task as task_lib
from diffusion_jax import run_config
from tests.conftest import tiny_image_config, tiny_toy_config, xla_flags
from tests.test_launch import ROOT, overrides

TOY = ['--config=configs/toy2d.py'] + overrides(tiny_toy_config())


def launch(*args, devices=1, limit_file_bytes=None, timeout=600):
  """(exit status, output) of launch.py; `limit_file_bytes` caps every file it writes (a full
  disk, as far as the writer can tell)."""
  env = dict(os.environ, XLA_FLAGS=xla_flags(devices),
             JAX_PLATFORMS='cpu')
  command = [sys.executable, 'launch.py', *args]
  if limit_file_bytes is not None:  # the shell's ulimit counts blocks of 1024 bytes
    command = ['bash', '-c', f'ulimit -f {limit_file_bytes // 1024}; exec "$@"', 'bash',
               *command]
    # The limit applies to the compilation cache too: keep its cut-short entries out of the
    # cache that the other tests share.
    env['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='full_disk_xla_cache')
  proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=timeout, check=False)
  return proc.returncode, proc.stdout + proc.stderr


def launch_together(*commands: list[str], timeout=600) -> list[tuple[int, str]]:
  """(exit status, output) of each launch.py command, run side by side on one device each."""
  env = dict(os.environ, XLA_FLAGS=xla_flags(1), JAX_PLATFORMS='cpu')
  procs = [subprocess.Popen([sys.executable, 'launch.py', *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for args in commands]
  outputs = [proc.communicate(timeout=timeout)[0] for proc in procs]
  return [(proc.returncode, out) for proc, out in zip(procs, outputs)]


def failure_line(output: str) -> str:
  """The one line launch.py prints for a failure that names its cause."""
  lines = [l for l in output.splitlines() if l.startswith('launch.py --mode=')]
  assert len(lines) == 1, output[-3000:]
  print(lines[0])  # pytest -s shows what the user sees
  return lines[0]


def ok(*args, **kwargs) -> str:
  code, out = launch(*args, **kwargs)
  assert code == 0, out[-4000:]
  return out


def restorable_steps(workdir: str, config=None) -> list:
  """The steps whose checkpoints restore (every one is tried)."""
  config = config or run_config.load_config(workdir)
  task = task_lib.create_task(config)
  target = task_lib.abstract_train_state(config, task, parallel.create_mesh())
  manager = checkpointing.create_manager(workdir, read_only=True)
  good = []
  for step in manager.all_steps():
    try:
      checkpointing.restore(manager, target, step)
      good.append(step)
    except Exception:  # pylint: disable=broad-except
      pass
  manager.close()
  return sorted(good)


def corrupt(step_dir: str, how: str) -> None:
  files = sorted(f for f in glob.glob(os.path.join(step_dir, '**'), recursive=True)
                 if os.path.isfile(f))
  rng = np.random.default_rng(0)
  if how == 'bit rot':
    for f in files:
      n = os.path.getsize(f)
      with open(f, 'wb') as out:
        out.write(rng.bytes(max(n, 16)))
  else:  # a half-copied directory
    for f in files[::2]:
      os.remove(f)


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A toy2d run with checkpoints at steps 2 and 4 (and its samples.npz)."""
  workdir = str(tmp_path_factory.mktemp('faults') / 'run')
  ok(*TOY, f'--workdir={workdir}')
  ok(*TOY, f'--workdir={workdir}', '--mode=sample')
  return workdir


@pytest.fixture
def run(trained, tmp_path):
  workdir = str(tmp_path / 'run')
  shutil.copytree(trained, workdir)
  return workdir


@pytest.mark.parametrize('how', ['bit rot', 'half copied'])
def test_a_corrupt_latest_checkpoint_is_skipped_by_sampling_and_resuming(run, how):
  corrupt(os.path.join(run, 'checkpoints', '4'), how)
  out = ok(*TOY, f'--workdir={run}', '--mode=sample')
  assert 'checkpoint at step 4' in out and 'cannot be read' in out
  assert os.path.exists(os.path.join(run, 'samples', 'samples.1.npz'))  # the earlier samples
  with np.load(os.path.join(run, 'samples', 'samples.npz')) as f:
    assert np.all(np.isfinite(f['points']))
  out = ok(*TOY, f'--workdir={run}', '--config.training.num_steps=6')
  assert 'Moved the unreadable checkpoint of step 4 aside' in out
  assert os.path.isdir(os.path.join(run, 'checkpoints', '4.unreadable'))  # kept, not deleted
  assert restorable_steps(run) == [2, 4, 6]  # step 4 trained again from step 2


def test_a_corrupt_chosen_checkpoint_and_no_readable_one_are_named(run):
  corrupt(os.path.join(run, 'checkpoints', '4'), 'bit rot')
  code, out = launch(*TOY, f'--workdir={run}', '--mode=sample',
                     '--config.sampling.checkpoint_step=4')
  line = failure_line(out)
  assert code == 1 and 'checkpoint at step 4' in line and 'checkpoint_step' in line
  corrupt(os.path.join(run, 'checkpoints', '2'), 'half copied')
  code, out = launch(*TOY, f'--workdir={run}', '--mode=sample')
  line = failure_line(out)
  assert 'none of the checkpoints' in line and '[4, 2]' in line and 'checkpoints' in line
  assert sorted(os.listdir(os.path.join(run, 'checkpoints'))) == ['2', '4']  # nothing deleted


def test_sampling_with_another_network_is_refused_by_name(run):
  code, out = launch(*TOY, f'--workdir={run}', '--mode=sample', '--config.model.hidden=64')
  line = failure_line(out)
  assert code == 1 and 'model.hidden: trained 32, given 64' in line
  # Sampling settings may change, and the training batch does not have to fit the devices.
  ok(*TOY, f'--workdir={run}', '--mode=sample', '--config.sampling.num_samples=12',
     '--config.training.batch_size=6', devices=4)


def test_resuming_keeps_the_first_config_and_refuses_another_network(run):
  with open(os.path.join(run, 'config.json')) as f:
    first = f.read()
  code, out = launch(*TOY, f'--workdir={run}', '--config.model.num_layers=3',
                     '--config.training.num_steps=6')
  line = failure_line(out)
  assert code == 1 and 'model.num_layers: trained 2, given 3' in line
  ok(*TOY, f'--workdir={run}', '--config.training.num_steps=6',
     '--config.training.learning_rate=0.0005')
  with open(os.path.join(run, 'config.json')) as f:
    assert f.read() == first
  with open(os.path.join(run, run_config.HISTORY)) as f:
    record = json.loads(f.readlines()[-1])
  assert record['resumed_at_step'] == 4
  assert record['changes']['training.learning_rate'] == {'was': 0.001, 'now': 0.0005}


def test_an_incompatible_checkpoint_names_what_differs(run, tmp_path):
  other = str(tmp_path / 'other')
  ok(*TOY, f'--workdir={other}', '--config.model.hidden=16', '--config.training.num_steps=2')
  os.remove(os.path.join(other, 'config.json'))  # nothing left to say what it was trained as
  code, out = launch(*TOY, f'--workdir={other}', '--config.training.num_steps=4')
  line = failure_line(out)
  assert code == 1 and 'is (16,) there but (32,) here' in line and 'checkpoints' in line
  assert restorable_steps(other, tiny_toy_config().copy_and_resolve_references()) == []
  assert os.listdir(os.path.join(other, 'checkpoints')) == ['2']


def test_an_unwritable_or_impossible_workdir_is_named(tmp_path):
  blocker = tmp_path / 'a_file'
  blocker.write_text('not a folder')
  for workdir in (str(blocker / 'run'), '/proc/diffusion_jax_run'):
    code, out = launch(*TOY, f'--workdir={workdir}')
    line = failure_line(out)
    assert code == 1 and f'--workdir={workdir} cannot be written' in line, line


def test_a_full_disk_during_a_save_is_named_and_earlier_checkpoints_survive(run):
  code, out = launch(*TOY, f'--workdir={run}', '--config.training.num_steps=8',
                     limit_file_bytes=20_000)
  line = failure_line(out)
  assert code == 1 and 'checkpoints failed' in line and '[2, 4]' in line, line
  # Orbax's writer threads fail once per pending write: no traceback of theirs is shown.
  assert 'Traceback' not in out and out.count('Event loop is closed') <= 1, out[-3000:]
  assert restorable_steps(run) == [2, 4]
  ok(*TOY, f'--workdir={run}', '--config.training.num_steps=6')  # room again: it resumes
  assert restorable_steps(run)[-1] == 6


def test_a_non_finite_loss_before_the_first_save_says_so(tmp_path):
  code, out = launch(*TOY, f'--workdir={tmp_path}', '--config.training.learning_rate=1e30',
                     '--config.training.warmup_steps=0', '--config.training.grad_clip=0',
                     '--config.training.checkpoint_every=4', '--config.training.log_every=4')
  line = failure_line(out)
  assert code == 1 and 'non-finite loss' in line and 'No checkpoint had been written' in line


def digits_npz(path, *, labels=True, channels=1, label_offset=0):
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, (64, 8, 8, channels), dtype=np.uint8)
  payload = {'images': x}
  if labels:
    payload['labels'] = (np.arange(64) % 10 + label_offset).astype(np.int64)
  np.savez(path, **payload)
  return str(path)


IMAGES = ['--config=configs/digits.py'] + overrides(tiny_image_config())


def test_bad_npz_files_are_named(tmp_path):
  good = digits_npz(tmp_path / 'good.npz')
  truncated = tmp_path / 'truncated.npz'
  truncated.write_bytes(open(good, 'rb').read()[:300])
  cases = [
      ([f'--config.data.path={truncated}'], ['data.path', 'truncated.npz', 'cannot be read']),
      ([f'--config.data.path={digits_npz(tmp_path / "rgb.npz", channels=3)}'],
       ['data.channels=1', 'set --config.data.channels=3']),
      ([f'--config.data.path={digits_npz(tmp_path / "shifted.npz", label_offset=1)}',
        '--config.data.class_conditional=True', '--config.data.num_classes=10'],
       ['labels in [1, 10]', 'data.num_classes=10', 'shifted.npz']),
  ]
  # Parts that disagree: fewer labels than images, images of mixed sizes (an object array).
  rng = np.random.default_rng(0)
  few_labels = str(tmp_path / 'few_labels.npz')
  np.savez(few_labels, images=rng.integers(0, 256, (64, 8, 8, 1), dtype=np.uint8),
           labels=np.arange(60) % 10)
  mixed = np.empty(3, dtype=object)
  mixed[:] = [rng.integers(0, 256, (s, s, 1), dtype=np.uint8) for s in (8, 10, 8)]
  np.savez(tmp_path / 'mixed.npz', images=mixed)
  cases += [
      ([f'--config.data.path={few_labels}'],
       ['few_labels.npz', '`labels` has shape (60,)', '64 images', 'one label per image']),
      ([f'--config.data.path={tmp_path / "mixed.npz"}'],
       ['mixed.npz', '3 separate images', 'mixed sizes', 'one uint8 [N, H, W, C] array']),
  ]
  # One workdir each: side by side, runs of one workdir would meet its train lock instead.
  workdirs = [tmp_path / f'w{i}' for i in range(len(cases))]
  results = launch_together(*([*IMAGES, '--config.data.source=npz', f'--workdir={workdir}', *flags]
                              for workdir, (flags, _) in zip(workdirs, cases)))
  for (_, named), (code, out) in zip(cases, results):
    line = failure_line(out)
    assert code == 1 and all(n in line for n in named), line
  for workdir in workdirs:
    assert not os.path.exists(workdir / 'config.json')  # stopped before writing
  # data.num_classes=0 reads the count from the labels (10 here).
  ok(*IMAGES, '--config.data.source=npz', f'--config.data.path={good}',
     '--config.data.class_conditional=True', '--config.data.num_classes=0',
     f'--workdir={tmp_path / "cond"}')
  with open(tmp_path / 'cond' / 'config.json') as f:
    assert json.load(f)['data']['num_classes'] == 10


def test_a_corrupt_image_in_a_folder_is_named_and_skipped(tmp_path):
  folder = tmp_path / 'images'
  folder.mkdir()
  rng = np.random.default_rng(0)
  for i in range(20):
    Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(folder / f'{i}.png')
  (folder / '7.png').write_bytes(b'\x89PNG\r\n\x1a\n' + rng.bytes(40))
  workdir = str(tmp_path / 'w')
  out = ok(*IMAGES, '--config.data.source=folder', f'--config.data.path={folder}',
           '--config.data.channels=3', f'--workdir={workdir}')
  assert f'Skipping {folder / "7.png"}' in out and 'Skipped 1 of 20 images' in out
  assert restorable_steps(workdir) == [2, 4]


# --- one writer per workdir ----------------------------------------------------------------------

def start(*args, devices=1) -> subprocess.Popen:
  env = dict(os.environ, XLA_FLAGS=xla_flags(devices),
             JAX_PLATFORMS='cpu')
  return subprocess.Popen([sys.executable, 'launch.py', *args], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_two_trainings_racing_into_one_workdir_leave_one_run(tmp_path):
  workdir = str(tmp_path / 'run')
  steps = ['--config.training.num_steps=40', '--config.training.checkpoint_every=20']
  procs = [start(*TOY, f'--workdir={workdir}', *steps) for _ in range(2)]
  outs = [p.communicate(timeout=600)[0] for p in procs]
  codes = sorted(p.returncode for p in procs)
  assert codes == [0, 1], outs
  winner, loser = (procs.index(p) for p in sorted(procs, key=lambda p: p.returncode))
  line = failure_line(outs[loser])
  assert f'--workdir={workdir} is being trained by another run' in line, line
  assert f'pid {procs[winner].pid}' in line and 'train.lock' in line
  assert restorable_steps(workdir) == [20, 40]
  assert sorted(os.listdir(workdir)).count('config.json') == 1
  assert not glob.glob(os.path.join(workdir, 'config.*.json'))
  records = metric_logging.read_metrics(workdir)
  assert [r['step'] for r in records] == sorted({r['step'] for r in records})  # each step once


def test_a_held_workdir_refuses_training_allows_sampling_and_frees_when_its_holder_dies(run):
  holder = subprocess.Popen(
      [sys.executable, '-c', 'import sys, time\n'
       'from diffusion_jax import workdir_lock\n'
       'with workdir_lock.hold(sys.argv[1]):\n'
       '  print("held", flush=True)\n'
       '  time.sleep(600)\n', run], cwd=ROOT, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == 'held'
    before = sorted(os.listdir(run))
    code, out = launch(*TOY, f'--workdir={run}', '--config.training.num_steps=6')
    line = failure_line(out)
    assert code == 1 and f'pid {holder.pid} on ' in line and 'since ' in line, line
    assert sorted(os.listdir(run)) == before  # nothing written
    ok(*TOY, f'--workdir={run}', '--mode=sample')  # readers do not need the lock
  finally:
    holder.kill()  # kill -9: the kernel releases the lock, the file stays
    holder.wait()
  assert os.path.exists(os.path.join(run, workdir_lock.LOCK_FILE))
  ok(*TOY, f'--workdir={run}', '--config.training.num_steps=6')
  assert restorable_steps(run)[-1] == 6


# --- run records that cannot be read -------------------------------------------------------------

def test_an_unreadable_config_json_is_rebuilt_from_the_checkpoints(run):
  path = os.path.join(run, 'config.json')
  with open(path) as f:
    first = json.load(f)
  for damage in ('', '{"model": {"hidden": 3'):
    with open(path, 'w') as f:
      f.write(damage)
    out = ok(*TOY, f'--workdir={run}', '--mode=sample')
    assert 'config.json could not be read' in out and 'checkpoint of step 4' in out
    with open(path) as f:
      assert json.load(f) == first
  assert sorted(glob.glob(os.path.join(run, 'config.unreadable*.json'))) == [
      os.path.join(run, 'config.unreadable.1.json'), os.path.join(run, 'config.unreadable.json')]
  with open(os.path.join(run, 'config.unreadable.json')) as f:
    assert f.read() == ''  # kept as it was


def test_records_cut_short_are_read_around_and_appended_after(run):
  """A crash mid-write leaves metrics.jsonl and config_history.jsonl with a last line cut
  short: resuming appends on a new line and the readers skip (and name) the broken one."""
  for name in ('metrics.jsonl', run_config.HISTORY):
    with open(os.path.join(run, name), 'a') as f:
      f.write('{"step": 5, "lo')
  count = len(metric_logging.read_metrics(run))
  ok(*TOY, f'--workdir={run}', '--config.training.num_steps=6',
     '--config.training.learning_rate=0.0005')
  records, bad = files.read_jsonl(os.path.join(run, 'metrics.jsonl'))
  assert len(bad) == 1 and len(records) > count and records[-1]['step'] == 6
  history, bad = files.read_jsonl(os.path.join(run, run_config.HISTORY))
  assert len(bad) == 1 and history[-1]['resumed_at_step'] == 4


def test_a_config_json_without_a_copy_in_old_checkpoints_is_named(tmp_path):
  run = str(tmp_path / 'old')  # written before checkpoints carried the config
  shutil.copytree(os.path.join(ROOT, 'tests', 'fixtures', 'toy2d_ddpm_step2'), run)
  with open(os.path.join(run, 'config.json'), 'w') as f:
    f.write('')
  code, out = launch('--config=configs/toy2d.py', f'--workdir={run}', '--mode=sample')
  line = failure_line(out)
  assert code == 1 and 'config.json cannot be read' in line and 'mv ' in line, line
  assert os.listdir(os.path.join(run, 'checkpoints')) == ['2']


def test_an_unreadable_finished_record_counts_as_unfinished(run):
  with open(os.path.join(run, run_config.FINISHED_JSON), 'w') as f:
    f.write('{"st')
  assert run_config.finished_step(run) is None
  ok(*TOY, f'--workdir={run}')  # nothing to train: it writes the record anew
  assert run_config.finished_step(run) == 4


def test_a_folder_with_class_subfolders_and_loose_images_is_named(tmp_path):
  folder = tmp_path / 'images'
  rng = np.random.default_rng(0)
  for i in range(6):
    (folder / f'class_{i % 2}').mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(
        folder / f'class_{i % 2}' / f'{i}.png')
  Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / 'stray.png')
  code, out = launch(*IMAGES, '--config.data.source=folder', f'--config.data.path={folder}',
                     '--config.data.channels=3', f'--workdir={tmp_path / "w"}')
  line = failure_line(out)
  assert code == 1 and f'data.path={str(folder)!r}' in line and '2 class subfolders' in line
  assert "'stray.png'" in line and not os.path.exists(tmp_path / 'w' / 'config.json')
