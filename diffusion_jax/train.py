"""`--mode=train`: the data-parallel train step and the training loop.

Importable from a notebook: `train_step` and `train_and_evaluate` are plain functions of a config
and of the `task.Task` built from it (`task.create_train_state` gives the initial state). The
loss and its gradient are computed per device (`loss_and_grads` under shard_map: the loss is
the pmean of each device's mean, so the gradient is the global batch's); the state, split over
the mesh's 'fsdp' axis (`parallel`), is updated by the jitted global step.

Random numbers: each example's time and noise come from the state key folded with the step
and with the example's index in the global batch, so devices never share noise and the losses
do not depend on how many devices share the batch. Dropout keys are folded with the device
index (dropout masks therefore do depend on the device count).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import json
import math
import os
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from diffusion_jax import (autoencoding, checkpointing, config_checks, diffusion, files,
                           generation, images, input_pipeline, latents, metric_logging,
                           objectives, parallel, posthoc_ema, processes, run_config, sources,
                           stop_signals, task as task_lib, warm_start, workdir_lock)
from diffusion_jax.task import Task, TrainState


def time_sampling(tc) -> dict:
  """The keyword arguments of `processes.training_times` from the training group."""
  method = tc.time_sampling
  mean, std = ((tc.logit_normal_mean, tc.logit_normal_std) if method == 'logit_normal' else
               (tc.lognormal_mean, tc.lognormal_std))
  return dict(method=method, mean=mean, std=std, shift=tc.time_shift)


def _example_keys(step_key: jnp.ndarray, local_batch: int) -> jnp.ndarray:
  """One key per example, folded with its index in the global batch: [local_batch, 2]."""
  first = parallel.device_index() * local_batch
  return jax.vmap(lambda i: jax.random.fold_in(step_key, i))(first + jnp.arange(local_batch))


def loss_and_grads(params, rng: jnp.ndarray, step: jnp.ndarray, batch: dict, *, specs,
                   task: Task, config) -> tuple[jnp.ndarray, Any]:
  """Per device (inside shard_map): the global batch's mean loss and its gradient.

  Args:
    params: this device's shards of the parameters.
    rng, step: the state's root key and step.
    batch: {'x': float32 [b, ...] in [-1, 1] (points: [b, 2]), 'label': int32 [b]}, this
      device's share of the global batch.
    specs: how the parameters are split (`parallel.state_specs`).
  Returns:
    The loss (pmean over every device) and the gradient, split like `params`.
  """
  tc, dc = config.training, config.diffusion
  x0 = batch['x']
  b = x0.shape[0]
  step_key = jax.random.fold_in(rng, step)
  keys = _example_keys(step_key, b)
  if task_lib.is_autoencoder(config):
    return autoencoding.loss_and_grads(params, x0, keys, specs=specs, model=task.model,
                                       ac=config.autoencoder)
  index = parallel.device_index() * b + jnp.arange(b)
  t = processes.training_times(task.process, keys, index, tc.batch_size, **time_sampling(tc))
  noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 1), x0.shape[1:]))(keys)
  labels = None
  if task.info.num_classes:
    drop = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, 2)))(keys)
    labels = jnp.where(drop < tc.label_dropout, task.info.num_classes, batch['label'])
  dropout_key = jax.random.fold_in(jax.random.fold_in(step_key, 1 << 30), parallel.device_index())

  uniform = lambda i: jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, i)))(keys)
  if tc.objective == 'meanflow':
    t_other = processes.training_times(task.process, jax.vmap(lambda k: jax.random.fold_in(k, 3))(
        keys), index, tc.batch_size, **time_sampling(tc))
    t, r = objectives.meanflow_times(t, t_other, uniform(4), tc.meanflow_ratio)
  elif tc.objective == 'shortcut':
    consistent = int(round(tc.shortcut_ratio * b))  # the first of this device's examples
    t_step, r_step = objectives.shortcut_times(uniform(3), uniform(4), tc.shortcut_max_steps)
    first = jnp.arange(b) < consistent
    t, r = jnp.where(first, t_step, t), jnp.where(first, r_step, t)
  elif tc.objective == 'consistency':
    t, r, weight = objectives.consistency_times(tc, task.process, keys, index, step)

  def guided_v(predict_null):
    """Trained-in guidance (training.meanflow_guidance != 1, conditional runs), else None."""
    w, null = tc.get('meanflow_guidance', 1.0), task.info.num_classes
    if labels is None or w == 1.0:
      return None
    return objectives.trained_in_guidance(
        lambda z: predict_null(z, jnp.full_like(labels, null)), labels != null, w)

  def loss_fn(shards):
    whole = parallel.gather(shards, specs)
    apply = lambda x_t, tt, lab, **kw: task.model.apply(
        {'params': whole}, x_t, tt, lab, train=True, rngs={'dropout': dropout_key}, **kw)
    if tc.objective == 'meanflow':
      per_example = objectives.meanflow_loss_per_example(
          lambda z, tt, rr: apply(z, task.process.net_time(tt), labels,
                                  interval=task.process.net_interval(tt, rr)),
          x0, noise, t, r, weight_power=tc.meanflow_weight_power,
          guided_v=guided_v(lambda z, lab: apply(z, task.process.net_time(t), lab,
                                                 interval=jnp.zeros_like(t))))
    elif tc.objective == 'shortcut':
      per_example = objectives.shortcut_loss_per_example(
          lambda z, tt, rr: apply(z, task.process.net_time(tt), labels[:z.shape[0]]
                                  if labels is not None else None,
                                  interval=task.process.net_interval(tt, rr)),
          x0, noise, t, r, consistent)
    elif tc.objective == 'consistency':
      f = diffusion.denoiser(lambda x, tt: apply(x, tt, labels), task.process,
                             dc.prediction_type)
      huber_c = tc.consistency_huber_c * math.sqrt(math.prod(x0.shape[1:]))
      per_example = objectives.consistency_loss_per_example(f, x0, noise, t, r, weight, huber_c)
    else:
      per_example = diffusion.loss_per_example(
          lambda x_t, tt: apply(x_t, tt, labels), task.process, x0, t, noise,
          prediction_type=dc.prediction_type, loss_type=dc.loss, weighting=dc.loss_weighting,
          min_snr_gamma=dc.min_snr_gamma, sigmoid_bias=dc.sigmoid_bias)
    # The global batch's mean. Parameters are the same on every device of 'data' (invariant
    # over it), so their gradient comes back summed over those devices; the transpose of
    # `gather` sums over 'fsdp' and keeps this device's shard: the global mean's gradient.
    return jax.lax.pmean(jnp.mean(per_example), parallel.BATCH_AXES)

  return jax.value_and_grad(loss_fn)(params)


def train_step(state: TrainState, batch: dict, *, task: Task, config,
               mesh) -> tuple[TrainState, dict]:
  """One optimizer step on the global batch (a global function: call it under jit).

  The loss and gradient are computed per device (`loss_and_grads` under shard_map: each
  device its share of the batch, with whole parameters gathered from their shards); the
  optimizer, EMA and post-hoc EMA updates then act on the global state, each device on its
  shards.

  Args:
    batch: {'x': float32 [B, ...], 'label': int32 [B]}, the global batch sharded over devices.
  Returns:
    The new state and metrics {loss, grad_norm, learning_rate} (global means).
  """
  tc = config.training
  specs = parallel.state_specs(mesh, state.params)
  local = jax.shard_map(
      functools.partial(loss_and_grads, specs=specs, task=task, config=config), mesh=mesh,
      in_specs=(specs, P(), P(), parallel.batch_spec()), out_specs=(P(), specs))
  loss, grads = local(state.params, state.rng, state.step, batch)
  updates, opt_state = task.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema = task_lib.update_ema(tc, state.ema_params, params, state.step)
  averages = task_lib.power_ema(config).update(state.phema_params, params, state.step + 1)
  metrics = {'loss': loss, 'grad_norm': optax.tree.norm(grads),
             'learning_rate': task.learning_rate(state.step)}
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                       ema_params=ema, phema_params=averages), metrics


def make_train_step(config, task: Task, mesh):
  """The compiled step: (state, global batch) -> (state, metrics), the state split over
  `mesh` as `task.state_shardings` says and donated.

  With training.steps_per_call = k > 1 the batch carries a leading [k] axis and k steps run per
  call as an unrolled lax.scan (a rolled loop is slow on CPU); metrics are those of the last.
  """
  step = functools.partial(train_step, task=task, config=config, mesh=mesh)
  k = config.training.steps_per_call
  if k == 1:
    fn = step
  else:
    def fn(state, batches):
      state, metrics = jax.lax.scan(step, state, batches, unroll=True)
      return state, jax.tree.map(lambda m: m[-1], metrics)
  shardings = task_lib.state_shardings(config, task, mesh)
  batch = parallel.batch_sharding(mesh, leading_axes=int(k > 1))
  return jax.jit(fn, in_shardings=(shardings, batch),
                 out_shardings=(shardings, parallel.replicated(mesh)), donate_argnums=(0,))


# --- the training loop ---------------------------------------------------------------------------

def compile_in_background(config, task: Task, mesh) -> concurrent.futures.Future:
  """`make_train_step` compiled ahead of time on another thread, for the state and batches
  that training will have (`abstract_train_state`, `input_pipeline.abstract_batch`).

  XLA then works on the step, most of the start-up on CPU, while the state is built or
  restored and the data are read. `.result()` is the compiled step, or raises its error.
  """
  state = task_lib.abstract_train_state(config, task, mesh)
  batch = input_pipeline.abstract_batch(config, mesh, task.info.shape)
  step = make_train_step(config, task, mesh)
  pool = concurrent.futures.ThreadPoolExecutor(1)
  future = pool.submit(lambda: step.lower(state, batch).compile())
  pool.shutdown(wait=False)
  return future


IN_FLIGHT = 2  # calls of the train step dispatched ahead of the one the devices run


def _crossed(step: int, k: int, every: int) -> bool:
  """Whether the k steps that ended at `step` crossed a multiple of `every`."""
  return bool(every) and step // every != (step - k) // every


def _any_process(flag: bool) -> bool:
  """Whether `flag` is set on any process (a collective: every process must call it)."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(multihost_utils.process_allgather(np.asarray(flag)).any())


