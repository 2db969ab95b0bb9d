"""What editing a trained model starts from: input images, inpainting masks, the noised start of
image-to-image.

Training-free editing runs on the one scan of `samplers.run_reverse`: inpainting imposes the
known pixels after every row (`for_inpainting`, with RePaint's resampling rows), and
image-to-image (SDEdit, Meng et al. 2022) starts part-way down a sampler's grid
(`timesteps.started`) from the image noised to that level (`noised`). This module holds the
inpainting table (`for_inpainting`: a sampler's table with the blend's and RePaint's columns)
and reads the inputs: images (a PNG, a folder of images, or an .npz with `images`), masks (a
file, or a named shape).

Masks follow diffusers' convention: 1 (white) marks the pixels to fill in, 0 (black) the pixels
kept. The samplers receive `keep` = 1 - mask.
"""

from __future__ import annotations

import math
import os

import numpy as np

from diffusion_jax import npz_files, processes, sources

SHAPES = ('center', 'left', 'right', 'top', 'bottom', 'random_boxes')


def load_images(path: str, size: int, channels: int, setting: str) -> np.ndarray:
  """uint8 [N, size, size, channels] of a PNG/JPEG file, a folder of them (sorted by name), or
  an .npz with `images`; each centre-cropped and resized to `size`. `setting` names the config
  field in errors."""
  if not path:
    raise ValueError(f'{setting} is empty; give a PNG, a folder of images or an .npz.')
  if path.endswith('.npz'):
    found, _ = npz_files.load_npz(path)
    if found.shape[-1] != channels:
      raise ValueError(f'{setting}={path!r} has {found.shape[-1]} channels; the run has '
                       f'{channels} (data.channels).')
    images = list(found)
  elif os.path.isdir(path):
    names, _, _ = sources.folder_files(path)
    images = [sources.decode_image(n, channels) for n in names]
  elif os.path.isfile(path):
    images = [sources.decode_image(path, channels)]
  else:
    raise FileNotFoundError(f'{setting}={path!r} is not a file or folder; give a PNG, a folder '
                            'of images or an .npz with `images`.')
  return np.stack([sources.center_crop_resize(np.asarray(x, np.uint8), size) for x in images])


def named_mask(shape: str, n: int, size: int, seed: int = 0) -> np.ndarray:
  """float32 [n, size, size, 1], 1 where pixels are filled in: `center` the middle half of each
  side (the centre 4x4 of 8x8), `left` / `right` / `top` / `bottom` that half of the image,
  `random_boxes` 1 to 3 boxes of a quarter to a half of each side (drawn per image from seed)."""
  mask = np.zeros((n, size, size, 1), np.float32)
  half, quarter = size // 2, size // 4
  if shape == 'center':
    mask[:, quarter:quarter + half, quarter:quarter + half] = 1.0
  elif shape == 'left':
    mask[:, :, :half] = 1.0
  elif shape == 'right':
    mask[:, :, size - half:] = 1.0
  elif shape == 'top':
    mask[:, :half] = 1.0
  elif shape == 'bottom':
    mask[:, size - half:] = 1.0
  elif shape == 'random_boxes':
    rng = np.random.default_rng(seed)
    for m in mask:
      for _ in range(rng.integers(1, 4)):
        h, w = rng.integers(max(1, quarter), max(2, half) + 1, size=2)
        top, left = rng.integers(0, size - h + 1), rng.integers(0, size - w + 1)
        m[top:top + h, left:left + w] = 1.0
  else:
    raise ValueError(f'sampling.inpaint_mask={shape!r} is not a file or a named shape; give a '
                     f'PNG or .npz mask (white: fill in) or one of {SHAPES}.')
  return mask


def load_mask(spec: str, n: int, size: int, seed: int = 0) -> np.ndarray:
  """float32 [n, size, size, 1], 1 where pixels are filled in: a named shape (`named_mask`), or
  a PNG / .npz (`images`, any channels: a pixel is filled in where its first channel is over
  half) used for every image, or one per image when it holds n."""
  if spec in SHAPES or not os.path.exists(spec):
    return named_mask(spec, n, size, seed)  # an unknown name is refused there
  grey = load_images(spec, size, 1, 'sampling.inpaint_mask') if not spec.endswith('.npz') else (
      _npz_first_channel(spec, size))
  mask = (grey >= 128).astype(np.float32)
  if len(mask) not in (1, n):
    raise ValueError(f'sampling.inpaint_mask={spec!r} holds {len(mask)} masks for {n} images; '
                     'give one, or one per image.')
  return np.broadcast_to(mask, (n,) + mask.shape[1:]).copy()


