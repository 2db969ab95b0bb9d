"""Training data: a source's examples -> this host's share -> batches -> global arrays on devices.

Sources are read by `sources` (tfds, folder, npz, digits, toy2d). Images are flipped at random
(`data.random_flip`) and scaled to [-1, 1]. The in-memory sources (npz, digits, toy2d) run on
NumPy alone and their order is a pure function of (seed, step), so a resumed run sees exactly
the batches an uninterrupted one would.

Every training batch is a dict {'x': float32 [B, ...], 'label': int32 [B]} of global jax.Arrays
sharded on the batch dimension over the mesh axis 'data' (leading [k] axis added when several
train steps run per call). The evaluation readers at the end (`reference_images`,
`held_out_images`) give this host's share of a data set in order, as float32 NumPy chunks.
"""

from __future__ import annotations

import collections
import functools
import operator
from typing import Iterator, NamedTuple, Optional

from absl import logging
import jax
import numpy as np

from diffusion_jax import images, parallel, sources


class DataInfo(NamedTuple):
  shape: tuple  # one example: (H, W, C) or (2,)
  num_classes: int  # 0 when the source has no labels or labels are not used


def example_shape(config) -> tuple:
  if config.data.source == 'toy2d':
    return (2,)
  return (config.data.image_size, config.data.image_size, config.data.channels)


def data_info(config) -> DataInfo:
  """The example shape and the label count the model is built for (data.num_classes, or when
  that is 0 the source's own count: `sources.num_classes_of`)."""
  num_classes = 0
  if config.data.class_conditional:
    num_classes = config.data.num_classes or sources.num_classes_of(config)
    if not num_classes:
      raise ValueError('data.class_conditional=True, but the source has no labels to count '
                       f'(data.source={config.data.source!r}); set --config.data.num_classes=N '
                       'or train unconditionally.')
  return DataInfo(example_shape(config), num_classes)


# --- batches -------------------------------------------------------------------------------------

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
      xb = images.to_model_range(xb)
    yield {'x': xb, 'label': labels[idx]}
    step += 1


