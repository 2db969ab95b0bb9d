"""DiT: the reference's parameter and FLOP counts, shapes, adaLN-Zero, conditioning, RoPE."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.models import DiT, dit


def reference_parameter_count(hidden, depth, patch=2, in_ch=4, out_ch=8, classes=1000,
                              tokens=256, freq=256, mlp_ratio=4):
  """facebookresearch/DiT models.py, layer by layer (its frozen pos_embed included)."""
  linear = lambda i, o: i * o + o
  embed = linear(in_ch * patch * patch, hidden) + linear(freq, hidden) + linear(hidden, hidden)
  embed += (classes + 1) * hidden + tokens * hidden
  block = (linear(hidden, 3 * hidden) + linear(hidden, hidden) +
           linear(hidden, mlp_ratio * hidden) + linear(mlp_ratio * hidden, hidden) +
           linear(hidden, 6 * hidden))
  final = linear(hidden, patch * patch * out_ch) + linear(hidden, 2 * hidden)
  return embed + depth * block + final


def reference_config(preset):
  hidden, depth, heads = dit.PRESETS[preset]
  return DiT(hidden=hidden, depth=depth, num_heads=heads, patch_size=2, num_classes=1000,
             out_channels=8)


def abstract_params(model, shape, labels=True):
  x = jnp.zeros((1,) + shape)
  t = jnp.zeros((1,), jnp.int32)
  y = jnp.zeros((1,), jnp.int32) if labels else None
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, t, y))['params'], (x, t, y)


@pytest.mark.parametrize('preset,paper_params,paper_gflops', [('XL', 675_129_632, 118.6),
                                                               ('B', 130_512_416, 23.0)])
def test_reference_parameter_and_flop_counts(preset, paper_params, paper_gflops):
  """The counts the reference code prints (675,129,632 for XL/2) and the paper's forward
  GFLOPs (multiply-adds) at 32x32x4 latents, 1,000 classes, learned variance (8 channels)."""
  hidden, depth, _ = dit.PRESETS[preset]
  assert reference_parameter_count(hidden, depth) == paper_params
  model = reference_config(preset)
  params, (x, t, y) = abstract_params(model, (32, 32, 4))
  ours = sum(p.size for p in jax.tree.leaves(params))
  assert ours + 256 * hidden == paper_params  # the reference keeps the table as a parameter
  cost = jax.jit(lambda p: model.apply({'params': p}, x, t, y)).lower(params).cost_analysis()
  multiply_adds = cost['flops'] / 2 / 1e9
  # XLA also counts the elementwise work (softmax, norms, GELU) that the paper leaves out.
  assert paper_gflops <= multiply_adds < paper_gflops * 1.01


def small(**kw):
  args = dict(hidden=32, depth=2, num_heads=4, patch_size=2)
  args.update(kw)
  return DiT(**args)


def perturbed(params, scale=0.05, seed=1):
  """Zero-initialised gates and outputs would hide every dependence: perturb all parameters."""
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.tree.unflatten(tree, [p + scale * jax.random.normal(k, p.shape)
                                   for p, k in zip(leaves, keys)])


@pytest.mark.parametrize('kw', [{}, {'qk_norm': True}, {'rope': True}, {'patch_size': 4},
                                {'num_classes': 10, 'out_channels': 6}])
def test_output_shape_and_conditioning(kw):
  model = small(**kw)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 3))
  t = jnp.array([10, 500])
  labels = jnp.array([1, 3]) if kw.get('num_classes') else None
  params = model.init(jax.random.PRNGKey(0), x, t, labels)
  out0 = model.apply(params, x, t, labels)
  # adaLN-Zero: gates and the output layer start at zero, so the network starts at 0.
  assert out0.shape == (2, 8, 8, kw.get('out_channels', 3)) and not np.any(np.asarray(out0))
  params = perturbed(params)
  out = model.apply(params, x, t, labels)
  assert out.dtype == jnp.float32 and np.all(np.isfinite(out))
  assert not np.allclose(out, model.apply(params, x, t + 100, labels), atol=1e-4)
  if labels is not None:  # the "no label" row is used when labels are not given
    assert not np.allclose(out, model.apply(params, x, t, labels + 1), atol=1e-4)
    np.testing.assert_allclose(model.apply(params, x, t),
                               model.apply(params, x, t, jnp.full((2,), 10)), rtol=1e-6)


def test_tokens_see_each_other_and_positions():
  """Changing one patch changes the output of other patches (attention), and the position
  embedding makes the network not equivariant to shifting the image by a patch."""
  model = small()
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 8, 8, 3))
  t = jnp.array([3])
  params = perturbed(model.init(jax.random.PRNGKey(0), x, t))
  out = model.apply(params, x, t)
  changed = model.apply(params, x.at[0, :2, :2].add(1.0), t)
  assert not np.allclose(out[0, 4:, 4:], changed[0, 4:, 4:], atol=1e-5)
  shifted = model.apply(params, jnp.roll(x, 2, axis=2), t)
  assert not np.allclose(jnp.roll(out, 2, axis=2), shifted, atol=1e-4)


def test_rope_depends_on_relative_positions_only():
  """q . k after RoPE at positions (p, p') equals that at (p + s, p' + s), written in float64."""
  grid, d = (6, 6), 8
  rng = np.random.default_rng(0)
  q, k = rng.normal(size=(2, 1, 36, 1, d))
  rq, rk = (np.asarray(dit.rope_2d(jnp.asarray(a, jnp.float32), grid), np.float64) for a in (q, k))
  index = lambda r, c: r * grid[1] + c
  for (r1, c1), (r2, c2), (sr, sc) in [((0, 0), (2, 3), (1, 2)), ((1, 4), (3, 0), (2, 1))]:
    a = rq[0, index(r1, c1), 0] @ rk[0, index(r2, c2), 0]
    # the same q and k vectors placed at shifted positions
    q_at = np.asarray(dit.rope_2d(jnp.asarray(np.broadcast_to(q[0, index(r1, c1)], (1, 36, 1, d)),
                                              jnp.float32), grid))[0, index(r1 + sr, c1 + sc), 0]
    k_at = np.asarray(dit.rope_2d(jnp.asarray(np.broadcast_to(k[0, index(r2, c2)], (1, 36, 1, d)),
                                              jnp.float32), grid))[0, index(r2 + sr, c2 + sc), 0]
    np.testing.assert_allclose(q_at.astype(np.float64) @ k_at, a, rtol=1e-5)
    # and the rotation keeps lengths
    np.testing.assert_allclose(np.linalg.norm(rq[0, index(r1, c1), 0]),
                               np.linalg.norm(q[0, index(r1, c1), 0]), rtol=1e-6)


def test_sincos_table_matches_formula():
  table = dit.sincos_table((3, 4), 8)
  row, col = 2, 1  # token 2 * 4 + 1
  omega = 1.0 / 10000 ** (np.arange(2) / 2)
  want = np.concatenate([np.sin(col * omega), np.cos(col * omega),
                         np.sin(row * omega), np.cos(row * omega)])
  np.testing.assert_allclose(table[9], want, rtol=1e-6)


def test_bfloat16_close_to_float32():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 3))
  t = jnp.array([10, 500])
  params = perturbed(small().init(jax.random.PRNGKey(0), x, t))
  out32 = small().apply(params, x, t)
  out16 = small(dtype=jnp.bfloat16).apply(params, x, t)
  assert out16.dtype == jnp.float32
  np.testing.assert_allclose(out16, out32, atol=0.05 * float(jnp.max(jnp.abs(out32))))
