"""Consistency training (iCT, Song & Dhariwal 2023) on the offline digits: `configs/digits.py`'s
data and U-Net on EDM's process, trained without a teacher and sampled in one to a few calls.

  python launch.py --config=configs/digits_consistency.py --workdir=/tmp/digits_ct
  python launch.py --config=configs/digits_consistency.py --workdir=/tmp/digits_ct \
      --mode=sample --config.sampling.num_steps=2

iCT's recipe as in configs/toy2d_consistency.py (N from 10 to 1280 levels in 8 stages,
log-normal pairs, weight 1 / (t - r), pseudo-Huber c = 0.00054 sqrt(64)). 6,000 steps: a step
costs ~1.3x digits.py's (a second forward pass), ~4x digits.py's wall clock.

ECT (Geng et al. 2024) instead tunes a trained diffusion run of the same network into a
consistency model, e.g. configs/digits_edm.py's:

  python launch.py --config=configs/digits_consistency.py --workdir=/tmp/digits_ect \
      --config.training.consistency_schedule=ect --config.training.init_from=/tmp/digits_edm \
      --config.training.num_steps=2000
"""

from configs import digits, toy2d_consistency


def get_config():
  config = toy2d_consistency.recipe(digits.get_config())
  config.training.num_steps = 6000
  config.training.sample_every = config.training.checkpoint_every = 3000
  return config
