"""Resumable training checkpoints on orbax `CheckpointManager`.

A checkpoint is one step directory `<directory>/<step>/` with two items:
  state/  the train-state pytree (params, opt_state, step, rng key data, ...), as sharded arrays;
  extra/  a JSON dict for everything else the trainer needs to resume exactly (data position,
          seeds, ...).

Orbax writes each step into `<step>.orbax-checkpoint-tmp-*` and renames it to `<step>` only
once every file (and `commit_success.txt`) is on disk, so a save cut short by SIGKILL leaves
a temporary directory that `latest_step` never picks; the next `Checkpointer` deletes it.

Typed PRNG keys (`jax.random.key`) in the state are stored as raw key data and come back as
typed keys when the restore target asks for them.

Usage:
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), save_every=100)
  restored = ckpt.restore(abstract_state)        # None on a fresh run
  if restored: state, extra = restored
  for step in ...:
    ckpt.maybe_save(step, state, {"data_position": ...})
  ckpt.save(final_step, state, extra); ckpt.close()
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from qwen_image_rl.errors import CheckpointError

_STEP_DIR = re.compile(r"^\d+$")
_COMMIT_FILE = "commit_success.txt"  # Written by orbax just before the atomic rename.
_STATE, _EXTRA = "state", "extra"


# ----------------------------------------------------------------------------------------------
# Tree helpers.
# ----------------------------------------------------------------------------------------------


def _key_name(entry) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def _leaf_paths(tree) -> dict[str, Any]:
  """Dotted path (as orbax names array files: `opt_state.0.mu.w`) -> leaf."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {".".join(_key_name(k) for k in path): leaf for path, leaf in leaves}


def _is_typed_key(x) -> bool:
  dtype = getattr(x, "dtype", None)
  return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _to_savable(state):
  """Typed PRNG keys -> raw uint32 key data (orbax stores plain arrays only)."""
  return jax.tree.map(lambda x: jax.random.key_data(x) if _is_typed_key(x) else x, state)


def _abstract_target(target):
  """Restore target with shardings: concrete arrays become ShapeDtypeStructs on their sharding."""

  def one(x):
    if _is_typed_key(x):
      data = jax.eval_shape(jax.random.key_data, x)
      sharding = getattr(x, "sharding", None)
      if not isinstance(sharding, jax.sharding.NamedSharding):
        sharding = None  # Key data has an extra trailing dim; only a named spec carries over.
      return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=sharding)
    if isinstance(x, jax.ShapeDtypeStruct):
      return x
    if isinstance(x, jax.Array):
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    arr = np.asarray(x)
    return jax.ShapeDtypeStruct(arr.shape, arr.dtype)

  return jax.tree.map(one, target)


def _from_restored(restored, target):
  """Raw key data back into typed keys wherever the target holds a typed key."""

  def one(value, want):
    if _is_typed_key(want):
      # ShapeDtypeStruct targets have no key_impl(); the key dtype carries the impl.
      impl = getattr(want.dtype, "_impl", None)
      return jax.random.wrap_key_data(value, impl=impl)
    return value

  return jax.tree.map(one, restored, target)


def _check_tree_matches(stored_metadata, target, where: str) -> None:
  """Raise CheckpointError naming missing / unexpected / wrong-shape keys."""
  stored = _leaf_paths(stored_metadata)
  wanted = _leaf_paths(target)
  missing = sorted(set(wanted) - set(stored))
  unexpected = sorted(set(stored) - set(wanted))
  wrong_shape = sorted(
    f"{k}: checkpoint {tuple(stored[k].shape)} vs target {tuple(wanted[k].shape)}"
    for k in set(stored) & set(wanted)
    if getattr(stored[k], "shape", None) is not None
    and tuple(stored[k].shape) != tuple(wanted[k].shape)
  )
  if missing or unexpected or wrong_shape:
    parts = []
    if missing:
      parts.append(f"missing in checkpoint (in target only): {missing}")
    if unexpected:
      parts.append(f"unexpected in checkpoint (not in target): {unexpected}")
    if wrong_shape:
      parts.append(f"wrong shape: {wrong_shape}")
    raise CheckpointError(
      f"{where}: the checkpoint tree does not match the restore target; " + "; ".join(parts)
    )


def _check_json(extra: dict, where: str) -> dict:
  if extra is None:
    return {}
  if not isinstance(extra, dict):
    raise CheckpointError(f"{where}: `extra` must be a dict, got {type(extra).__name__}")
  try:
    return json.loads(json.dumps(extra))
  except (TypeError, ValueError) as e:
    raise CheckpointError(f"{where}: `extra` must be JSON-serialisable ({e})") from e


# ----------------------------------------------------------------------------------------------
# Checkpointer.
# ----------------------------------------------------------------------------------------------


def committed_steps(directory: str) -> list[int]:
  """Steps whose directory orbax finished and committed, ascending.

  Temporary dirs (`<step>.orbax-checkpoint-tmp-*`) and step dirs without the commit marker are
  ignored: those are saves that never finished.
  """
  directory = epath.Path(directory)  # Local paths and gs:// alike.
  if not directory.is_dir():
    return []
  steps = []
  for path in directory.iterdir():
    if not _STEP_DIR.match(path.name):
      continue
    if not path.is_dir():
      raise CheckpointError(
        f"checkpoint path {path} is a file, expected a step directory; move or delete it"
      )
    if (path / _COMMIT_FILE).exists():
      steps.append(int(path.name))
    else:
      logging.warning("Ignoring uncommitted checkpoint directory %s", path)
  return sorted(steps)


