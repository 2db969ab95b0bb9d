"""Consistency training (iCT, Song & Dhariwal 2023) on the 2-D toy data: toy2d.py's data and MLP
on EDM's process, trained without a teacher and sampled in one to a few calls.

  python launch.py --config=configs/toy2d_consistency.py --workdir=/tmp/roll_consistency
  python launch.py --config=configs/toy2d_consistency.py --workdir=/tmp/roll_consistency \
      --mode=sample --config.sampling.num_steps=2

iCT's recipe: adjacent pairs of N Karras levels in [0.002, 80], N doubling from 10 to 1280 in 8
stages over the run, the pair drawn with log-normal weights (P_mean -1.1, P_std 2), weight
1 / (t - r), the pseudo-Huber distance with c = 0.00054 sqrt(2). The curriculum needs a longer
run than denoising: 20,000 steps (each two forward passes and one backward pass of the MLP).
Sampling is multistep consistency sampling on Karras levels: sampling.num_steps calls.
"""

from configs import toy2d, toy2d_meanflow


def recipe(config):
  """iCT's settings on any base config (its data and network stay)."""
  config.diffusion.process = 'edm'
  config.diffusion.prediction_type = 'edm'  # f(x, sigma) = c_skip x + c_out F: f(x, 0) = x
  config.training.objective = 'consistency'
  config.training.consistency_schedule = 'ict'
  config.training.consistency_stages = 8
  config.training.consistency_q = 2.0  # ECT's, with --config.training.consistency_schedule=ect
  config.training.lognormal_mean = -1.1
  config.training.lognormal_std = 2.0
  return toy2d_meanflow.few_step_sampling(config, 'consistency', 'karras')


def get_config():
  config = recipe(toy2d.get_config())
  config.training.num_steps = 20000
  config.training.checkpoint_every = 5000
  return config
