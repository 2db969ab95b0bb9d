"""The U-Net and the MLP: shapes, the DDPM parameter count, conditioning, bfloat16."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.models import MLP, UNet
from diffusion_jax.models.layers import Upsample, timestep_embedding, upsample_conv


def n_params(model, shape, labels=False):
  x = jnp.zeros((1,) + shape)
  t = jnp.zeros((1,), jnp.int32)
  lab = jnp.zeros((1,), jnp.int32) if labels else None
  tree = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, t, lab))
  return sum(p.size for p in jax.tree.leaves(tree))


def test_ddpm_cifar10_parameter_count():
  """The DDPM CIFAR-10 network of the paper: 35,746,307 parameters in the reference port."""
  model = UNet(channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2,
               attention_resolutions=(16,), dropout=0.1)
  assert n_params(model, (32, 32, 3)) == 35_746_307


def test_bench_parameter_count_matches_diffusers():
  model = UNet(channels=64, channel_mult=(1, 2, 2), num_res_blocks=2, attention_resolutions=(16,),
               head_dim=8)
  assert n_params(model, (32, 32, 3)) == 6_472_195


def init_and_apply(model, x, t, labels=None, rng=0):
  """Jitted: one compiled program each, not one per operation (eager init of a U-Net compiles
  hundreds of small ones)."""
  params = jax.jit(model.init)(jax.random.PRNGKey(rng), x, t, labels)
  # Zero-initialised output layers would hide every dependence: perturb all parameters.
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(rng + 1), len(leaves))
  params = jax.tree.unflatten(tree, [p + 0.05 * jax.random.normal(k, p.shape)
                                     for p, k in zip(leaves, keys)])
  return params, jax.jit(model.apply)(params, x, t, labels)


@pytest.mark.parametrize('size,mult,attn,scale_shift,channels_in', [
    (8, (1, 2), (4,), False, 1),
    (16, (1, 2, 2), (8, 4), True, 3),
])
def test_unet_output_shape_equals_input(size, mult, attn, scale_shift, channels_in):
  model = UNet(channels=16, channel_mult=mult, num_res_blocks=1, attention_resolutions=attn,
               num_groups=8, scale_shift=scale_shift, num_heads=2)
  x = jnp.ones((2, size, size, channels_in))
  _, out = init_and_apply(model, x, jnp.array([3, 70], jnp.int32))
  assert out.shape == x.shape and out.dtype == jnp.float32
  assert np.all(np.isfinite(out))


def test_output_is_zero_at_initialisation():
  model = UNet(channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,),
               num_groups=8)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 3))
  params = model.init(jax.random.PRNGKey(0), x, jnp.zeros((2,), jnp.int32))
  np.testing.assert_array_equal(model.apply(params, x, jnp.zeros((2,), jnp.int32)), 0.0)


def test_timestep_and_label_conditioning_change_the_output():
  model = UNet(channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,),
               num_groups=8, num_classes=10)
  x = jnp.broadcast_to(jax.random.normal(jax.random.PRNGKey(0), (1, 8, 8, 3)), (2, 8, 8, 3))
  params, out = init_and_apply(model, x, jnp.array([5, 500], jnp.int32),
                               jnp.array([1, 1], jnp.int32))
  assert float(jnp.abs(out[0] - out[1]).max()) > 1e-3  # same image, different t
  same_t = jnp.array([5, 5], jnp.int32)
  out = model.apply(params, x, same_t, jnp.array([1, 7], jnp.int32))
  assert float(jnp.abs(out[0] - out[1]).max()) > 1e-3  # same image and t, different label
  out_null = model.apply(params, x, same_t, None)  # None means the "no label" class
  np.testing.assert_allclose(out_null, model.apply(params, x, same_t,
                                                   jnp.array([10, 10], jnp.int32)), atol=1e-6)


def test_dropout_only_in_training():
  model = UNet(channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(),
               num_groups=8, dropout=0.5)
  x = jnp.ones((1, 8, 8, 3))
  t = jnp.array([10], jnp.int32)
  params, out = init_and_apply(model, x, t)
  np.testing.assert_allclose(out, model.apply(params, x, t), rtol=1e-5, atol=1e-6)  # eval
  train_out = model.apply(params, x, t, train=True, rngs={'dropout': jax.random.PRNGKey(3)})
  assert float(jnp.abs(train_out - out).max()) > 1e-4


def test_bfloat16_compute_keeps_float32_params():
  model = UNet(channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,),
               num_groups=8, dtype=jnp.bfloat16)
  ref = model.clone(dtype=jnp.float32)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 3))
  t = jnp.array([1, 900], jnp.int32)
  params, out = init_and_apply(model, x, t)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  assert out.dtype == jnp.float32 and np.all(np.isfinite(out))
  out32 = ref.apply(params, x, t)
  rel = float(jnp.linalg.norm(out - out32) / jnp.linalg.norm(out32))
  assert rel < 0.05  # bfloat16 has ~3 significant digits


def test_timestep_embedding_is_ddpm_sinusoid():
  emb = timestep_embedding(jnp.array([0, 7]), 8)
  freqs = np.exp(-np.log(10000.0) * np.arange(4) / 3)
  np.testing.assert_allclose(emb[1], np.concatenate([np.sin(7 * freqs), np.cos(7 * freqs)]),
                             rtol=1e-5)


def test_mlp_shape_and_conditioning():
  model = MLP(hidden=32, num_layers=2)
  x = jnp.ones((2, 2))
  _, out = init_and_apply(model, x, jnp.array([1, 90], jnp.int32))
  assert out.shape == (2, 2)
  assert float(jnp.abs(out[0] - out[1]).max()) > 1e-4


def repeat_then_conv(x, kernel, bias):
  """The textbook upsampling layer: nearest 2x repeat, then a 'SAME' 3x3 conv."""
  up = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
  return jax.lax.conv_general_dilated(up, kernel, (1, 1), 'SAME',
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC')) + bias


@pytest.mark.parametrize('shape,c_out', [((2, 4, 4, 8), 8), ((1, 3, 5, 4), 6), ((2, 1, 1, 3), 2)])
def test_upsample_conv_equals_repeat_then_conv(shape, c_out):
  kx, kk, kb, kg = jax.random.split(jax.random.PRNGKey(0), 4)
  x = jax.random.normal(kx, shape)
  kernel = jax.random.normal(kk, (3, 3, shape[-1], c_out))
  bias = jax.random.normal(kb, (c_out,))
  got = upsample_conv(x, kernel, bias)
  want = repeat_then_conv(x, kernel, bias)
  assert got.shape == (shape[0], 2 * shape[1], 2 * shape[2], c_out)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  g = jax.random.normal(kg, got.shape)
  loss = lambda f: (lambda x, k, b: jnp.sum(f(x, k, b) * g))
  for a, b in zip(jax.grad(loss(upsample_conv), (0, 1, 2))(x, kernel, bias),
                  jax.grad(loss(repeat_then_conv), (0, 1, 2))(x, kernel, bias)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(b))))


def test_upsample_module_keeps_the_conv_parameters():
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 4, 4, 8))
  params = Upsample().init(jax.random.PRNGKey(0), x)['params']
  assert jax.tree.map(jnp.shape, params) == {'conv': {'kernel': (3, 3, 8, 8), 'bias': (8,)}}
  np.testing.assert_allclose(Upsample().apply({'params': params}, x),
                             repeat_then_conv(x, params['conv']['kernel'], params['conv']['bias']),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('name,kw,shape', [
    ('unet', dict(channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,),
                  num_groups=4, head_dim=4, scale_shift=True), (2, 8, 8, 1)),
    ('dit', dict(hidden=16, depth=1, num_heads=2, patch_size=2, qk_norm=True, rope=True),
     (2, 4, 4, 1)),
    ('mlp', dict(hidden=16, num_layers=2), (4, 2)),
])
def test_jax_jvp_passes_every_network(name, kw, shape):
  """forward_mode networks: the same parameters and outputs as the plain ones; `jax.jvp` in
  (x, t) agrees with central finite differences; a gradient of the jvp's primal output equals
  the plain network's gradient."""
  from diffusion_jax.models import DiT  # pylint: disable=g-import-not-at-top
  cls = {'unet': UNet, 'dit': DiT, 'mlp': MLP}[name]
  plain, forward = cls(**kw), cls(**kw, **({} if name == 'mlp' else {'forward_mode': True}))
  x = jax.random.normal(jax.random.PRNGKey(0), shape)
  t = jnp.linspace(0.2, 0.7, shape[0])
  params = jax.jit(plain.init)(jax.random.PRNGKey(0), x, t)
  leaves, tree = jax.tree.flatten(params)  # zero-initialised layers would hide dependences
  params = jax.tree.unflatten(tree, [p + 0.05 * jax.random.normal(jax.random.PRNGKey(i), p.shape)
                                     for i, p in enumerate(leaves)])
  assert jax.tree.structure(params) == jax.tree.structure(jax.eval_shape(
      forward.init, jax.random.PRNGKey(0), x, t))
  dx = jax.random.normal(jax.random.PRNGKey(1), shape)
  dt = jnp.ones_like(t)
  apply = jax.jit(forward.apply)
  out, d_out = jax.jit(lambda x, t: jax.jvp(lambda x, t: forward.apply(params, x, t), (x, t),
                                            (dx, dt)))(x, t)
  want = jax.jit(plain.apply)(params, x, t)
  np.testing.assert_array_equal(apply(params, x, t), want)
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)  # (fused differently)
  step = 1e-2  # float32: a step this large keeps rounding (~1e-7 / step) below the tolerance
  fd = (apply(params, x + step * dx, t + step * dt) - apply(params, x - step * dx, t - step * dt)
        ) / (2 * step)
  np.testing.assert_allclose(d_out, fd, rtol=2e-2, atol=2e-2 * float(jnp.max(jnp.abs(fd))))

  g = jax.random.normal(jax.random.PRNGKey(2), out.shape)

  def through_jvp(p):
    o, do = jax.jvp(lambda x, t: forward.apply(p, x, t), (x, t), (dx, dt))
    return jnp.sum(o * g) + 0.0 * jnp.sum(jax.lax.stop_gradient(do))

  want = jax.jit(jax.grad(lambda p: jnp.sum(plain.apply(p, x, t) * g)))(params)
  got = jax.jit(jax.grad(through_jvp))(params)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * (1 + float(jnp.max(jnp.abs(b)))))
