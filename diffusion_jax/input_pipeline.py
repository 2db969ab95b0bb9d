"""Training data: a source's examples -> this host's share -> batches -> global arrays on devices.

Sources are read by `sources` (tfds, folder, npz, digits, toy2d) as random-access examples.
Grain runs the pipeline: global batch `step` is a pure function of (seed, step) for every source
(a fresh permutation each epoch, the remainder dropped, flips drawn from the same seed), each
process reads only its block of it, and threads (`data.num_threads`) or worker processes
(`data.num_workers`) read batches ahead. So a resumed run, after kill -9 or SIGTERM, on any
number of processes or workers, sees exactly the batches an uninterrupted one would: the step
alone says where to start. Images are flipped at random (`data.random_flip`) and scaled to
[-1, 1].

Every training batch is a dict {'x': float32 [B, ...], 'label': int32 [B]} of global jax.Arrays
sharded on the batch dimension over the mesh axis 'data' (leading [k] axis added when several
train steps run per call). The evaluation readers at the end (`reference_images`,
`held_out_images`) give this host's share of a data set in order, as float32 NumPy chunks.
"""

from __future__ import annotations

import collections
import functools
import os
from typing import Iterator, NamedTuple

from absl import flags
from absl import logging
import grain
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

class StepBatch:
  """Global batch `step` -> this process's block of it: {'x', 'label'} (a grain map).

  Every process computes the same global batch (epoch permutation from (seed, epoch), the
  remainder of an epoch dropped, flips from (seed, epoch, offset)) and reads its contiguous
  block of `batch_size // process_count` rows, so the global batches, and hence the losses, do
  not depend on how many processes, threads or workers share them.
  """

  def __init__(self, examples, batch_size: int, *, seed: int, random_flip: bool,
               process_index: int = 0, process_count: int = 1):
    n = len(examples)
    if n < batch_size:
      raise ValueError(f'the data set has {n} examples, fewer than the global batch of '
                       f'{batch_size}; lower training.batch_size.')
    self.examples, self.batch_size, self.seed = examples, batch_size, seed
    self.random_flip, self.per_epoch = random_flip, n // batch_size
    local = batch_size // process_count
    self.mine = slice(process_index * local, (process_index + 1) * local)

  @functools.lru_cache(maxsize=2)
  def order(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))

  def __call__(self, step: int) -> dict:
    epoch, offset = divmod(int(step), self.per_epoch)
    b = self.batch_size
    idx = self.order(epoch)[offset * b:(offset + 1) * b][self.mine]
    xb, labels = self.examples.read(idx)
    if xb.dtype == np.uint8:
      if self.random_flip:
        flip = np.random.default_rng([self.seed, epoch, offset, 1]).random(b)[self.mine] < 0.5
        xb = np.where(flip[:, None, None, None], xb[:, :, ::-1], xb)
      xb = images.to_model_range(xb)
    return {'x': xb, 'label': labels}


_ENDLESS = 1 << 40  # steps a training iterator can run to


def read_ahead(dataset: grain.MapDataset, config) -> grain.IterDataset:
  """`dataset` read in order, data.num_threads elements at a time (Pillow and NumPy work without
  the GIL; 0: one thread per CPU, at most 8: more contend for the GIL), or by data.num_workers
  worker processes when that is > 0."""
  threads = config.data.num_threads or min(os.cpu_count() or 1, 8)
  it = dataset.to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                                 prefetch_buffer_size=2 * threads))
  if config.data.num_workers > 0:
    if not flags.FLAGS.is_parsed():  # Grain reads its absl flags (from a notebook, a test)
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.data.num_workers,
                                                     per_worker_buffer_size=2))
  return it


def host_batches(config, batch_size: int, *, start_step: int = 0,
                 examples=None) -> Iterator[dict]:
  """Endless host-local training batches of `batch_size` from the configured source (or from
  `examples`, such as a latent run's encoded data), the first being that of train step
  `start_step`."""
  if examples is None:
    examples = sources.open_examples(config, config.data.splits)
  step_batch = StepBatch(examples, batch_size * jax.process_count(),
                         seed=config.training.seed * 1000, random_flip=config.data.random_flip,
                         process_index=jax.process_index(), process_count=jax.process_count())
  steps = grain.MapDataset.range(start_step, start_step + _ENDLESS)
  return iter(read_ahead(steps.map(step_batch), config))


def abstract_batch(config, mesh, shape: tuple | None = None) -> dict:
  """Shapes, dtypes and shardings of one global training batch, as create_iterator yields it
  (examples of `shape`, default the data's: `example_shape`)."""
  k = config.training.steps_per_call
  lead = (k,) if k > 1 else ()
  sharding = parallel.batch_sharding(mesh, leading_axes=len(lead))
  examples = tuple(shape if shape is not None else example_shape(config))
  batch = lead + (config.training.batch_size,)
  return {'x': jax.ShapeDtypeStruct(batch + examples, np.float32, sharding=sharding),
          'label': jax.ShapeDtypeStruct(batch, np.int32, sharding=sharding)}


