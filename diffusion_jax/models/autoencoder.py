"""The KL-regularised convolutional autoencoder of latent diffusion (Rombach et al. 2022), in the
parameter layout of diffusers' `AutoencoderKL` (Stable Diffusion's VAE), in flax.linen.

  encoder:  conv_in -> down_blocks_i (layers_per_block ResnetBlocks, then a stride-2 conv on a
            zero pad of one row and column at the bottom and right, not after the last) ->
            mid_block (ResnetBlock, single-head self-attention, ResnetBlock) -> GroupNorm+SiLU
            -> conv_out (2 x latent_channels: the mean and log-variance) -> quant_conv (1x1)
  decoder:  post_quant_conv (1x1) -> conv_in -> mid_block -> up_blocks_i (layers_per_block + 1
            ResnetBlocks, then a nearest 2x upsample and a 3x3 conv, not after the last) ->
            GroupNorm+SiLU -> conv_out

Every module is named as diffusers names it, with '.N' of its lists written '_N'
(`encoder.down_blocks.0.resnets.1.norm1` is encoder/down_blocks_0/resnets_1/norm1), so that
`models.autoencoder_weights` reads a diffusers checkpoint by name. Images are NHWC in [-1, 1];
the downsampling factor is 2^(len(block_out_channels) - 1).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from diffusion_jax.models.attention import attention
from diffusion_jax.models.layers import Upsample, group_norm

LOGVAR_RANGE = (-30.0, 20.0)  # diffusers' DiagonalGaussianDistribution clamps the log-variance


class ResnetBlock(nn.Module):
  """GroupNorm+SiLU, conv, GroupNorm+SiLU, conv, plus the input (1x1 conv_shortcut where the
  widths differ): diffusers' ResnetBlock2D without a time embedding."""
  out_channels: int
  num_groups: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = group_norm(self.num_groups, self.dtype, 'norm1', silu=True)(x)
    h = nn.Conv(self.out_channels, (3, 3), dtype=self.dtype, name='conv1')(h)
    h = group_norm(self.num_groups, self.dtype, 'norm2', silu=True)(h)
    h = nn.Conv(self.out_channels, (3, 3), dtype=self.dtype, name='conv2')(h)
    if x.shape[-1] != self.out_channels:
      x = nn.Conv(self.out_channels, (1, 1), dtype=self.dtype, name='conv_shortcut')(x)
    return x + h


class SpatialAttention(nn.Module):
  """One head of self-attention over the H*W positions with a residual connection: GroupNorm,
  to_q / to_k / to_v, the attention kernel (`model.attention`'s choice), to_out_0."""
  num_groups: int
  dtype: Any = jnp.float32
  implementation: str = 'auto'

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    y = group_norm(self.num_groups, self.dtype, 'group_norm')(x).reshape(b, h * w, 1, c)
    q, k, v = (nn.Dense(c, dtype=self.dtype, name=name)(y) for name in ('to_q', 'to_k', 'to_v'))
    y = attention(q, k, v, self.implementation)
    y = nn.Dense(c, dtype=self.dtype, name='to_out_0')(y)
    return x + y.reshape(b, h, w, c)


class MidBlock(nn.Module):
  """ResnetBlock, self-attention, ResnetBlock at the lowest resolution: UNetMidBlock2D."""
  channels: int
  num_groups: int
  dtype: Any = jnp.float32
  attention: str = 'auto'

  @nn.compact
  def __call__(self, x):
    x = ResnetBlock(self.channels, self.num_groups, self.dtype, name='resnets_0')(x)
    x = SpatialAttention(self.num_groups, self.dtype, self.attention, name='attentions_0')(x)
    return ResnetBlock(self.channels, self.num_groups, self.dtype, name='resnets_1')(x)


