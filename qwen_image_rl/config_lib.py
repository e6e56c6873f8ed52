"""Config checks shared by every trainer: required fields, types, choices (a leaf module).

Configs are ml_collections ConfigDicts built by `configs/<file>.py:get_config(arg)`. Overrides on
the command line are type-checked by ml_collections itself; this module checks what the config
file produced, so a bad config fails with a one-line message naming the field, before anything
compiles. The trainers themselves (and their schemas) are found in `qwen_image_rl.trainers`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

import ml_collections


class ConfigError(ValueError):
  """A config field is missing, unknown, of the wrong type or inconsistent."""


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
      raise ConfigError(
        f"config.{path}={value!r} has type {type(value).__name__}, expected {_type_name(typ)}"
      )


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
  """config.model.transformer_overrides as a dict ({} when unset): our own MMDiT fields, not
  diffusers': how the step compiles (scan_layers, remat_policy, ...) and how fresh weights are
  drawn (init_scheme); a loaded checkpoint's weights are the same under any of them."""
  return dict(config.model.get("transformer_overrides", {}) or {})


def to_json(config: ml_collections.ConfigDict) -> str:
  return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=repr)


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """A nested config (ConfigDict or dict) -> {"a.b.c": leaf value}."""
  out = {}
  for key, value in tree.items():
    if hasattr(value, "items"):
      out.update(flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out
