"""Sample quality against network calls: every sampler of a trained run at 5-50 calls.

  python experiments/sampler_study.py --workdir=/tmp/digits
  python experiments/sampler_study.py --workdir=/tmp/roll --calls=5,10,20,50 --spacing=karras

Restores the run's EMA parameters (its config from `<workdir>/config.json`), samples the judge's
number of samples (experiments/judge.py: 5,000 points for toy2d, 1,796 digits) with each sampler
at each number of network calls, and DDPM over all T steps as the reference, and scores each
set with the judge (1 = as close to the data as fresh real data). For a class-conditional run it
also samples, with --guided_sampler at --guided_calls, at each of --guidance_scales, and reports
the share of samples the judge's classifier puts in the class they were asked for.

Writes to --out (default `<workdir>/sampler_study/`): `table.md` (also printed), `results.json`,
`quality_vs_calls.png` (a line per sampler), `samples.png` (the best sampler at 20 calls) and, for
conditional runs, `guidance.md` and `classes.png` (one row per class).
"""

from __future__ import annotations

import json
import os
import sys
import time

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

from diffusion_jax import files, generation, images, parallel, run_config
from diffusion_jax import task as task_lib
from experiments import judge as judge_lib
# pylint: enable=g-import-not-at-top,wrong-import-position

REFERENCE = 'ddpm'

flags.DEFINE_string('workdir', None, 'A trained run.')
flags.DEFINE_string('config', None, 'Config file, used only if the run has no config.json.')
flags.DEFINE_string('out', '', 'Output folder (default: <workdir>/sampler_study).')
flags.DEFINE_list('calls', ['5', '10', '20', '50'], 'Network calls per sample.')
flags.DEFINE_list('samplers', list(judge_lib.SAMPLERS),
                  f'Samplers, among {list(judge_lib.SAMPLERS)}.')
flags.DEFINE_string('spacing', 'linspace', 'Timestep spacing of every sampler but DDPM.')
flags.DEFINE_integer('num_samples', 0, 'Samples per set (toy2d only; 0: the judge\'s default).')
flags.DEFINE_list('guidance_scales', ['1', '2', '4'], 'Conditional runs: guidance scales.')
flags.DEFINE_string('guided_sampler', 'unipc-2', 'Conditional runs: sampler of the guidance rows.')
flags.DEFINE_integer('guided_calls', 20, 'Conditional runs: network calls of the guidance rows.')
flags.DEFINE_integer('seed', 0, 'Noise of the samples and the judge\'s draws.')
flags.DEFINE_integer('repeats', 1, 'Sample sets per cell (seeds seed, seed + 1, ...); the table '
                     'shows the mean ratio, results.json each one.')
flags.DEFINE_bool('reference', True, 'Also sample DDPM over all T steps.')
flags.mark_flags_as_required(['workdir'])
FLAGS = flags.FLAGS


def sample_set(config, task, mesh, params, n: int, seed: int, **settings):
  """(samples [n, ...], network calls, seconds) with the sampling settings overridden."""
  config = config.copy_and_resolve_references()
  config.sampling.update(settings)
  config.sampling.batch_size = parallel.round_up(n, mesh.size)
  generate = generation.make_generate_fn(config, task, mesh)
  start = time.perf_counter()
  x = generate(params, jax.random.PRNGKey(seed), n)
  return x, generate.num_calls, time.perf_counter() - start


def scored(config, task, mesh, params, judge, name: str, **settings) -> tuple[dict, np.ndarray]:
  """The row of one sampler setting, over --repeats sample sets, and the first set."""
  ratios, first = [], None
  for r in range(FLAGS.repeats):
    x, calls, seconds = sample_set(config, task, mesh, params, judge.num_samples,
                                   FLAGS.seed + r, **settings)
    ratios.append(judge.score(x))
    first = x if first is None else first
  row = {'sampler': name, 'requested_calls': settings.get('num_steps', calls), 'calls': calls,
         'ratio': float(np.mean(ratios)), 'ratios': ratios, 'seconds': seconds}
  spread = f' +- {np.std(ratios):.3f}' if len(ratios) > 1 else ''
  print(f'{name:>22} {calls:4d} calls: ratio {row["ratio"]:.3f}{spread} ({seconds:.1f} s per set)',
        flush=True)
  return row, first


def markdown_table(rows: list[dict], calls: list[int]) -> str:
  """Samplers down, requested network calls across; cells are the judge's ratio, with the calls
  made in parentheses where a spacing dropped repeated timesteps."""
  names = list(dict.fromkeys(r['sampler'] for r in rows if r['sampler'] != REFERENCE))
  lines = ['| sampler | ' + ' | '.join(f'{c} calls' for c in calls) + ' |',
           '| --- |' + ' ---: |' * len(calls)]

  def cell(r):
    made = f' ({r["calls"]})' if r['calls'] != r['requested_calls'] else ''
    return f'{r["ratio"]:.2f}{made}'
  for name in names:
    cells = {r['requested_calls']: r for r in rows if r['sampler'] == name}
    lines.append(f'| {name} | ' + ' | '.join(
        cell(cells[c]) if c in cells else '' for c in calls) + ' |')
  for r in rows:
    if r['sampler'] == REFERENCE:
      lines.append(f'| DDPM, {r["calls"]} calls | {r["ratio"]:.2f} |' + ' |' * (len(calls) - 1))
  return '\n'.join(lines) + '\n'


