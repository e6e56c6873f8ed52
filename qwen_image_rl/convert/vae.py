"""diffusers AutoencoderKLQwenImage checkpoints <-> QwenImageVAE params.

Names map mechanically: Flax path `encoder/down_blocks_3/conv1/kernel` is the torch key
`encoder.down_blocks.3.conv1.weight` (a `_<int>` suffix is a list index). Layouts:
causal 3-D conv weight [O, I, kT, kH, kW] <-> kernel [kT, kH, kW, I, O] (all taps kept),
Conv2d weight [O, I, kH, kW] <-> kernel [kH, kW, I, O], norm gamma [C,1,1,1] (or [C,1,1] inside
attention blocks) <-> gamma [C]. Every key the model has must be present, including the
resamplers' `time_conv`, which images never use but a saved checkpoint must keep.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

import flax
import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from qwen_image_rl import parallel
from qwen_image_rl.convert import placement
from qwen_image_rl.convert.safetensors_io import (
  CheckpointError,
  DictSource,
  SafetensorsReader,
  check_state_dict,
  known_config,
  read_json,
  save_state_dict,
)
from qwen_image_rl.models.vae import QwenImageVAE, abstract_variables

CLASS_NAME = "AutoencoderKLQwenImage"
DIFFUSERS_VERSION = "0.42.1"  # the version the port was checked against
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"

_INDEXED = re.compile(r"^(.*)_(\d+)$")


def _torch_key(path: tuple[str, ...]) -> str:
  parts = []
  for segment in path[:-1]:
    match = _INDEXED.match(segment)
    parts.extend([match.group(1), match.group(2)] if match else [segment])
  leaf = {"kernel": "weight"}.get(path[-1], path[-1])
  return ".".join(parts + [leaf])


def _is_attention_norm(path: tuple[str, ...], flat: Mapping[tuple[str, ...], Any]) -> bool:
  return path[-2] == "norm" and path[:-2] + ("to_qkv", "kernel") in flat


def _torch_shape(path, shape, flat) -> tuple[int, ...]:
  if path[-1] == "kernel" and len(shape) == 5:
    kt, kh, kw, i, o = shape
    return (o, i, kt, kh, kw)
  if path[-1] == "kernel" and len(shape) == 4:
    kh, kw, i, o = shape
    return (o, i, kh, kw)
  if path[-1] == "gamma":
    return tuple(shape) + ((1, 1) if _is_attention_norm(path, flat) else (1, 1, 1))
  return tuple(shape)


def _to_flax_layout(path, array: np.ndarray) -> np.ndarray:
  if path[-1] == "kernel" and array.ndim == 5:
    return array.transpose(2, 3, 4, 1, 0)
  if path[-1] == "kernel" and array.ndim == 4:
    return array.transpose(2, 3, 1, 0)
  if path[-1] == "gamma":
    return array.reshape(array.shape[0])
  return array


def _to_torch_layout(path, array: np.ndarray, flat) -> np.ndarray:
  if path[-1] == "kernel" and array.ndim == 5:
    return array.transpose(4, 3, 0, 1, 2)
  if path[-1] == "kernel" and array.ndim == 4:
    return array.transpose(3, 2, 0, 1)
  if path[-1] == "gamma":
    return array.reshape(_torch_shape(path, array.shape, flat))
  return array


def expected_torch_shapes(model: QwenImageVAE) -> dict[str, tuple[int, ...]]:
  """Every state-dict key the diffusers model with this config has, with its shape."""
  flat = flax.traverse_util.flatten_dict(nn.meta.unbox(abstract_variables(model))["params"])
  return {_torch_key(p): _torch_shape(p, v.shape, flat) for p, v in flat.items()}


def params_from_source(
  source, model: QwenImageVAE, shardings=None, *, where: str = "AutoencoderKLQwenImage state dict"
) -> dict:
  """{'params': ...} in `model.param_dtype`, read tensor by tensor from `source`.

  `source` has `shapes()` and `read(key)` (a `SafetensorsReader` or a `DictSource`).
  `shardings` (a tree matching {'params': ...}) places each leaf directly with its sharding;
  None returns host numpy arrays. Raises CheckpointError naming missing, unexpected and
  wrong-shape keys.
  """
  flat = flax.traverse_util.flatten_dict(nn.meta.unbox(abstract_variables(model))["params"])
  expected = {_torch_key(p): _torch_shape(p, v.shape, flat) for p, v in flat.items()}
  check_state_dict(source.shapes(), expected, where)
  flat_shardings = (
    None if shardings is None else flax.traverse_util.flatten_dict(shardings["params"])
  )
  params = {}
  for path in flat:
    value = _to_flax_layout(path, source.read(_torch_key(path)))
    sharding = None if flat_shardings is None else flat_shardings[path]
    params[path] = placement.put(value, sharding, model.param_dtype)
    del value  # one tensor on the host at a time
  return {"params": flax.traverse_util.unflatten_dict(params)}


def params_from_torch_state_dict(
  state_dict: Mapping[str, Any],
  model: QwenImageVAE,
  *,
  where: str = "AutoencoderKLQwenImage state dict",
  shardings=None,
) -> dict:
  """diffusers state dict (torch tensors or numpy) -> {'params': ...}; see `params_from_source`."""
  return params_from_source(DictSource(state_dict), model, shardings, where=where)


def params_to_torch_state_dict(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """{'params': ...} (or the inner tree) -> diffusers state dict of float32 numpy arrays."""
  tree = params.get("params", params) if isinstance(params, Mapping) else params
  flat = flax.traverse_util.flatten_dict(nn.meta.unbox(tree))
  out = {}
  for path, value in flat.items():
    array = np.asarray(value).astype(np.float32)
    out[_torch_key(path)] = np.ascontiguousarray(_to_torch_layout(path, array, flat))
  return out


def load_vae(
  directory: str,
  dtype=jnp.float32,
  param_dtype=jnp.float32,
  *,
  shardings=None,
  mesh=None,
  rules=None,
):
  """A diffusers `vae/` directory (config.json + safetensors) -> (QwenImageVAE, {'params': ...}).

  Placement: `shardings` (a tree matching {'params': ...}), or `mesh` (+ logical `rules`) to
  derive them from the model's logical axes, or neither for host numpy arrays.
  """
  config = read_json(os.path.join(directory, "config.json"))
  name = config.get("_class_name", CLASS_NAME)
  if name != CLASS_NAME:
    raise CheckpointError(
      f"{directory}/config.json: _class_name is {name!r}, expected {CLASS_NAME!r}"
    )
  fields = tuple(QwenImageVAE().to_config())  # diffusers' __init__ arguments
  config = known_config(config, fields, f"{directory}/config.json")
  try:
    model = QwenImageVAE.from_config(config, dtype=dtype, param_dtype=param_dtype)
  except ValueError as e:
    raise CheckpointError(f"{directory}/config.json: {e}") from e
  if shardings is None and mesh is not None:
    rules = parallel.DEFAULT_LOGICAL_AXIS_RULES if rules is None else rules
    shardings = parallel.tree_shardings(abstract_variables(model), mesh, rules)
  reader = SafetensorsReader(directory)
  return model, params_from_source(reader, model, shardings, where=directory)


def save_vae(model: QwenImageVAE, params: Mapping[str, Any], directory: str) -> None:
  """Write config.json and float32 safetensors that AutoencoderKLQwenImage.from_pretrained loads."""
  state = params_to_torch_state_dict(params)
  check_state_dict(state, expected_torch_shapes(model), f"save_vae({directory})")
  save_state_dict(state, directory, filename=WEIGHTS_NAME)
  config = {"_class_name": CLASS_NAME, "_diffusers_version": DIFFUSERS_VERSION, **model.to_config()}
  tmp = os.path.join(directory, "config.json.tmp")
  with open(tmp, "w") as f:
    json.dump(config, f, indent=2)
  os.replace(tmp, os.path.join(directory, "config.json"))
