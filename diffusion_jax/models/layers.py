"""Building blocks of the DDPM/ADM U-Net: timestep embedding, ResBlock, attention, resampling.

Activations are NHWC. Parameters are float32; `dtype` is the compute dtype (bf16 on GPU/TPU).
Normalisation statistics are computed in float32 whatever the compute dtype.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.models.attention import attention
from diffusion_jax.models.normalization import GroupNorm

Dtype = Any


def timestep_embedding(t: jnp.ndarray, dim: int, max_period: float = 10000.0) -> jnp.ndarray:
  """DDPM's sinusoidal embedding: [B] timesteps -> [B, dim], sin half then cos half."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - 1))
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def with_interval(temb: jnp.ndarray, interval: jnp.ndarray | None, enabled: bool,
                  frequencies: int, dtype: Dtype, name: str = 'interval') -> jnp.ndarray:
  """The noise level's embedding temb [B, D] plus that of the step's length `interval` (network
  time, float [B]; None: 0, a step of length zero, the plain denoiser) when the network has an
  interval embedding (`enabled`): sinusoidal features, then two Dense layers (created in the
  calling compact module). temb itself when it has not; a step length given to such a network
  is refused."""
  if not enabled:
    if interval is not None:
      raise ValueError('the network was given a step length but has no interval embedding; set '
                       'model.interval_embedding=True (an objective that trains for steps, such '
                       'as meanflow, needs it).')
    return temb
  if interval is None:
    interval = jnp.zeros(temb.shape[:1], jnp.float32)
  emb = timestep_embedding(interval, frequencies)
  emb = nn.Dense(temb.shape[-1], dtype=dtype, name=f'{name}_dense0')(emb)
  return temb + nn.Dense(temb.shape[-1], dtype=dtype, name=f'{name}_dense1')(nn.silu(emb))


def group_norm(num_groups: int, dtype: Dtype, name: str | None = None, *,
               silu: bool = False, forward_mode: bool = False) -> GroupNorm:
  """GroupNorm (then SiLU if `silu`): eps 1e-6 as in the DDPM reference, float32 statistics."""
  return GroupNorm(num_groups=num_groups, epsilon=1e-6, silu=silu, dtype=dtype,
                   forward_mode=forward_mode, name=name)


class ResBlock(nn.Module):
  """GroupNorm-SiLU-conv, + time embedding, GroupNorm-SiLU-dropout-conv, + skip.

  The time embedding is added to the features (DDPM) or applied as a scale and shift of the
  second normalisation (`scale_shift=True`, as in ADM). A 1x1 conv projects the skip when the
  widths differ. The last conv starts at zero, as in the DDPM reference, so that every block
  begins as the identity.
  """
  out_channels: int
  dropout: float = 0.0
  scale_shift: bool = False
  num_groups: int = 32
  dtype: Dtype = jnp.float32
  forward_mode: bool = False  # layers that jax.jvp can differentiate too

  @nn.compact
  def __call__(self, x, temb, *, train: bool):
    conv = lambda ch, k, name: nn.Conv(ch, (k, k), dtype=self.dtype, name=name)
    norm = lambda name, silu: group_norm(self.num_groups, self.dtype, name, silu=silu,
                                         forward_mode=self.forward_mode)
    h = norm('norm1', True)(x)
    h = conv(self.out_channels, 3, 'conv1')(h)
    emb = nn.Dense(self.out_channels * (2 if self.scale_shift else 1), dtype=self.dtype,
                   name='temb_proj')(nn.silu(temb))[:, None, None, :]
    if self.scale_shift:
      scale, shift = jnp.split(emb, 2, axis=-1)
      h = nn.silu(norm('norm2', False)(h) * (1 + scale) + shift)
    else:
      h = norm('norm2', True)(h + emb)
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = nn.Conv(self.out_channels, (3, 3), dtype=self.dtype, kernel_init=nn.initializers.zeros,
                name='conv2')(h)
    if x.shape[-1] != self.out_channels:
      x = conv(self.out_channels, 1, 'skip')(x)
    return x + h


