"""The Keras "Denoising Diffusion Implicit Models" example recipe for flowers, as a baseline.

Widths 32-64-96-128, 2 blocks per level, no attention, offset-cosine schedule, L1 loss on the
noise, EMA 0.999, AdamW (lr 1e-3, weight decay 1e-4), batch 64, 64x64.

  python launch.py --config=configs/flowers_keras.py --workdir=/tmp/flowers_keras
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.source = 'tfds'
  config.data.name = 'oxford_flowers102'
  config.data.splits = 'train+validation+test'
  config.data.image_size = 64
  config.model.channels = 32
  config.model.channel_mult = (1, 2, 3, 4)
  config.model.num_res_blocks = 2
  config.model.attention_resolutions = ()
  config.model.dropout = 0.0
  config.model.num_groups = 8
  config.diffusion.schedule = 'offset_cosine'
  config.diffusion.num_timesteps = 1000
  config.diffusion.loss = 'l1'
  config.training.batch_size = 64
  config.training.learning_rate = 1e-3
  config.training.weight_decay = 1e-4
  config.training.warmup_steps = 0
  config.training.grad_clip = 0.0
  config.training.ema_decay = 0.999
  config.training.num_steps = 100_000
  config.sampling.num_steps = 20
  return config
