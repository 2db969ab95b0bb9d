""".npz files of images: their arrays' layout read from the headers (nothing decoded), and the
arrays themselves, with errors that name data.path and the fix."""

from __future__ import annotations

import os
import zipfile
import zlib
from typing import Optional

import numpy as np


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
