"""End to end through launch.py, as a user runs it (subprocesses)."""

import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import tiny_image_config, tiny_toy_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def launch(*args, devices=1, timeout=600):
  env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
             JAX_PLATFORMS='cpu')
  proc = subprocess.run([sys.executable, 'launch.py', *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  return proc.stdout + proc.stderr


def overrides(config):
  """--config.x.y=v flags that turn a shipped config into the given tiny one."""
  flags = []
  for group in ('data', 'model', 'diffusion', 'training', 'sampling'):
    for key, value in config[group].items():
      if isinstance(value, tuple):
        value = '(' + ','.join(str(v) for v in value) + (',)' if len(value) == 1 else ')')
      flags.append(f'--config.{group}.{key}={value}')
  return flags


def test_summary_prints_the_ddpm_parameter_count():
  out = launch('--mode=summary', '--config=configs/cifar10.py',
               '--config.training.batch_size=2')
  assert 'params: 35746307' in out
  assert 'FLOPs per image' in out


def test_summary_of_a_dit_lists_its_blocks_and_the_state_per_device():
  out = launch('--mode=summary', '--config=configs/digits_dit.py', '--config.parallel.fsdp=2',
               devices=2)
  assert 'model: dit' in out and 'block5' in out and 'forward FLOPs per image' in out
  assert 'train step memory per device (2 devices, parallel.fsdp=2)' in out


def test_train_then_sample_digits(tmp_path):
  workdir = str(tmp_path)
  flags = ['--config=configs/digits.py', f'--workdir={workdir}'] + overrides(
      tiny_image_config())
  launch(*flags, devices=2)
  assert os.path.exists(os.path.join(workdir, 'config.json'))
  launch(*flags, '--mode=sample', '--config.sampling.num_samples=6',
         '--config.sampling.trajectory=True', devices=2)
  with np.load(os.path.join(workdir, 'samples', 'samples.npz')) as f:
    assert f['images'].shape == (6, 8, 8, 1) and f['images'].dtype == np.uint8
  for name in ('grid.png', 'trajectory.png'):
    assert os.path.getsize(os.path.join(workdir, 'samples', name)) > 0
  # Sampling again keeps the earlier files.
  launch(*flags, '--mode=sample', '--config.sampling.num_samples=4', devices=2)
  assert os.path.exists(os.path.join(workdir, 'samples', 'samples.1.npz'))


def test_train_then_sample_toy2d(tmp_path):
  workdir = str(tmp_path)
  flags = ['--config=configs/toy2d.py', f'--workdir={workdir}'] + overrides(tiny_toy_config())
  out = launch(*flags)
  # One log line per log step (log_every=2 of 4 steps), holding every metric and the rates.
  lines = [line for line in out.splitlines() if 'step 2/4' in line or 'step 4/4' in line
           or 'loss' in line]
  assert len(lines) == 2, lines
  for line in lines:
    assert all(part in line for part in ('  loss ', 'grad_norm', 'learning_rate', 'steps/s',
                                         'img/s', 'ETA')), line
  launch(*flags, '--mode=sample', '--config.sampling.sampler=ddpm')
  with np.load(os.path.join(workdir, 'samples', 'samples.npz')) as f:
    assert f['points'].shape == (64, 2) and f['points'].dtype == np.float32


def test_sample_without_checkpoint_says_so(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  proc = subprocess.run([sys.executable, 'launch.py', '--config=configs/toy2d.py',
                         f'--workdir={tmp_path}', '--mode=sample'], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode != 0 and 'no checkpoint' in proc.stderr


SMALL = ['--config.model.channels=16', '--config.model.num_groups=8',
         '--config.training.batch_size=8', '--config.training.num_steps=2',
         '--config.training.warmup_steps=1', '--config.training.log_every=1',
         '--config.training.checkpoint_every=2', '--config.training.sample_every=0',
         '--config.sampling.num_samples=4', '--config.sampling.batch_size=4']


@pytest.mark.parametrize('name', ['digits_flow', 'digits_edm'])
def test_flow_and_edm_configs_train_and_sample(tmp_path, name):
  """The shipped flow-matching and EDM configs, as they are but smaller, through launch.py:
  their own sampler, then heun, whose 3 steps are 5 network calls."""
  flags = [f'--config=configs/{name}.py', f'--workdir={tmp_path}'] + SMALL
  launch(*flags)
  out = launch(*flags, '--mode=sample', '--config.sampling.num_steps=3')
  assert 'dpm_solver++, 3 network calls per sample' in out
  out = launch(*flags, '--mode=sample', '--config.sampling.num_steps=3',
               '--config.sampling.sampler=heun', '--config.sampling.spacing=karras')
  assert 'heun, 5 network calls per sample' in out
  with np.load(os.path.join(tmp_path, 'samples', 'samples.npz')) as f:
    assert f['images'].shape == (4, 8, 8, 1)
