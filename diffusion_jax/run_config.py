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
import ml_collections

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


def config_from_json(text: str) -> ml_collections.ConfigDict:
  """A ConfigDict from a run's config.json text, on top of configs/default.py when present."""
  values = json.loads(text)
  if not isinstance(values, dict):
    raise ValueError('config.json must hold a JSON object of config groups.')
  base = default_config()
  if base is None:
    logging.info('configs/default.py not found: using config.json alone.')
  merged = _merge(base.to_dict() if base is not None else {}, values)
  return ml_collections.ConfigDict(merged)


def load_config(workdir: str, config_file: str | None = None) -> ml_collections.ConfigDict:
  """The run's config: `<workdir>/config.json` if it exists, else `config_file`.

  workdir may be a local path or a cloud path such as gs://bucket/run (read with etils.epath).
  """
  from etils import epath  # pylint: disable=g-import-not-at-top  (ships with orbax)
  path = epath.Path(workdir) / CONFIG_JSON
  if path.exists():
    logging.info('Config from %s.', path)
    return config_from_json(path.read_text())
  if not config_file:
    raise FileNotFoundError(f'No {CONFIG_JSON} in {workdir!r} (training writes it) and no config '
                            'file given; pass one such as configs/digits.py.')
  logging.info('No %s in %s: config from %s.', CONFIG_JSON, workdir, config_file)
  return config_from_file(config_file)
