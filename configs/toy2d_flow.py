"""Flow matching on 2-D toy data: `configs/toy2d.py`'s MLP, data and training budget, with the
flow process, the velocity target and SD3's logit-normal times.

  python launch.py --config=configs/toy2d_flow.py --workdir=/tmp/roll_flow
"""

from configs import toy2d


def get_config():
  config = toy2d.get_config()
  config.diffusion.process = 'flow'
  config.diffusion.prediction_type = 'flow'
  config.training.time_sampling = 'logit_normal'
  config.sampling.sampler = 'heun'
  config.sampling.spacing = 'logsnr'
  config.sampling.num_steps = 25  # 49 network calls
  config.sampling.preview_sampler = 'heun'
  config.sampling.preview_steps = 25
  return config
