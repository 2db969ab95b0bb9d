"""The device mesh and its shardings: data parallelism, and the state sharded over devices (FSDP).

One 2-D mesh, axes ('data', 'fsdp'), over every device of every host. Batches are sharded on
their batch dimension over both axes (every device holds a different part of the batch). The
training state (parameters, EMA, post-hoc EMA averages, optimizer moments) is split over
'fsdp' (each array along its largest dimension that the axis divides) and replicated over
'data'; with fsdp = 1, the default, that is plain data parallelism with replicated state. State
lives as global arrays (no leading device axis), so it checkpoints and restores on any mesh.

Inside the per-device part of a step (`jax.shard_map`), `gather` rebuilds whole parameters from
their shards before the network runs; differentiating through it sums each gradient over the
devices and leaves every device its shard of the sum (a reduce-scatter), which is what ZeRO-3 /
FSDP does.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXIS = 'data'
FSDP_AXIS = 'fsdp'
BATCH_AXES = (AXIS, FSDP_AXIS)  # the batch dimension is split over both


def create_mesh(devices=None, fsdp: int = 1) -> Mesh:
  """The ('data', 'fsdp') mesh over `devices` (default: every device of every process), with
  `fsdp` consecutive devices sharing the state."""
  devices = np.asarray(devices if devices is not None else jax.devices())
  if fsdp < 1 or devices.size % fsdp:
    raise ValueError(f'parallel.fsdp={fsdp} must divide the {devices.size} devices; choose a '
                     f'divisor of {devices.size} (1 = data parallelism only).')
  return Mesh(devices.reshape(-1, fsdp), BATCH_AXES)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_spec(leading_axes: int = 0) -> P:
  """Splits the batch dimension, found after `leading_axes` unsplit axes, over every device."""
  return P(*([None] * leading_axes), BATCH_AXES)


def batch_sharding(mesh: Mesh, leading_axes: int = 0) -> NamedSharding:
  return NamedSharding(mesh, batch_spec(leading_axes))


def fsdp_spec(shape: tuple, fsdp: int) -> P:
  """How an array of `shape` is split over 'fsdp': along its largest dimension that `fsdp`
  divides (the first such on ties), or not at all (fsdp = 1, scalars, no dimension divides)."""
  if fsdp == 1:
    return P()
  dims = [i for i, n in enumerate(shape) if n % fsdp == 0]
  if not dims:
    return P()
  axis = max(dims, key=lambda i: (shape[i], -i))
  return P(*([None] * axis), FSDP_AXIS)


def state_specs(mesh: Mesh, tree):
  """The `fsdp_spec` of every array (or ShapeDtypeStruct) of `tree`."""
  fsdp = mesh.shape[FSDP_AXIS]
  return jax.tree.map(lambda x: fsdp_spec(tuple(x.shape), fsdp), tree)


def state_shardings(mesh: Mesh, tree):
  """NamedShardings of `tree`'s arrays on `mesh`: split over 'fsdp', replicated over 'data'."""
  return jax.tree.map(lambda spec: NamedSharding(mesh, spec), state_specs(mesh, tree),
                      is_leaf=lambda x: isinstance(x, P))


def gather(shards, specs):
  """Inside shard_map: each array whole again, from its 'fsdp' shards (`specs` as from
  `state_specs`). Its transpose, under differentiation, is the reduce-scatter of gradients."""
  def whole(x, spec):
    if not spec:
      return x
    axis = list(spec).index(FSDP_AXIS)
    return jax.lax.all_gather(x, FSDP_AXIS, axis=axis, tiled=True)
  return jax.tree.map(whole, shards, specs)


def host_to_global(local_batch, sharding: NamedSharding):
  """This process's NumPy batch -> global jax.Arrays (the processes' batches concatenated)."""
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x),
                      local_batch)


def round_up(n: int, multiple: int) -> int:
  """The smallest multiple of `multiple` that is >= n: a batch rounded up to a whole number of
  examples per device (or per process)."""
  return -(-n // multiple) * multiple


def pad_rows(tree, size: int):
  """Every array of `tree` ([n, ...] NumPy, the same n) padded on axis 0 to `size` rows with
  copies of its last row, so that one shape compiles once; callers drop the results of the
  padding rows (the first n are the real ones)."""
  def pad(x):
    n = len(x)
    return x if n >= size else np.concatenate([x, np.repeat(x[-1:], size - n, axis=0)])
  return jax.tree.map(pad, tree)


def device_index():
  """This device's index along the batch (over 'data' and 'fsdp'), inside shard_map."""
  return jax.lax.axis_index(BATCH_AXES)
