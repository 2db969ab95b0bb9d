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


def test_a_resumed_folder_run_does_not_replay_the_first_order(tmp_path):
  rng = np.random.default_rng(4)
  for i in range(32):
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / f'{i}.png')
  config = tiny_image_config('folder', image_size=8, channels=3)
  config.data.path, config.data.shuffle_buffer = str(tmp_path), 32

  def first(start_step):
    ds = input_pipeline.tf_dataset(config, 8, splits='', start_step=start_step)
    return next(ds.as_numpy_iterator())['x']
  np.testing.assert_array_equal(first(0), first(0))  # a restart at the same step: same order
  assert not np.array_equal(first(0), first(7))  # resumed at step 7: a fresh order


def test_labels_outside_the_classes_are_named(tmp_path):
  path = tmp_path / 'x.npz'
  np.savez(path, images=np.zeros((16, 8, 8, 1), np.uint8), labels=np.arange(16) % 11)
  config = tiny_image_config('npz')
  config.data.path, config.data.class_conditional, config.data.num_classes = str(path), True, 10
  with pytest.raises(ValueError, match=r'labels in \[0, 10\].*num_classes=11'):
    next(input_pipeline.host_batches(config, 8))
  config.data.num_classes = 0  # read from the labels: 11
  assert input_pipeline.data_info(config).num_classes == 11


def test_eval_shares_are_padded_evenly_over_processes(monkeypatch):
  config = tiny_image_config()
  monkeypatch.setattr(jax, 'process_count', lambda: 3)
  sizes, length = input_pipeline.host_share_sizes(10)
  assert sizes == [4, 3, 3] and length == 4
  seen = []
  for p in range(3):
    monkeypatch.setattr(jax, 'process_index', lambda p=p: p)
    x = np.concatenate(list(input_pipeline.reference_images(config, 10)))
    held, labels, mine = input_pipeline.held_out_images(config, 10)
    assert len(x) == len(held) == len(labels) == length and mine == sizes[p]
    seen.append(x[:sizes[p]])
  all_real = np.concatenate(seen)
  first_ten = sources.digits_images()[0][:10].astype(np.float32) / 127.5 - 1
  assert sorted(map(bytes, all_real)) == sorted(map(bytes, first_ten))  # each image once


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


def test_tfds_channels_and_label_count_are_checked(tmp_path, monkeypatch):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(sources, '_network_reachable', lambda *a, **k: True)
  config = tiny_image_config('tfds', image_size=8, channels=1)
  config.data.name = 'oxford_flowers102'
  config.data.data_dir = str(tmp_path / 'tfds')
  with tfds.testing.mock_data(num_examples=8):
    with pytest.raises(ValueError, match=r'data.channels=1 but TFDS .* stores 3'):
      input_pipeline.tf_dataset(config, 4, splits='train')
    config.data.channels = 3
    config.data.class_conditional, config.data.num_classes = True, 5
    with pytest.raises(ValueError, match='has 102 labels.*num_classes=102'):
      input_pipeline.tf_dataset(config, 4, splits='train')
    config.data.num_classes = 0
    assert input_pipeline.data_info(config).num_classes == 102  # from the TFDS metadata


def test_tfds_features_the_config_needs_are_checked_at_start_up(tmp_path, monkeypatch):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(sources, '_network_reachable', lambda *a, **k: True)
  config = tiny_image_config('tfds', image_size=8, channels=3)
  config.data.data_dir = str(tmp_path / 'tfds')
  with tfds.testing.mock_data(num_examples=4):
    config.data.name = 'imdb_reviews'  # text: no image
    with pytest.raises(ValueError, match=r"data.name='imdb_reviews' has no `image` feature "
                       r"\(it has \['label', 'text'\]\)"):
      sources.check(config)
    config.data.name = 'celeb_a'  # images with attributes, no class label
    sources.check(config)
    config.data.class_conditional, config.data.num_classes = True, 2
    with pytest.raises(ValueError, match=r"class_conditional=True but data.name='celeb_a' has "
                       r"no `label` feature"):
      sources.check(config)
