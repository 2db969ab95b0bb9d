"""What a config field is, as data: its domain (`Field`: kind, range, choices, tuple lengths) and
the conditions under which a mode reads it (`Condition`s of a `Run`: `when` a field has one of
some values, `is_set`, `either`, `both`). `config_fields` holds the table of every field.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Callable, Optional


@dataclasses.dataclass(frozen=True)
class Run:
  """What a condition looks at: the config and the mode it runs in."""
  config: object
  mode: str

  def value(self, path: str):
    group, _, name = path.partition('.')
    return self.config[group][name]

  @property
  def samplers(self) -> tuple:
    """The samplers this run uses: sampling.sampler, and in training also the previews'."""
    sc = self.config.sampling
    previews = self.mode == 'train' and self.config.training.sample_every > 0
    return (sc.sampler, sc.preview_sampler) if previews else (sc.sampler,)


@dataclasses.dataclass(frozen=True)
class Condition:
  holds: Callable[[Run], bool]
  text: str  # what it needs, for the error: '{sampler} in (dpm_solver++, unipc)'

  def describe(self, run: Run) -> str:
    """The text, naming the sampler fields of the run's mode."""
    return self.text.format(sampler=' or '.join(
        ('sampling.sampler', 'sampling.preview_sampler')[:len(run.samplers)]))


def when(path: str, *values) -> Condition:
  """The field `path` has one of `values`; path 'sampler': a sampler the run uses does."""
  get = (lambda run: run.samplers) if path == 'sampler' else (lambda run: (run.value(path),))
  name = '{sampler}' if path == 'sampler' else path
  shown = ', '.join(str(v) if v != '' else "''" for v in values)
  return Condition(lambda run: any(v in values for v in get(run)),
                   f'{name}={shown}' if len(values) == 1 else f'{name} in ({shown})')


def either(*conditions: Condition) -> Condition:
  return Condition(lambda run: any(c.holds(run) for c in conditions),
                   ' or '.join(c.text for c in conditions))


def both(*conditions: Condition) -> Condition:
  return Condition(lambda run: all(c.holds(run) for c in conditions),
                   ' and '.join(c.text for c in conditions))


def is_set(path: str, text: str) -> Condition:
  """`path` is truthy (a non-empty tuple or string, a non-zero number)."""
  return Condition(lambda run: bool(run.value(path)), text)


@dataclasses.dataclass(frozen=True)
class Field:
  """kind: int | float | bool | str | (int,) | (float,) (a tuple of those);
  choices: the allowed values; lo, hi: a closed range unless lo_open / hi_open (for tuples: of
  every element); lengths: allowed tuple lengths; read_by: modes (and PREVIEW); needs: the
  conditions under which they read it."""
  kind: object
  read_by: tuple
  choices: Optional[tuple] = None
  lo: Optional[float] = None
  hi: Optional[float] = None
  lo_open: bool = False
  hi_open: bool = False
  lengths: Optional[tuple] = None
  needs: tuple = ()

  def domain(self) -> str:
    """The domain in words: 'an int >= 1', "one of ('small', 'large')"."""
    if self.choices is not None:
      return f'one of {self.choices}'
    element = self.kind[0] if isinstance(self.kind, tuple) else self.kind
    text = {int: 'an int', float: 'a number', bool: 'True or False', str: 'a string'}[element]
    if self.lo is not None and self.hi is not None:
      text += (f' in {"(" if self.lo_open else "["}{self.lo:g}, {self.hi:g}'
               f'{")" if self.hi_open else "]"}')
    elif self.lo is not None:
      text += f' {">" if self.lo_open else ">="} {self.lo:g}'
    if isinstance(self.kind, tuple):
      count = ''
      if self.lengths:
        count = (f'{self.lengths[0]} to {self.lengths[-1]} ' if len(self.lengths) > 2
                 else ' or '.join(map(str, self.lengths)) + ' ')
      text = f'a tuple of {count}{text.replace("an int", "ints").replace("a number", "numbers")}'
    return text

  def problem(self, value) -> Optional[str]:
    """Why `value` is outside the domain, or None."""
    if isinstance(self.kind, tuple):
      if not isinstance(value, (tuple, list)):
        return 'not a tuple'
      if self.lengths and len(value) not in self.lengths:
        return f'{len(value)} elements'
      return next((p for p in map(self._scalar_problem, value) if p), None)
    return self._scalar_problem(value)

  def _scalar_problem(self, value) -> Optional[str]:
    element = self.kind[0] if isinstance(self.kind, tuple) else self.kind
    numeric = isinstance(value, numbers.Real) and not isinstance(value, bool)
    expected = {bool: isinstance(value, bool), str: isinstance(value, str), float: numeric,
                int: numeric and isinstance(value, numbers.Integral)}[element]
    if not expected:
      return f'not {"an int" if element is int else "a number" if element is float else element}'
    if self.choices is not None and value not in self.choices:
      return 'not among the choices'
    if numeric and math.isnan(value):
      return 'NaN'
    if self.lo is not None and (value < self.lo or self.lo_open and value == self.lo):
      return 'too small'
    if self.hi is not None and (value > self.hi or self.hi_open and value == self.hi):
      return 'too large'
    return None
