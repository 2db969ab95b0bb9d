"""Input pipeline: every source, preprocessing, sharding, determinism, the offline TFDS error."""

import time

import jax
import numpy as np
from PIL import Image
import pytest
from sklearn import datasets

from diffusion_jax import input_pipeline, parallel, sources
from tests.conftest import tiny_image_config, tiny_toy_config


def first_batch(config, mesh=None):
  mesh = mesh or parallel.create_mesh()
  return next(input_pipeline.create_iterator(config, mesh))


def test_npz_source_crops_resizes_and_shards(tmp_path):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (20, 12, 10, 3), dtype=np.uint8)
  path = str(tmp_path / 'data.npz')
  np.savez(path, images=images, labels=np.arange(20) % 3)
  config = tiny_image_config('npz', image_size=8, channels=3)
  config.data.path = path
  batch = first_batch(config)
  assert batch['x'].shape == (8, 8, 8, 3) and batch['label'].shape == (8,)
  assert batch['x'].dtype == np.float32
  assert len(batch['x'].sharding.device_set) == jax.device_count()
  x = np.asarray(batch['x'])
  assert x.min() >= -1.0 and x.max() <= 1.0
  assert set(np.asarray(batch['label'])) <= {0, 1, 2}


def test_center_crop_resize_matches_pil_reference():
  image = np.random.default_rng(1).integers(0, 256, (30, 40, 3), dtype=np.uint8)
  out = sources.center_crop_resize(image, 10)
  want = np.asarray(Image.fromarray(image[:, 5:35]).resize((10, 10), Image.BILINEAR,
                                                           reducing_gap=None))
  np.testing.assert_array_equal(out, want)


def test_tf_preprocessing_agrees_with_numpy_path():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  image = np.random.default_rng(2).integers(0, 256, (48, 64, 3), dtype=np.uint8)
  ours = sources.center_crop_resize(image, 16).astype(int)
  tf_out = sources.tf_center_crop_resize(tf, tf.constant(image), 16).numpy().astype(int)
  assert np.abs(ours - tf_out).mean() < 4.0  # both antialiased bilinear; kernels differ slightly


@pytest.mark.parametrize('with_classes', [True, False])
def test_folder_source(tmp_path, with_classes):
  rng = np.random.default_rng(3)
  for i in range(12):
    folder = tmp_path / (f'class_{i % 2}' if with_classes else '')
    folder.mkdir(exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (20, 16, 3), dtype=np.uint8)).save(folder / f'{i}.png')
  config = tiny_image_config('folder', image_size=8, channels=3)
  config.data.path = str(tmp_path)
  batch = first_batch(config)
  assert batch['x'].shape == (8, 8, 8, 3)
  labels = set(np.asarray(batch['label']).tolist())
  assert labels <= ({0, 1} if with_classes else {0})


def test_missing_folder_names_the_setting():
  config = tiny_image_config('folder', channels=3)
  config.data.path = '/nonexistent/images'
  with pytest.raises(FileNotFoundError, match='data.path'):
    first_batch(config)


def test_digits_are_scaled_from_0_16():
  images, labels = sources.digits_images()
  raw = datasets.load_digits()
  assert images.shape == (1797, 8, 8, 1) and images.dtype == np.uint8
  np.testing.assert_array_equal(images[..., 0], np.round(raw.images * 255 / 16).astype(np.uint8))
  np.testing.assert_array_equal(labels, raw.target)


@pytest.mark.parametrize('name', sources.TOY_DATASETS)
def test_toy_data_in_their_own_coordinates(name):
  pts = sources.toy_points(name, 500, seed=0)
  if name == 'swiss_roll':
    want = datasets.make_swiss_roll(500, noise=0.5, random_state=0)[0][:, [0, 2]] / 10
  elif name == 'moons':
    want = datasets.make_moons(500, noise=0.05, random_state=0)[0]
  else:
    want = datasets.make_s_curve(500, noise=0.1, random_state=0)[0][:, [0, 2]]
  np.testing.assert_allclose(pts, want, rtol=1e-6)
  config = tiny_toy_config(name)
  assert first_batch(config)['x'].shape == (64, 2)


def test_in_memory_batches_are_a_function_of_seed_and_step():
  x = np.arange(50, dtype=np.float32)[:, None]
  fresh = input_pipeline.numpy_batches(x, None, 8, seed=3, random_flip=False)
  batches = [next(fresh)['x'] for _ in range(9)]  # crosses an epoch boundary (6 per epoch)
  resumed = input_pipeline.numpy_batches(x, None, 8, seed=3, random_flip=False, start_step=7)
  np.testing.assert_array_equal(next(resumed)['x'], batches[7])
  np.testing.assert_array_equal(next(resumed)['x'], batches[8])
  assert len(np.unique(np.concatenate(batches[:6]))) == 48  # an epoch has no repeats


def test_steps_per_call_stacks_batches():
  config = tiny_image_config()
  config.training.steps_per_call = 2
  batch = first_batch(config)
  assert batch['x'].shape == (2, 8, 8, 8, 1)


def test_tfds_without_data_or_network_fails_at_once(tmp_path, monkeypatch):
  monkeypatch.setattr(sources, '_network_reachable', lambda *a, **k: False)
  config = tiny_image_config('tfds', channels=3)
  config.data.name = 'oxford_flowers102'
  config.data.data_dir = str(tmp_path)
  start = time.time()
  with pytest.raises(RuntimeError, match='data_dir'):
    first_batch(config)
  assert time.time() - start < 30
  config.data.download = False
  with pytest.raises(RuntimeError, match='download=False'):
    first_batch(config)


def test_unknown_source_names_the_setting():
  config = tiny_image_config('hdf5')
  with pytest.raises(ValueError, match='data.source'):
    first_batch(config)
