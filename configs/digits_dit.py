"""A small DiT on the offline digits: `configs/digits.py`'s data, process, sampler and
wall-clock budget, with a transformer in place of the U-Net (8x8 images in 2x2 patches: 16
tokens).

  python launch.py --config=configs/digits_dit.py --workdir=/tmp/digits_dit

For a SiT (Ma et al. 2024: the same network trained with flow matching) add
`--config.diffusion.process=flow --config.diffusion.prediction_type=flow
--config.training.time_sampling=logit_normal`, as configs/digits_flow.py does for the U-Net.
"""

from configs import digits


def get_config():
  config = digits.get_config()
  config.model.architecture = 'dit'
  config.model.hidden = 128
  config.model.num_layers = 6
  config.model.num_heads = 4
  config.model.patch_size = 2
  config.model.qk_norm = True
  config.training.learning_rate = 5e-4
  return config
