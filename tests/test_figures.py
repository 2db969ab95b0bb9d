"""experiments/figures.py: every command writes a plausible PNG."""

import importlib.util
import os

import numpy as np
import pytest
from PIL import Image

from diffusion_jax import train
from tests.conftest import tiny_image_config, tiny_toy_config
from tests.test_train import ListWriter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def figures():
  spec = importlib.util.spec_from_file_location(
      'figures', os.path.join(ROOT, 'experiments', 'figures.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def check_png(path, min_width=200, min_height=100):
  assert os.path.getsize(path) > 1000
  with Image.open(path) as im:
    assert im.format == 'PNG'
    width, height = im.size
    assert width >= min_width and height >= min_height, im.size
    assert np.asarray(im.convert('L')).std() > 5  # not a blank canvas


def test_schedules_and_forward(figures, tmp_path):
  out = str(tmp_path)
  [path] = figures.main(['schedules', f'--out={out}'])
  assert path == os.path.join(out, 'schedules.png')
  check_png(path, 600, 250)
  [path] = figures.main(['forward', f'--out={out}', '--num_timesteps=100'])
  check_png(path, 600, 100)


def test_forward_from_an_npz_image(figures, tmp_path):
  npz = str(tmp_path / 'images.npz')
  rng = np.random.default_rng(0)
  np.savez(npz, images=rng.integers(0, 256, (2, 20, 30, 3), dtype=np.uint8))
  [path] = figures.main(['forward', f'--image={npz}', '--index=1', '--size=16',
                         f'--out={tmp_path}'])
  check_png(path, 600, 100)


def test_default_times_span_the_process(figures):
  assert figures.default_times(1000) == [0, 50, 100, 200, 300, 500, 699, 999]
  assert figures.default_times(10)[-1] == 9


def test_reverse_from_a_trained_run(figures, tmp_path):
  workdir = str(tmp_path / 'run')
  config = tiny_image_config()
  config.training.num_steps = 2
  train.train_and_evaluate(config, workdir, writer=ListWriter())
  [path] = figures.main(['reverse', f'--workdir={workdir}', '--num_samples=2',
                         f'--out={tmp_path}'])
  check_png(path, 300, 100)


def test_toy_forward_and_reverse(figures, tmp_path):
  workdir = str(tmp_path / 'run')
  config = tiny_toy_config()
  config.training.num_steps = 2
  train.train_and_evaluate(config, workdir, writer=ListWriter())
  paths = figures.main(['toy', f'--workdir={workdir}', '--num_steps=5', f'--out={tmp_path}'])
  assert [os.path.basename(p) for p in paths] == ['toy_forward.png', 'toy_reverse.png']
  for path in paths:
    check_png(path, 800, 150)


def test_weightings_over_log_snr(figures, tmp_path):
  bins = np.linspace(-16, 16, 65)
  width = np.diff(bins)
  curves = {label: figures.loss_weighting_over_logsnr(*setting, bins, num=20_000)
            for label, *setting in figures.WEIGHTINGS}
  for label, density in curves.items():
    assert np.sum(density * width) == pytest.approx(1.0), label
  low = bins[1:] <= -5  # high noise: eps-space weight of v and flow losses grows like 1/alpha^2
  mass = lambda label: float(np.sum((curves[label] * width)[low]))
  assert mass('rectified flow, uniform t') > 3 * mass('DDPM cosine, eps')
  # EDM: log sigma ~ N(-1.2, 1.2) clipped to [log 0.002, log 80], lambda = -2 log sigma, and
  # weight (sigma^2 + 0.25) / 0.25 on the noise error: the weighted mean of lambda by quadrature.
  n = np.linspace(-1.2 - 8 * 1.2, -1.2 + 8 * 1.2, 200_001)
  density = np.exp(-0.5 * ((n + 1.2) / 1.2) ** 2)
  log_sigma = np.clip(n, np.log(0.002), np.log(80.0))
  w = density * (np.exp(2 * log_sigma) + 0.25) / 0.25
  want = float(np.sum(w * -2 * log_sigma) / np.sum(w))
  centres = (bins[1:] + bins[:-1]) / 2
  edm = figures.loss_weighting_over_logsnr('edm', 'linear', 'edm', 'edm', 'lognormal', bins,
                                          num=200_000)
  # The weight grows like 1/SNR, so the rare high-noise draws move the estimate by ~0.2.
  assert float(np.sum(centres * edm * width)) == pytest.approx(want, abs=0.4)
  [path] = figures.main(['weightings', f'--out={tmp_path}'])
  check_png(path, 600, 300)
