"""`--mode=sample`: samples of a trained run, written to `<workdir>/samples/`.

Restores the EMA parameters from `<workdir>/checkpoints`, generates sampling.num_samples samples
(`generation`) and writes `samples.npz` (`images`: uint8 [N, H, W, C], or for 2-D data `points`:
float32 [N, 2] in the data's own coordinates; `network_calls`: int32 [N], the network calls each
sample took; for a class-conditional model also `labels`: int32 [N], the class each sample was
asked for) and `grid.png`; with sampling.trajectory also
`trajectory.png`, the x_T -> x_0 strip. Files already there are moved aside (samples.1.npz, ...),
never overwritten. (The sampler math itself lives in `samplers`.)
"""

from __future__ import annotations

import os
import signal
import time

from absl import logging
import jax
import numpy as np

from diffusion_jax import (config_checks, editing, files, generation, images, parallel,
                           run_config, stop_signals, task as task_lib)


def _save_npz(path: str, payload: dict) -> None:
  files.move_aside(path)
  files.write_atomically(path, lambda tmp: np.savez(tmp, **payload))


def _save_png(path: str, picture: np.ndarray) -> None:
  files.move_aside(path)
  images.save_png(picture, path)


def sample(config, workdir: str) -> dict:
  """Writes samples.npz and grid.png (and trajectory.png) under workdir/samples; returns
  {'seconds', 'step', and the paths written}.

  SIGINT or SIGTERM stops it within a fraction of a second, even inside one long batch, and
  before anything is written (`stop_signals.Interrupted`): the files already in
  workdir/samples stay as they were.
  """
  mesh = parallel.create_mesh()
  config_checks.validate(config, mesh.size, mode='sample')
  files.check_writable(os.path.join(workdir, 'samples'))
  with stop_signals.StopFlag((signal.SIGINT, signal.SIGTERM)) as stop:
    return _sample(config, workdir, mesh, stop)


def edit_inputs(config, task: task_lib.Task) -> dict | None:
  """The images of inpainting or image-to-image, float32 [N, H, W, C] in [-1, 1] (`image`), and
  for inpainting `keep`, 1 where a pixel is known [N, H, W, C]; None when not editing."""
  sc, info = config.sampling, task.info
  mode = generation.editing_mode(config)
  if mode is None:
    return None
  setting = 'sampling.inpaint_image' if mode == 'inpaint' else 'sampling.init_image'
  size, channels = info.shape[0], info.shape[-1]
  image = images.to_model_range(editing.load_images(config.sampling[setting.split('.')[1]],
                                                    size, channels, setting))
  logging.info('%s: %d images from %s.', mode, len(image), sc[setting.split('.')[1]])
  if mode == 'img2img':
    return {'image': image}
  mask = editing.load_mask(sc.inpaint_mask, len(image), size, seed=sc.seed)
  keep = np.broadcast_to(1.0 - mask, image.shape).astype(np.float32)
  return {'image': image, 'keep': keep}


# What a guide must share with the run it guides: its data and its process.
GUIDE_SHARES = ('data.source', 'data.name', 'data.image_size', 'data.channels',
                'data.class_conditional', 'data.num_classes', 'diffusion.process',
                'diffusion.schedule', 'diffusion.num_timesteps')


def load_guide(config, mesh):
  """Autoguidance's guide (sampling.guide): ((its Task, its prediction type), its EMA
  parameters), or (None, None). It must model the same data with the same process."""
  sc = config.sampling
  if not sc.guide:
    return None, None
  guide_config = run_config.load_config(sc.guide)
  for field in GUIDE_SHARES:
    group, name = field.split('.')
    theirs, ours = guide_config[group].get(name), config[group].get(name)
    if theirs != ours:
      raise ValueError(f'sampling.guide={sc.guide!r} was trained with {field}={theirs!r}, this '
                       f'run with {ours!r}; the guide must model the same data with the same '
                       'process.')
  guide_task = task_lib.create_task(guide_config)
  step = None if sc.guide_checkpoint_step < 0 else sc.guide_checkpoint_step
  params, guide_step = task_lib.restore_ema_params(guide_config, guide_task, mesh, sc.guide, step)
  logging.info('Autoguidance: guide %s at step %d, scale %g.', sc.guide, guide_step,
               sc.guidance_scale)
  return (guide_task, guide_config.diffusion.prediction_type), params