def train_and_evaluate(config, workdir: str, *, writer=None) -> TrainState:
  """Trains (resuming from `<workdir>/checkpoints` if there is one) and returns the state.

  `writer` (default: metrics.jsonl and TensorBoard on process 0) receives the metrics every
  log_every steps; the log gets one line per log step with the metrics, rate and time left.

  Writes sample grids to `<workdir>/samples/`, checkpoints every training.checkpoint_every
  steps, at the end and on SIGTERM. A non-finite loss stops training before anything
  non-finite is saved. The run holds the workdir throughout (`workdir_lock`): a second training
  run into it stops before writing anything.
  """
  mesh = parallel.create_mesh(fsdp=config.parallel.fsdp)
  config_checks.validate(config, mesh.size)
  files.check_writable(workdir)
  with _holding(workdir):
    sources.check(config)
    return _train(config, workdir, mesh, writer)


@contextlib.contextmanager
def _holding(workdir: str):
  """Process 0 holds the workdir's lock for every process; all of them stop if it cannot."""
  with contextlib.ExitStack() as stack:
    busy = None
    if jax.process_index() == 0:
      try:
        stack.enter_context(workdir_lock.hold(workdir))
      except workdir_lock.WorkdirBusy as e:
        busy = e
    if jax.process_count() > 1 and _any_process(busy is not None) and busy is None:
      raise workdir_lock.WorkdirBusy(f'--workdir={workdir} is being trained by another run '
                                     '(process 0 names it).')
    if busy is not None:
      raise busy
    yield


