"""`--mode=eval`: FID and KID of EMA samples against the data set, and bits/dim on held-out data
(an autoencoder run: the PSNR of its reconstructions of held-out images).

  python launch.py --config=configs/flowers.py --workdir=/tmp/flowers --mode=eval \
    --config.eval.inception_path=/path/to/pt_inception-2015-12-05-6726825d.pth

FID/KID: eval.num_samples samples from the configured sampler are rounded to uint8 and back (as
pytorch-fid sees saved PNGs), grayscale is repeated to 3 channels, and the Inception-v3 pool3
features are compared with those of eval.num_reference training images. The data-set statistics
are read from eval.reference_stats if given (then KID, which needs the features themselves, is
skipped), else computed once and cached in `<workdir>/eval/`.
Bits/dim of eval.bpd_num_examples held-out images (data.eval_splits for TFDS, the last examples
of an in-memory source): through the probability-flow ODE on every process (eval.ode_bpd; the
images uniformly dequantised over their 8-bit bins, Hutchinson's divergence with eval.ode_probes
probes; `ode.log_likelihood`), and on the ddpm process also the variational bound of the discrete
chain (one network call per timestep). 2-D points: their likelihood through the ODE, exact
divergence, no dequantisation.

Results go to `<workdir>/eval/results.json` and, as one record, to `<workdir>/metrics.jsonl`.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
import zipfile
from typing import Callable

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import (autoencoding, config_checks, diffusion, files, generation,
                           input_pipeline, metric_logging, ode, parallel, stop_signals,
                           task as task_lib)
from diffusion_jax.metrics import feature_distances, inception, inception_weights

REFERENCE_STATS = 'reference_stats.npz'  # mu, sigma: pytorch-fid's statistics format
REFERENCE_FEATURES = 'reference_features.npy'  # float32 [N, 2048], for KID
REFERENCE_META = 'reference_meta.json'  # what the cache was computed from


def _missing_weights_error() -> ValueError:
  return ValueError(
      'FID/KID need the FID Inception-v3 weights: set --config.eval.inception_path to '
      f'pytorch-fid\'s pt_inception-2015-12-05-6726825d.pth ({inception_weights.FID_WEIGHTS_URL}; '
      'nothing is downloaded at run time) or to a .npz converted from it with `python -m '
      'diffusion_jax.metrics.inception_weights --convert <in.pth> <out.npz>`. For bits/dim alone, '
      'set --config.eval.bpd_num_examples=N instead.')


def _gather(rows: np.ndarray, count: int) -> np.ndarray:
  """Every process's real rows, concatenated: each holds its share of `count` examples padded
  to the same length (`input_pipeline.host_share_sizes`), which is dropped here."""
  sizes, length = input_pipeline.host_share_sizes(count)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    rows = np.asarray(multihost_utils.process_allgather(rows, tiled=True))
  blocks = rows.reshape((len(sizes), length) + rows.shape[1:])
  return np.concatenate([block[:n] for block, n in zip(blocks, sizes)])


def _reference_meta(config) -> dict:
  d = config.data
  return {'source': d.source, 'name': d.name, 'path': d.path, 'splits': d.splits,
          'image_size': d.image_size, 'channels': d.channels,
          'num_reference': config.eval.num_reference}


def reference_statistics(config, workdir: str, features_fn) -> tuple:
  """(mu [D], sigma [D, D], features [N, D] or None) of the data set.

  From eval.reference_stats when set (features None: KID is then skipped); else from the cache
  in `<workdir>/eval/` if it was computed from the same data, else computed and cached.
  """
  if config.eval.reference_stats:
    mu, sigma = feature_distances.load_statistics(config.eval.reference_stats)
    return mu, sigma, None
  out_dir = os.path.join(workdir, 'eval')
  meta_path = os.path.join(out_dir, REFERENCE_META)
  paths = [os.path.join(out_dir, name) for name in (REFERENCE_STATS, REFERENCE_FEATURES)]
  meta = _reference_meta(config)
  if all(os.path.exists(p) for p in paths + [meta_path]):
    try:
      with open(meta_path) as f:
        same_data = json.load(f) == meta
      if same_data:
        mu, sigma = feature_distances.load_statistics(paths[0])
        feats = np.load(paths[1]).astype(np.float64)
        logging.info('Reference statistics from the cache in %s.', out_dir)
        return mu, sigma, feats
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
      logging.warning('The reference statistics cached in %s cannot be read (%s: %s); they are '
                      'computed again and the cache is rewritten.', out_dir, type(e).__name__,
                      str(e).splitlines()[0][:160] if str(e) else '')
  start = time.perf_counter()
  count = config.eval.num_reference
  feats = _gather(features_fn(input_pipeline.reference_images(config, count)), count)
  mu, sigma = feature_distances.feature_statistics(feats)
  logging.info('Reference statistics of %d images in %.1f s.', len(feats),
               time.perf_counter() - start)
  if jax.process_index() == 0:
    files.write_atomically(paths[0], lambda tmp: feature_distances.save_statistics(tmp, mu, sigma))
    files.write_atomically(paths[1], lambda tmp: np.save(tmp, feats.astype(np.float32)))
    files.write_json(meta_path, meta)
  return mu, sigma, feats


def sample_quality(config, task, mesh, params, workdir: str,
                   stop: stop_signals.StopFlag | None = None) -> dict:
  """FID (and KID when the reference features are known) of eval.num_samples samples; a signal
  set in `stop` interrupts it (`stop_signals.Interrupted`)."""
  ev = config.eval
  inception_params = inception_weights.load_inception_params(ev.inception_path)
  features_fn = inception.make_features_fn(inception_params, ev.inception_batch_size, stop)
  mu_ref, sigma_ref, ref_features = reference_statistics(config, workdir, features_fn)

  generate = generation.make_generate_fn(config, task, mesh)
  start = time.perf_counter()
  # Every process generates (the sampler is one program over all devices) and gets all samples.
  x, calls = generate(params, jax.random.PRNGKey(config.sampling.seed), ev.num_samples,
                      log_progress=True, stop=stop, with_calls=True)
  sample_seconds = time.perf_counter() - start
  feats = features_fn(x[i:i + 500] for i in range(0, len(x), 500))
  mu, sigma = feature_distances.feature_statistics(feats)
  out = {'fid': feature_distances.frechet_distance(mu, sigma, mu_ref, sigma_ref),
         'sample_seconds': sample_seconds, 'network_calls_mean': float(calls.mean()),
         'network_calls_max': int(calls.max())}
  if ref_features is None:
    logging.info('eval.reference_stats holds statistics only: KID, which needs the reference '
                 'features, is skipped.')
  else:
    out['kid'], out['kid_std'] = feature_distances.kid(
        feats, ref_features, num_subsets=ev.kid_num_subsets, subset_size=ev.kid_subset_size,
        rng=config.sampling.seed)
  return out


# --- bits/dim --------------------------------------------------------------------------------

def make_bpd_fn(config, task, mesh) -> Callable:
  """bpd(params, x0 [B, H, W, C] sharded on B, labels [B], rng) -> float32 [B] bits/dim.

  The conditional network with the true labels (guidance is a sampling device, not part of the
  likelihood); the model's variance is sampling.variance, as the DDPM sampler uses.
  """
  def bpd(params, x0, labels, rng):
    lab = labels if task.info.num_classes else None
    predict = lambda x_t, t: task.model.apply({'params': params}, x_t, t, lab, train=False)
    eps_fn = diffusion.eps_fn_from(predict, task.process, config.diffusion.prediction_type)
    return diffusion.bits_per_dim(eps_fn, task.schedule, x0, rng,
                                  variance=config.sampling.variance)
  rep, shard = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  return jax.jit(bpd, in_shardings=(rep, shard, shard, rep), out_shardings=rep)


def _over_held_out(config, task, mesh, params, fn: Callable, stop, label: str, *,
                   setting: str = 'eval.bpd_num_examples', batch_size: int = 0) -> tuple:
  """fn(params, x, labels, rng) -> arrays [B] over the held-out examples that `setting` counts
  in batches of `batch_size` (0: eval.bpd_batch_size): each output for the real examples, in
  order. A signal set in `stop` interrupts it (`stop_signals.Interrupted`)."""
  count = config.eval[setting.split('.')[1]]
  x, labels, _ = input_pipeline.held_out_images(config, count, setting)
  sizes, _ = input_pipeline.host_share_sizes(count)
  batch_size = batch_size or config.eval.bpd_batch_size
  per_host = parallel.round_up(min(batch_size, count), mesh.size) // jax.process_count()
  sharding = parallel.batch_sharding(mesh)
  rng = jax.random.PRNGKey(config.sampling.seed)
  # Every process runs the same batches (its share padded to the same length); a row is real
  # when its place in its process's share is below that process's count.
  num_batches = -(-len(x) // per_host)
  progress = metric_logging.Progress(num_batches, items_per_step=per_host * jax.process_count(),
                                     unit='batch', label=label)
  fetch = stop.fetch if stop is not None else jax.device_get
  outs = []
  for b in range(num_batches):
    i = b * per_host
    rows = parallel.pad_rows({'x': x[i:i + per_host], 'label': labels[i:i + per_host]},
                             per_host)
    batch = parallel.host_to_global(rows, sharding)
    out = fetch(fn(params, batch['x'], batch['label'], jax.random.fold_in(rng, i)))
    place = i + np.arange(per_host)
    real = np.concatenate([place < n for n in sizes])
    outs.append([np.asarray(o)[real] for o in (out if isinstance(out, tuple) else (out,))])
    progress.log(b + 1)
  values = tuple(np.concatenate(column) for column in zip(*outs))
  if not np.all(np.isfinite(values[0])):
    raise FloatingPointError(f'{label} is not finite; is the checkpoint healthy?')
  return values


def bits_per_dim(config, task, mesh, params, stop: stop_signals.StopFlag | None = None) -> float:
  """Mean bits/dim (the variational bound of the discrete chain) over eval.bpd_num_examples
  held-out images; a signal set in `stop` interrupts it (`stop_signals.Interrupted`)."""
  values, = _over_held_out(config, task, mesh, params, make_bpd_fn(config, task, mesh), stop,
                           label='bits/dim')
  return float(values.mean())


def make_ode_log_likelihood_fn(config, task, mesh) -> Callable:
  """log_p(params, x [B, ...] sharded on B, labels [B], rng) -> (log p nats [B], calls [B]) of
  the data under the probability-flow ODE (`ode.log_likelihood`): dequantised 8-bit images, or
  2-D points as they are, with the exact divergence (2-D data) or eval.ode_probes Hutchinson
  probes. The conditional network with the true labels, no guidance, as for the bound."""
  ev, toy = config.eval, config.data.source == 'toy2d'

  def log_p(params, x, labels, rng):
    lab = labels if task.info.num_classes else None
    predict = lambda x_t, t: task.model.apply({'params': params}, x_t, t, lab, train=False)
    denoise_fn = diffusion.denoiser(predict, task.process, config.diffusion.prediction_type)
    quantise_rng, probe_rng = jax.random.split(rng)
    x0 = x if toy else ode.dequantize(x, quantise_rng)
    return ode.log_likelihood(denoise_fn, task.process, x0, probe_rng,
                              probes=0 if toy else ev.ode_probes, probe_kind=ev.ode_probe_kind,
                              rtol=ev.ode_rtol, atol=ev.ode_atol)
  rep, shard = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  return jax.jit(log_p, in_shardings=(rep, shard, shard, rep), out_shardings=rep)


def ode_bits_per_dim(config, task, mesh, params,
                     stop: stop_signals.StopFlag | None = None) -> dict:
  """Bits/dim of eval.bpd_num_examples held-out examples through the probability-flow ODE:
  the mean, its standard error over the examples, and the mean and largest network calls."""
  log_p, calls = _over_held_out(config, task, mesh, params,
                                make_ode_log_likelihood_fn(config, task, mesh), stop,
                                label='ODE bits/dim')
  dim = math.prod(task.info.shape)
  bpd = np.asarray(ode.bits_per_dim(log_p, dim, None if config.data.source == 'toy2d' else
                                    ode.BIN_WIDTH_8BIT))
  return {'ode_bits_per_dim': float(bpd.mean()),
          'ode_bits_per_dim_stderr': float(bpd.std(ddof=1) / math.sqrt(len(bpd)))
          if len(bpd) > 1 else 0.0,
          'ode_network_calls_mean': float(calls.mean()), 'ode_network_calls_max': int(calls.max())}


# --- --mode=eval -----------------------------------------------------------------------------

def evaluate(config, workdir: str) -> dict:
  """--mode=eval: FID/KID (with eval.inception_path) and bits/dim (with eval.bpd_num_examples).

  Returns the results, also written to `<workdir>/eval/results.json` and metrics.jsonl. SIGINT
  or SIGTERM stops it within a fraction of a second (`stop_signals.Interrupted`), leaving the
  earlier results and the reference cache as they were.
  """
  with stop_signals.StopFlag((signal.SIGINT, signal.SIGTERM)) as stop:
    return _evaluate(config, workdir, stop)


def reconstruction_quality(config, task, mesh, params,
                           stop: stop_signals.StopFlag | None = None) -> dict:
  """An autoencoder run's reconstructions of eval.psnr_num_examples held-out images (the
  decoded latent means): PSNR in dB (mean and standard error over images) and the mean absolute
  error in [-1, 1] units."""
  rep, shard = parallel.replicated(mesh), parallel.batch_sharding(mesh)

  def measure(p, x, labels, rng):
    del labels, rng
    recon = task.model.apply({'params': p}, x)
    return autoencoding.psnr(x, recon), jnp.mean(jnp.abs(recon - x), axis=(1, 2, 3))

  fn = jax.jit(measure, in_shardings=(rep, shard, shard, rep), out_shardings=rep)
  psnr, l1 = _over_held_out(config, task, mesh, params, fn, stop, 'reconstructions',
                            setting='eval.psnr_num_examples', batch_size=64)
  return {'psnr': float(psnr.mean()), 'psnr_stderr': float(psnr.std() / math.sqrt(len(psnr))),
          'l1': float(l1.mean()), 'psnr_num_examples': len(psnr)}


def _evaluate(config, workdir: str, stop: stop_signals.StopFlag) -> dict:
  ev = config.eval
  if task_lib.is_autoencoder(config):
    return _evaluate_autoencoder(config, workdir, stop)
  toy = config.data.source == 'toy2d'
  if toy and (ev.inception_path or not (ev.bpd_num_examples and ev.ode_bpd)):
    raise ValueError('data.source=toy2d has points: --mode=eval measures their likelihood '
                     'through the probability-flow ODE only (--config.eval.bpd_num_examples=N '
                     'with eval.ode_bpd=True, and no eval.inception_path).')
  want_fid, want_bpd = bool(ev.inception_path), ev.bpd_num_examples > 0
  if not want_fid and not want_bpd:
    raise _missing_weights_error()
  if not want_fid:
    logging.info('eval.inception_path is empty: FID/KID skipped, bits/dim only.')
  if want_fid and not os.path.exists(ev.inception_path):
    raise FileNotFoundError(f'eval.inception_path={ev.inception_path!r} does not exist. '
                            f'{_missing_weights_error()}')
  mesh = parallel.create_mesh()
  config_checks.validate(config, mesh.size, mode='eval')
  task = task_lib.create_task(config)
  config_checks.validate_labels(config, task.info.num_classes)
  ckpt = config.sampling.checkpoint_step
  params, step = task_lib.restore_ema_params(config, task, mesh, workdir,
                                             None if ckpt < 0 else ckpt)
  results = {'step': step}
  if want_fid:
    results.update(sample_quality(config, task, mesh, params, workdir, stop))
    results.update(num_samples=ev.num_samples, num_reference=ev.num_reference)
  if want_bpd and task.process.discrete and not toy:
    start = time.perf_counter()
    results['bits_per_dim'] = bits_per_dim(config, task, mesh, params, stop)
    results['bpd_seconds'] = time.perf_counter() - start
  if want_bpd and ev.ode_bpd:
    start = time.perf_counter()
    results.update(ode_bits_per_dim(config, task, mesh, params, stop))
    results['ode_bpd_seconds'] = time.perf_counter() - start
  if want_bpd:
    results['bpd_num_examples'] = ev.bpd_num_examples
  return _record(results, step, workdir, stop)


def _evaluate_autoencoder(config, workdir: str, stop: stop_signals.StopFlag) -> dict:
  mesh = parallel.create_mesh()
  config_checks.validate(config, mesh.size, mode='eval')
  task = task_lib.create_task(config)
  ckpt = config.sampling.checkpoint_step
  params, step = task_lib.restore_ema_params(config, task, mesh, workdir,
                                             None if ckpt < 0 else ckpt)
  results = {'step': step, **reconstruction_quality(config, task, mesh, params, stop)}
  return _record(results, step, workdir, stop)


def _record(results: dict, step: int, workdir: str, stop: stop_signals.StopFlag) -> dict:
  """Logs the results and writes them to eval/results.json and metrics.jsonl."""
  logging.info('eval at step %d: %s', step, ', '.join(
      f'{k}={v:.6g}' for k, v in results.items() if k != 'step'))
  stop.check()  # nothing is written after a signal
  if jax.process_index() == 0:
    files.write_json(os.path.join(workdir, 'eval', 'results.json'), results)
    writer = metric_logging.create_writer(workdir)
    writer.write_scalars(step, {f'eval/{k}': v for k, v in results.items() if k != 'step'})
    writer.flush()
    writer.close()
  return results
