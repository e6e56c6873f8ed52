"""The profiler switch: config.profile captures the chosen steps into WORKDIR/profile."""

import glob
import os

import jax
import jax.numpy as jnp
import ml_collections
import pytest

from qwen_image_rl import config_lib, profiling


def _config(start_step, num_steps):
  return ml_collections.ConfigDict(dict(profile=dict(start_step=start_step, num_steps=num_steps)))


def _traces(workdir):
  return glob.glob(os.path.join(workdir, "profile", "plugins", "profile", "*", "*.xplane.pb"))


def test_profiled_steps_write_a_tensorboard_trace(tmp_path):
  workdir = str(tmp_path)
  profiler = profiling.StepProfiler.from_config(_config(1, 2), workdir)
  step_fn = jax.jit(lambda x: jnp.tanh(x @ x.T))
  x = jnp.ones((16, 16))
  for step in range(5):
    profiler.step_starts(step)
    if step == 1:
      assert profiler.active
    x = step_fn(x)
    profiler.step_done(step, x)
    if step == 2:  # steps 2 and 3 (1-based) traced, then stopped
      assert not profiler.active
  (trace,) = _traces(workdir)
  assert os.path.getsize(trace) > 0


def test_profiling_is_off_by_default_and_checks_its_window(tmp_path):
  profiler = profiling.StepProfiler.from_config(ml_collections.ConfigDict(), str(tmp_path))
  profiler.step_starts(0)
  profiler.step_done(0)
  assert not profiler.active and not _traces(str(tmp_path))
  with pytest.raises(config_lib.ConfigError, match="num_steps=-1 must be >= 0"):
    profiling.profile_settings(_config(0, -1))
