"""Three tiny toy2d trials, one per data set: a sweep that runs end to end on a CPU in a minute.

  python experiments/sweep.py run --sweep=experiments/sweeps/toy2d_small.py --root=/tmp/toy_sweep
  python experiments/sweep.py summary --root=/tmp/toy_sweep
"""


def get_sweep() -> dict:
  return {
      'config': 'configs/toy2d.py',
      # A small MLP, few points and a few steps: shared by the trials, so not in their names.
      'fixed': {
          'data.num_points': 4096,
          'model.hidden': 32,
          'model.num_layers': 2,
          'diffusion.num_timesteps': 100,
          'training.batch_size': 64,
          'training.num_steps': 4,
          'training.warmup_steps': 2,
          'training.log_every': 2,
          'training.checkpoint_every': 4,
          'sampling.num_steps': 10,
          'sampling.num_samples': 64,
          'sampling.batch_size': 64,
      },
      'trials': [{'data.name': name} for name in ('swiss_roll', 'moons', 's_curve')],
  }
