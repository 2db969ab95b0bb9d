"""Class-conditional digits: the offline demo with its 10 labels, for classifier-free guidance.

Labels are dropped to the "null" class for training.label_dropout of the examples, so one
network learns both the conditional and the unconditional model; sampling.guidance_scale mixes
them, and sampling.label picks the class (-1: the classes in turn).

  python launch.py --config=configs/digits_cond.py --workdir=/tmp/digits_cond
  python launch.py --config=configs/digits_cond.py --workdir=/tmp/digits_cond --mode=sample \
    --config.sampling.guidance_scale=2
"""

from configs import digits


def get_config():
  config = digits.get_config()
  config.data.class_conditional = True
  config.data.num_classes = 10
  config.training.label_dropout = 0.1
  return config
