"""Latent diffusion's stage: a diffusion run that works on an autoencoder's latents.

`config.latent.autoencoder` names the autoencoder: an autoencoder run's workdir
(`model.architecture = 'autoencoder'`; its EMA parameters at `latent.autoencoder_step`, -1: the
newest) or a diffusers `AutoencoderKL` folder (config.json and diffusion_pytorch_model.safetensors,
e.g. Stable Diffusion's VAE). The diffusion network then models z = scale * mean(q(z | x)), of shape
`latent_shape(config)`; every network, process, objective and sampler runs on it unchanged, and
`decoder` turns samples back into images.

The training data are encoded once (`prepare`) into `<workdir>/latents/` (`latents.npy`, read
memory-mapped, `labels.npy`, and `meta.json` naming the autoencoder's fingerprint, the data and
the scale): a later start reuses them when both match and encodes again when they do not. The
autoencoder's fingerprint (a SHA-256 of its parameters) is recorded with the run as
`latent.fingerprint`, with the step and scale it resolved to: a run whose autoencoder has gone
or changed stops at start-up, training, sampling and evaluation alike, naming it and the fix,
instead of decoding with other weights.
With data.random_flip each image is encoded as it is and mirrored (a mirrored latent is not the
latent of the mirrored image), and the pipeline draws from both.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Callable, NamedTuple

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import (autoencoding, checkpointing, files, images, parallel, run_config,
                           sources)
from diffusion_jax.models import autoencoder_weights
from diffusion_jax.models.autoencoder import AutoencoderKL

CACHE_DIR = 'latents'
LATENTS_FILE = 'latents.npy'  # float32 [N, h, w, c] (2N with data.random_flip), memory-mapped
LABELS_FILE = 'labels.npy'  # int32 [N] (2N)
META_FILE = 'meta.json'


class Autoencoder(NamedTuple):
  model: AutoencoderKL
  params: dict
  step: int  # the checkpoint of an autoencoder run; -1 for pretrained weights
  scaling_factor: float  # pretrained weights' own (config.json); 0 for a run: computed
  fingerprint: str  # SHA-256 of the parameters


def _is_run(path: str) -> bool:
  return os.path.exists(os.path.join(path, run_config.CONFIG_JSON)) and os.path.isdir(
      checkpointing.checkpoint_dir(path))


def _is_weights(path: str) -> bool:
  """A diffusers AutoencoderKL folder: its config.json (the weights file is needed to load)."""
  return os.path.exists(os.path.join(path, autoencoder_weights.CONFIG_FILE))


def _missing(path: str) -> ValueError:
  return ValueError(
      f'latent.autoencoder={path!r}: no autoencoder there (neither a run\'s workdir with '
      f'config.json and checkpoints/ nor a folder with {autoencoder_weights.CONFIG_FILE} and '
      f'{autoencoder_weights.WEIGHTS_FILE}); train one first (python launch.py '
      '--config=configs/flowers_ae.py --workdir=...) or give the folder it is in.')


def _run_config(path: str):
  """The config of the autoencoder run at `path`, checked to be one."""
  ae_config = run_config.load_config(path)
  if ae_config.model.architecture != 'autoencoder':
    raise ValueError(f'latent.autoencoder={path!r} is a {ae_config.model.architecture} run, '
                     'not an autoencoder run (model.architecture=autoencoder); give the workdir of '
                     'one, or a diffusers AutoencoderKL folder.')
  return ae_config


def model_of(config) -> AutoencoderKL:
  """The autoencoder network that latent.autoencoder names (its shape only: no weights read)."""
  path = config.latent.autoencoder
  if _is_run(path):
    ae_config = _run_config(path)
    if ae_config.data.channels != config.data.channels:
      raise ValueError(f'latent.autoencoder={path!r} was trained on {ae_config.data.channels}-'
                       f'channel images, this run has data.channels={config.data.channels}.')
    return autoencoding.create_model(ae_config)
  if _is_weights(path):
    fields = autoencoder_weights.read_config(path)
    fields.pop('scaling_factor')
    return AutoencoderKL(**fields)
  raise _missing(path)


def latent_shape(config) -> tuple:
  """(h, w, c) of the latents of data.image_size images: the size over the autoencoder's
  downsampling factor, its latent channels."""
  model = model_of(config)
  size, factor = config.data.image_size, model.downsampling
  if size % factor:
    raise ValueError(f'data.image_size={size} is not a multiple of the autoencoder\'s '
                     f'downsampling factor {factor} (latent.autoencoder='
                     f'{config.latent.autoencoder!r}); choose a multiple of {factor}.')
  return (size // factor, size // factor, model.latent_channels)


def fingerprint(params) -> str:
  """SHA-256 of the parameters' names, shapes and float32 bytes."""
  digest = hashlib.sha256()
  for path, leaf in sorted(jax.tree_util.tree_leaves_with_path(params),
                           key=lambda item: jax.tree_util.keystr(item[0])):
    value = np.ascontiguousarray(np.asarray(leaf, np.float32))
    digest.update(f'{jax.tree_util.keystr(path)}{value.shape}'.encode())
    digest.update(value.tobytes())
  return digest.hexdigest()