def tf_dataset(config, batch_size: int, *, splits: str, train: bool = True, start_step: int = 0):
  """A tf.data pipeline of this host's share: dict(image uint8/float, label) batches.

  Training shuffles with a seed made of training.seed, the process and `start_step`, so a run
  that resumes does not replay the order of its first start (the order is not the one an
  uninterrupted run would have seen: only the in-memory sources give that).
  """
  tf = sources.import_tensorflow()
  size, channels = config.data.image_size, config.data.channels
  seed = int(np.random.default_rng([config.training.seed, jax.process_index(),
                                    start_step]).integers(2 ** 31))
  num_classes = config.data.num_classes if config.data.class_conditional else 0
  if config.data.source == 'tfds':
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    builder = sources.tfds_builder(config)
    sources.check_tfds_features(config, builder.info.features)
    # Each '+' part is split over hosts on its own, so every host gets its share of each.
    split = functools.reduce(operator.add, [
        tfds.split_for_jax_process(part, drop_remainder=True) for part in splits.split('+')])
    ds = builder.as_dataset(split=split, shuffle_files=train,
                            read_config=tfds.ReadConfig(shuffle_seed=seed))
    ds = ds.map(lambda ex: (ex['image'], tf.cast(ex.get('label', 0), tf.int32)),
                num_parallel_calls=tf.data.AUTOTUNE)
  else:
    files, labels, found = sources.folder_files(config.data.path)
    if num_classes and found > num_classes:
      raise ValueError(f'data.path={config.data.path!r} has {found} class subfolders, more than '
                       f'data.num_classes={num_classes}; set --config.data.num_classes={found} '
                       '(or 0 to count them).')
    n = len(files) // jax.process_count() * jax.process_count()
    share = slice(jax.process_index(), n, jax.process_count())
    files, labels = files[share], labels[share]
    if config.data.check_images:
      files, labels = sources.readable_images(tf, files, labels, channels)
    ds = tf.data.Dataset.from_tensor_slices((files, labels))
    ds = ds.map(lambda f, l: (tf.io.decode_image(tf.io.read_file(f), channels=channels,
                                                 expand_animations=False), l),
                num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.map(lambda im, l: (sources.tf_center_crop_resize(tf, im, size), l),
              num_parallel_calls=tf.data.AUTOTUNE).cache()
  if train:
    ds = ds.repeat().shuffle(config.data.shuffle_buffer, seed=seed)
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
  if source not in sources.SOURCES:
    raise ValueError(f'data.source={source!r} is unknown; choose one of {sources.SOURCES}.')
  if source in ('tfds', 'folder'):
    ds = tf_dataset(config, batch_size, splits=config.data.splits, train=True,
                    start_step=start_step)
    return ds.as_numpy_iterator()
  # In-memory data are small: every process holds all of it and takes its block of each global
  # batch. The block is process_index-th because the mesh orders devices as jax.devices() does,
  # process by process, so that is the block make_array_from_process_local_data places here.
  x, labels = sources.load_in_memory(config)
  if config.data.class_conditional:
    sources.check_labels(labels, config.data.num_classes or sources.num_classes_of(config),
                         f'data.source={source}' + (f' ({config.data.path})'
                                                    if source == 'npz' else ''))
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


# --- evaluation readers --------------------------------------------------------------------------

def tf_images(config, splits: str, count: int, batch_size: int = 100) -> Iterator[np.ndarray]:
  """The first `count` images of this host's share of a TFDS/folder source, in order:
  float32 [n, S, S, C] in [-1, 1] chunks (with their labels)."""
  ds = tf_dataset(config, batch_size, splits=splits, train=False)
  seen = 0
  for batch in ds.as_numpy_iterator():
    take = min(len(batch['x']), count - seen)
    yield batch['x'][:take], batch['label'][:take]
    seen += take
    if seen >= count:
      return
  if seen < count:
    raise ValueError(f'the data set ({splits!r}) has only {seen} images on this host, fewer than '
                     f'the {count} asked for; lower --config.eval.num_reference or '
                     '--config.eval.bpd_num_examples.')


def host_share_sizes(count: int) -> tuple[list, int]:
  """How `count` examples split over the processes: [examples of process p], and the padded
  length every process uses, so that they all run the same batches (collectives need it)."""
  p = jax.process_count()
  sizes = [count // p + (i < count % p) for i in range(p)]
  return sizes, max(sizes)


def _padded(x: np.ndarray, length: int) -> np.ndarray:
  return parallel.pad_rows(x, length)


def reference_images(config, count: int) -> Iterator[np.ndarray]:
  """This host's share of the first `count` training images, float32 chunks in [-1, 1], padded
  with copies of its last image to `host_share_sizes(count)[1]` images (drop the padding after
  gathering: process p's real rows are its first `sizes[p]`)."""
  sizes, length = host_share_sizes(count)
  mine = sizes[jax.process_index()]
  if config.data.source in ('tfds', 'folder'):
    chunks = [x for x, _ in tf_images(config, config.data.splits, mine)]
    for x in chunks[:-1]:
      yield x
    yield _padded(chunks[-1], len(chunks[-1]) + length - mine)
    return
  x, _ = sources.load_in_memory(config)
  if len(x) < count:
    raise ValueError(f'eval.num_reference={count} but the {config.data.source} data set has '
                     f'{len(x)} images; set --config.eval.num_reference={len(x)}.')
  x = _padded(x[:count][jax.process_index()::jax.process_count()], length)
  for i in range(0, len(x), 500):
    yield images.to_model_range(x[i:i + 500])


def held_out_images(config, count: int) -> tuple[np.ndarray, np.ndarray, int]:
  """This host's share of `count` held-out images (float32 in [-1, 1]), their int32 labels, and
  how many are real: both padded to `host_share_sizes(count)[1]` rows.

  TFDS: data.eval_splits. In-memory sources: the last `count` examples (trained on as well:
  these sources have no held-out split). Folder: the first `count` images of data.path.
  """
  source = config.data.source
  sizes, length = host_share_sizes(count)
  mine = sizes[jax.process_index()]
  if source in ('tfds', 'folder'):
    if source == 'folder':
      logging.info('data.source=folder has no held-out split: bits/dim uses the first %d images '
                   'of data.path, which training saw.', count)
    chunks = list(tf_images(config, config.data.eval_splits if source == 'tfds' else '', mine))
    x = np.concatenate([c[0] for c in chunks])
    labels = np.concatenate([c[1] for c in chunks]).astype(np.int32)
  else:
    x, labels = sources.load_in_memory(config)
    if len(x) < count:
      raise ValueError(f'eval.bpd_num_examples={count} but the {source} data set has {len(x)} '
                       f'images; set --config.eval.bpd_num_examples={len(x)}.')
    labels = np.zeros(len(x), np.int32) if labels is None else labels
    share = slice(jax.process_index(), None, jax.process_count())
    x, labels = images.to_model_range(x[-count:][share]), labels[-count:][share]
  return _padded(x, length), _padded(labels, length), mine
