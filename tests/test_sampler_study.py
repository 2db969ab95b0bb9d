"""experiments/sampler_study.py end to end on tiny trained runs: tables, plots, guidance rows."""

import json
import math
import os
import subprocess
import sys

from PIL import Image

from diffusion_jax import train
from tests.conftest import tiny_image_config, tiny_toy_config, xla_flags
from tests.test_train import ListWriter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def study(*args):
  env = dict(os.environ, XLA_FLAGS=xla_flags(1))
  proc = subprocess.run([sys.executable, os.path.join(ROOT, 'experiments', 'sampler_study.py'),
                         *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
  return proc.stdout


def test_toy_study_writes_the_table_plot_and_results(tmp_path):
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(tiny_toy_config(), workdir, writer=ListWriter())
  # 'own': the run's own sampler and spacing (toy2d.py's: DPM-Solver++(2M) SDE on logsnr).
  out = study(f'--workdir={workdir}', '--calls=2,4', '--samplers=ddim,own',
              '--num_samples=500', '--repeats=2', '--tolerances=0.05',
              '--compare_sampler=unipc-2')
  own = 'dpm_solver++, logsnr (own)'
  assert '| ddim |' in out and f'| {own} |' in out and '| DDPM, 100 calls |' in out
  folder = os.path.join(workdir, 'sampler_study')
  with open(os.path.join(folder, 'results.json')) as f:
    results = json.load(f)
  assert results['steps'] == [4] and results['num_samples'] == 500
  rows = results['rows']
  adaptive, beside = rows[4], rows[5]  # the adaptive solve, and unipc-2 at its mean calls
  assert adaptive['sampler'] == 'adaptive (tol 0.05)' and adaptive['calls_max'] >= 8
  assert beside['sampler'] == 'unipc-2' and beside['calls'] == adaptive['calls']
  with open(os.path.join(folder, 'adaptive.md')) as f:
    assert f'| ddpm eps | 0.05 | {adaptive["calls"]} ({adaptive["calls_max"]}) |' in f.read()
  rows = rows[:4] + rows[6:]
  assert [(r['sampler'], r['calls']) for r in rows] == [
      ('ddim', 2), ('ddim', 4), (own, 2), (own, 4), ('reference', 100)]
  assert all(len(r['ratios']) == (1 if r['sampler'] == 'reference' else 2)
             and math.isfinite(r['ratio']) and r['ratio'] > 0 for r in rows)
  with open(os.path.join(folder, 'table.md')) as f:
    assert f.read() in out
  with Image.open(os.path.join(folder, 'quality_vs_calls.png')) as im:
    assert im.size[0] > 400


def test_conditional_digits_study_reports_guidance(tmp_path):
  workdir = str(tmp_path / 'run')
  config = tiny_image_config()
  config.data.class_conditional, config.data.num_classes = True, 10
  config.training.num_steps = 2
  train.train_and_evaluate(config, workdir, writer=ListWriter())
  out = study(f'--workdir={workdir}', '--calls=2', '--samplers=unipc-2', '--noreference',
              '--guidance_scales=2', '--guided_calls=2')
  assert '| guidance scale | distance ratio | samples of the asked class |' in out
  folder = os.path.join(workdir, 'sampler_study')
  with open(os.path.join(folder, 'results.json')) as f:
    guided = json.load(f)['guidance']
  assert [g['guidance_scale'] for g in guided] == [2.0]
  assert all(0.0 <= g['class_share'] <= 1.0 and math.isfinite(g['ratio']) for g in guided)
  with Image.open(os.path.join(folder, 'classes.png')) as im:
    width, height = im.size
  assert height > width * 0.9  # ten rows of ten
  with Image.open(os.path.join(folder, 'fewest_calls.png')) as im:
    width, height = im.size
  assert width > 15 * height  # one run: one row of 20


def test_formulations_side_by_side(tmp_path):
  """Several runs of the same data, one per formulation: one table with a row per run and
  sampler; heun within the requested calls; the continuous run's reference is Euler-Maruyama."""
  runs = []
  for name, settings in (('ddpm', {}), ('flow', dict(process='flow', prediction_type='flow'))):
    config = tiny_toy_config()
    config.diffusion.update(settings)
    config.sampling.spacing = 'logsnr'
    runs.append(str(tmp_path / name))
    train.train_and_evaluate(config, runs[-1], writer=ListWriter())
  out = study(f'--workdir={",".join(runs)}', f'--out={tmp_path / "study"}', '--calls=3,4',
              '--samplers=ddim,heun', '--num_samples=500', '--spacing=logsnr')
  for label in ('ddpm eps: ddim', 'ddpm eps: heun', 'flow flow: ddim', 'flow flow: heun',
                'ddpm eps: DDPM, 100 calls', 'flow flow: Euler-Maruyama, 1000 calls'):
    assert f'| {label} |' in out, label
  with open(tmp_path / 'study' / 'results.json') as f:
    rows = json.load(f)['rows']
  heun = [(r['requested_calls'], r['calls']) for r in rows
          if r['sampler'] == 'heun' and r['formulation'] == 'flow flow']
  assert heun == [(3, 3), (4, 3)]  # 2 steps = 3 calls
