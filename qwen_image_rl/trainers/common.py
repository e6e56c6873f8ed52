"""What every trainer shares: mesh, checkpointer, metrics, resume, and the step loop.

A trainer builds its model, state and jitted step, then hands them to `fit`, which owns the loop:
batches are a pure function of (seed, step), so a resumed run replays exactly the same data.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from absl import logging

from qwen_image_rl import parallel, paths, profiling
from qwen_image_rl.checkpoint import Checkpointer
from qwen_image_rl.metrics import MetricLogger
from qwen_image_rl.train_state import abstract_like


@dataclasses.dataclass
class RunContext:
  config: Any
  workdir: str
  mesh: jax.sharding.Mesh
  rules: tuple
  checkpointer: Checkpointer
  logger: MetricLogger

  def close(self):
    self.checkpointer.close()
    self.logger.close()


def make_context(config, workdir: str, mesh=None) -> RunContext:
  mesh = parallel.make_mesh(dict(config.mesh)) if mesh is None else mesh
  logging.info("Mesh %s over %d devices.", dict(mesh.shape), mesh.size)
  ckpt = Checkpointer(
    os.path.join(workdir, "checkpoints"),
    save_every=config.checkpoint.every,
    keep=config.checkpoint.keep,
    async_save=config.checkpoint.async_save,
  )
  logger = MetricLogger(
    workdir, total_steps=config.total_steps, progress_every=config.log.progress_every
  )
  return RunContext(
    config, workdir, mesh, tuple(tuple(r) for r in config.logical_axis_rules), ckpt, logger
  )


def restore_or_keep(ctx: RunContext, state, shardings):
  """Resume from the latest checkpoint in the workdir if there is one. Returns (state, step)."""
  restored = ctx.checkpointer.restore(abstract_like(state, shardings))
  if restored is None:
    return state, 0
  state, extra = restored
  step = int(extra.get("step", int(state.step)))
  print(f"Resumed from {ctx.checkpointer.directory} at step {step}.", flush=True)
  return state, step


class NonFiniteError(RuntimeError):
  """Too many consecutive updates had a NaN/inf loss."""


def _stop(ctx: RunContext, nonfinite: int, unit: str, done: int, reason: str):
  ctx.checkpointer.wait()
  raise NonFiniteError(
    f"{nonfinite} consecutive {unit}s with a non-finite {reason} at {unit} {done}; stopping. "
    f"The last good checkpoint is step {ctx.checkpointer.latest_step()} in "
    f"{ctx.checkpointer.directory}"
  )


def fit(
  ctx: RunContext,
  state,
  *,
  train_step: Callable,
  batch_for_step: Callable[[int], Any],
  start_step: int,
  total_steps: int,
  max_consecutive_nonfinite: int = 3,
  on_step_end: Callable[[int, Any, dict], None] | None = None,
  on_skip: Callable[[int, dict], str] | None = None,
  unit: str = "step",
):
  """Run steps [start_step, total_steps) with logging, progress and periodic checkpoints.

  `train_step(state, batch) -> (new_state, metrics)` is jitted by the caller (it may donate the
  state), or is a host function around jitted calls (an RL iteration); `metrics` must hold a
  scalar 'loss'. Metric names without a '/' are logged as 'train/<name>', others as they are.
  The step itself must return the old state when the loss is not finite (see
  `train_state.keep_if_finite`); here such a step is logged as skipped (`on_skip(done,
  metrics)` may log more and returns what was non-finite, default 'loss'), and
  `max_consecutive_nonfinite` in a row stop the run, leaving the last good checkpoint.
  `on_step_end(done, state, scalars)` runs after each completed step (evals, images).

  A step's metrics are read after the next step is dispatched, so that the host's work (the
  next batch, logging) overlaps the device's; steps that save a checkpoint or have an
  `on_step_end` are read at once, while their state is still alive.
  """
  record = _StepRecorder(ctx, total_steps, max_consecutive_nonfinite, on_skip, unit)
  profiler = profiling.StepProfiler.from_config(ctx.config, ctx.workdir)
  pending = None  # (done, metrics) of the step dispatched before this one
  parallel.barrier("fit_start")  # hosts start stepping together (see `parallel.barrier`)
  for step in range(start_step, total_steps):
    done = step + 1
    profiler.step_starts(step)
    state, metrics = train_step(state, batch_for_step(step))
    profiler.step_done(step, (state, metrics))
    if pending is not None:
      record(*pending)
      pending = None
    needs_state = on_step_end is not None or ctx.checkpointer.should_save(done)
    if not (needs_state or done == total_steps):
      pending = (done, metrics)
      continue
    scalars = record(done, metrics)
    if scalars is not None:
      ctx.checkpointer.maybe_save(done, state, extra={"step": done})
      if on_step_end is not None:
        on_step_end(done, state, scalars)
  profiler.stop()  # a profile window past the last step ends here
  ctx.checkpointer.save(total_steps, state, extra={"step": total_steps})
  ctx.checkpointer.wait()
  return state, record.history


class _StepRecorder:
  """Reads one finished step's metrics: logs them, or counts a skipped (non-finite) update and
  stops the run after too many in a row."""

  def __init__(self, ctx, total_steps, max_consecutive_nonfinite, on_skip, unit):
    self.ctx, self.total_steps, self.unit = ctx, total_steps, unit
    self.max_nonfinite, self.on_skip = max_consecutive_nonfinite, on_skip
    self.log_every = max(int(ctx.config.log.every), 1)
    self.nonfinite = 0
    self.history = []

  def __call__(self, done: int, metrics) -> dict | None:
    """The step's scalars, or None when its update was skipped."""
    scalars = scalar_metrics(metrics)
    if not math.isfinite(scalars["loss"]):
      self._skipped(done, scalars)
      return None
    self.nonfinite = 0
    if done % self.log_every == 0 or done == self.total_steps:
      self.ctx.logger.scalars(
        done, {k if "/" in k else f"train/{k}": v for k, v in scalars.items()}
      )
      self.history.append({"step": done, **scalars})
    self.ctx.logger.progress(done)
    return scalars

  def _skipped(self, done: int, scalars: dict) -> None:
    self.nonfinite += 1
    reason = self.on_skip(done, scalars) if self.on_skip is not None else "loss"
    unit, n = self.unit, self.nonfinite
    logging.warning("%s %d: non-finite %s, update skipped (%d in a row)", unit, done, reason, n)
    print(f"warning: {unit} {done}: non-finite {reason}, update skipped ({n} in a row)", flush=True)
    if n >= self.max_nonfinite:
      _stop(self.ctx, n, unit, done, reason)


def final_checkpoint_exists(workdir: str, total_steps: int) -> bool:
  from qwen_image_rl.checkpoint import committed_steps

  directory = paths.join(workdir, "checkpoints")
  return paths.isdir(directory) and total_steps in committed_steps(directory)


def save_export(save: Callable[[str], None], directory: str) -> None:
  """`save(local_dir)` (a `save_pretrained`) into `directory`, local or a gs:// URL."""
  with paths.staged_dir(directory) as local:
    save(local)


def scalar_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
  return {k: float(np.asarray(v)) for k, v in jax.device_get(dict(metrics)).items()}
