"""Run one job from a config: validate, record the config, dispatch to the trainer.

Flag-free so that other drivers (the demo, notebooks, tests) can call it; `main.py` is the
command-line front end.
"""

from __future__ import annotations

from absl import logging

from qwen_image_rl import config_lib, paths, profiling, trainers


def check_workdir(workdir: str | None) -> str:
  if not workdir:
    raise config_lib.ConfigError("--workdir is required")
  if paths.exists(workdir) and not paths.isdir(workdir):
    raise config_lib.ConfigError(f"--workdir={workdir} is a file, expected a directory")
  return workdir


def write_config(config, workdir: str) -> str:
  return paths.write_text_atomic(paths.join(workdir, "config.json"), config_lib.to_json(config))


def run(config, workdir: str, distributed: dict | None = None):
  """Validate, record the config, and hand over to the trainer. Returns the trainer's result.

  `distributed`: jax.distributed.initialize's coordinator_address, num_processes and process_id
  for a multi-process run launched by hand (pods with a cluster environment need none).
  """
  workdir = check_workdir(workdir)
  spec = trainers.validate(config)
  profiling.profile_settings(config)  # a bad profile window fails before any work
  from qwen_image_rl.parallel import maybe_initialize_distributed

  try:
    maybe_initialize_distributed(config.get("distributed", "auto"), **(distributed or {}))
  except ValueError as e:
    raise config_lib.ConfigError(str(e)) from e
  import jax

  if jax.process_index() == 0:
    write_config(config, workdir)
  logging.info(
    "trainer=%s workdir=%s process %d/%d devices=%d (local %d)",
    spec.name,
    workdir,
    jax.process_index(),
    jax.process_count(),
    jax.device_count(),
    jax.local_device_count(),
  )
  return spec.run(config, workdir)
