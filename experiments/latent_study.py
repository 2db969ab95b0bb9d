"""Latent against pixel space: samples of several runs of one labelled image data set, judged alike.

Each run (`--runs=name=workdir[@step],...`) samples `--num_samples` images with its own sampler
from its EMA parameters at that checkpoint (default: the newest); a latent run decodes them.
Every set is scored by experiments/judge.py: the classifier-feature Fréchet ratio (1 = as close
to the data as real images are to each other) and the copy ratio (median distance of a sample to
its nearest training image over that of a real image to its nearest other one: well below 1 for
copies). Writes `<out>/<name>.png` (64 samples), `<out>/<name>_nearest.png` (16 samples above
their nearest training images), `<out>/results.json` and prints a Markdown table.

  python experiments/latent_study.py --out=/tmp/latent_study \
      --runs=keras=/tmp/flowers_keras,latent=/tmp/flowers_latent@2000 \
      --data_path=flowers64.npz --num_samples=400 --sampler=dpm_solver++ --num_steps=25
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app
from absl import flags
import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
from diffusion_jax import generation, images, parallel, run_config, sources, task as task_lib
from experiments import judge as judge_lib
# pylint: enable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command line's flags (defined only when run as a script: tests import `study`)."""
  flags.DEFINE_list('runs', None, 'name=workdir or name=workdir@step, one per run.')
  flags.DEFINE_string('data_path', '', 'The .npz the runs trained on, if it moved (data.path).')
  flags.DEFINE_integer('num_samples', 500, 'Samples per run (the judge compares sets of half).')
  flags.DEFINE_integer('seed', 0, 'Sampling noise and the judge\'s classifier.')
  flags.DEFINE_string('out', '/tmp/latent_study', 'Where pictures and results go.')
  flags.DEFINE_string('sampler', '', 'Every run samples with this sampler instead of its own '
                      '(solver order 2, deterministic, logsnr spacing); \'\': each its own.')
  flags.DEFINE_integer('num_steps', 0, 'With --sampler: its network calls.')
  flags.mark_flags_as_required(['runs'])


def parse_run(spec: str) -> tuple[str, str, int | None]:
  """'name=workdir@step' -> (name, workdir, step or None)."""
  name, _, rest = spec.partition('=')
  workdir, _, step = rest.partition('@')
  if not name or not workdir:
    raise ValueError(f'--runs entry {spec!r} is not name=workdir[@step].')
  return name, workdir, int(step) if step else None


def run_samples(workdir: str, step: int | None, num_samples: int, seed: int, data_path: str,
                sampling: dict | None = None):
  """(config, samples float32 [n, H, W, C] in [-1, 1], checkpoint step, seconds) of one run,
  with its own sampling settings updated by `sampling` ({field: value} of the sampling group)."""
  config = run_config.load_config(workdir)
  if data_path:
    config.data.path = data_path
  config.sampling.update(sampling or {})
  mesh = parallel.create_mesh()
  task = task_lib.create_task(config)
  params, found = task_lib.restore_ema_params(config, task, mesh, workdir, step)
  generate = generation.make_generate_fn(config, task, mesh)
  start = time.perf_counter()
  x = generate(params, jax.random.PRNGKey(seed), num_samples)
  return config, x, found, time.perf_counter() - start


def nearest_picture(samples: np.ndarray, real: np.ndarray, count: int = 16) -> np.ndarray:
  """uint8 grid: `count` samples in the top row(s), their nearest training images below."""
  index, _ = judge_lib.nearest_training_images(samples[:count], real)
  per_row = 8
  rows = []
  for i in range(0, count, per_row):
    rows += [images.to_uint8(samples[i:i + per_row]), real[index[i:i + per_row]]]
  return images.make_grid(np.concatenate(rows), ncols=per_row)


def study(runs: list, out: str, *, num_samples: int, seed: int = 0, data_path: str = '',
          sampling: dict | None = None) -> list:
  """The rows of the study (one dict per run) for `runs` = [(name, workdir, step)], with the
  pictures and results.json written to `out`; `sampling` overrides every run's sampler."""
  os.makedirs(out, exist_ok=True)
  judge = real = None
  results = []
  for name, workdir, step in runs:
    config, x, found, seconds = run_samples(workdir, step, num_samples, seed, data_path,
                                            sampling)
    if judge is None:  # one judge for every run: the data are the same
      judge = judge_lib.make_judge(config, seed=seed, num_samples=num_samples)
      real, _ = sources.load_in_memory(config)
      print(f'judge: {judge.description}', flush=True)
    row = {'name': name, 'workdir': workdir, 'step': found, 'ratio': judge.score(x),
           'copy_ratio': judge_lib.copy_ratio(x, real, seed=seed),
           'sampling_seconds': seconds, 'num_samples': len(x),
           'latent': bool(config.latent.autoencoder), 'sampler': config.sampling.sampler,
           'sampling_steps': config.sampling.num_steps}
    results.append(row)
    images.save_png(images.picture(config, x[:64], ncols=8), os.path.join(out, f'{name}.png'))
    images.save_png(nearest_picture(x, real), os.path.join(out, f'{name}_nearest.png'))
    print(json.dumps(row), flush=True)
  with open(os.path.join(out, 'results.json'), 'w', encoding='utf-8') as f:
    json.dump(results, f, indent=2)
  return results


def main(_):
  sampling = {}
  if FLAGS.sampler:
    sampling = dict(sampler=FLAGS.sampler, num_steps=FLAGS.num_steps or 25, solver_order=2,
                    stochastic=False, spacing='logsnr')
  results = study([parse_run(spec) for spec in FLAGS.runs], FLAGS.out,
                  num_samples=FLAGS.num_samples, seed=FLAGS.seed, data_path=FLAGS.data_path,
                  sampling=sampling)
  print('\n| run | step | judge ratio | copy ratio | sampling s |\n| --- | --- | --- | --- | --- |')
  for r in results:
    print(f'| {r["name"]} | {r["step"]} | {r["ratio"]:.2f} | {r["copy_ratio"]:.2f} | '
          f'{r["sampling_seconds"]:.0f} |')


if __name__ == '__main__':
  define_flags()
  app.run(main)
