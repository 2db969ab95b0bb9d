"""Sample quality against the EMA width, chosen after training: EDM2's post-hoc EMA study.

  python experiments/posthoc_ema.py --workdir=/tmp/digits_phema
  python experiments/posthoc_ema.py --workdir=/tmp/digits_phema --sigma_rels=0.02,0.05,0.1,0.2

The run must have been trained with training.phema_sigma_rels (its snapshots in
`<workdir>/phema/`). For each sigma_rel the EMA of that width at --step (default: the last
snapshot) is reconstructed (`diffusion_jax.posthoc_ema`), sampled with the run's configured
sampler, and scored by the sampler study's judge (experiments/judge.py: 1 = as close to the data
as fresh real data); the run's own EMA (training.ema_decay) is scored the same way as the
baseline. Writes `table.md` (also printed), `results.json` and `quality_vs_sigma_rel.png` to
--out (default `<workdir>/posthoc_ema/`).
"""

from __future__ import annotations

import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

from diffusion_jax import cpu_env  # pylint: disable=wrong-import-position

if __name__ == '__main__':
  cpu_env.reexec_with_cpu_settings()

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
import jax
import numpy as np

from diffusion_jax import files, generation, parallel, posthoc_ema, run_config
from diffusion_jax import task as task_lib
from experiments import judge as judge_lib
# pylint: enable=g-import-not-at-top,wrong-import-position

flags.DEFINE_string('workdir', None, 'A run trained with training.phema_sigma_rels.')
flags.DEFINE_string('config', None, 'Config file, used only if the run has no config.json.')
flags.DEFINE_string('out', '', 'Output folder (default: <workdir>/posthoc_ema).')
flags.DEFINE_list('sigma_rels', [f'{0.02 * i:.2f}' for i in range(1, 13)] + ['0.25'],
                  'EMA widths to reconstruct and score.')
flags.DEFINE_integer('step', -1, 'Reconstruct at this step (-1: the last snapshot).')
flags.DEFINE_integer('num_samples', 0, 'Samples per set (toy2d only; 0: the judge\'s default).')
flags.DEFINE_integer('seed', 0, 'Noise of the samples (the same for every width).')
flags.DEFINE_string('sampler', '', 'One of the sampler study\'s samplers (experiments/judge.py); '
                    '\'\' for the run\'s configured one.')
flags.DEFINE_integer('calls', 0, 'Network calls of --sampler (0: sampling.num_steps).')
flags.DEFINE_string('spacing', '', 'Timestep spacing of --sampler (\'\': sampling.spacing).')
flags.mark_flags_as_required(['workdir'])
FLAGS = flags.FLAGS


def plot(path: str, rows: list[dict], baseline: dict, title: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6.5, 4.2))
  ax.plot([r['sigma_rel'] for r in rows], [r['ratio'] for r in rows], marker='o',
          label='post-hoc EMA, reconstructed')
  ax.axhline(baseline['ratio'], color='k', ls='--', lw=1,
             label=f'training.ema_decay={baseline["ema_decay"]:g}')
  ax.axhline(1.0, color='gray', ls=':', lw=1, label='real data')
  ax.set_xlabel('EMA width sigma_rel')
  ax.set_ylabel('distance to the data / real-vs-real')
  ax.set_title(title, fontsize=10)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  files.write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=120, bbox_inches='tight',
                                                       format='png'))
  plt.close(fig)


def main(argv):
  del argv
  config = run_config.load_config(FLAGS.workdir, FLAGS.config)
  out = FLAGS.out or os.path.join(FLAGS.workdir, 'posthoc_ema')
  mesh = parallel.create_mesh()
  task = task_lib.create_task(config)
  judge = judge_lib.make_judge(config, seed=FLAGS.seed, num_samples=FLAGS.num_samples)
  config.sampling.batch_size = parallel.round_up(judge.num_samples, mesh.size)
  if FLAGS.sampler:
    config.sampling.update(judge_lib.SAMPLERS[FLAGS.sampler])
  if FLAGS.calls:
    config.sampling.num_steps = FLAGS.calls
  if FLAGS.spacing:
    config.sampling.spacing = FLAGS.spacing
  generate = generation.make_generate_fn(config, task, mesh)
  target = task_lib.abstract_train_state(config, task, mesh).params
  step = None if FLAGS.step < 0 else FLAGS.step

  def ratio(params) -> float:
    return judge.score(generate(params, jax.random.PRNGKey(FLAGS.seed), judge.num_samples))

  rows = []
  for s in (float(v) for v in FLAGS.sigma_rels):
    params, at, weights = posthoc_ema.reconstruct(FLAGS.workdir, s, target, step)
    rows.append({'sigma_rel': s, 'step': at, 'ratio': ratio(params),
                 'max_abs_weight': float(np.abs(weights).max())})
    print(f'sigma_rel {s:.3f} at step {at}: ratio {rows[-1]["ratio"]:.3f}', flush=True)
  fixed = config.copy_and_resolve_references()
  fixed.sampling.ema_sigma_rel = 0.0  # the run's own EMA, from its checkpoint
  ema, ema_step = task_lib.restore_ema_params(fixed, task, mesh, FLAGS.workdir, rows[-1]['step'])
  baseline = {'ema_decay': config.training.ema_decay, 'step': ema_step, 'ratio': ratio(ema)}
  best = min(rows, key=lambda r: r['ratio'])
  lines = ['| EMA | distance ratio |', '| --- | ---: |']
  lines += [f'| sigma_rel {r["sigma_rel"]:.3f} | {r["ratio"]:.3f} |' for r in rows]
  lines += [f'| training.ema_decay={baseline["ema_decay"]:g} | {baseline["ratio"]:.3f} |',
            '', f'Best: sigma_rel {best["sigma_rel"]:.3f} ({best["ratio"]:.3f}) at step '
            f'{best["step"]}, against {baseline["ratio"]:.3f} for the fixed EMA; judge: '
            f'{judge.description}, {judge.num_samples} samples, {config.sampling.sampler} with '
            f'{generate.num_calls} network calls.']
  table = '\n'.join(lines) + '\n'
  files.write_text(os.path.join(out, 'table.md'), table)
  files.write_json(os.path.join(out, 'results.json'),
                   {'workdir': FLAGS.workdir, 'judge': judge.description, 'rows': rows,
                    'baseline': baseline, 'best': best, 'num_samples': judge.num_samples,
                    'sampler': config.sampling.sampler, 'network_calls': generate.num_calls})
  plot(os.path.join(out, 'quality_vs_sigma_rel.png'), rows, baseline,
       f'{os.path.basename(os.path.abspath(FLAGS.workdir))}: post-hoc EMA at step '
       f'{best["step"]}')
  print(table)
  print(f'wrote {out}/')


if __name__ == '__main__':
  app.run(main)
