"""Flowers 64x64: peak learning rate x schedule after warm-up x EMA decay (3 x 2 x 3 = 18 trials).

  python experiments/sweep.py run --sweep=experiments/sweeps/flowers_lr_schedule_ema.py \
    --root=/tmp/flowers_sweep
"""

import itertools

LEARNING_RATES = (1e-4, 2e-4, 4e-4)
SCHEDULES = ('constant', 'cosine')
EMA_DECAYS = (0.999, 0.9995, 0.9999)


def get_sweep() -> dict:
  return {
      'config': 'configs/flowers.py',
      'trials': [{'training.learning_rate': lr, 'training.lr_schedule': schedule,
                  'training.ema_decay': ema}
                 for lr, schedule, ema in itertools.product(LEARNING_RATES, SCHEDULES,
                                                            EMA_DECAYS)],
  }
