"""The task below every mode: the experiment's parts and its state, built from a config.

`create_task(config)` gives the network, the forward process, the optimizer with its learning-rate
schedule, and the data's shape and label count; `TrainState` holds what training changes (with
the EMA of the parameters); `init_train_state` is its pure initial value, `create_train_state`
that value computed on the devices, `abstract_train_state` its shapes (a restore target), and
`restore_ema_params` reads only the EMA parameters of a checkpoint, for sampling and evaluation.
Training, sampling, evaluation, the summary, the notebook and the benchmark all start here.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import optax

from diffusion_jax import (autoencoding, checkpointing, input_pipeline, latents, models,
                           objectives, parallel, phema, posthoc_ema, processes, schedules)
from diffusion_jax.models.autoencoder import AutoencoderKL


class TrainState(flax.struct.PyTreeNode):
  step: jnp.ndarray  # int32 scalar: optimizer steps taken
  params: Any
  opt_state: Any
  ema_params: Any
  rng: jnp.ndarray  # uint32 [2]: the root key of all training noise
  # Power-function averages of the parameters, one tree per training.phema_sigma_rels
  # (post-hoc EMA); empty when that is off, which keeps the checkpoints of earlier versions
  # restorable.
  phema_params: tuple = ()


class Task(NamedTuple):
  """The experiment's moving parts, built from a config."""
  model: Any  # flax module: (x, t, labels, train=) -> prediction
  process: processes.Process  # the forward process (diffusion.process)
  tx: optax.GradientTransformation
  learning_rate: optax.Schedule
  info: input_pipeline.DataInfo

  @property
  def schedule(self) -> schedules.Schedule:
    """The beta schedule of the ddpm process (its posterior and variational bound)."""
    if not self.process.discrete:
      raise ValueError(f'diffusion.process={self.process.name} has no discrete beta schedule; '
                       'the variational bound and DDPM sampling need diffusion.process=ddpm.')
    return self.process.schedule


def learning_rate_schedule(tc) -> optax.Schedule:
  """Linear warm-up to training.learning_rate, then constant or cosine decay to 0."""
  if tc.lr_schedule == 'cosine':
    after = optax.cosine_decay_schedule(tc.learning_rate, max(tc.num_steps - tc.warmup_steps, 1))
  else:
    after = optax.constant_schedule(tc.learning_rate)
  if not tc.warmup_steps:
    return after
  warmup = optax.linear_schedule(0.0, tc.learning_rate, tc.warmup_steps)
  return optax.join_schedules([warmup, after], [tc.warmup_steps])


def create_optimizer(tc) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW with the config's betas, eps and weight decay, after global-norm clipping."""
  lr = learning_rate_schedule(tc)
  adamw = optax.adamw(lr, b1=tc.b1, b2=tc.b2, eps=tc.eps, weight_decay=tc.weight_decay)
  tx = optax.chain(optax.clip_by_global_norm(tc.grad_clip), adamw) if tc.grad_clip else adamw
  return tx, lr


def ema_decay(tc, step: jnp.ndarray) -> jnp.ndarray:
  """The EMA decay at `step`: ramped as min(decay, (1 + step) / (10 + step)) if asked, because
  at 0.9999 an un-ramped average is dominated by the random initialisation for ~10^4 steps."""
  if not tc.ema_warmup:
    return jnp.asarray(tc.ema_decay, jnp.float32)
  step = step.astype(jnp.float32)
  return jnp.minimum(tc.ema_decay, (1.0 + step) / (10.0 + step))


def update_ema(tc, ema_params, params, step: jnp.ndarray):
  """The EMA after the optimizer step `step`: decay * ema + (1 - decay) * params."""
  return optax.incremental_update(params, ema_params, 1.0 - ema_decay(tc, step))


def power_ema(config) -> phema.PowerEMA:
  """The power-function averages that training tracks (training.phema_sigma_rels)."""
  return phema.power_ema(tuple(config.training.get('phema_sigma_rels', ())))


def is_autoencoder(config) -> bool:
  """Whether the run trains latent diffusion's autoencoder (model.architecture=autoencoder)
  instead of a denoiser."""
  return config.model.architecture == 'autoencoder'


def is_latent(config) -> bool:
  """Whether the run diffuses an autoencoder's latents (latent.autoencoder)."""
  return not is_autoencoder(config) and bool(config.get('latent', {}).get('autoencoder'))


def create_task(config) -> Task:
  """The run's parts. An autoencoder run's model is the autoencoder (its process unused); a
  latent run's examples have the latents' shape (`latents.latent_shape`)."""
  info = input_pipeline.data_info(config)
  tx, lr = create_optimizer(config.training)
  process = processes.from_config(config.diffusion)
  if is_autoencoder(config):
    return Task(autoencoding.create_model(config), process, tx, lr, info._replace(num_classes=0))
  if is_latent(config):
    info = info._replace(shape=latents.latent_shape(config))
  forward_mode = config.training.get('objective', 'denoise') in objectives.FORWARD_MODE
  return Task(models.create_model(config.model, info.num_classes, forward_mode), process, tx,
              lr, info)