def plot(path: str, rows: list[dict], title: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6.5, 4.2))
  for name in dict.fromkeys(r['sampler'] for r in rows if r['sampler'] != REFERENCE):
    pts = sorted((r['calls'], r['ratio']) for r in rows if r['sampler'] == name)
    ax.plot(*zip(*pts), marker='o', label=name)
  for r in rows:
    if r['sampler'] == REFERENCE:
      ax.axhline(r['ratio'], color='k', ls='--', lw=1, label=f'DDPM, {r["calls"]} calls')
  ax.axhline(1.0, color='gray', ls=':', lw=1, label='real data')
  ax.set_xscale('log')
  ax.set_yscale('log')
  ticks = sorted({r['calls'] for r in rows if r['sampler'] != REFERENCE})
  ax.set_xticks(ticks, [str(t) for t in ticks])
  ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
  ax.set_xlabel('network calls per sample')
  ax.set_ylabel('distance to the data / real-vs-real')
  ax.set_title(title, fontsize=10)
  ax.grid(alpha=0.3, which='both')
  ax.legend(fontsize=8)
  files.write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=120, bbox_inches='tight',
                                                       format='png'))
  plt.close(fig)


def guidance_rows(config, task, mesh, params, judge, scales, seed: int) -> list[dict]:
  """For a conditional run: the ratio and the share of samples of the asked class per scale."""
  rows = []
  for scale in scales:
    x, calls, seconds = sample_set(config, task, mesh, params, judge.num_samples, seed,
                                   guidance_scale=scale, label=-1,
                                   num_steps=FLAGS.guided_calls, spacing=FLAGS.spacing,
                                   **judge_lib.SAMPLERS[FLAGS.guided_sampler])
    asked = generation.sample_labels(np.arange(len(x)), -1, task.info.num_classes)
    rows.append({'guidance_scale': scale, 'calls': calls, 'ratio': judge.score(x),
                 'class_share': judge.class_share(x, asked), 'seconds': seconds})
    print(f'guidance {scale}: ratio {rows[-1]["ratio"]:.3f}, asked class '
          f'{rows[-1]["class_share"]:.3f}', flush=True)
  return rows


def main(argv):
  del argv
  config = run_config.load_config(FLAGS.workdir, FLAGS.config)
  out = FLAGS.out or os.path.join(FLAGS.workdir, 'sampler_study')
  unknown = sorted(set(FLAGS.samplers) - set(judge_lib.SAMPLERS))
  if unknown:
    raise app.UsageError(f'--samplers: unknown {unknown}; choose among '
                         f'{list(judge_lib.SAMPLERS)}.')
  mesh = parallel.create_mesh()
  task = task_lib.create_task(config)
  params, step = task_lib.restore_ema_params(config, task, mesh, FLAGS.workdir)
  judge = judge_lib.make_judge(config, seed=FLAGS.seed, num_samples=FLAGS.num_samples)
  print(f'{FLAGS.workdir} at step {step}; judge: {judge.description}', flush=True)
  calls = [int(c) for c in FLAGS.calls]
  rows, best = [], None
  for name in FLAGS.samplers:
    for c in calls:
      row, x = scored(config, task, mesh, params, judge, name, num_steps=c,
                      spacing=FLAGS.spacing, **judge_lib.SAMPLERS[name])
      rows.append(row)
      if c == 20 and (best is None or row['ratio'] < best[0]):
        best = (row['ratio'], name, x)
  if FLAGS.reference:
    rows.append(scored(config, task, mesh, params, judge, REFERENCE, sampler=REFERENCE)[0])
  table = markdown_table(rows, calls)
  results = {'workdir': FLAGS.workdir, 'step': step, 'judge': judge.description,
             'spacing': FLAGS.spacing, 'num_samples': judge.num_samples,
             'repeats': FLAGS.repeats, 'rows': rows}
  if task.info.num_classes:
    results['guidance'] = guidance_rows(config, task, mesh, params, judge,
                                        [float(s) for s in FLAGS.guidance_scales], FLAGS.seed)
    guided = ['| guidance scale | distance ratio | samples of the asked class |',
              '| ---: | ---: | ---: |'] + [
                  f'| {r["guidance_scale"]:g} | {r["ratio"]:.2f} | {r["class_share"]:.1%} |'
                  for r in results['guidance']]
    files.write_text(os.path.join(out, 'guidance.md'), '\n'.join(guided) + '\n')
    print('\n'.join(guided))
    # One row per class: sample i asks for class i % C, so take every C-th.
    x, _, _ = sample_set(config, task, mesh, params, 10 * task.info.num_classes, FLAGS.seed + 1,
                         guidance_scale=float(FLAGS.guidance_scales[-1]),
                         num_steps=FLAGS.guided_calls, spacing=FLAGS.spacing,
                         **judge_lib.SAMPLERS[FLAGS.guided_sampler])
    by_class = x.reshape((10, task.info.num_classes) + x.shape[1:]).swapaxes(0, 1)
    images.save_png(images.make_grid(images.to_uint8(by_class.reshape(x.shape)), ncols=10,
                                     scale=max(1, 64 // config.data.image_size), pad=2),
                    os.path.join(out, 'classes.png'))
  files.write_text(os.path.join(out, 'table.md'), table)
  files.write_json(os.path.join(out, 'results.json'), results)
  plot(os.path.join(out, 'quality_vs_calls.png'), rows,
       f'{os.path.basename(os.path.abspath(FLAGS.workdir))}, step {step}, {FLAGS.spacing} spacing')
  if best is not None:
    shown = best[2] if config.data.source == 'toy2d' else best[2][:100]
    images.save_png(images.picture(config, shown), os.path.join(out, 'samples.png'))
  print(table)
  print(f'wrote {out}/')


if __name__ == '__main__':
  app.run(main)
