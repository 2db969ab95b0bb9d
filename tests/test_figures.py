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
