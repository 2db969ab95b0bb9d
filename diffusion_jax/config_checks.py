"""Start-up validation of a config: every error names the field and how to fix it.

Each field's own domain, and whether a setting given on the command line applies to the run,
come from the table in `config_fields`; what is checked here is what relates fields to each
other, to the devices and to the run (a label beyond the run's classes).
"""

from __future__ import annotations

import os
import traceback

import jax
import ml_collections

from diffusion_jax import (config_fields, latents, models, objectives, ode, processes, schedules,
                           sources, task as task_lib, timesteps)

MODES = config_fields.MODES


def _choice(value, choices, field: str):
  if value not in choices:
    raise ValueError(f'{field}={value!r} is unknown; choose one of {tuple(choices)}.')


def validate(config, num_devices: int, mode: str = 'train') -> None:
  """Raises ValueError, in one line naming the field, for the first bad value found.

  Every field must lie in its domain (`config_fields.check_domains`), whatever the mode. Of the
  relations between fields only those of what `mode` uses are checked: sampling settings do not
  stop training (its previews are checked when there are any), and training settings such as
  the batch size do not stop sampling a run on another number of devices.
  """
  if mode not in MODES:
    raise ValueError(f'mode={mode!r} is unknown; choose one of {MODES}.')
  if config.model.get('dtype') == 'float16':
    raise ValueError('model.dtype=float16 trains without loss scaling here, and its 5-bit '
                     'exponent overflows in the U-Net\'s activations and gradients; use '
                     '--config.model.dtype=bfloat16 (the same speed on current GPUs and TPUs, '
                     'float32\'s range, no loss scaling needed).')
  config_fields.check_domains(config)
  data, model, diff, train, samp = (config.data, config.model, config.diffusion,
                                    config.training, config.sampling)
  if data.source == 'toy2d':
    _choice(data.name, sources.TOY_DATASETS, 'data.name')
  if task_lib.is_autoencoder(config):
    _validate_autoencoder(config, num_devices, mode)
    return
  if task_lib.is_latent(config):
    data = _validate_latent(config, mode)
  _validate_model(data, model)
  _validate_diffusion(diff)
  objectives.check(train.get('objective', 'denoise'), diff.process, diff.prediction_type,
                   model.get('interval_embedding', False))
  process = processes.from_config(diff)
  if mode == 'train':
    _validate_training(train, num_devices)
    if train.sample_every > 0:
      _validate_sampling(samp, process, preview=True)
  elif mode in ('sample', 'eval'):
    _validate_sampling(samp, process, preview=False)
    if (mode == 'eval' and config.eval.bpd_num_examples and not config.eval.ode_bpd
        and process.name != 'ddpm'):
      raise ValueError(f'eval.bpd_num_examples={config.eval.bpd_num_examples} with '
                       'eval.ode_bpd=False: the variational bound is of the discrete chain '
                       f'(diffusion.process=ddpm); on diffusion.process={process.name} bits/dim '
                       'come from the probability-flow ODE: set --config.eval.ode_bpd=True.')
    if mode == 'sample' and samp.trajectory and samp.sampler == ode.SAMPLER:
      raise ValueError('sampling.trajectory draws the steps of a fixed grid; '
                       'sampling.sampler=adaptive chooses its own: draw the strip with another '
                       'sampler.')
    if mode == 'sample':
      _validate_editing(config)


def _validate_autoencoder(config, num_devices: int, mode: str) -> None:
  """An autoencoder run (model.architecture=autoencoder): images, a size its levels divide, no
  sampling."""
  data, ac = config.data, config.autoencoder
  if data.source == 'toy2d':
    raise ValueError('model.architecture=autoencoder encodes images; data.source=toy2d has points.')
  if mode == 'sample':
    raise ValueError('model.architecture=autoencoder: an autoencoder run does not sample. '
                     '--mode=eval measures its reconstructions (PSNR); a diffusion run with '
                     'latent.autoencoder=<this workdir> samples its latents.')
  factor = 2 ** (len(ac.block_out_channels) - 1)
  if data.image_size % factor:
    raise ValueError(f'data.image_size={data.image_size} must be divisible by the autoencoder\'s '
                     f'downsampling factor {factor} (autoencoder.block_out_channels='
                     f'{tuple(ac.block_out_channels)}).')
  if any(w % ac.num_groups for w in ac.block_out_channels):
    raise ValueError(f'autoencoder.num_groups={ac.num_groups} must divide every width of '
                     f'autoencoder.block_out_channels={tuple(ac.block_out_channels)}.')
  _validate_attention(config.model)
  if mode == 'train':
    _validate_training(config.training, num_devices)