def device_prefetch(batches: Iterator[dict], size: int) -> Iterator:
  """Keeps `size` batches in flight to the devices ahead of the consumer."""
  queue = collections.deque()
  for batch in batches:
    queue.append(batch)
    if len(queue) > size:
      yield queue.popleft()
  while queue:
    yield queue.popleft()


def create_iterator(config, mesh, *, start_step: int = 0, examples=None) -> Iterator[dict]:
  """Global training batches sharded over `mesh`, resuming at train step `start_step`, from the
  configured source or `examples` (`host_batches`).

  Yields {'x': [B, ...], 'label': [B]}, or [k, B, ...] with k = training.steps_per_call.
  """
  k = config.training.steps_per_call
  local = config.training.batch_size // jax.process_count()
  per_step = host_batches(config, local, start_step=start_step, examples=examples)
  batches = per_step
  if k > 1:  # k consecutive step batches, so the data do not depend on k
    batches = (jax.tree.map(lambda *bs: np.stack(bs), *[next(per_step) for _ in range(k)])
               for _ in iter(int, 1))
  sharding = parallel.batch_sharding(mesh, leading_axes=int(k > 1))
  global_batches = (parallel.host_to_global(b, sharding) for b in batches)
  return device_prefetch(global_batches, config.data.prefetch)


# --- evaluation readers --------------------------------------------------------------------------

def host_share_sizes(count: int) -> tuple[list, int]:
  """How `count` examples split over the processes: [examples of process p], and the padded
  length every process uses, so that they all run the same batches (collectives need it)."""
  p = jax.process_count()
  sizes = [count // p + (i < count % p) for i in range(p)]
  return sizes, max(sizes)


def _padded(x: np.ndarray, length: int) -> np.ndarray:
  return parallel.pad_rows(x, length)


def _read_in_order(config, examples, indices: np.ndarray,
                   chunk: int = 500) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """(uint8 or float examples, labels) of `indices`, in order, in chunks read ahead."""
  starts = list(range(0, len(indices), chunk))
  read = lambda i: examples.read(indices[starts[i]:starts[i] + chunk])
  yield from read_ahead(grain.MapDataset.range(len(starts)).map(read), config)


def _host_indices(count: int, available: int, setting: str, source: str,
                  last: bool = False) -> np.ndarray:
  """This host's share (every process_count-th) of the first (or last) `count` of `available`
  examples; raises, naming `setting`, when there are fewer."""
  if available < count:
    raise ValueError(f'{setting}={count} but the {source} data set has {available} images; set '
                     f'--config.{setting}={available}.')
  first = available - count if last else 0
  return np.arange(first, first + count)[jax.process_index()::jax.process_count()]


def reference_images(config, count: int) -> Iterator[np.ndarray]:
  """This host's share of the first `count` training images, float32 chunks in [-1, 1], padded
  with copies of its last image to `host_share_sizes(count)[1]` images (drop the padding after
  gathering: process p's real rows are its first `sizes[p]`)."""
  _, length = host_share_sizes(count)
  examples = sources.open_examples(config, config.data.splits)
  idx = _host_indices(count, len(examples), 'eval.num_reference', config.data.source)
  chunks = [x for x, _ in _read_in_order(config, examples, idx)]
  chunks[-1] = _padded(chunks[-1], len(chunks[-1]) + length - len(idx))
  for x in chunks:
    yield images.to_model_range(x)


def held_out_images(config, count: int,
                    setting: str = 'eval.bpd_num_examples') -> tuple[np.ndarray, np.ndarray, int]:
  """This host's share of `count` held-out images (float32 in [-1, 1]; 2-D points as they are),
  their int32 labels, and how many are real: both padded to `host_share_sizes(count)[1]` rows.

  TFDS: the first `count` of data.eval_splits. In-memory sources: the last `count` examples
  (trained on as well: these sources have no held-out split). Folder: the first `count` images
  of data.path (trained on as well). `setting` is the field that asked for `count` (named when
  there are fewer).
  """
  source = config.data.source
  _, length = host_share_sizes(count)
  if source == 'folder':
    logging.info('data.source=folder has no held-out split: bits/dim uses the first %d images '
                 'of data.path, which training saw.', count)
  examples = sources.open_examples(config, config.data.eval_splits)
  idx = _host_indices(count, len(examples), setting, source,
                      last=source not in ('tfds', 'folder'))
  chunks = list(_read_in_order(config, examples, idx))
  x = np.concatenate([c[0] for c in chunks])
  x = images.to_model_range(x) if x.dtype == np.uint8 else x.astype(np.float32)  # 2-D points
  labels = np.concatenate([c[1] for c in chunks]).astype(np.int32)
  return _padded(x, length), _padded(labels, length), len(idx)
