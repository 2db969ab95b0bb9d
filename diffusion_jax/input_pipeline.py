"""Training data: sources -> this host's share -> preprocessing -> global batches on devices.

Sources (`data.source`):
  tfds    a TFDS data set by name, splits from `data.splits` (tf.data; needs TensorFlow)
  folder  a folder of images, flat or with one subfolder per class (tf.data; needs TensorFlow)
  npz     an .npz with `images` uint8 [N, H, W, C] and optional `labels` [N]
  digits  scikit-learn's 8x8 digits (offline), uint8 = value * 255 / 16
  toy2d   scikit-learn's 2-D generators in their own coordinates (DESIGN.md)
Images are center-cropped to a square, resized with antialiasing to `data.image_size`, flipped
at random (`data.random_flip`) and scaled to [-1, 1]. The in-memory sources (npz, digits, toy2d)
run on NumPy alone and their order is a pure function of (seed, step), so a resumed run sees
exactly the batches an uninterrupted one would.

Every batch is a dict {'x': float32 [B, ...], 'label': int32 [B]} of global jax.Arrays sharded
on the batch dimension over the mesh axis 'data' (leading [k] axis added when several train
steps run per call).
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import operator
import os
import socket
from typing import Iterator, NamedTuple, Optional

import jax
import numpy as np
from PIL import Image

from diffusion_jax import parallel

SOURCES = ('tfds', 'folder', 'npz', 'digits', 'toy2d')
TOY_DATASETS = ('swiss_roll', 'moons', 's_curve')
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif')


class DataInfo(NamedTuple):
  shape: tuple  # one example: (H, W, C) or (2,)
  num_classes: int  # 0 when the source has no labels or labels are not used


def example_shape(config) -> tuple:
  if config.data.source == 'toy2d':
    return (2,)
  return (config.data.image_size, config.data.image_size, config.data.channels)


def data_info(config) -> DataInfo:
  """The example shape and the label count the model is built for."""
  num_classes = 0
  if config.data.class_conditional:
    num_classes = config.data.num_classes or {'digits': 10}.get(config.data.source, 0)
    if not num_classes:
      raise ValueError('data.class_conditional=True needs data.num_classes for source '
                       f'{config.data.source!r}; set --config.data.num_classes=N.')
  return DataInfo(example_shape(config), num_classes)


# --- in-memory sources ---------------------------------------------------------------------------

def center_crop_resize(image: np.ndarray, size: int) -> np.ndarray:
  """uint8 [H, W, C] -> uint8 [size, size, C]: center square crop, antialiased bilinear resize."""
  h, w = image.shape[:2]
  s = min(h, w)
  top, left = (h - s) // 2, (w - s) // 2
  image = image[top:top + s, left:left + s]
  if s == size:
    return image
  squeeze = image.shape[-1] == 1
  pil = Image.fromarray(image[..., 0] if squeeze else image)
  out = np.asarray(pil.resize((size, size), Image.BILINEAR, reducing_gap=None))
  return out[..., None] if squeeze else out


def toy_points(name: str, num_points: int, seed: int) -> np.ndarray:
  """float32 [N, 2] from scikit-learn's generators, in the data's own coordinates."""
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  if name == 'swiss_roll':
    x, _ = datasets.make_swiss_roll(num_points, noise=0.5, random_state=seed)
    x = x[:, [0, 2]] / 10.0
  elif name == 'moons':
    x, _ = datasets.make_moons(num_points, noise=0.05, random_state=seed)
  elif name == 's_curve':
    x, _ = datasets.make_s_curve(num_points, noise=0.1, random_state=seed)
    x = x[:, [0, 2]]
  else:
    raise ValueError(f'data.name={name!r} is not a toy2d data set; choose one of {TOY_DATASETS}.')
  return x.astype(np.float32)


def digits_images() -> tuple[np.ndarray, np.ndarray]:
  """scikit-learn's digits: uint8 [1797, 8, 8, 1] (value * 255 / 16) and int32 labels [1797]."""
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  digits = datasets.load_digits()
  images = np.round(digits.images * 255.0 / 16.0).astype(np.uint8)[..., None]
  return images, digits.target.astype(np.int32)


def load_npz(path: str) -> tuple[np.ndarray, Optional[np.ndarray]]:
  if not path or not os.path.exists(path):
    raise FileNotFoundError(f'data.path={path!r} does not exist; point --config.data.path at an '
                            '.npz holding `images` (uint8 [N, H, W, C]).')
  with np.load(path) as f:
    if 'images' not in f:
      raise ValueError(f'data.path={path!r} has no `images` array (keys: {list(f.keys())}).')
    images = f['images']
    labels = f['labels'].astype(np.int32) if 'labels' in f else None
  if images.dtype != np.uint8 or images.ndim != 4:
    raise ValueError(f'data.path={path!r}: `images` must be uint8 [N, H, W, C], '
                     f'got {images.dtype} {images.shape}.')
  return images, labels


