"""Where examples come from: each `data.source`, read into uint8 images (or 2-D points).

  tfds    a TFDS data set by name (`tfds_builder`; needs TensorFlow)
  folder  a folder of images, flat or with one subfolder per class (`folder_files`)
  npz     an .npz with `images` uint8 [N, H, W, C] and optional `labels` [N]
  digits  scikit-learn's 8x8 digits (offline), uint8 = value * 255 / 16
  toy2d   scikit-learn's 2-D generators in their own coordinates (DESIGN.md)
Images are center-cropped to a square and resized with antialiasing to `data.image_size`, the
same way by NumPy/PIL (`center_crop_resize`) and by tf.data (`tf_center_crop_resize`).
`input_pipeline` turns these into batches.
"""

from __future__ import annotations

import concurrent.futures
import os
import socket
import zipfile
import zlib
from typing import Optional

from absl import logging

import numpy as np
from PIL import Image

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


def _unreadable_npz(path: str, error: Exception) -> ValueError:
  return ValueError(f'data.path={path!r} cannot be read as an .npz ({type(error).__name__}: '
                    f'{error}); is the file complete? Copy it again, or point '
                    '--config.data.path at another.')


def npz_layout(path: str) -> dict:
  """{array name: (shape, dtype)} of an .npz, read from the arrays' headers (nothing decoded);
  raises, naming data.path and the fix, when the file is missing or cannot be read, or when its
  `images` and `labels` disagree: not one uint8 [N, H, W, C] array (images of mixed sizes are
  stored as an object array), or a label count other than N."""
  if not path or not os.path.exists(path):
    raise FileNotFoundError(f'data.path={path!r} does not exist; point --config.data.path at an '
                            '.npz holding `images` (uint8 [N, H, W, C]).')
  layout = {}
  try:
    with zipfile.ZipFile(path) as z:
      for member in z.namelist():
        if member.endswith('.npy'):
          with z.open(member) as fp:
            version = np.lib.format.read_magic(fp)
            read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                    else np.lib.format.read_array_header_2_0)
            shape, _, dtype = read(fp)
          layout[member[:-len('.npy')]] = (tuple(shape), np.dtype(dtype))
  except (zipfile.BadZipFile, EOFError, OSError, ValueError, zlib.error) as e:
    raise _unreadable_npz(path, e) from None
  if 'images' not in layout:
    raise ValueError(f'data.path={path!r} has no `images` array (keys: {sorted(layout)}).')
  shape, dtype = layout['images']
  if dtype == object:
    raise ValueError(f'data.path={path!r}: `images` is an array of {shape[0] if shape else 0} '
                     'separate images (of mixed sizes, or stored as a list); store one uint8 '
                     '[N, H, W, C] array of equal-sized images (resize them first, e.g. to '
                     'data.image_size), or use data.source=folder.')
  if dtype != np.uint8 or len(shape) != 4:
    raise ValueError(f'data.path={path!r}: `images` must be uint8 [N, H, W, C], '
                     f'got {dtype} {shape}.')
  if 'labels' in layout:
    label_shape = layout['labels'][0]
    if label_shape != shape[:1]:
      raise ValueError(f'data.path={path!r}: `labels` has shape {label_shape} but `images` holds '
                       f'{shape[0]} images; an .npz needs one label per image ([N]). Write the '
                       'two together again, or drop `labels` to train unconditionally.')
  return layout


def load_npz(path: str) -> tuple[np.ndarray, Optional[np.ndarray]]:
  """`images` uint8 [N, H, W, C] and `labels` int32 [N] (None when absent) of an .npz (checked
  with `npz_layout` first)."""
  npz_layout(path)
  try:
    with np.load(path) as f:
      images = f['images']
      labels = f['labels'].astype(np.int32) if 'labels' in f else None
  except (zipfile.BadZipFile, EOFError, OSError, zlib.error) as e:
    raise _unreadable_npz(path, e) from None
  return images, labels


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


def import_tensorflow():
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


def tf_center_crop_resize(tf, image, size: int):
  """uint8 [H, W, C] -> uint8 [size, size, C], the same crop and resize as the NumPy path."""
  shape = tf.shape(image)
  s = tf.minimum(shape[0], shape[1])
  image = tf.image.crop_to_bounding_box(image, (shape[0] - s) // 2, (shape[1] - s) // 2, s, s)
  image = tf.image.resize(image, (size, size), method='bilinear', antialias=True)
  return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)


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


def readable_images(tf, files: list, labels: list, channels: int) -> tuple[list, list]:
  """The (files, labels) whose images TensorFlow decodes; each one it cannot is named in a
  warning and skipped, so one bad file does not stop training midway without its name."""
  ds = tf.data.Dataset.from_tensor_slices(files).map(
      lambda f: tf.shape(tf.io.decode_image(tf.io.read_file(f), channels=channels,
                                            expand_animations=False))[0],
      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  it, bad = iter(ds), []
  for name in files:
    try:
      next(it)
    except tf.errors.OpError as e:
      bad.append(name)
      logging.warning('Skipping %s: it cannot be decoded (%s).', name,
                      (e.message or str(e)).strip().splitlines()[-1][:160])
  if bad:
    logging.warning('Skipped %d of %d images that cannot be decoded (data.path).', len(bad),
                    len(files))
  if len(bad) == len(files):
    raise ValueError(f'none of the {len(files)} images in data.path can be decoded.')
  keep = set(bad)
  return ([f for f in files if f not in keep], [l for f, l in zip(files, labels) if f not in keep])


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
  (their headers; its labels when used), a folder's layout, a TFDS data set's features. Raises one line naming data.path /
  data.name and what disagrees, before a run writes anything."""
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
