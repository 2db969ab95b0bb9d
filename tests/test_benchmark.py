"""experiments/benchmark.py end to end on a tiny U-Net and DiT: it runs and its JSON has every
field.

The diffusers comparison is included when torch and diffusers are installed (the `bench` extra).
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
from tests.conftest import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAVE_DIFFUSERS = all(importlib.util.find_spec(m) for m in ('torch', 'diffusers'))


TINY = {'bench_dit.py': ['--config.model.hidden=32', '--config.model.num_layers=2',
                         '--config.model.num_heads=2']}


@pytest.mark.parametrize('config', sorted(TINY))  # one network is enough: the same script
def test_benchmark_writes_every_field(tmp_path, config):
  out = tmp_path / 'bench.json'
  cmd = [sys.executable, os.path.join(ROOT, 'experiments', 'benchmark.py'),
         f'--config={os.path.join(ROOT, "configs", config)}', '--config.data.image_size=8',
         *TINY[config], '--config.training.batch_size=4', '--warmup=1', '--repeats=2',
         '--sample_repeats=1',
         '--pipeline_batches=5', '--nofirst_step', f'--output={out}']
  if HAVE_DIFFUSERS:
    cmd.append('--compare=diffusers')
  env = dict(os.environ, XLA_FLAGS=xla_flags(1))  # one device, as run by hand
  proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert '| train images/s |' in proc.stdout
  assert proc.stdout.splitlines()[1].startswith('CPU: ')  # the header names the CPU
  assert proc.stdout.splitlines()[2].startswith('settings: ')  # and the settings in force
  res = json.loads(out.read_text())
  for key in ('params', 'train_step_flops', 'forward_flops', 'train_compile_s',
              'forward_compile_s', 'train_images_per_s', 'forward_images_per_s',
              'ddim50_images_per_s', 'sampling_call_over_forward', 'matmul_peak_flops',
              'train_fraction_of_peak',
              'peak_memory', 'pipeline_images_per_s', 'pipeline_over_consumption',
              'digits_first_step_s', 'environment', 'command', 'train_step_memory_bytes',
              'params_bytes', 'sampling_images_per_s', 'cpu'):
    assert key in res, key
  assert res['train_step_flops'] > 0 and res['train_images_per_s'] > 0
  assert res['peak_memory']['bytes'] > 0
  assert res['digits_first_step_s'] is None  # --nofirst_step
  samplers = {'ddim50', 'dpm_solver++20', 'flow_euler20'}
  assert set(res['sampling_images_per_s']) >= {f'jax {name}' for name in samplers}
  assert all(v > 0 for v in res['sampling_images_per_s'].values())
  if HAVE_DIFFUSERS:
    assert res['torch']['params'] == res['params']
    ratios = {'train', 'forward'} | samplers
    if res['cpu']['isa'] in ('amx', 'avx512_bf16'):  # bfloat16 rows where the CPU has it
      ratios |= {'train bf16', 'forward bf16'}
      assert set(res['bf16']) == {'jax train', 'jax forward', 'torch train', 'torch forward'}
    assert set(res['ratio_jax_over_torch']) == ratios
    assert all(v > 0 for v in res['ratio_jax_over_torch'].values())


def test_layer_benchmark_prints_every_layer():
  cmd = [sys.executable, os.path.join(ROOT, 'experiments', 'layer_benchmark.py'), '--batch=1',
         '--repeats=1']
  env = dict(os.environ, XLA_FLAGS=xla_flags(1))
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [line.split(' | ') for line in proc.stdout.splitlines() if line.startswith('| ')][2:]
  implementations = {(r[0].strip('| '), r[1]) for r in rows}
  for layer in ('GroupNorm+SiLU', 'attention', 'upsample + conv'):
    assert (layer, 'ours') in implementations
  assert all(float(r[2]) > 0 and float(r[3].strip(' |')) > 0 for r in rows)


def test_profile_step_sums_the_trace_by_kind(tmp_path):
  cmd = [sys.executable, os.path.join(ROOT, 'experiments', 'profile_step.py'),
         f'--config={os.path.join(ROOT, "configs", "bench.py")}',
         '--config.data.image_size=8', '--config.model.channels=16',
         '--config.model.channel_mult=(1,2)', '--config.model.num_groups=8',
         '--config.model.attention_resolutions=(4,)', '--config.model.num_res_blocks=1',
         '--config.training.batch_size=4', '--steps=1', '--top=5', f'--trace_dir={tmp_path}']
  env = dict(os.environ, XLA_FLAGS=xla_flags(1))
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.startswith('CPU: ')
  kinds = {line.split(' | ')[0].strip('| ') for line in proc.stdout.splitlines()
           if line.startswith('| ') and line.count('|') == 4}
  assert 'convolution' in kinds, proc.stdout
  shares = [float(line.rsplit('|', 2)[1].strip(' %')) for line in proc.stdout.splitlines()
            if line.startswith('| ') and line.count('|') == 4 and '%' in line]
  assert 99.0 < sum(shares) < 101.0, proc.stdout  # the kinds add up to all the time
