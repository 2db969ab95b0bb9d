"""CIFAR-10 with the DDPM paper's setup (Ho et al. 2020): the 35.7M-parameter U-Net.

  python launch.py --config=configs/cifar10.py --workdir=/tmp/cifar10
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.source = 'tfds'
  config.data.name = 'cifar10'
  config.data.splits = 'train'
  config.data.eval_splits = 'test'
  config.data.image_size = 32
  config.model.channels = 128
  config.model.channel_mult = (1, 2, 2, 2)
  config.model.num_res_blocks = 2
  config.model.attention_resolutions = (16,)
  config.model.dropout = 0.1
  config.diffusion.schedule = 'linear'
  config.diffusion.num_timesteps = 1000
  config.training.batch_size = 128
  config.training.learning_rate = 2e-4
  config.training.warmup_steps = 5000
  config.training.grad_clip = 1.0
  config.training.ema_decay = 0.9999
  config.training.phema_sigma_rels = (0.05, 0.10)  # post-hoc EMA (EDM2's widths)
  config.training.phema_snapshot_every = 40_000  # 20 snapshots, 5.7 GB in float32
  config.training.num_steps = 800_000
  return config