def _train(config, workdir: str, mesh, writer) -> TrainState:
  tc = config.training
  task = task_lib.create_task(config)
  if tc.sample_every > 0:
    config_checks.validate_labels(config, task.info.num_classes)  # the previews' labels
  if config.data.class_conditional and not config.data.num_classes:
    # Recorded as read from the data, so that sampling needs no access to them.
    config = config.copy_and_resolve_references()
    config.data.num_classes = task.info.num_classes
  manager = checkpointing.create_manager(workdir, max_to_keep=tc.keep_checkpoints)
  resuming = manager.latest_step() is not None
  examples = None  # the configured source's, unless the run diffuses latents
  if task_lib.is_latent(config):  # the autoencoder's step, fingerprint and scale resolved
    config, examples = latents.prepare(config, workdir, trained=resuming)
  changes = run_config.check_resume(config, workdir) if resuming else {}
  # Not when the run looks finished: there would be nothing to compile for.
  compiling = (None if resuming and manager.latest_step() >= tc.num_steps
               else compile_in_background(config, task, mesh))
  writer = writer or metric_logging.create_writer(workdir, log=False)
  state = checkpointing.restore_or_keep(manager, task_lib.create_train_state(config, task, mesh),
                                        restore_fn=task_lib.restore_train_state)
  if tc.init_from and not resuming:
    state = warm_start.start_from_run(config, task, mesh, state, tc.init_from)
  step = int(state.step)
  if jax.process_index() == 0:
    run_config.record_config(config, workdir, resumed_at=step if resuming else None,
                             changes=changes)
  if step:
    logging.info('Resumed from the checkpoint at step %d.', step)
  if step >= tc.num_steps:
    logging.info('Nothing to do: step %d >= training.num_steps=%d.', step, tc.num_steps)
    manager.close()
    if jax.process_index() == 0:
      run_config.write_finished(workdir, step)
    return state

  batches = input_pipeline.create_iterator(config, mesh, start_step=step, examples=examples)
  p_train_step = (compiling.result() if compiling is not None
                  else make_train_step(config, task, mesh))
  if not tc.sample_every:
    preview = None
  elif task_lib.is_autoencoder(config):
    preview = autoencoding.reconstruction_preview(config, task.model)
  else:
    preview = generation.make_generate_fn(config, task, mesh,
                                          sampler=config.sampling.preview_sampler,
                                          num_steps=config.sampling.preview_steps)
  progress = metric_logging.Progress(tc.num_steps, start=step, items_per_step=tc.batch_size)
  snapshots = _snapshot_manager(config, workdir, state) if tc.phema_sigma_rels else None
  config_record = json.loads(config.to_json_best_effort())  # a copy in every checkpoint
  k = tc.steps_per_call
  pending = []  # device-side metrics since the last log: no host sync per step

  def fetch_checked(clear: bool = True) -> dict:
    """The pending metrics on the host, {name: [value per call]}; raises on a non-finite loss
    before anything from those steps can be saved."""
    nonlocal pending
    values = {name: np.asarray(v) for name, v in
              jax.device_get({name: [m[name] for m in pending] for name in pending[0]}).items()}
    if clear:
      pending = []
    if not np.all(np.isfinite(values['loss'])):
      checkpointing.wait_until_finished(manager)
      kept = (f'The last good checkpoint (step {manager.latest_step()}) is kept in '
              f'{checkpointing.checkpoint_dir(workdir)}.' if manager.latest_step() is not None
              else 'No checkpoint had been written yet.')
      raise FloatingPointError(
          f'non-finite loss at step {step}: training stopped. {kept} Lower '
          'training.learning_rate, enable training.grad_clip, or check the data.')
    return values

  with stop_signals.StopFlag() as preempted:
    while step < tc.num_steps:
      state, metrics = p_train_step(state, next(batches))
      step += k
      pending.append(metrics)
      if len(pending) > IN_FLIGHT:
        # Dispatch runs ahead of the devices: without a bound, a SIGTERM would wait for every
        # step queued since the last log (minutes on a CPU) before the checkpoint is written.
        jax.block_until_ready(pending[-IN_FLIGHT - 1]['loss'])
      last = step >= tc.num_steps
      log_now = _crossed(step, k, tc.log_every)
      stop = preempted.is_set()
      if jax.process_count() > 1:
        # Every process must stop at the same step or the collectives hang; they agree at log
        # steps only, which keeps host syncs out of the others.
        stop = log_now and _any_process(stop)
      if log_now or last or stop:
        values = fetch_checked()
        summary = {name: float(values[name].mean())  # the loss first in the log line
                   for name in sorted(values, key=lambda name: name != 'loss')}
        summary.update(progress.log(step, extra=metric_logging.format_scalars(summary)))
        writer.write_scalars(step, summary)
      if _crossed(step, k, tc.sample_every) or (last and tc.sample_every):
        write_preview(config, preview, state.ema_params, step, workdir, writer)
      snapshot = snapshots is not None and (_crossed(step, k, tc.phema_snapshot_every) or last)
      if _crossed(step, k, tc.checkpoint_every) or last or stop or snapshot:
        if pending:  # steps since the last log must be finite before they are saved
          fetch_checked(clear=False)
      if snapshot:
        posthoc_ema.save_snapshot(snapshots, step, state.phema_params, tc.phema_sigma_rels,
                                  tc.phema_dtype)
      if _crossed(step, k, tc.checkpoint_every) or last or stop:
        checkpointing.save(manager, step, state, config=config_record)
      if stop:
        logging.info('Preempted: saved step %d, exiting.', step)
        break
  checkpointing.wait_until_finished(manager)
  manager.close()
  if snapshots is not None:
    checkpointing.wait_until_finished(snapshots)
    snapshots.close()
  if jax.process_index() == 0 and step >= tc.num_steps:
    run_config.write_finished(workdir, step)
  writer.flush()
  return state


