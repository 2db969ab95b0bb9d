"""A sweep definition expanded into trials: names made of their overrides, and launch.py flags.

A sweep is a module (see experiments/sweeps/) whose `get_sweep()` returns a dict:
  config  the base config file, relative to the repository root (e.g. 'configs/flowers.py')
  trials  a list of override dicts, one per trial, {'training.learning_rate': 1e-4, ...}
  fixed   (optional) overrides shared by every trial, kept out of the trial names
Each trial trains with `launch.py --config=<config> --config.<key>=<value> ...` in its own
workdir `<root>/<trial name>`, the name made of its own overrides (`learning_rate=0.0001,...`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import sys
from typing import Any, NamedTuple, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MAX_NAME_LENGTH = 120


class Trial(NamedTuple):
  index: int  # position in the sweep: the Slurm array task id
  name: str  # filesystem-safe and unique within the sweep
  overrides: dict  # this trial's own overrides, {'training.learning_rate': 1e-4, ...}
  flags: list  # every --config.<key>=<value> flag (fixed overrides, then the trial's)


class Sweep(NamedTuple):
  path: str  # the sweep definition module
  config: str  # absolute path of the base config file
  trials: list  # [Trial]


def format_value(value: Any) -> str:
  """A value as config_flags parses it on the command line: tuples as '(1,2,)', bools as True."""
  if isinstance(value, (tuple, list)):
    inner = ','.join(format_value(v) for v in value)
    return f'({inner},)' if len(value) == 1 else f'({inner})'
  if isinstance(value, float):
    return repr(value)
  return str(value)


def config_flags(overrides: dict) -> list[str]:
  """['--config.training.learning_rate=0.0001', ...] for launch.py."""
  return [f'--config.{key}={format_value(value)}' for key, value in overrides.items()]


def safe_name(text: str) -> str:
  """Keeps letters, digits and . _ - = + , (safe in file names, shells and Slurm paths)."""
  return re.sub(r'[^A-Za-z0-9._=+,-]+', '_', text).strip('_') or '_'


def trial_names(trials: Sequence[dict]) -> list[str]:
  """Unique, filesystem-safe names made of each trial's overrides.

  A key is shortened to its last part ('training.learning_rate' -> 'learning_rate') unless that
  is ambiguous within the sweep. Tuples read '1-2-2'. Names that would still clash, or exceed
  MAX_NAME_LENGTH characters, get a hash of their overrides appended.
  """
  keys = {k for t in trials for k in t}
  last = lambda k: k.rsplit('.', 1)[-1]
  ambiguous = {last(k) for k in keys if sum(last(j) == last(k) for j in keys) > 1}

  def value_text(v):
    return '-'.join(value_text(x) for x in v) if isinstance(v, (tuple, list)) else str(v)

  canonical = [json.dumps(t, sort_keys=True, default=str) for t in trials]
  dupes = sorted({c for c in canonical if canonical.count(c) > 1})
  if dupes:
    raise ValueError(f'the sweep lists the same overrides more than once: {dupes}; remove the '
                     'duplicate trials.')
  names = []
  for t in trials:
    parts = [f'{k if last(k) in ambiguous else last(k)}={value_text(v)}' for k, v in t.items()]
    names.append(safe_name(','.join(parts)) if parts else 'base')
  clashes = {n for n in names if names.count(n) > 1}
  for i, (name, c) in enumerate(zip(names, canonical)):
    if name in clashes or len(name) > MAX_NAME_LENGTH:
      names[i] = f'{name[:MAX_NAME_LENGTH - 9]}-{hashlib.sha1(c.encode()).hexdigest()[:8]}'
  return names


def _import_file(path: str, name: str):
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path} does not exist; pass the path of a .py file.')
  if ROOT not in sys.path:  # configs import `configs.default`
    sys.path.insert(0, ROOT)
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _resolve(path: str) -> str:
  """An absolute path: as given if it exists from here, else relative to the repository."""
  return os.path.abspath(path if os.path.exists(path) else os.path.join(ROOT, path))


def make_sweep(definition: dict, path: str = '') -> Sweep:
  """The trials of a `get_sweep()` result (see the module docstring)."""
  unknown = set(definition) - {'config', 'trials', 'fixed'}
  if 'config' not in definition or 'trials' not in definition or unknown:
    raise ValueError(f'get_sweep() of {path or "the sweep"} must return a dict with `config` and '
                     f'`trials` (and optionally `fixed`); got keys {sorted(definition)}.')
  trials = [dict(t) for t in definition['trials']]
  if not trials:
    raise ValueError(f'{path or "the sweep"} has no trials.')
  fixed = dict(definition.get('fixed', {}))
  names = trial_names(trials)
  return Sweep(os.path.abspath(path) if path else '', _resolve(definition['config']),
               [Trial(i, n, t, config_flags({**fixed, **t}))
                for i, (n, t) in enumerate(zip(names, trials))])


def load_sweep(path: str) -> Sweep:
  """The sweep defined by the module at `path`."""
  path = _resolve(path)
  return make_sweep(_import_file(path, 'sweep_definition').get_sweep(), path)


def num_steps(sweep: Sweep, trial: Trial) -> int:
  """training.num_steps of the trial: its override, else the base config's value."""
  for flag in reversed(trial.flags):
    if flag.startswith('--config.training.num_steps='):
      return int(flag.split('=', 1)[1])
  return int(_import_file(sweep.config, 'sweep_base_config').get_config().training.num_steps)
