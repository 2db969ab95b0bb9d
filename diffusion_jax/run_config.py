"""The config of a run, read back from `<workdir>/config.json` (local or gs://), or a config file.

Training writes the full config as JSON. Reading it back starts from `configs/default.py` (so
fields added since the run was written get their defaults) and overrides with the JSON values.
JSON has no tuples: a list becomes a tuple again, as every sequence field of the configs is one.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from typing import Any

from absl import logging
import jax
import ml_collections

from diffusion_jax import checkpointing, files

CONFIG_JSON = 'config.json'
_REPO_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                             'configs')


def config_from_file(path: str) -> ml_collections.ConfigDict:
  """`get_config()` of a config file such as configs/digits.py, imported by its path.

  The variant configs import `configs.default`, so the repository root must be importable:
  run from it, or have the repository checked out beside the installed package.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f'No config file at {path!r}; pass a file like configs/digits.py.')
  root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
  if root not in sys.path:  # so that `from configs import default` resolves
    sys.path.append(root)
  spec = importlib.util.spec_from_file_location(f'_config_{abs(hash(path))}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def default_config() -> ml_collections.ConfigDict | None:
  """configs/default.py of the checkout this package lives in, or None when there is none
  (an installed wheel ships the library only)."""
  path = os.path.join(_REPO_CONFIGS, 'default.py')
  return config_from_file(path) if os.path.isfile(path) else None


def _tuples(value: Any) -> Any:
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  return value


def _merge(base: dict, override: dict) -> dict:
  """`base` with the values of `override`, recursing into groups; lists become tuples."""
  out = dict(base)
  for key, value in override.items():
    if isinstance(value, dict) and isinstance(out.get(key), dict):
      out[key] = _merge(out[key], value)
    else:
      out[key] = _tuples(value)
  return out


def _migrate(values: dict) -> None:
  """Reads the config of a run written before diffusion.loss_weighting: there a positive
  diffusion.min_snr_gamma alone turned Min-SNR weighting on, and 0 turned it off. And before the
  Grain pipeline, whose global shuffle left tf.data's data.shuffle_buffer without a use."""
  data = values.get('data')
  if isinstance(data, dict):
    data.pop('shuffle_buffer', None)
  diff = values.get('diffusion')
  if isinstance(diff, dict) and 'loss_weighting' not in diff:
    if diff.get('min_snr_gamma'):
      diff['loss_weighting'] = 'min_snr'
    else:
      diff['loss_weighting'] = 'none'
      diff.pop('min_snr_gamma', None)  # 0 meant "off"; now the default of an unused field


def config_from_json(text: str) -> ml_collections.ConfigDict:
  """A ConfigDict from a run's config.json text, on top of configs/default.py when present."""
  values = json.loads(text)
  if not isinstance(values, dict):
    raise ValueError('config.json must hold a JSON object of config groups.')
  _migrate(values)
  base = default_config()
  if base is None:
    logging.info('configs/default.py not found: using config.json alone.')
  merged = _merge(base.to_dict() if base is not None else {}, values)
  return ml_collections.ConfigDict(merged)


def load_config(workdir: str, config_file: str | None = None) -> ml_collections.ConfigDict:
  """The run's config: `<workdir>/config.json` if it exists (`trained_config`), else
  `config_file`.

  workdir may be a local path or a cloud path such as gs://bucket/run (read with etils.epath).
  """
  config = trained_config(workdir)
  if config is not None:
    return config
  if not config_file:
    raise FileNotFoundError(f'No {CONFIG_JSON} in {workdir!r} (training writes it) and no config '
                            'file given; pass one such as configs/digits.py.')
  logging.info('No %s in %s: config from %s.', CONFIG_JSON, workdir, config_file)
  return config_from_file(config_file)


# --- a run's config against the one given now ---------------------------------------------------

HISTORY = 'config_history.jsonl'  # changes made when a run resumed, one JSON object per resume
FINISHED_JSON = 'finished.json'  # written when training reaches training.num_steps
# What the trained network is: these may not change when a run resumes or is sampled.
NETWORK_GROUPS = ('model', 'diffusion', 'autoencoder', 'latent')
# Fields of those groups that choose how the network is computed, not what it is (the attention
# kernel): a run resumes or samples with another, e.g. on another kind of device.
COMPUTE_FIELDS = ('model.attention',)
NETWORK_DATA_FIELDS = ('source', 'name', 'image_size', 'channels', 'class_conditional',
                       'num_classes')


def plain(value):
  """A config value as JSON holds it: sequences as lists."""
  return list(value) if isinstance(value, (tuple, list)) else value


def flat(config) -> dict:
  """{'group.field': value} of a ConfigDict or dict, sequences as lists (as JSON has them); a
  value outside the groups keeps its own name."""
  values = config.to_dict() if hasattr(config, 'to_dict') else dict(config)
  out = {}
  for group, fields in values.items():
    if isinstance(fields, dict):
      for name, value in fields.items():
        out[f'{group}.{name}'] = plain(value)
    else:
      out[group] = plain(fields)
  return out


def changed_overrides(config_file: str, overrides: dict) -> dict:
  """Of the command line's overrides ({'group.field': value}), those whose value differs from
  the config file's own: an override that repeats the file's value changes nothing."""
  own = flat(config_from_file(config_file))
  return {key: value for key, value in overrides.items()
          if key not in own or own[key] != plain(value)}


def is_network_field(key: str) -> bool:
  group, _, name = key.partition('.')
  if key in COMPUTE_FIELDS:
    return False
  return group in NETWORK_GROUPS or (group == 'data' and name in NETWORK_DATA_FIELDS)


def differences(trained, given, keys=None) -> dict:
  """{field: (trained value, given value)} where the two configs differ (fields either lacks
  are compared with None); only `keys` when given."""
  a, b = flat(trained), flat(given)
  keys = sorted(set(a) | set(b)) if keys is None else keys
  return {k: (a.get(k), b.get(k)) for k in keys if a.get(k) != b.get(k)}


def _refusal(what: str, workdir: str, diffs: dict, fix: str) -> ValueError:
  listed = '; '.join(f'{k}: trained {a!r}, given {b!r}' for k, (a, b) in diffs.items())
  return ValueError(f'{what} the network the run in {workdir} was trained with ({CONFIG_JSON}), '
                    f'but the config given differs in {listed}. {fix}')


def trained_config(workdir: str) -> ml_collections.ConfigDict | None:
  """`<workdir>/config.json` read back, or None when the run has none yet.

  A config.json that cannot be read (empty, cut short, not a JSON object) is rebuilt from the
  copy of the config that every checkpoint carries (the newest one that has it), with a warning;
  the unreadable file is kept as config.unreadable.json. Without such a copy (checkpoints
  written before they carried one), one error names the file and the fix.
  """
  from etils import epath  # pylint: disable=g-import-not-at-top  (ships with orbax)
  path = epath.Path(workdir) / CONFIG_JSON
  if not path.exists():
    return None
  try:
    text = path.read_text()
    config = config_from_json(text)
    logging.info('Config from %s.', path)
    return config
  except (ValueError, UnicodeDecodeError) as e:
    return _rebuilt_config(workdir, str(path), e)


def _rebuilt_config(workdir: str, path: str, error: Exception) -> ml_collections.ConfigDict:
  why = f'{type(error).__name__}: {str(error).splitlines()[0][:120] if str(error) else ""}'
  found = checkpointing.stored_config(workdir)
  if found is None:
    raise ValueError(
        f'{path} cannot be read ({why}) and no checkpoint in '
        f'{checkpointing.checkpoint_dir(workdir)} carries a copy of the config to rebuild it '
        f'from. Put back a copy of the run\'s config.json, or move it aside (mv {path} '
        f'{path}.unreadable) and give the config the run was trained with (--config=...): '
        'the checkpoint then tells whether the network matches.') from None
  step, values = found
  config = config_from_json(json.dumps(values))
  kept = ''
  if '://' not in workdir and jax.process_index() == 0:
    kept = files.move_aside(path, tag='unreadable')
    files.write_text(path, config.to_json_best_effort(indent=2))
  logging.warning('%s could not be read (%s); rebuilt it from the copy of the config in the '
                  'checkpoint of step %d%s. Changes made when the run resumed are listed in %s.',
                  path, why, step, f' (the unreadable file is kept as {kept})' if kept else '',
                  HISTORY)
  return config


def for_sampling(config, workdir: str, overrides: dict) -> ml_collections.ConfigDict:
  """The config of --mode=sample / --mode=eval: the run's own (config.json) with the sampling
  and eval groups of `config`, and its other data fields (paths of the data, which may have
  moved). `overrides` ({'group.field': value}, the command line's) may not change what the
  network is; if they do, the error names each field with both values."""
  trained = trained_config(workdir)
  if trained is None:
    logging.info('No %s in %s: the network is built from the config given.', CONFIG_JSON,
                 workdir)
    return config
  changed = differences(trained, config, [k for k in overrides if is_network_field(k)])
  if changed:
    raise _refusal('Sampling and evaluation build', workdir, changed,
                   'Drop those --config overrides: the network comes from the run.')
  merged = trained.copy_and_resolve_references()
  for group in ('sampling', 'eval'):
    merged[group] = config[group]
  for key in COMPUTE_FIELDS:
    if key in overrides:
      group, _, name = key.partition('.')
      merged[group][name] = config[group][name]
  for key in flat(config):
    group, _, name = key.partition('.')
    if group == 'data' and not is_network_field(key) and name in merged.data:
      merged.data[name] = config.data[name]
  return merged


def check_resume(config, workdir: str) -> dict:
  """Before a run resumes from a checkpoint: raises, naming the fields and both values, if the
  network settings differ from config.json's; returns the other changes, {field: (was, now)}."""
  trained = trained_config(workdir)
  if trained is None:
    return {}
  changed = differences(trained, config)
  network = {k: v for k, v in changed.items() if is_network_field(k)}
  if network:
    raise _refusal('Resuming trains', workdir, network,
                   'Use the settings it was trained with, or train into a new --workdir.')
  return changed


def record_config(config, workdir: str, *, resumed_at: int | None, changes: dict) -> None:
  """Writes config.json for a new run; for a resumed one keeps config.json as it is and appends
  the changed fields to config_history.jsonl, so the first config is never lost."""
  path = os.path.join(workdir, CONFIG_JSON)
  if resumed_at is None:
    moved = files.move_aside(path)  # a config.json without a checkpoint: a run that never saved
    if moved:
      logging.info('Kept the config of a run without checkpoints as %s.', moved)
    files.write_text(path, config.to_json_best_effort(indent=2))
  elif changes:
    line = json.dumps({'resumed_at_step': resumed_at,
                       'changes': {k: {'was': a, 'now': b} for k, (a, b) in changes.items()}},
                      default=str)
    files.append_line(os.path.join(workdir, HISTORY), line)
    logging.info('Resumed at step %d with changed settings (recorded in %s): %s', resumed_at,
                 HISTORY, ', '.join(f'{k}={b!r} (was {a!r})' for k, (a, b) in changes.items()))


def write_finished(workdir: str, step: int) -> None:
  """The completion record: training reached its last step and its checkpoint is written."""
  files.write_json(os.path.join(workdir, FINISHED_JSON), {'step': int(step)})


def finished_step(workdir: str) -> int | None:
  """The step of a run's completion record, or None if it has not finished. A record that cannot
  be read is named in a warning and counts as unfinished: launching the run again finds its last
  checkpoint, trains nothing more if it is complete, and writes the record anew."""
  path = os.path.join(workdir, FINISHED_JSON)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      return int(json.load(f)['step'])
  except (OSError, ValueError, KeyError, TypeError) as e:
    logging.warning('%s cannot be read (%s: %s); the run counts as unfinished until it is '
                    'launched again, which rewrites it.', path, type(e).__name__, e)
    return None
