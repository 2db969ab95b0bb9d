"""MeanFlow (Geng et al. 2025) on the 2-D toy data: toy2d.py's data and MLP, trained for the
average velocity u(z_t, r, t), sampled in one to a few network calls.

  python launch.py --config=configs/toy2d_meanflow.py --workdir=/tmp/toy2d_meanflow
  python launch.py --config=configs/toy2d_meanflow.py --workdir=/tmp/toy2d_meanflow \
      --mode=sample --config.sampling.num_steps=2

The flow path with a second time input (the step's length), the paper's logit-normal times
(mean -0.4, std 1), a quarter of the pairs with r != t and the adaptive loss weight (p = 1).
Sampling is Euler steps on an even grid in t ending at 0 (spacing trailing), each network call
told where its step ends: sampling.num_steps is the number of calls (1 by default).
"""

from configs import toy2d


def recipe(config):
  """MeanFlow's settings on any base config (its data, network and budget stay)."""
  config.diffusion.process = 'flow'
  config.diffusion.prediction_type = 'flow'
  config.model.interval_embedding = True
  config.training.objective = 'meanflow'
  config.training.time_sampling = 'logit_normal'
  config.training.logit_normal_mean = -0.4
  config.training.logit_normal_std = 1.0
  config.training.meanflow_ratio = 0.25
  config.training.meanflow_weight_power = 1.0
  return few_step_sampling(config, 'euler', 'trailing')  # t_max (1 - i / S): the last step to 0


def few_step_sampling(config, sampler: str, spacing: str):
  """Sampling (and previews) with a few-step family's own sampler, in one call by default."""
  config.sampling.sampler = config.sampling.preview_sampler = sampler
  config.sampling.spacing = spacing
  config.sampling.stochastic = False
  config.sampling.num_steps = config.sampling.preview_steps = 1
  return config


def get_config():
  return recipe(toy2d.get_config())
