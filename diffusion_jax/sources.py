"""Where examples come from: each `data.source`, read into uint8 images (or 2-D points).

  tfds    a prepared TFDS data set by name, read at random through `tfds.data_source`
          (ArrayRecord files; no TensorFlow needed to read, only to prepare: `.[tfds]`)
  folder  a folder of images, flat or with one subfolder per class (`folder_files`), decoded
          with Pillow
  npz     an .npz with `images` uint8 [N, H, W, C] and optional `labels` [N]
  digits  scikit-learn's 8x8 digits (offline), uint8 = value * 255 / 16
  toy2d   scikit-learn's 2-D generators in their own coordinates (DESIGN.md)

`open_examples(config, splits)` gives any of them as random-access `Examples`: a length and
`read(indices)` -> (uint8 [n, S, S, C] or float32 points [n, 2], int32 labels [n]). Images are
center-cropped to a square and resized with antialiasing to `data.image_size`
(`center_crop_resize`). `input_pipeline` turns these into batches.
"""

from __future__ import annotations

import concurrent.futures
import os
import socket
from typing import Optional

from absl import logging

import numpy as np
from PIL import Image

from diffusion_jax.npz_files import load_npz, npz_layout  # pylint: disable=unused-import  (sources.load_npz)

SOURCES = ('tfds', 'folder', 'npz', 'digits', 'toy2d')
TOY_DATASETS = ('swiss_roll', 'moons', 's_curve')
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif')


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


def _check_channels(config, found: int) -> None:
  if found != config.data.channels:
    raise ValueError(f'data.channels={config.data.channels} but the {config.data.source} images '
                     f'have {found}; set --config.data.channels={found}.')


def load_in_memory(config) -> tuple[np.ndarray, Optional[np.ndarray]]:
  """All examples of an in-memory source, preprocessed but for flips and scaling.

  Returns uint8 images [N, S, S, C] (or float32 points [N, 2]) and int32 labels [N] or None.
  """
  source = config.data.source
  if source == 'toy2d':
    return toy_points(config.data.name, config.data.num_points, config.training.seed), None
  images, labels = digits_images() if source == 'digits' else load_npz(config.data.path)
  _check_channels(config, images.shape[-1])
  size = config.data.image_size
  if images.shape[1:3] != (size, size):
    images = np.stack([center_crop_resize(im, size) for im in images])
  return images, labels


# --- sources read on demand ---------------------------------------------------------------------

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


TFDS_EXTRA = 'pip install -e ".[tfds]"'  # TensorFlow, which TFDS needs to prepare a data set


