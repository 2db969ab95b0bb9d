"""Sample quality against network calls: every sampler of trained runs at 5-50 calls.

  python experiments/sampler_study.py --workdir=/tmp/digits
  python experiments/sampler_study.py --workdir=/tmp/roll --calls=5,10,20,50 --spacing=karras
  python experiments/sampler_study.py --workdir=/tmp/digits,/tmp/digits_flow,/tmp/digits_edm \\
      --spacing=logsnr --repeats=3 --out=/tmp/formulations

Restores each run's EMA parameters (its config from `<workdir>/config.json`), samples the
judge's number of samples (experiments/judge.py: 5,000 points for toy2d, 1,796 digits) with each
sampler at each number of network calls (heun and edm: the most steps within it), and a
reference, and scores each set with the judge (1 = as close to the data as fresh real data). The
reference is DDPM over all T steps on the ddpm process, and Euler-Maruyama over 1,000 steps on
the continuous ones. Several runs (comma-separated --workdir, e.g. one per formulation: process
and parameterisation) make one table with a row per run and sampler; their data must be the
same. For a class-conditional run it also samples, with --guided_sampler at --guided_calls, at
each of --guidance_scales, and reports the share of samples the judge's classifier puts in the
class they were asked for.

Writes to --out (default `<workdir>/sampler_study/` for one run): `table.md` (also printed),
`results.json`, `quality_vs_calls.png` (a line per run and sampler), `samples.png` (the best
setting at 20 calls), for images `fewest_calls.png` (a row of 20 samples per run, in the order of
--workdir, from the first sampler at the fewest calls: e.g. one-step samples of each few-step
family) and, for conditional runs, `guidance.md` and `classes.png` (one row per class).
"""

from __future__ import annotations

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

from diffusion_jax import files, generation, images, parallel, run_config, step_tables
from diffusion_jax import task as task_lib
from experiments import judge as judge_lib
# pylint: enable=g-import-not-at-top,wrong-import-position

REFERENCE = 'reference'
OWN = 'own'  # --samplers: each run's own sampler and spacing (its config's sampling group)
EM_REFERENCE_STEPS = 1000

flags.DEFINE_list('workdir', None, 'Trained runs (one per formulation), of the same data.')
flags.DEFINE_string('config', None, 'Config file, used only if the run has no config.json.')
flags.DEFINE_string('out', '', 'Output folder (default for one run: <workdir>/sampler_study).')
flags.DEFINE_list('calls', ['5', '10', '20', '50'], 'Network calls per sample.')
flags.DEFINE_list('samplers', list(judge_lib.SAMPLERS),
                  f'Samplers, among {list(judge_lib.SAMPLERS)}, or {OWN!r}: each run\'s own '
                  'sampler and spacing (e.g. runs of several few-step families).')
flags.DEFINE_string('spacing', 'linspace', 'Timestep spacing of every sampler but DDPM.')
flags.DEFINE_integer('num_samples', 0, 'Samples per set (toy2d only; 0: the judge\'s default).')
flags.DEFINE_list('guidance_scales', ['1', '2', '4'], 'Conditional runs: guidance scales.')
flags.DEFINE_string('guided_sampler', 'unipc-2', 'Conditional runs: sampler of the guidance rows.')
flags.DEFINE_integer('guided_calls', 20, 'Conditional runs: network calls of the guidance rows.')
flags.DEFINE_integer('seed', 0, 'Noise of the samples and the judge\'s draws.')
flags.DEFINE_integer('reference_repeats', 1, 'Sample sets of the reference (1,000 calls each).')
flags.DEFINE_integer('repeats', 1, 'Sample sets per cell (seeds seed, seed + 1, ...); the table '
                     'shows the mean ratio, results.json each one.')
flags.DEFINE_bool('reference', True, 'Also sample the reference: DDPM over all T steps (ddpm '
                  'process) or Euler-Maruyama over 1,000 steps (continuous processes).')
flags.DEFINE_list('tolerances', [], 'The adaptive ODE solve (sampling.sampler=adaptive) at '
                  'these rtol = atol, each beside --compare_sampler at its mean calls.')
flags.DEFINE_string('compare_sampler', 'dpm_solver++(2M)', 'The fixed-grid sampler set beside '
                    'each tolerance of the adaptive solve.')
flags.DEFINE_float('clip_x0', -1.0, 'sampling.clip_x0 of every row (-1: the run\'s own; 0: no '
                   'clipping of the data prediction).')
flags.mark_flags_as_required(['workdir'])
FLAGS = flags.FLAGS


