"""DiT-XL/2 on Stable Diffusion's VAE latents of ImageNet 256x256, as in the DiT paper (Peebles &
Xie 2023): 32x32x4 latents (scale 0.18215), patches of 2 (256 tokens), 28 blocks of width 1152
with 16 heads, class-conditional with label dropout 0.1, the linear schedule over 1,000 steps
predicting the noise, AdamW at 1e-4 without weight decay, batch 256, EMA 0.9999, 400k steps;
sampled with classifier-free guidance 1.5. The paper also learns the reverse variance (its
"learned sigma" output); this network predicts the noise only, and samples with DDPM's 250
steps of fixed variance or any sampler here.

The data are a folder of ImageNet's training images, one subfolder per class; the VAE is
configs/sd_vae_ft_mse (put its weights there: see its README), or any diffusers AutoencoderKL
folder. The images are encoded once into the workdir (latents.npy, memory-mapped: 1.28M images
take 21 GB, twice that with data.random_flip, which encodes each image mirrored too).

  python launch.py --config=configs/imagenet256_latent_dit.py --mode=summary
  python launch.py --config=configs/imagenet256_latent_dit.py --workdir=/tmp/dit_xl \
      --config.data.path=/data/imagenet/train
"""

import os

from configs import default

SD_VAE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'sd_vae_ft_mse')


def get_config():
  config = default.get_config()
  config.data.source = 'folder'
  config.data.path = '/data/imagenet/train'
  config.data.image_size = 256
  config.data.class_conditional = True
  config.data.num_classes = 1000
  config.data.random_flip = True
  config.latent.autoencoder = SD_VAE
  config.model.architecture = 'dit'
  config.model.preset = 'XL'
  config.model.patch_size = 2
  config.model.dtype = 'bfloat16'
  config.diffusion.schedule = 'linear'
  config.diffusion.num_timesteps = 1000
  config.diffusion.prediction_type = 'eps'
  config.training.batch_size = 256
  config.training.learning_rate = 1e-4
  config.training.warmup_steps = 0
  config.training.weight_decay = 0.0
  config.training.grad_clip = 0.0
  config.training.ema_decay = 0.9999
  config.training.label_dropout = 0.1
  config.training.num_steps = 400_000
  config.training.sample_every = 20_000
  config.training.checkpoint_every = 10_000
  config.sampling.sampler = 'ddpm'
  config.sampling.guidance_scale = 1.5
  config.sampling.clip_x0 = 0.0  # latents: no image range to clip to
  config.sampling.preview_sampler = 'dpm_solver++'
  config.sampling.preview_steps = 25
  config.eval.num_samples = 50_000
  return config
