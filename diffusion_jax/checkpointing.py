"""Orbax checkpoints of the TrainState: periodic async saves, auto-resume, any-topology restore.

Checkpoints live in `<workdir>/checkpoints/<step>`. A state is restored against an abstract
target (shapes, dtypes and the shardings of the *current* mesh), so a checkpoint written from
4 devices, or from 2 processes, restores on 1 device, a Colab CPU included.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp


def checkpoint_dir(workdir: str) -> str:
  if '://' in workdir:  # gs://bucket/run: abspath would turn it into a local path
    return workdir.rstrip('/') + '/checkpoints'
  return os.path.join(os.path.abspath(workdir), 'checkpoints')


def create_manager(workdir: str, *, max_to_keep: int = 3,
                   read_only: bool = False) -> ocp.CheckpointManager:
  """An async CheckpointManager for `<workdir>/checkpoints` (every process must create it)."""
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=not read_only,
                                         read_only=read_only,
                                         enable_async_checkpointing=not read_only)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                               item_handlers=ocp.PyTreeCheckpointHandler())


def save(manager: ocp.CheckpointManager, step: int, state: Any) -> None:
  """Starts an asynchronous save of `state` at `step`; training goes on while it writes."""
  # PyTree (not Standard) args, as the manager's handler is the PyTree one (partial restores and
  # item metadata need it); the files are those StandardSave writes.
  manager.save(step, args=ocp.args.PyTreeSave(state), force=True)


def abstract_like(state: Any, sharding: Optional[jax.sharding.Sharding] = None) -> Any:
  """The restore target: shape/dtype structs of `state` (arrays or ShapeDtypeStructs) with
  `sharding`, or each leaf's own sharding when `sharding` is None."""
  def leaf(x):
    return jax.ShapeDtypeStruct(x.shape, x.dtype,
                                sharding=sharding if sharding is not None else x.sharding)
  return jax.tree.map(leaf, state)


def _existing_step(manager: ocp.CheckpointManager, step: Optional[int]) -> int:
  """`step`, or the latest when None; raises naming the directory when there is none."""
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f'no checkpoint in {manager.directory}; train first '
                            '(python launch.py --mode=train ...) or point --workdir at a run.')
  if step not in manager.all_steps():
    raise FileNotFoundError(f'no checkpoint for step {step} in {manager.directory}; '
                            f'available: {list(manager.all_steps())}.')
  return step


def restore(manager: ocp.CheckpointManager, target: Any, step: Optional[int] = None) -> Any:
  """The state saved at `step` (default: the latest), laid out like the abstract `target`.

  For a dataclass target (the TrainState), a field that holds no arrays (an empty tuple, as
  `phema_params` is when post-hoc EMA is off) need not be in the checkpoint: checkpoints written
  before the field existed restore.
  """
  if dataclasses.is_dataclass(target):
    fields = {f.name: getattr(target, f.name) for f in dataclasses.fields(target)}
    restored = restore_fields(manager, {k: v for k, v in fields.items() if jax.tree.leaves(v)},
                              step)
    return target.replace(**restored)
  step = _existing_step(manager, step)
  return manager.restore(step, args=ocp.args.PyTreeRestore(
      item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target)))


def restore_fields(manager: ocp.CheckpointManager, target: dict,
                   step: Optional[int] = None) -> dict:
  """Only some top-level fields of the state saved at `step` (default: the latest).

  target: {field name: abstract subtree, as in `abstract_like`}; the other fields of the saved
  state are not read, so restoring e.g. the EMA parameters alone needs memory for them alone.
  """
  step = _existing_step(manager, step)
  saved = _leaf_paths(manager.item_metadata(step).tree)
  for name, subtree in target.items():
    missing = sorted(_leaf_paths({name: subtree}) - saved)
    if missing:
      raise ValueError(
          f'the checkpoint at step {step} in {manager.directory} has no {name} '
          f'{"arrays" if len(missing) > 1 else "array"} {missing[0]}'
          f'{f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""}: it was written '
          'with other settings (e.g. training.phema_sigma_rels); use the settings it was '
          'trained with, or a new --workdir.')
  args = ocp.args.PyTreeRestore(item=target,
                                restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                partial_restore=True)
  return manager.restore(step, args=args)


def restore_or_keep(manager: ocp.CheckpointManager, state: Any) -> Any:
  """Auto-resume: the latest checkpoint restored onto `state`'s layout, or `state` itself."""
  if manager.latest_step() is None:
    return state
  return restore(manager, abstract_like(state))


def _leaf_paths(tree) -> set:
  """The paths of a tree's leaves as '/'-joined names ('params/conv/kernel'), the same for a
  state and for Orbax's metadata of it (which stores a NamedTuple's fields as dict keys)."""
  def name(key):
    for attr in ('key', 'name', 'idx'):
      if hasattr(key, attr):
        return str(getattr(key, attr))
    return str(key)
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {'/'.join(name(k) for k in path) for path, _ in leaves}


class PreemptionFlag:
  """Set by SIGTERM (and SIGINT when asked): the train loop saves and exits cleanly.

  A context manager that restores the previous handlers on exit. Signal handlers can only be
  installed from the main thread; elsewhere the flag only reacts to `set()`.
  """

  def __init__(self, signals=(signal.SIGTERM,)):
    self._event = threading.Event()
    self._signals = signals
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in self._signals:
        self._previous[sig] = signal.signal(sig, lambda *_: self._event.set())
    return self

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    return False

  def set(self):
    self._event.set()

  def is_set(self) -> bool:
    return self._event.is_set()
