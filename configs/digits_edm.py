"""EDM (Karras et al. 2022) on the offline digits: `configs/digits.py`'s network, data and
training budget, with EDM's process, preconditioning, log-normal noise levels and loss weight.

  python launch.py --config=configs/digits_edm.py --workdir=/tmp/digits_edm
"""

from configs import digits


def get_config():
  config = digits.get_config()
  config.diffusion.process = 'edm'
  config.diffusion.prediction_type = 'edm'  # F of D = c_skip x + c_out F(c_in x, c_noise)
  config.diffusion.loss_weighting = 'edm'
  config.training.time_sampling = 'lognormal'  # P_mean -1.2, P_std 1.2
  config.sampling.sampler = 'heun'
  config.sampling.spacing = 'karras'
  config.sampling.num_steps = 10  # 19 network calls
  config.sampling.preview_sampler = 'heun'
  config.sampling.preview_steps = 10
  return config