def _npz_first_channel(path: str, size: int) -> np.ndarray:
  found, _ = npz_files.load_npz(path)
  return np.stack([sources.center_crop_resize(np.asarray(x[..., :1], np.uint8), size)
                   for x in found])


def levels(steps, process) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The rates of x along a table: (alpha, sigma) [S + 1] before each row (at the time of its
  network call, where every row's x lies, EDM's raised levels included) and after the last
  (alpha 1, sigma 0), and the times [S + 1] (the last 0)."""
  process = processes.as_process(process)
  alpha, sigma = process.alpha_sigma(np.asarray(steps.t, np.float64))
  return (np.append(alpha, 1.0), np.append(sigma, 0.0), np.append(steps.t, 0.0))


def for_inpainting(steps, process, jump: int = 0, repeats: int = 1):
  """A sampler's table (`step_tables.ReverseSteps`) with the columns inpainting reads: after
  each row the known pixels are set to the image noised to that row's output level (Song et
  al. 2021, "replacement"). With jump j > 0 and repeats r > 1, RePaint's resampling (Lugmayr
  et al. 2022): the rows run in segments of j, each segment r times, and between two runs x is
  noised forward from the segment's end level back to its start,
  x' = (a / a_end) x + sqrt(s^2 - (a / a_end)^2 s_end^2) z, so that the known and the
  generated pixels are harmonised; a table of S rows then makes r S network calls.

  Resampling repeats rows out of order, which only tables without a history or a corrector
  allow (ddpm, ddim, euler, euler_maruyama, dpm_solver++ of order 1)."""
  alpha, sigma, _ = levels(steps, process)
  s = steps.num_calls
  if jump < 0 or repeats < 1:
    raise ValueError(f'sampling.inpaint_resample=({jump}, {repeats}) must be (jump >= 0, '
                     'repeats >= 1); (0, 1) for none.')
  resample = jump > 0 and repeats > 1
  if resample and (steps.coef_x0.shape[1] > 1 and np.any(steps.coef_x0[:, 1:] != 0)
                   or np.any(steps.corr_x != 1) or np.any(steps.corr_prev != 0)
                   or np.any(steps.corr_d != 0)):
    raise ValueError('sampling.inpaint_resample repeats steps out of order, which a sampler '
                     'with a history or a corrector (dpm_solver++ of order > 1, unipc, heun, edm) '
                     'cannot; use ddpm, ddim, euler, euler_maruyama or dpm_solver++ with '
                     'sampling.solver_order=1, or sampling.inpaint_resample=(0, 1).')
  order, scale, noise = [], [], []
  for start in range(0, s, jump if resample else s):
    segment = list(range(start, min(start + (jump if resample else s), s)))
    for run in range(repeats if resample else 1):
      order += segment
      scale += [1.0] * (len(segment) - 1)
      noise += [0.0] * (len(segment) - 1)
      end = segment[-1] + 1
      if run < (repeats if resample else 1) - 1:  # back up to the segment's start
        up = alpha[start] / alpha[end]
        scale.append(up)
        noise.append(math.sqrt(max(sigma[start] ** 2 - (up * sigma[end]) ** 2, 0.0)))
      else:
        scale.append(1.0)
        noise.append(0.0)
  order = np.asarray(order)
  return steps._replace(
      t=steps.t[order], corr_x=steps.corr_x[order], corr_prev=steps.corr_prev[order],
      corr_d=steps.corr_d[order], coef_xt=steps.coef_xt[order], coef_x0=steps.coef_x0[order],
      sigma=steps.sigma[order], alpha_next=alpha[order + 1], sigma_next=sigma[order + 1],
      renoise_scale=np.asarray(scale), renoise_sigma=np.asarray(noise))


def noised(process: processes.Process, t: float, image: np.ndarray, z: np.ndarray):
  """alpha(t) image + sigma(t) z: the start of image-to-image at time t (any array type)."""
  alpha, sigma = process.alpha_sigma(np.float64(t))
  return float(alpha) * image + float(sigma) * z