def init_params(model, info: input_pipeline.DataInfo, rng: jnp.ndarray):
  x = jnp.zeros((1,) + tuple(info.shape), jnp.float32)
  if isinstance(model, AutoencoderKL):
    return model.init({'params': rng}, x)['params']
  t = jnp.zeros((1,), jnp.int32)
  labels = jnp.zeros((1,), jnp.int32) if info.num_classes else None
  return model.init({'params': rng}, x, t, labels, train=False)['params']


def init_train_state(config, task: Task) -> TrainState:
  """A fresh TrainState (a pure function of training.seed: every process derives the same)."""
  init_rng, train_rng = jax.random.split(jax.random.PRNGKey(config.training.seed))
  params = init_params(task.model, task.info, init_rng)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=task.tx.init(params),
                    ema_params=params, rng=train_rng,
                    phema_params=power_ema(config).init(params))


# init_train_state runs once, and on CPU most of its compile time is LLVM optimising the
# initialisers' random-number code: without those passes the digits config starts 6 s sooner.
_INIT_COMPILER_OPTIONS = {'cpu': {'xla_backend_optimization_level': 0}}


def state_shardings(config, task: Task, mesh) -> TrainState:
  """Where each array of the TrainState lives on `mesh`: split over its 'fsdp' axis
  (`parallel.state_shardings`), replicated over 'data'."""
  return parallel.state_shardings(
      mesh, jax.eval_shape(functools.partial(init_train_state, config, task)))


def create_train_state(config, task: Task, mesh=None) -> TrainState:
  """`init_train_state`, computed on the devices and laid out over `mesh` when one is given."""
  out = state_shardings(config, task, mesh) if mesh is not None else None
  lowered = jax.jit(functools.partial(init_train_state, config, task), out_shardings=out).lower()
  return lowered.compile(_INIT_COMPILER_OPTIONS.get(jax.default_backend()))()


def abstract_train_state(config, task: Task, mesh) -> TrainState:
  """Shapes and shardings of the TrainState on `mesh`, without allocating it (for restores)."""
  shapes = jax.eval_shape(functools.partial(init_train_state, config, task))
  return checkpointing.abstract_like(shapes, parallel.state_shardings(mesh, shapes))


def restore_train_state(manager, target: TrainState, step: int) -> TrainState:
  """The TrainState saved at `step`, laid out like the abstract `target` (a `restore_fn` for
  `checkpointing.restore_newest_readable`).

  Checkpoints written before the post-hoc EMA averages were trees hold each as one flat vector
  (`phema_params/<i>`); those are read as such and unflattened.
  """
  shapes = checkpointing.saved_shapes(manager, step)
  flat = [shapes.get(f'phema_params/{i}') for i in range(len(target.phema_params))]
  if not target.phema_params or any(s is None or len(s) != 1 for s in flat):
    return checkpointing.restore(manager, target, step)
  rest = target.replace(phema_params=())
  first = jax.tree.leaves(target.phema_params)[0]
  whole = jax.sharding.NamedSharding(first.sharding.mesh, jax.sharding.PartitionSpec())
  vector = lambda shape: jax.ShapeDtypeStruct(shape, first.dtype, sharding=whole)
  fields = checkpointing.restore_fields(
      manager, {'phema_params': tuple(vector(s) for s in flat)}, step)
  state = checkpointing.restore(manager, rest, step)
  averages = tuple(
      jax.device_put(phema.unflatten(v, like), jax.tree.map(lambda x: x.sharding, like))
      for v, like in zip(fields['phema_params'], target.phema_params))
  return state.replace(phema_params=averages)


def restore_ema_params(config, task: Task, mesh, workdir: str, step: int | None = None):
  """(EMA parameters replicated on `mesh`, their step) from the checkpoint at `step` (default:
  the latest) in `<workdir>/checkpoints`.

  Reads those parameters and the step only, not the parameters and Adam moments that training
  also saves: a quarter of a full TrainState's memory. With sampling.ema_sigma_rel > 0 they are
  instead the post-hoc EMA of that width at `step` (default: the last snapshot), reconstructed
  from the snapshots in `<workdir>/phema/`.
  """
  target = abstract_train_state(config, task, mesh)
  sigma_rel = config.sampling.get('ema_sigma_rel', 0.0)
  if sigma_rel:
    params, step, _ = posthoc_ema.reconstruct(workdir, sigma_rel, target.params, step)
    return params, step
  manager = checkpointing.create_manager(workdir, read_only=True)
  try:
    fields, _, _ = checkpointing.restore_newest_readable(
        manager, {'step': target.step, 'ema_params': target.ema_params}, step,
        restore_fn=checkpointing.restore_fields)
  finally:
    manager.close()
  return fields['ema_params'], int(fields['step'])
