"""One training run per workdir: an operating-system lock on `<workdir>/train.lock`.

`hold(workdir)` takes an exclusive `flock` on the file and writes who holds it (host, pid, since
when, the command) into it. The kernel releases the lock when the process ends in any way,
`kill -9` included, so a stale file is never an obstacle: it only names the last holder. A
second run that finds the lock taken raises `WorkdirBusy`, naming the workdir and the holder,
before it writes anything. Readers (sampling, evaluation) do not take it.

Locks on network filesystems are as good as the filesystem's: NFSv4 and Lustre honour `flock`
across machines; cloud paths (gs://) are not locked at all (a warning says so).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import sys
import time
from typing import Iterator

from absl import logging

try:
  import fcntl
except ImportError:  # Windows: no flock
  fcntl = None

LOCK_FILE = 'train.lock'


class WorkdirBusy(RuntimeError):
  """Another process is training into the workdir."""


def lock_path(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), LOCK_FILE)


def _describe(holder: dict | None) -> str:
  if not holder:
    return 'a process that has not written its name yet'
  return (f"pid {holder.get('pid')} on {holder.get('host')}, since {holder.get('since')}"
          + (f" ({holder['command']})" if holder.get('command') else ''))


def _read_holder(f) -> dict | None:
  """The holder's record in the open lock file, waiting briefly for a holder that has just
  taken the lock to write it; None when there is none (or it is not JSON)."""
  for _ in range(20):
    f.seek(0)
    text = f.read()
    if text.strip():
      try:
        return json.loads(text)
      except ValueError:
        return None
    time.sleep(0.05)
  return None


@contextlib.contextmanager
def hold(workdir: str) -> Iterator[None]:
  """Holds the workdir for the duration of the block; raises `WorkdirBusy` if another process
  holds it. The directory must exist."""
  if '://' in workdir or fcntl is None:
    logging.warning('%s is not locked (%s): make sure no other run trains into it.', workdir,
                    'a cloud path' if '://' in workdir else 'no flock on this system')
    yield
    return
  path = lock_path(workdir)
  f = open(path, 'a+', encoding='utf-8')  # pylint: disable=consider-using-with
  try:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise WorkdirBusy(
          f'--workdir={workdir} is being trained by another run: {_describe(_read_holder(f))} '
          f'holds {path}. Wait for it to end or stop it, or train into another --workdir '
          '(sampling and evaluation of this one may run meanwhile).') from None
    record = {'host': socket.gethostname(), 'pid': os.getpid(),
              'since': datetime.datetime.now().astimezone().isoformat(timespec='seconds'),
              'command': ' '.join(os.path.basename(a) if i == 0 else a
                                  for i, a in enumerate(sys.argv))[:300]}
    f.seek(0)
    f.truncate()
    f.write(json.dumps(record) + '\n')
    f.flush()
    try:
      yield
    finally:
      f.seek(0)
      f.truncate()  # a lock file left empty: nobody holds it
      fcntl.flock(f, fcntl.LOCK_UN)
  finally:
    f.close()
