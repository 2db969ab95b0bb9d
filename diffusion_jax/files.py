"""Writing output files so that nothing already written is lost.

`write_atomically` writes to a temporary name beside the target and renames it into place, so a
reader (or a crash mid-write) never sees half a file and a failed write leaves the old file as it
was. `move_aside` keeps an existing file under the first free numbered name instead of
overwriting it (samples.npz -> samples.1.npz, ...). Line-per-record files (metrics.jsonl,
config_history.jsonl) are appended with `append_line` and read with `read_jsonl`, which survive
a last line cut short.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
from typing import Any, Callable


def check_writable(directory: str, setting: str = '--workdir') -> None:
  """Creates `directory` if needed and writes a probe file there; raises one line naming the
  setting, the directory and the reason when it cannot be (cloud paths are not probed)."""
  if '://' in directory:
    return
  # Named per process: two runs probing the same directory do not remove each other's probe.
  probe = os.path.join(directory, f'.write_probe.{socket.gethostname()}.{os.getpid()}')
  try:
    os.makedirs(directory, exist_ok=True)
    with open(probe, 'w') as f:
      f.write('ok')
    os.remove(probe)
  except OSError as e:
    raise OSError(f'{setting}={directory} cannot be written: {e.strerror or e} '
                  f'({e.filename or directory}); choose a directory you can write to.') from None


def write_atomically(path: str, write: Callable[[str], None]) -> None:
  """Calls `write(tmp)` with a temporary path beside `path`, then renames it onto `path`.

  The temporary name keeps the extension (np.savez and PIL pick the format from it). If `write`
  raises, the temporary file is removed and `path` is untouched.
  """
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  stem, ext = os.path.splitext(path)
  tmp = f'{stem}.tmp{ext}'
  try:
    write(tmp)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_text(path: str, text: str) -> None:
  """`text` at `path`, atomically."""
  def write(tmp):
    with open(tmp, 'w') as f:
      f.write(text)
  write_atomically(path, write)


def write_json(path: str, value: Any) -> None:
  """`value` as indented JSON at `path`, atomically."""
  write_text(path, json.dumps(value, indent=2) + '\n')


def move_aside(path: str, tag: str = '') -> str | None:
  """Renames an existing `path` to the first free name.1.ext, name.2.ext, ... (with `tag`:
  name.tag.ext, name.tag.1.ext, ...); returns the new name, or None when there was nothing to
  keep."""
  if not os.path.exists(path):
    return None
  stem, ext = os.path.splitext(path)
  stem = f'{stem}.{tag}' if tag else stem
  candidates = itertools.chain([f'{stem}{ext}'] if tag else [],
                               (f'{stem}.{i}{ext}' for i in itertools.count(1)))
  new = next(c for c in candidates if not os.path.exists(c))
  os.replace(path, new)
  return new


def append_line(path: str, line: str) -> None:
  """Appends `line` and a newline to a line-per-record file. If the file's last line was cut
  short (a crash mid-write), it is ended first, so the new record is never glued onto it."""
  with open(path, 'a+b') as f:
    if f.tell() > 0:
      f.seek(-1, os.SEEK_END)
      if f.read(1) != b'\n':
        f.write(b'\n')
    f.write(line.encode() + b'\n')


def read_jsonl(path: str) -> tuple[list, list]:
  """(records, numbers of the lines that are not JSON objects) of a JSON-lines file; blank lines
  are skipped. A missing file has neither."""
  if not os.path.exists(path):
    return [], []
  records, bad = [], []
  with open(path, 'rb') as f:
    for number, raw in enumerate(f, 1):
      if not raw.strip():
        continue
      try:
        record = json.loads(raw)
      except ValueError:
        record = None
      if isinstance(record, dict):
        records.append(record)
      else:
        bad.append(number)
  return records, bad
