"""Start-up validation of a config: every error names the field and how to fix it."""

from __future__ import annotations

import jax

from diffusion_jax import (diffusion, models, phema, posthoc_ema, processes, schedules, sources,
                           step_tables, timesteps)
from diffusion_jax.models import attention

LR_SCHEDULES = ('constant', 'cosine')


def _choice(value, choices, field: str):
  if value not in choices:
    raise ValueError(f'{field}={value!r} is unknown; choose one of {tuple(choices)}.')


MODES = ('train', 'sample', 'eval', 'summary')


def validate(config, num_devices: int, mode: str = 'train') -> None:
  """Raises ValueError, naming the field, for the first bad value found.

  Only what `mode` uses is checked: sampling and eval settings do not stop training (its
  previews are checked when there are any), and training settings such as the batch size do not
  stop sampling a run on another number of devices.
  """
  if mode not in MODES:
    raise ValueError(f'mode={mode!r} is unknown; choose one of {MODES}.')
  data, model, diff, train, samp = (config.data, config.model, config.diffusion,
                                    config.training, config.sampling)
  _choice(data.source, sources.SOURCES, 'data.source')
  if data.source == 'toy2d':
    _choice(data.name, sources.TOY_DATASETS, 'data.name')
  _validate_model(data, model)
  _validate_diffusion(diff)
  process = processes.from_config(diff)
  if mode == 'train':
    _validate_training(train, num_devices)
    _validate_posthoc_ema(train)
    if train.sample_every > 0:
      _validate_sampling(samp, process, preview=True)
  elif mode in ('sample', 'eval'):
    _validate_sampling(samp, process, preview=False)
    if mode == 'eval' and config.eval.bpd_num_examples and process.name != 'ddpm':
      raise ValueError(f'eval.bpd_num_examples={config.eval.bpd_num_examples}: bits/dim is the '
                       'variational bound of the discrete chain (diffusion.process=ddpm); set '
                       f'--config.eval.bpd_num_examples=0 for diffusion.process={process.name}.')
    if samp.batch_size < 1:
      raise ValueError(f'sampling.batch_size={samp.batch_size} must be at least 1.')
    if samp.ema_sigma_rel and not 0.0 < samp.ema_sigma_rel <= phema.MAX_SIGMA_REL:
      raise ValueError(f'sampling.ema_sigma_rel={samp.ema_sigma_rel} must lie in (0, '
                       f'{phema.MAX_SIGMA_REL}] (0: the EMA of training.ema_decay).')


def _validate_diffusion(diff) -> None:
  _choice(diff.process, processes.PROCESSES, 'diffusion.process')
  if diff.process == 'vp':
    _choice(diff.schedule, processes.VP_SCHEDULES, 'diffusion.schedule')
  else:
    _choice(diff.schedule, schedules.SCHEDULES, 'diffusion.schedule')
    schedules.kwargs_from_config(diff)  # names unknown or malformed diffusion.schedule_kwargs
  _choice(diff.prediction_type, diffusion.PREDICTION_TYPES, 'diffusion.prediction_type')
  _choice(diff.loss, diffusion.LOSS_TYPES, 'diffusion.loss')
  _choice(diff.loss_weighting, diffusion.LOSS_WEIGHTINGS, 'diffusion.loss_weighting')
  if diff.loss_weighting == 'min_snr' and diff.min_snr_gamma <= 0:
    raise ValueError(f'diffusion.min_snr_gamma={diff.min_snr_gamma} must be positive with '
                     'diffusion.loss_weighting=min_snr (5 is typical).')
  if diff.num_timesteps < 2:
    raise ValueError(f'diffusion.num_timesteps={diff.num_timesteps} must be at least 2.')
  if diff.sigma_data <= 0:
    raise ValueError(f'diffusion.sigma_data={diff.sigma_data} must be positive (0.5 for images '
                     'in [-1, 1]).')


