"""The custom-VJP attention: values and gradients equal plain softmax attention's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.models import attention as attn


def reference(q, k, v):
  """softmax(q k^T / sqrt(d)) v written out with einsums, [B, L, h, d]."""
  s = jnp.einsum('bqhd,bkhd->bhqk', q, k) / np.sqrt(q.shape[-1])
  return jnp.einsum('bhqk,bkhd->bqhd', jax.nn.softmax(s, axis=-1), v)


def reference_float64(q, k, v):
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  s = np.einsum('bqhd,bkhd->bhqk', q, k) / np.sqrt(q.shape[-1])
  p = np.exp(s - s.max(-1, keepdims=True))
  return np.einsum('bhqk,bkhd->bqhd', p / p.sum(-1, keepdims=True), v)


def qkv(shape, seed=0, dtype=jnp.float32):
  keys = jax.random.split(jax.random.PRNGKey(seed), 4)
  # Scaled up so that the softmax is far from uniform and the test has teeth.
  return [3.0 * jax.random.normal(k, shape, dtype) for k in keys]


@pytest.mark.parametrize('shape', [(2, 16, 4, 8), (3, 64, 2, 32), (1, 5, 1, 3)])
def test_lean_attention_matches_reference(shape):
  q, k, v, _ = qkv(shape)
  out = attn.lean_attention(q, k, v)
  # Logits here reach about +-30, so float32 rounding of q alone moves outputs by ~1e-5:
  # compare with the float64 result, as closely as XLA's own float32 attention gets to it.
  exact = reference_float64(q, k, v)
  xla_error = np.max(np.abs(np.asarray(jax.nn.dot_product_attention(q, k, v)) - exact))
  np.testing.assert_allclose(out, exact, rtol=0, atol=max(2 * xla_error, 1e-5))


@pytest.mark.parametrize('shape', [(2, 16, 4, 8), (1, 5, 1, 3)])
def test_lean_attention_gradients_match_reference(shape):
  q, k, v, g = qkv(shape, seed=1)
  loss = lambda f: (lambda q, k, v: jnp.sum(f(q, k, v) * g))
  got = jax.grad(loss(attn.lean_attention), argnums=(0, 1, 2))(q, k, v)
  want = jax.grad(loss(reference), argnums=(0, 1, 2))(q, k, v)
  dpa = jax.grad(loss(jax.nn.dot_product_attention), argnums=(0, 1, 2))(q, k, v)
  for a, b, c in zip(got, want, dpa):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(a, c, rtol=1e-4, atol=1e-4)


def test_lean_attention_under_jit_and_second_call():
  q, k, v, _ = qkv((2, 16, 4, 8))
  f = jax.jit(jax.value_and_grad(lambda q: jnp.sum(attn.lean_attention(q, k, v) ** 2)))
  val, grad = f(q)
  val2, grad2 = jax.value_and_grad(lambda q: jnp.sum(reference(q, k, v) ** 2))(q)
  np.testing.assert_allclose(val, val2, rtol=1e-5)
  # Gradients reach ~90 here; float32 autodiff of the reference is itself ~1.5e-4 from float64.
  np.testing.assert_allclose(grad, grad2, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(grad2))))


def test_bfloat16_keeps_dtype_and_is_close():
  q, k, v, _ = qkv((2, 16, 4, 8), dtype=jnp.bfloat16)
  out = attn.attention(q, k, v)
  assert out.dtype == jnp.bfloat16
  want = reference(*(x.astype(jnp.float32) for x in (q, k, v)))
  rel = float(jnp.linalg.norm(out.astype(jnp.float32) - want) / jnp.linalg.norm(want))
  assert rel < 0.02
  grads = jax.grad(lambda q: jnp.sum(attn.attention(q, k, v).astype(jnp.float32)))(q)
  assert grads.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(grads)))


def test_attention_dispatches_on_head_width():
  """Narrow heads on CPU take the custom-VJP path; wide heads XLA's own attention."""
  narrow = jax.make_jaxpr(attn.attention)(*qkv((1, 4, 2, 8))[:3])
  wide = jax.make_jaxpr(attn.attention)(*qkv((1, 4, 2, attn.LEAN_MAX_HEAD_DIM + 8))[:3])
  assert 'custom_vjp_call' in str(narrow)
  assert 'custom_vjp_call' not in str(wide)


