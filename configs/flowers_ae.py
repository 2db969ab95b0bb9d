"""Latent diffusion's first stage for flowers: a small KL autoencoder, 64x64 -> 16x16x4.

AutoencoderKL (diffusers' layout) with widths 16-32-64, one ResNet block per level (the
decoder two), L1 reconstruction and KL weight 1e-6, sized to train on one CPU core in twenty
minutes (the learning rate is constant, so a checkpoint is what a shorter run would give);
configs/flowers_latent.py diffuses its latents.

  python launch.py --config=configs/flowers_ae.py --workdir=/tmp/flowers_ae \
      --config.data.source=npz --config.data.path=flowers64.npz
  python launch.py --config=configs/flowers_ae.py --workdir=/tmp/flowers_ae --mode=eval
"""

from configs import default


def get_config():
  config = default.get_config()
  config.model.architecture = 'autoencoder'
  config.data.source = 'tfds'
  config.data.name = 'oxford_flowers102'
  config.data.splits = 'train+validation+test'
  config.data.image_size = 64
  config.autoencoder.block_out_channels = (16, 32, 64)
  config.autoencoder.layers_per_block = 1
  config.autoencoder.latent_channels = 4
  config.autoencoder.num_groups = 8
  config.autoencoder.loss = 'l1'
  config.autoencoder.kl_weight = 1e-6
  config.training.batch_size = 16
  config.training.learning_rate = 1e-3
  config.training.warmup_steps = 100
  config.training.lr_schedule = 'constant'
  config.training.grad_clip = 1.0
  config.training.ema_decay = 0.999
  config.training.num_steps = 1100  # ~20 minutes on one core (docs/latent.md)
  config.training.log_every = 100
  config.training.sample_every = 500
  config.training.checkpoint_every = 500
  config.sampling.preview_samples = 16
  return config
