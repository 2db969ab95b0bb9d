"""diffusers' `AutoencoderKL` checkpoints (a folder with `config.json` and
`diffusion_pytorch_model.safetensors`, e.g. stabilityai/sd-vae-ft-mse) read into
`AutoencoderKL`'s parameters with the safetensors package's NumPy reader: no torch.

Tensors are placed by name: diffusers' `encoder.down_blocks.0.resnets.1.conv1.weight` is
encoder/down_blocks_0/resnets_1/conv1/kernel here. Convolution kernels [out, in, kh, kw] become
[kh, kw, in, out], linear weights [out, in] become [in, out], normalisation weights are scales.
The attention names of older checkpoints (query, key, value, proj_attn) are read as today's
(to_q, to_k, to_v, to_out.0). A tensor that has no place, one of another shape, or a parameter no
tensor fills stops the load with its name.
"""

from __future__ import annotations

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from diffusion_jax.models.autoencoder import AutoencoderKL

WEIGHTS_FILE = 'diffusion_pytorch_model.safetensors'
CONFIG_FILE = 'config.json'
OLD_ATTENTION_NAMES = {'query': 'to_q', 'key': 'to_k', 'value': 'to_v', 'proj_attn': 'to_out.0'}
SD_SCALING_FACTOR = 0.18215  # Stable Diffusion 1.x / 2.x VAE: latents times this have unit scale


def read_config(folder: str) -> dict:
  """The folder's config.json as AutoencoderKL's fields plus `scaling_factor`; refuses block
  types this network does not build."""
  path = os.path.join(folder, CONFIG_FILE)
  try:
    with open(path, encoding='utf-8') as f:
      cfg = json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f'{path} cannot be read as an AutoencoderKL config.json ({e}); give the '
                     'folder of a diffusers AutoencoderKL (config.json and '
                     f'{WEIGHTS_FILE}).') from e
  for key, wanted in (('down_block_types', 'DownEncoderBlock2D'),
                      ('up_block_types', 'UpDecoderBlock2D')):
    if any(kind != wanted for kind in cfg.get(key, [wanted])):
      raise ValueError(f'{path}: {key}={cfg[key]}; this AutoencoderKL builds {wanted} only.')
  for key in ('mid_block_add_attention', 'use_quant_conv', 'use_post_quant_conv'):
    if not cfg.get(key, True):
      raise ValueError(f'{path}: {key}=false; this AutoencoderKL always has it.')
  if cfg.get('in_channels', 3) != cfg.get('out_channels', 3):
    raise ValueError(f'{path}: in_channels and out_channels differ; they must agree.')
  return dict(in_channels=cfg.get('in_channels', 3), latent_channels=cfg.get('latent_channels', 4),
              block_out_channels=tuple(cfg.get('block_out_channels', (64,))),
              layers_per_block=cfg.get('layers_per_block', 1),
              num_groups=cfg.get('norm_num_groups', 32),
              scaling_factor=float(cfg.get('scaling_factor', SD_SCALING_FACTOR)))


def param_path(key: str) -> tuple[str, ...]:
  """diffusers' tensor name -> the path of its parameter here (the leaf still 'weight'/'bias')."""
  for old, new in OLD_ATTENTION_NAMES.items():
    key = re.sub(rf'\.{old}\.(weight|bias)$', rf'.{new}.\1', key)
  return tuple(re.sub(r'\.(\d+)', r'_\1', key).split('.'))


def _layout(tensor: np.ndarray, name: str, shape: tuple) -> np.ndarray:
  """A diffusers tensor in the layout of the flax parameter `name` of `shape`."""
  if name == 'kernel' and len(shape) == 4:  # conv: [out, in, kh, kw] -> [kh, kw, in, out]
    return np.transpose(tensor, (2, 3, 1, 0))
  if name == 'kernel':  # linear (older checkpoints: a 1x1 conv) [out, in] -> [in, out]
    return tensor.reshape(tensor.shape[:2]).T
  return tensor


def load_params(folder: str, model: AutoencoderKL) -> dict:
  """`model`'s parameters (float32 NumPy, nested like `model.init`'s) from the folder's
  safetensors file."""
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  path = os.path.join(folder, WEIGHTS_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} does not exist; give the folder of a diffusers AutoencoderKL '
                            f'(config.json and {WEIGHTS_FILE}).')
  size = 8 * model.downsampling
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                          jnp.zeros((1, size, size, model.in_channels)))['params']
  wanted = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(shapes).items()}
  params = {}
  for key, tensor in load_file(path).items():
    *module, leaf = param_path(key)
    name = 'bias' if leaf == 'bias' else 'kernel' if (*module, 'kernel') in wanted else 'scale'
    target = (*module, name)
    if leaf not in ('weight', 'bias') or target not in wanted:
      raise ValueError(f'{path}: tensor {key} {tuple(tensor.shape)} has no place in '
                       f'AutoencoderKL{_fields(model)}; is this an AutoencoderKL of that '
                       'config.json?')
    value = _layout(np.asarray(tensor, np.float32), name, wanted[target])
    if value.shape != wanted[target]:
      raise ValueError(f'{path}: tensor {key} has shape {tuple(tensor.shape)}, which does not '
                       f'fit {"/".join(target)} {wanted[target]} of AutoencoderKL'
                       f'{_fields(model)}; the weights and config.json disagree.')
    params[target] = value
  missing = sorted('/'.join(k) for k in set(wanted) - set(params))
  if missing:
    raise ValueError(f'{path} lacks {len(missing)} parameters of AutoencoderKL{_fields(model)}, '
                     f'e.g. {missing[:3]}; the weights and config.json disagree.')
  return traverse_util.unflatten_dict(params)


def _fields(model: AutoencoderKL) -> str:
  return (f'(block_out_channels={tuple(model.block_out_channels)}, layers_per_block='
          f'{model.layers_per_block}, latent_channels={model.latent_channels})')


def load(folder: str, **model_kwargs) -> tuple[AutoencoderKL, dict, float]:
  """(the network, its parameters, the latent scaling factor) of a diffusers AutoencoderKL
  folder; `model_kwargs` (dtype, attention) go to the network."""
  fields = read_config(folder)
  scaling = fields.pop('scaling_factor')
  model = AutoencoderKL(**fields, **model_kwargs)
  return model, load_params(folder, model), scaling
