"""`python -m qwen_image_rl.main` with an audit hook that records which files this process
creates or changes under the workdir (tests/multiprocess.py checks that only process 0 writes
config, results and exports). Records go to $WRITE_LOG, one path per line."""

import os
import sys


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


def main() -> None:
  workdir = next(a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--workdir="))
  _install_write_audit(workdir, os.environ["WRITE_LOG"])
  from qwen_image_rl import main as entry

  entry.cli()


if __name__ == "__main__":
  main()
