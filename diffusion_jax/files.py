"""Writing output files so that nothing already written is lost.

`write_atomically` writes to a temporary name beside the target and renames it into place, so a
reader (or a crash mid-write) never sees half a file and a failed write leaves the old file as it
was. `move_aside` keeps an existing file under the first free numbered name instead of
overwriting it (samples.npz -> samples.1.npz, ...).
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable


def check_writable(directory: str, setting: str = '--workdir') -> None:
  """Creates `directory` if needed and writes a probe file there; raises one line naming the
  setting, the directory and the reason when it cannot be (cloud paths are not probed)."""
  if '://' in directory:
    return
  probe = os.path.join(directory, '.write_probe')
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


def move_aside(path: str) -> str | None:
  """Renames an existing `path` to the first free name.1.ext, name.2.ext, ...; returns the new
  name, or None when there was nothing to keep."""
  if not os.path.exists(path):
    return None
  stem, ext = os.path.splitext(path)
  i = 1
  while os.path.exists(f'{stem}.{i}{ext}'):
    i += 1
  os.replace(path, f'{stem}.{i}{ext}')
  return f'{stem}.{i}{ext}'
