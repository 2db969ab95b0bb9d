"""Every config field's domain and where it applies, as data: one `Field` per field of
`configs/default.py`.

A field has a kind (int, float, bool, str, or a tuple of ints or floats), a domain (a range, a
set of choices, a length), the modes that read it, and the conditions under which they do (the
sampler that runs, the process, the architecture, the data source, whether the run has classes).

Two checks use the table:
- `check_domains(config)`: every field of a config, whatever its source, lies in its domain; an
  unknown field (a typo in a config file) is named with the closest known ones.
- `check_applies(config, mode, given)`: **a setting given on the command line that the run
  cannot use is refused** with one line naming it, what it is read with, and the fix (an option
  of a sampler the run does not use, guidance on a run without classes, a U-Net field of a
  DiT). Not refused: settings of the run's other modes, values from a config file, and
  overrides equal to the value they replace or to the field's default (docs/configuration.md).
"""

from __future__ import annotations

import difflib

from diffusion_jax import (autoencoding, diffusion, models, objectives, ode, phema, posthoc_ema,
                           processes, run_config, schedules, sources, step_tables, timesteps)
from diffusion_jax.field_rules import Condition, Field, Run, both, either, is_set, when
from diffusion_jax.models import attention, dit

MODES = ('train', 'sample', 'eval', 'summary')
PREVIEW = 'preview'  # read by training's preview samples (training.sample_every > 0)


ALL = MODES
NETWORK = MODES  # what the network is: every mode builds it
LOADING = ('train', 'eval')  # reading the data set
TRAINING = ('train', 'summary')
SAMPLING = ('sample', 'eval', PREVIEW)

TFDS = when('data.source', 'tfds')
IMAGES = when('data.source', 'tfds', 'folder', 'npz', 'digits')
UNET, DIT, MLP = (when('model.architecture', a) for a in ('unet', 'dit', 'mlp'))
DIT_SIZED_BY_FIELDS = both(DIT, when('model.preset', ''))
CONDITIONAL = is_set('data.class_conditional', 'a class-conditional run (data.class_conditional)')
SAMPLERS = step_tables.SAMPLERS + (ode.SAMPLER,)  # the tables, and the adaptive ODE solve
STEPPED = tuple(s for s in step_tables.SAMPLERS if s != 'ddpm')  # ddpm runs all T steps
NOT_DDPM = when('sampler', *STEPPED)
AUTOGUIDED = is_set('sampling.guide', 'autoguidance (sampling.guide)')
GUIDED = either(CONDITIONAL, AUTOGUIDED)
INPAINT = is_set('sampling.inpaint_image', 'inpainting (sampling.inpaint_image)')
IMG2IMG = is_set('sampling.init_image', 'image-to-image (sampling.init_image)')
PHEMA = is_set('training.phema_sigma_rels', 'post-hoc EMA (training.phema_sigma_rels)')
FID = is_set('eval.inception_path', 'FID (eval.inception_path)')
BPD = Condition(lambda run: run.config.eval.bpd_num_examples > 0,
                'bits/dim (eval.bpd_num_examples > 0)')
ODE_BPD = is_set('eval.ode_bpd', 'the ODE\'s bits/dim (eval.ode_bpd)')
INT, POSITIVE_INT = dict(kind=int), dict(kind=int, lo=1)
MEANFLOW = when('training.objective', 'meanflow')
SHORTCUT = when('training.objective', 'shortcut')
CONSISTENCY = when('training.objective', 'consistency')
POSITIVE = dict(kind=float, lo=0.0, lo_open=True)
AUTOENCODER = when('model.architecture', 'autoencoder')
DENOISER = when('model.architecture', 'unet', 'dit')
LATENT = both(DENOISER, is_set('latent.autoencoder',
                                                'latent diffusion (latent.autoencoder)'))
FRACTION = dict(kind=float, lo=0.0, hi=1.0, hi_open=True)  # [0, 1)

