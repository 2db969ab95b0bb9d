"""Metric writers (stdout, `<workdir>/metrics.jsonl`, TensorBoard when TensorFlow is there), and
the progress report (rate and time left) that training, sampling and evaluation all log.

Only process 0 writes files; the others log to their own stdout.
metrics.jsonl holds one JSON object per write, {"step": N, name: value, ...}, with values at
full float precision: sweeps read their trials' results from it.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import time
from typing import Callable

from absl import logging
import jax
import numpy as np

from diffusion_jax import files


class LoggingWriter:
  """The writer interface (write_scalars, write_images, flush, close), to the absl log."""

  def write_scalars(self, step: int, scalars: dict) -> None:
    logging.info('[%d] %s', step, ', '.join(f'{k}={v:.6g}' for k, v in scalars.items()))

  def write_images(self, step: int, images: dict) -> None:
    del step, images

  def flush(self) -> None:
    pass

  def close(self) -> None:
    pass


class JsonlWriter(LoggingWriter):
  """Appends scalars to a JSON-lines file (and does nothing else)."""

  def __init__(self, path: str):
    self.path = path

  def write_scalars(self, step: int, scalars: dict) -> None:
    files.append_line(self.path, json.dumps({'step': int(step),
                                             **{k: float(v) for k, v in scalars.items()}}))


class MultiWriter(LoggingWriter):
  def __init__(self, writers):
    self.writers = writers

  def write_scalars(self, step, scalars):
    for w in self.writers:
      w.write_scalars(step, scalars)

  def write_images(self, step, images):
    for w in self.writers:
      w.write_images(step, images)

  def flush(self):
    for w in self.writers:
      w.flush()

  def close(self):
    for w in self.writers:
      w.close()


def read_metrics(workdir: str) -> list[dict]:
  """The records of `<workdir>/metrics.jsonl`, oldest first ([] if there is none); lines that
  are not JSON records (one cut short by a crash) are named in a warning and skipped."""
  path = os.path.join(workdir, 'metrics.jsonl')
  records, bad = files.read_jsonl(path)
  if bad:
    logging.warning('%s: line(s) %s are not JSON records (cut short?) and are skipped; the '
                    'other %d records are read.', path, ', '.join(map(str, bad[:10])),
                    len(records))
  return records


class BackgroundWriter:
  """A writer built on a background thread once there is something to write.

  The TensorBoard writer's imports (tensorboardX, protobuf) take a second or more of CPU: started
  at the first write (after the first train step compiled, not during it), they do not slow the
  compilation; writes made before the writer is ready are kept and replayed in order.
  """

  def __init__(self, build: Callable[[], object]):
    self._build, self._future, self._pending = build, None, []

  def _write(self, method: str, *args) -> None:
    if self._future is None:
      pool = concurrent.futures.ThreadPoolExecutor(1)
      self._future = pool.submit(self._build)
      pool.shutdown(wait=False)
    self._pending.append((method, args))
    if self._future.done():
      self._replay()

  def _replay(self):
    writer = self._future.result()
    for method, args in self._pending:
      getattr(writer, method)(*args)
    self._pending = []
    return writer

  def write_scalars(self, step: int, scalars: dict) -> None:
    self._write('write_scalars', step, scalars)

  def write_images(self, step: int, images: dict) -> None:
    self._write('write_images', step, images)

  def flush(self) -> None:
    if self._future is not None:
      self._replay().flush()

  def close(self) -> None:
    if self._future is not None:
      self._replay().close()


class TensorBoardWriter(LoggingWriter):
  """Scalars and picture grids as TensorBoard event files, written by tensorboardX (no
  TensorFlow needed)."""

  def __init__(self, logdir: str):
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    self._writer = SummaryWriter(logdir, flush_secs=30)

  def write_scalars(self, step: int, scalars: dict) -> None:
    for name, value in scalars.items():
      self._writer.add_scalar(name, float(value), int(step))

  def write_images(self, step: int, images: dict) -> None:
    """images: {name: [N, H, W, C] uint8, or float in [0, 1]}."""
    for name, value in images.items():
      self._writer.add_images(name, np.asarray(value), int(step), dataformats='NHWC')

  def flush(self) -> None:
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()


def _tensorboard_writer(workdir: str):
  try:
    return TensorBoardWriter(workdir)
  except ImportError as e:
    logging.warning('No TensorBoard logging (%s): metrics go to the log and metrics.jsonl. '
                    '`pip install tensorboardX` enables it.', e)
    return MultiWriter([])


def create_writer(workdir: str, *, log: bool = True):
  """On process 0: the log, metrics.jsonl and TensorBoard event files (started in the
  background, `BackgroundWriter`). Elsewhere: the log only.

  log=False leaves the log out, for a loop whose progress line already carries the scalars
  (training: one line per log step).
  """
  logs = [LoggingWriter()] if log else []
  if jax.process_index() > 0:
    return MultiWriter(logs)
  os.makedirs(workdir, exist_ok=True)
  jsonl = JsonlWriter(os.path.join(workdir, 'metrics.jsonl'))
  return MultiWriter(logs + [jsonl, BackgroundWriter(lambda: _tensorboard_writer(workdir))])


def format_scalars(scalars: dict) -> str:
  """'name value  name value' with 4 significant digits, for a progress line."""
  return '  '.join(f'{name} {value:.4g}' for name, value in scalars.items())


class Progress:
  """Rate and time left of a long loop (train steps, sampling or bits/dim batches), measured
  between two calls of `update`.

  Args:
    total: the count the loop runs to (steps or batches).
    start: where it starts (a resumed run's step).
    items_per_step: examples per step or batch, for the images/s rate.
    unit: what one step is called in the log line ('step', 'batch').
    label: what the loop does, first in the log line ('sampling', 'bits/dim'; '' for none).
  """
  _PLURALS = {'batch': 'batches'}

  def __init__(self, total: int, *, start: int = 0, items_per_step: int = 1,
               unit: str = 'step', label: str = ''):
    self.total, self.items_per_step = total, items_per_step
    self.unit, self.label = unit, label
    self.last_done, self.last_time = start, time.perf_counter()

  def update(self, done: int) -> dict:
    """{'steps_per_sec', 'images_per_sec', 'eta_min'} since the previous update."""
    now = time.perf_counter()
    rate = (done - self.last_done) / max(now - self.last_time, 1e-9)
    self.last_done, self.last_time = done, now
    return {'steps_per_sec': rate, 'images_per_sec': rate * self.items_per_step,
            'eta_min': (self.total - done) / max(rate, 1e-9) / 60.0}

  def line(self, done: int, rates: dict, extra: str = '') -> str:
    """'[label ]<unit> done/total  [extra  ]r <units>/s  r img/s  ETA m min', for the log."""
    units = self._PLURALS.get(self.unit, self.unit + 's')
    return (f'{self.label + " " if self.label else ""}{self.unit} {done}/{self.total}  '
            f'{extra + "  " if extra else ""}{rates["steps_per_sec"]:.2f} {units}/s  '
            f'{rates["images_per_sec"]:.1f} img/s  ETA {rates["eta_min"]:.1f} min')

  def log(self, done: int, extra: str = '') -> dict:
    """`update`, and its line to the log; returns the rates."""
    rates = self.update(done)
    logging.info('%s', self.line(done, rates, extra))
    return rates