class Downsample(nn.Module):
  """A stride-2 3x3 conv after one zero row and column at the bottom and right (diffusers'
  Downsample2D with padding 0)."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    return nn.Conv(x.shape[-1], (3, 3), strides=(2, 2), padding='VALID', dtype=self.dtype,
                   name='conv')(x)


class Blocks(nn.Module):
  """`layers` ResnetBlocks of `width`, then a Downsample (resample 'down': diffusers'
  DownEncoderBlock2D), an Upsample ('up': UpDecoderBlock2D) or neither ('', the last level)."""
  width: int
  layers: int
  num_groups: int
  resample: str = ''
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h):
    for j in range(self.layers):
      h = ResnetBlock(self.width, self.num_groups, self.dtype, name=f'resnets_{j}')(h)
    if self.resample == 'down':
      return Downsample(self.dtype, name='downsamplers_0')(h)
    if self.resample == 'up':
      return Upsample(self.dtype, name='upsamplers_0')(h)
    return h


class Coder(nn.Module):
  """The encoder (`down`: x [B, H, W, C] -> moments [B, H / f, W / f, out_channels], before
  quant_conv) or the decoder (not `down`: z [B, h, w, latent] after post_quant_conv -> images
  [B, h f, w f, out_channels]): conv_in, the levels and mid_block in their order,
  GroupNorm+SiLU, conv_out."""
  out_channels: int
  block_out_channels: Sequence[int]
  layers_per_block: int
  num_groups: int
  down: bool
  dtype: Any = jnp.float32
  attention: str = 'auto'

  @nn.compact
  def __call__(self, h):
    widths = tuple(self.block_out_channels if self.down else reversed(self.block_out_channels))
    mid = lambda h: MidBlock(widths[-1] if self.down else widths[0], self.num_groups, self.dtype,
                             self.attention, name='mid_block')(h)
    h = nn.Conv(widths[0], (3, 3), dtype=self.dtype, name='conv_in')(h)
    if not self.down:
      h = mid(h)
    kind = 'down' if self.down else 'up'
    layers = self.layers_per_block + (not self.down)  # the decoder's levels have one more
    for i, width in enumerate(widths):
      h = Blocks(width, layers, self.num_groups, kind if i < len(widths) - 1 else '', self.dtype,
                 name=f'{kind}_blocks_{i}')(h)
    if self.down:
      h = mid(h)
    h = group_norm(self.num_groups, self.dtype, 'conv_norm_out', silu=True)(h)
    return nn.Conv(self.out_channels, (3, 3), dtype=self.dtype, name='conv_out')(h)


class AutoencoderKL(nn.Module):
  """`encode(x)` -> (mean, logvar) of the latent's diagonal Gaussian, each [B, H / f, W / f,
  latent_channels], logvar clamped to LOGVAR_RANGE; `decode(z)` -> images [B, H, W, C];
  calling it encodes and decodes the mean (float32 out)."""
  in_channels: int = 3
  latent_channels: int = 4
  block_out_channels: Sequence[int] = (128, 256, 512, 512)
  layers_per_block: int = 2
  num_groups: int = 32
  dtype: Any = jnp.float32
  attention: str = 'auto'

  def setup(self):
    shape = dict(block_out_channels=tuple(self.block_out_channels),
                 layers_per_block=self.layers_per_block, num_groups=self.num_groups,
                 dtype=self.dtype, attention=self.attention)
    self.encoder = Coder(2 * self.latent_channels, down=True, **shape)
    self.decoder = Coder(self.in_channels, down=False, **shape)
    self.quant_conv = nn.Conv(2 * self.latent_channels, (1, 1), dtype=self.dtype)
    self.post_quant_conv = nn.Conv(self.latent_channels, (1, 1), dtype=self.dtype)

  @property
  def downsampling(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)

  def encode(self, x):
    moments = self.quant_conv(self.encoder(x.astype(self.dtype))).astype(jnp.float32)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, *LOGVAR_RANGE)

  def decode(self, z):
    return self.decoder(self.post_quant_conv(z.astype(self.dtype))).astype(jnp.float32)

  def __call__(self, x):
    return self.decode(self.encode(x)[0])