def _validate_training(train, num_devices: int) -> None:
  _choice(train.lr_schedule, LR_SCHEDULES, 'training.lr_schedule')
  _choice(train.time_sampling, processes.TIME_SAMPLINGS, 'training.time_sampling')
  for field in ('time_shift', 'logit_normal_std', 'lognormal_std'):
    if train[field] <= 0:
      raise ValueError(f'training.{field}={train[field]} must be positive.')
  per_call = train.batch_size
  if per_call <= 0 or per_call % num_devices:
    raise ValueError(f'training.batch_size={per_call} (global) must be a positive multiple of '
                     f'the {num_devices} devices; try --config.training.batch_size='
                     f'{max(1, round(per_call / num_devices)) * num_devices}.')
  if train.steps_per_call < 1:
    raise ValueError(f'training.steps_per_call={train.steps_per_call} must be at least 1.')
  for field in ('log_every', 'checkpoint_every'):
    every = train[field]
    if every < 1 or every % train.steps_per_call:
      raise ValueError(f'training.{field}={every} must be a positive multiple of '
                       f'training.steps_per_call={train.steps_per_call}.')
  if not 0.0 <= train.ema_decay < 1.0:
    raise ValueError(f'training.ema_decay={train.ema_decay} must lie in [0, 1).')


