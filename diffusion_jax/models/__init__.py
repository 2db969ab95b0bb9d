"""Denoising networks, and `create_model` to build one from a config's `model` group."""

import jax.numpy as jnp

from diffusion_jax.models.mlp import MLP
from diffusion_jax.models.unet import UNet

# float16 is left out: it needs loss scaling, which training does not do (use bfloat16).
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
ARCHITECTURES = ('unet', 'mlp')


def create_model(model_config, num_classes: int = 0):
  """The flax module named by `model.architecture`, with the group's fields as attributes."""
  cfg = model_config
  if cfg.dtype not in DTYPES:
    raise ValueError(f'model.dtype={cfg.dtype!r} is unknown; choose one of {tuple(DTYPES)}.')
  dtype = DTYPES[cfg.dtype]
  if cfg.architecture == 'unet':
    return UNet(channels=cfg.channels, channel_mult=tuple(cfg.channel_mult),
                num_res_blocks=cfg.num_res_blocks,
                attention_resolutions=tuple(cfg.attention_resolutions),
                num_heads=cfg.num_heads, head_dim=cfg.head_dim or None, dropout=cfg.dropout,
                scale_shift=cfg.scale_shift, num_groups=cfg.num_groups,
                num_classes=num_classes, dtype=dtype)
  if cfg.architecture == 'mlp':
    return MLP(hidden=cfg.hidden, num_layers=cfg.num_layers, num_classes=num_classes,
               dtype=dtype)
  raise ValueError(f'model.architecture={cfg.architecture!r} is unknown; '
                   f'choose one of {ARCHITECTURES}.')