def load_in_memory(config) -> tuple[np.ndarray, Optional[np.ndarray]]:
  """All examples of an in-memory source, preprocessed but for flips and scaling.

  Returns uint8 images [N, S, S, C] (or float32 points [N, 2]) and int32 labels [N] or None.
  """
  source = config.data.source
  if source == 'toy2d':
    return toy_points(config.data.name, config.data.num_points, config.training.seed), None
  images, labels = digits_images() if source == 'digits' else load_npz(config.data.path)
  if images.shape[-1] != config.data.channels:
    raise ValueError(f'data.channels={config.data.channels} but the {source} images have '
                     f'{images.shape[-1]}; set --config.data.channels={images.shape[-1]}.')
  size = config.data.image_size
  if images.shape[1:3] != (size, size):
    images = np.stack([center_crop_resize(im, size) for im in images])
  return images, labels


def to_model_range(images: np.ndarray) -> np.ndarray:
  """uint8 [..., C] in [0, 255] -> float32 in [-1, 1]."""
  return images.astype(np.float32) / 127.5 - 1.0


def numpy_batches(x: np.ndarray, labels: Optional[np.ndarray], batch_size: int, *, seed: int,
                  random_flip: bool, start_step: int = 0, process_index: int = 0,
                  process_count: int = 1) -> Iterator[dict]:
  """Endless batches; global batch i (of `batch_size`) is a pure function of (seed, i).

  Every process holds all of `x` and yields its contiguous block of `batch_size //
  process_count` rows of each global batch, so the global batches, and hence the losses, are
  the same however many processes share them. Each epoch is a fresh permutation; the remainder
  of an epoch is dropped.
  """
  n = len(x)
  if n < batch_size:
    raise ValueError(f'the data set has {n} examples, fewer than the global batch of '
                     f'{batch_size}; lower training.batch_size.')
  per_epoch = n // batch_size
  local = batch_size // process_count
  mine = slice(process_index * local, (process_index + 1) * local)
  labels = np.zeros(n, np.int32) if labels is None else labels
  step = start_step
  while True:
    epoch, offset = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(n)
    idx = order[offset * batch_size:(offset + 1) * batch_size][mine]
    xb = x[idx]
    if xb.dtype == np.uint8:
      if random_flip:
        flip = np.random.default_rng([seed, epoch, offset, 1]).random(batch_size)[mine] < 0.5
        xb = np.where(flip[:, None, None, None], xb[:, :, ::-1], xb)
      xb = to_model_range(xb)
    yield {'x': xb, 'label': labels[idx]}
    step += 1


# --- tf.data sources -----------------------------------------------------------------------------

def _network_reachable(host: str = 'storage.googleapis.com', timeout: float = 3.0) -> bool:
  """Whether TFDS's download host answers within `timeout` s (DNS included)."""
  def connect():
    with socket.create_connection((host, 443), timeout=timeout):
      return True
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    future = pool.submit(connect)
    try:
      return future.result(timeout=timeout + 1)
    except Exception:  # pylint: disable=broad-except
      return False


def _import_tf():
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError('data.source=tfds/folder needs TensorFlow (pip install tensorflow-cpu); '
                      'without it use data.source=npz, digits or toy2d.') from e
  tf.config.set_visible_devices([], 'GPU')  # TensorFlow must never take accelerator memory
  return tf


