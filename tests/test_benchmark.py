"""experiments/benchmark.py end to end on a tiny U-Net: it runs and its JSON has every field.

The diffusers comparison is included when torch and diffusers are installed (the `bench` extra).
"""

import importlib.util
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAVE_DIFFUSERS = all(importlib.util.find_spec(m) for m in ('torch', 'diffusers'))


def test_benchmark_writes_every_field(tmp_path):
  out = tmp_path / 'bench.json'
  cmd = [sys.executable, os.path.join(ROOT, 'experiments', 'benchmark.py'),
         f'--config={os.path.join(ROOT, "configs", "bench.py")}',
         '--config.data.image_size=16', '--config.model.channels=16',
         '--config.model.channel_mult=(1,2)', '--config.model.num_groups=8',
         '--config.training.batch_size=4', '--warmup=1', '--repeats=2', '--sample_repeats=1',
         '--pipeline_batches=5', '--nofirst_step', f'--output={out}']
  if HAVE_DIFFUSERS:
    cmd.append('--compare=diffusers')
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}  # one device, as run by hand
  proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert '| train images/s |' in proc.stdout
  res = json.loads(out.read_text())
  for key in ('params', 'train_step_flops', 'forward_flops', 'train_compile_s',
              'forward_compile_s', 'train_images_per_s', 'forward_images_per_s',
              'ddim50_images_per_s', 'matmul_peak_flops', 'train_fraction_of_peak',
              'peak_memory', 'pipeline_images_per_s', 'pipeline_over_consumption',
              'digits_first_step_s', 'environment', 'command', 'train_step_memory_bytes',
              'params_bytes'):
    assert key in res, key
  assert res['train_step_flops'] > 0 and res['train_images_per_s'] > 0
  assert res['peak_memory']['bytes'] > 0
  assert res['digits_first_step_s'] is None  # --nofirst_step
  if HAVE_DIFFUSERS:
    assert res['torch']['params'] == res['params']
    assert set(res['ratio_jax_over_torch']) == {'train', 'forward'}


def test_layer_benchmark_prints_every_layer():
  cmd = [sys.executable, os.path.join(ROOT, 'experiments', 'layer_benchmark.py'), '--batch=1',
         '--repeats=1']
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [line.split(' | ') for line in proc.stdout.splitlines() if line.startswith('| ')][2:]
  implementations = {(r[0].strip('| '), r[1]) for r in rows}
  for layer in ('GroupNorm+SiLU', 'attention', 'upsample + conv'):
    assert (layer, 'ours') in implementations
  assert all(float(r[2]) > 0 and float(r[3].strip(' |')) > 0 for r in rows)