def tfds_builder(config):
  """The TFDS builder, prepared; fails at once, with the fix, when it cannot be."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  name = config.data.name
  builder = tfds.builder(name, data_dir=config.data.data_dir or None)
  if not builder.is_prepared():
    fix = (f'Prepare it on a machine with network access ({TFDS_EXTRA}, then python -c "import '
           f"tensorflow_datasets as tfds; tfds.builder('{name}').download_and_prepare("
           f"file_format='array_record')\"), copy ~/tensorflow_datasets here and set "
           '--config.data.data_dir, or train from a folder or .npz '
           '(--config.data.source=folder|npz --config.data.path=...).')
    if not config.data.download:
      raise RuntimeError(f'TFDS data set {name!r} is not in {builder.data_dir!r} and '
                         f'data.download=False. {fix}')
    if not _network_reachable():
      raise RuntimeError(f'TFDS data set {name!r} is not in {builder.data_dir!r} and this '
                         f'machine cannot reach the download servers. {fix}')
    try:
      builder.download_and_prepare(file_format='array_record')
    except ImportError as e:  # TFDS imports TensorFlow to download and convert
      raise RuntimeError(f'TFDS data set {name!r} is not in {builder.data_dir!r}, and preparing '
                         f'it needs TensorFlow ({e}): {TFDS_EXTRA} (reading a prepared data set '
                         f'does not). {fix}') from None
  return builder


def decode_image(path: str, channels: int) -> np.ndarray:
  """uint8 [H, W, channels] of an image file (Pillow; grey, RGB or RGBA as asked)."""
  with Image.open(path) as image:
    image = image.convert({1: 'L', 3: 'RGB', 4: 'RGBA'}[channels])
    x = np.asarray(image)
  return x[..., None] if channels == 1 else x


class InMemory:
  """Examples held as arrays (npz, digits, toy2d): uint8 images or float32 points."""

  def __init__(self, x: np.ndarray, labels: Optional[np.ndarray]):
    self.x = x
    self.labels = np.zeros(len(x), np.int32) if labels is None else labels

  def __len__(self) -> int:
    return len(self.x)

  def read(self, indices) -> tuple[np.ndarray, np.ndarray]:
    return self.x[indices], self.labels[indices]


class Folder:
  """Image files decoded with Pillow and center-cropped and resized at each read."""

  def __init__(self, files: list, labels: list, size: int, channels: int):
    self.files, self.labels = files, np.asarray(labels, np.int32)
    self.size, self.channels = size, channels

  def __len__(self) -> int:
    return len(self.files)

  def read(self, indices) -> tuple[np.ndarray, np.ndarray]:
    x = np.stack([center_crop_resize(decode_image(self.files[i], self.channels), self.size)
                  for i in indices])
    return x, self.labels[indices]


class Tfds:
  """A TFDS split expression read at random through `tfds.data_source` (ArrayRecord)."""

  def __init__(self, config, splits: str):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    builder = tfds_builder(config)
    check_tfds_features(config, builder.info.features)
    try:
      self.source = tfds.data_source(config.data.name, split=splits,
                                     data_dir=config.data.data_dir or None, download=False)
    except (NotImplementedError, ValueError) as e:
      raise RuntimeError(
          f'TFDS data set {config.data.name!r} in {builder.data_dir!r} cannot be read at random '
          f'({str(e).splitlines()[0][:160]}); it must be prepared as ArrayRecord files: '
          f'{TFDS_EXTRA}, then tfds.builder({config.data.name!r}).download_and_prepare('
          "file_format='array_record') with another data_dir.") from None
    self.has_labels = 'label' in builder.info.features
    self.size, self.channels = config.data.image_size, config.data.channels

  def __len__(self) -> int:
    return len(self.source)

  def read(self, indices) -> tuple[np.ndarray, np.ndarray]:
    records = [self.source[int(i)] for i in indices]
    x = np.stack([center_crop_resize(np.asarray(r['image']), self.size) for r in records])
    labels = np.asarray([r['label'] if self.has_labels else 0 for r in records], np.int32)
    return x, labels


def readable_files(files: list, labels: list, channels: int) -> tuple[list, list]:
  """The (files, labels) whose images Pillow decodes; each one it cannot is named in a warning
  and skipped, so one bad file does not stop training midway without its name."""
  def decodes(name):
    try:
      decode_image(name, channels)
      return None
    except (OSError, ValueError, SyntaxError) as e:  # what Pillow raises for a broken file
      return f'{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ""}'
  with concurrent.futures.ThreadPoolExecutor(8) as pool:  # Pillow decodes without the GIL
    problems = list(pool.map(decodes, files))
  bad = [(name, why) for name, why in zip(files, problems) if why]
  for name, why in bad:
    logging.warning('Skipping %s: it cannot be decoded (%s).', name, why)
  if bad:
    logging.warning('Skipped %d of %d images that cannot be decoded (data.path).', len(bad),
                    len(files))
  if len(bad) == len(files):
    raise ValueError(f'none of the {len(files)} images in data.path can be decoded.')
  return ([f for f, why in zip(files, problems) if not why],
          [l for l, why in zip(labels, problems) if not why])


def open_examples(config, splits: str = ''):
  """The configured source as random-access examples (`InMemory`, `Folder` or `Tfds`);
  `splits` is the TFDS split expression (the other sources have one set of examples)."""
  data = config.data
  if data.source not in SOURCES:
    raise ValueError(f'data.source={data.source!r} is unknown; choose one of {SOURCES}.')
  if data.source == 'tfds':
    return Tfds(config, splits or data.splits)
  if data.source == 'folder':
    files, labels, found = folder_files(data.path)
    num_classes = data.num_classes if data.class_conditional else 0
    if num_classes and found > num_classes:
      raise ValueError(f'data.path={data.path!r} has {found} class subfolders, more than '
                       f'data.num_classes={num_classes}; set --config.data.num_classes={found} '
                       '(or 0 to count them).')
    if data.check_images:
      files, labels = readable_files(files, labels, data.channels)
    return Folder(files, labels, data.image_size, data.channels)
  x, labels = load_in_memory(config)
  if data.class_conditional:
    check_labels(labels, data.num_classes or num_classes_of(config),
                 f'data.source={data.source}' + (f' ({data.path})' if data.source == 'npz'
                                                 else ''))
  return InMemory(x, labels)


def check_labels(labels: Optional[np.ndarray], num_classes: int, where: str) -> None:
  """Raises, naming `where` and the fix, unless every label lies in [0, num_classes): a label
  of num_classes would silently be the guidance "null" class, a larger one reads past the
  label embedding."""
  if labels is None:
    raise ValueError(f'data.class_conditional=True but {where} has no labels; train without '
                     '--config.data.class_conditional, or add labels.')
  lo, hi = int(np.min(labels)), int(np.max(labels))
  if lo < 0 or hi >= num_classes:
    raise ValueError(f'{where} has labels in [{lo}, {hi}], outside [0, data.num_classes='
                     f'{num_classes}); set --config.data.num_classes={max(hi + 1, 1)} (or 0 to '
                     'read it from the data), or relabel them 0 .. num_classes - 1.')


def num_classes_of(config) -> int:
  """The label count of the configured source: digits 10, an .npz's largest label + 1, a
  folder's subfolders, TFDS's metadata."""
  data = config.data
  if data.source == 'digits':
    return 10
  if data.source == 'npz':
    labels = load_npz(data.path)[1]
    return 0 if labels is None else int(labels.max()) + 1
  if data.source == 'folder':
    return folder_files(data.path)[2]
  if data.source == 'tfds':
    features = tfds_builder(config).info.features
    return int(features['label'].num_classes) if 'label' in features else 0
  return 0


def folder_files(path: str) -> tuple[list, list, int]:
  """(image files, their labels, class count) of a folder: flat (label 0, no classes), or one
  subfolder per class (labels by sorted subfolder name). Hidden entries are ignored; images
  beside class subfolders would have no class, and are refused by name."""
  if not path or not os.path.isdir(path):
    raise FileNotFoundError(f'data.path={path!r} is not a folder of images; point '
                            '--config.data.path at one (flat, or one subfolder per class).')
  entries = sorted(n for n in os.listdir(path) if not n.startswith('.'))
  classes = [d for d in entries if os.path.isdir(os.path.join(path, d))]
  loose = [n for n in entries if n.lower().endswith(IMAGE_EXTENSIONS)
           and os.path.isfile(os.path.join(path, n))]
  if classes and loose:
    raise ValueError(f'data.path={path!r} has {len(classes)} class subfolders and also '
                     f'{len(loose)} images outside them (e.g. {loose[0]!r}), which would have no '
                     'class; move those into a subfolder, or keep only the images (a flat '
                     'folder) for unconditional training.')
  files, labels = [], []
  for label, folder in enumerate(classes or ['']):
    root = os.path.join(path, folder)
    for name in sorted(os.listdir(root)):
      if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith('.'):
        files.append(os.path.join(root, name))
        labels.append(label)
  if not files:
    raise FileNotFoundError(f'data.path={path!r} holds no images ({IMAGE_EXTENSIONS}).')
  return files, labels, len(classes)


def check_tfds_features(config, features) -> None:
  """A TFDS data set's features against the config: an `image` feature with data.channels
  channels, and when data.class_conditional a `label` feature of at most data.num_classes."""
  name = config.data.name
  if 'image' not in features:
    raise ValueError(f'data.name={name!r} has no `image` feature (it has {sorted(features)}); '
                     'choose an image data set, or convert it to a folder or .npz '
                     '(--config.data.source=folder|npz).')
  image = features['image']
  stored = image.shape[-1] if image.shape else None
  if stored is not None and stored != config.data.channels:
    raise ValueError(f'data.channels={config.data.channels} but TFDS {name!r} stores {stored}; '
                     f'set --config.data.channels={stored}.')
  if config.data.class_conditional:
    if 'label' not in features:
      raise ValueError(f'data.class_conditional=True but data.name={name!r} has no `label` '
                       f'feature (it has {sorted(features)}); train without '
                       '--config.data.class_conditional.')
    count = int(features['label'].num_classes)
    if config.data.num_classes and count > config.data.num_classes:  # 0: read from here
      raise ValueError(f'TFDS {name!r} has {count} labels, more than data.num_classes='
                       f'{config.data.num_classes}; set --config.data.num_classes={count} (or 0 '
                       'to read it).')


def check(config) -> None:
  """The start-up check of the configured data, without decoding images: an .npz's arrays
  (their headers; its labels when used), a folder's layout, a TFDS data set's features. Raises
  one line naming data.path / data.name and what disagrees, before a run writes anything."""
  data = config.data
  if data.source == 'npz':
    images = npz_layout(data.path)['images'][0]
    _check_channels(config, images[-1])
    if data.class_conditional:
      with np.load(data.path) as f:
        labels = f['labels'] if 'labels' in f else None
      check_labels(labels, data.num_classes or (int(labels.max()) + 1 if labels is not None
                                                else 0), f'data.source=npz ({data.path})')
  elif data.source == 'folder':
    folder_files(data.path)
  elif data.source == 'tfds':
    check_tfds_features(config, tfds_builder(config).info.features)
