"""A profiler switch: capture a few training steps with jax.profiler into WORKDIR/profile.

config.profile = dict(start_step=S, num_steps=N) traces steps S+1 .. S+N (the steps that start
after S steps are done, so compilation at the first step can be left out with S >= 1). The trace
lands in the TensorBoard profile plugin's layout, WORKDIR/profile/plugins/profile/<run>/
<host>.xplane.pb, on every process (each host traces its own chips): open it with
`tensorboard --logdir WORKDIR/profile`. num_steps=0 (the default) turns it off.
"""

from __future__ import annotations

import os

import jax
from absl import logging

from qwen_image_rl import config_lib, paths


def profile_settings(config) -> tuple[int, int]:
  """(start_step, num_steps) from config.profile; (0, 0) when absent or off."""
  profile = config.get("profile", None)
  if not profile:
    return 0, 0
  start, num = int(profile.get("start_step", 0)), int(profile.get("num_steps", 0))
  if start < 0 or num < 0:
    raise config_lib.ConfigError(
      f"config.profile: start_step={start} and num_steps={num} must be >= 0"
    )
  return start, num


class StepProfiler:
  """Call `step_starts(step)` before and `step_done(step, outputs)` after each step (0-based)."""

  def __init__(self, workdir: str, start_step: int, num_steps: int):
    self.directory = paths.join(workdir, "profile")
    self.start_step, self.num_steps = int(start_step), int(num_steps)
    self.active = False

  @classmethod
  def from_config(cls, config, workdir: str) -> StepProfiler:
    return cls(workdir, *profile_settings(config))

  def step_starts(self, step: int) -> None:
    if self.num_steps and step == self.start_step and not self.active:
      if not paths.is_url(self.directory):
        os.makedirs(self.directory, exist_ok=True)
      logging.info(
        "Profiling steps %d..%d into %s", step + 1, step + self.num_steps, self.directory
      )
      jax.profiler.start_trace(self.directory)
      self.active = True

  def step_done(self, step: int, outputs=None) -> None:
    """Stops the trace after the last profiled step, once its computations have finished."""
    if self.active and step + 1 >= self.start_step + self.num_steps:
      jax.block_until_ready(outputs)
      self.stop()

  def stop(self) -> None:
    if self.active:
      jax.profiler.stop_trace()
      self.active = False
      print(f"Profile written to {self.directory}", flush=True)