def _restore_run(path: str, model: AutoencoderKL, step: int) -> tuple[dict, int]:
  """(EMA parameters, step) of the autoencoder run at `path` (step -1: the newest readable)."""
  x = jnp.zeros((1, 8 * model.downsampling, 8 * model.downsampling, model.in_channels))
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x)['params'])
  whole = parallel.replicated(parallel.create_mesh(jax.local_devices()[:1]))
  target = {'step': jax.ShapeDtypeStruct((), jnp.int32, sharding=whole),
            'ema_params': checkpointing.abstract_like(shapes, whole)}
  manager = checkpointing.create_manager(path, read_only=True)
  try:
    fields, found, _ = checkpointing.restore_newest_readable(
        manager, target, None if step < 0 else step, restore_fn=checkpointing.restore_fields)
  except FileNotFoundError as e:
    raise ValueError(f'latent.autoencoder={path!r}: {e}') from e
  finally:
    manager.close()
  return fields['ema_params'], int(found)


def load(config) -> Autoencoder:
  """The autoencoder of latent.autoencoder with its parameters; refuses one that is missing, or
  whose fingerprint differs from latent.fingerprint when the run recorded one."""
  lc = config.latent
  model = model_of(config)
  if _is_run(lc.autoencoder):
    params, step = _restore_run(lc.autoencoder, model, lc.autoencoder_step)
    scaling = 0.0
  else:
    weights = os.path.join(lc.autoencoder, autoencoder_weights.WEIGHTS_FILE)
    if not os.path.exists(weights):
      raise ValueError(f'latent.autoencoder={lc.autoencoder!r} has its config.json but no '
                       f'{autoencoder_weights.WEIGHTS_FILE}: download it there (for Stable '
                       'Diffusion\'s VAE from huggingface.co/stabilityai/sd-vae-ft-mse), or give '
                       'the folder that has it.')
    _, params, scaling = autoencoder_weights.load(lc.autoencoder)
    step = -1
  found = fingerprint(params)
  if lc.fingerprint and found != lc.fingerprint:
    at = f' at step {step}' if step >= 0 else ''
    raise ValueError(
        f'latent.autoencoder={lc.autoencoder!r}{at} is not the autoencoder this run was trained '
        f'on (fingerprint {found[:12]}, the run recorded {lc.fingerprint[:12]}): restore its '
        'weights there, or train a new latent run on this one in a new --workdir.')
  return Autoencoder(model, params, step, scaling, found)


def _data_key(config) -> dict:
  """What the encoded data depend on besides the autoencoder."""
  dc = config.data
  key = {name: dc[name] for name in ('source', 'name', 'splits', 'path', 'image_size',
                                     'channels', 'random_flip')}
  if dc.path and os.path.isfile(dc.path):
    stat = os.stat(dc.path)
    key['file'] = [stat.st_size, stat.st_mtime_ns]
  return key


def _cache_paths(workdir: str) -> tuple[str, str, str]:
  """(latents.npy, labels.npy, meta.json) of the run's encoded data."""
  folder = os.path.join(workdir, CACHE_DIR)
  return tuple(os.path.join(folder, name) for name in (LATENTS_FILE, LABELS_FILE, META_FILE))


def _read_meta(path: str) -> dict | None:
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def make_encode_fn(ae: Autoencoder, mesh) -> Callable:
  """encode(images float32 [n, H, W, C] in [-1, 1]) -> the latents' means [n, h, w, c], in
  batches split over `mesh`'s devices."""
  sharding = parallel.batch_sharding(mesh)
  mean = jax.jit(lambda p, x: ae.model.apply({'params': p}, x, method=AutoencoderKL.encode)[0],
                 in_shardings=(parallel.replicated(mesh), sharding))
  params = jax.device_put(ae.params, parallel.replicated(mesh))

  def encode(x: np.ndarray) -> np.ndarray:
    n = len(x)
    return np.asarray(mean(params, parallel.pad_rows(x, parallel.round_up(n, mesh.size))))[:n]

  return encode


class Latents:
  """The encoded training data as random-access examples (`sources`' interface): rows of the
  memory-mapped latent means times the scale, and their labels."""

  def __init__(self, z: np.ndarray, labels: np.ndarray, scale: float):
    self.z, self.labels, self.scale = z, labels, np.float32(scale)

  def __len__(self) -> int:
    return len(self.z)

  def read(self, indices) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(self.z[indices], np.float32) * self.scale, self.labels[indices]


