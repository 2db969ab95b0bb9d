"""The benchmark U-Net: 32x32x3, widths 64-128-128, 2 blocks, attention at 16x16 (16 heads of
width 8, as diffusers' UNet2DModel), batch 16. 6,472,195 parameters.

  python experiments/benchmark.py --config=configs/bench.py --compare=diffusers
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.source = 'npz'
  config.data.image_size = 32
  config.model.channels = 64
  config.model.channel_mult = (1, 2, 2)
  config.model.num_res_blocks = 2
  config.model.attention_resolutions = (16,)
  config.model.head_dim = 8
  config.model.dropout = 0.0
  config.training.batch_size = 16
  config.training.warmup_steps = 100
  return config
