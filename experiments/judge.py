"""How close a set of samples is to a trained run's own data: the judge of the sampler and
post-hoc EMA studies.

Every score is a ratio, distance(samples, data) / distance(data, more data), so 1 means "as
close to the data as a second draw of real data is", and both distances compare sets of the
same size (the distances are biased upwards for small sets, the same way on both sides). Both
sides average over several draws of the real data, which steadies the ratio:

  toy2d   sliced Wasserstein distance (SW_2) of N samples to N fresh points of the data set,
          divided by SW_2 between two fresh draws of N points (N = 5,000 by default); each
          averaged over 8 fresh reference draws
  images  Fréchet distance between the last hidden layer's features of a small classifier
          trained here on the run's real labelled images: the real images are split in two
          halves A and B at random, the samples in two halves s1, s2 of the same size, and the
          score is (FD(s1, A) + FD(s2, B)) / 2 / FD(A, B), numerator and denominator each
          averaged over 8 random splits. For digits: 1,796 samples. Larger images (flowers) are
          average-pooled to 32x32 for the classifier, and `num_samples` may ask for fewer
          samples than the data set has (A and B are then random sets of that half size).
`nearest_training_images` and `copy_ratio` tell copies from new images: each sample's distance
to its nearest training image against that of real images to their nearest other one.
For class-conditional runs `class_share` is the share of samples the classifier puts in the class
they were asked for (real digits: 1.0 on the data it was trained on).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import numpy as np

from diffusion_jax import images, sources
from diffusion_jax.metrics import classifier_features, feature_distances, sliced_wasserstein

# The samplers the studies compare: name -> the sampling settings it stands for.
SAMPLERS = {
    'ddim': dict(sampler='ddim', eta=0.0),
    'dpm_solver++(2M)': dict(sampler='dpm_solver++', solver_order=2, stochastic=False),
    'dpm_solver++(3M)': dict(sampler='dpm_solver++', solver_order=3, stochastic=False),
    'dpm_solver++(2M) SDE': dict(sampler='dpm_solver++', solver_order=2, stochastic=True),
    'dpm_solver++(3M) SDE': dict(sampler='dpm_solver++', solver_order=3, stochastic=True),
    'unipc-2': dict(sampler='unipc', solver_order=2),
    'unipc-3': dict(sampler='unipc', solver_order=3),
    'heun': dict(sampler='heun'),
    'edm (churn 10)': dict(sampler='edm', s_churn=10.0),
    'euler_maruyama': dict(sampler='euler_maruyama'),
    'consistency': dict(sampler='consistency'),  # multistep consistency sampling
}
TOY_SAMPLES = 5000
DRAWS = 8  # reference draws / random splits that each score averages over
CLASSIFIER_SIZE = 32  # larger images are average-pooled to this side for the classifier


class Judge(NamedTuple):
  num_samples: int  # how many samples `score` wants
  score: Callable[[np.ndarray], float]  # float samples [N, ...] as generated -> ratio
  class_share: Optional[Callable[[np.ndarray, np.ndarray], float]]  # (samples, labels) -> share
  description: str


def _toy_judge(config, num_samples: int, seed: int) -> Judge:
  name = config.data.name
  draw = lambda k: sources.toy_points(name, num_samples, seed=10_000 * (seed + 1) + k)
  references = [draw(k) for k in range(DRAWS)]
  sw = sliced_wasserstein.sliced_wasserstein
  baseline = float(np.mean([sw(draw(DRAWS + k), ref) for k, ref in enumerate(references)]))

  def score(x):
    x = np.asarray(x)[:num_samples]
    return float(np.mean([sw(x, ref) for ref in references])) / baseline
  return Judge(num_samples, score, None,
               f'SW_2 to {num_samples} fresh {name} points / SW_2 between two fresh draws '
               f'({baseline:.4f}), each over {DRAWS} draws')


def pooled(x: np.ndarray, size: int = CLASSIFIER_SIZE) -> np.ndarray:
  """uint8 images [N, H, W, C] average-pooled to at most `size` x `size` (the classifier's
  input: a 64x64 flower is 12,288 numbers, too many for a small MLP on ~8,000 images)."""
  factor = max(x.shape[1] // size, 1)
  if factor == 1:
    return x
  n, h, w, c = x.shape
  blocks = x.reshape(n, h // factor, factor, w // factor, factor, c).astype(np.float32)
  return np.round(blocks.mean(axis=(2, 4))).astype(np.uint8)


def _image_judge(config, seed: int, num_samples: int = 0) -> Judge:
  if config.data.source not in ('digits', 'npz'):
    raise ValueError(f'the judge trains its classifier on labelled in-memory images; '
                     f'data.source={config.data.source!r} is not one (use digits or an .npz with '
                     '`labels`, or --mode=eval for FID).')
  real, labels = sources.load_in_memory(config)
  if labels is None:
    raise ValueError(f'data.path={config.data.path!r} has no `labels`: the judge needs them to '
                     'train its classifier.')
  classes, labels = np.unique(labels, return_inverse=True)  # e.g. Oxford's 1..102 -> 0..101
  clf = classifier_features.train_classifier(pooled(real), labels, seed=seed)
  feats = clf.hidden(pooled(real))
  half = min(len(real) // 2, num_samples // 2 or len(real))
  rng = np.random.default_rng(seed)
  splits = [rng.permutation(len(real)) for _ in range(DRAWS)]
  stats = lambda x: feature_distances.feature_statistics(x)
  halves = [(stats(feats[order[:half]]), stats(feats[order[half:2 * half]])) for order in splits]
  fd = lambda a, b: feature_distances.frechet_distance(*a, *b)
  baseline = float(np.mean([fd(a, b) for a, b in halves]))

  def score(x):
    f = clf.hidden(pooled(images.to_uint8(np.asarray(x)[:2 * half])))
    if len(f) < 2 * half:
      raise ValueError(f'the judge needs {2 * half} samples, got {len(f)}.')
    s1, s2 = stats(f[:half]), stats(f[half:])
    return float(np.mean([(fd(s1, a) + fd(s2, b)) / 2 for a, b in halves])) / baseline

  def class_share(x, asked):
    predicted = classes[clf.predict(pooled(images.to_uint8(np.asarray(x))))]
    return float(np.mean(predicted == np.asarray(asked)))
  return Judge(2 * half, score, class_share,
               f'classifier-feature FD of 2 x {half} samples to two random {half}-image sets of '
               f'the {len(real)} real images / FD between those sets ({baseline:.4f}), each over '
               f'{DRAWS} random splits')


def nearest_training_images(samples: np.ndarray, real: np.ndarray,
                            chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
  """(index of each sample's nearest real image, its root-mean-square distance per pixel) in
  [-1, 1] units: float samples [N, ...] as generated, uint8 real images [M, ...]."""
  r = real.reshape(len(real), -1).astype(np.float32) / 127.5 - 1.0
  r_sq = np.square(r).sum(1)
  index, dist = [], []
  for i in range(0, len(samples), chunk):
    s = np.asarray(samples[i:i + chunk], np.float32).reshape(-1, r.shape[1])
    d = np.square(s).sum(1)[:, None] + r_sq[None] - 2.0 * s @ r.T
    index.append(np.argmin(d, axis=1))
    dist.append(np.sqrt(np.maximum(np.min(d, axis=1), 0.0) / r.shape[1]))
  return np.concatenate(index), np.concatenate(dist)


def copy_ratio(samples: np.ndarray, real: np.ndarray, seed: int = 0,
               count: int = 500) -> float:
  """Median distance of the samples to their nearest real image, over the median distance of
  `count` real images to their nearest other real image: well below 1 when samples copy the
  training images, about 1 or above when they are as new as one real image is to the rest."""
  _, d_samples = nearest_training_images(samples, real)
  pick = np.random.default_rng(seed).choice(len(real), size=min(count, len(real)), replace=False)
  others = np.ones(len(real), bool)
  d_real = []
  for i in pick:  # leave the image itself out
    others[i] = False
    d_real.append(nearest_training_images(real[i:i + 1].astype(np.float32) / 127.5 - 1.0,
                                          real[others])[1][0])
    others[i] = True
  return float(np.median(d_samples) / np.median(d_real))


def make_judge(config, *, seed: int = 0, num_samples: int = 0) -> Judge:
  """The judge of a run described by `config` (num_samples: 0 for the default: toy2d 5,000
  points, images as many as the data set has)."""
  if config.data.source == 'toy2d':
    return _toy_judge(config, num_samples or TOY_SAMPLES, seed)
  return _image_judge(config, seed, num_samples)
