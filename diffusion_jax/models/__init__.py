"""Denoising networks, and `create_model` to build one from a config's `model` group."""

import jax.numpy as jnp

from diffusion_jax.models.dit import DiT, PRESETS as DIT_PRESETS
from diffusion_jax.models.mlp import MLP
from diffusion_jax.models.unet import UNet

# float16 is left out: it needs loss scaling, which training does not do (use bfloat16).
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
ARCHITECTURES = ('unet', 'dit', 'mlp', 'autoencoder')  # autoencoder: `autoencoding`


def create_model(model_config, num_classes: int = 0, forward_mode: bool = False):
  """The flax module named by `model.architecture`, with the group's fields as attributes.

  `forward_mode` gives the layers with a custom backward pass (fused GroupNorm, lean attention)
  a forward-mode rule as well, for objectives that take `jax.jvp` of the network; the
  parameters, outputs and gradients are the same either way.
  """
  cfg = model_config
  if cfg.dtype not in DTYPES:
    raise ValueError(f'model.dtype={cfg.dtype!r} is unknown; choose one of {tuple(DTYPES)}.')
  dtype = DTYPES[cfg.dtype]
  interval = cfg.get('interval_embedding', False)
  if cfg.architecture == 'unet':
    return UNet(channels=cfg.channels, channel_mult=tuple(cfg.channel_mult),
                num_res_blocks=cfg.num_res_blocks,
                attention_resolutions=tuple(cfg.attention_resolutions),
                num_heads=cfg.num_heads, head_dim=cfg.head_dim or None, dropout=cfg.dropout,
                scale_shift=cfg.scale_shift, num_groups=cfg.num_groups,
                num_classes=num_classes, dtype=dtype, attention=cfg.get('attention', 'auto'),
                forward_mode=forward_mode, interval_embedding=interval)
  if cfg.architecture == 'dit':
    hidden, depth, heads = dit_size(cfg)
    return DiT(hidden=hidden, depth=depth, num_heads=heads, patch_size=cfg.patch_size,
               mlp_ratio=cfg.mlp_ratio, qk_norm=cfg.qk_norm, rope=cfg.rope,
               num_classes=num_classes, attention=cfg.attention, dtype=dtype,
               forward_mode=forward_mode, interval_embedding=interval)
  if cfg.architecture == 'mlp':
    return MLP(hidden=cfg.hidden, num_layers=cfg.num_layers, num_classes=num_classes,
               dtype=dtype, interval_embedding=interval)
  if cfg.architecture == 'autoencoder':
    raise ValueError('model.architecture=autoencoder is built from the config\'s autoencoder '
                     'group by autoencoding.create_model, not here.')
  raise ValueError(f'model.architecture={cfg.architecture!r} is unknown; '
                   f'choose one of {ARCHITECTURES}.')


def dit_size(model_config) -> tuple[int, int, int]:
  """(hidden width, depth, heads) of a DiT: the preset's (`model.preset`: S, B, L, XL) or
  model.hidden, model.num_layers and model.num_heads when no preset is named."""
  cfg = model_config
  if cfg.preset:
    if cfg.preset not in DIT_PRESETS:
      raise ValueError(f'model.preset={cfg.preset!r} is unknown; choose one of '
                       f'{tuple(DIT_PRESETS)}, or \'\' to set model.hidden, model.num_layers '
                       'and model.num_heads yourself.')
    return DIT_PRESETS[cfg.preset]
  return cfg.hidden, cfg.num_layers, cfg.num_heads
