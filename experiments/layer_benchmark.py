"""Per-layer timings behind the U-Net's speed: our GroupNorm+SiLU, attention and upsampling
against the plain JAX formulations (and PyTorch's, when installed), forward and forward+backward.

  python experiments/layer_benchmark.py
  python experiments/layer_benchmark.py --batch=16 --repeats=30

Shapes are those of configs/bench.py: GroupNorm on [B, 32, 32, 128], attention on [B, 256, 16, 8]
([B, L, heads, head_dim]), upsampling [B, 16, 16, 128] -> [B, 32, 32, 128]. Medians in ms.
On CPU the script first re-executes itself with `diffusion_jax.cpu_env`, as the benchmark does.
"""

from __future__ import annotations

import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

from diffusion_jax import cpu_env  # pylint: disable=wrong-import-position

if __name__ == '__main__':
  cpu_env.reexec_with_cpu_settings()

# pylint: disable=g-import-not-at-top,wrong-import-position
import time
from typing import Callable

from absl import app
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.models import attention, layers, normalization
# pylint: enable=g-import-not-at-top,wrong-import-position

flags.DEFINE_integer('batch', 16, 'Batch size of every input.')
flags.DEFINE_integer('repeats', 20, 'Timed calls per measurement.')
FLAGS = flags.FLAGS


def median_ms(fn: Callable[[], object], repeats: int) -> float:
  """Median wall time of `fn()` in ms, after two untimed calls; `fn` must block."""
  fn()
  fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return 1e3 * float(np.median(times))


def time_jax(f: Callable, args: tuple, repeats: int) -> tuple[float, float]:
  """(forward, forward + gradient of sum(f * g)) ms of jitted `f(*args)`."""
  forward = jax.jit(f)
  g = jax.random.normal(jax.random.PRNGKey(9), jax.eval_shape(f, *args).shape)
  grad = jax.jit(jax.grad(lambda *a: jnp.sum(f(*a) * g), argnums=tuple(range(len(args)))))
  return (median_ms(lambda: jax.block_until_ready(forward(*args)), repeats),
          median_ms(lambda: jax.block_until_ready(grad(*args)), repeats))


def jax_rows(b: int, repeats: int) -> list[tuple[str, str, float, float]]:
  keys = jax.random.split(jax.random.PRNGKey(0), 6)
  x = jax.random.normal(keys[0], (b, 32, 32, 128))
  scale, bias = jnp.ones(128), jnp.zeros(128)
  flax_gn = lambda x, s, c: jax.nn.silu(nn.GroupNorm(num_groups=32, epsilon=1e-6).apply(
      {'params': {'scale': s, 'bias': c}}, x))
  ours_gn = lambda x, s, c: normalization.group_norm(x, s, c, 32, 1e-6, silu=True)
  q, k, v = (jax.random.normal(key, (b, 256, 16, 8)) for key in keys[1:4])
  small = jax.random.normal(keys[4], (b, 16, 16, 128))
  kernel = 0.05 * jax.random.normal(keys[5], (3, 3, 128, 128))
  repeat_conv = lambda x, w: jax.lax.conv_general_dilated(
      jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2), w, (1, 1), 'SAME',
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  ours_up = lambda x, w: layers.upsample_conv(x, w, jnp.zeros(w.shape[-1]))
  cases = [('GroupNorm+SiLU', 'ours', ours_gn, (x, scale, bias)),
           ('GroupNorm+SiLU', 'nn.GroupNorm + silu', flax_gn, (x, scale, bias)),
           ('attention', 'ours', attention.attention, (q, k, v)),
           ('attention', 'jax.nn.dot_product_attention', jax.nn.dot_product_attention, (q, k, v)),
           ('upsample + conv', 'ours', ours_up, (small, kernel)),
           ('upsample + conv', 'repeat, then conv', repeat_conv, (small, kernel))]
  return [(layer, impl, *time_jax(f, args, repeats)) for layer, impl, f, args in cases]


def torch_rows(b: int, repeats: int) -> list[tuple[str, str, float, float]]:
  """The same layers in PyTorch (NCHW, as diffusers runs them); empty without torch."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    return []
  torch.set_num_threads(len(os.sched_getaffinity(0)))
  functional = torch.nn.functional
  norm = torch.nn.GroupNorm(32, 128, eps=1e-6)
  up = torch.nn.Conv2d(128, 128, 3, padding=1)
  cases = [('GroupNorm+SiLU', lambda x: functional.silu(norm(x)), (b, 128, 32, 32)),
           ('attention', lambda q: functional.scaled_dot_product_attention(q, q, q),
            (b, 16, 256, 8)),
           ('upsample + conv', lambda x: up(functional.interpolate(x, scale_factor=2.0)),
            (b, 128, 16, 16))]
  rows = []
  for layer, f, shape in cases:
    x = torch.randn(*shape, requires_grad=True)

    def forward(f=f, x=x):
      with torch.no_grad():
        f(x)

    def forward_backward(f=f, x=x):
      f(x).sum().backward()
    rows.append((layer, f'PyTorch {torch.__version__}', median_ms(forward, repeats),
                 median_ms(forward_backward, repeats)))
  return rows


def main(argv):
  del argv
  rows = jax_rows(FLAGS.batch, FLAGS.repeats) + torch_rows(FLAGS.batch, FLAGS.repeats)
  print(f'{jax.device_count()} x {jax.devices()[0].device_kind}; jax {jax.__version__}; '
        f'batch {FLAGS.batch}; medians of {FLAGS.repeats} calls')
  print('| layer | implementation | forward ms | forward + backward ms |')
  print('| --- | --- | ---: | ---: |')
  for layer, impl, forward, both in sorted(rows, key=lambda r: r[0]):
    print(f'| {layer} | {impl} | {forward:.1f} | {both:.1f} |')


if __name__ == '__main__':
  app.run(main)
