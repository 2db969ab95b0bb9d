"""Shortcut models (Frans et al. 2024) on the 2-D toy data: toy2d.py's data and MLP with a second
time input, trained by flow matching and self-consistency, sampled in one to a few calls.

  python launch.py --config=configs/toy2d_shortcut.py --workdir=/tmp/roll_shortcut
  python launch.py --config=configs/toy2d_shortcut.py --workdir=/tmp/roll_shortcut \
      --mode=sample --config.sampling.num_steps=2

The paper's recipe: a quarter of each batch self-consistency with steps 2d in {1, ..., 1/64}
(finest step 1/128), the rest flow matching at uniform times. No JVP: a step costs two extra
forward passes on a quarter of the batch. 20,000 steps, 4x toy2d.py's (docs/few_steps.md).
Sampling is Euler steps on an even grid ending at t = 0, each call told where its step ends:
sampling.num_steps is the number of calls (1 by default; powers of 2 up to 128 are the trained
steps).
"""

from configs import toy2d, toy2d_meanflow


def recipe(config):
  """The shortcut model's settings on any base config (its data, network and budget stay)."""
  config.diffusion.process = 'flow'
  config.diffusion.prediction_type = 'flow'
  config.model.interval_embedding = True
  config.training.objective = 'shortcut'
  config.training.shortcut_ratio = 0.25
  config.training.shortcut_max_steps = 128
  return toy2d_meanflow.few_step_sampling(config, 'euler', 'trailing')


def get_config():
  config = recipe(toy2d.get_config())
  config.training.num_steps = 20000  # 4x toy2d.py's: see docs/few_steps.md for 5,000 against it
  return config