def tfds_builder(config):
  """The TFDS builder, prepared; fails at once, with the fix, when it cannot be."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = tfds.builder(config.data.name, data_dir=config.data.data_dir or None)
  if not builder.is_prepared():
    fix = (f'Download it on a machine with network access (python -c "import tensorflow_datasets '
           f"as tfds; tfds.builder('{config.data.name}').download_and_prepare()\"), copy "
           f'~/tensorflow_datasets here and set --config.data.data_dir, or train from a folder '
           f'or .npz (--config.data.source=folder|npz --config.data.path=...).')
    if not config.data.download:
      raise RuntimeError(f'TFDS data set {config.data.name!r} is not in '
                         f'{builder.data_dir!r} and data.download=False. {fix}')
    if not _network_reachable():
      raise RuntimeError(f'TFDS data set {config.data.name!r} is not in {builder.data_dir!r} '
                         f'and this machine cannot reach the download servers. {fix}')
    builder.download_and_prepare()
  return builder


def _tf_preprocess(tf, image, size: int):
  """uint8 [H, W, C] -> uint8 [size, size, C], the same crop and resize as the NumPy path."""
  shape = tf.shape(image)
  s = tf.minimum(shape[0], shape[1])
  image = tf.image.crop_to_bounding_box(image, (shape[0] - s) // 2, (shape[1] - s) // 2, s, s)
  image = tf.image.resize(image, (size, size), method='bilinear', antialias=True)
  return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)


def _folder_files(path: str) -> tuple[list, list, int]:
  if not path or not os.path.isdir(path):
    raise FileNotFoundError(f'data.path={path!r} is not a folder of images; point '
                            '--config.data.path at one (flat, or one subfolder per class).')
  classes = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))
  files, labels = [], []
  for label, folder in enumerate(classes or ['']):
    root = os.path.join(path, folder)
    for name in sorted(os.listdir(root)):
      if name.lower().endswith(IMAGE_EXTENSIONS):
        files.append(os.path.join(root, name))
        labels.append(label)
  if not files:
    raise FileNotFoundError(f'data.path={path!r} holds no images ({IMAGE_EXTENSIONS}).')
  return files, labels, len(classes)


def tf_dataset(config, batch_size: int, *, splits: str, train: bool = True):
  """A tf.data pipeline of this host's share: dict(image uint8/float, label) batches."""
  tf = _import_tf()
  size, channels = config.data.image_size, config.data.channels
  if config.data.source == 'tfds':
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    builder = tfds_builder(config)
    # Each '+' part is split over hosts on its own, so every host gets its share of each.
    split = functools.reduce(operator.add, [
        tfds.split_for_jax_process(part, drop_remainder=True) for part in splits.split('+')])
    ds = builder.as_dataset(split=split, shuffle_files=train)
    ds = ds.map(lambda ex: (ex['image'], tf.cast(ex.get('label', 0), tf.int32)),
                num_parallel_calls=tf.data.AUTOTUNE)
  else:
    files, labels, _ = _folder_files(config.data.path)
    n = len(files) // jax.process_count() * jax.process_count()
    share = slice(jax.process_index(), n, jax.process_count())
    ds = tf.data.Dataset.from_tensor_slices((files[share], labels[share]))
    ds = ds.map(lambda f, l: (tf.io.decode_image(tf.io.read_file(f), channels=channels,
                                                 expand_animations=False), l),
                num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.map(lambda im, l: (_tf_preprocess(tf, im, size), l),
              num_parallel_calls=tf.data.AUTOTUNE).cache()
  if train:
    ds = ds.repeat().shuffle(config.data.shuffle_buffer,
                             seed=config.training.seed + jax.process_index())
  flip = train and config.data.random_flip

  def finish(image, label):
    if flip:
      image = tf.image.random_flip_left_right(image)
    return {'x': tf.cast(image, tf.float32) / 127.5 - 1.0, 'label': label}

  ds = ds.map(finish, num_parallel_calls=tf.data.AUTOTUNE)
  return ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


# --- global batches ------------------------------------------------------------------------------

def host_batches(config, batch_size: int, *, start_step: int = 0) -> Iterator[dict]:
  """Endless host-local training batches of `batch_size` from the configured source."""
  source = config.data.source
  if source not in SOURCES:
    raise ValueError(f'data.source={source!r} is unknown; choose one of {SOURCES}.')
  if source in ('tfds', 'folder'):
    ds = tf_dataset(config, batch_size, splits=config.data.splits, train=True)
    return ds.as_numpy_iterator()
  # In-memory data are small: every process holds all of it and takes its block of each global
  # batch. The block is process_index-th because the mesh orders devices as jax.devices() does,
  # process by process, so that is the block make_array_from_process_local_data places here.
  x, labels = load_in_memory(config)
  return numpy_batches(x, labels, batch_size * jax.process_count(),
                       seed=config.training.seed * 1000, random_flip=config.data.random_flip,
                       start_step=start_step, process_index=jax.process_index(),
                       process_count=jax.process_count())


def abstract_batch(config, mesh) -> dict:
  """Shapes, dtypes and shardings of one global training batch, as create_iterator yields it."""
  k = config.training.steps_per_call
  lead = (k,) if k > 1 else ()
  sharding = parallel.batch_sharding(mesh, leading_axes=len(lead))
  shape = lead + (config.training.batch_size,)
  return {'x': jax.ShapeDtypeStruct(shape + tuple(example_shape(config)), np.float32,
                                    sharding=sharding),
          'label': jax.ShapeDtypeStruct(shape, np.int32, sharding=sharding)}


def device_prefetch(batches: Iterator[dict], size: int) -> Iterator:
  """Keeps `size` batches in flight to the devices ahead of the consumer."""
  queue = collections.deque()
  for batch in batches:
    queue.append(batch)
    if len(queue) > size:
      yield queue.popleft()
  while queue:
    yield queue.popleft()


def create_iterator(config, mesh, *, start_step: int = 0) -> Iterator[dict]:
  """Global training batches sharded over `mesh`, resuming at train step `start_step`.

  Yields {'x': [B, ...], 'label': [B]}, or [k, B, ...] with k = training.steps_per_call.
  """
  k = config.training.steps_per_call
  local = config.training.batch_size // jax.process_count()
  per_step = host_batches(config, local, start_step=start_step)
  batches = per_step
  if k > 1:  # k consecutive step batches, so the data do not depend on k
    batches = (jax.tree.map(lambda *bs: np.stack(bs), *[next(per_step) for _ in range(k)])
               for _ in iter(int, 1))
  sharding = parallel.batch_sharding(mesh, leading_axes=int(k > 1))
  global_batches = (parallel.host_to_global(b, sharding) for b in batches)
  return device_prefetch(global_batches, config.data.prefetch)