def _validate_latent(config, mode: str):
  """A latent run: the autoencoder is there (`latents.latent_shape` names it if not), and the
  modes it cannot serve. Returns the data group as the network sees it (latent-sized)."""
  shape = latents.latent_shape(config)
  if config.data.source == 'toy2d':
    raise ValueError('latent.autoencoder encodes images; data.source=toy2d has points.')
  if mode == 'eval' and config.eval.bpd_num_examples:
    raise ValueError(f'eval.bpd_num_examples={config.eval.bpd_num_examples}: bits/dim of a '
                     'latent run would be those of its latents, not of images; set it to 0 '
                     '(FID/KID are measured on decoded images).')
  clip = config.sampling.clip_x0
  if clip and clip < 4 and mode in ('train', 'sample', 'eval'):
    raise ValueError(f'sampling.clip_x0={clip} clips the data prediction to the range of '
                     'images; a latent run\'s data are latents of unit standard deviation, '
                     'which reach beyond it: set --config.sampling.clip_x0=0.')
  data = ml_collections.ConfigDict(config.data.to_dict())
  data.image_size, data.channels = shape[0], shape[-1]
  return data


def _validate_editing(config) -> None:
  """Inpainting, image-to-image and autoguidance: what they combine with (the tables build the
  rest: a resampling sampler, a strength that keeps no step)."""
  samp = config.sampling
  edits = [f for f in ('inpaint_image', 'init_image') if samp[f]]
  if edits and config.data.source == 'toy2d':
    raise ValueError(f'sampling.{edits[0]} edits images; data.source=toy2d has points.')
  if len(edits) == 2:
    raise ValueError('sampling.inpaint_image and sampling.init_image are both set: inpainting '
                     'and image-to-image are separate runs; keep one.')
  if edits and samp.sampler == ode.SAMPLER:
    raise ValueError(f'sampling.{edits[0]} runs on the sampler tables; sampling.sampler=adaptive '
                     'solves the ODE without them: choose another sampler.')


def validate_labels(config, num_classes: int) -> None:
  """sampling.label against the run's classes (known once the task is built: data.num_classes
  may be 0, "read from the data"): a label of num_classes or more would ask the network for a
  class it has no row for (the "no label" row, or past the table: NaN samples)."""
  label = config.sampling.label
  if num_classes and label >= num_classes:
    raise ValueError(f'sampling.label={label} is beyond the run\'s {num_classes} classes: give '
                     f'a class in [0, {num_classes - 1}], or -1 for the classes in turn.')


def check_command_line(config, mode: str, given: dict, defaults=None) -> None:
  """Every field in its domain, and the settings given on the command line ({'group.field':
  value}, those that change the config file's value) of use to the run unless they are the
  default in `defaults` (`config_fields.check_applies`)."""
  config_fields.check_domains(config)
  config_fields.check_applies(config, mode, given, defaults)


def explain_start_error(error: BaseException, argv: list[str]) -> str:
  """One line for a failure to read the command line or the config file, naming the flag or
  the file and the fix (the traceback is for --traceback)."""
  args = dict(arg[2:].partition('=')[::2] for arg in argv[1:] if arg.startswith('--'))
  config_file = args.get('config', '').split(':')[0]
  text = str(error).strip()
  first = text.splitlines()[0] if text else type(error).__name__
  if 'config' not in args or 'Flag --config must have a value' in text:
    return '--config is required: pass a config file, e.g. --config=configs/digits.py.'
  if config_file and not os.path.isfile(config_file):
    return (f'--config={config_file}: no such file; pass a config file, e.g. '
            '--config=configs/digits.py (paths are relative to the current directory).')
  overrides = {key[len('config.'):]: value for key, value in args.items()
               if key.startswith('config.')}
  for path, value in overrides.items():
    if path not in config_fields.FIELDS:
      return f'--config.{path}: {config_fields.unknown_field_error(path)}'
    if f'--config.{path}={value}' in text:  # a value the field's type cannot take
      return (f'--config.{path}={value}: {first.split(": ", 1)[-1]}; give '
              f'{config_fields.FIELDS[path].domain()}.')
  causes = _causes(error)
  # The exception raised in the config file, or else the one the chain began with.
  cause, where = next(((e, _line_in(e, config_file)) for e in reversed(causes)
                       if _line_in(e, config_file)), (causes[-1], None))
  if where or cause is not error:
    message = str(cause).strip().splitlines()[0] if str(cause).strip() else ''
    return (f'--config={config_file}{f", line {where}" if where else ""}: '
            f'{type(cause).__name__}: {message}; fix the file (--traceback shows the whole '
            'traceback).')
  return f'{first.removeprefix("FATAL Flags parsing error: ")} (--traceback shows more).'