class Checkpointer:
  """Save every `save_every` steps (asynchronously), keep the last `keep`, resume from latest."""

  def __init__(self, directory: str, *, save_every: int, keep: int = 3, async_save: bool = True):
    directory = os.fspath(directory)
    if "://" not in directory:
      directory = os.path.abspath(directory)
    if save_every < 1:
      raise CheckpointError(f"save_every={save_every}: must be >= 1")
    if keep is not None and keep < 1:
      raise CheckpointError(f"keep={keep}: must be >= 1 (or None to keep all)")
    # Any existing ancestor that is a file makes the directory impossible; say which one.
    probe = epath.Path(directory)
    while not probe.exists() and probe.parent != probe:
      probe = probe.parent
    if probe.exists() and not probe.is_dir():
      raise CheckpointError(
        f"checkpoint directory {directory}: {probe} is a file, expected a directory"
      )
    self.directory = directory
    self.save_every = int(save_every)
    self.keep = keep
    self.async_save = bool(async_save)
    options = ocp.CheckpointManagerOptions(
      save_interval_steps=1,  # We decide when to save; orbax just writes.
      max_to_keep=keep,
      create=True,
      cleanup_tmp_directories=True,  # Remove what a killed save left behind.
      enable_async_checkpointing=async_save,
    )
    self._manager = ocp.CheckpointManager(
      directory,
      options=options,
      item_handlers={_STATE: ocp.StandardCheckpointHandler(), _EXTRA: ocp.JsonCheckpointHandler()},
    )

  # -- queries -----------------------------------------------------------------------------------

  def latest_step(self) -> int | None:
    """The newest committed step on disk (a save still in flight does not count)."""
    steps = committed_steps(self.directory)
    return steps[-1] if steps else None

  def all_steps(self) -> list[int]:
    return committed_steps(self.directory)

  # -- saving ------------------------------------------------------------------------------------

  def should_save(self, step: int) -> bool:
    return int(step) % self.save_every == 0

  def maybe_save(self, step: int, state, extra: dict | None = None) -> bool:
    """Save when `step` is a multiple of `save_every`. Returns whether a save started."""
    if not self.should_save(step):
      return False
    return self.save(step, state, extra)

  def save(self, step: int, state, extra: dict | None = None) -> bool:
    """Start a save of `state` and `extra` at `step` now (asynchronous unless async_save=False).

    Device-to-host copies finish before this returns, so the caller may donate or overwrite
    `state` right after. Returns False when `step` is already saved or being saved.
    """
    step = int(step)
    where = f"Checkpointer.save(step={step}) in {self.directory}"
    extra = _check_json(extra, where)
    if step in self._manager.all_steps() or step in committed_steps(self.directory):
      logging.info(
        "Checkpoint for step %d already exists in %s; not saving again.", step, self.directory
      )
      return False
    saved = self._manager.save(
      step,
      args=ocp.args.Composite(
        **{
          _STATE: ocp.args.StandardSave(_to_savable(state)),
          _EXTRA: ocp.args.JsonSave(extra),
        }
      ),
      force=True,
    )
    if saved:
      logging.info(
        "Saving checkpoint for step %d to %s (%s).",
        step,
        self.directory,
        "async" if self.async_save else "sync",
      )
    return bool(saved)

  def wait(self) -> None:
    """Block until every pending save is committed."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

  # -- restoring ---------------------------------------------------------------------------------

  def restore(self, target, step: int | None = None):
    """Restore into `target`'s shapes, dtypes and shardings. Returns (state, extra) or None.

    `target` is a pytree of `jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(...))`
    or concrete arrays; each process reads only its own shards. `step=None` takes the latest
    committed step and returns None when there is none.
    """
    if step is None:
      step = self.latest_step()
      if step is None:
        logging.info("No checkpoint in %s; starting from scratch.", self.directory)
        return None
    step = int(step)
    where = f"Checkpointer.restore(step={step}) from {self.directory}"
    if step not in committed_steps(self.directory):
      raise CheckpointError(
        f"{where}: no committed checkpoint for step {step}; "
        f"committed steps: {committed_steps(self.directory)}"
      )
    self._manager.reload()  # Pick up steps written by other runs since we started.
    abstract = _abstract_target(target)
    metadata = self._manager.item_metadata(step)[_STATE]
    if metadata is None:
      raise CheckpointError(
        f"{where}: cannot read the state metadata of this checkpoint "
        f"({os.path.join(self.directory, str(step), _STATE)})"
      )
    stored_tree = getattr(metadata, "tree", metadata)
    _check_tree_matches(stored_tree, abstract, where)
    restored = self._manager.restore(
      step,
      args=ocp.args.Composite(
        **{
          _STATE: ocp.args.StandardRestore(abstract),
          _EXTRA: ocp.args.JsonRestore(),
        }
      ),
    )
    state = _from_restored(restored[_STATE], target)
    extra = restored[_EXTRA] or {}
    logging.info("Restored checkpoint step %d from %s.", step, self.directory)
    return state, extra

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
