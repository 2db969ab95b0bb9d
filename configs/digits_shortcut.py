"""Shortcut models (Frans et al. 2024) on the offline digits: `configs/digits.py`'s data and
U-Net with a second time input, trained by flow matching and self-consistency and sampled in one
to a few network calls.

  python launch.py --config=configs/digits_shortcut.py --workdir=/tmp/digits_shortcut
  python launch.py --config=configs/digits_shortcut.py --workdir=/tmp/digits_shortcut \
      --mode=sample --config.sampling.num_steps=2

The paper's recipe (configs/toy2d_shortcut.py): a quarter of each batch self-consistency, steps
down to 1/128, the rest flow matching. 6,000 steps: a step costs ~1.2x digits.py's (two extra
forward passes on a quarter of the batch), so the run takes ~3.5x digits.py's wall clock.
"""

from configs import digits, toy2d_shortcut


def get_config():
  config = toy2d_shortcut.recipe(digits.get_config())
  config.training.num_steps = 6000
  config.training.sample_every = config.training.checkpoint_every = 3000
  return config
