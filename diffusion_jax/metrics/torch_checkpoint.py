"""Reading a torch.save'd state_dict into NumPy arrays without importing torch.

`read_torch_state_dict(path) -> {name: np.ndarray}` reads both torch formats:
  * zip (torch >= 1.6): `<dir>/data.pkl` is the pickle, each storage is a raw record
    `<dir>/data/<key>`, `<dir>/byteorder` (optional) says 'little' or 'big';
  * legacy single stream: pickled magic number, protocol 1001 and sys info, then the pickle,
    then the list of storage keys, then each storage as an int64 element count and its bytes.
In the pickle a tensor is `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`
and a storage is a persistent id `('storage', torch.<Type>Storage, key, location, numel[, view])`.
The unpickler admits only those globals and `collections.OrderedDict`, so a file cannot run code.
"""

from __future__ import annotations

import collections
import dataclasses
import pathlib
import pickle
import struct
import zipfile
from typing import Any, Mapping

import numpy as np

_STORAGE_DTYPES = {'FloatStorage': np.float32, 'DoubleStorage': np.float64,
                   'HalfStorage': np.float16, 'LongStorage': np.int64, 'IntStorage': np.int32,
                   'ShortStorage': np.int16, 'CharStorage': np.int8, 'ByteStorage': np.uint8,
                   'BoolStorage': np.bool_}
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization.MAGIC_NUMBER
LEGACY_PROTOCOL = 1001


@dataclasses.dataclass(frozen=True)
class _StorageType:
  dtype: np.dtype


@dataclasses.dataclass(frozen=True)
class _StorageRef:
  key: str
  dtype: np.dtype
  offset: int  # elements into the root storage (legacy storage views)


@dataclasses.dataclass(frozen=True)
class _TensorRef:
  storage: _StorageRef
  offset: int
  size: tuple[int, ...]
  stride: tuple[int, ...]


def _rebuild_tensor_v2(storage, storage_offset, size, stride, *unused) -> _TensorRef:
  # In the legacy format the storage bytes come after the pickle: record now, build later.
  return _TensorRef(storage, int(storage_offset), tuple(size), tuple(stride))


def _rebuild_parameter(data, *unused):
  return data


class _StateDictUnpickler(pickle.Unpickler):
  """Unpickles a torch.save'd state_dict; admits only the globals a plain state_dict uses."""

  def __init__(self, file):
    super().__init__(file, encoding='utf-8')
    self.storage_dtypes: dict[str, np.dtype] = {}

  def find_class(self, module: str, name: str):
    if (module, name) == ('collections', 'OrderedDict'):
      return collections.OrderedDict
    if module == 'torch._utils' and name in ('_rebuild_tensor_v2', '_rebuild_tensor'):
      return _rebuild_tensor_v2  # the pre-1.0 `_rebuild_tensor` takes the same leading args
    if (module, name) == ('torch._utils', '_rebuild_parameter'):
      return _rebuild_parameter
    if module == 'torch' and name in _STORAGE_DTYPES:
      return _StorageType(np.dtype(_STORAGE_DTYPES[name]))
    raise pickle.UnpicklingError(f'{module}.{name} is not part of a plain tensor state_dict')

  def persistent_load(self, pid):
    # zip: ('storage', type, key, location, numel); legacy adds view (view_key, offset, numel).
    if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] in ('storage', b'storage')
            and isinstance(pid[1], _StorageType)):
      raise pickle.UnpicklingError(f'unknown torch persistent id {pid!r}')
    key, dtype = str(pid[2]), pid[1].dtype
    self.storage_dtypes[key] = dtype
    view = pid[5] if len(pid) > 5 else None
    return _StorageRef(key, dtype, int(view[1]) if view else 0)


def _storage_array(data: bytes, dtype: np.dtype, little: bool, key: str) -> np.ndarray:
  if len(data) % dtype.itemsize:
    raise ValueError(f'storage {key} holds {len(data)} bytes, not a whole number of {dtype}')
  return np.frombuffer(data, dtype.newbyteorder('<' if little else '>')).astype(dtype)


def _materialise(ref: _TensorRef, storages: Mapping[str, np.ndarray]) -> np.ndarray:
  flat = storages[ref.storage.key]
  start = ref.storage.offset + ref.offset
  if any(n == 0 for n in ref.size):
    return np.zeros(ref.size, flat.dtype)
  extent = start + 1 + sum((n - 1) * s for n, s in zip(ref.size, ref.stride))
  if start < 0 or min(ref.stride, default=0) < 0 or extent > flat.size:
    raise ValueError(f'a tensor reaches outside storage {ref.storage.key}: truncated file?')
  strides = tuple(s * flat.itemsize for s in ref.stride)
  return np.lib.stride_tricks.as_strided(flat[start:], ref.size, strides).copy()


def _read_zip(f) -> tuple[Any, dict[str, np.ndarray]]:
  with zipfile.ZipFile(f) as zf:
    names = zf.namelist()
    pkl = [n for n in names if n == 'data.pkl' or n.endswith('/data.pkl')]
    if not pkl:
      raise ValueError('a zip without data.pkl')
    prefix = pkl[0][:-len('data.pkl')]
    unpickler = _StateDictUnpickler(zf.open(pkl[0]))
    result = unpickler.load()
    little = prefix + 'byteorder' not in names or zf.read(prefix + 'byteorder') != b'big'
    return result, {k: _storage_array(zf.read(f'{prefix}data/{k}'), d, little, k)
                    for k, d in unpickler.storage_dtypes.items()}


def _read_legacy(f) -> tuple[Any, dict[str, np.ndarray]]:
  # Every record goes through the restricted unpickler: the file is untrusted input.
  if (_StateDictUnpickler(f).load() != LEGACY_MAGIC
      or _StateDictUnpickler(f).load() != LEGACY_PROTOCOL):
    raise ValueError('no torch magic number and protocol at its start')
  sys_info = _StateDictUnpickler(f).load()
  little = sys_info.get('little_endian', True) if isinstance(sys_info, dict) else True
  unpickler = _StateDictUnpickler(f)
  result = unpickler.load()
  storages = {}
  for key in _StateDictUnpickler(f).load():
    key, dtype = str(key), unpickler.storage_dtypes[str(key)]
    (numel,) = struct.unpack('<q' if little else '>q', f.read(8))
    storages[key] = _storage_array(f.read(numel * dtype.itemsize), dtype, little, key)
  return result, storages


def read_torch_state_dict(path: str | pathlib.Path) -> dict[str, np.ndarray]:
  """A torch.save'd {name: tensor} dict -> {name: np.ndarray} (dtype and shape as saved).

  Raises ValueError naming the path for anything that is not such a file.
  """
  with open(path, 'rb') as f:
    is_zip = zipfile.is_zipfile(f)
    f.seek(0)  # is_zipfile leaves the position at the end-of-archive probe
    try:
      result, storages = _read_zip(f) if is_zip else _read_legacy(f)
    except Exception as e:  # garbage or truncation surfaces as any of pickle's/struct's errors
      raise ValueError(f'{path} is not a readable torch.save file ({e})') from e
  if not isinstance(result, Mapping) or not all(
      isinstance(k, str) and isinstance(v, _TensorRef) and isinstance(v.storage, _StorageRef)
      for k, v in result.items()):
    raise ValueError(f'{path} is a torch.save file but not a flat {{name: tensor}} state_dict')
  try:
    return {k: _materialise(v, storages) for k, v in result.items()}
  except (KeyError, ValueError) as e:
    raise ValueError(f'{path} is a damaged torch.save file ({e})') from e
