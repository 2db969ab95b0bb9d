"""Snapshots of the power-function averages, and any EMA reconstructed from them after training.

Training with training.phema_sigma_rels tracks those averages (`phema`) and every
training.phema_snapshot_every steps writes them, in training.phema_dtype, to
`<workdir>/phema/<step>/` with Orbax (asynchronously, by every process, all snapshots kept).
Each snapshot holds `profiles` (one parameter tree per tracked average) and `meta` (their
sigma_rels and exponents). `reconstruct` turns the snapshots up to a step into the average of
any width sigma_rel at that step, streaming one snapshot at a time, so it needs memory for the
result and one snapshot only.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from diffusion_jax import checkpointing, phema

SNAPSHOT_DIR = 'phema'
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def snapshot_dir(workdir: str) -> str:
  if '://' in workdir:
    return workdir.rstrip('/') + '/' + SNAPSHOT_DIR
  return os.path.join(os.path.abspath(workdir), SNAPSHOT_DIR)


def create_manager(workdir: str, *, read_only: bool = False) -> ocp.CheckpointManager:
  """The snapshots' CheckpointManager (every process must create it); keeps every snapshot."""
  options = ocp.CheckpointManagerOptions(max_to_keep=None, create=not read_only,
                                         read_only=read_only,
                                         enable_async_checkpointing=not read_only)
  return ocp.CheckpointManager(snapshot_dir(workdir), options=options,
                               item_handlers={'profiles': ocp.PyTreeCheckpointHandler(),
                                              'meta': ocp.JsonCheckpointHandler()})


def disk_bytes(params, num_profiles: int, num_snapshots: int, dtype: str) -> int:
  """What the snapshots of a run will take: parameters x profiles x snapshots x bytes."""
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  return count * num_profiles * num_snapshots * jnp.dtype(DTYPES[dtype]).itemsize


def save_snapshot(manager: ocp.CheckpointManager, step: int, averages: tuple,
                  sigma_rels: Sequence[float], dtype: str) -> bool:
  """Starts writing the averages at `step`; False (and nothing written) if a snapshot of that
  step exists, as after resuming from a checkpoint older than the last snapshot."""
  if step in manager.all_steps():
    logging.info('Post-hoc EMA snapshot of step %d exists; kept as it is.', step)
    return False
  cast = jax.tree.map(lambda x: x.astype(DTYPES[dtype]), averages)
  meta = {'step': int(step), 'sigma_rels': [float(s) for s in sigma_rels],
          'gammas': [phema.sigma_rel_to_gamma(s) for s in sigma_rels], 'dtype': dtype}
  checkpointing.save(manager, step, None, args=ocp.args.Composite(
      profiles=ocp.args.PyTreeSave(cast), meta=ocp.args.JsonSave(meta)))
  return True


def _abstract_profiles(abstract_params, num: int, dtype: str) -> tuple:
  return tuple(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, DTYPES[dtype],
                                                           sharding=x.sharding),
                            abstract_params) for _ in range(num))


def snapshots(workdir: str, up_to: Optional[int] = None) -> list[tuple[int, dict]]:
  """[(step, meta)] of the snapshots in `<workdir>/phema/` at steps <= up_to (default all)."""
  manager = create_manager(workdir, read_only=True)
  try:
    out = []
    for step in sorted(manager.all_steps()):
      if up_to is None or step <= up_to:
        out.append((step, _read_meta(manager, step)))
    return out
  finally:
    manager.close()


def _read_meta(manager: ocp.CheckpointManager, step: int) -> dict:
  """The `meta` of the snapshot at `step`; raises one line naming it and the fix when it cannot
  be read or lacks what reconstruction needs (the snapshot itself is left as it is)."""
  where = f'{manager.directory}/{step}'
  try:
    meta = dict(manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
                ['meta'])
    problem = None
    if not (isinstance(meta.get('gammas'), list) and meta['gammas']
            and meta.get('dtype') in DTYPES):
      problem = f'its meta holds {sorted(meta)} without usable gammas and dtype'
  except Exception as e:  # pylint: disable=broad-except  (any failure to read it)
    text = str(e).strip().splitlines()
    problem = f'{type(e).__name__}: {text[0][:160] if text else ""}'
  if problem:
    raise RuntimeError(
        f'the post-hoc EMA snapshot {where} cannot be read ({problem}); move it aside (mv '
        f'{where} {where}.unreadable) to reconstruct from the other snapshots, or set '
        '--config.sampling.ema_sigma_rel=0 to sample with the EMA of training.ema_decay.')
  return meta


def reconstruct(workdir: str, sigma_rel: float, abstract_params: Any,
                step: Optional[int] = None) -> tuple[Any, int, np.ndarray]:
  """(parameters, step, weights) of the power-function EMA of width sigma_rel at `step` (default:
  the last snapshot), from the snapshots up to it, laid out like `abstract_params` (shapes and
  shardings: reconstructs on any mesh). weights [snapshots, profiles] are the least-squares
  coefficients, summing to 1."""
  found = snapshots(workdir, step)
  if not found:
    raise FileNotFoundError(
        f'no post-hoc EMA snapshots in {snapshot_dir(workdir)}'
        + (f' up to step {step}' if step is not None else '')
        + ': train with --config.training.phema_sigma_rels=(0.05,0.1) to write them, or set '
        'sampling.ema_sigma_rel=0 for the EMA of training.ema_decay.')
  target_step = found[-1][0] if step is None else step
  if step is not None and found[-1][0] != step:
    logging.info('Reconstructing at step %d from snapshots up to step %d.', step, found[-1][0])
  steps = np.repeat([s for s, _ in found], [len(m['gammas']) for _, m in found])
  gammas = np.concatenate([m['gammas'] for _, m in found])
  weights = phema.reconstruction_weights(steps, gammas, sigma_rel, target_step)
  manager = create_manager(workdir, read_only=True)
  total, i = None, 0
  try:
    for snap_step, meta in found:
      target = _abstract_profiles(abstract_params, len(meta['gammas']), meta['dtype'])
      restored = manager.restore(snap_step, args=ocp.args.Composite(
          profiles=ocp.args.PyTreeRestore(
              item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target))))
      for profile in restored['profiles']:
        term = jax.tree.map(lambda p, w=weights[i]: p.astype(jnp.float32) * w, profile)
        total = term if total is None else jax.tree.map(jnp.add, total, term)
        i += 1
  finally:
    manager.close()
  logging.info('Post-hoc EMA sigma_rel=%g at step %d from %d snapshots (largest |weight| %.3g).',
               sigma_rel, target_step, len(found), np.abs(weights).max())
  return total, int(target_step), weights.reshape(len(found), -1)