def _snapshot_manager(config, workdir: str, state):
  """The post-hoc EMA snapshots' manager, after logging the disk they will take."""
  tc = config.training
  count = -(-tc.num_steps // tc.phema_snapshot_every)
  size = posthoc_ema.disk_bytes(state.params, len(tc.phema_sigma_rels), count, tc.phema_dtype)
  logging.info('Post-hoc EMA: averages of sigma_rel %s, a snapshot every %d steps in %s: %d '
               'snapshots x %d averages, %.2f GB in %s.', tuple(tc.phema_sigma_rels),
               tc.phema_snapshot_every, tc.phema_dtype, count, len(tc.phema_sigma_rels),
               size / 1e9, posthoc_ema.snapshot_dir(workdir))
  return posthoc_ema.create_manager(workdir)


def write_preview(config, generate, params, step: int, workdir: str, writer) -> None:
  """A grid (images) or scatter (points) of EMA samples (an autoencoder's reconstructions), to a
  PNG and TensorBoard."""
  rng = jax.random.PRNGKey(config.sampling.seed)
  x = generate(params, rng, config.sampling.preview_samples)
  picture = images.picture(config, x, ncols=getattr(generate, 'ncols', None))
  if jax.process_index() == 0:
    images.save_png(picture, os.path.join(workdir, 'samples', f'train_{step:08d}.png'))
    writer.write_images(step, {'samples': picture[None]})
