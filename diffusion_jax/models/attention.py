"""Scaled dot-product attention: `jax.nn.dot_product_attention` with the implementation chosen for
the backend, and a memory-lean custom-VJP version for narrow heads on CPU.

`attention(q, k, v, implementation)` is softmax(q k^T / sqrt(d)) v over [B, L, heads, d] arrays.
`implementation` ('auto', 'xla', 'cudnn' or 'lean', the config's `model.attention`) picks the
kernel; 'auto' takes cuDNN's fused kernel on a GPU for bfloat16/float16 heads it supports (width
a multiple of 8, at most 128), `lean_attention` on CPU for narrow heads, XLA's otherwise. On CPU
with narrow heads (d <= `LEAN_MAX_HEAD_DIM`, e.g. diffusers' width-8 heads) XLA's own attention
saves the [B, heads, L, L] probabilities for the backward pass and runs its width-d matmuls
slowly over those large buffers; `lean_attention` instead keeps only the per-row log-sum-exp and
recomputes the scores in the backward (as FlashAttention does), one example at a time so that
the [heads, L, L] temporaries stay in cache. Without differentiation it runs all examples at
once, which XLA compiles into a single fused kernel (scores, softmax and product with v). The
products are written so that XLA runs them as plain per-head matmuls: q is scaled before the
scores, and the products with v and k take heads-major operands. Elsewhere
`jax.nn.dot_product_attention` picks the platform's fused kernel.

Forward mode (`jax.jvp`, `forward_mode=True`): a custom VJP cannot be passed by `jax.jvp`, so
`lean_attention_forward_mode` wraps the lean kernel in a custom JVP whose primal output is the
custom-VJP kernel (its gradient keeps the lean backward) and whose tangent is computed one
example at a time from recomputed probabilities, as the forward is:
dO = (P * dS) V - rowsum(P * dS) O + P dV with dS = (dq k^T + q dk^T) / sqrt(d). cuDNN's fused
kernel has no forward-mode rule, so 'auto' takes XLA's attention on a GPU in forward mode.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

LEAN_MAX_HEAD_DIM = 64  # wider heads do enough work per score for XLA's own version to keep up


def _scores(q: jnp.ndarray, k: jnp.ndarray) -> jnp.ndarray:
  """[L, h, d] x [L, h, d] -> float32 [h, L, L] logits; q must already carry the 1/sqrt(d).

  (Scaling q, not the [h, L, L] product, keeps XLA from materialising a broadcast constant of
  the scores' size.)
  """
  return jnp.einsum('qhd,khd->hqk', q, k, preferred_element_type=jnp.float32)


def _scaled(q: jnp.ndarray) -> jnp.ndarray:
  return q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)


def _heads_major(a: jnp.ndarray) -> jnp.ndarray:
  """[L, h, d] <-> [h, L, d]."""
  return a.transpose(1, 0, 2)


def _forward_one(q, k, v):
  """One example, [L, h, d]: the output (dtype of v) and log-sum-exp float32 [h, L]."""
  s = _scores(_scaled(q), k)
  m = jnp.max(s, axis=-1, keepdims=True)
  p = jnp.exp(s - m)
  denom = jnp.sum(p, axis=-1, keepdims=True)
  # Heads-major operands make this a plain [L, L] x [L, d] product per head; with v as
  # [L, h, d] XLA computes the transposed product instead, at half the speed.
  out = jnp.einsum('hqk,hkd->hqd', p.astype(v.dtype), _heads_major(v),
                   preferred_element_type=jnp.float32) / denom
  return _heads_major(out.astype(v.dtype)), (m + jnp.log(denom))[..., 0]


def _backward_one(q, k, v, out, lse, d_out):
  """Gradients of one example from the saved output and log-sum-exp (scores recomputed)."""
  q_scaled = _scaled(q)
  p = jnp.exp(_scores(q_scaled, k) - lse[..., None])  # [h, L, L] float32
  d_out32 = d_out.astype(jnp.float32)
  dv = jnp.einsum('hqk,qhd->khd', p, d_out32)
  dp = jnp.einsum('qhd,khd->hqk', d_out32, v.astype(jnp.float32))
  # softmax backward: dS = P * (dP - rowsum(dO * O)), the gradient of the scaled logits.
  row = jnp.einsum('qhd,qhd->hq', d_out32, out.astype(jnp.float32))
  ds = p * (dp - row[..., None])
  dq = _heads_major(jnp.einsum('hqk,hkd->hqd', ds, _heads_major(k.astype(jnp.float32))))
  dk = jnp.einsum('hqk,qhd->khd', ds, q_scaled.astype(jnp.float32))
  dq = _scaled(dq)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


@jax.custom_vjp
def lean_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray) -> jnp.ndarray:
  """softmax(q k^T / sqrt(d)) v: q, k, v [B, L, heads, d] -> [B, L, heads, d].

  Saves q, k, v, the output and a float32 [B, heads, L] log-sum-exp for the backward pass
  instead of the [B, heads, L, L] probabilities.
  """
  # Without differentiation all examples go at once; under `jax.grad` the forward runs one
  # example at a time, which measured faster next to the backward's own loop.
  return jax.vmap(_forward_one)(q, k, v)[0]


def _lean_fwd(q, k, v):
  out, lse = jax.lax.map(lambda a: _forward_one(*a), (q, k, v))
  return out, (q, k, v, out, lse)


def _lean_bwd(res, d_out):
  return jax.lax.map(lambda a: _backward_one(*a), res + (d_out,))


lean_attention.defvjp(_lean_fwd, _lean_bwd)


def _tangent_one(q, k, v, out, dq, dk, dv):
  """The tangent of one example's output [L, h, d] (dtype of v), probabilities recomputed."""
  q_scaled = _scaled(q)
  s = _scores(q_scaled, k)
  p = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
  p = p / jnp.sum(p, axis=-1, keepdims=True)  # [h, L, L] float32
  ds = _scores(_scaled(dq), k) + _scores(q_scaled, dk)
  pds = p * ds
  f32 = lambda a: _heads_major(a.astype(jnp.float32))
  d_out = (jnp.einsum('hqk,hkd->hqd', pds, f32(v))
           - jnp.sum(pds, axis=-1)[..., None] * f32(out)
           + jnp.einsum('hqk,hkd->hqd', p, f32(dv)))
  return _heads_major(d_out).astype(v.dtype)


@jax.custom_jvp
def lean_attention_forward_mode(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray) -> jnp.ndarray:
  """`lean_attention` that `jax.jvp` can also differentiate: [B, L, heads, d] -> same."""
  return lean_attention(q, k, v)


@lean_attention_forward_mode.defjvp
def _lean_jvp(primals, tangents):
  out = lean_attention(*primals)
  d_out = jax.lax.map(lambda a: _tangent_one(*a), (*primals, out, *tangents))
  return out, d_out


IMPLEMENTATIONS = ('auto', 'xla', 'cudnn', 'lean')


def cudnn_supports(dtype, head_dim: int) -> bool:
  """Whether cuDNN's fused attention takes heads of this dtype and width."""
  return (jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
          and head_dim % 8 == 0 and head_dim <= 128)


def resolve(implementation: str, dtype, head_dim: int, backend: str | None = None,
            forward_mode: bool = False) -> str:
  """The kernel that `implementation` means for heads of `dtype` and `head_dim` on `backend`
  (default: JAX's): 'xla', 'cudnn' or 'lean'; with `forward_mode`, one that `jax.jvp` passes."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f'model.attention={implementation!r} is unknown; choose one of '
                     f'{IMPLEMENTATIONS}.')
  if forward_mode and implementation == 'cudnn':
    raise ValueError('model.attention=\'cudnn\': cuDNN\'s fused attention has no forward-mode '
                     'rule, which this training objective needs (jax.jvp of the network); '
                     'use model.attention=\'auto\' or \'xla\'.')
  if implementation != 'auto':
    return implementation
  backend = backend or jax.default_backend()
  if backend == 'gpu' and cudnn_supports(dtype, head_dim) and not forward_mode:
    return 'cudnn'
  if backend == 'cpu' and head_dim <= LEAN_MAX_HEAD_DIM:
    return 'lean'
  return 'xla'


def attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, implementation: str = 'auto',
              forward_mode: bool = False) -> jnp.ndarray:
  """Multi-head attention q, k, v [B, L, heads, d] -> [B, L, heads, d], in v's dtype; with
  `forward_mode` differentiable by `jax.jvp` as well as `jax.grad`."""
  kernel = resolve(implementation, q.dtype, q.shape[-1], forward_mode=forward_mode)
  if kernel == 'lean':
    return (lean_attention_forward_mode if forward_mode else lean_attention)(q, k, v)
  return jax.nn.dot_product_attention(q, k, v, implementation=kernel)
