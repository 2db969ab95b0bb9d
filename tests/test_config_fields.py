"""The table of every config field: it covers configs/default.py, every field refuses values
outside its domain in one line naming it, and overrides the run cannot use are refused."""

import glob
import math
import os

import ml_collections
import pytest

from configs import default
from diffusion_jax import config_checks, config_fields, run_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIELDS = config_fields.FIELDS


def loose(config) -> ml_collections.ConfigDict:
  """A copy that takes values of any type, as a hand-edited config.json or config file can."""
  return ml_collections.ConfigDict(config.to_dict(), type_safe=False)


def set_field(config, path, value):
  group, _, name = path.partition('.')
  config[group][name] = value


def out_of_domain(field: config_fields.Field) -> list:
  """Values outside the field's domain: a wrong type, out of range, an unknown choice, a wrong
  length."""
  element = field.kind[0] if isinstance(field.kind, tuple) else field.kind
  wrong_type = {bool: 'yes', str: 3, int: 'three', float: 'x'}[element]
  scalars = [wrong_type]
  if element is int:
    scalars.append(1.5)
  if field.choices is not None:
    scalars.append('no_such_choice' if element is str else max(field.choices) + 7)
  if field.lo is not None:
    scalars.append(field.lo if field.lo_open else field.lo - 1)
  if field.hi is not None:
    scalars.append(field.hi if field.hi_open else field.hi + 1)
  if element is float:
    scalars.append(math.nan)
  if not isinstance(field.kind, tuple):
    return scalars
  tuples = [5] + [(v,) for v in scalars]
  if field.lengths:
    good = field.lo if field.lo is not None else 1
    tuples.append((good,) * (max(field.lengths) + 1))
  return tuples


def test_the_table_has_every_field_of_default_py_and_their_defaults():
  fields = {f'{g}.{n}' for g, group in default.get_config().items() for n in group}
  assert set(FIELDS) == fields
  config_fields.check_domains(default.get_config())


@pytest.mark.parametrize('path', sorted(glob.glob(os.path.join(ROOT, 'configs', '*.py'))))
def test_every_shipped_config_lies_in_the_domains(path):
  if not path.endswith('__init__.py'):
    config_fields.check_domains(run_config.config_from_file(path))


@pytest.mark.parametrize('mode', ['train', 'sample'])
def test_every_field_refuses_values_outside_its_domain_naming_itself(mode):
  base = loose(default.get_config())
  config_checks.validate(base, num_devices=1, mode=mode)  # the defaults pass
  checked = 0
  for path, field in FIELDS.items():
    for value in out_of_domain(field):
      config = loose(base)
      set_field(config, path, value)
      with pytest.raises(ValueError) as info:
        config_checks.validate(config, num_devices=1, mode=mode)
      message = str(info.value)
      assert path in message and '\n' not in message, (path, value, message)
      checked += 1
  assert checked > 2 * len(FIELDS)  # two or more values per field


def test_an_unknown_field_is_named_with_the_closest_one():
  config = loose(default.get_config())
  config.training.learing_rate = 1e-3
  with pytest.raises(ValueError, match=r'training\.learing_rate is not a setting.*did you mean '
                     r'training\.learning_rate'):
    config_checks.validate(config, num_devices=1)


def test_domains_in_words():
  assert FIELDS['sampling.eta'].domain() == 'a number in [0, 1]'
  assert FIELDS['training.ema_decay'].domain() == 'a number in [0, 1)'
  assert FIELDS['sampling.guidance_interval'].domain() == 'a tuple of 0 or 2 numbers >= 0'
  assert FIELDS['training.learning_rate'].domain() == 'a number > 0'
  assert FIELDS['sampling.solver_order'].domain() == 'one of (1, 2, 3)'
  assert FIELDS['sampling.s_tmax'].problem(math.inf) is None  # EDM's default S_tmax


def unconditional_toy():
  config = run_config.config_from_file(os.path.join(ROOT, 'configs', 'toy2d.py'))
  config.training.sample_every = 0
  return config


