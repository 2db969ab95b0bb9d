"""Start-up validation of a config: every error names the field and how to fix it."""

from __future__ import annotations

from diffusion_jax import (diffusion, models, phema, posthoc_ema, schedules, sources, step_tables,
                           timesteps)

LR_SCHEDULES = ('constant', 'cosine')


def _choice(value, choices, field: str):
  if value not in choices:
    raise ValueError(f'{field}={value!r} is unknown; choose one of {tuple(choices)}.')


def validate(config, num_devices: int) -> None:
  """Raises ValueError, naming the field, for the first bad value found."""
  data, model, diff, train, samp = (config.data, config.model, config.diffusion,
                                    config.training, config.sampling)
  _choice(data.source, sources.SOURCES, 'data.source')
  if data.source == 'toy2d':
    _choice(data.name, sources.TOY_DATASETS, 'data.name')
  _choice(model.architecture, models.ARCHITECTURES, 'model.architecture')
  _choice(diff.schedule, schedules.SCHEDULES, 'diffusion.schedule')
  _choice(diff.prediction_type, diffusion.PREDICTION_TYPES, 'diffusion.prediction_type')
  _choice(diff.loss, diffusion.LOSS_TYPES, 'diffusion.loss')
  _choice(train.lr_schedule, LR_SCHEDULES, 'training.lr_schedule')
  if diff.num_timesteps < 2:
    raise ValueError(f'diffusion.num_timesteps={diff.num_timesteps} must be at least 2.')
  _validate_sampling(samp, diff.num_timesteps, previews=train.sample_every > 0)

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
  _validate_posthoc_ema(train, samp)

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
  elif data.source != 'toy2d':
    raise ValueError('model.architecture=mlp is for data.source=toy2d; use unet for images.')


def _validate_posthoc_ema(train, samp) -> None:
  widths = tuple(train.phema_sigma_rels)
  for width in widths + ((samp.ema_sigma_rel,) if samp.ema_sigma_rel else ()):
    if not 0.0 < width <= phema.MAX_SIGMA_REL:
      field = ('sampling.ema_sigma_rel' if width not in widths else
               f'training.phema_sigma_rels={widths}')
      raise ValueError(f'{field}: sigma_rel {width} must lie in (0, {phema.MAX_SIGMA_REL}] '
                       '(EDM2 tracks 0.05 and 0.10).')
  if len(set(widths)) != len(widths):
    raise ValueError(f'training.phema_sigma_rels={widths} lists a width twice.')
  if widths:
    every = train.phema_snapshot_every
    if every < 1 or every % train.steps_per_call:
      raise ValueError(f'training.phema_snapshot_every={every} must be a positive multiple of '
                       f'training.steps_per_call={train.steps_per_call}.')
    _choice(train.phema_dtype, posthoc_ema.DTYPES, 'training.phema_dtype')


def _validate_sampling(samp, num_timesteps: int, previews: bool) -> None:
  """The sampler settings: names, step counts, orders, and options only some samplers have;
  those of the training previews only when there are previews."""
  _choice(samp.sampler, step_tables.SAMPLERS, 'sampling.sampler')
  if previews:
    _choice(samp.preview_sampler, step_tables.SAMPLERS, 'sampling.preview_sampler')
  _choice(samp.spacing, timesteps.SPACINGS, 'sampling.spacing')
  if samp.solver_order not in range(1, step_tables.MAX_ORDER + 1):
    raise ValueError(f'sampling.solver_order={samp.solver_order} must be 1, 2 or 3.')
  for field in ('num_steps',) + (('preview_steps',) if previews else ()):
    if not 1 <= samp[field] <= num_timesteps:
      raise ValueError(f'sampling.{field}={samp[field]} must lie in '
                       f'[1, diffusion.num_timesteps={num_timesteps}].')
  if samp.stochastic and samp.sampler != 'dpm_solver++':
    raise ValueError(f'sampling.stochastic=True is the SDE form of dpm_solver++, but '
                     f'sampling.sampler={samp.sampler!r}; set --config.sampling.sampler='
                     'dpm_solver++, or stochastic=False (for ddim use sampling.eta).')
