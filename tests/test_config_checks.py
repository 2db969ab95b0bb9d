"""Bad config values fail at start-up with a message naming the field."""

import pytest

from diffusion_jax import config_checks
from tests.conftest import tiny_image_config, tiny_toy_config


@pytest.mark.parametrize('field,value,match', [
    ('diffusion.schedule', 'exponential', 'diffusion.schedule'),
    ('data.source', 'lmdb', 'data.source'),
    ('diffusion.prediction_type', 'score', 'diffusion.prediction_type'),
    ('diffusion.loss', 'huber', 'diffusion.loss'),
    ('sampling.sampler', 'dpm', 'sampling.sampler'),
    ('sampling.preview_sampler', 'lms', 'sampling.preview_sampler'),
    ('diffusion.process', 've', 'diffusion.process'),
    ('diffusion.loss_weighting', 'p2', 'diffusion.loss_weighting'),
    ('diffusion.sigma_data', 0.0, 'diffusion.sigma_data'),
    ('training.time_sampling', 'beta', 'training.time_sampling'),
    ('training.time_shift', 0.0, 'training.time_shift'),
    ('sampling.guidance_interval', (3.0, 1.0), 'sampling.guidance_interval'),
    ('sampling.s_churn', -1.0, 'sampling.s_churn'),
    ('sampling.time_shift', -3.0, 'sampling.time_shift'),
    ('sampling.spacing', 'cubic', 'sampling.spacing'),
    ('sampling.solver_order', 4, 'sampling.solver_order'),
    ('sampling.num_steps', 0, 'sampling.num_steps'),
    ('sampling.preview_steps', 1000, 'sampling.preview_steps'),
    ('sampling.ema_sigma_rel', 0.5, 'sampling.ema_sigma_rel'),
    ('model.dtype', 'float16', 'bfloat16'),
    ('diffusion.schedule_kwargs', 'beta_end=x', 'diffusion.schedule_kwargs'),
    ('training.phema_sigma_rels', (0.05, 0.5), 'training.phema_sigma_rels'),
    ('data.image_size', 9, 'data.image_size'),
    ('training.batch_size', 6, 'training.batch_size'),
    ('model.attention_resolutions', (16,), 'never reaches'),
    ('model.num_groups', 7, 'model.num_groups'),
    ('training.log_every', 3, 'training.log_every'),
])
def test_bad_value_names_its_field(field, value, match):
  config = tiny_image_config()
  group, name = field.split('.')
  if field == 'training.log_every':
    config.training.steps_per_call = 2
  if field.startswith('sampling.preview'):
    config.training.sample_every = 2  # preview settings are checked when there are previews
  mode = 'sample' if field.startswith('sampling.') and 'preview' not in field else 'train'
  config[group][name] = value
  with pytest.raises(ValueError, match=match):
    config_checks.validate(config, num_devices=4, mode=mode)


def test_each_mode_checks_what_it_uses():
  config = tiny_image_config()
  config.training.batch_size = 6  # trained on 2 or 6 devices, sampled on 4
  config_checks.validate(config, num_devices=4, mode='sample')
  with pytest.raises(ValueError, match='training.batch_size'):
    config_checks.validate(config, num_devices=4, mode='train')
  config = tiny_image_config()
  config.sampling.num_steps = 1000  # more than diffusion.num_timesteps: matters to sampling
  config_checks.validate(config, num_devices=4, mode='train')
  with pytest.raises(ValueError, match='sampling.num_steps'):
    config_checks.validate(config, num_devices=4, mode='eval')


def test_preview_settings_matter_only_with_previews():
  config = tiny_image_config()
  config.sampling.preview_steps = 1000  # more than diffusion.num_timesteps
  config_checks.validate(config, num_devices=4)  # sample_every = 0: no previews


def test_good_configs_pass():
  config_checks.validate(tiny_image_config(), num_devices=4)
  config_checks.validate(tiny_toy_config(), num_devices=4)


@pytest.mark.parametrize('name', ['default', 'flowers', 'flowers_keras', 'cifar10', 'digits',
                                  'digits_cond', 'toy2d', 'bench'])
def test_shipped_configs_are_valid(name):
  import importlib  # pylint: disable=g-import-not-at-top
  config = importlib.import_module(f'configs.{name}').get_config()
  config_checks.validate(config, num_devices=1)


def test_toy_data_need_the_mlp():
  config = tiny_toy_config()
  config.model.architecture = 'unet'
  with pytest.raises(ValueError, match='model.architecture=mlp'):
    config_checks.validate(config, num_devices=1)
  config = tiny_toy_config()
  config.data.name = 'spiral'
  with pytest.raises(ValueError, match='data.name'):
    config_checks.validate(config, num_devices=1)


@pytest.mark.parametrize('field,value,match', [
    ('sampling.sampler', 'ddpm', 'sampling.sampler=ddpm'),
    ('sampling.spacing', 'leading', 'sampling.spacing'),
    ('diffusion.schedule', 'offset_cosine', 'diffusion.schedule'),
])
def test_continuous_processes_refuse_what_only_the_discrete_chain_has(field, value, match):
  config = tiny_image_config()
  config.diffusion.process, config.diffusion.schedule = 'vp', 'cosine'
  config.sampling.spacing = 'karras'
  group, name = field.split('.')
  config[group][name] = value
  with pytest.raises(ValueError, match=match):
    config_checks.validate(config, 1, 'sample')


def test_min_snr_needs_its_gamma_and_bits_per_dim_of_a_continuous_process_need_the_ode():
  config = tiny_image_config()
  config.diffusion.loss_weighting, config.diffusion.min_snr_gamma = 'min_snr', 0.0
  with pytest.raises(ValueError, match='diffusion.min_snr_gamma'):
    config_checks.validate(config, 1, 'train')
  config = tiny_image_config()
  config.diffusion.process, config.sampling.spacing = 'flow', 'uniform'
  config.eval.bpd_num_examples = 4
  config_checks.validate(config, 1, 'eval')  # through the probability-flow ODE
  config.eval.ode_bpd = False  # the bound is of the discrete chain only
  with pytest.raises(ValueError, match='eval.ode_bpd=True'):
    config_checks.validate(config, 1, 'eval')
