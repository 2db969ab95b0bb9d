"""Input pipeline: every source, preprocessing, sharding, determinism, the offline TFDS error."""

import time
from unittest import mock

import jax
import numpy as np
from PIL import Image
import pytest
from sklearn import datasets
from tensorflow_datasets import testing as tfds_testing

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


def mock_tfds_config(tmp_path, monkeypatch, channels=3):
  """A tfds config of oxford_flowers102 in a fresh data_dir, for `tfds.testing.mock_data`."""
  monkeypatch.setattr(sources, '_network_reachable', lambda *a, **k: True)
  config = tiny_image_config('tfds', image_size=8, channels=channels)
  config.data.name = 'oxford_flowers102'
  config.data.data_dir = str(tmp_path / 'tfds')
  return config


def host_batches(config, start_step, *, process_index=0, process_count=1, count=3):
  """`count` batches of one process's share of a global batch of 8, from `start_step`."""
  with mock.patch.object(jax, 'process_index', lambda: process_index), \
       mock.patch.object(jax, 'process_count', lambda: process_count):
    it = input_pipeline.host_batches(config, 8 // process_count, start_step=start_step)
    return [next(it) for _ in range(count)]


def assert_resumes_exactly(config):
  """Batches from step 3 are steps 3.. of an uninterrupted run (which crosses an epoch), for
  one process or two (their halves), and whatever the threads and workers that read them."""
  straight = host_batches(config, 0, count=7)
  for threads, workers in ((1, 0), (4, 0)) + (((2, 2),) if config.data.num_workers else ()):
    config.data.num_threads, config.data.num_workers = threads, workers
    resumed = host_batches(config, 3, count=4)
    for a, b in zip(straight[3:], resumed):
      np.testing.assert_array_equal(a['x'], b['x'])
      np.testing.assert_array_equal(a['label'], b['label'])
  halves = [host_batches(config, 3, process_index=p, process_count=2, count=4) for p in (0, 1)]
  for a, b0, b1 in zip(straight[3:], *halves):
    np.testing.assert_array_equal(a['x'], np.concatenate([b0['x'], b1['x']]))
  assert not np.array_equal(straight[0]['x'], straight[4]['x'])  # a new order each epoch


def test_a_resumed_folder_run_sees_the_batches_of_an_uninterrupted_one(tmp_path):
  rng = np.random.default_rng(4)
  for i in range(34):  # 4 batches of 8 per epoch, 2 images dropped
    folder = tmp_path / f'class_{i % 3}'
    folder.mkdir(exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(folder / f'{i}.png')
  config = tiny_image_config('folder', image_size=8, channels=3)
  config.data.path = str(tmp_path)
  config.data.num_workers = 2  # also read by two worker processes
  assert_resumes_exactly(config)


def test_a_resumed_tfds_run_sees_the_batches_of_an_uninterrupted_one(tmp_path, monkeypatch):
  config = mock_tfds_config(tmp_path, monkeypatch, channels=3)
  config.data.class_conditional, config.data.num_classes = True, 102
  with tfds_testing.mock_data(num_examples=34):
    assert_resumes_exactly(config)


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


def test_batches_are_the_documented_function_of_seed_and_step():
  """Global batch `step`: epoch permutation rng([seed, epoch]), rows offset*B..(offset+1)*B of
  it, flips from rng([seed, epoch, offset, 1]); the pipeline has given these batches since the
  in-memory sources were written, so runs trained before Grain resume on the same data."""
  x = np.random.default_rng(0).integers(0, 256, (50, 4, 4, 1), dtype=np.uint8)
  seed, b = 3, 8
  step_batch = input_pipeline.StepBatch(sources.InMemory(x, None), b, seed=seed,
                                        random_flip=True)
  seen = []
  for step in range(9):  # crosses an epoch boundary (6 batches per epoch, 2 examples dropped)
    epoch, offset = divmod(step, 50 // b)
    idx = np.random.default_rng([seed, epoch]).permutation(50)[offset * b:(offset + 1) * b]
    flip = np.random.default_rng([seed, epoch, offset, 1]).random(b) < 0.5
    want = np.where(flip[:, None, None, None], x[idx][:, :, ::-1], x[idx]) / 127.5 - 1.0
    got = step_batch(step)
    np.testing.assert_allclose(got['x'], want, rtol=0, atol=1e-6)
    assert got['label'].tolist() == [0] * b
    seen.append(idx)
  assert len(np.unique(np.concatenate(seen[:6]))) == 48  # an epoch has no repeats


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
  config = mock_tfds_config(tmp_path, monkeypatch, channels=1)
  with tfds_testing.mock_data(num_examples=8):
    with pytest.raises(ValueError, match=r'data.channels=1 but TFDS .* stores 3'):
      sources.open_examples(config, 'train')
    config.data.channels = 3
    config.data.class_conditional, config.data.num_classes = True, 5
    with pytest.raises(ValueError, match='has 102 labels.*num_classes=102'):
      sources.open_examples(config, 'train')
    config.data.num_classes = 0
    assert input_pipeline.data_info(config).num_classes == 102  # from the TFDS metadata


def test_tfds_features_the_config_needs_are_checked_at_start_up(tmp_path, monkeypatch):
  config = mock_tfds_config(tmp_path, monkeypatch)
  with tfds_testing.mock_data(num_examples=4):
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


def test_preparing_tfds_without_tensorflow_names_the_extra(tmp_path, monkeypatch):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(sources, '_network_reachable', lambda *a, **k: True)

  def needs_tensorflow(self, **kwargs):
    del self, kwargs
    raise ModuleNotFoundError("No module named 'tensorflow'")
  monkeypatch.setattr(tfds.core.DatasetBuilder, 'download_and_prepare', needs_tensorflow)
  config = tiny_image_config('tfds', channels=3)
  config.data.name = 'oxford_flowers102'
  config.data.data_dir = str(tmp_path)
  with pytest.raises(RuntimeError, match=r'preparing it needs TensorFlow .*pip install -e '
                     r'"\.\[tfds\]" \(reading a prepared data set does not\)'):
    sources.check(config)
