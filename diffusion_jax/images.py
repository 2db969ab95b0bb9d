"""Turning model outputs into pictures: uint8 conversion, grids, 2-D scatter plots, PNG files."""

from __future__ import annotations

import math
import os

import numpy as np
from PIL import Image, ImageDraw


def to_uint8(x: np.ndarray) -> np.ndarray:
  """float [..., C] in [-1, 1] -> uint8 in [0, 255] (values outside are clipped)."""
  return np.clip(np.round((np.asarray(x, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def make_grid(images: np.ndarray, ncols: int | None = None, pad: int = 1,
              scale: int = 1) -> np.ndarray:
  """uint8 [N, H, W, C] -> one uint8 image [rows*(H+pad)+pad, cols*(W+pad)+pad, C].

  `scale` enlarges each image by pixel repetition (for tiny images such as 8x8 digits).
  """
  images = np.asarray(images)
  if scale > 1:
    images = images.repeat(scale, axis=1).repeat(scale, axis=2)
  n, h, w, c = images.shape
  ncols = ncols or int(math.ceil(math.sqrt(n)))
  nrows = int(math.ceil(n / ncols))
  grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), 255, np.uint8)
  for i, image in enumerate(images):
    r, col = divmod(i, ncols)
    grid[pad + r * (h + pad):pad + r * (h + pad) + h,
         pad + col * (w + pad):pad + col * (w + pad) + w] = image
  return grid


def scatter(points: np.ndarray, size: int = 512, lim: float | None = None,
            color=(31, 119, 180)) -> np.ndarray:
  """float [N, 2] -> uint8 [size, size, 3], a scatter plot on a white square.

  The square spans [-lim, lim] on both axes (default: the points' largest |coordinate| + 10%).
  """
  points = np.asarray(points, np.float64)
  lim = lim or float(np.max(np.abs(points))) * 1.1 or 1.0
  canvas = Image.new('RGB', (size, size), 'white')
  draw = ImageDraw.Draw(canvas)
  draw.line([(size // 2, 0), (size // 2, size)], fill=(220, 220, 220))
  draw.line([(0, size // 2), (size, size // 2)], fill=(220, 220, 220))
  pix = (points * np.array([1.0, -1.0]) / lim + 1.0) * (size - 1) / 2
  for x, y in pix:
    draw.ellipse([x - 1.2, y - 1.2, x + 1.2, y + 1.2], fill=color)
  return np.asarray(canvas)


def hstack(images, pad: int = 2) -> np.ndarray:
  """A row of equally tall uint8 images [H, W_i, C] with white gaps."""
  h, c = images[0].shape[0], images[0].shape[2]
  gap = np.full((h, pad, c), 255, np.uint8)
  parts = [p for image in images for p in (image, gap)][:-1]
  return np.concatenate(parts, axis=1)


def save_png(image: np.ndarray, path: str) -> None:
  """Writes uint8 [H, W, C] (C = 1 or 3) atomically, so a reader never sees half a file."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  image = np.asarray(image)
  tmp = path + '.tmp'
  Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(tmp, format='PNG')
  os.replace(tmp, path)
