"""generation: the network as eps_fn with classifier-free guidance, and the sharded generator."""

import jax.numpy as jnp
import numpy as np

from diffusion_jax import generation


def test_guidance_combines_predictions():
  cond = lambda x, t: jnp.ones_like(x)
  uncond = lambda x, t: jnp.zeros_like(x)
  x = jnp.zeros((2, 2))
  t = jnp.zeros((2,), jnp.int32)
  np.testing.assert_allclose(generation.guided_eps_fn(cond, uncond, 3.0)(x, t), 3.0)
  np.testing.assert_allclose(generation.guided_eps_fn(cond, uncond, 0.0)(x, t), 0.0)
