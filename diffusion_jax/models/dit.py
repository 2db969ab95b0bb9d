"""DiT, the diffusion transformer (Peebles & Xie 2023), in flax.linen.

Structure, as in the reference network (facebookresearch/DiT, models.py):
  patch embedding (a p x p conv of stride p) + a fixed 2-D sin-cos position table -> `depth`
  blocks, each LayerNorm-attention and LayerNorm-MLP (ratio 4, tanh GELU) with adaLN-Zero: a
  shift, scale and gate per branch from SiLU(c), where c is the noise-level embedding plus the
  label embedding, the gates starting at zero so that every block begins as the identity ->
  LayerNorm with an adaptive shift and scale, a zero-initialised linear layer to p * p * C
  values per token -> unpatchify.
Options beyond the reference: QK-norm (RMSNorm of each head's queries and keys, as in SD3 and
ViT-22B) and 2-D rotary position embedding in place of the additive table (`rope`, as in
FiT/LightningDiT): each head's first half rotates with the token's row, its second with its
column, so attention scores depend on relative positions only.

With the reference settings (32x32x4 latents, 1,000 classes, 8 output channels for the learned
variance) DiT-XL/2 has 674,834,720 parameters and DiT-B/2 130,315,808: the reference's
675,129,632 and 130,512,416 less its frozen position table (kept here as a constant, not a
parameter). Forward multiply-adds: 118.6 G (XL/2) and 23.0 G (B/2) per image, as in the paper.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from diffusion_jax.models.attention import attention
from diffusion_jax.models.layers import timestep_embedding, with_interval

# name: (hidden width, depth, heads), Table 1 of the paper.
PRESETS = {'S': (384, 12, 6), 'B': (768, 12, 12), 'L': (1024, 24, 16), 'XL': (1152, 28, 16)}
FREQUENCY_DIM = 256  # width of the sinusoidal noise-level features

_xavier = nn.initializers.xavier_uniform()
_normal = nn.initializers.normal(0.02)
_zeros = nn.initializers.zeros


def sincos_table(grid: tuple[int, int], dim: int) -> np.ndarray:
  """Fixed 2-D position embedding [rows * cols, dim] (MAE/DiT): sin and cos of the column index
  at dim/4 frequencies in the first half, of the row index in the second."""
  if dim % 4:
    raise ValueError(f'model.hidden={dim}: the 2-D sin-cos table needs a multiple of 4.')
  rows, cols = np.meshgrid(np.arange(grid[0], dtype=np.float64),
                           np.arange(grid[1], dtype=np.float64), indexing='ij')
  omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim // 4))

  def axis(pos):
    angles = pos.reshape(-1)[:, None] * omega[None]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)
  return np.concatenate([axis(cols), axis(rows)], axis=1).astype(np.float32)


def rope_2d(x: jnp.ndarray, grid: tuple[int, int], theta: float = 10000.0) -> jnp.ndarray:
  """2-D rotary position embedding of x [B, rows * cols, heads, d] (d a multiple of 4).

  Feature i < d/2 is paired with feature i + d/2 and the pair rotated by the angle
  pos * theta^(-j / (d/4)), j = i mod d/4, where pos is the token's row for i < d/4 and its
  column otherwise.
  """
  d = x.shape[-1]
  if d % 4:
    raise ValueError(f'model.rope needs a head width divisible by 4, not {d}.')
  quarter = d // 4
  freqs = theta ** (-np.arange(quarter, dtype=np.float64) / quarter)
  rows, cols = np.meshgrid(np.arange(grid[0]), np.arange(grid[1]), indexing='ij')
  angles = np.concatenate([rows.reshape(-1, 1) * freqs, cols.reshape(-1, 1) * freqs], axis=1)
  cos = jnp.asarray(np.cos(angles), jnp.float32)[:, None, :]  # [N, 1, d/2]
  sin = jnp.asarray(np.sin(angles), jnp.float32)[:, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
  return out.astype(x.dtype)


def modulate(x: jnp.ndarray, shift: jnp.ndarray, scale: jnp.ndarray) -> jnp.ndarray:
  """x [B, N, D] * (1 + scale [B, D]) + shift [B, D]."""
  return x * (1 + scale[:, None]) + shift[:, None]


def _layer_norm(name: str) -> nn.LayerNorm:
  """LayerNorm without its own scale and shift (adaLN supplies them), eps 1e-6."""
  return nn.LayerNorm(epsilon=1e-6, use_bias=False, use_scale=False, name=name)


class SelfAttention(nn.Module):
  """Multi-head self-attention over tokens [B, N, D], with optional QK-norm and 2-D RoPE."""
  num_heads: int
  grid: tuple
  qk_norm: bool = False
  rope: bool = False
  implementation: str = 'auto'
  dtype: Any = jnp.float32
  forward_mode: bool = False  # an attention kernel that jax.jvp can differentiate too

  @nn.compact
  def __call__(self, x):
    dim = x.shape[-1]
    head_dim = dim // self.num_heads
    qkv = nn.DenseGeneral((3, self.num_heads, head_dim), kernel_init=_xavier, dtype=self.dtype,
                          name='qkv')(x)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # each [B, N, heads, head_dim]
    if self.qk_norm:
      q = nn.RMSNorm(epsilon=1e-6, dtype=self.dtype, name='q_norm')(q)
      k = nn.RMSNorm(epsilon=1e-6, dtype=self.dtype, name='k_norm')(k)
    if self.rope:
      q, k = rope_2d(q, self.grid), rope_2d(k, self.grid)
    y = attention(q, k, v, self.implementation, self.forward_mode)
    return nn.DenseGeneral(dim, axis=(-2, -1), kernel_init=_xavier, dtype=self.dtype,
                           name='proj')(y)


class DiTBlock(nn.Module):
  """x + gate * attention(modulate(LN(x))), then x + gate * MLP(modulate(LN(x))): [B, N, D]."""
  num_heads: int
  grid: tuple
  mlp_ratio: float = 4.0
  qk_norm: bool = False
  rope: bool = False
  implementation: str = 'auto'
  dtype: Any = jnp.float32
  forward_mode: bool = False

  @nn.compact
  def __call__(self, x, c):
    dim = x.shape[-1]
    mod = nn.Dense(6 * dim, kernel_init=_zeros, dtype=self.dtype, name='adaLN')(nn.silu(c))
    shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = jnp.split(mod, 6, axis=-1)
    h = modulate(_layer_norm('norm1')(x), shift_a, scale_a)
    h = SelfAttention(self.num_heads, self.grid, self.qk_norm, self.rope, self.implementation,
                      self.dtype, self.forward_mode, name='attn')(h)
    x = x + gate_a[:, None] * h
    h = modulate(_layer_norm('norm2')(x), shift_m, scale_m)
    h = nn.Dense(int(dim * self.mlp_ratio), kernel_init=_xavier, dtype=self.dtype,
                 name='mlp_in')(h)
    h = nn.Dense(dim, kernel_init=_xavier, dtype=self.dtype, name='mlp_out')(nn.gelu(h))
    return x + gate_m[:, None] * h


class DiT(nn.Module):
  """x [B, H, W, C], t [B] (what the process gives the network) -> [B, H, W, out_channels or C].

  `num_classes` > 0 adds a label embedding with one extra row, `num_classes`, meaning "no
  label" (classifier-free guidance trains with labels dropped to it). H and W must be
  multiples of `patch_size`.
  """
  hidden: int = 384
  depth: int = 12
  num_heads: int = 6
  patch_size: int = 2
  mlp_ratio: float = 4.0
  qk_norm: bool = False
  rope: bool = False
  num_classes: int = 0
  out_channels: Optional[int] = None
  attention: str = 'auto'  # the attention kernel: auto | xla | cudnn | lean
  dtype: Any = jnp.float32
  forward_mode: bool = False  # every layer differentiable by jax.jvp too (same parameters)
  interval_embedding: bool = False  # a second time input: the length of the step to take

  @nn.compact
  def __call__(self, x, t, labels=None, *, train: bool = False, interval=None):
    del train  # no dropout
    b, height, width, channels = x.shape
    p, dim, dtype = self.patch_size, self.hidden, self.dtype
    grid = (height // p, width // p)
    patch_init = nn.initializers.variance_scaling(1.0, 'fan_avg', 'uniform',
                                                  in_axis=(0, 1, 2), out_axis=-1)
    h = nn.Conv(dim, (p, p), strides=(p, p), padding='VALID', kernel_init=patch_init,
                dtype=dtype, name='patch_embed')(x.astype(dtype))
    h = h.reshape(b, grid[0] * grid[1], dim)
    if not self.rope:
      h = h + jnp.asarray(sincos_table(grid, dim), dtype)

    c = timestep_embedding(t, FREQUENCY_DIM)
    c = nn.Dense(dim, kernel_init=_normal, dtype=dtype, name='time_dense0')(c)
    c = nn.Dense(dim, kernel_init=_normal, dtype=dtype, name='time_dense1')(nn.silu(c))
    c = with_interval(c, interval, self.interval_embedding, FREQUENCY_DIM, dtype)
    if self.num_classes:
      if labels is None:
        labels = jnp.full((b,), self.num_classes, jnp.int32)
      c = c + nn.Embed(self.num_classes + 1, dim, embedding_init=_normal, dtype=dtype,
                       name='label_embed')(labels)

    for i in range(self.depth):
      h = DiTBlock(self.num_heads, grid, self.mlp_ratio, self.qk_norm, self.rope,
                   self.attention, dtype, self.forward_mode, name=f'block{i}')(h, c)

    out_channels = self.out_channels or channels
    shift, scale = jnp.split(
        nn.Dense(2 * dim, kernel_init=_zeros, dtype=dtype, name='final_adaLN')(nn.silu(c)), 2,
        axis=-1)
    h = modulate(_layer_norm('final_norm')(h), shift, scale)
    h = nn.Dense(p * p * out_channels, kernel_init=_zeros, dtype=dtype, name='final_dense')(h)
    h = h.reshape(b, grid[0], grid[1], p, p, out_channels).transpose(0, 1, 3, 2, 4, 5)
    return h.reshape(b, height, width, out_channels).astype(jnp.float32)
