"""experiments/sweep.py: expansion, trial names, a local end-to-end sweep, Slurm script, summary."""

import csv
import math
import os
import re
import subprocess
import sys

import pytest

from experiments.sweeping import expansion, local, summary

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY_SWEEP = os.path.join(ROOT, 'experiments', 'sweeps', 'toy2d_small.py')
FLOWERS_SWEEP = os.path.join(ROOT, 'experiments', 'sweeps', 'flowers_lr_schedule.py')
SAFE = re.compile(r'^[A-Za-z0-9._=+,-]+$')


def cli(*args, timeout=120):
  # No GPUs for the trials, whatever this machine has: they run one after another on the CPU.
  env = dict(os.environ, JAX_PLATFORMS='cpu', CUDA_VISIBLE_DEVICES='')
  proc = subprocess.run([sys.executable, 'experiments/sweep.py', *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return proc.stdout


def test_flowers_sweep_is_the_product_with_unique_safe_names():
  s = expansion.load_sweep(FLOWERS_SWEEP)
  assert s.config == os.path.join(ROOT, 'configs', 'flowers.py')
  assert len(s.trials) == 3 * 2
  names = [t.name for t in s.trials]
  assert len(set(names)) == len(names) and all(SAFE.match(n) for n in names)
  assert names[0] == 'learning_rate=0.0001,lr_schedule=constant'
  assert s.trials[0].flags == ['--config.training.learning_rate=0.0001',
                               '--config.training.lr_schedule=constant']
  assert [t.index for t in s.trials] == list(range(6))


def test_trial_names_are_unique_and_safe_in_awkward_cases():
  # Same last key part in two groups: the full keys tell them apart.
  assert expansion.trial_names([{'data.name': 'moons', 'model.num_layers': 2}]) == [
      'name=moons,num_layers=2']
  names = expansion.trial_names([{'data.name': 'a', 'other.name': 'b'}, {'data.name': 'c'}])
  assert names == ['data.name=a,other.name=b', 'data.name=c']
  # Slashes, spaces and tuples become safe characters; no overrides is 'base'.
  names = expansion.trial_names([{'data.path': '/data/my flowers.npz'},
                             {'model.channel_mult': (1, 2, 2)}, {}])
  assert names == ['path=_data_my_flowers.npz', 'channel_mult=1-2-2', 'base']
  # Values that only differ in unsafe characters still get distinct names.
  names = expansion.trial_names([{'data.path': 'a/b'}, {'data.path': 'a b'}])
  assert len(set(names)) == 2 and all(SAFE.match(n) for n in names)
  # Long names are cut, and stay unique.
  long = [{'data.path': 'x' * 300 + str(i)} for i in range(2)]
  names = expansion.trial_names(long)
  assert len(set(names)) == 2 and all(len(n) <= expansion.MAX_NAME_LENGTH for n in names)
  with pytest.raises(ValueError, match='same overrides more than once'):
    expansion.trial_names([{'training.seed': 1}, {'training.seed': 1}])


def test_flags_parse_as_config_flags_expect():
  assert expansion.config_flags({'model.channel_mult': (1, 2), 'model.attention_resolutions': (16,),
                             'training.learning_rate': 1e-4, 'data.random_flip': False}) == [
      '--config.model.channel_mult=(1,2)', '--config.model.attention_resolutions=(16,)',
      '--config.training.learning_rate=0.0001', '--config.data.random_flip=False']


def test_final_metrics_take_the_last_train_record_and_eval_metrics():
  records = [{'step': 2, 'loss': 0.5, 'grad_norm': 1.0}, {'step': 4, 'loss': 0.25},
             {'step': 4, 'fid': 12.5, 'kid': 0.01}]
  assert summary.final_metrics(records) == {'step': 4, 'loss': 0.25, 'fid': 12.5, 'kid': 0.01}
  assert summary.final_metrics([]) == {}


def test_the_summary_reads_around_unreadable_trial_records(tmp_path, capsys):
  for index, name in enumerate(['a', 'b']):
    os.makedirs(tmp_path / name)
    with open(tmp_path / name / local.TRIAL_FILE, 'w') as f:
      f.write('{"index": %d, "name": "%s", "overrides": {"training.seed": %d}}' % (index, name,
                                                                                 index))
    with open(tmp_path / name / 'metrics.jsonl', 'w') as f:
      f.write('{"step": 2, "loss": 0.5}\n{"step": 4, "lo')  # the last record cut short
  with open(tmp_path / 'b' / local.TRIAL_FILE, 'w') as f:
    f.write('{"index": 1, "na')
  rows = summary.summarize(str(tmp_path))
  assert rows == [{'trial': 'a', 'training.seed': 0, 'step': 2, 'loss': 0.5}]
  assert 'trial.json cannot be read' in capsys.readouterr().err


def test_slurm_script_has_one_array_task_per_trial(tmp_path):
  root = str(tmp_path / 'sweep')
  out = cli('slurm', f'--sweep={TOY_SWEEP}', f'--root={root}', '--gpus_per_trial=2')
  path = out.strip().splitlines()[-1]
  assert path == os.path.join(root, 'toy2d_small.sbatch')
  with open(path) as f:
    script = f.read()
  assert script.startswith('#!/bin/bash\n')
  assert '#SBATCH --array=0-2\n' in script
  assert '#SBATCH --gres=gpu:2\n' in script
  assert 'experiments/sweep.py run-one' in script
  assert f'--sweep={TOY_SWEEP}' in script and f'--root={root}' in script
  assert '--index="$SLURM_ARRAY_TASK_ID"' in script
  assert os.path.isdir(os.path.join(root, 'slurm'))


def test_run_one_rejects_an_index_outside_the_sweep(tmp_path):
  with pytest.raises(IndexError, match='--index=3 is out of range'):
    local.run_one(expansion.load_sweep(TOY_SWEEP), 3, str(tmp_path))


def test_toy2d_sweep_runs_resumes_and_summarises(tmp_path):
  root = str(tmp_path)
  s = expansion.load_sweep(TOY_SWEEP)
  out = cli('expand', f'--sweep={TOY_SWEEP}')
  assert [line.split('\t')[1] for line in out.splitlines()] == [t.name for t in s.trials]

  cli('run', f'--sweep={TOY_SWEEP}', f'--root={root}', '--timeout=300', timeout=1200)
  for t in s.trials:
    assert local.finished_step(os.path.join(root, t.name)) == 4
  # Finished trials are skipped when the sweep runs again.
  out = cli('run', f'--sweep={TOY_SWEEP}', f'--root={root}', '--timeout=300')
  assert out.count('skipped') == 3

  markdown = cli('summary', f'--root={root}')
  for t in s.trials:
    assert f'| {t.name} |' in markdown
  with open(os.path.join(root, 'summary.md')) as f:
    assert f.read() == markdown
  with open(os.path.join(root, 'summary.csv')) as f:
    rows = list(csv.DictReader(f))
  assert [r['trial'] for r in rows] == [t.name for t in s.trials]
  assert [r['data.name'] for r in rows] == ['swiss_roll', 'moons', 's_curve']
  for r in rows:
    assert int(r['step']) == 4 and math.isfinite(float(r['loss']))


def test_gpus_per_trial_zero_runs_on_the_cpu_even_with_gpus(monkeypatch, tmp_path):
  seen = []

  def fake_start(sweep, trial, root, env):
    seen.append((env.get('CUDA_VISIBLE_DEVICES'), env.get('JAX_PLATFORMS')))
    return None  # as if finished
  monkeypatch.setattr(local, '_start', fake_start)
  status = local.run_all(expansion.load_sweep(TOY_SWEEP), str(tmp_path), gpus_per_trial=0,
                         gpus=['0', '1'])
  assert len(status) == 3 and seen == [('', 'cpu')] * 3


def test_a_checkpoint_folder_alone_does_not_finish_a_trial(tmp_path):
  workdir = tmp_path / 'trial'
  (workdir / 'checkpoints' / '4').mkdir(parents=True)  # a step folder, perhaps half written
  assert local.finished_step(str(workdir)) is None
  (workdir / 'finished.json').write_text('{"step": 4}')
  assert local.finished_step(str(workdir)) == 4
