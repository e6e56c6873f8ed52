"""`python -m qwen_image_rl.main` with an audit hook that records which files this process
creates or changes under the workdir (tests/multiprocess.py checks that only process 0 writes
config, results and exports). Records go to $WRITE_LOG, one path per line.

With a persistent compilation cache ($JAX_COMPILATION_CACHE_DIR), every process writes its own
entries (see `_cache_from_every_process`).
"""

import os
import sys
import warnings


def _install_write_audit(workdir: str, log_path: str) -> None:
  workdir = os.path.abspath(workdir)
  log = open(log_path, "a", buffering=1)

  def record(path) -> None:
    if isinstance(path, (str, bytes, os.PathLike)):
      path = os.path.abspath(os.fsdecode(path))
      if path.startswith(workdir + os.sep):
        log.write(os.path.relpath(path, workdir) + "\n")

  def hook(event, args):
    if event == "open" and args[0] is not None:
      mode, flags = args[1], args[2]
      writes = any(c in (mode or "") for c in "wax+") or flags & (os.O_WRONLY | os.O_RDWR)
      if writes:
        record(args[0])
    elif event in ("os.rename", "os.replace"):
      record(args[1])

  sys.addaudithook(hook)


def _cache_from_every_process() -> None:
  """Let every process write its programs to the persistent compilation cache, not process 0
  only.

  jax 0.10 writes cache entries from process 0 alone (one writer per shared GCS directory), and
  on CPU a program's key includes the process's own topology, so process 1 never finds a
  process-0 entry: without this every relaunch of a test job would compile everything again in
  process 1. Each process writes only keys that it alone computes (no two writers per file).
  Test-only: it replaces jax's private `_cache_write` with the same checks minus the process test.
  """
  from jax._src import compilation_cache, compiler, config

  if not hasattr(compiler, "_cache_write"):  # another jax: process 0 still caches
    return

  def write(cache_key, compile_time_secs, module_name, backend, executable, host_callbacks):
    if host_callbacks or compile_time_secs < config.persistent_cache_min_compile_time_secs.value:
      return
    try:
      compilation_cache.put_executable_and_time(
        cache_key, module_name, executable, backend, int(compile_time_secs)
      )
    except Exception as e:  # as jax's own writer: a failed write only costs a compile later
      warnings.warn(f"persistent cache write of {module_name!r} failed: {e!r}", stacklevel=2)

  compiler._cache_write = write


def main() -> None:
  workdir = next(a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--workdir="))
  _install_write_audit(workdir, os.environ["WRITE_LOG"])
  if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    _cache_from_every_process()
  from qwen_image_rl import main as entry

  entry.cli()


if __name__ == "__main__":
  main()
