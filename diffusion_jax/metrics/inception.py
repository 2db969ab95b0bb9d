"""The FID Inception-v3 network (2048-d pool3 features) in flax, and features of image batches.

This is pytorch-fid's `fid_inception_v3`: torchvision's Inception-v3 with the FIDInceptionA/C/
E_1/E_2 blocks that reproduce the TF graph (`inception-2015-12-05`) behind the reference FID, cut
after the final average pool. Activations are NHWC and computed in float32 at full precision.
Its weights come from `inception_weights` (pytorch-fid's release file, read without torch).
Each BasicConv2d's inference BatchNorm is folded into its conv, so the params are
`{<torchvision module path>: {'conv': {'kernel', 'bias'}}}`, e.g.
`params['Mixed_5b']['branch1x1']['conv']['kernel']` for torch's `Mixed_5b.branch1x1.conv.weight`.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import images, parallel, stop_signals

INCEPTION_SIZE = 299
FEATURE_DIM = 2048
# Full f32 convs: TF32 on recent GPUs would shift FID away from the float32 reference.
_PRECISION = jax.lax.Precision.HIGHEST
Params = dict[str, Any]


# Network

def resize_bilinear(images: jax.Array, size: int = INCEPTION_SIZE) -> jax.Array:
  """[B, H, W, C] -> [B, size, size, C] as torch's F.interpolate(bilinear, align_corners=False).

  Half-pixel centres, edge clamping, two taps per axis. antialias=False makes downsampling
  (e.g. 512 -> 299) the same two-tap interpolation torch does instead of jax's default
  area filter, so features match pytorch-fid for inputs larger than 299 too.
  """
  b, h, w, c = images.shape
  if (h, w) == (size, size):
    return images
  return jax.image.resize(images, (b, size, size, c), 'bilinear', antialias=False)


def _avg_pool_same(x: jax.Array) -> jax.Array:
  # The FID patch: TF's average pool leaves the zero padding out of the mean.
  return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_same(x: jax.Array) -> jax.Array:
  return nn.max_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)))  # pads with -inf, as torch


def _max_pool_reduce(x: jax.Array) -> jax.Array:
  return nn.max_pool(x, (3, 3), (2, 2))


class BasicConv(nn.Module):
  """torchvision's BasicConv2d (conv, BatchNorm, ReLU) with the BatchNorm folded into a bias."""
  features: int
  kernel: tuple[int, int] = (1, 1)
  stride: int = 1
  padding: tuple[int, int] = (0, 0)
  precision: Any = _PRECISION

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    ph, pw = self.padding
    x = nn.Conv(self.features, self.kernel, (self.stride, self.stride), ((ph, ph), (pw, pw)),
                precision=self.precision, name='conv')(x)
    return nn.relu(x)


