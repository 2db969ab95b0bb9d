"""Flowers 64x64: peak learning rate x schedule after warm-up (3 x 2 = 6 trials).

The EMA is not an axis: configs/flowers.py tracks EDM2's post-hoc EMA, so every trial's best EMA
width is found after training (`experiments/posthoc_ema.py --workdir=<trial>`), from that one run.

  python experiments/sweep.py run --sweep=experiments/sweeps/flowers_lr_schedule.py \
    --root=/tmp/flowers_sweep
"""

import itertools

LEARNING_RATES = (1e-4, 2e-4, 4e-4)
SCHEDULES = ('constant', 'cosine')


def get_sweep() -> dict:
  return {
      'config': 'configs/flowers.py',
      'trials': [{'training.learning_rate': lr, 'training.lr_schedule': schedule}
                 for lr, schedule in itertools.product(LEARNING_RATES, SCHEDULES)],
  }