FIELDS = {
    'data.source': Field(str, ALL, choices=sources.SOURCES),
    'data.name': Field(str, ALL, needs=(when('data.source', 'tfds', 'toy2d'),)),
    'data.splits': Field(str, LOADING, needs=(TFDS,)),
    'data.eval_splits': Field(str, ('eval',), needs=(TFDS,)),
    'data.data_dir': Field(str, ALL, needs=(TFDS,)),
    'data.download': Field(bool, LOADING, needs=(TFDS,)),
    'data.path': Field(str, ALL, needs=(when('data.source', 'folder', 'npz'),)),
    'data.image_size': Field(read_by=ALL, needs=(IMAGES,), **POSITIVE_INT),
    'data.channels': Field(read_by=ALL, needs=(IMAGES,), **POSITIVE_INT),
    'data.random_flip': Field(bool, ('train',), needs=(IMAGES,)),
    'data.class_conditional': Field(bool, ALL),
    'data.num_classes': Field(read_by=ALL, lo=0, needs=(CONDITIONAL,), **INT),
    'data.num_points': Field(read_by=('train',), needs=(when('data.source', 'toy2d'),),
                             **POSITIVE_INT),
    'data.num_threads': Field(read_by=LOADING, lo=0, **INT),
    'data.num_workers': Field(read_by=LOADING, lo=0, **INT),
    'data.prefetch': Field(read_by=('train',), lo=0, **INT),
    'data.check_images': Field(bool, LOADING, needs=(when('data.source', 'folder'),)),

    'autoencoder.block_out_channels': Field((int,), NETWORK, lo=1, lengths=tuple(range(1, 8)),
                                            needs=(AUTOENCODER,)),
    'autoencoder.layers_per_block': Field(read_by=NETWORK, needs=(AUTOENCODER,), **POSITIVE_INT),
    'autoencoder.latent_channels': Field(read_by=NETWORK, needs=(AUTOENCODER,), **POSITIVE_INT),
    'autoencoder.num_groups': Field(read_by=NETWORK, needs=(AUTOENCODER,), **POSITIVE_INT),
    'autoencoder.loss': Field(str, TRAINING, choices=autoencoding.LOSSES, needs=(AUTOENCODER,)),
    'autoencoder.kl_weight': Field(float, TRAINING, lo=0.0, needs=(AUTOENCODER,)),
    'latent.autoencoder': Field(str, ALL, needs=(DENOISER,)),
    'latent.autoencoder_step': Field(read_by=ALL, lo=-1, needs=(LATENT,), **INT),
    'latent.scale': Field(float, ALL, lo=0.0, needs=(LATENT,)),
    'latent.fingerprint': Field(str, ALL, needs=(LATENT,)),
    'model.architecture': Field(str, NETWORK, choices=models.ARCHITECTURES),
    'model.channels': Field(read_by=NETWORK, needs=(UNET,), **POSITIVE_INT),
    'model.channel_mult': Field((int,), NETWORK, lo=1, lengths=tuple(range(1, 9)),
                                needs=(UNET,)),
    'model.num_res_blocks': Field(read_by=NETWORK, needs=(UNET,), **POSITIVE_INT),
    'model.attention_resolutions': Field((int,), NETWORK, lo=1, needs=(UNET,)),
    'model.num_heads': Field(read_by=NETWORK, needs=(either(UNET, DIT_SIZED_BY_FIELDS),),
                             **POSITIVE_INT),
    'model.head_dim': Field(read_by=NETWORK, lo=0, needs=(UNET,), **INT),
    'model.dropout': Field(read_by=NETWORK, needs=(UNET,), **FRACTION),
    'model.scale_shift': Field(bool, NETWORK, needs=(UNET,)),
    'model.num_groups': Field(read_by=NETWORK, needs=(UNET,), **POSITIVE_INT),
    'model.dtype': Field(str, NETWORK, choices=('float32', 'bfloat16')),
    'model.attention': Field(str, NETWORK, choices=attention.IMPLEMENTATIONS,
                             needs=(either(UNET, DIT),)),
    'model.hidden': Field(read_by=NETWORK, needs=(either(MLP, DIT_SIZED_BY_FIELDS),),
                          **POSITIVE_INT),
    'model.num_layers': Field(read_by=NETWORK, needs=(either(MLP, DIT_SIZED_BY_FIELDS),),
                              **POSITIVE_INT),
    'model.preset': Field(str, NETWORK, choices=('',) + tuple(dit.PRESETS), needs=(DIT,)),
    'model.patch_size': Field(read_by=NETWORK, needs=(DIT,), **POSITIVE_INT),
    'model.mlp_ratio': Field(read_by=NETWORK, needs=(DIT,), **POSITIVE),
    'model.qk_norm': Field(bool, NETWORK, needs=(DIT,)),
    'model.rope': Field(bool, NETWORK, needs=(DIT,)),
    'model.interval_embedding': Field(bool, NETWORK),

    'diffusion.process': Field(str, NETWORK, choices=processes.PROCESSES),
    'diffusion.schedule': Field(str, NETWORK, choices=tuple(dict.fromkeys(
        schedules.SCHEDULES + processes.VP_SCHEDULES)), needs=(when('diffusion.process', 'ddpm',
                                                                    'vp'),)),
    'diffusion.schedule_kwargs': Field(str, NETWORK, needs=(when('diffusion.process', 'ddpm'),)),
    'diffusion.num_timesteps': Field(read_by=NETWORK, lo=2, needs=(
        when('diffusion.process', 'ddpm'),), **INT),
    'diffusion.sigma_min': Field(read_by=NETWORK, needs=(when('diffusion.process', 'edm'),),
                                 **POSITIVE),
    'diffusion.sigma_max': Field(read_by=NETWORK, needs=(when('diffusion.process', 'edm'),),
                                 **POSITIVE),
    'diffusion.sigma_data': Field(read_by=NETWORK, **POSITIVE),
    'diffusion.prediction_type': Field(str, NETWORK, choices=diffusion.PREDICTION_TYPES),
    'diffusion.loss': Field(str, TRAINING, choices=diffusion.LOSS_TYPES),
    'diffusion.loss_weighting': Field(str, TRAINING, choices=diffusion.LOSS_WEIGHTINGS),
    'diffusion.min_snr_gamma': Field(read_by=TRAINING, needs=(
        when('diffusion.loss_weighting', 'min_snr'),), **POSITIVE),
    'diffusion.sigmoid_bias': Field(float, TRAINING, needs=(
        when('diffusion.loss_weighting', 'sigmoid'),)),

    'training.batch_size': Field(read_by=TRAINING, **POSITIVE_INT),
    'training.num_steps': Field(read_by=TRAINING, **POSITIVE_INT),
    'training.learning_rate': Field(read_by=TRAINING, **POSITIVE),
    'training.lr_schedule': Field(str, TRAINING, choices=('constant', 'cosine')),
    'training.warmup_steps': Field(read_by=TRAINING, lo=0, **INT),
    'training.b1': Field(read_by=TRAINING, **FRACTION),
    'training.b2': Field(read_by=TRAINING, **FRACTION),
    'training.eps': Field(read_by=TRAINING, **POSITIVE),
    'training.weight_decay': Field(float, TRAINING, lo=0.0),
    'training.grad_clip': Field(float, TRAINING, lo=0.0),
    'training.ema_decay': Field(read_by=TRAINING, **FRACTION),
    'training.ema_warmup': Field(bool, TRAINING),
    'training.phema_sigma_rels': Field((float,), TRAINING, lo=0.0, lo_open=True,
                                       hi=phema.MAX_SIGMA_REL),
    'training.phema_snapshot_every': Field(read_by=TRAINING, needs=(PHEMA,), **POSITIVE_INT),
    'training.phema_dtype': Field(str, TRAINING, choices=tuple(posthoc_ema.DTYPES),
                                  needs=(PHEMA,)),
    'training.label_dropout': Field(float, TRAINING, lo=0.0, hi=1.0, needs=(CONDITIONAL,)),
    'training.seed': Field(int, TRAINING),
    'training.time_sampling': Field(str, TRAINING, choices=processes.TIME_SAMPLINGS),
    'training.logit_normal_mean': Field(float, TRAINING, needs=(
        when('training.time_sampling', 'logit_normal'),)),
    'training.logit_normal_std': Field(read_by=TRAINING, needs=(
        when('training.time_sampling', 'logit_normal'),), **POSITIVE),
    'training.lognormal_mean': Field(float, TRAINING, needs=(
        when('training.time_sampling', 'lognormal'),)),
    'training.lognormal_std': Field(read_by=TRAINING, needs=(
        when('training.time_sampling', 'lognormal'),), **POSITIVE),
    'training.time_shift': Field(read_by=TRAINING, **POSITIVE),
    'training.steps_per_call': Field(read_by=TRAINING, **POSITIVE_INT),
    'training.objective': Field(str, TRAINING, choices=objectives.OBJECTIVES),
    'training.meanflow_ratio': Field(float, TRAINING, lo=0.0, hi=1.0, needs=(MEANFLOW,)),
    'training.meanflow_weight_power': Field(float, TRAINING, lo=0.0, needs=(MEANFLOW,)),
    'training.meanflow_guidance': Field(float, TRAINING, lo=1.0, needs=(MEANFLOW, CONDITIONAL)),
    'training.shortcut_ratio': Field(float, TRAINING, lo=0.0, hi=1.0, needs=(SHORTCUT,)),
    'training.shortcut_max_steps': Field(int, TRAINING, choices=tuple(2 ** k for k in range(1, 13)),
                                         needs=(SHORTCUT,)),
    'training.consistency_schedule': Field(str, TRAINING, choices=objectives.CONSISTENCY_SCHEDULES,
                                           needs=(CONSISTENCY,)),
    'training.consistency_stages': Field(read_by=TRAINING, needs=(CONSISTENCY,), **POSITIVE_INT),
    'training.consistency_q': Field(float, TRAINING, lo=1.0, lo_open=True, needs=(
        CONSISTENCY, when('training.consistency_schedule', 'ect'))),
    'training.consistency_huber_c': Field(float, TRAINING, lo=0.0, needs=(CONSISTENCY,)),
    'training.init_from': Field(str, ('train',)),
    'training.log_every': Field(read_by=('train',), **POSITIVE_INT),
    'training.sample_every': Field(read_by=('train',), lo=0, **INT),
    'training.checkpoint_every': Field(read_by=('train',), **POSITIVE_INT),
    'training.keep_checkpoints': Field(read_by=('train',), **POSITIVE_INT),

    'sampling.sampler': Field(str, ('sample', 'eval'), choices=SAMPLERS),
    'sampling.num_steps': Field(read_by=('sample', 'eval'), needs=(
        when('sampling.sampler', *STEPPED),), **POSITIVE_INT),
    'sampling.eta': Field(float, SAMPLING, lo=0.0, hi=1.0, needs=(when('sampler', 'ddim'),)),
    'sampling.solver_order': Field(int, SAMPLING, choices=tuple(
        range(1, step_tables.MAX_ORDER + 1)), needs=(when('sampler', 'dpm_solver++', 'unipc'),)),
    'sampling.stochastic': Field(bool, SAMPLING, needs=(when('sampler', 'dpm_solver++'),)),
    'sampling.spacing': Field(str, SAMPLING, choices=timesteps.SPACINGS, needs=(NOT_DDPM,)),
    'sampling.time_shift': Field(read_by=SAMPLING, needs=(NOT_DDPM, when('sampling.spacing',
                                                                         'shifted')),
                                 **POSITIVE),
    'sampling.rtol': Field(read_by=SAMPLING, needs=(when('sampler', ode.SAMPLER),), **POSITIVE),
    'sampling.atol': Field(read_by=SAMPLING, needs=(when('sampler', ode.SAMPLER),), **POSITIVE),
    'sampling.s_churn': Field(float, SAMPLING, lo=0.0, needs=(when('sampler', 'edm'),)),
    'sampling.s_tmin': Field(float, SAMPLING, lo=0.0, needs=(when('sampler', 'edm'),)),
    'sampling.s_tmax': Field(float, SAMPLING, lo=0.0, needs=(when('sampler', 'edm'),)),
    'sampling.s_noise': Field(read_by=SAMPLING, needs=(when('sampler', 'edm'),), **POSITIVE),
    'sampling.variance': Field(str, SAMPLING, choices=('small', 'large'),
                               needs=(either(when('sampler', 'ddpm'), BPD),)),
    'sampling.clip_x0': Field(float, SAMPLING, lo=0.0),
    'sampling.guidance_scale': Field(float, SAMPLING, lo=0.0, needs=(GUIDED,)),
    'sampling.guidance_interval': Field((float,), SAMPLING, lo=0.0, lengths=(0, 2),
                                        needs=(GUIDED,)),
    'sampling.guide': Field(str, ('sample',)),
    'sampling.guide_checkpoint_step': Field(read_by=('sample',), lo=-1, needs=(AUTOGUIDED,),
                                            **INT),
    'sampling.inpaint_image': Field(str, ('sample',), needs=(IMAGES,)),
    'sampling.inpaint_mask': Field(str, ('sample',), needs=(INPAINT,)),
    'sampling.inpaint_resample': Field((int,), ('sample',), lo=0, lengths=(2,), needs=(INPAINT,)),
    'sampling.init_image': Field(str, ('sample',), needs=(IMAGES,)),
    'sampling.strength': Field(float, ('sample',), lo=0.0, lo_open=True, hi=1.0,
                               needs=(IMG2IMG,)),
    'sampling.label': Field(read_by=SAMPLING, lo=-1, needs=(CONDITIONAL,), **INT),
    'sampling.num_samples': Field(read_by=('sample',), **POSITIVE_INT),
    'sampling.batch_size': Field(read_by=SAMPLING, **POSITIVE_INT),
    'sampling.seed': Field(int, SAMPLING),
    'sampling.checkpoint_step': Field(read_by=('sample', 'eval'), lo=-1, **INT),
    'sampling.ema_sigma_rel': Field(float, ('sample', 'eval'), lo=0.0, hi=phema.MAX_SIGMA_REL),
    'sampling.trajectory': Field(bool, ('sample',)),
    'sampling.preview_samples': Field(read_by=(PREVIEW,), **POSITIVE_INT),
    'sampling.preview_sampler': Field(str, (PREVIEW,), choices=SAMPLERS),
    'sampling.preview_steps': Field(read_by=(PREVIEW,), needs=(
        when('sampling.preview_sampler', *STEPPED),), **POSITIVE_INT),

    'parallel.fsdp': Field(read_by=TRAINING, **POSITIVE_INT),

    'eval.num_samples': Field(read_by=('eval',), needs=(FID,), **POSITIVE_INT),
    'eval.inception_path': Field(str, ('eval',)),
    'eval.reference_stats': Field(str, ('eval',), needs=(FID,)),
    'eval.num_reference': Field(read_by=('eval',), needs=(FID,), **POSITIVE_INT),
    'eval.bpd_num_examples': Field(read_by=('eval',), lo=0, **INT),
    'eval.bpd_batch_size': Field(read_by=('eval',), needs=(BPD,), **POSITIVE_INT),
    'eval.ode_bpd': Field(bool, ('eval',), needs=(BPD,)),
    'eval.ode_probes': Field(read_by=('eval',), lo=0, needs=(BPD, ODE_BPD), **INT),
    'eval.ode_probe_kind': Field(str, ('eval',), choices=ode.PROBES, needs=(BPD, ODE_BPD)),
    'eval.ode_rtol': Field(read_by=('eval',), needs=(BPD, ODE_BPD), **POSITIVE),
    'eval.ode_atol': Field(read_by=('eval',), needs=(BPD, ODE_BPD), **POSITIVE),
    'eval.inception_batch_size': Field(read_by=('eval',), needs=(FID,), **POSITIVE_INT),
    'eval.kid_subset_size': Field(read_by=('eval',), needs=(FID,), **POSITIVE_INT),
    'eval.kid_num_subsets': Field(read_by=('eval',), needs=(FID,), **POSITIVE_INT),
    'eval.psnr_num_examples': Field(read_by=('eval',), needs=(AUTOENCODER,), **POSITIVE_INT),
}


