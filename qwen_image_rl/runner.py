"""Run one job from a config: validate, record the config, dispatch to the trainer.

Flag-free so that other drivers (the demo, notebooks, tests) can call it; `main.py` is the
command-line front end.
"""

from __future__ import annotations

import os

from absl import logging

from qwen_image_rl import config_lib, trainers


def check_workdir(workdir: str | None) -> str:
  if not workdir:
    raise config_lib.ConfigError("--workdir is required")
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise config_lib.ConfigError(f"--workdir={workdir} is a file, expected a directory")
  return workdir


def write_config(config, workdir: str) -> str:
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "config.json")
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(config_lib.to_json(config))
  os.replace(tmp, path)
  return path


def run(config, workdir: str):
  """Validate, record the config, and hand over to the trainer. Returns the trainer's result."""
  workdir = check_workdir(workdir)
  spec = trainers.validate(config)
  from qwen_image_rl.parallel import maybe_initialize_distributed

  maybe_initialize_distributed(config.get("distributed", "auto"))
  import jax

  if jax.process_index() == 0:
    write_config(config, workdir)
  logging.info("trainer=%s workdir=%s devices=%d", spec.name, workdir, jax.device_count())
  return spec.run(config, workdir)
