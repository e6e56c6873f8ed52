"""Trainers, one module per `config.trainer`, found by name (big_vision style).

A trainer module `qwen_image_rl/trainers/<name>.py` provides
  REQUIRED             {'dotted.field': type}: fields that must be set, with their types;
  validate(config)     the trainer's other checks, before anything is built (ConfigError);
  train(config, workdir)  the job; its docstring's first line is its `--help` entry.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from collections.abc import Callable, Mapping
from typing import Any

import ml_collections

from qwen_image_rl import config_lib
from qwen_image_rl.config_lib import ConfigError

NOT_TRAINERS = ("common",)  # shared helpers, not jobs


@dataclasses.dataclass(frozen=True)
class TrainerSpec:
  name: str
  run: Callable[[ml_collections.ConfigDict, str], Any]
  required: Mapping[str, Any]
  validate: Callable[[ml_collections.ConfigDict], None]
  doc: str


def names() -> list[str]:
  return sorted(
    m.name
    for m in pkgutil.iter_modules(__path__)
    if m.name not in NOT_TRAINERS and not m.name.startswith("_")
  )


def get(name: str) -> TrainerSpec:
  if name not in names():
    raise ConfigError(f"config.trainer={name!r} is not a known trainer; known: {names()}")
  module = importlib.import_module(f"{__name__}.{name}")
  doc = (module.train.__doc__ or "").strip().splitlines()
  return TrainerSpec(
    name, module.train, dict(module.REQUIRED), module.validate, doc[0] if doc else ""
  )


def validate(config: ml_collections.ConfigDict) -> TrainerSpec:
  """Everything that can be checked without building a model. Returns the trainer spec."""
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError("--config did not produce a ConfigDict (is the file path right?)")
  trainer = config_lib.get_field(config, "trainer", None)
  if not isinstance(trainer, str):
    raise ConfigError("config.trainer is required (a string naming the trainer)")
  spec = get(trainer)
  config_lib.check_fields(config, spec.required)
  spec.validate(config)
  return spec
