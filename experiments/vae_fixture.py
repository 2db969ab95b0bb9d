"""Writes the small AutoencoderKL fixture that tests/test_autoencoder.py checks without torch:
diffusers' AutoencoderKL at a small size with random weights (every parameter perturbed, so that
each one's placement matters), saved as diffusers saves it, and its outputs on a fixed input.

  pip install torch diffusers
  python experiments/vae_fixture.py --out=tests/fixtures/vae_tiny

Writes <out>/config.json, <out>/diffusion_pytorch_model.safetensors and <out>/io.npz with
`x` [2, 16, 16, 3] in [-1, 1], `mean` and `logvar` [2, 4, 4, 4] of the latent, and
`reconstruction` [2, 16, 16, 3] (the decoded mean), all NHWC float32.
"""

from __future__ import annotations

import os

from absl import app
from absl import flags
import numpy as np

flags.DEFINE_string('out', 'tests/fixtures/vae_tiny', 'Output folder.')
FLAGS = flags.FLAGS

SMALL = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16),
             layers_per_block=1, norm_num_groups=4, sample_size=16,
             down_block_types=('DownEncoderBlock2D',) * 3, up_block_types=('UpDecoderBlock2D',) * 3)


def diffusers_vae(seed: int):
  """diffusers' AutoencoderKL of SMALL with every parameter perturbed by seeded noise."""
  import torch  # pylint: disable=g-import-not-at-top
  from diffusers import AutoencoderKL  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  vae = AutoencoderKL(**SMALL).eval()
  with torch.no_grad():
    for p in vae.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return vae


def outputs(vae, x: np.ndarray) -> dict:
  """mean, logvar and the decoded mean of NHWC images x, NHWC."""
  import torch  # pylint: disable=g-import-not-at-top
  with torch.no_grad():
    dist = vae.encode(torch.from_numpy(x).permute(0, 3, 1, 2)).latent_dist
    recon = vae.decode(dist.mean).sample
  nhwc = lambda t: t.permute(0, 2, 3, 1).numpy().astype(np.float32)
  return dict(mean=nhwc(dist.mean), logvar=nhwc(dist.logvar), reconstruction=nhwc(recon))


def main(argv):
  del argv
  vae = diffusers_vae(0)
  vae.save_pretrained(FLAGS.out, safe_serialization=True)
  x = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  np.savez(os.path.join(FLAGS.out, 'io.npz'), x=x, **outputs(vae, x))
  print('wrote', sorted(os.listdir(FLAGS.out)))


if __name__ == '__main__':
  app.run(main)