def generator(config, task, mesh, n: int, **settings):
  """generate(params, seed) -> (samples [n, ...], seconds), compiled once for these sampling
  settings; its `num_calls` is the network calls per sample (for the adaptive solve, those of
  the last set on average, rounded)."""
  config = config.copy_and_resolve_references()
  config.sampling.update(settings)
  if FLAGS.clip_x0 >= 0:
    config.sampling.clip_x0 = FLAGS.clip_x0
  config.sampling.batch_size = parallel.round_up(n, mesh.size)
  generate = generation.make_generate_fn(config, task, mesh)

  def run(params, seed: int):
    start = time.perf_counter()
    x, calls = generate(params, jax.random.PRNGKey(seed), n, with_calls=True)
    run.calls_max = int(calls.max())
    if generate.num_calls is None:
      run.num_calls = int(round(float(calls.mean())))
    return x, time.perf_counter() - start
  run.num_calls = generate.num_calls
  return run


def sample_set(config, task, mesh, params, n: int, seed: int, **settings):
  """(samples [n, ...], network calls, seconds) with the sampling settings overridden."""
  run = generator(config, task, mesh, n, **settings)
  x, seconds = run(params, seed)
  return x, run.num_calls, seconds


def formulation(config) -> str:
  """A run's label: its process and parameterisation, e.g. `ddpm eps`, `flow flow`, or its
  training objective beside the denoising loss, e.g. `flow meanflow`, `edm consistency (ict)`."""
  objective = config.training.get('objective', 'denoise')
  if objective == 'denoise':
    return f'{config.diffusion.process} {config.diffusion.prediction_type}'
  schedule = f' ({config.training.consistency_schedule})' if objective == 'consistency' else ''
  return f'{config.diffusion.process} {objective}{schedule}'


def scored(config, task, mesh, params, judge, name: str, calls: int | None, repeats: int,
           **settings) -> tuple[dict, np.ndarray]:
  """The row of one sampler setting (at most `calls` network calls; None: the sampler's own
  count), over `repeats` sample sets, and the first set."""
  if calls is not None:
    settings['num_steps'] = step_tables.num_steps_for_calls(settings['sampler'], calls)
  run = generator(config, task, mesh, judge.num_samples, **settings)
  ratios, first = [], None
  for r in range(repeats):
    x, seconds = run(params, FLAGS.seed + r)
    ratios.append(judge.score(x))
    first = x if first is None else first
  made = run.num_calls
  row = {'formulation': formulation(config), 'sampler': name,
         'requested_calls': calls or made, 'calls': made, 'calls_max': run.calls_max,
         'ratio': float(np.mean(ratios)), 'ratios': ratios, 'seconds': seconds}
  spread = f' +- {np.std(ratios):.3f}' if len(ratios) > 1 else ''
  print(f'{row["formulation"]:>10} {name:>22} {made:4d} calls: ratio {row["ratio"]:.3f}{spread} '
        f'({seconds:.1f} s per set)', flush=True)
  return row, first


def _sampler(row: dict) -> str:
  """The row's sampler; the adaptive solve's tolerances make one line, 'adaptive'."""
  return 'adaptive' if 'tolerance' in row else row['sampler']


def _label(row: dict, several: bool) -> str:
  return f'{row["formulation"]}: {_sampler(row)}' if several else _sampler(row)


def adaptive_table(rows: list[dict]) -> str:
  """The adaptive solve at each tolerance beside the fixed-grid sampler at its mean calls."""
  lines = ['| run | tolerance | calls: mean (max) | ratio | fixed grid at those calls | ratio |',
           '| --- | ---: | ---: | ---: | --- | ---: |']
  spread = lambda r: f' ± {np.std(r["ratios"]):.2f}' if len(r['ratios']) > 1 else ''
  for r in rows:
    if 'tolerance' in r:
      same = next(s for s in rows if s.get('beside_tolerance') == r['tolerance']
                  and s['formulation'] == r['formulation'])
      lines.append(f'| {r["formulation"]} | {r["tolerance"]:g} | {r["calls"]} ({r["calls_max"]})'
                   f' | {r["ratio"]:.2f}{spread(r)} | {same["sampler"]}, {same["calls"]} | '
                   f'{same["ratio"]:.2f}{spread(same)} |')
  return '\n'.join(lines) + '\n'


