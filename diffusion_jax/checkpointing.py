"""Orbax checkpoints of the TrainState: periodic async saves, auto-resume, any-topology restore.

Checkpoints live in `<workdir>/checkpoints/<step>`. A state is restored against an abstract
target (shapes, dtypes and the shardings of the *current* mesh), so a checkpoint written from
4 devices, or from 2 processes, restores on 1 device, a Colab CPU included.

Each checkpoint's metadata also holds the run's config (`stored_config`), from which a lost
config.json is rebuilt. A checkpoint that cannot be read (bit rot, a half-copied directory) is
named in a warning and the one before it is tried (`restore_newest_readable`); training that
resumes past it moves it aside to `<step>.unreadable` (never deleting it) so that the step can
be written again. A checkpoint that reads but holds another state (written with other
settings) is not skipped: `CheckpointMismatch` names what differs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any, Optional

from absl import logging
import jax
import orbax.checkpoint as ocp


class CheckpointMismatch(ValueError):
  """A checkpoint that reads, but whose state is not the one asked for (other settings)."""


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


def save(manager: ocp.CheckpointManager, step: int, state: Any, args=None, *,
         config: Optional[dict] = None) -> None:
  """Starts an asynchronous save of `state` at `step`; training goes on while it writes.

  `config` (the run's config as a JSON-able dict) goes into the checkpoint's metadata, so that
  the run's config.json can be rebuilt from any checkpoint (`stored_config`). A failure of this
  save or of the previous one (the disk filling up, a lost mount) raises `OSError` in one line
  naming the directory and the checkpoints that are intact.
  """
  # PyTree (not Standard) args, as the manager's handler is the PyTree one (partial restores and
  # item metadata need it); the files are those StandardSave writes.
  with _naming_failures(manager, step):
    manager.save(step, args=args or ocp.args.PyTreeSave(state), force=True,
                 custom_metadata={'config': config} if config is not None else None)


def stored_config(workdir: str) -> Optional[tuple[int, dict]]:
  """(step, config dict) from the newest checkpoint in `<workdir>/checkpoints` whose metadata
  holds the run's config, or None when none does (or there are none)."""
  manager = create_manager(workdir, read_only=True)
  try:
    for step in sorted(manager.all_steps(), reverse=True):
      try:
        config = (manager.metadata(step).custom_metadata or {}).get('config')
      except Exception:  # pylint: disable=broad-except  (an unreadable metadata file)
        continue
      if isinstance(config, dict):
        return step, config
    return None
  finally:
    manager.close()


def wait_until_finished(manager: ocp.CheckpointManager) -> None:
  """Blocks until the saves in flight are written; a failure raises as in `save`."""
  with _naming_failures(manager, None):
    manager.wait_until_finished()


@contextlib.contextmanager
def _naming_failures(manager: ocp.CheckpointManager, step: Optional[int]):
  try:
    yield
  except Exception as e:  # pylint: disable=broad-except  (whatever the storage raised)
    intact = sorted(s for s in manager.all_steps() if s != step)
    raise OSError(f'writing to {manager.directory} failed ({_first_line(e)}); the checkpoints '
                  f'already there ({intact or "none"}) are intact. Make room or fix the '
                  'storage, then run the same command again to resume.') from e


def abstract_like(state: Any, sharding: Any = None) -> Any:
  """The restore target: shape/dtype structs of `state` (arrays or ShapeDtypeStructs) with
  `sharding` (one for every leaf, or a tree of them shaped like `state`), or each leaf's own
  sharding when `sharding` is None."""
  def leaf(x, s=None):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s if s is not None else x.sharding)
  if sharding is None or isinstance(sharding, jax.sharding.Sharding):
    return jax.tree.map(lambda x: leaf(x, sharding), state)
  return jax.tree.map(leaf, state, sharding)


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
  _check_layout(manager, step, target)
  args = ocp.args.PyTreeRestore(item=target,
                                restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                partial_restore=True)
  return manager.restore(step, args=args)


def _first_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return f'{type(error).__name__}: {text[0][:200] if text else ""}'


