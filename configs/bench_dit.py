"""The benchmark DiT: 32x32x3 images in 2x2 patches (256 tokens), width 256, 6 blocks, 4 heads of
64, batch 16, 10 classes (diffusers' DiTTransformer2DModel always takes labels); the layout of
that model, whose parameter count it matches (experiments/benchmark.py checks it).

  python experiments/benchmark.py --config=configs/bench_dit.py --compare=diffusers
"""

from configs import bench


def get_config():
  config = bench.get_config()
  config.model.architecture = 'dit'
  config.model.hidden = 256
  config.model.num_layers = 6
  config.model.num_heads = 4
  config.model.patch_size = 2
  config.data.class_conditional = True
  config.data.num_classes = 10
  return config
