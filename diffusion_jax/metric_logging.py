"""Metric writers: stdout, `<workdir>/metrics.jsonl`, and TensorBoard when TensorFlow is there.

Only process 0 writes files; the others log to their own stdout.
metrics.jsonl holds one JSON object per write, {"step": N, name: value, ...}, with values at
full float precision: sweeps read their trials' results from it.
"""

from __future__ import annotations

import concurrent.futures
import json
import os

from absl import logging
import jax


class LoggingWriter:
  """The writer interface (clu's MetricWriter subset we use), to the absl log."""

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
    with open(self.path, 'a') as f:
      f.write(json.dumps({'step': int(step), **{k: float(v) for k, v in scalars.items()}}) + '\n')


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
  """The records of `<workdir>/metrics.jsonl`, oldest first ([] if there is none)."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


class BackgroundWriter(LoggingWriter):
  """A writer built on a background thread; calls wait for it.

  clu's TensorBoard writer imports TensorFlow, which takes seconds: built this way, that
  overlaps the first compilation instead of delaying the first step.
  """

  def __init__(self, build):
    self._pool = concurrent.futures.ThreadPoolExecutor(1)
    self._future = self._pool.submit(build)
    self._pool.shutdown(wait=False)

  def __getattribute__(self, name):
    if name in ('write_scalars', 'write_images', 'flush', 'close'):
      return getattr(object.__getattribute__(self, '_future').result(), name)
    return object.__getattribute__(self, name)


def _tensorboard_writer(workdir: str):
  try:
    from clu import metric_writers  # pylint: disable=g-import-not-at-top
  except ImportError as e:  # clu's TensorBoard writer needs TensorFlow and tensorboard
    logging.warning('No TensorBoard logging (%s): metrics go to the log and metrics.jsonl. '
                    '`pip install tensorflow-cpu tensorboard clu` enables it.', e)
    return LoggingWriter()
  return metric_writers.create_default_writer(workdir, asynchronous=True)


def create_writer(workdir: str):
  """On process 0: metrics.jsonl plus TensorBoard and log (clu), or plus the log alone when
  TensorFlow is absent. Elsewhere: the log only."""
  if jax.process_index() > 0:
    return LoggingWriter()
  os.makedirs(workdir, exist_ok=True)
  jsonl = JsonlWriter(os.path.join(workdir, 'metrics.jsonl'))
  return MultiWriter([jsonl, BackgroundWriter(lambda: _tensorboard_writer(workdir))])
