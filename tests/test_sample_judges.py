"""The judges of the sampler and post-hoc EMA studies: sliced Wasserstein, the classifier's
features, and the ratios of experiments/judge.py on real data (about 1) and on wrong data."""

import numpy as np
import pytest

from diffusion_jax import sources
from diffusion_jax.metrics import classifier_features, sliced_wasserstein
from experiments import judge as judge_lib
from tests.conftest import tiny_image_config, tiny_toy_config


def test_sliced_wasserstein_of_a_shift_is_its_closed_form():
  a = np.random.default_rng(0).standard_normal((500, 2))
  shift = np.array([0.3, 0.0])
  # Every direction u sees the shift u . (0.3, 0): SW_2 = 0.3 sqrt(mean cos^2) = 0.3 / sqrt(2).
  assert sliced_wasserstein.sliced_wasserstein(a, a + shift) == pytest.approx(0.3 / np.sqrt(2),
                                                                               rel=1e-9)
  assert sliced_wasserstein.sliced_wasserstein(a, a) == 0.0
  b = np.random.default_rng(1).standard_normal((500, 2))
  assert sliced_wasserstein.sliced_wasserstein(a, b) == pytest.approx(
      sliced_wasserstein.sliced_wasserstein(b, a))
  u = sliced_wasserstein.directions(5, 64)
  np.testing.assert_allclose(np.linalg.norm(u, axis=1), 1.0)
  with pytest.raises(ValueError, match='same shape'):
    sliced_wasserstein.sliced_wasserstein(a, b[:10])


def test_classifier_learns_the_digits():
  images, labels = sources.digits_images()
  clf = classifier_features.train_classifier(images[:1200], labels[:1200], seed=0)
  assert np.mean(clf.predict(images[1200:]) == labels[1200:]) > 0.9  # held out
  feats = clf.hidden(images[:5])
  assert feats.shape == (5, 64) and np.all(feats >= 0)
  with pytest.raises(ValueError, match='uint8'):
    clf.hidden(images.astype(np.float32))


def test_toy_judge_scores_real_points_near_one_and_a_blur_far_above():
  judge = judge_lib.make_judge(tiny_toy_config(), num_samples=2000)
  fresh = sources.toy_points('swiss_roll', 2000, seed=123)
  assert 0.7 < judge.score(fresh) < 1.3
  noise = np.random.default_rng(0).standard_normal(fresh.shape)
  blurs = [judge.score(fresh + s * noise) for s in (0.1, 0.2, 0.4)]
  assert blurs[0] < blurs[1] < blurs[2] and blurs[2] > 3  # more blur, farther from the data
  assert judge.score(0.9 * fresh) > 1.5  # a roll 10% too small
  assert judge.class_share is None


def test_image_judge_scores_real_digits_near_one_and_noise_far_above():
  config = tiny_image_config()
  judge = judge_lib.make_judge(config)
  assert judge.num_samples == 1796
  images, labels = sources.digits_images()
  real = images[::-1][:judge.num_samples].astype(np.float32) / 127.5 - 1.0  # a reordering
  assert judge.score(real) < 1.0  # the same images, in other halves: as close as it gets
  noise = np.random.default_rng(0).uniform(-1, 1, real.shape).astype(np.float32)
  assert judge.score(noise) > 20
  assert judge.class_share(real, labels[::-1][:judge.num_samples]) > 0.95


def test_image_judge_needs_labelled_in_memory_data(tmp_path):
  config = tiny_image_config('tfds')
  with pytest.raises(ValueError, match='labelled in-memory images'):
    judge_lib.make_judge(config)
  path = tmp_path / 'x.npz'
  np.savez(path, images=np.zeros((10, 8, 8, 1), np.uint8))
  config = tiny_image_config('npz')
  config.data.path = str(path)
  with pytest.raises(ValueError, match='no `labels`'):
    judge_lib.make_judge(config)


def test_pooled_images_are_block_means():
  x = np.arange(2 * 4 * 4 * 1, dtype=np.uint8).reshape(2, 4, 4, 1)
  got = judge_lib.pooled(x, size=2)
  assert got.shape == (2, 2, 2, 1)
  assert got[0, 0, 0, 0] == np.round(np.mean([0, 1, 4, 5]))
  assert judge_lib.pooled(x, size=8) is x  # small images stay as they are


def test_copies_of_training_images_have_a_copy_ratio_near_zero():
  rng = np.random.default_rng(0)
  real = rng.integers(0, 256, (200, 4, 4, 3), dtype=np.uint8)
  copies = real[:50].astype(np.float32) / 127.5 - 1.0
  index, dist = judge_lib.nearest_training_images(copies, real)
  np.testing.assert_array_equal(index, np.arange(50))
  np.testing.assert_allclose(dist, 0.0, atol=1e-3)
  assert judge_lib.copy_ratio(copies, real, count=100) < 0.01
  fresh = rng.integers(0, 256, (50, 4, 4, 3)).astype(np.float32) / 127.5 - 1.0  # new images
  assert 0.8 < judge_lib.copy_ratio(fresh, real, count=100) < 1.2