class AttentionBlock(nn.Module):
  """Multi-head self-attention over the H*W positions, with a residual connection.

  `head_dim` (if set) fixes the width of each head, else `num_heads` heads share the channels;
  `implementation` is the attention kernel (`attention.IMPLEMENTATIONS`).
  """
  num_heads: int = 1
  head_dim: int | None = None
  num_groups: int = 32
  dtype: Dtype = jnp.float32
  implementation: str = 'auto'
  forward_mode: bool = False  # layers that jax.jvp can differentiate too

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    heads = c // self.head_dim if self.head_dim else self.num_heads
    if c % heads:
      raise ValueError(f'model.attention heads: {heads} heads do not divide {c} channels.')
    y = group_norm(self.num_groups, self.dtype, 'norm', forward_mode=self.forward_mode)(x)
    y = y.reshape(b, h * w, c)
    qkv = nn.DenseGeneral((3, heads, c // heads), dtype=self.dtype, name='qkv')(y)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # each [B, HW, heads, head_dim]
    y = attention(q, k, v, self.implementation, self.forward_mode)
    y = nn.DenseGeneral(c, axis=(-2, -1), dtype=self.dtype, kernel_init=nn.initializers.zeros,
                        name='proj_out')(y)
    return x + y.reshape(b, h, w, c)


class Downsample(nn.Module):
  """Halves H and W with a stride-2 3x3 conv."""
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    return nn.Conv(x.shape[-1], (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)),
                   dtype=self.dtype, name='conv')(x)


# Nearest 2x upsampling then a 3x3 conv, split by output phase: output row 2i + a reads input
# rows (i - 1, i) through kernel rows (0, 1 + 2) when a = 0, and rows (i, i + 1) through kernel
# rows (0 + 1, 2) when a = 1; the same holds for columns. _PHASE_TAPS[a] maps the 3 kernel rows
# to the 2 taps of phase a.
_PHASE_TAPS = (((1, 0, 0), (0, 1, 1)),
               ((1, 1, 0), (0, 0, 1)))
_PHASE_PADDING = ((1, 0), (0, 1))  # phase a's taps start at offset -1 (a = 0) or 0 (a = 1)


def upsample_conv(x: jnp.ndarray, kernel: jnp.ndarray, bias: jnp.ndarray) -> jnp.ndarray:
  """conv3x3(nearest_upsample_2x(x)) + bias, 'SAME' padding: x [B, H, W, C_in], kernel
  [3, 3, C_in, C_out] -> [B, 2H, 2W, C_out].

  Computed exactly as four 2x2 convolutions on the small grid, one per output phase, with the
  kernel's taps summed where two of them read the same repeated input pixel: 16 instead of 36
  multiply-adds per input pixel and channel pair, and no upsampled copy of x.
  """
  b, h, w, _ = x.shape
  taps = jnp.asarray(_PHASE_TAPS, jnp.float32)
  phase_kernels = jnp.einsum('ary,csx,yxio->acrsio', taps, taps,
                             kernel.astype(jnp.float32)).astype(x.dtype)  # [2, 2, 2, 2, I, O]
  conv = lambda a, c: jax.lax.conv_general_dilated(
      x, phase_kernels[a, c], (1, 1), (_PHASE_PADDING[a], _PHASE_PADDING[c]),
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  rows = [jnp.stack([conv(a, 0), conv(a, 1)], axis=3) for a in (0, 1)]  # [B, H, W, 2, O] each
  out = jnp.stack(rows, axis=2).reshape(b, 2 * h, 2 * w, kernel.shape[-1])
  return out + bias.astype(x.dtype)


class Upsample(nn.Module):
  """Doubles H and W: nearest-neighbour repeat, then a 3x3 conv (as `upsample_conv`).

  The parameters are those of the `nn.Conv` named 'conv' that would follow the repeat.
  """
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    conv = _ConvParams((3, 3, c, c), name='conv')
    kernel, bias = conv()
    return upsample_conv(x.astype(self.dtype), kernel, bias)


class _ConvParams(nn.Module):
  """The kernel and bias of an `nn.Conv`, with its initialisers, for layers computing their own
  convolution."""
  kernel_shape: tuple

  @nn.compact
  def __call__(self):
    kernel = self.param('kernel', nn.linear.default_kernel_init, self.kernel_shape, jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, self.kernel_shape[-1:], jnp.float32)
    return kernel, bias