def _causes(error: BaseException) -> list[BaseException]:
  """error, the exception it was raised from, and so on: the last is where it began."""
  chain = [error]
  while (chain[-1].__cause__ or chain[-1].__context__) is not None and len(chain) < 10:
    chain.append(chain[-1].__cause__ or chain[-1].__context__)
  return chain


def _line_in(error: BaseException, path: str) -> int | None:
  """The line of `path` where `error` was raised (a SyntaxError's own line), or None."""
  def same(filename):
    return filename and os.path.exists(filename) and os.path.samefile(filename, path)
  if not path:
    return None
  if isinstance(error, SyntaxError) and same(error.filename):
    return error.lineno
  lines = [frame.lineno for frame in traceback.extract_tb(error.__traceback__)
           if same(frame.filename)]
  return lines[-1] if lines else None


def _validate_diffusion(diff) -> None:
  if diff.process == 'vp':
    _choice(diff.schedule, processes.VP_SCHEDULES, 'diffusion.schedule')
  else:
    _choice(diff.schedule, schedules.SCHEDULES, 'diffusion.schedule')
    schedules.kwargs_from_config(diff)  # names unknown or malformed diffusion.schedule_kwargs


def _validate_training(train, num_devices: int) -> None:
  per_call = train.batch_size
  if per_call % num_devices:
    raise ValueError(f'training.batch_size={per_call} (global) must be a positive multiple of '
                     f'the {num_devices} devices; try --config.training.batch_size='
                     f'{max(1, round(per_call / num_devices)) * num_devices}.')
  every = {'log_every': train.log_every, 'checkpoint_every': train.checkpoint_every}
  if train.phema_sigma_rels:
    every['phema_snapshot_every'] = train.phema_snapshot_every
    if len(set(train.phema_sigma_rels)) != len(train.phema_sigma_rels):
      raise ValueError(f'training.phema_sigma_rels={tuple(train.phema_sigma_rels)} lists a width '
                       'twice.')
  for field, steps in every.items():
    if steps % train.steps_per_call:
      raise ValueError(f'training.{field}={steps} must be a multiple of '
                       f'training.steps_per_call={train.steps_per_call}.')


def _validate_model(data, model) -> None:
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
  if model.get('attention', 'auto') == 'cudnn' and jax.default_backend() != 'gpu':
    raise ValueError(f'model.attention=cudnn runs on NVIDIA GPUs only, not on '
                     f'{jax.default_backend()}; use auto (it picks cuDNN where it can).')


def _validate_sampling(samp, process, preview: bool) -> None:
  """The settings of the sampler that runs: the training previews' (sampling.preview_sampler,
  .preview_steps) or the one of --mode=sample/eval (sampling.sampler, .num_steps)."""
  sampler, steps = ('preview_sampler', 'preview_steps') if preview else ('sampler', 'num_steps')
  if samp[sampler] == 'ddpm' and not process.discrete:
    raise ValueError(f'sampling.{sampler}=ddpm runs the T steps of the discrete chain, which '
                     f'diffusion.process={process.name} has not; use ddim with sampling.eta=1 '
                     '(ancestral steps) or euler_maruyama.')
  if process.discrete and samp[sampler] not in ('ddpm', ode.SAMPLER) and (
      samp[steps] > process.num_timesteps):
    raise ValueError(f'sampling.{steps}={samp[steps]} must lie in '
                     f'[1, diffusion.num_timesteps={process.num_timesteps}].')
  if not process.discrete and samp.spacing not in timesteps.CONTINUOUS_SPACINGS:
    raise ValueError(f'sampling.spacing={samp.spacing!r} picks integer timesteps of the ddpm '
                     f'process; on diffusion.process={process.name} choose one of '
                     f'{timesteps.CONTINUOUS_SPACINGS}.')
  if samp.s_tmin > samp.s_tmax:
    raise ValueError(f'sampling.s_tmin={samp.s_tmin} and .s_tmax={samp.s_tmax}: need s_tmin <= '
                     's_tmax (EDM: 0.05 and 50 on ImageNet).')
  interval = tuple(samp.guidance_interval)
  if interval and not interval[0] < interval[1]:
    raise ValueError(f'sampling.guidance_interval={interval} must be () (everywhere) or '
                     '(lo, hi) with 0 <= lo < hi, noise levels sigma~ (EDM2: (0.28, 2.9)).')
