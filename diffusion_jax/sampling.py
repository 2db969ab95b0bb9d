"""Generation from a trained model: the jitted, device-sharded sampler and `--mode=sample`.

`--mode=sample` restores the EMA parameters from `<workdir>/checkpoints`, generates
sampling.num_samples samples and writes `<workdir>/samples/samples.npz` (`images`: uint8
[N, H, W, C], or for 2-D data `points`: float32 [N, 2] in the data's own coordinates) and
`grid.png`; with sampling.trajectory also `trajectory.png`, the x_T -> x_0 strip. Files already
there are moved aside (samples.1.npz, ...), never overwritten.
"""

from __future__ import annotations

import math
import os
import time
from typing import Callable

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import (checkpointing, diffusion, images, parallel, samplers)


def make_eps_fn(task, params, labels, config) -> samplers.EpsFn:
  """The network as `eps_fn(x_t, t)`, with classifier-free guidance when it is conditional."""
  pt = config.diffusion.prediction_type

  def predict_with(lab):
    return lambda x_t, t: task.model.apply({'params': params}, x_t, t, lab, train=False)
  eps_cond = diffusion.eps_fn_from(predict_with(labels), task.schedule, pt)
  scale = config.sampling.guidance_scale
  if not task.info.num_classes or scale == 1.0:
    return eps_cond
  null = jnp.full_like(labels, task.info.num_classes)
  eps_uncond = diffusion.eps_fn_from(predict_with(null), task.schedule, pt)
  return samplers.guided_eps_fn(eps_cond, eps_uncond, scale)


