"""Editing a trained image run: inpainting, image-to-image (SDEdit) and autoguidance, judged.

  python experiments/editing_study.py --workdir=/tmp/digits --held_out=/tmp/held_out.npz \\
      --guides=/tmp/digits:1000,/tmp/digits_half --out=/tmp/editing

--held_out is an .npz of images the run did not train on, with `labels` (for digits: train on
the first 1,500 of them, hold out the last 297). The judge is the studies' own
(experiments/judge.py: a classifier trained on the run's data set, and the Fréchet distance of
its features as a ratio to real data's, 1 = as close as real data).

- **Inpainting**: each held-out image is completed --copies times under each mask of --masks
  (the named shapes of `editing.named_mask`) with each sampler of --inpaint_samplers at each
  of --inpaint_calls network calls, with and without RePaint's resampling (--repaint =
  jump,repeats: num_steps = calls / repeats, so that both spend the same calls). Reported: the
  share of completions the classifier gives the image's true label, and the judge's ratio of
  the completions (its first 1,796 for digits).
- **Image-to-image**: each held-out image is noised to --strengths and sampled back with the
  run's own sampler; the share of results of the input's label, and the ratio.
- **Autoguidance**: the run's samples guided by each of --guides (a workdir, or workdir:step for
  one of its checkpoints) at each of --guidance_scales, with the run's own sampler (at
  --guided_steps), against the run alone at the same sampler steps and at twice the steps
  (autoguidance evaluates two networks per step).

- **References**: the held-out images themselves, each --copies times (the edits' copies of
  one image are alike, so even the images themselves do not score a ratio of 1), and the
  nearest-neighbour completion of each mask.

--parts runs some of the parts (default: all). Writes `tables.md` (also printed),
`results.json`, `inpainting.png` (per mask: the image, the masked input, a completion without
and with resampling) and `sdedit.png` (the inputs, then one row per strength) to --out.
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

from diffusion_jax import (editing, files, generation, images, npz_files, parallel, run_config,
                           sampling, sources)
from diffusion_jax import task as task_lib
from experiments import judge as judge_lib
# pylint: enable=g-import-not-at-top,wrong-import-position

flags.DEFINE_string('workdir', None, 'The trained run.')
flags.DEFINE_string('held_out', None, '.npz of held-out images with `labels`.')
flags.DEFINE_string('out', '', 'Output folder (default: <workdir>/editing_study).')
flags.DEFINE_integer('copies', 7, 'Completions / edits of each held-out image.')
flags.DEFINE_list('masks', ['bottom', 'center'], 'Inpainting masks (named shapes).')
flags.DEFINE_list('inpaint_samplers', ['euler_maruyama', 'ddim (eta 1)'],
                  'Samplers of the inpainting rows (single-step ones, so that RePaint applies).')
flags.DEFINE_list('inpaint_calls', ['10', '20', '50'], 'Network calls of the inpainting rows.')
flags.DEFINE_list('repaint', ['2', '5'], 'RePaint\'s jump, repeats (rows of the resampled runs).')
flags.DEFINE_list('strengths', ['0.2', '0.4', '0.6', '0.8', '1.0'], 'Image-to-image strengths.')
flags.DEFINE_list('guides', [], 'Autoguidance: guide runs, workdir or workdir:step.')
flags.DEFINE_list('guidance_scales', ['1.5', '2', '3'], 'Autoguidance scales.')
flags.DEFINE_integer('guided_steps', 0, 'Autoguidance: sampler steps (0: the run\'s own).')
flags.DEFINE_integer('seed', 0, 'Noise of every set.')
PARTS = ('inpainting', 'image_to_image', 'autoguidance')
flags.DEFINE_multi_enum('parts', list(PARTS), PARTS, 'Parts of the study to run.')
flags.mark_flags_as_required(['workdir', 'held_out'])
FLAGS = flags.FLAGS

SINGLE_STEP = {'euler_maruyama': dict(sampler='euler_maruyama'),
               'ddim (eta 1)': dict(sampler='ddim', eta=1.0)}


def generate(config, task, mesh, params, n: int, *, inputs=None, guide=None, guide_params=None,
             **settings):
  """(samples [n, ...] float, network calls per sample, seconds) with these sampling settings."""
  config = config.copy_and_resolve_references()
  config.sampling.update(settings)
  config.sampling.batch_size = parallel.round_up(min(n, 1024), mesh.size)
  run = generation.make_generate_fn(config, task, mesh, guide=guide)
  start = time.perf_counter()
  x = run(params, jax.random.PRNGKey(FLAGS.seed), n, inputs=inputs, guide_params=guide_params)
  return x, run.num_calls, time.perf_counter() - start


def judged(judge, x, labels) -> dict:
  """The share of samples the judge's classifier gives `labels`, and its ratio (over as many
  samples as it takes)."""
  share = judge.class_share(x, labels)
  ratio = judge.score(x) if len(x) >= judge.num_samples else float('nan')
  return {'label_share': share, 'ratio': ratio}


def references(config, judge, held, labels) -> list:
  """What the edits are read against: the held-out images themselves, each --copies times (as
  many and as alike as the edits, whose ratio is then not 1: the copies are not independent),
  and per mask the nearest-neighbour completion (the hidden pixels of the training image
  closest on the known ones)."""
  tiled = np.tile(labels, FLAGS.copies)
  rows = [{'reference': 'held-out images', **judged(judge, np.tile(held, (FLAGS.copies, 1, 1, 1)),
                                                   tiled)}]
  train = images.to_model_range(sources.load_in_memory(config)[0])
  for mask_name in FLAGS.masks:
    keep = (1.0 - editing.named_mask(mask_name, 1, held.shape[1])[0]) > 0  # [H, W, 1]
    known = np.broadcast_to(keep, held.shape[1:])
    dist = ((held[:, None][:, :, known] - train[None][:, :, known]) ** 2).sum(-1)
    completed = np.where(known, held, train[dist.argmin(1)])
    rows.append({'reference': f'{mask_name}: nearest training image',
                 **judged(judge, np.tile(completed, (FLAGS.copies, 1, 1, 1)), tiled)})
  for row in rows:
    print(row, flush=True)
  return rows


def inpainting(config, task, mesh, params, judge, held, labels) -> tuple[list, dict]:
  n = len(held) * FLAGS.copies
  jump, repeats = (int(v) for v in FLAGS.repaint)
  rows, shown = [], {}
  for mask_name in FLAGS.masks:
    keep = 1.0 - editing.named_mask(mask_name, len(held), held.shape[1])
    inputs = {'image': held, 'keep': np.broadcast_to(keep, held.shape).astype(np.float32)}
    for name in FLAGS.inpaint_samplers:
      for calls in map(int, FLAGS.inpaint_calls):
        for resample in ((0, 1), (jump, repeats)):
          steps = calls // resample[1]
          x, made, seconds = generate(config, task, mesh, params, n, inputs=inputs,
                                      inpaint_image=FLAGS.held_out, inpaint_resample=resample,
                                      num_steps=steps, spacing='logsnr', **SINGLE_STEP[name])
          row = {'mask': mask_name, 'sampler': name, 'resample': list(resample),
                 'calls': made, 'seconds': seconds, **judged(judge, x, np.tile(labels,
                                                                             FLAGS.copies))}
          rows.append(row)
          print(row, flush=True)
          shown[(mask_name, name, calls, resample)] = x[:len(held)]
  return rows, shown


def image_to_image(config, task, mesh, params, judge, held, labels) -> tuple[list, list]:
  n = len(held) * FLAGS.copies
  rows, strips = [], []
  for strength in map(float, FLAGS.strengths):
    edit = strength < 1.0  # strength 1 is plain sampling, which takes no inputs
    x, made, seconds = generate(config, task, mesh, params, n,
                                inputs={'image': held} if edit else None,
                                init_image=FLAGS.held_out if edit else '', strength=strength)
    row = {'strength': strength, 'calls': made, 'seconds': seconds,
           **judged(judge, x, np.tile(labels, FLAGS.copies))}
    rows.append(row)
    print(row, flush=True)
    strips.append(x[:12])
  return rows, strips


def autoguidance(config, task, mesh, params, judge) -> list:
  n = judge.num_samples
  steps = FLAGS.guided_steps or config.sampling.num_steps
  rows = []
  for factor in (1, 2):
    x, made, seconds = generate(config, task, mesh, params, n, num_steps=steps * factor)
    rows.append({'guide': '', 'guidance_scale': 1.0, 'calls': made, 'network_evaluations': made,
                 'ratio': judge.score(x), 'seconds': seconds})
    print(rows[-1], flush=True)
  for spec in FLAGS.guides:
    workdir, _, step = spec.partition(':')
    guide_config = config.copy_and_resolve_references()
    guide_config.sampling.update(guide=workdir, guide_checkpoint_step=int(step or -1))
    guide, guide_params = sampling.load_guide(guide_config, mesh)
    for scale in map(float, FLAGS.guidance_scales):
      x, made, seconds = generate(guide_config, task, mesh, params, n, guide=guide,
                                  guide_params=guide_params, guidance_scale=scale,
                                  num_steps=steps)
      rows.append({'guide': spec, 'guidance_scale': scale, 'calls': made,
                   'network_evaluations': 2 * made, 'ratio': judge.score(x),
                   'seconds': seconds})
      print(rows[-1], flush=True)
  return rows


def tables(results: dict) -> str:
  out = ['References: share with the true label, judge ratio.', '',
         '| reference | true label | ratio |', '| --- | ---: | ---: |']
  for r in results['references']:
    out.append(f'| {r["reference"]} | {100 * r["label_share"]:.1f}% | {r["ratio"]:.2f} |')
  if results.get('inpainting'):
    out += ['', 'Inpainting: share of completions with the true label, judge ratio.', '',
            '| mask | sampler | resampling | calls | true label | ratio |',
            '| --- | --- | --- | ---: | ---: | ---: |']
    for r in results['inpainting']:
      resample = ('none' if r['resample'][1] == 1
                  else f'jump {r["resample"][0]} x {r["resample"][1]}')
      out.append(f'| {r["mask"]} | {r["sampler"]} | {resample} | {r["calls"]} | '
                 f'{100 * r["label_share"]:.1f}% | {r["ratio"]:.2f} |')
  if results.get('image_to_image'):
    out += ['', 'Image-to-image: share with the input\'s label, judge ratio.', '',
            '| strength | calls | input\'s label | ratio |', '| ---: | ---: | ---: | ---: |']
    for r in results['image_to_image']:
      out.append(f'| {r["strength"]:g} | {r["calls"]} | {100 * r["label_share"]:.1f}% | '
                 f'{r["ratio"]:.2f} |')
  if results.get('autoguidance'):
    out += ['', 'Autoguidance: judge ratio.', '',
            '| guide | scale | sampler calls | network evaluations | ratio |',
            '| --- | ---: | ---: | ---: | ---: |']
    for r in results['autoguidance']:
      out.append(f'| {r["guide"] or "none"} | {r["guidance_scale"]:g} | {r["calls"]} | '
                 f'{r["network_evaluations"]} | {r["ratio"]:.2f} |')
  return '\n'.join(out) + '\n'


def inpainting_picture(config, out: str, held, shown) -> None:
  count = min(16, len(held))
  rows = []
  jump, repeats = (int(v) for v in FLAGS.repaint)
  name, calls = FLAGS.inpaint_samplers[0], int(FLAGS.inpaint_calls[-1])
  for mask_name in FLAGS.masks:
    keep = 1.0 - editing.named_mask(mask_name, count, held.shape[1])
    rows += [held[:count], held[:count] * keep, shown[(mask_name, name, calls, (0, 1))][:count],
             shown[(mask_name, name, calls, (jump, repeats))][:count]]
  grid = images.picture(config, np.concatenate(rows), ncols=count)
  images.save_png(grid, os.path.join(out, 'inpainting.png'))


def main(argv):
  del argv
  out = FLAGS.out or os.path.join(FLAGS.workdir, 'editing_study')
  mesh = parallel.create_mesh()
  config = run_config.load_config(FLAGS.workdir)
  task = task_lib.create_task(config)
  params, step = task_lib.restore_ema_params(config, task, mesh, FLAGS.workdir)
  judge = judge_lib.make_judge(config, seed=FLAGS.seed)
  found, labels = npz_files.load_npz(FLAGS.held_out)
  if labels is None:
    raise app.UsageError(f'--held_out={FLAGS.held_out} has no `labels`.')
  held = images.to_model_range(found)
  print(f'{FLAGS.workdir} at step {step}; {len(held)} held-out images x {FLAGS.copies}; judge: '
        f'{judge.description}', flush=True)
  results = {'workdir': FLAGS.workdir, 'step': step, 'held_out': len(held),
             'copies': FLAGS.copies, 'judge': judge.description}
  results['references'] = references(config, judge, held, labels)
  if 'inpainting' in FLAGS.parts:
    results['inpainting'], shown = inpainting(config, task, mesh, params, judge, held, labels)
    inpainting_picture(config, out, held, shown)
  if 'image_to_image' in FLAGS.parts:
    results['image_to_image'], strips = image_to_image(config, task, mesh, params, judge, held,
                                                       labels)
    strip = np.concatenate([held[:12]] + [s[:12] for s in strips])
    images.save_png(images.picture(config, strip, ncols=12),
                    os.path.join(out, 'sdedit.png'))
  if 'autoguidance' in FLAGS.parts:
    results['autoguidance'] = autoguidance(config, task, mesh, params, judge)
  text = tables(results)
  files.write_text(os.path.join(out, 'tables.md'), text)
  files.write_json(os.path.join(out, 'results.json'), results)
  print(text)
  print(f'wrote {out}/')


if __name__ == '__main__':
  app.run(main)