def _sample(config, workdir: str, mesh, stop: stop_signals.StopFlag) -> dict:
  sc = config.sampling
  task = task_lib.create_task(config)
  config_checks.validate_labels(config, task.info.num_classes)
  inputs = edit_inputs(config, task)
  guide, guide_params = load_guide(config, mesh)
  params, step = task_lib.restore_ema_params(
      config, task, mesh, workdir, None if sc.checkpoint_step < 0 else sc.checkpoint_step)
  generate = generation.make_generate_fn(config, task, mesh, guide=guide)
  rng = jax.random.PRNGKey(sc.seed)
  logging.info('Sampling %d samples from step %d in batches of up to %d (Ctrl-C stops it).',
               sc.num_samples, step, sc.batch_size)
  start = time.perf_counter()
  x, calls = generate(params, rng, sc.num_samples, log_progress=True, stop=stop,
                      with_calls=True, inputs=inputs, guide_params=guide_params)
  seconds = time.perf_counter() - start
  if generate.num_calls is None:
    logging.info('%d samples from step %d in %.2f s: %s (rtol %g, atol %g), %.1f network calls '
                 'per sample on average, %d at most.', sc.num_samples, step, seconds, sc.sampler,
                 sc.rtol, sc.atol, calls.mean(), calls.max())
  else:
    logging.info('%d samples from step %d in %.2f s: %s, %d network calls per sample.',
                 sc.num_samples, step, seconds, sc.sampler, generate.num_calls)
  out_dir = os.path.join(workdir, 'samples')
  toy = config.data.source == 'toy2d'
  traj = None
  if sc.trajectory:  # computed before anything is written, so that a signal leaves no half set
    traj_fn = generation.make_generate_fn(config, task, mesh, return_trajectory=True,
                                          guide=guide)
    _, traj = traj_fn(params, rng, 1000 if toy else 8, stop=stop, inputs=inputs,
                      guide_params=guide_params)
  stop.check()  # nothing is written after a signal
  paths = {}
  if jax.process_index() == 0:
    paths['npz'] = os.path.join(out_dir, 'samples.npz')
    payload = {'points': x.astype(np.float32)} if toy else {'images': images.to_uint8(x)}
    payload['network_calls'] = calls.astype(np.int32)
    if inputs is not None:  # what each sample edited: input i % N
      index = np.arange(len(x)) % len(inputs['image'])
      payload['inputs'] = images.to_uint8(inputs['image'][index])
      if 'keep' in inputs:
        payload['masks'] = (1.0 - inputs['keep'][index, ..., :1]).astype(np.uint8)
    if task.info.num_classes:
      payload['labels'] = generation.sample_labels(np.arange(len(x), dtype=np.int32), sc.label,
                                                   task.info.num_classes)
    _save_npz(paths['npz'], payload)
    paths['grid'] = os.path.join(out_dir, 'grid.png')
    _save_png(paths['grid'], images.picture(config, x if toy else x[:64]))
    if inputs is not None:  # the inputs as the sampler saw them: grey where it filled in
      shown = inputs['image'] * inputs.get('keep', 1.0)
      paths['inputs'] = os.path.join(out_dir, 'inputs.png')
      _save_png(paths['inputs'], images.picture(config, shown[np.arange(min(len(x), 64))
                                                              % len(shown)]))
    if traj is not None:
      paths['trajectory'] = os.path.join(out_dir, 'trajectory.png')
      _save_png(paths['trajectory'], images.trajectory_strip(config, traj))
  return {'seconds': seconds, 'step': step, **paths}
