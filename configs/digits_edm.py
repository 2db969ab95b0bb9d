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
  # Sampling as digits.py (DPM-Solver++(2M) SDE, 20 calls, logsnr): the best at 20 calls in
  # experiments/sampler_study.py (docs/samplers.md, "Formulations"), 0.93 +- 0.08 here; Heun
  # gives 1.15 at 19 calls.
  return config