class FIDInceptionA(nn.Module):
  """Mixed_5b/c/d: [B, 35, 35, C] -> [B, 35, 35, 224 + pool_features]."""
  pool_features: int
  precision: Any = _PRECISION

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = functools.partial(BasicConv, precision=self.precision)
    b1 = conv(64, name='branch1x1')(x)
    b5 = conv(48, name='branch5x5_1')(x)
    b5 = conv(64, (5, 5), padding=(2, 2), name='branch5x5_2')(b5)
    b3 = conv(64, name='branch3x3dbl_1')(x)
    b3 = conv(96, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(b3)
    b3 = conv(96, (3, 3), padding=(1, 1), name='branch3x3dbl_3')(b3)
    bp = conv(self.pool_features, name='branch_pool')(_avg_pool_same(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """Mixed_6a (unpatched): [B, 35, 35, 288] -> [B, 17, 17, 768]."""
  precision: Any = _PRECISION

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = functools.partial(BasicConv, precision=self.precision)
    b3 = conv(384, (3, 3), stride=2, name='branch3x3')(x)
    bd = conv(64, name='branch3x3dbl_1')(x)
    bd = conv(96, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(bd)
    bd = conv(96, (3, 3), stride=2, name='branch3x3dbl_3')(bd)
    return jnp.concatenate([b3, bd, _max_pool_reduce(x)], axis=-1)


class FIDInceptionC(nn.Module):
  """Mixed_6b/c/d/e: [B, 17, 17, 768] -> [B, 17, 17, 768]."""
  channels_7x7: int
  precision: Any = _PRECISION

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = functools.partial(BasicConv, precision=self.precision)
    c7 = self.channels_7x7
    row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
    b1 = conv(192, name='branch1x1')(x)
    b7 = conv(c7, name='branch7x7_1')(x)
    b7 = conv(c7, **row, name='branch7x7_2')(b7)
    b7 = conv(192, **col, name='branch7x7_3')(b7)
    bd = conv(c7, name='branch7x7dbl_1')(x)
    bd = conv(c7, **col, name='branch7x7dbl_2')(bd)
    bd = conv(c7, **row, name='branch7x7dbl_3')(bd)
    bd = conv(c7, **col, name='branch7x7dbl_4')(bd)
    bd = conv(192, **row, name='branch7x7dbl_5')(bd)
    bp = conv(192, name='branch_pool')(_avg_pool_same(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  """Mixed_7a (unpatched): [B, 17, 17, 768] -> [B, 8, 8, 1280]."""
  precision: Any = _PRECISION

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = functools.partial(BasicConv, precision=self.precision)
    b3 = conv(192, name='branch3x3_1')(x)
    b3 = conv(320, (3, 3), stride=2, name='branch3x3_2')(b3)
    b7 = conv(192, name='branch7x7x3_1')(x)
    b7 = conv(192, (1, 7), padding=(0, 3), name='branch7x7x3_2')(b7)
    b7 = conv(192, (7, 1), padding=(3, 0), name='branch7x7x3_3')(b7)
    b7 = conv(192, (3, 3), stride=2, name='branch7x7x3_4')(b7)
    return jnp.concatenate([b3, b7, _max_pool_reduce(x)], axis=-1)


class FIDInceptionE(nn.Module):
  """Mixed_7b (pool='avg', FIDInceptionE_1) / Mixed_7c (pool='max', FIDInceptionE_2): -> 2048 ch.

  The max pool of Mixed_7c is a quirk of the TF graph that the reference FID kept.
  """
  pool: str
  precision: Any = _PRECISION

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = functools.partial(BasicConv, precision=self.precision)
    row, col = dict(kernel=(1, 3), padding=(0, 1)), dict(kernel=(3, 1), padding=(1, 0))
    b1 = conv(320, name='branch1x1')(x)
    b3 = conv(384, name='branch3x3_1')(x)
    b3 = jnp.concatenate([conv(384, **row, name='branch3x3_2a')(b3),
                          conv(384, **col, name='branch3x3_2b')(b3)], axis=-1)
    bd = conv(448, name='branch3x3dbl_1')(x)
    bd = conv(384, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(bd)
    bd = jnp.concatenate([conv(384, **row, name='branch3x3dbl_3a')(bd),
                          conv(384, **col, name='branch3x3dbl_3b')(bd)], axis=-1)
    pooled = _avg_pool_same(x) if self.pool == 'avg' else _max_pool_same(x)
    bp = conv(192, name='branch_pool')(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3(nn.Module):
  """Images float [B, H, W, 3] in [-1, 1] -> pool3 features float32 [B, 2048], all >= 0.

  [-1, 1] is what pytorch-fid's network sees after `normalize_input` (x / 255 -> 2x - 1); for
  uint8 images pass x / 127.5 - 1. Inputs of any size are bilinearly resized to 299 x 299
  (`resize_bilinear`); resizing commutes with that affine map, so the order does not matter.
  """
  precision: Any = _PRECISION

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f'InceptionV3 takes images [B, H, W, 3], got shape {images.shape}; '
                       'tile grayscale images to 3 channels first.')
    if not jnp.issubdtype(images.dtype, jnp.floating):
      raise ValueError(f'InceptionV3 takes float images in [-1, 1], got dtype {images.dtype}; '
                       'convert uint8 images with x / 127.5 - 1.')
    conv = functools.partial(BasicConv, precision=self.precision)
    p = dict(precision=self.precision)
    x = resize_bilinear(images.astype(jnp.float32))
    x = conv(32, (3, 3), stride=2, name='Conv2d_1a_3x3')(x)  # 149
    x = conv(32, (3, 3), name='Conv2d_2a_3x3')(x)  # 147
    x = conv(64, (3, 3), padding=(1, 1), name='Conv2d_2b_3x3')(x)
    x = _max_pool_reduce(x)  # 73
    x = conv(80, name='Conv2d_3b_1x1')(x)
    x = conv(192, (3, 3), name='Conv2d_4a_3x3')(x)  # 71
    x = _max_pool_reduce(x)  # 35
    x = FIDInceptionA(32, **p, name='Mixed_5b')(x)
    x = FIDInceptionA(64, **p, name='Mixed_5c')(x)
    x = FIDInceptionA(64, **p, name='Mixed_5d')(x)
    x = InceptionB(**p, name='Mixed_6a')(x)  # 17
    for name, c7 in (('Mixed_6b', 128), ('Mixed_6c', 160), ('Mixed_6d', 160), ('Mixed_6e', 192)):
      x = FIDInceptionC(c7, **p, name=name)(x)
    x = InceptionD(**p, name='Mixed_7a')(x)  # 8
    x = FIDInceptionE('avg', **p, name='Mixed_7b')(x)
    x = FIDInceptionE('max', **p, name='Mixed_7c')(x)
    return jnp.mean(x, axis=(1, 2))


def make_feature_fn(params: Params) -> Callable[[jax.Array], jax.Array]:
  """A jitted `images [B, H, W, 3] in [-1, 1] -> features [B, 2048]`, params put on device once.

  params are an argument of the jitted function, not constants baked into it, which would make
  a ~90 MB executable and a slow compile. Each new batch shape compiles again: pad the last
  batch to the common size and drop the extra rows.
  """
  model = InceptionV3()
  apply = jax.jit(lambda p, x: model.apply({'params': p}, x))
  params = jax.device_put(params)
  return lambda images: apply(params, images)


def to_inception_input(x: np.ndarray) -> np.ndarray:
  """float [N, H, W, C] in [-1, 1] (C = 1 or 3) -> float32 [N, H, W, 3] in [-1, 1].

  Rounds to uint8 and back first, so the network sees exactly what pytorch-fid reads from
  saved PNGs; grayscale is repeated to 3 channels, as PIL's convert('RGB') does.
  """
  x = images.to_model_range(images.to_uint8(x))
  if x.shape[-1] == 1:
    x = np.repeat(x, 3, axis=-1)
  return x


def make_features_fn(params: Params, batch_size: int, stop: stop_signals.StopFlag | None = None,
                     ) -> Callable[[Iterable[np.ndarray]], np.ndarray]:
  """features(chunks) -> float64 [N, 2048] for an iterable of float [n, H, W, C] in [-1, 1].

  Every call runs in batches of `batch_size` rounded up to a multiple of this process's device
  count, split over those devices; the last batch is padded, so one shape compiles once. With a
  `stop` flag a signal interrupts it between and inside batches (`stop_signals.Interrupted`).
  """
  local = parallel.create_mesh(jax.local_devices())
  batch = parallel.round_up(batch_size, local.size)
  sharding = parallel.batch_sharding(local)
  feature_fn = make_feature_fn(params)
  fetch = stop.fetch if stop is not None else jax.device_get

  def run(x: np.ndarray) -> np.ndarray:
    padded = parallel.pad_rows(x, batch)
    return np.asarray(fetch(feature_fn(jax.device_put(padded, sharding))), np.float64)[:len(x)]

  def features(chunks) -> np.ndarray:
    out, pending = [], []
    for chunk in chunks:
      pending.append(to_inception_input(chunk))
      while sum(map(len, pending)) >= batch:
        joined = np.concatenate(pending)
        out.append(run(joined[:batch]))
        pending = [joined[batch:]]
    leftover = np.concatenate(pending) if pending else np.zeros((0,))
    if len(leftover):
      out.append(run(leftover))
    if not out:
      raise ValueError('no images to compute Inception features of.')
    return np.concatenate(out)

  return features
