"""MeanFlow (Geng et al. 2025) on the offline digits: `configs/digits.py`'s data and U-Net with
a second time input, trained for the average velocity u(z_t, r, t) and sampled in one to a few
network calls.

  python launch.py --config=configs/digits_meanflow.py --workdir=/tmp/digits_meanflow
  python launch.py --config=configs/digits_meanflow.py --workdir=/tmp/digits_meanflow \
      --mode=sample --config.sampling.num_steps=2

The recipe of configs/toy2d_meanflow.py (the paper's): logit-normal times (mean -0.4, std 1), a
quarter of the pairs with r != t, the adaptive loss weight (p = 1). 5,000 steps: with the
Jacobian-vector product a step costs ~1.4x digits.py's, so the run takes ~3.5x digits.py's
wall clock. Sampling is Euler steps on an even grid ending at t = 0, each call told where its
step ends: sampling.num_steps is the number of calls (1 by default).
"""

from configs import digits, toy2d_meanflow


def get_config():
  config = toy2d_meanflow.recipe(digits.get_config())
  config.training.num_steps = 5000
  config.training.sample_every = config.training.checkpoint_every = 2500
  return config
