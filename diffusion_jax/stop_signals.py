"""Stopping long work on a signal, where stopping is safe.

`StopFlag` is set by SIGTERM (and SIGINT when asked) instead of the process dying wherever it
is. Training checks it after every step, then saves a checkpoint and exits (`train`). Sampling
and evaluation wait for each device computation with `StopFlag.fetch`, which polls the result
instead of blocking on it: one call of a 1,000-step sampler over a large batch runs for minutes,
and a blocked main thread would hear no signal until it ends. A signal then stops them within a
fraction of a second, before anything is written (`Interrupted`).
"""

from __future__ import annotations

import signal
import threading
import time

import jax


class Interrupted(Exception):
  """A signal stopped the work before it finished; `signum` names the signal."""

  def __init__(self, signum: int):
    super().__init__(f'stopped by {signal.Signals(signum).name}')
    self.signum = signum


class StopFlag:
  """Set by the given signals (SIGTERM by default) while the context is entered; the previous
  handlers come back on exit. Handlers can only be installed from the main thread; elsewhere the
  flag only reacts to `set()`."""

  POLL_SECONDS = 0.05

  def __init__(self, signals=(signal.SIGTERM,)):
    self._event = threading.Event()
    self._signals = signals
    self._previous = {}
    self.signum = signal.SIGTERM

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in self._signals:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    return False

  def _handle(self, signum, frame):
    del frame
    self.signum = signum
    self._event.set()

  def set(self):
    self._event.set()

  def is_set(self) -> bool:
    return self._event.is_set()

  def check(self) -> None:
    """Raises `Interrupted` if a signal has come."""
    if self.is_set():
      raise Interrupted(self.signum)

  def fetch(self, tree):
    """`jax.device_get(tree)` once every array in it is computed; raises `Interrupted` as soon
    as a signal comes instead of waiting for the computation to end."""
    for leaf in jax.tree.leaves(tree):
      while hasattr(leaf, 'is_ready') and not leaf.is_ready():
        self.check()
        time.sleep(self.POLL_SECONDS)
    self.check()
    return jax.device_get(tree)
