"""Oxford Flowers 102 at 64x64, all 8,189 images (TFDS train + validation + test).

A 4-level ADM-style U-Net (scale-shift time embedding, attention at 16 and 8, cosine schedule,
v-prediction) sized to give good samples after a few hours on one modern GPU in bfloat16.

  python launch.py --config=configs/flowers.py --workdir=/tmp/flowers
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.source = 'tfds'
  config.data.name = 'oxford_flowers102'
  config.data.splits = 'train+validation+test'
  config.data.image_size = 64
  config.model.channels = 128
  config.model.channel_mult = (1, 2, 3, 4)
  config.model.num_res_blocks = 2
  config.model.attention_resolutions = (16, 8)
  config.model.head_dim = 64
  config.model.dropout = 0.1
  config.model.scale_shift = True
  config.model.dtype = 'bfloat16'
  config.diffusion.schedule = 'cosine'
  config.diffusion.num_timesteps = 1000
  config.diffusion.prediction_type = 'v'
  config.diffusion.loss_weighting = 'min_snr'
  config.diffusion.min_snr_gamma = 5.0
  config.training.batch_size = 128
  config.training.learning_rate = 2e-4
  config.training.warmup_steps = 1000
  config.training.lr_schedule = 'cosine'
  config.training.weight_decay = 0.0
  config.training.ema_decay = 0.9995
  config.training.phema_sigma_rels = (0.05, 0.10)  # post-hoc EMA (EDM2's widths)
  config.training.phema_snapshot_every = 10_000  # 10 snapshots, 7.4 GB in float32
  config.training.num_steps = 100_000
  config.training.sample_every = 5000
  return config
