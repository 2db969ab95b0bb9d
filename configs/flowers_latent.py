"""Latent diffusion of flowers on a CPU: a U-Net on the 16x16x4 latents of configs/flowers_ae.py.

The U-Net (widths 64-128-128 at 16, 8 and 4, attention at 8) sees 16x fewer positions than a
64x64 pixel network; the data are encoded once into the workdir. v-prediction on the cosine
schedule with min-SNR weighting, as configs/flowers.py; the data prediction is not clipped
(latents are not images); samples are decoded by the autoencoder.

  python launch.py --config=configs/flowers_ae.py --workdir=/tmp/flowers_ae \
      --config.data.source=npz --config.data.path=flowers64.npz
  python launch.py --config=configs/flowers_latent.py --workdir=/tmp/flowers_latent \
      --config.latent.autoencoder=/tmp/flowers_ae \
      --config.data.source=npz --config.data.path=flowers64.npz
  python launch.py --config=configs/flowers_latent.py --workdir=/tmp/flowers_latent --mode=sample
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.source = 'tfds'
  config.data.name = 'oxford_flowers102'
  config.data.splits = 'train+validation+test'
  config.data.image_size = 64  # of the images; the network sees the latents' 16x16
  config.latent.autoencoder = '/tmp/flowers_ae'
  config.model.channels = 64
  config.model.channel_mult = (1, 2, 2)
  config.model.num_res_blocks = 2
  config.model.attention_resolutions = (8,)
  config.model.head_dim = 32
  config.model.dropout = 0.0
  config.diffusion.schedule = 'cosine'
  config.diffusion.num_timesteps = 1000
  config.diffusion.prediction_type = 'v'
  config.diffusion.loss_weighting = 'min_snr'
  config.training.batch_size = 64
  config.training.learning_rate = 5e-4
  config.training.warmup_steps = 200
  config.training.ema_decay = 0.999
  config.training.num_steps = 1600  # ~75 minutes on one core; with flowers_ae: 95 (docs/latent.md)
  config.training.log_every = 100
  config.training.sample_every = 2000
  config.training.checkpoint_every = 500
  config.sampling.sampler = 'dpm_solver++'
  config.sampling.solver_order = 2
  config.sampling.spacing = 'logsnr'
  config.sampling.num_steps = 25
  config.sampling.clip_x0 = 0.0  # latents: unit scale, not the [-1, 1] of images
  config.sampling.preview_sampler = 'dpm_solver++'
  config.sampling.preview_steps = 25
  return config