def markdown_table(rows: list[dict], calls: list[int]) -> str:
  """Runs and samplers down, requested network calls across; cells are the judge's ratio (mean
  over the repeats, +- their spread when there are several), with the calls made in
  parentheses where they differ from the requested ones."""
  rows = [r for r in rows if 'tolerance' not in r and 'beside_tolerance' not in r]
  several = len({r['formulation'] for r in rows}) > 1
  names = list(dict.fromkeys(_label(r, several) for r in rows if r['sampler'] != REFERENCE))
  lines = ['| sampler | ' + ' | '.join(f'{c} calls' for c in calls) + ' |',
           '| --- |' + ' ---: |' * len(calls)]

  def cell(r):
    made = f' ({r["calls"]})' if r['calls'] != r['requested_calls'] else ''
    spread = f' ± {np.std(r["ratios"]):.2f}' if len(r['ratios']) > 1 else ''
    return f'{r["ratio"]:.2f}{spread}{made}'
  for name in names:
    cells = {r['requested_calls']: r for r in rows if _label(r, several) == name}
    lines.append(f'| {name} | ' + ' | '.join(
        cell(cells[c]) if c in cells else '' for c in calls) + ' |')
  for r in rows:
    if r['sampler'] == REFERENCE:
      what = 'DDPM' if r['formulation'].startswith('ddpm') else 'Euler-Maruyama'
      prefix = f'{r["formulation"]}: ' if several else ''
      lines.append(f'| {prefix}{what}, {r["calls"]} calls | {cell(r)} |' + ' |' * (len(calls) - 1))
  return '\n'.join(lines) + '\n'


def plot(path: str, rows: list[dict], title: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  several = len({r['formulation'] for r in rows}) > 1
  fig, ax = plt.subplots(figsize=(8, 5) if several else (6.5, 4.2))
  samplers = list(dict.fromkeys(_sampler(r) for r in rows if r['sampler'] != REFERENCE))
  forms = list(dict.fromkeys(r['formulation'] for r in rows))
  for name in dict.fromkeys(_label(r, several) for r in rows if r['sampler'] != REFERENCE):
    mine = [r for r in rows if _label(r, several) == name]
    pts = sorted((r['calls'], r['ratio']) for r in mine)
    # A colour per sampler, a line style per formulation.
    ax.plot(*zip(*pts), marker='o', label=name,
            color=f'C{samplers.index(_sampler(mine[0])) % 10}',
            ls=('-', '--', ':', '-.')[forms.index(mine[0]['formulation']) % 4])
  for r in rows:
    if r['sampler'] == REFERENCE:
      ax.axhline(r['ratio'], color='k', ls='--', lw=1,
                 label=f'{r["formulation"]} reference, {r["calls"]} calls')
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
  ax.legend(fontsize=6 if several else 8, ncol=2 if several else 1)
  files.write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=120, bbox_inches='tight',
                                                       format='png'))
  plt.close(fig)


def guidance_rows(config, task, mesh, params, judge, scales, seed: int) -> list[dict]:
  """For a conditional run: the ratio and the share of samples of the asked class per scale."""
  rows = []
  for scale in scales:
    x, made, seconds = sample_set(config, task, mesh, params, judge.num_samples, seed,
                                   guidance_scale=scale, label=-1,
                                   num_steps=FLAGS.guided_calls, spacing=FLAGS.spacing,
                                   **judge_lib.SAMPLERS[FLAGS.guided_sampler])
    asked = generation.sample_labels(np.arange(len(x)), -1, task.info.num_classes)
    rows.append({'guidance_scale': scale, 'calls': made, 'ratio': judge.score(x),
                 'class_share': judge.class_share(x, asked), 'seconds': seconds})
    print(f'guidance {scale}: ratio {rows[-1]["ratio"]:.3f}, asked class '
          f'{rows[-1]["class_share"]:.3f}', flush=True)
  return rows


