"""The fused GroupNorm(+SiLU): values and gradients equal flax's nn.GroupNorm followed by SiLU."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from diffusion_jax import parallel
from diffusion_jax.models import normalization


def reference(x, scale, bias, num_groups, silu):
  y = nn.GroupNorm(num_groups=num_groups, epsilon=1e-6, use_fast_variance=False).apply(
      {'params': {'scale': scale, 'bias': bias}}, x)
  return jax.nn.silu(y) if silu else y


def inputs(shape, seed=0, mean=0.0):
  kx, ks, kb, kg = jax.random.split(jax.random.PRNGKey(seed), 4)
  c = shape[-1]
  # Per-channel offsets and spreads, so that groups are not already normalised.
  offsets = mean + jax.random.normal(kb, (c,))
  x = offsets + (1 + jnp.arange(c) / c) * jax.random.normal(kx, shape)
  scale = 1 + 0.3 * jax.random.normal(ks, (c,))
  bias = 0.3 * jax.random.normal(kg, (c,))
  cotangent = jax.random.normal(jax.random.PRNGKey(seed + 1), shape)
  return x, scale, bias, cotangent


@pytest.mark.parametrize('silu', [False, True])
@pytest.mark.parametrize('shape,groups', [((2, 8, 8, 32), 8), ((3, 4, 4, 16), 16),
                                          ((1, 5, 3, 6), 2)])
def test_matches_flax_group_norm(shape, groups, silu):
  x, scale, bias, _ = inputs(shape)
  got = normalization.group_norm(x, scale, bias, groups, 1e-6, silu)
  np.testing.assert_allclose(got, reference(x, scale, bias, groups, silu), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('silu', [False, True])
def test_gradients_match_autodiff_of_flax(silu):
  x, scale, bias, g = inputs((2, 8, 8, 32), seed=3)
  loss = lambda f: (lambda x, s, b: jnp.sum(f(x, s, b) * g))
  ours = lambda x, s, b: normalization.group_norm(x, s, b, 8, 1e-6, silu)
  theirs = lambda x, s, b: reference(x, s, b, 8, silu)
  got = jax.grad(loss(ours), argnums=(0, 1, 2))(x, scale, bias)
  want = jax.grad(loss(theirs), argnums=(0, 1, 2))(x, scale, bias)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-4 * float(jnp.max(jnp.abs(b))))


def test_large_mean_keeps_precision():
  # The statistics come from E[x^2] - E[x]^2 per channel: a mean 100x the spread must not
  # cancel away the variance.
  x, scale, bias, _ = inputs((2, 8, 8, 16), mean=100.0)
  got = normalization.group_norm(x, scale, bias, 4, 1e-6, False)
  np.testing.assert_allclose(got, reference(x, scale, bias, 4, False), rtol=1e-3, atol=2e-3)


def test_bfloat16_input_keeps_dtype_with_float32_statistics():
  x, scale, bias, _ = inputs((2, 8, 8, 32))
  got = normalization.group_norm(x.astype(jnp.bfloat16), scale, bias, 8, 1e-6, True)
  assert got.dtype == jnp.bfloat16
  want = reference(x, scale, bias, 8, True)
  np.testing.assert_allclose(got.astype(jnp.float32), want, rtol=0.03, atol=0.03)
  dx = jax.grad(lambda x: jnp.sum(normalization.group_norm(x, scale, bias, 8, 1e-6, True)
                                  .astype(jnp.float32)))(x.astype(jnp.bfloat16))
  assert dx.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(dx)))


def test_parameter_gradients_inside_shard_map_sum_over_devices():
  """Replicated scale and bias, data sharded over 4 devices: the gradients are the full-batch
  gradients on every device (the custom VJP's per-shard gradients are summed over devices)."""
  mesh = parallel.create_mesh()
  assert mesh.size == 4
  x, scale, bias, g = inputs((8, 4, 4, 16), seed=5)

  def loss(params, x, g):
    return jnp.sum(normalization.group_norm(x, params['scale'], params['bias'], 4, 1e-6, True)
                   * g)

  sharded = jax.jit(jax.shard_map(jax.grad(loss), mesh=mesh, in_specs=(P(), P(parallel.AXIS),
                                                                   P(parallel.AXIS)),
                                  out_specs=P()))
  params = {'scale': scale, 'bias': bias}
  got = sharded(params, x, g)
  want = jax.grad(loss)(params, x, g)
  for name in params:
    np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-4)