def test_implementation_chosen_for_the_backend():
  assert attn.resolve('auto', jnp.bfloat16, 64, backend='gpu') == 'cudnn'
  assert attn.resolve('auto', jnp.float32, 64, backend='gpu') == 'xla'  # cuDNN: 16-bit only
  assert attn.resolve('auto', jnp.bfloat16, 256, backend='gpu') == 'xla'  # too wide for cuDNN
  assert attn.resolve('auto', jnp.float32, 8, backend='cpu') == 'lean'
  assert attn.resolve('auto', jnp.float32, 64, backend='cpu') == 'lean'
  assert attn.resolve('auto', jnp.float32, 128, backend='cpu') == 'xla'
  assert attn.resolve('auto', jnp.float32, 64, backend='tpu') == 'xla'
  assert attn.resolve('lean', jnp.float32, 64, backend='gpu') == 'lean'
  with pytest.raises(ValueError, match='model.attention'):
    attn.resolve('flash', jnp.float32, 64)


@pytest.mark.parametrize('implementation', ['auto', 'xla', 'lean'])
def test_every_cpu_implementation_agrees(implementation):
  q, k, v, g = qkv((2, 16, 4, 8), seed=3)
  exact = reference_float64(q, k, v)
  np.testing.assert_allclose(attn.attention(q, k, v, implementation), exact, atol=2e-5)
  grad = jax.grad(lambda q: jnp.sum(attn.attention(q, k, v, implementation) * g))(q)
  want = jax.grad(lambda q: jnp.sum(reference(q, k, v) * g))(q)
  np.testing.assert_allclose(grad, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('shape', [(2, 16, 4, 8), (1, 5, 1, 3)])
def test_forward_mode_jvp_matches_float64_finite_differences(shape):
  primals = tuple(qkv(shape, seed=4)[:3])
  tangents = tuple(qkv(shape, seed=5)[:3])
  f = jax.jit(lambda p, t: jax.jvp(attn.lean_attention_forward_mode, p, t))
  out, d_out = f(primals, tangents)
  primals64 = [np.asarray(a, np.float64) for a in primals]
  tangents64 = [np.asarray(a, np.float64) for a in tangents]
  step = 1e-6
  moved = lambda sign: reference_float64(*(p + sign * step * t for p, t in zip(primals64,
                                                                                  tangents64)))
  want = (moved(1) - moved(-1)) / (2 * step)
  np.testing.assert_array_equal(out, attn.lean_attention(*primals))
  # The logits reach about +-30 (see above): float32 rounding alone is ~1e-5 of the values.
  np.testing.assert_allclose(d_out, want, rtol=1e-3, atol=1e-4 * np.abs(want).max())


def test_forward_mode_keeps_the_lean_gradient():
  """A gradient of the jvp's primal output equals the lean kernel's gradient to float32 round-off
  (the primal is the custom-VJP kernel itself)."""
  q, k, v, g = qkv((2, 16, 4, 8), seed=6)

  def through_jvp(q):
    out, d_out = jax.jvp(attn.lean_attention_forward_mode, (q, k, v),
                         (jnp.ones_like(q), jnp.zeros_like(k), jnp.zeros_like(v)))
    return jnp.sum(out * g) + 0.0 * jnp.sum(jax.lax.stop_gradient(d_out))

  want = jax.grad(lambda q: jnp.sum(attn.lean_attention(q, k, v) * g))(q)
  np.testing.assert_allclose(jax.grad(through_jvp)(q), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('implementation', ['auto', 'xla', 'lean'])
def test_every_cpu_implementation_has_the_same_jvp(implementation):
  primals, tangents = tuple(qkv((2, 16, 4, 8), seed=7)[:3]), tuple(qkv((2, 16, 4, 8), seed=8)[:3])
  f = lambda q, k, v: attn.attention(q, k, v, implementation, forward_mode=True)
  want = jax.jvp(reference, primals, tangents)[1]
  np.testing.assert_allclose(jax.jvp(f, primals, tangents)[1], want, rtol=1e-4,
                             atol=1e-4 * float(jnp.max(jnp.abs(want))))


def test_forward_mode_never_takes_cudnn():
  assert attn.resolve('auto', jnp.bfloat16, 64, backend='gpu', forward_mode=True) == 'xla'
  assert attn.resolve('lean', jnp.bfloat16, 64, backend='gpu', forward_mode=True) == 'lean'
  with pytest.raises(ValueError, match="model.attention='cudnn'.*'auto' or 'xla'"):
    attn.resolve('cudnn', jnp.bfloat16, 64, backend='gpu', forward_mode=True)
