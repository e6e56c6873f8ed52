"""Shared by the exact-resume tests: run `main.run(config, workdir)` in a child process, SIGKILL
it once a checkpoint at or past a given step is committed, and compare final checkpoints."""

import os
import signal
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sigkill(proc, timeout: float = 30.0) -> None:
  """Kill a child process the hard way (no cleanup, as a preempted host) and reap it."""
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=timeout)


def run_child(
  config_code: str,
  workdir: str,
  kill_after_step: int | None = None,
  timeout: float = 600.0,
  compilation_cache: str | None = None,
) -> None:
  """Runs main.run on the config that `config_code` (Python defining `c`) builds.

  Without `kill_after_step` the child must finish with status 0. With it, the child is killed
  with SIGKILL as soon as a checkpoint >= kill_after_step is committed (it must not finish first).
  `compilation_cache`: a JAX persistent compilation cache directory shared by the children of one
  test, so that the second and third runs of the same program load its executables instead of
  compiling them again (compilation is most of these tests' time on CPU).
  """
  from qwen_image_rl.checkpoint import committed_steps

  code = (
    f"import sys; sys.path.insert(0, {REPO!r})\n"
    f"from qwen_image_rl import main\n"
    f"{config_code}\n"
    f"main.run(c, {workdir!r})\n"
  )
  # XLA_FLAGS come from conftest: 8 devices and the fast-compile flags.
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  if compilation_cache:
    env.update(
      JAX_COMPILATION_CACHE_DIR=compilation_cache,
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
  proc = subprocess.Popen(
    [sys.executable, "-c", code],
    cwd=REPO,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
  )
  if kill_after_step is None:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out.decode()[-3000:]
    return
  ckpt = os.path.join(workdir, "checkpoints")
  deadline = time.time() + timeout
  while time.time() < deadline:
    if proc.poll() is not None:
      raise AssertionError(
        "child finished before it could be killed: " + proc.stdout.read().decode()[-3000:]
      )
    if os.path.isdir(ckpt) and any(s >= kill_after_step for s in committed_steps(ckpt)):
      break
    time.sleep(0.05)
  sigkill(proc)


def assert_killed_then_resumed_run_is_exact(
  config_code: str, straight: str, resumed: str, total_steps: int, kill_after_step: int
) -> None:
  """A straight run and a run killed after `kill_after_step` then restarted end bit-identical."""
  import jax
  import orbax.checkpoint as ocp

  from qwen_image_rl.checkpoint import committed_steps

  cache = os.path.join(os.path.dirname(os.path.abspath(straight)), "compilation_cache")
  run_child(config_code, straight, compilation_cache=cache)
  run_child(config_code, resumed, kill_after_step=kill_after_step, compilation_cache=cache)
  assert max(committed_steps(os.path.join(resumed, "checkpoints"))) < total_steps
  run_child(config_code, resumed, compilation_cache=cache)
  load = lambda w: ocp.StandardCheckpointer().restore(
    os.path.join(w, "checkpoints", str(total_steps), "state")
  )
  leaves_a, leaves_b = jax.tree.leaves(load(straight)), jax.tree.leaves(load(resumed))
  assert len(leaves_a) == len(leaves_b) > 10
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
