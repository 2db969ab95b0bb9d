"""The DDPM/ADM U-Net (Ho et al. 2020; Dhariwal & Nichol 2021), in flax.linen.

Structure, as in the DDPM reference network:
  conv_in -> for each level: num_res_blocks ResBlocks (+ attention at the listed resolutions),
  then a stride-2 downsample (not after the last level) -> middle: ResBlock, attention, ResBlock
  -> for each level in reverse: num_res_blocks + 1 ResBlocks, each fed the concatenation with one
  skip from the down path (+ attention), then a nearest upsample (not after the first level)
  -> GroupNorm, SiLU, zero-initialised conv_out.
With the DDPM CIFAR-10 settings (128 channels, (1, 2, 2, 2), 2 blocks, attention at 16) it has
35,746,307 parameters, the count of the reference network.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from diffusion_jax.models.layers import (AttentionBlock, Downsample, ResBlock, Upsample,
                                         group_norm, timestep_embedding, with_interval)


class UNet(nn.Module):
  """eps/x0/v network: x [B, H, W, C] in [-1, 1], t int32 [B] -> [B, H, W, out_channels or C].

  `num_classes` > 0 adds a label embedding with one extra label, `num_classes`, meaning "no
  label" (classifier-free guidance trains with labels dropped to it).
  """
  channels: int = 128
  channel_mult: Sequence[int] = (1, 2, 2, 2)
  num_res_blocks: int = 2
  attention_resolutions: Sequence[int] = (16,)
  num_heads: int = 1
  head_dim: Optional[int] = None
  dropout: float = 0.0
  scale_shift: bool = False
  num_groups: int = 32
  num_classes: int = 0
  out_channels: Optional[int] = None
  dtype: Any = jnp.float32
  attention: str = 'auto'  # the attention kernel: auto | xla | cudnn | lean
  forward_mode: bool = False  # every layer differentiable by jax.jvp too (same parameters)
  interval_embedding: bool = False  # a second time input: the length of the step to take

  @nn.compact
  def __call__(self, x, t, labels=None, *, train: bool = False, interval=None):
    dtype = self.dtype
    temb_dim = 4 * self.channels
    temb = timestep_embedding(t, self.channels)
    temb = nn.Dense(temb_dim, dtype=dtype, name='temb_dense0')(temb)
    temb = nn.Dense(temb_dim, dtype=dtype, name='temb_dense1')(nn.silu(temb))
    temb = with_interval(temb, interval, self.interval_embedding, self.channels, dtype)
    if self.num_classes:
      if labels is None:
        labels = jnp.full((x.shape[0],), self.num_classes, jnp.int32)
      temb = temb + nn.Embed(self.num_classes + 1, temb_dim, dtype=dtype,
                             name='label_embed')(labels)

    resblock = lambda ch, name: ResBlock(ch, self.dropout, self.scale_shift, self.num_groups,
                                         dtype, self.forward_mode, name=name)
    attention = lambda name: AttentionBlock(self.num_heads, self.head_dim, self.num_groups,
                                            dtype, self.attention, self.forward_mode, name=name)
    num_levels = len(self.channel_mult)

    h = nn.Conv(self.channels, (3, 3), dtype=dtype, name='conv_in')(x.astype(dtype))
    skips = [h]
    for level, mult in enumerate(self.channel_mult):
      for i in range(self.num_res_blocks):
        h = resblock(self.channels * mult, f'down{level}_res{i}')(h, temb, train=train)
        if h.shape[1] in self.attention_resolutions:
          h = attention(f'down{level}_attn{i}')(h)
        skips.append(h)
      if level != num_levels - 1:
        h = Downsample(dtype, name=f'down{level}_downsample')(h)
        skips.append(h)

    h = resblock(h.shape[-1], 'mid_res0')(h, temb, train=train)
    h = attention('mid_attn')(h)
    h = resblock(h.shape[-1], 'mid_res1')(h, temb, train=train)

    for level in reversed(range(num_levels)):
      for i in range(self.num_res_blocks + 1):
        h = jnp.concatenate([h, skips.pop()], axis=-1)
        h = resblock(self.channels * self.channel_mult[level], f'up{level}_res{i}')(
            h, temb, train=train)
        if h.shape[1] in self.attention_resolutions:
          h = attention(f'up{level}_attn{i}')(h)
      if level != 0:
        h = Upsample(dtype, name=f'up{level}_upsample')(h)

    h = group_norm(self.num_groups, dtype, 'norm_out', silu=True,
                   forward_mode=self.forward_mode)(h)
    out = nn.Conv(self.out_channels or x.shape[-1], (3, 3), dtype=dtype,
                  kernel_init=nn.initializers.zeros, name='conv_out')(h)
    return out.astype(jnp.float32)
