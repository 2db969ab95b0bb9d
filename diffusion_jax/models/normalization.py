"""Group normalisation (Wu & He 2018), optionally fused with the SiLU that follows it.

`group_norm(x, scale, bias)` normalises x [B, H, W, C] over H, W and the channels of each of
`num_groups` groups, then applies the per-channel affine map (and SiLU when `silu=True`). It is
the U-Net's most frequent layer, and on XLA:CPU the straightforward formulation (flax's
`nn.GroupNorm`, a reduction over axes (1, 3) of [B, H*W, G, C/G]) runs several times slower than
the memory traffic requires. Here the statistics are summed over H and W first, into [B, C], and
then over the channels of each group, and the per-channel coefficients of the affine map come
out of small matmuls; the forward pass is then two reductions over x (sums of x and x^2) and one
elementwise pass. A custom VJP gives the backward pass the same shape: reductions for the [B, C]
sums of the gradient and one elementwise pass for dx, recomputing the normalised values instead
of saving them. Statistics are float32 whatever the dtype of x; the output has x's dtype.

Forward-mode differentiation (`jax.jvp`, which objectives such as MeanFlow take of the whole
network) cannot pass a custom VJP, so `group_norm(..., forward_mode=True)` wraps the same kernel
in a custom JVP: its primal output is the custom-VJP kernel (a gradient of that output still
takes the backward above) and its tangent is the JVP written out in the same shape, two
reductions and one elementwise pass.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def _expand(stats: jnp.ndarray, weights: jnp.ndarray) -> jnp.ndarray:
  """[B, G] group values -> [B, 1, 1, C]: each group's value times `weights` [G, C].

  `weights` is zero outside a group's own channels. Every per-channel coefficient that a
  [B, H, W, C] loop reads is made by this product: XLA materialises a dot's result, whereas an
  elementwise [B, C] expression (a repeat, a product with `scale`) would be fused into, and
  re-evaluated at, every element of the loop.
  """
  out = jnp.dot(stats, weights, precision=jax.lax.Precision.HIGHEST)
  return out.reshape(stats.shape[0], 1, 1, weights.shape[-1])


def _membership(num_groups: int, channels: int, scale=None) -> jnp.ndarray:
  """[G, C]: 1 (or the channel's `scale`) where the channel belongs to the group, else 0."""
  m = jnp.repeat(jnp.eye(num_groups, dtype=jnp.float32), channels // num_groups, axis=1)
  return m if scale is None else m * scale


def _group_sums(per_channel: jnp.ndarray, num_groups: int) -> jnp.ndarray:
  """[B, C] -> [B, G]: sums over the channels of each group."""
  b, c = per_channel.shape
  return per_channel.reshape(b, num_groups, c // num_groups).sum(-1)


def _statistics(x: jnp.ndarray, num_groups: int, epsilon: float):
  """Float32 mean and 1/std per example and group, each [B, G], from one pass over x.

  Each channel's mean and variance come from its sums of x and x^2 over H and W; the group's
  variance is the mean of its channels' variances plus the spread of their means, so only the
  within-channel spread is subject to the cancellation of E[x^2] - E[x]^2.
  """
  b, h, w, c = x.shape
  x = x.astype(jnp.float32)
  channel_mean = jnp.mean(x, axis=(1, 2))  # [B, C]
  channel_var = jnp.maximum(jnp.mean(x * x, axis=(1, 2)) - channel_mean * channel_mean, 0.0)
  channel_mean = channel_mean.reshape(b, num_groups, c // num_groups)
  mean = channel_mean.mean(-1)
  var = (channel_var.reshape(b, num_groups, c // num_groups).mean(-1)
         + jnp.square(channel_mean - mean[..., None]).mean(-1))
  return mean, jax.lax.rsqrt(var + epsilon)


def _affine(mean, inv_std, scale, bias):
  """[B, G] statistics -> a, b [B, 1, 1, C] with scale * (x - mean) / std + bias = x a + b."""
  g, c = mean.shape[-1], scale.shape[-1]
  scaled = _membership(g, c, scale)
  a = _expand(inv_std, scaled)
  # b = -mean * inv_std * scale + bias, as one product: [-mean * inv_std, 1] x [scaled; bias].
  ones = jnp.ones_like(mean[:, :1])
  b = _expand(jnp.concatenate([-mean * inv_std, ones], axis=-1),
              jnp.concatenate([scaled, bias[None].astype(jnp.float32)], axis=0))
  return a, b


def _forward(x, scale, bias, num_groups, epsilon, silu):
  mean, inv_std = _statistics(x, num_groups, epsilon)
  a, b = _affine(mean, inv_std, scale, bias)
  y = x.astype(jnp.float32) * a + b
  out = jax.nn.silu(y) if silu else y
  return out.astype(x.dtype), (x, scale, bias, mean, inv_std)


def group_norm(x: jnp.ndarray, scale: jnp.ndarray, bias: jnp.ndarray, num_groups: int = 32,
               epsilon: float = 1e-6, silu: bool = False,
               forward_mode: bool = False) -> jnp.ndarray:
  """GroupNorm of x [B, H, W, C] with float32 scale and bias [C]; then SiLU if `silu`.

  Returns [B, H, W, C] in x's dtype. `num_groups` must divide C. With `forward_mode` the layer
  also has a rule for `jax.jvp` (and stays differentiable in reverse mode).
  """
  # Inside shard_map, parameters are replicated while x varies over the data axis; the custom
  # VJP returns per-shard parameter gradients, so the parameters enter it marked as varying
  # (the transpose of that mark is the sum over shards).
  scale, bias = (_varying_like(a, x) for a in (scale, bias))
  kernel = _group_norm_forward_mode if forward_mode else _group_norm
  return kernel(x, scale, bias, num_groups, epsilon, silu)


def _varying_like(a: jnp.ndarray, x: jnp.ndarray) -> jnp.ndarray:
  """`a` marked as varying over the shard_map axes that x varies over; `a` itself elsewhere."""
  axes = tuple(sorted(_varying_axes(x) - _varying_axes(a)))
  return jax.lax.pcast(a, axes, to='varying') if axes else a


def _varying_axes(a: jnp.ndarray) -> frozenset:
  """The shard_map axes over which `a`'s value differs between shards (empty outside)."""
  aval = jax.typeof(a)
  manual = getattr(aval, 'manual_axis_type', None)  # jax >= 0.10; `vma` before
  return frozenset(manual.varying if manual is not None else getattr(aval, 'vma', ()))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _group_norm(x, scale, bias, num_groups, epsilon, silu):
  return _forward(x, scale, bias, num_groups, epsilon, silu)[0]


def _group_norm_fwd(x, scale, bias, num_groups, epsilon, silu):
  return _forward(x, scale, bias, num_groups, epsilon, silu)


def _group_norm_bwd(num_groups, epsilon, silu, res, d_out):
  """With x_hat = (x - mean) / std and dy the gradient at the affine output:
  d scale = sum dy x_hat, d bias = sum dy, and
  dx = (dy scale - mean_g(dy scale) - x_hat mean_g(dy scale x_hat)) / std,
  written as dx = dy * u + x * v + w with [B, 1, 1, C] coefficients u, v, w.
  """
  del epsilon
  x, scale, bias, mean, inv_std = res
  _, h, w, c = x.shape
  x32 = x.astype(jnp.float32)
  dy = d_out.astype(jnp.float32)
  if silu:
    a, b = _affine(mean, inv_std, scale, bias)
    y = x32 * a + b
    sig = jax.nn.sigmoid(y)
    dy = dy * (sig * (1 + y * (1 - sig)))
  # Per example and channel, over H and W: sums of dy and of dy * x_hat.
  sum_dy = jnp.sum(dy, axis=(1, 2))  # [B, C]
  sum_dy_x = jnp.sum(dy * x32, axis=(1, 2))
  mean_c, inv_c = (jnp.repeat(s, c // num_groups, axis=-1) for s in (mean, inv_std))
  sum_dy_xhat = inv_c * (sum_dy_x - mean_c * sum_dy)
  n = h * w * (c // num_groups)
  m1 = _group_sums(sum_dy * scale, num_groups) / n  # [B, G]: mean_g(dy scale)
  m2 = _group_sums(sum_dy_xhat * scale, num_groups) / n  # mean_g(dy scale x_hat)
  membership = _membership(num_groups, c)
  u = _expand(inv_std, _membership(num_groups, c, scale))
  v = _expand(-inv_std * inv_std * m2, membership)
  w_ = _expand(inv_std * (inv_std * mean * m2 - m1), membership)
  dx = dy * u + x32 * v + w_
  return dx.astype(x.dtype), jnp.sum(sum_dy_xhat, 0), jnp.sum(sum_dy, 0)


_group_norm.defvjp(_group_norm_fwd, _group_norm_bwd)


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4, 5))
def _group_norm_forward_mode(x, scale, bias, num_groups, epsilon, silu):
  return _group_norm(x, scale, bias, num_groups, epsilon, silu)


@_group_norm_forward_mode.defjvp
def _group_norm_jvp(num_groups, epsilon, silu, primals, tangents):
  """With x_hat = (x - mean) / std, y = scale x_hat + bias and m_g the mean over a group:
  d x_hat = (dx - m_g(dx) - x_hat m_g(x_hat dx)) / std and dy = scale d x_hat + x_hat d scale +
  d bias, written as dy = dx * u + x * v + w with [B, 1, 1, C] coefficients u, v, w; then
  d SiLU(y) = dy sigmoid(y) (1 + y (1 - sigmoid(y))).
  """
  x, scale, bias = primals
  dx, d_scale, d_bias = tangents
  out = _group_norm(x, scale, bias, num_groups, epsilon, silu)
  _, h, w, c = x.shape
  x32, dx32 = x.astype(jnp.float32), dx.astype(jnp.float32)
  mean, inv_std = _statistics(x, num_groups, epsilon)
  n = h * w * (c // num_groups)
  sum_dx = _group_sums(jnp.sum(dx32, axis=(1, 2)), num_groups)  # [B, G]
  sum_x_dx = _group_sums(jnp.sum(x32 * dx32, axis=(1, 2)), num_groups)
  m1 = sum_dx / n  # m_g(dx)
  m2 = inv_std * (sum_x_dx - mean * sum_dx) / n  # m_g(x_hat dx)
  scaled = _membership(num_groups, c, scale)
  d_scaled = _membership(num_groups, c, d_scale)
  # Each product keeps the tangent on one side (m1, m2 or d_scale), so that the rule stays
  # linear, and transposable, in the tangents.
  u = _expand(inv_std, scaled)
  v = _expand(-inv_std * inv_std * m2, scaled) + _expand(inv_std, d_scaled)
  w_ = (_expand(inv_std * (inv_std * mean * m2 - m1), scaled) + _expand(-mean * inv_std, d_scaled)
        + d_bias.astype(jnp.float32))
  dy = dx32 * u + x32 * v + w_
  if silu:
    a, b = _affine(mean, inv_std, scale, bias)
    y = x32 * a + b
    sig = jax.nn.sigmoid(y)
    dy = dy * (sig * (1 + y * (1 - sig)))
  return out, dy.astype(out.dtype)


class GroupNorm(nn.Module):
  """`group_norm` with learned float32 `scale` (ones) and `bias` (zeros) over the last axis."""
  num_groups: int = 32
  epsilon: float = 1e-6
  silu: bool = False
  dtype: Any = jnp.float32
  forward_mode: bool = False  # also differentiable by jax.jvp

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    c = x.shape[-1]
    if c % self.num_groups:
      raise ValueError(f'model.num_groups: {self.num_groups} groups do not divide {c} channels; '
                       'choose a divisor of every level\'s width.')
    scale = self.param('scale', nn.initializers.ones, (c,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (c,), jnp.float32)
    return group_norm(x.astype(self.dtype), scale, bias, self.num_groups, self.epsilon, self.silu,
                      self.forward_mode)
