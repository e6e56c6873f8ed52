"""Launch a job as N processes x D simulated CPU devices on 127.0.0.1 (jax.distributed over
gloo) through the real command line, `qwen_image_rl.main` with --coordinator_address etc.

The config is Python that builds `c` (as in tests/kill_and_resume.py); it is written to a
config file whose get_config() runs it. Processes log to files beside the workdir (a full pipe
would block them). Runs of one test can share a JAX persistent compilation cache.
"""

import os
import resource
import socket
import subprocess
import sys
import time

from tests.xla_flags import cpu_xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def write_config_file(path: str, config_code: str) -> str:
  body = "\n".join("  " + line for line in config_code.splitlines())
  with open(path, "w") as f:
    f.write(
      f"import sys\nsys.path.insert(0, {REPO!r})\n\n\ndef get_config():\n{body}\n  return c\n"
    )
  return path


def _env(devices: int, cache_dir: str | None) -> dict:
  env = dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    XLA_FLAGS=cpu_xla_flags(devices),
    PYTHONPATH=REPO,
  )
  if cache_dir:
    env.update(
      JAX_COMPILATION_CACHE_DIR=cache_dir,
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
  return env


def start(config_file, workdir, *, processes: int, devices: int, cache_dir=None, tag="run"):
  """Start the processes; returns [(Popen, log path)]."""
  port = free_port()
  children = []
  for i in range(processes):
    cmd = [
      sys.executable,
      os.path.join(REPO, "tests", "multiprocess_child.py"),
      f"--config={config_file}",
      f"--workdir={workdir}",
    ]
    if processes > 1:
      cmd += [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={processes}"]
      cmd += [f"--process_id={i}"]
    log = f"{workdir.rstrip('/')}.{tag}.{i}.log"
    env = dict(_env(devices, cache_dir), WRITE_LOG=write_log(workdir, i))
    with open(log, "w") as out:
      proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    children.append((proc, log))
  return children


def _tail(children) -> str:
  parts = []
  for proc, log in children:
    with open(log) as f:
      parts.append(f"--- {log} (status {proc.poll()}):\n{f.read()[-3000:]}")
  return "\n".join(parts)


def kill_all(children) -> None:
  for proc, _ in children:
    if proc.poll() is None:
      proc.kill()  # SIGKILL: no cleanup, as a preempted host
  for proc, _ in children:
    proc.wait(timeout=30)


def run(
  config_file,
  workdir,
  *,
  processes=2,
  devices=4,
  cache_dir=None,
  kill_after_step=None,
  timeout=900.0,
  tag="run",
):
  """Run to completion (every process must exit 0), or with `kill_after_step` SIGKILL all
  processes once a checkpoint at or past that step is committed (none may finish first)."""
  from qwen_image_rl.checkpoint import committed_steps

  began, cpu = time.time(), _children_cpu()
  children = start(
    config_file, workdir, processes=processes, devices=devices, cache_dir=cache_dir, tag=tag
  )
  ckpt = os.path.join(workdir, "checkpoints")
  deadline = time.time() + timeout
  try:
    while time.time() < deadline:
      status = [p.poll() for p, _ in children]
      if kill_after_step is None and all(s is not None for s in status):
        assert all(s == 0 for s in status), _tail(children)
        return
      if any(s not in (None, 0) for s in status):
        raise AssertionError("a process failed:\n" + _tail(children))
      if kill_after_step is not None:
        if any(s is not None for s in status):
          raise AssertionError("finished before it could be killed:\n" + _tail(children))
        if os.path.isdir(ckpt) and any(s >= kill_after_step for s in committed_steps(ckpt)):
          kill_all(children)
          return
      time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s:\n" + _tail(children))
  finally:
    kill_all(children)
    print(
      f"[multiprocess] {tag} ({processes}x{devices}): {time.time() - began:.1f} s wall, "
      f"{_children_cpu() - cpu:.1f} s CPU",
      flush=True,
    )


def _children_cpu() -> float:
  usage = resource.getrusage(resource.RUSAGE_CHILDREN)
  return usage.ru_utime + usage.ru_stime


def final_state(directory: str, step: int | None = None):
  """The flattened train state of a committed checkpoint, as numpy arrays by path: step `step`
  of the checkpoint directory `directory`, or with no step `directory` is one step's."""
  import jax
  import numpy as np
  import orbax.checkpoint as ocp

  path = (
    os.path.join(directory, "state")
    if step is None
    else os.path.join(directory, str(step), "state")
  )
  checkpointer = ocp.StandardCheckpointer()
  metadata = checkpointer.metadata(path)
  metadata = getattr(metadata, "item_metadata", metadata)
  metadata = getattr(metadata, "tree", metadata)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])  # whatever topology wrote it
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata)
  state = checkpointer.restore(path, target)
  flat = jax.tree_util.tree_flatten_with_path(state)[0]
  return {jax.tree_util.keystr(p): np.asarray(x) for p, x in flat}


def write_log(workdir: str, process: int) -> str:
  return f"{workdir.rstrip('/')}.writes.{process}"


def files_written(workdir: str, process: int, skip=("checkpoints",)) -> set[str]:
  """Workdir files (outside `skip`) that `process` created, changed or renamed into place, in
  every run of it (tests/multiprocess_child.py records them)."""
  path = write_log(workdir, process)
  if not os.path.exists(path):
    return set()
  with open(path) as f:
    names = {line.strip() for line in f if line.strip()}
  return {n for n in names if n.split(os.sep)[0] not in skip}
