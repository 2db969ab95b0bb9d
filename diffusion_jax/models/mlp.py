"""An MLP denoiser for low-dimensional (2-D toy) data."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from diffusion_jax.models.layers import timestep_embedding, with_interval


class MLP(nn.Module):
  """x [B, D], t [B] -> [B, D]: residual SiLU blocks, timestep embedding added to each (with
  `interval_embedding`, the step length's embedding `interval` [B] is added to it)."""
  hidden: int = 128
  num_layers: int = 4
  num_classes: int = 0
  dtype: Any = jnp.float32
  interval_embedding: bool = False  # a second time input: the length of the step to take

  @nn.compact
  def __call__(self, x, t, labels=None, *, train: bool = False, interval=None):
    del train  # no dropout
    temb = timestep_embedding(t, self.hidden)
    temb = nn.Dense(self.hidden, dtype=self.dtype)(nn.silu(nn.Dense(self.hidden)(temb)))
    temb = with_interval(temb, interval, self.interval_embedding, self.hidden, self.dtype)
    if self.num_classes:
      if labels is None:
        labels = jnp.full((x.shape[0],), self.num_classes, jnp.int32)
      temb = temb + nn.Embed(self.num_classes + 1, self.hidden)(labels)
    h = nn.Dense(self.hidden, dtype=self.dtype)(x)
    for _ in range(self.num_layers):
      h = h + nn.Dense(self.hidden, dtype=self.dtype)(nn.silu(nn.LayerNorm()(h) + temb))
    out = nn.Dense(x.shape[-1], kernel_init=nn.initializers.zeros, dtype=self.dtype)(
        nn.silu(nn.LayerNorm()(h)))
    return out.astype(jnp.float32)