def test_overrides_the_run_cannot_use_are_refused():
  config = unconditional_toy()  # dpm_solver++, no classes, MLP, toy2d, ddpm process
  refused = {
      'sampling.guidance_scale': 'data.class_conditional',
      'sampling.label': 'data.class_conditional',
      'sampling.eta': 'sampling.sampler=ddim',
      'sampling.s_churn': 'sampling.sampler=edm',
      'model.channels': 'model.architecture=unet',
      'model.patch_size': 'model.architecture=dit',
      'data.splits': 'data.source=tfds',
      'diffusion.sigma_max': 'diffusion.process=edm',
      'training.logit_normal_std': 'training.time_sampling=logit_normal',
  }
  for mode in ('train', 'sample'):
    for path, needs in refused.items():
      with pytest.raises(ValueError) as info:
        config_checks.check_command_line(config, mode, {path: 2})
      message = str(info.value)
      assert message.startswith(f'--config.{path}=2: ') and needs in message, message
      assert '\n' not in message


def test_overrides_the_run_uses_pass_in_every_mode():
  config = unconditional_toy()
  given = {'sampling.solver_order': 3, 'sampling.stochastic': True, 'sampling.num_steps': 7,
           'training.num_steps': 10, 'model.hidden': 64, 'data.num_points': 500,
           'sampling.num_samples': 5}
  for mode in config_fields.MODES:  # settings of another mode of the same run pass
    config_checks.check_command_line(config, mode, given)
  # With previews on, an option of the previews' sampler applies in training only.
  config.training.sample_every = 10
  config.sampling.preview_sampler = 'ddim'
  config_checks.check_command_line(config, 'train', {'sampling.eta': 0.5})
  with pytest.raises(ValueError, match='read only with sampling.sampler=ddim'):
    config_checks.check_command_line(config, 'sample', {'sampling.eta': 0.5})


def test_an_override_to_the_default_asks_for_nothing_and_passes():
  config = unconditional_toy()
  given = {'sampling.guidance_scale': 1.0, 'sampling.stochastic': False, 'sampling.eta': 0.0,
           'model.channels': 128}
  config_checks.check_command_line(config, 'sample', given, defaults=default.get_config())
  with pytest.raises(ValueError, match='sampling.guidance_scale'):
    config_checks.check_command_line(config, 'sample', {'sampling.guidance_scale': 2.0},
                                     defaults=default.get_config())


def test_a_dit_preset_makes_its_size_fields_inapplicable():
  config = run_config.config_from_file(os.path.join(ROOT, 'configs', 'flowers_dit.py'))
  assert config.model.preset
  with pytest.raises(ValueError, match="model.preset=''"):
    config_checks.check_command_line(config, 'train', {'model.hidden': 256})
  config.model.preset = ''
  config_checks.check_command_line(config, 'train', {'model.hidden': 256})


def test_an_override_equal_to_the_files_value_is_not_a_change():
  path = os.path.join(ROOT, 'configs', 'digits.py')
  own = run_config.config_from_file(path)
  changed = run_config.changed_overrides(path, {
      'sampling.sampler': own.sampling.sampler, 'model.channel_mult': tuple(
          own.model.channel_mult), 'sampling.eta': own.sampling.eta + 0.5})
  assert changed == {'sampling.eta': own.sampling.eta + 0.5}


def test_a_label_beyond_the_runs_classes_is_refused():
  config = default.get_config()
  config.sampling.label = 10
  with pytest.raises(ValueError, match=r'sampling\.label=10 is beyond the run\'s 10 classes'):
    config_checks.validate_labels(config, num_classes=10)
  config.sampling.label = 9
  config_checks.validate_labels(config, num_classes=10)


def test_the_docs_show_the_current_table():
  with open(os.path.join(ROOT, 'docs', 'configuration.md'), encoding='utf-8') as f:
    page = f.read()
  assert config_fields.markdown_table() in page, (
      'docs/configuration.md is out of date: print the table again with '
      '`python -m diffusion_jax.config_fields`')
