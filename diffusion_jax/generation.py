"""Generation from a model: the network as the samplers' `denoise_fn` (with classifier-free
guidance), and the jitted, device-sharded generator that training previews, `--mode=sample`,
`--mode=eval`, the notebook and the figures all use.

The samplers themselves (`samplers`) are pure math over a `denoise_fn(x_t, t)`; this module is
where a config, a network and its parameters meet them.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import (diffusion, editing, latents, metric_logging, ode, parallel, samplers,
                           step_tables, stop_signals)
from diffusion_jax.task import Task, is_latent


def guide(d_cond: jnp.ndarray, d_uncond: jnp.ndarray, scale) -> jnp.ndarray:
  """Classifier-free guidance (Ho & Salimans 2022): u + scale * (c - u); autoguidance (Karras
  et al. 2024) is the same with the main model as c and its guide as u.

  scale = 1 gives the conditional (main) model; 0 the unconditional one (the guide). The
  combination is the same for noise and data predictions (each is affine in the other at a
  given x_t), so it is taken on the data predictions the samplers use.
  """
  return d_uncond + scale * (d_cond - d_uncond)


def sample_labels(index, label: int, num_classes: int):
  """The class asked of sample number `index` (int array, NumPy or jax): `label` for all when
  it is >= 0 (sampling.label), else the classes in turn, index % num_classes."""
  return index * 0 + label if label >= 0 else index % num_classes


def guidance_scale(config, process, t: jnp.ndarray) -> jnp.ndarray:
  """sampling.guidance_scale at times t [B], or 1 (no guidance) where the noise level sigma~
  lies outside sampling.guidance_interval = (lo, hi], (Kynkaanniemi et al. 2024)."""
  scale = config.sampling.guidance_scale
  lo, hi = tuple(config.sampling.get('guidance_interval', ())) or (0.0, math.inf)
  if lo <= 0.0 and hi == math.inf:
    return jnp.asarray(scale, jnp.float32)
  st = process.sigma_tilde(t)
  return jnp.where((st > lo) & (st <= hi), scale, 1.0).astype(jnp.float32)


def _scale_at(config, process, t, like):
  scale = guidance_scale(config, process, t)
  return jnp.reshape(scale, (-1,) + (1,) * (like.ndim - 1)) if scale.ndim else scale


def make_denoise_fn(task: Task, params, labels, config,
                    guided_by=None) -> samplers.DenoiseFn:
  """The network as `denoise_fn(x_t, t) -> D`, with classifier-free guidance when it is
  conditional, or autoguidance when `guided_by` is given.

  labels: int32 [B] (the class of each sample) or None for an unconditional model. With
  guidance (sampling.guidance_scale != 1) the conditional and the unconditional ("null" label
  num_classes) predictions come from one network call on a doubled batch, each example next to
  its unconditional twin so that every device keeps its own rows.
  guided_by: (the guide's Task, parameters, prediction type): autoguidance (Karras et al. 2024),
  D = D_guide + w (D - D_guide) with w = sampling.guidance_scale in sampling.guidance_interval,
  the guide a weaker model of the same data and process, given the same labels. The two
  networks are two calls: one call over their stacked parameters (vmap) took 3.8 times as long
  on a CPU (985 ms against 259 ms, the digits U-Net at batch 256). A guide equal to the model
  gives plain sampling up to float32 rounding (XLA fuses the two programs differently).
  """
  pt = config.diffusion.prediction_type

  def denoise_with(lab, model=task.model, p=params, prediction=pt):
    def predict(x_in, t_net, *interval):  # interval: the step, for a network trained for steps
      step = {'interval': interval[0]} if interval else {}
      return model.apply({'params': p}, x_in, t_net, lab, train=False, **step)
    return diffusion.denoiser(predict, task.process, prediction)

  if guided_by is not None:
    return _autoguided(task, params, labels, config, guided_by, denoise_with)
  if not task.info.num_classes or config.sampling.guidance_scale == 1.0:
    return denoise_with(labels)
  null = jnp.full_like(labels, task.info.num_classes)
  denoise_pairs = denoise_with(_interleave(labels, null))

  def denoise_fn(x_t, t, *t_end):
    d = denoise_pairs(_interleave(x_t, x_t), _interleave(t, t),
                      *(_interleave(r, r) for r in t_end))
    d = d.reshape((x_t.shape[0], 2) + x_t.shape[1:])
    return guide(d[:, 0], d[:, 1], _scale_at(config, task.process, t, x_t))
  return denoise_fn


def _interleave(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
  """[B, ...] and [B, ...] -> [2B, ...] with rows a_0, b_0, a_1, b_1, ..."""
  return jnp.stack([a, b], axis=1).reshape((2 * a.shape[0],) + a.shape[1:])


def _autoguided(task: Task, params, labels, config, guide_spec, denoise_with):
  guide_task, guide_params, guide_pt = guide_spec
  main_fn = denoise_with(labels)
  guide_fn = denoise_with(labels, model=guide_task.model, p=guide_params, prediction=guide_pt)

  def denoise_fn(x_t, t, *t_end):
    return guide(main_fn(x_t, t, *t_end), guide_fn(x_t, t, *t_end),
                 _scale_at(config, task.process, t, x_t))
  return denoise_fn


def reverse_steps(config, task: Task, *, sampler: str | None = None,
                  num_steps: int | None = None) -> step_tables.ReverseSteps:
  """The table of the configured sampler (sampling.sampler, .num_steps, .eta, .solver_order,
  .spacing, .stochastic, .variance, .time_shift, .s_churn, .s_tmin, .s_tmax, .s_noise), or of
  `sampler` / `num_steps` when given."""
  sc = config.sampling
  steps = step_tables.build(sampler or sc.sampler, task.process,
                            num_steps=num_steps or sc.num_steps, eta=sc.eta,
                            order=sc.solver_order, spacing=sc.spacing,
                            stochastic=sc.stochastic, variance=sc.variance,
                            shift=sc.time_shift, s_churn=sc.s_churn, s_tmin=sc.s_tmin,
                            s_tmax=sc.s_tmax, s_noise=sc.s_noise,
                            strength=sc.strength if editing_mode(config) == 'img2img' else 1.0)
  if editing_mode(config) == 'inpaint':
    steps = editing.for_inpainting(steps, task.process, *sc.inpaint_resample)
  return steps


STEP_SAMPLERS = ('ddim', 'euler')  # whose rows are single Euler steps (ddim: at eta 0)


def row_ends(config, task: Task, steps, sampler: str) -> np.ndarray | None:
  """Where each row of the table steps to, for a network trained for steps
  (model.interval_embedding, e.g. MeanFlow's average velocity) sampled by Euler steps
  (`STEP_SAMPLERS`): its update x_t - (t - t_end) u is then the trained step. None otherwise:
  the other samplers (and the adaptive ODE solve) call it with a step of length 0, where it is
  the flow-matching velocity it was also trained as."""
  stepwise = sampler in STEP_SAMPLERS and (sampler == 'euler' or config.sampling.eta == 0.0)
  if steps is None or not config.model.get('interval_embedding', False) or not stepwise:
    return None
  return samplers.row_ends(steps, task.process)


def editing_mode(config) -> str | None:
  """'inpaint' (sampling.inpaint_image), 'img2img' (sampling.init_image) or None."""
  sc = config.sampling
  if sc.get('inpaint_image', ''):
    return 'inpaint'
  if sc.get('init_image', '') and sc.strength < 1.0:
    return 'img2img'
  return None


def make_generate_fn(config, task: Task, mesh, *, sampler: str | None = None,
                     num_steps: int | None = None, return_trajectory: bool = False,
                     guide: tuple[Task, str] | None = None) -> Callable:
  """generate(params, rng, n) -> float32 [n, ...] samples (and [S+1, n, ...] trajectory).

  Runs the configured sampler (or `sampler` with `num_steps`, see `reverse_steps`) in global
  batches of sampling.batch_size, rounded up to a whole number per device and split over the
  mesh's devices. Sample i of a conditional model is of class `sample_labels(i, ...)`. With
  `log_progress=True` each batch is logged with the rate and time left; with a `stop`
  (`stop_signals.StopFlag`) a signal interrupts even one long batch (`stop_signals.Interrupted`).
  `generate.num_calls` is the number of network calls per sample of a table sampler (None for
  the adaptive ODE solve, whose samples each take their own); `with_calls=True` also returns
  those of each sample, int32 [n].

  Editing (`editing_mode`): `generate(..., inputs=...)` with `image` float [N, ...] in the
  model's range (sample i edits image i % N) and, for inpainting, `keep` [N, ...] (1 where the
  pixel is known). Autoguidance (sampling.guide): `guide` = (the guide's Task, its prediction
  type) here and `generate(..., guide_params=...)`.
  """
  sc = config.sampling
  adaptive = (sampler or sc.sampler) == ode.SAMPLER
  if adaptive and return_trajectory:
    raise ValueError('sampling.sampler=adaptive chooses its steps as it solves; the trajectory '
                     'strip (sampling.trajectory) shows a fixed grid: draw it with another '
                     'sampler.')
  steps = None if adaptive else reverse_steps(config, task, sampler=sampler, num_steps=num_steps)
  edit = None if adaptive else editing_mode(config)
  if edit is not None and is_latent(config):
    raise ValueError(f'{edit}: sampling.inpaint_image and sampling.init_image edit pixels, and a '
                     'latent run (latent.autoencoder) samples latents; editing in latent space '
                     'is not offered here: drop the setting.')
  ends = row_ends(config, task, steps, sampler or sc.sampler)
  shape = tuple(task.info.shape)
  guide_task, guide_pt = guide if guide is not None else (None, None)
  # A latent run's samples are decoded to images inside the same program.
  decode, ae_params = latents.decoder(config) if is_latent(config) else (None, None)
  if decode is not None:
    ae_params = jax.device_put(ae_params, parallel.replicated(mesh))

  def run(params, rng, label_offset, batch, inputs, guide_params, ae_params):
    (out, *rest), calls = sample(params, rng, label_offset, batch, inputs, guide_params)
    if decode is not None:
      out = decode(ae_params, out)
      rest = [jax.lax.map(lambda frame: decode(ae_params, frame), r) for r in rest]
    return (out, *rest) if return_trajectory else out, calls

  def sample(params, rng, label_offset, batch, inputs, guide_params):
    """((samples, and the trajectory if asked), network calls of each sample)."""
    x_t = jax.random.normal(jax.random.fold_in(rng, 0), (batch,) + shape)
    x_t = jax.lax.with_sharding_constraint(x_t, parallel.batch_sharding(mesh))
    labels = None
    if task.info.num_classes:
      index = label_offset + jnp.arange(batch, dtype=jnp.int32)
      labels = sample_labels(index, sc.label, task.info.num_classes)
    guide_spec = None if guide_task is None else (guide_task, guide_params, guide_pt)
    denoise_fn = make_denoise_fn(task, params, labels, config, guided_by=guide_spec)
    if adaptive:
      x, calls = ode.sample(denoise_fn, task.process, x_t, rtol=sc.rtol, atol=sc.atol,
                            clip_x0=sc.clip_x0)
      return (x,), calls
    x_start = known = None
    if edit == 'img2img':
      x_start = editing.noised(task.process, steps.t[0], inputs['image'], x_t)
    elif edit == 'inpaint':
      known = (inputs['image'], inputs['keep'])
    out = samplers.run_reverse(denoise_fn, steps, x_t, jax.random.fold_in(rng, 1),
                               clip_x0=sc.clip_x0, return_trajectory=return_trajectory,
                               x_start=x_start, known=known, row_ends=ends)
    return (tuple(out) if return_trajectory else (out,)), jnp.full((batch,), steps.num_calls,
                                                                    jnp.int32)

  compiled = jax.jit(run, static_argnums=3, out_shardings=parallel.replicated(mesh))

  def generate(params, rng, n: int, *, log_progress: bool = False,
               stop: stop_signals.StopFlag | None = None, with_calls: bool = False,
               inputs: dict | None = None, guide_params=None):
    if (edit is not None) != (inputs is not None):
      raise ValueError(f'editing ({edit}) needs `inputs`, and only editing takes them.')
    if (guide_task is not None) != (guide_params is not None):
      raise ValueError('autoguidance needs both guide_task and guide_params.')
    batch = parallel.round_up(min(sc.batch_size, n), mesh.size)
    num_batches = math.ceil(n / batch)
    progress = metric_logging.Progress(num_batches, items_per_step=batch, unit='batch',
                                       label='sampling')
    fetch = stop.fetch if stop is not None else jax.device_get
    outs, calls = [], []
    for i in range(num_batches):
      rows = None
      if inputs is not None:
        index = (i * batch + np.arange(batch)) % len(inputs['image'])
        rows = {k: np.asarray(v, np.float32)[index] for k, v in inputs.items()}
      out, batch_calls = fetch(compiled(params, jax.random.fold_in(rng, i), i * batch, batch,
                                        rows, guide_params, ae_params))
      outs.append(out)
      calls.append(batch_calls)
      if log_progress:
        progress.log(i + 1)
    if return_trajectory:
      result = (np.concatenate([o[0] for o in outs])[:n],
                np.concatenate([o[1] for o in outs], axis=1)[:, :n])
    else:
      result = np.concatenate(outs)[:n]
    return (result, np.concatenate(calls)[:n]) if with_calls else result

  generate.num_calls = None if adaptive else steps.num_calls
  return generate