def study_run(workdir: str, mesh, judge_for) -> tuple[list[dict], dict]:
  """Every sampler at every number of calls, and the reference, on one run: (rows, context)."""
  config = run_config.load_config(workdir, FLAGS.config)
  task = task_lib.create_task(config)
  params, step = task_lib.restore_ema_params(config, task, mesh, workdir)
  judge = judge_for(config)
  print(f'{workdir} ({formulation(config)}) at step {step}; judge: {judge.description}',
        flush=True)
  rows, best, fewest = [], None, None
  for name in FLAGS.samplers:
    settings = (dict(sampler=config.sampling.sampler) if name == OWN else
                dict(spacing=FLAGS.spacing, **judge_lib.SAMPLERS[name]))
    if name == OWN:
      name = f'{config.sampling.sampler}, {config.sampling.spacing} (own)'
    for c in (int(c) for c in FLAGS.calls):
      row, x = scored(config, task, mesh, params, judge, name, c, FLAGS.repeats, **settings)
      rows.append(row)
      if c == 20 and (best is None or row['ratio'] < best[0]):
        best = (row['ratio'], name, x)
      if fewest is None and c == min(int(c) for c in FLAGS.calls):
        fewest = x[:20]
  for tolerance in (float(t) for t in FLAGS.tolerances):
    row, _ = scored(config, task, mesh, params, judge, f'adaptive (tol {tolerance:g})', None,
                    FLAGS.repeats, sampler='adaptive', rtol=tolerance, atol=tolerance)
    row['tolerance'] = tolerance
    rows.append(row)
    same, _ = scored(config, task, mesh, params, judge, FLAGS.compare_sampler, row['calls'],
                     FLAGS.repeats, spacing=FLAGS.spacing,
                     **judge_lib.SAMPLERS[FLAGS.compare_sampler])
    same['beside_tolerance'] = tolerance
    rows.append(same)
  if FLAGS.reference:
    reference = (dict(sampler='ddpm') if task.process.discrete else
                 dict(sampler='euler_maruyama', num_steps=EM_REFERENCE_STEPS,
                      spacing=FLAGS.spacing))
    rows.append(scored(config, task, mesh, params, judge, REFERENCE, None,
                       FLAGS.reference_repeats, **reference)[0])
  return rows, dict(config=config, task=task, params=params, step=step, judge=judge, best=best,
                    fewest=fewest)


def main(argv):
  del argv
  workdirs = FLAGS.workdir
  if len(workdirs) > 1 and not FLAGS.out:
    raise app.UsageError('--out is needed with several --workdir.')
  out = FLAGS.out or os.path.join(workdirs[0], 'sampler_study')
  unknown = sorted(set(FLAGS.samplers) - set(judge_lib.SAMPLERS) - {OWN})
  if unknown:
    raise app.UsageError(f'--samplers: unknown {unknown}; choose among '
                         f'{list(judge_lib.SAMPLERS)}.')
  mesh = parallel.create_mesh()
  judges = {}

  def judge_for(config):  # one judge (and its classifier) for runs of the same data
    key = (config.data.source, config.data.name, config.data.path)
    if key not in judges:
      judges[key] = judge_lib.make_judge(config, seed=FLAGS.seed, num_samples=FLAGS.num_samples)
    if len(judges) > 1:
      raise app.UsageError('--workdir: the runs are of different data; study them one by one.')
    return judges[key]

  rows, runs, labels = [], [], []
  for workdir in workdirs:
    run_rows, context = study_run(workdir, mesh, judge_for)
    labels.append(formulation(context['config']))
    if labels.count(labels[-1]) > 1:  # two runs of one formulation: told apart by their folder
      for row in run_rows:
        row['formulation'] += f' [{os.path.basename(os.path.abspath(workdir))}]'
    rows += run_rows
    runs.append(context)
  first = runs[0]
  config, task, params, judge = first['config'], first['task'], first['params'], first['judge']
  table = markdown_table(rows, [int(c) for c in FLAGS.calls])
  results = {'workdirs': workdirs, 'steps': [r['step'] for r in runs],
             'judge': judge.description, 'spacing': FLAGS.spacing,
             'num_samples': judge.num_samples, 'repeats': FLAGS.repeats, 'rows': rows}
  if task.info.num_classes and len(runs) == 1:
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
  if FLAGS.tolerances:
    adaptive = adaptive_table(rows)
    files.write_text(os.path.join(out, 'adaptive.md'), adaptive)
    print(adaptive)
  files.write_json(os.path.join(out, 'results.json'), results)
  names = ', '.join(os.path.basename(os.path.abspath(w)) for w in workdirs)
  plot(os.path.join(out, 'quality_vs_calls.png'), rows,
       f'{names}, step {first["step"]}, {FLAGS.spacing} spacing')
  best = min((r['best'] for r in runs if r['best'] is not None), default=None,
             key=lambda b: b[0])
  if best is not None:
    shown = best[2] if config.data.source == 'toy2d' else best[2][:100]
    images.save_png(images.picture(config, shown), os.path.join(out, 'samples.png'))
  if config.data.source != 'toy2d' and FLAGS.samplers:
    rows_of_runs = np.concatenate([r['fewest'] for r in runs])
    images.save_png(images.make_grid(images.to_uint8(rows_of_runs), ncols=20,
                                     scale=max(1, 64 // config.data.image_size), pad=2),
                    os.path.join(out, 'fewest_calls.png'))
  print(table)
  print(f'wrote {out}/')


if __name__ == '__main__':
  app.run(main)