def _validate_model(data, model) -> None:
  _choice(model.architecture, models.ARCHITECTURES, 'model.architecture')
  if model.dtype == 'float16':
    raise ValueError('model.dtype=float16 trains without loss scaling here, and its 5-bit '
                     'exponent overflows in the U-Net\'s activations and gradients; use '
                     '--config.model.dtype=bfloat16 (the same speed on current GPUs and TPUs, '
                     'float32\'s range, no loss scaling needed).')
  _choice(model.dtype, models.DTYPES, 'model.dtype')
  if model.architecture == 'unet':
    if data.source == 'toy2d':
      raise ValueError('data.source=toy2d needs model.architecture=mlp (the data are points).')
    size, levels = data.image_size, len(model.channel_mult)
    factor = 2 ** (levels - 1)
    if size % factor:
      raise ValueError(f'data.image_size={size} must be divisible by 2^(levels - 1) = {factor} '
                       f'for model.channel_mult={tuple(model.channel_mult)}; choose an image '
                       'size that is a multiple of it, or fewer levels.')
    reached = {size // 2 ** i for i in range(levels)}
    for res in model.attention_resolutions:
      if res not in reached:
        raise ValueError(f'model.attention_resolutions contains {res}, a resolution the network '
                         f'never reaches (it works at {sorted(reached, reverse=True)}).')
    widths = [model.channels * m for m in model.channel_mult]
    if any(w % model.num_groups for w in widths):
      raise ValueError(f'model.num_groups={model.num_groups} must divide every level width '
                       f'{widths}.')
  elif model.architecture == 'dit':
    _validate_dit(data, model)
  elif data.source != 'toy2d':
    raise ValueError('model.architecture=mlp is for data.source=toy2d; use unet or dit for '
                     'images.')
  _validate_attention(model)


def _validate_dit(data, model) -> None:
  if data.source == 'toy2d':
    raise ValueError('data.source=toy2d needs model.architecture=mlp (the data are points).')
  hidden, _, heads = models.dit_size(model)
  p = model.patch_size
  if p < 1 or data.image_size % p:
    raise ValueError(f'model.patch_size={p} must divide data.image_size={data.image_size}.')
  if hidden % heads:
    raise ValueError(f'model.num_heads={heads} must divide the DiT width {hidden} '
                     '(model.hidden, or the preset\'s).')
  if model.rope and (hidden // heads) % 4:
    raise ValueError(f'model.rope needs a head width (hidden / heads = {hidden // heads}) '
                     'divisible by 4; change model.hidden or model.num_heads.')
  if not model.rope and hidden % 4:
    raise ValueError(f'the DiT width {hidden} must be a multiple of 4 for its 2-D sin-cos '
                     'position table (or set model.rope=True).')


def _validate_attention(model) -> None:
  implementation = model.get('attention', 'auto')
  _choice(implementation, attention.IMPLEMENTATIONS, 'model.attention')
  if implementation == 'cudnn' and jax.default_backend() != 'gpu':
    raise ValueError(f'model.attention=cudnn runs on NVIDIA GPUs only, not on '
                     f'{jax.default_backend()}; use auto (it picks cuDNN where it can).')


def _validate_posthoc_ema(train) -> None:
  widths = tuple(train.phema_sigma_rels)
  for width in widths:
    if not 0.0 < width <= phema.MAX_SIGMA_REL:
      raise ValueError(f'training.phema_sigma_rels={widths}: sigma_rel {width} must lie in (0, '
                       f'{phema.MAX_SIGMA_REL}] (EDM2 tracks 0.05 and 0.10).')
  if len(set(widths)) != len(widths):
    raise ValueError(f'training.phema_sigma_rels={widths} lists a width twice.')
  if widths:
    every = train.phema_snapshot_every
    if every < 1 or every % train.steps_per_call:
      raise ValueError(f'training.phema_snapshot_every={every} must be a positive multiple of '
                       f'training.steps_per_call={train.steps_per_call}.')
    _choice(train.phema_dtype, posthoc_ema.DTYPES, 'training.phema_dtype')


def _validate_sampling(samp, process, preview: bool) -> None:
  """The settings of the sampler that runs: the training previews' (sampling.preview_sampler,
  .preview_steps) or the one of --mode=sample/eval (sampling.sampler, .num_steps)."""
  sampler, steps = ('preview_sampler', 'preview_steps') if preview else ('sampler', 'num_steps')
  _choice(samp[sampler], step_tables.SAMPLERS, f'sampling.{sampler}')
  _choice(samp.spacing, timesteps.SPACINGS, 'sampling.spacing')
  if samp.solver_order not in range(1, step_tables.MAX_ORDER + 1):
    raise ValueError(f'sampling.solver_order={samp.solver_order} must be 1, 2 or 3.')
  if samp[sampler] == 'ddpm' and not process.discrete:
    raise ValueError(f'sampling.{sampler}=ddpm runs the T steps of the discrete chain, which '
                     f'diffusion.process={process.name} has not; use ddim with sampling.eta=1 '
                     '(ancestral steps) or euler_maruyama.')
  if process.discrete and samp[sampler] != 'ddpm' and not (
      1 <= samp[steps] <= process.num_timesteps):
    raise ValueError(f'sampling.{steps}={samp[steps]} must lie in '
                     f'[1, diffusion.num_timesteps={process.num_timesteps}].')
  if not process.discrete:
    if samp.spacing not in timesteps.CONTINUOUS_SPACINGS:
      raise ValueError(f'sampling.spacing={samp.spacing!r} picks integer timesteps of the ddpm '
                       f'process; on diffusion.process={process.name} choose one of '
                       f'{timesteps.CONTINUOUS_SPACINGS}.')
    if samp[steps] < 1:
      raise ValueError(f'sampling.{steps}={samp[steps]} must be at least 1.')
  if samp.time_shift <= 0:
    raise ValueError(f'sampling.time_shift={samp.time_shift} must be positive (1: no shift).')
  if samp.s_churn < 0 or samp.s_noise <= 0 or samp.s_tmin > samp.s_tmax:
    raise ValueError(f'sampling.s_churn={samp.s_churn}, .s_noise={samp.s_noise}, '
                     f'.s_tmin={samp.s_tmin}, .s_tmax={samp.s_tmax}: need s_churn >= 0, '
                     's_noise > 0 and s_tmin <= s_tmax (EDM: 40, 1.003, 0.05, 50 on ImageNet).')
  interval = tuple(samp.guidance_interval)
  if interval and not (len(interval) == 2 and 0 <= interval[0] < interval[1]):
    raise ValueError(f'sampling.guidance_interval={interval} must be () (everywhere) or '
                     '(lo, hi) with 0 <= lo < hi, noise levels sigma~ (EDM2: (0.28, 2.9)).')