def unknown_field_error(path: str) -> ValueError:
  close = difflib.get_close_matches(path, FIELDS, n=2, cutoff=0.8)
  hint = f' (did you mean {" or ".join(close)}?)' if close else ''
  return ValueError(f'{path} is not a setting{hint}; every field and its default are in '
                    'configs/default.py.')


def check_domains(config) -> None:
  """Raises ValueError, in one line naming the field, its value and its domain, for the first
  field outside its domain or not known at all."""
  for path, value in run_config.flat(config).items():
    field = FIELDS.get(path)
    if field is None:
      raise unknown_field_error(path)
    problem = field.problem(value)
    if problem:
      raise ValueError(f'{path}={value!r} is outside its domain ({problem}): it must be '
                       f'{field.domain()}.')


def applies(config, path: str, mode: str) -> bool:
  """Whether a run of `config` in `mode` uses the field `path`."""
  return all(c.holds(Run(config, mode)) for c in FIELDS[path].needs)


def check_applies(config, mode: str, given: dict, defaults=None) -> None:
  """Raises ValueError, in one line, for the first setting of `given` ({'group.field': value},
  the command line's overrides that change the config) that the run cannot use; a value equal
  to the field's default in `defaults` (configs/default.py's config) is never refused."""
  run = Run(config, mode)
  for path, value in given.items():
    field = FIELDS.get(path)
    if field is None:
      raise unknown_field_error(path)
    if defaults is not None and run_config.plain(value) == run_config.flat(defaults).get(path):
      continue
    unmet = [c.describe(run) for c in field.needs if not c.holds(run)]
    if unmet:
      raise ValueError(f'--config.{path}={value}: this run does not use {path}, which is read '
                       f'only with {"; ".join(unmet)}. Drop it, or change that setting too.')


def markdown_table() -> str:
  """Every field as a row of docs/configuration.md's table (`python -m
  diffusion_jax.config_fields` prints it; tests/test_config_fields.py keeps the page current)."""
  rows = ['| field | domain | read by | read only with |', '| --- | --- | --- | --- |']
  for path, field in FIELDS.items():
    modes = ', '.join('training previews' if m == PREVIEW else m for m in field.read_by)
    needs = '; '.join(c.text.format(sampler='the sampler') for c in field.needs)
    rows.append(f'| `{path}` | {field.domain()} | {modes} | {needs} |')
  return '\n'.join(rows) + '\n'


if __name__ == '__main__':
  print(markdown_table(), end='')
