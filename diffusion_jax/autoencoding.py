"""Training latent diffusion's first stage (`model.architecture = 'autoencoder'`).

A KL-regularised autoencoder (`models.AutoencoderKL`, Rombach et al. 2022) trained on images
with a reconstruction loss and a small KL term towards N(0, I):

  loss = mean over pixels of |x - D(z)|  (or its square, autoencoder.loss = l2)
         + autoencoder.kl_weight * KL(q(z | x) || N(0, I)) / (number of pixels x channels)
  z = mean + exp(logvar / 2) * eps      (one draw of the encoder's Gaussian per example)

Dividing the KL sum by the image's size makes `kl_weight` the weight latent diffusion's code
gives it against a reconstruction loss summed over pixels (1e-6 in its KL-f4/f8 configs). The
network is built from the `autoencoder` group (`create_model`); `psnr` measures reconstructions.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import images, parallel, sources
from diffusion_jax.models import DTYPES
from diffusion_jax.models.autoencoder import AutoencoderKL

LOSSES = ('l1', 'l2')


def model_fields(ac) -> dict:
  """AutoencoderKL's shape fields from a config's `autoencoder` group."""
  return dict(latent_channels=ac.latent_channels, block_out_channels=tuple(ac.block_out_channels),
              layers_per_block=ac.layers_per_block, num_groups=ac.num_groups)


def create_model(config) -> AutoencoderKL:
  """The autoencoder of `config.autoencoder` for `config.data.channels`-channel images, computing
  in model.dtype with model.attention's kernel."""
  return AutoencoderKL(in_channels=config.data.channels, dtype=DTYPES[config.model.dtype],
                       attention=config.model.attention, **model_fields(config.autoencoder))


def kl_to_standard_normal(mean: jnp.ndarray, logvar: jnp.ndarray) -> jnp.ndarray:
  """KL(N(mean, exp(logvar)) || N(0, I)) of each example, summed over its dimensions: [B]."""
  terms = 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
  return jnp.sum(terms.reshape(terms.shape[0], -1), axis=-1)


def loss_per_example(encode: Callable, decode: Callable, x: jnp.ndarray, keys: jnp.ndarray, *,
                     loss: str, kl_weight: float) -> jnp.ndarray:
  """The training loss of each example (the module docstring's formula).

  Args:
    encode: images [B, H, W, C] -> (mean, logvar), each [B, h, w, c].
    decode: latents [B, h, w, c] -> images [B, H, W, C].
    x: float32 [B, H, W, C] in [-1, 1].
    keys: [B, 2], one key per example for its latent draw.
  Returns:
    float32 [B].
  """
  mean, logvar = encode(x)
  eps = jax.vmap(lambda k: jax.random.normal(k, mean.shape[1:]))(keys)
  recon = decode(mean + jnp.exp(0.5 * logvar) * eps)
  err = jnp.abs(recon - x) if loss == 'l1' else jnp.square(recon - x)
  err = jnp.mean(err.reshape(err.shape[0], -1), axis=-1)
  size = math.prod(x.shape[1:])
  return err + kl_weight * kl_to_standard_normal(mean, logvar) / size


def psnr(x: jnp.ndarray, recon: jnp.ndarray) -> jnp.ndarray:
  """Peak signal-to-noise ratio of each image in dB, for images in [-1, 1] (peak-to-peak 2,
  the reconstruction clipped to that range): 10 log10(4 / mean squared error). [B]."""
  err = jnp.square(jnp.clip(recon, -1.0, 1.0) - x)
  mse = jnp.mean(err.reshape(err.shape[0], -1), axis=-1)
  return 10.0 * jnp.log10(4.0 / jnp.maximum(mse, 1e-12))


def loss_and_grads(params, x: jnp.ndarray, keys: jnp.ndarray, *, specs, model: AutoencoderKL,
                   ac) -> tuple[jnp.ndarray, dict]:
  """Per device (inside training's shard_map): the global batch's mean loss and its gradient.

  Args:
    params: this device's shards of the parameters (split as `specs` says).
    x: float32 [b, H, W, C], this device's share of the batch; keys: [b, 2], one per example.
    ac: the config's autoencoder group (loss, kl_weight).
  """
  def loss_fn(shards):
    whole = {'params': parallel.gather(shards, specs)}
    per_example = loss_per_example(
        lambda v: model.apply(whole, v, method=AutoencoderKL.encode),
        lambda z: model.apply(whole, z, method=AutoencoderKL.decode), x, keys,
        loss=ac.loss, kl_weight=ac.kl_weight)
    return jax.lax.pmean(jnp.mean(per_example), parallel.BATCH_AXES)

  return jax.value_and_grad(loss_fn)(params)


def reconstruction_preview(config, model: AutoencoderKL, per_row: int = 8) -> Callable:
  """Training's preview of an autoencoder run: generate(params, rng, n) -> rows of `per_row` of
  the first n training images, each followed by a row of their reconstructions (`generate.ncols`
  images per row), float32 in [-1, 1]."""
  examples = sources.open_examples(config, config.data.splits)
  n = min(config.sampling.preview_samples, len(examples))
  x = images.to_model_range(examples.read(np.arange(n))[0])
  reconstruct = jax.jit(lambda params, v: model.apply({'params': params}, v))

  def generate(params, rng, count):
    del rng
    shown = x[:count]
    recon = np.asarray(reconstruct(params, shown))
    return np.concatenate([part for i in range(0, len(shown), per_row)
                           for part in (shown[i:i + per_row], recon[i:i + per_row])])

  generate.ncols = per_row
  return generate
