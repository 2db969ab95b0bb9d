"""Likelihoods of trained runs through the probability-flow ODE, one table for several runs.

  python experiments/likelihoods.py --workdir=/tmp/digits,/tmp/digits_v,/tmp/digits_flow,\\
      /tmp/digits_edm --num_examples=1000 --out=/tmp/likelihoods
  python experiments/likelihoods.py --workdir=/tmp/roll --num_examples=5000 --out=/tmp/roll_nll

For each run (its config from `<workdir>/config.json`, its EMA parameters): the bits/dim of
--num_examples examples through the ODE (the last of the run's data, which in-memory sources
such as digits also train on; --held_out=<npz>: images an npz run has not seen), by
`evaluation.ode_bits_per_dim` (images uniformly dequantised over their 8-bit bins,
Hutchinson's divergence with --probes probes; 2-D points with the exact divergence), its
standard error over the examples, the network calls and the seconds taken; on the ddpm process
also the variational bound of the discrete chain.
For 2-D data it sets beside them a Gaussian kernel density estimate (scipy, Scott's bandwidth)
fitted to --kde_points fresh points of the generator and scored on the same examples: a
reference for the scale of the numbers, not a bound.

Writes `table.md` (also printed) and `results.json` to --out.
"""

from __future__ import annotations

import math
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
import numpy as np

from diffusion_jax import evaluation, files, input_pipeline, parallel, run_config, sources
from diffusion_jax import task as task_lib
# pylint: enable=g-import-not-at-top,wrong-import-position

flags.DEFINE_list('workdir', None, 'Trained runs.')
flags.DEFINE_string('out', '', 'Output folder (default for one run: <workdir>/likelihoods).')
flags.DEFINE_integer('num_examples', 1000, 'Held-out examples per run.')
flags.DEFINE_integer('batch_size', 500, 'Examples per ODE solve (each solves its own steps).')
flags.DEFINE_integer('probes', 1, 'Hutchinson probes per example (images; 0: exact).')
flags.DEFINE_string('probe_kind', 'rademacher', 'rademacher | gaussian.')
flags.DEFINE_float('tolerance', 0.0, 'rtol = atol of the likelihood ODE (0: the run\'s '
                   'eval.ode_rtol and eval.ode_atol).')
flags.DEFINE_string('held_out', '', 'An .npz of images the runs did not train on (data.source=npz '
                    'runs); default: the last --num_examples of the run\'s own data.')
flags.DEFINE_bool('bound', True, 'On the ddpm process also the variational bound.')
flags.DEFINE_integer('kde_points', 20000, '2-D data: fresh points for the kernel density.')
flags.mark_flags_as_required(['workdir'])
FLAGS = flags.FLAGS


def kde_bits_per_dim(config, count: int) -> float:
  """Bits/dim of the held-out 2-D points under a Gaussian KDE of fresh generator points."""
  from scipy import stats  # pylint: disable=g-import-not-at-top
  points, _, _ = input_pipeline.held_out_images(config, count)
  fresh = sources.toy_points(config.data.name, FLAGS.kde_points, config.training.seed + 1)
  log_p = stats.gaussian_kde(fresh.T).logpdf(np.asarray(points[:count], np.float64).T)
  return float(-log_p.mean() / (2 * math.log(2)))


def study(workdir: str, mesh) -> dict:
  config = run_config.load_config(workdir)
  config.eval.update(bpd_num_examples=FLAGS.num_examples, bpd_batch_size=FLAGS.batch_size,
                     ode_bpd=True, ode_probes=FLAGS.probes, ode_probe_kind=FLAGS.probe_kind,
                     ode_rtol=FLAGS.tolerance or config.eval.ode_rtol,
                     ode_atol=FLAGS.tolerance or config.eval.ode_atol)
  if FLAGS.held_out:
    if config.data.source != 'npz':
      raise app.UsageError(f'--held_out needs runs of data.source=npz; {workdir} is of '
                           f'{config.data.source!r}.')
    config.data.path = FLAGS.held_out
  task = task_lib.create_task(config)
  params, step = task_lib.restore_ema_params(config, task, mesh, workdir)
  start = time.perf_counter()
  row = evaluation.ode_bits_per_dim(config, task, mesh, params)
  row.update(workdir=workdir, step=step, seconds=time.perf_counter() - start,
             formulation=f'{config.diffusion.process} {config.diffusion.prediction_type}')
  if FLAGS.bound and task.process.discrete and config.data.source != 'toy2d':
    start = time.perf_counter()
    row['bound_bits_per_dim'] = evaluation.bits_per_dim(config, task, mesh, params)
    row['bound_seconds'] = time.perf_counter() - start
  if config.data.source == 'toy2d':
    row['kde_bits_per_dim'] = kde_bits_per_dim(config, FLAGS.num_examples)
  print(row, flush=True)
  return row


def markdown_table(rows: list[dict]) -> str:
  lines = ['| run | formulation | ODE bits/dim | network calls: mean (max) | seconds | '
           'bound bits/dim | KDE bits/dim |', '| --- | --- | ---: | ---: | ---: | ---: | ---: |']
  for r in rows:
    bound = f'{r["bound_bits_per_dim"]:.3f}' if 'bound_bits_per_dim' in r else ''
    kde = f'{r["kde_bits_per_dim"]:.3f}' if 'kde_bits_per_dim' in r else ''
    lines.append(f'| {os.path.basename(os.path.abspath(r["workdir"]))} | {r["formulation"]} | '
                 f'{r["ode_bits_per_dim"]:.3f} ± {r["ode_bits_per_dim_stderr"]:.3f} | '
                 f'{r["ode_network_calls_mean"]:.0f} ({r["ode_network_calls_max"]}) | '
                 f'{r["seconds"]:.0f} | {bound} | {kde} |')
  return '\n'.join(lines) + '\n'


def main(argv):
  del argv
  if len(FLAGS.workdir) > 1 and not FLAGS.out:
    raise app.UsageError('--out is needed with several --workdir.')
  out = FLAGS.out or os.path.join(FLAGS.workdir[0], 'likelihoods')
  mesh = parallel.create_mesh()
  rows = [study(w, mesh) for w in FLAGS.workdir]
  table = markdown_table(rows)
  files.write_text(os.path.join(out, 'table.md'), table)
  files.write_json(os.path.join(out, 'results.json'), {
      'rows': rows, 'num_examples': FLAGS.num_examples, 'probes': FLAGS.probes,
      'probe_kind': FLAGS.probe_kind, 'tolerance': FLAGS.tolerance or 'the runs\' own'})
  print(table)
  print(f'wrote {out}/')


if __name__ == '__main__':
  app.run(main)
