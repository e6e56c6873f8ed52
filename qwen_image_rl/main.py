"""Entry point: `python -m qwen_image_rl.main --config=configs/<file>.py[:variant] --workdir=DIR`.

The config's `trainer` field selects the job; `--config.a.b=value` overrides any field (type
checked). The resolved config is written to DIR/config.json before the trainer starts (by
process 0 of a multi-process run; DIR may be a gs:// URL). Processes launched by hand join with
`--coordinator_address=HOST:PORT --num_processes=N --process_id=I`.
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

from qwen_image_rl import config_lib, host_memory, trainers
from qwen_image_rl.runner import run

FLAGS = flags.FLAGS


def _trainer_list() -> str:
  # Listing trainers imports them; keep it out of the import path of `main` itself.
  try:
    specs = [trainers.get(name) for name in trainers.names()]
  except Exception as e:  # pragma: no cover - a broken trainer should not hide --help
    return f"(could not list trainers: {e})"
  return "; ".join(f"{s.name}: {s.doc}" if s.doc else s.name for s in specs)


_CONFIG = config_flags.DEFINE_config_file(
  "config",
  None,
  "Config file, `configs/<file>.py[:variant]`. Trainers: (see --helpfull)",
  lock_config=True,
)
_WORKDIR = flags.DEFINE_string(
  "workdir", None, "Run directory (local or gs://): checkpoints, events, results, exports."
)
_COORDINATOR = flags.DEFINE_string(
  "coordinator_address",
  None,
  "Multi-process runs launched by hand: HOST:PORT of process 0 (jax.distributed). TPU VM pods "
  "and GKE need none of these three flags.",
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-process: number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-process: this process's index.")


def _fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def main(argv):
  if len(argv) > 1:
    _fail(f"unexpected arguments: {' '.join(argv[1:])}")
  try:
    distributed = dict(
      coordinator_address=_COORDINATOR.value,
      num_processes=_NUM_PROCESSES.value,
      process_id=_PROCESS_ID.value,
    )
    run(_CONFIG.value, _WORKDIR.value, distributed)
  except config_lib.ConfigError as e:
    _fail(str(e))


def _parse_flags(argv):
  """absl parsing, but with one-line errors for unknown config fields and bad config files."""
  try:
    rest = FLAGS(argv)
  except flags.Error as e:
    _fail(str(e).splitlines()[0])
  except (AttributeError, KeyError) as e:  # ml_collections: unknown field in an override
    msg = str(e).strip("'\"").replace("\\n", " ").replace("\n", " ").replace("\\'", "'")
    _fail(f"unknown config field in an override: {msg}")
  value = _CONFIG.value
  if value is not None and type(value).__name__ == "_ErrorConfig":
    cause = object.__getattribute__(value, "_error")
    _fail(f"--config: could not load the config file: {str(cause).splitlines()[0]}")
  if value is None:
    _fail("--config is required, e.g. --config=configs/sft.py:tiny")
  return rest


def _help_with_trainers():
  FLAGS["config"].help = (
    "Config file, `configs/<file>.py[:variant]`; its `trainer` field picks one of: "
    + _trainer_list()
  )


def cli():
  host_memory.tune_malloc()  # before any jitted step allocates (see host_memory.py)
  if any(a in ("--help", "--helpshort", "--helpfull", "-h") for a in sys.argv[1:]):
    _help_with_trainers()
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  cli()