def restore_newest_readable(manager: ocp.CheckpointManager, target: Any,
                            step: Optional[int] = None,
                            restore_fn=None) -> tuple[Any, int, list]:
  """(state, its step, the newer steps that could not be read).

  With `step`, that checkpoint or an error naming it. Without, the newest checkpoint that
  restores; each unreadable one is named in a warning and skipped, and if none restores one
  error names the directory and the steps tried. `restore_fn(manager, target, step)` restores
  one checkpoint (default `restore`; `restore_fields` for part of the state).
  """
  restore_fn = restore_fn or restore
  if step is not None:
    step = _existing_step(manager, step)
    try:
      return restore_fn(manager, target, step), step, []
    except CheckpointMismatch:
      raise
    except Exception as e:  # pylint: disable=broad-except  (any failure to read it)
      raise RuntimeError(
          f'the checkpoint at step {step} in {manager.directory} cannot be read '
          f'({_first_line(e)}); choose another with --config.sampling.checkpoint_step (steps: '
          f'{sorted(manager.all_steps())}), or -1 for the newest readable one.') from e
  steps = sorted(manager.all_steps(), reverse=True)
  if not steps:
    _existing_step(manager, None)  # raises: no checkpoint
  unreadable = []
  for s in steps:
    try:
      return restore_fn(manager, target, s), s, unreadable
    except CheckpointMismatch:
      raise
    except Exception as e:  # pylint: disable=broad-except  (any failure to read it)
      logging.warning('The checkpoint at step %d in %s cannot be read (%s); it is kept as it is '
                      'and the one before it is tried.', s, manager.directory, _first_line(e))
      unreadable.append(s)
  raise RuntimeError(f'none of the checkpoints in {manager.directory} can be read (steps tried: '
                     f'{unreadable}); restore the directory from a copy, or train into a new '
                     '--workdir.')


def move_aside(manager: ocp.CheckpointManager, steps: list) -> None:
  """Renames the checkpoints of `steps` to `<step>.unreadable` (process 0; all processes call
  it), so that training can write those steps again; nothing is deleted."""
  if jax.process_index() == 0:
    for s in steps:
      src = os.path.join(str(manager.directory), str(s))
      dst, i = f'{src}.unreadable', 1
      while os.path.exists(dst):
        dst, i = f'{src}.unreadable.{i}', i + 1
      os.rename(src, dst)
      logging.warning('Moved the unreadable checkpoint of step %d aside to %s.', s, dst)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices('checkpoints moved aside')
  manager.reload()


def restore_or_keep(manager: ocp.CheckpointManager, state: Any, restore_fn=None) -> Any:
  """Auto-resume: the newest readable checkpoint restored onto `state`'s layout, or `state`
  itself when there is none; newer unreadable checkpoints are moved aside. `restore_fn` as in
  `restore_newest_readable`."""
  if manager.latest_step() is None:
    return state
  restored, _, unreadable = restore_newest_readable(manager, abstract_like(state),
                                                    restore_fn=restore_fn)
  if unreadable:
    move_aside(manager, unreadable)
  return restored


def _leaves_by_path(tree) -> dict:
  """{'/'-joined path ('params/conv/kernel'): leaf}, the same paths for a state and for Orbax's
  metadata of it (which stores a NamedTuple's fields as dict keys)."""
  def name(key):
    for attr in ('key', 'name', 'idx'):
      if hasattr(key, attr):
        return str(getattr(key, attr))
    return str(key)
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {'/'.join(name(k) for k in path): leaf for path, leaf in leaves}


def saved_shapes(manager: ocp.CheckpointManager, step: int) -> dict:
  """{'/'-joined path ('params/conv/kernel'): shape} of the arrays saved at `step`, from the
  checkpoint's metadata (nothing is read)."""
  return {path: tuple(leaf.shape) for path, leaf in
          _leaves_by_path(manager.item_metadata(step).tree).items()
          if getattr(leaf, 'shape', None) is not None}


def _check_layout(manager: ocp.CheckpointManager, step: int, target: dict) -> None:
  """Raises CheckpointMismatch, naming the first array, when the checkpoint lacks an array of
  `target` or holds it with another shape (written with other settings)."""
  saved = _leaves_by_path(manager.item_metadata(step).tree)
  wanted = _leaves_by_path(target)
  missing = sorted(set(wanted) - set(saved))
  reshaped = [f'{p} is {tuple(saved[p].shape)} there but {tuple(wanted[p].shape)} here'
              for p in sorted(set(wanted) & set(saved))
              if getattr(saved[p], 'shape', None) is not None
              and tuple(saved[p].shape) != tuple(wanted[p].shape)]
  if missing or reshaped:
    what = (f'has no array {missing[0]}' if missing else reshaped[0])
    more = len(missing) + len(reshaped) - 1
    raise CheckpointMismatch(
        f'the checkpoint at step {step} in {manager.directory} {what}'
        f'{f" (and {more} more differ)" if more else ""}: it was written with other settings '
        '(model.*, or training.phema_sigma_rels); use the ones it was trained with (its '
        'config.json), or a new --workdir.')
