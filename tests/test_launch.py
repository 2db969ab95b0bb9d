"""End to end through launch.py, as a user runs it (subprocesses)."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from diffusion_jax import config_fields, run_config, train
from tests.conftest import tiny_image_config, tiny_toy_config, xla_flags
from tests.test_train import ListWriter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def launch(*args, devices=1, timeout=600):
  env = dict(os.environ, XLA_FLAGS=xla_flags(devices),
             JAX_PLATFORMS='cpu')
  proc = subprocess.run([sys.executable, 'launch.py', *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  return proc.stdout + proc.stderr


def overrides(config):
  """--config.x.y=v flags that turn a shipped config into the given tiny one: the fields a run
  of it uses (launch.py refuses the others)."""
  flags = []
  for group in ('data', 'model', 'diffusion', 'training', 'sampling'):
    for key, value in config[group].items():
      if not any(config_fields.applies(config, f'{group}.{key}', m) for m in ('train', 'sample')):
        continue
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
  # (That sampling again keeps the earlier files is tests/test_faults.py's.)


def test_train_then_sample_toy2d(tmp_path):
  workdir = str(tmp_path)
  config = tiny_toy_config()
  config.sampling.sampler = 'ddpm'  # sampled below with DDPM's own T steps
  flags = ['--config=configs/toy2d.py', f'--workdir={workdir}'] + overrides(config)
  out = launch(*flags)
  # One log line per log step (log_every=2 of 4 steps), holding every metric and the rates.
  lines = [line for line in out.splitlines() if 'step 2/4' in line or 'step 4/4' in line
           or 'loss' in line]
  assert len(lines) == 2, lines
  for line in lines:
    assert all(part in line for part in ('  loss ', 'grad_norm', 'learning_rate', 'steps/s',
                                         'img/s', 'ETA')), line
  launch(*flags, '--mode=sample')
  with np.load(os.path.join(workdir, 'samples', 'samples.npz')) as f:
    assert f['points'].shape == (64, 2) and f['points'].dtype == np.float32
    assert np.all(f['network_calls'] == 100)  # DDPM: all T steps
  out = launch(*flags, '--mode=sample', '--config.sampling.sampler=adaptive',
               '--config.sampling.rtol=0.01', '--config.sampling.atol=0.01')
  with np.load(os.path.join(workdir, 'samples', 'samples.npz')) as f:
    calls = f['network_calls']
    assert f['points'].shape == (64, 2) and np.all(np.isfinite(f['points']))
  assert f'{calls.mean():.1f} network calls per sample on average, {calls.max()} at most' in out


@pytest.mark.parametrize('family, sampler', [('meanflow', 'euler'), ('shortcut', 'euler'),
                                             ('consistency', 'consistency')])
def test_few_step_configs_train_and_sample_in_one_and_two_calls(tmp_path, family, sampler):
  """configs/toy2d_{meanflow,shortcut,consistency}.py, smaller, through launch.py: trained by
  their objective, sampled by their own one-call default; MeanFlow then in two calls (the
  shortcut model's rows are the same; consistency's are checked in tests/test_objectives.py)."""
  flags = [f'--config=configs/toy2d_{family}.py', f'--workdir={tmp_path}'] + [
      f'--config.{k}' for k in ('data.num_points=4096', 'model.hidden=32', 'model.num_layers=2',
                                'training.batch_size=64', 'training.num_steps=4',
                                'training.warmup_steps=2', 'training.log_every=2',
                                'training.checkpoint_every=2', 'sampling.num_samples=64',
                                'sampling.batch_size=64')]
  launch(*flags)
  for extra, said in (([], f'{sampler}, 1 network calls'),
                      (['--config.sampling.num_steps=2'], f'{sampler}, 2 network calls'))[
                          :2 if family == 'meanflow' else 1]:
    out = launch(*flags, '--mode=sample', *extra)
    assert said in out, out[-2000:]
    with np.load(os.path.join(tmp_path, 'samples', 'samples.npz')) as f:
      assert f['points'].shape == (64, 2) and np.all(np.isfinite(f['points']))


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


@pytest.mark.parametrize('name', ['digits_edm'])  # (flow through launch.py: the MeanFlow test)
def test_flow_and_edm_configs_train_and_sample(tmp_path, name):
  """The shipped EDM config, as it is but smaller, through launch.py, sampled by heun, whose 3
  steps are 5 network calls (its own sampler, DPM-Solver++, samples the digits config's test)."""
  flags = [f'--config=configs/{name}.py', f'--workdir={tmp_path}'] + SMALL
  launch(*flags)
  out = launch(*flags, '--mode=sample', '--config.sampling.num_steps=3',
               '--config.sampling.sampler=heun', '--config.sampling.spacing=karras')
  assert 'heun, 5 network calls per sample' in out
  with np.load(os.path.join(tmp_path, 'samples', 'samples.npz')) as f:
    assert f['images'].shape == (4, 8, 8, 1)


def refused(*commands: list[str]) -> list[str]:
  """launch.py's last line for each command (run side by side) that must fail, checked to be its
  own one line."""
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  procs = [subprocess.Popen([sys.executable, os.path.join(ROOT, 'launch.py'), *args], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for args in commands]
  lines = []
  for proc in procs:
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0, err[-3000:]
    assert 'Traceback' not in err, err[-3000:]
    lines.append(err.strip().splitlines()[-1])
    assert lines[-1].startswith('launch.py'), err[-3000:]
  return lines


def test_the_front_door_names_the_flag_or_file_in_one_line(tmp_path):
  bad = tmp_path / 'bad.py'
  bad.write_text('def get_config(:\n  pass\n')
  w = f'--workdir={tmp_path / "w"}'
  digits = '--config=configs/digits.py'
  cases = [
      ([w], '--config is required'),
      (['--config=configs/nowhere.py', w], '--config=configs/nowhere.py: no such file'),
      ([f'--config={bad}', w], f'--config={bad}, line 1: SyntaxError'),
      ([digits, w, '--config.sampling.nope=1'], 'sampling.nope is not a setting'),
      ([digits, w, '--config.training.num_steps=abc'],
       '--config.training.num_steps=abc: invalid literal'),
      ([digits, w, '--config.training.num_steps=-3'],
       'training.num_steps=-3 is outside its domain'),
      ([digits, '--wokdir=/tmp/x'], "Unknown command line flag 'wokdir'"),
      ([digits], '--mode=train needs --workdir'),
      (['--config=configs/toy2d_meanflow.py', w, '--config.diffusion.process=edm'],
       'training.objective=meanflow is defined on the flow path'),
  ]
  for (args, expected), line in zip(cases, refused(*(args for args, _ in cases))):
    assert expected in line, (args, line)
  assert not os.path.exists(tmp_path / 'w')  # nothing was written


def test_sampling_settings_are_checked_against_the_run(tmp_path):
  """The examples of settings that do not fit the run: each one line naming the setting."""
  conditional = tiny_image_config()
  conditional.data.class_conditional, conditional.data.num_classes = True, 10
  for name, config in (('cond', conditional), ('uncond', tiny_image_config())):
    os.makedirs(tmp_path / name)
    run_config.record_config(config, str(tmp_path / name), resumed_at=None, changes={})
  sample = ['--config=configs/digits.py', '--mode=sample']
  label, guidance, count = refused(
      [*sample, f'--workdir={tmp_path / "cond"}', '--config.sampling.label=15'],
      [*sample, f'--workdir={tmp_path / "uncond"}', '--config.sampling.guidance_scale=3'],
      [*sample, f'--workdir={tmp_path / "uncond"}', '--config.sampling.num_samples=-5'])
  assert "sampling.label=15 is beyond the run's 10 classes" in label
  assert guidance.startswith(
      'launch.py --mode=sample: ValueError: --config.sampling.guidance_scale=3')
  assert 'data.class_conditional' in guidance
  assert 'sampling.num_samples=-5 is outside its domain' in count
  assert os.listdir(tmp_path / 'uncond') == ['config.json']  # nothing was written


def test_ctrl_c_stops_a_long_sampling_batch_and_keeps_the_earlier_samples(tmp_path):
  config = tiny_toy_config()
  config.diffusion.num_timesteps = 1000
  workdir = str(tmp_path)
  train.train_and_evaluate(config, workdir, writer=ListWriter())
  earlier = tmp_path / 'samples' / 'samples.npz'
  os.makedirs(earlier.parent, exist_ok=True)
  earlier.write_bytes(b'the samples of an earlier run')
  log = tmp_path / 'sample.log'
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  with open(log, 'w') as out:
    # DDPM over 1,000 steps for 400,000 points in one batch: far longer than the test waits.
    proc = subprocess.Popen(
        [sys.executable, 'launch.py', '--config=configs/toy2d.py', f'--workdir={workdir}',
         '--mode=sample', '--config.sampling.sampler=ddpm',
         '--config.sampling.num_samples=400000', '--config.sampling.batch_size=400000'],
        cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while 'Sampling 400000 samples' not in log.read_text() and time.monotonic() < deadline:
      assert proc.poll() is None, log.read_text()[-3000:]
      time.sleep(0.2)
    time.sleep(3)  # into the batch
    assert proc.poll() is None, log.read_text()[-3000:]
    proc.send_signal(signal.SIGINT)
    sent = time.monotonic()
    code = proc.wait(timeout=60)
  waited = time.monotonic() - sent
  text = log.read_text()
  assert code == 130 and waited < 10, (code, waited, text[-3000:])
  assert 'sampling batch 1/1' not in text  # the one batch never finished
  assert 'stopped by SIGINT; nothing was written' in text.strip().splitlines()[-1]
  assert sorted(os.listdir(earlier.parent)) == ['samples.npz']
  assert earlier.read_bytes() == b'the samples of an earlier run'


def test_flowers_autoencoder_and_latent_configs_train_and_sample_from_an_npz(tmp_path):
  """configs/flowers_ae.py, then configs/flowers_latent.py on its latents, then sampling, as the
  docs run them (data from --config.data.source=npz), shrunk to tiny widths and a few steps."""
  rng = np.random.default_rng(0)
  npz = str(tmp_path / 'flowers.npz')
  np.savez(npz, images=rng.integers(0, 256, (24, 16, 16, 3), dtype=np.uint8),
           labels=np.arange(24) % 3 + 1)
  data = ['--config.data.source=npz', f'--config.data.path={npz}', '--config.data.image_size=16']
  small = ['--config.training.num_steps=2', '--config.training.batch_size=8',
           '--config.training.checkpoint_every=2', '--config.training.sample_every=2',
           '--config.training.warmup_steps=1', '--config.sampling.preview_samples=4',
           '--config.training.log_every=1']
  ae, latent = str(tmp_path / 'ae'), str(tmp_path / 'latent')
  launch('--config=configs/flowers_ae.py', f'--workdir={ae}', *data, *small,
         '--config.autoencoder.block_out_channels=(8,16)', '--config.autoencoder.num_groups=4')
  out = launch('--config=configs/flowers_latent.py', f'--workdir={latent}', *data, *small,
               f'--config.latent.autoencoder={ae}', '--config.model.channels=8',
               '--config.model.channel_mult=(1,2)', '--config.model.attention_resolutions=(4,)',
               '--config.model.num_groups=4', '--config.model.head_dim=8',
               '--config.sampling.preview_steps=2')
  assert 'Encoded 24 images (and mirrored) into latents (8, 8, 4)' in out
  assert os.path.exists(os.path.join(latent, 'samples', 'train_00000002.png'))
  launch('--config=configs/flowers_latent.py', f'--workdir={latent}', '--mode=sample',
         '--config.sampling.num_samples=4', '--config.sampling.num_steps=2')
  with np.load(os.path.join(latent, 'samples', 'samples.npz')) as f:
    assert f['images'].shape == (4, 16, 16, 3)