def encode_data(config, ae: Autoencoder, out: str | None = None,
                batch_size: int = 64) -> tuple[np.ndarray, np.ndarray, float]:
  """(latent means float32 [N, h, w, c], labels int32 [N], their standard deviation) of every
  training image of the configured data, encoded on this host's devices; with
  data.random_flip the N mirrored images follow as rows N..2N-1. With `out` (a .npy path) the
  means are written there as they are made (memory-mapped: data sets larger than memory)."""
  examples = sources.open_examples(config, config.data.splits)
  encode = make_encode_fn(ae, parallel.create_mesh(jax.local_devices()))
  n, copies = len(examples), 2 if config.data.random_flip else 1
  shape = (copies * n,) + latent_shape(config)
  z = (np.lib.format.open_memmap(out, 'w+', np.float32, shape) if out else
       np.empty(shape, np.float32))
  labels = np.empty(copies * n, np.int32)
  total, squares = 0.0, 0.0
  for start in range(0, n, batch_size):
    rows = np.arange(start, min(start + batch_size, n))
    x, y = examples.read(rows)
    labels[rows] = 0 if y is None else np.asarray(y, np.int32)
    for copy in range(copies):
      means = encode(images.to_model_range(x[:, :, ::-1] if copy else x))
      z[copy * n + rows] = means
      total, squares = total + means.sum(dtype=np.float64), squares + np.square(
          means, dtype=np.float64).sum()
  if copies == 2:
    labels[n:] = labels[:n]
  count = z.size
  std = float(np.sqrt(max(squares / count - (total / count) ** 2, 0.0)))
  if out:
    z.flush()
  return z, labels, std


def prepare(config, workdir: str, *, trained: bool):
  """Training's start: (config with latent.autoencoder_step, .scale and .fingerprint resolved,
  the training examples: `Latents`).

  Reuses `<workdir>/latents/` when its autoencoder and data match; encodes and writes it
  otherwise (meta.json last, so a cut-short encoding is never reused). Refuses, naming both
  fingerprints, when the run has checkpoints (`trained`) and its autoencoder differs from the
  one they were trained on.
  """
  lc = config.latent
  ae = load(config)
  z_path, labels_path, meta_path = _cache_paths(workdir)
  meta = _read_meta(meta_path)
  if meta is not None and meta['fingerprint'] != ae.fingerprint and trained:
    raise ValueError(
        f'latent.autoencoder={lc.autoencoder!r} (step {ae.step}) is not the autoencoder this '
        f'run\'s checkpoints were trained on (fingerprint {ae.fingerprint[:12]}, they were on '
        f'{meta["fingerprint"][:12]} at step {meta["step"]}): set '
        f'--config.latent.autoencoder_step={meta["step"]}, or train into a new --workdir.')
  if (meta is not None and meta['fingerprint'] == ae.fingerprint
      and meta['data'] == json.loads(json.dumps(_data_key(config)))
      and os.path.exists(z_path) and os.path.exists(labels_path)):
    z, labels = np.load(z_path, mmap_mode='r'), np.load(labels_path)
    logging.info('Latents of %d images read from %s.', len(z), z_path)
  else:
    if meta is not None:
      logging.info('The latents in %s are of another autoencoder or data: encoding again.',
                   os.path.dirname(z_path))
    writer = jax.process_index() == 0
    if writer:
      os.makedirs(os.path.dirname(z_path), exist_ok=True)
      if os.path.exists(meta_path):  # first: a cut-short encoding must not look complete
        os.remove(meta_path)
    start = time.perf_counter()
    z, labels, std = encode_data(config, ae, z_path if writer else None)
    seconds = time.perf_counter() - start
    meta = {'fingerprint': ae.fingerprint, 'step': ae.step, 'data': _data_key(config),
            'scale': float(ae.scaling_factor or 1.0 / std), 'count': int(len(z)),
            'shape': list(z.shape[1:]), 'encode_seconds': seconds}
    if writer:
      np.save(labels_path, labels)
      files.write_json(meta_path, meta)
    logging.info('Encoded %d images (%s) into latents %s in %.1f s (std %.4g); kept in %s.',
                 len(z) // (2 if config.data.random_flip else 1),
                 'and mirrored' if config.data.random_flip else 'as they are',
                 tuple(z.shape[1:]), seconds, std, z_path)
  resolved = config.copy_and_resolve_references()
  resolved.latent.autoencoder_step = ae.step
  resolved.latent.scale = float(lc.scale or meta['scale'])
  resolved.latent.fingerprint = ae.fingerprint
  return resolved, Latents(z, labels, resolved.latent.scale)


def decoder(config) -> tuple[Callable, dict]:
  """(decode(params, z) -> images float32 [B, H, W, C], the autoencoder's parameters) for the
  run's scaled latents z [B, h, w, c] (divided by latent.scale before decoding)."""
  ae = load(config)
  scale = config.latent.scale
  if not scale:
    raise ValueError('latent.scale is 0: this run never trained (training records the scale '
                     'it computes); train it first, or set --config.latent.scale.')

  def decode(params, z):
    return ae.model.apply({'params': params}, z / scale, method=AutoencoderKL.decode)

  return decode, ae.params