def test_module_parameters_and_bad_group_count():
  module = normalization.GroupNorm(num_groups=4, silu=True)
  x = jnp.ones((1, 2, 2, 8))
  params = module.init(jax.random.PRNGKey(0), x)['params']
  assert set(params) == {'scale', 'bias'} and params['scale'].shape == (8,)
  with pytest.raises(ValueError, match='model.num_groups'):
    normalization.GroupNorm(num_groups=3).init(jax.random.PRNGKey(0), x)


def reference_float64(x, scale, bias, num_groups, silu, epsilon=1e-6):
  """GroupNorm (+ SiLU) written from its definition in float64 NumPy."""
  b, h, w, c = x.shape
  g = np.asarray(x, np.float64).reshape(b, h, w, num_groups, c // num_groups)
  mean = g.mean(axis=(1, 2, 4), keepdims=True)
  var = ((g - mean) ** 2).mean(axis=(1, 2, 4), keepdims=True)
  y = ((g - mean) / np.sqrt(var + epsilon)).reshape(x.shape) * scale + bias
  return y / (1 + np.exp(-y)) if silu else y


@pytest.mark.parametrize('silu', [False, True])
def test_forward_mode_jvp_matches_float64_finite_differences(silu):
  x, scale, bias, _ = inputs((2, 4, 4, 16), seed=7)
  tangents = tuple(jax.random.normal(key, a.shape) for key, a in
              zip(jax.random.split(jax.random.PRNGKey(8), 3), (x, scale, bias)))
  f = lambda x, s, b: normalization.group_norm(x, s, b, 4, 1e-6, silu, forward_mode=True)
  out, d_out = jax.jit(lambda p, t: jax.jvp(f, p, t))((x, scale, bias), tangents)
  primals64 = [np.asarray(a, np.float64) for a in (x, scale, bias)]
  tangents64 = [np.asarray(a, np.float64) for a in tangents]
  step = 1e-6
  moved = lambda sign: reference_float64(
      *(p + sign * step * t for p, t in zip(primals64, tangents64)), 4, silu)
  want = (moved(1) - moved(-1)) / (2 * step)
  np.testing.assert_allclose(out, reference_float64(*primals64, 4, silu), atol=2e-5)
  np.testing.assert_allclose(d_out, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_forward_mode_keeps_the_values_and_the_custom_gradient():
  """The same output bit for bit; a gradient of the jvp's primal output equals the custom-VJP
  gradient to 1e-6, and the plain gradient of the forward-mode layer (the transposed JVP rule)
  agrees to 2e-4."""
  x, scale, bias, g = inputs((2, 8, 8, 32), seed=9)
  plain = lambda x, s: normalization.group_norm(x, s, bias, 8, 1e-6, True)
  forward = lambda x, s: normalization.group_norm(x, s, bias, 8, 1e-6, True, forward_mode=True)
  np.testing.assert_array_equal(jax.jit(forward)(x, scale), jax.jit(plain)(x, scale))

  def through_jvp(x, s):
    out, d_out = jax.jvp(forward, (x, s), (jnp.ones_like(x), jnp.zeros_like(s)))
    return jnp.sum(out * g) + 0.0 * jnp.sum(jax.lax.stop_gradient(d_out))

  want = jax.grad(lambda x, s: jnp.sum(plain(x, s) * g), argnums=(0, 1))(x, scale)
  got = jax.grad(through_jvp, argnums=(0, 1))(x, scale)
  transposed = jax.grad(lambda x, s: jnp.sum(forward(x, s) * g), argnums=(0, 1))(x, scale)
  for a, b, c in zip(got, transposed, want):
    np.testing.assert_allclose(a, c, rtol=1e-6, atol=1e-6 * float(jnp.max(jnp.abs(c))))
    np.testing.assert_allclose(b, c, rtol=2e-4, atol=2e-4 * float(jnp.max(jnp.abs(c))))


def test_forward_mode_inside_shard_map():
  """jax.jvp of the layer inside shard_map, with replicated parameters, as a train step takes it:
  the tangents equal the unsharded ones."""
  mesh = parallel.create_mesh()
  x, scale, bias, g = inputs((8, 4, 4, 16), seed=11)
  f = lambda x, s: normalization.group_norm(x, s, bias, 4, 1e-6, True, forward_mode=True)
  jvp = lambda x, s, dx: jax.jvp(f, (x, s), (dx, jnp.ones_like(s)))[1]
  sharded = jax.jit(jax.shard_map(jvp, mesh=mesh, in_specs=(P(parallel.AXIS), P(),
                                                            P(parallel.AXIS)),
                                  out_specs=P(parallel.AXIS)))
  np.testing.assert_allclose(sharded(x, scale, g), jvp(x, scale, g), rtol=1e-5, atol=1e-5)
