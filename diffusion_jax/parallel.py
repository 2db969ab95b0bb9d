"""The device mesh, shardings, and the data-parallel wrapper of per-device functions.

One 1-D mesh with axis 'data' over every device of every host. State lives as replicated global
arrays (no leading device axis), so it checkpoints and restores on any topology; batches are
global arrays sharded on their batch dimension.
"""

from __future__ import annotations

from typing import Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXIS = 'data'


def create_mesh(devices=None) -> Mesh:
  """A 1-D mesh named 'data' over `devices` (default: every device of every process)."""
  return Mesh(np.asarray(devices if devices is not None else jax.devices()), (AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, leading_axes: int = 0) -> NamedSharding:
  """Shards the batch dimension, found after `leading_axes` unsharded axes."""
  return NamedSharding(mesh, P(*([None] * leading_axes), AXIS))


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


def data_parallel(per_device_fn: Callable, mesh: Mesh, *, leading_axes: int = 0,
                  donate_state: bool = True) -> Callable:
  """Maps `per_device_fn(state, batch) -> (state, metrics)` over the mesh.

  The state is replicated and comes back replicated (the function must make it so, e.g. with
  `lax.pmean` over 'data'); the batch is split on its batch dimension. This is the pmap
  programming model written as jit(shard_map), which is what `jax.pmap` lowers to.
  """
  mapped = jax.shard_map(per_device_fn, mesh=mesh,
                         in_specs=(P(), P(*([None] * leading_axes), AXIS)),
                         out_specs=(P(), P()))
  return jax.jit(mapped, donate_argnums=(0,) if donate_state else ())


def device_index():
  """This device's index along 'data', inside a data-parallel function."""
  return jax.lax.axis_index(AXIS)
