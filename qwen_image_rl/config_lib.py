"""Config checks shared by every trainer: required fields, types, and the trainer registry.

Configs are ml_collections ConfigDicts built by `configs/<file>.py:get_config(arg)`. Overrides on
the command line are type-checked by ml_collections itself; this module checks what the config
file produced, so a bad config fails with a one-line message naming the field, before anything
compiles.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable, Iterable, Mapping

import ml_collections


class ConfigError(ValueError):
  """A config field is missing, unknown, of the wrong type or inconsistent."""


@dataclasses.dataclass(frozen=True)
class TrainerSpec:
  name: str
  run: Callable[[ml_collections.ConfigDict, str], Any]
  required: Mapping[str, type | tuple[type, ...]]
  validate: Callable[[ml_collections.ConfigDict], None] | None
  doc: str


_TRAINERS: dict[str, TrainerSpec] = {}


def register_trainer(name: str, *, required: Mapping[str, Any] = (),
                     validate: Callable[[ml_collections.ConfigDict], None] | None = None):
  """Decorator for `run(config, workdir)`.

  Usage: `@register_trainer('sft', required={'optim.lr': float})`.
  """

  def wrap(run):
    if name in _TRAINERS:
      raise ValueError(f"trainer {name!r} registered twice")
    doc = (run.__doc__ or "").strip().splitlines()
    _TRAINERS[name] = TrainerSpec(name, run, dict(required), validate, doc[0] if doc else "")
    return run

  return wrap


def trainers() -> dict[str, TrainerSpec]:
  import qwen_image_rl.trainers  # noqa: F401  (registers every trainer module)

  return dict(_TRAINERS)


def get_trainer(name: str) -> TrainerSpec:
  known = trainers()
  if name not in known:
    raise ConfigError(f"config.trainer={name!r} is not a known trainer; known: {sorted(known)}")
  return known[name]


_MISSING = object()


def get_field(config: ml_collections.ConfigDict, path: str, default=_MISSING):
  node = config
  for part in path.split("."):
    if isinstance(node, (ml_collections.ConfigDict, dict)) and part in node:
      node = node[part]
    else:
      if default is _MISSING:
        raise ConfigError(f"config.{path} is missing")
      return default
  if isinstance(node, ml_collections.FieldReference):
    node = node.get()
  return node


def _type_name(t) -> str:
  if isinstance(t, tuple):
    return " or ".join(x.__name__ for x in t)
  return t.__name__


def check_fields(config: ml_collections.ConfigDict, required: Mapping[str, Any]) -> None:
  """Each `path: type` must be present, not None, and of that type (int accepted for float)."""
  for path, typ in required.items():
    value = get_field(config, path)
    if value is None:
      raise ConfigError(f"config.{path} is required but not set")
    allowed = typ if isinstance(typ, tuple) else (typ,)
    if float in allowed and isinstance(value, int) and not isinstance(value, bool):
      continue
    if bool not in allowed and isinstance(value, bool):
      raise ConfigError(f"config.{path}={value!r} has type bool, expected {_type_name(typ)}")
    if not isinstance(value, allowed):
      raise ConfigError(f"config.{path}={value!r} has type {type(value).__name__}, "
                        f"expected {_type_name(typ)}")


def check_choice(config, path: str, choices: Iterable[str]) -> None:
  value = get_field(config, path)
  choices = tuple(choices)
  if value not in choices:
    raise ConfigError(f"config.{path}={value!r} is not one of {list(choices)}")


def check_positive(config, *paths: str) -> None:
  for path in paths:
    value = get_field(config, path)
    if not value > 0:
      raise ConfigError(f"config.{path}={value!r} must be > 0")


def transformer_overrides(config: ml_collections.ConfigDict) -> dict:
  """config.model.transformer_overrides as a dict ({} when unset): our own MMDiT fields
  (scan_layers, remat_policy, ...) that change how the step compiles, not what it learns."""
  return dict(config.model.get("transformer_overrides", {}) or {})


def validate(config: ml_collections.ConfigDict) -> TrainerSpec:
  """Everything that can be checked without building a model. Returns the trainer spec."""
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError("--config did not produce a ConfigDict (is the file path right?)")
  trainer = get_field(config, "trainer", None)
  if not isinstance(trainer, str):
    raise ConfigError("config.trainer is required (a string naming the trainer)")
  spec = get_trainer(trainer)
  check_fields(config, spec.required)
  if spec.validate is not None:
    spec.validate(config)
  return spec


def to_json(config: ml_collections.ConfigDict) -> str:
  return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=repr)