def make_generate_fn(config, task, mesh, *, num_steps: int | None = None,
                     return_trajectory: bool = False) -> Callable:
  """generate(params, rng, n) -> float32 [n, ...] samples (and [S+1, n, ...] trajectory).

  Runs the configured sampler (sampling.sampler, .eta, .spacing, .clip_x0, .variance) in
  global batches of sampling.batch_size, each split over the mesh's devices.
  """
  sc = config.sampling
  steps = num_steps or sc.num_steps
  shape = tuple(task.info.shape)

  def run(params, rng, label_offset, batch):
    x_t = jax.random.normal(jax.random.fold_in(rng, 0), (batch,) + shape)
    x_t = jax.lax.with_sharding_constraint(x_t, parallel.batch_sharding(mesh))
    labels = None
    if task.info.num_classes:
      labels = (jnp.full((batch,), sc.label, jnp.int32) if sc.label >= 0 else
                (label_offset + jnp.arange(batch, dtype=jnp.int32)) % task.info.num_classes)
    eps_fn = make_eps_fn(task, params, labels, config)
    noise_rng = jax.random.fold_in(rng, 1)
    if sc.sampler == 'ddpm':
      return samplers.ddpm_sample(eps_fn, task.schedule, x_t, noise_rng, clip_x0=sc.clip_x0,
                                  variance=sc.variance, return_trajectory=return_trajectory)
    return samplers.ddim_sample(eps_fn, task.schedule, x_t, noise_rng, num_steps=steps,
                                eta=sc.eta, spacing=sc.spacing, clip_x0=sc.clip_x0,
                                return_trajectory=return_trajectory)

  compiled = jax.jit(run, static_argnums=3, out_shardings=parallel.replicated(mesh))

  def generate(params, rng, n: int, *, log_progress: bool = False):
    batch = min(sc.batch_size, n)
    batch = -(-batch // mesh.size) * mesh.size  # a whole number per device
    num_batches = math.ceil(n / batch)
    outs, start = [], time.perf_counter()
    for i in range(num_batches):
      outs.append(jax.device_get(compiled(params, jax.random.fold_in(rng, i), i * batch, batch)))
      if log_progress:
        elapsed = time.perf_counter() - start
        logging.info('sampling batch %d/%d  %.1f s elapsed, ETA %.1f s', i + 1, num_batches,
                     elapsed, elapsed / (i + 1) * (num_batches - i - 1))
    if return_trajectory:
      return (np.concatenate([o[0] for o in outs])[:n],
              np.concatenate([o[1] for o in outs], axis=1)[:, :n])
    return np.concatenate(outs)[:n]

  return generate


def picture(config, x: np.ndarray) -> np.ndarray:
  """uint8 [H, W, C]: a scatter plot of points, or a grid of images (small ones enlarged)."""
  if config.data.source == 'toy2d':
    return images.scatter(x)
  scale = max(1, 64 // config.data.image_size)
  return images.make_grid(images.to_uint8(x), scale=scale, pad=max(1, scale // 2))


def trajectory_strip(config, traj: np.ndarray, num_frames: int = 10) -> np.ndarray:
  """uint8 strip of `num_frames` evenly spaced steps from x_T to x_0, one row per sample.

  traj: float32 [S + 1, n, ...].
  """
  idx = np.unique(np.linspace(0, traj.shape[0] - 1, num_frames).round().astype(int))
  if config.data.source == 'toy2d':
    return images.hstack([images.scatter(traj[i], size=256, lim=4.0) for i in idx])
  frames = images.to_uint8(traj[idx])  # [F, n, H, W, C]
  f, n = frames.shape[:2]
  rows = frames.transpose(1, 0, 2, 3, 4).reshape((n * f,) + frames.shape[2:])
  return images.make_grid(rows, ncols=f, scale=max(1, 64 // config.data.image_size))


def _move_aside(path: str) -> None:
  """Keeps an existing file by renaming it to the first free name.1.ext, name.2.ext, ..."""
  if not os.path.exists(path):
    return
  stem, ext = os.path.splitext(path)
  i = 1
  while os.path.exists(f'{stem}.{i}{ext}'):
    i += 1
  os.replace(path, f'{stem}.{i}{ext}')


def restore_ema_params(config, task, mesh, workdir: str, step: int | None = None):
  """The EMA parameters of the checkpoint at `step` (default latest), replicated on `mesh`."""
  from diffusion_jax import train  # pylint: disable=g-import-not-at-top  (train imports us)
  manager = checkpointing.create_manager(workdir, read_only=True)
  try:
    target = train.abstract_train_state(config, task, mesh)
    state = checkpointing.restore(manager, target, step)
  finally:
    manager.close()
  return state.ema_params, int(state.step)


def sample(config, workdir: str) -> dict:
  """--mode=sample: writes samples.npz and grid.png (and trajectory.png) under workdir/samples."""
  from diffusion_jax import config_checks, train  # pylint: disable=g-import-not-at-top
  mesh = parallel.create_mesh()
  config_checks.validate(config, mesh.size)
  sc = config.sampling
  task = train.create_task(config)
  params, step = restore_ema_params(config, task, mesh, workdir,
                                    None if sc.checkpoint_step < 0 else sc.checkpoint_step)
  generate = make_generate_fn(config, task, mesh)
  rng = jax.random.PRNGKey(sc.seed)
  start = time.perf_counter()
  x = generate(params, rng, sc.num_samples, log_progress=True)
  seconds = time.perf_counter() - start
  logging.info('%d samples from step %d in %.2f s (%s, %d steps).', sc.num_samples, step,
               seconds, sc.sampler, sc.num_steps if sc.sampler == 'ddim' else
               config.diffusion.num_timesteps)
  out_dir = os.path.join(workdir, 'samples')
  paths = {}
  if jax.process_index() == 0:
    os.makedirs(out_dir, exist_ok=True)
    paths['npz'] = os.path.join(out_dir, 'samples.npz')
    payload = ({'points': x.astype(np.float32)} if config.data.source == 'toy2d'
               else {'images': images.to_uint8(x)})
    _move_aside(paths['npz'])
    tmp = paths['npz'] + '.tmp.npz'
    np.savez(tmp, **payload)
    os.replace(tmp, paths['npz'])
    paths['grid'] = os.path.join(out_dir, 'grid.png')
    _move_aside(paths['grid'])
    shown = x if config.data.source == 'toy2d' else x[:64]
    images.save_png(picture(config, shown), paths['grid'])
  if sc.trajectory:
    traj_fn = make_generate_fn(config, task, mesh, return_trajectory=True)
    n = 1000 if config.data.source == 'toy2d' else 8
    _, traj = traj_fn(params, rng, n)
    if jax.process_index() == 0:
      paths['trajectory'] = os.path.join(out_dir, 'trajectory.png')
      _move_aside(paths['trajectory'])
      images.save_png(trajectory_strip(config, traj), paths['trajectory'])
  return {'seconds': seconds, 'step': step, **paths}
