"""Pixels and pictures: uint8 <-> the model's [-1, 1], grids, 2-D scatter plots, PNG files,
and the pictures of samples (`picture`, `trajectory_strip`) that previews, `--mode=sample` and the
figures show."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from diffusion_jax import files


def to_uint8(x: np.ndarray) -> np.ndarray:
  """float [..., C] in [-1, 1] -> uint8 in [0, 255] (values outside are clipped)."""
  return np.clip(np.round((np.asarray(x, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def to_model_range(images: np.ndarray) -> np.ndarray:
  """uint8 [..., C] in [0, 255] -> float32 in [-1, 1]."""
  return images.astype(np.float32) / 127.5 - 1.0


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
  image = np.asarray(image)
  pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
  files.write_atomically(path, lambda tmp: pil.save(tmp, format='PNG'))


# --- pictures of samples -------------------------------------------------------------------------

def picture(config, x: np.ndarray, ncols: int | None = None) -> np.ndarray:
  """uint8 [H, W, C]: a scatter plot of points, or a grid of images (small ones enlarged).

  x: float32 samples [n, ...] as the generator returns them (points [n, 2], or images in [-1, 1]).
  ncols: images per row of the grid (default: a square grid).
  """
  if config.data.source == 'toy2d':
    return scatter(x)
  scale = max(1, 64 // config.data.image_size)
  return make_grid(to_uint8(x), ncols=ncols, scale=scale, pad=max(1, scale // 2))


def trajectory_strip(config, traj: np.ndarray, num_frames: int = 10) -> np.ndarray:
  """uint8 strip of `num_frames` evenly spaced steps from x_T to x_0, one row per sample.

  traj: float32 [S + 1, n, ...].
  """
  idx = np.unique(np.linspace(0, traj.shape[0] - 1, num_frames).round().astype(int))
  if config.data.source == 'toy2d':
    return hstack([scatter(traj[i], size=256, lim=4.0) for i in idx])
  frames = to_uint8(traj[idx])  # [F, n, H, W, C]
  f, n = frames.shape[:2]
  rows = frames.transpose(1, 0, 2, 3, 4).reshape((n * f,) + frames.shape[2:])
  return make_grid(rows, ncols=f, scale=max(1, 64 // config.data.image_size))
