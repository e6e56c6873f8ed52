"""The teachers of on-policy distillation: checked against the student, kept off the device
unless active (paper sec. 7: "only the active teacher is on GPU; the other is offloaded").

A teacher is an exported pipeline directory (or a workdir holding export/pipeline), named by
`config.teachers.<task>`. Before anything loads, `check_teachers` compares each teacher's
transformer config and latent channel count with the student's and raises ConfigError naming
the teacher and the field. `TeacherBank` holds every teacher's transformer params in host memory
(on TPU / GPU as `pinned_host` arrays, on CPU as numpy) and keeps exactly one of them on the
device: `activate(task)` frees the previous teacher's device buffers and copies the new one in.
"""

from __future__ import annotations

import os
import time

import jax

from qwen_image_rl import parallel
from qwen_image_rl.config_lib import ConfigError
from qwen_image_rl.convert.safetensors_io import read_json
from qwen_image_rl.convert.transformer import load_transformer
from qwen_image_rl.errors import CheckpointError
from qwen_image_rl.models.mmdit import DIFFUSERS_FIELDS
from qwen_image_rl.pipelines import common as pipe_common

HOST_MEMORY_KIND = "pinned_host"


def resolve_teacher(task: str, path: str) -> str:
  """The pipeline directory config.teachers.<task> names (itself or its export/pipeline)."""
  if not path:
    raise ConfigError(
      f"config.teachers.{task} is empty: name the {task} teacher's exported "
      f"pipeline (e.g. runs/demo/rl_{task}/export/pipeline) or its workdir"
    )
  return pipe_common.require_pipeline_dir(path, f"config.teachers.{task}", ConfigError)


def architecture(directory: str) -> dict:
  """The fields that must agree between student and teacher: the transformer's diffusers config
  (defaults filled in as the loader does) and the VAE's latent channels."""
  from qwen_image_rl.models.mmdit import QwenImageTransformer

  config = read_json(os.path.join(directory, "transformer", "config.json"))
  model = QwenImageTransformer.from_config(config)
  arch = {f: getattr(model, f) for f in DIFFUSERS_FIELDS}
  arch["latent_channels"] = read_json(os.path.join(directory, "vae", "config.json")).get("z_dim")
  return arch


def check_teachers(teachers: dict[str, str], student_dir: str) -> dict[str, str]:
  """{task: pipeline dir} for every named teacher, each matching the student's architecture."""
  student = architecture(student_dir)
  dirs = {}
  for task, path in teachers.items():
    directory = resolve_teacher(task, path)
    try:
      arch = architecture(directory)
    except (CheckpointError, ValueError) as e:
      raise ConfigError(f"config.teachers.{task}={path!r}: {e}") from e
    diff = {k: (arch[k], student[k]) for k in student if arch[k] != student[k]}
    if diff:
      what = ", ".join(f"{k} {t} (student {s})" for k, (t, s) in diff.items())
      raise ConfigError(
        f"config.teachers.{task}={path!r}: the teacher's architecture differs "
        f"from the student's (config.init_from): {what}"
      )
    dirs[task] = directory
  return dirs


def host_memory_supported() -> bool:
  """Whether the devices expose a pinned host memory space (TPU, GPU); CPU keeps numpy."""
  device = jax.devices()[0]
  if device.platform == "cpu":
    return False
  return HOST_MEMORY_KIND in {m.kind for m in device.addressable_memories()}


def to_host(params, shardings):
  """params off the device: pinned-host arrays with the device layout, or numpy."""
  if host_memory_supported():
    return jax.device_put(
      params, jax.tree.map(lambda s: s.with_memory_kind(HOST_MEMORY_KIND), shardings)
    )
  return parallel.to_host(params)


class TeacherBank:
  """Every teacher's params in host memory; the active one's also on the device."""

  def __init__(self, host_params: dict, shardings, directories: dict | None = None):
    self.host = host_params
    self.directories = dict(directories or {})  # {task: the pipeline it was read from}
    self.shardings = shardings
    self.active_task = None
    self.active = None
    self.swaps = 0
    self.last_swap_seconds = 0.0

  @classmethod
  def load(cls, dirs: dict[str, str], shardings, dtype, overrides=None):
    """Reads each teacher's transformer straight to host memory (a directory named by two tasks
    is read once and shared)."""
    by_dir, host = {}, {}
    for task, directory in dirs.items():
      if directory not in by_dir:
        _, params = load_transformer(
          os.path.join(directory, "transformer"), dtype=dtype, **(overrides or {})
        )
        by_dir[directory] = to_host(params, shardings)
      host[task] = by_dir[directory]
    return cls(host, shardings, dirs)

  def activate(self, task: str):
    """The task's teacher params on the device (the previous teacher's device copy freed)."""
    if task == self.active_task:
      return self.active
    start = time.perf_counter()
    self.release()
    self.active = jax.block_until_ready(parallel.shard_tree(self.host[task], self.shardings))
    self.active_task = task
    self.swaps += 1
    self.last_swap_seconds = time.perf_counter() - start
    return self.active

  def release(self):
    """Frees the active teacher's device buffers (its host copy stays)."""
    if self.active is not None:
      for leaf in jax.tree.leaves(self.active):
        leaf.delete()
    self.active, self.active_task = None, None

  def on_device(self, task: str) -> bool:
    """Whether any of the task's teacher params live in device memory."""
    if task == self.active_task:
      return True
    return any(
      isinstance(x, jax.Array) and x.sharding.memory_kind not in (HOST_MEMORY_KIND,)
      for x in jax.tree.leaves(self.host[task])
    )
