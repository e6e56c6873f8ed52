"""diffusers `QwenImageTransformer2DModel` checkpoints <-> Flax `QwenImageTransformer` params.

Every torch Linear `weight [out, in]` is a Flax `kernel [in, out]` (transposed); biases and norm
weights copy as they are. Blocks are `transformer_blocks.{i}.*` in torch and either
`transformer_blocks_{i}` (scan_layers=False) or one `transformer_blocks` subtree with a leading
layer axis (scan_layers=True) in Flax.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
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
from qwen_image_rl.models.mmdit import DIFFUSERS_FIELDS, QwenImageTransformer

# (torch module name, flax path) for the Linear layers outside / inside a block.
_TOP_LINEARS = (
  ("time_text_embed.timestep_embedder.linear_1", ("time_text_embed", "linear_1")),
  ("time_text_embed.timestep_embedder.linear_2", ("time_text_embed", "linear_2")),
  ("img_in", ("img_in",)),
  ("txt_in", ("txt_in",)),
  ("norm_out.linear", ("norm_out",)),
  ("proj_out", ("proj_out",)),
)
_TOP_NORMS = (("txt_norm", ("txt_norm",)),)
_BLOCK_LINEARS = (
  ("img_mod.1", ("img_mod",)),
  ("txt_mod.1", ("txt_mod",)),
  ("attn.to_q", ("attn", "to_q")),
  ("attn.to_k", ("attn", "to_k")),
  ("attn.to_v", ("attn", "to_v")),
  ("attn.add_q_proj", ("attn", "add_q_proj")),
  ("attn.add_k_proj", ("attn", "add_k_proj")),
  ("attn.add_v_proj", ("attn", "add_v_proj")),
  ("attn.to_out.0", ("attn", "to_out")),
  ("attn.to_add_out", ("attn", "to_add_out")),
  ("img_mlp.net.0.proj", ("img_mlp", "proj_in")),
  ("img_mlp.net.2", ("img_mlp", "proj_out")),
  ("txt_mlp.net.0.proj", ("txt_mlp", "proj_in")),
  ("txt_mlp.net.2", ("txt_mlp", "proj_out")),
)
_BLOCK_NORMS = (
  ("attn.norm_q", ("attn", "norm_q")),
  ("attn.norm_k", ("attn", "norm_k")),
  ("attn.norm_added_q", ("attn", "norm_added_q")),
  ("attn.norm_added_k", ("attn", "norm_added_k")),
)


def _leaf_map(num_layers: int):
  """[(torch key, layer index or None, flax path within top / block, transpose)] for every leaf."""
  out = []

  def add(linears, norms, torch_prefix, layer):
    for name, path in linears:
      out.append((f"{torch_prefix}{name}.weight", layer, path + ("kernel",), True))
      out.append((f"{torch_prefix}{name}.bias", layer, path + ("bias",), False))
    for name, path in norms:
      out.append((f"{torch_prefix}{name}.weight", layer, path + ("scale",), False))

  add(_TOP_LINEARS, _TOP_NORMS, "", None)
  for i in range(num_layers):
    add(_BLOCK_LINEARS, _BLOCK_NORMS, f"transformer_blocks.{i}.", i)
  return out


def _get(tree, path):
  for p in path:
    tree = tree[p]
  return tree


def _set(tree, path, value):
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def _flax_location(model: QwenImageTransformer, layer, path):
  """(full flax path, index along the stacked layer axis or None)."""
  if layer is None:
    return path, None
  if model.scan_layers:
    return ("transformer_blocks",) + path, layer
  return (f"transformer_blocks_{layer}",) + path, None


def expected_torch_shapes(model: QwenImageTransformer) -> dict[str, tuple[int, ...]]:
  """Shapes of every tensor of the matching diffusers state dict, derived from the Flax model."""
  abstract = nn.meta.unbox(model.abstract_params())
  shapes = {}
  for key, layer, path, transpose in _leaf_map(model.num_layers):
    full, index = _flax_location(model, layer, path)
    shape = tuple(_get(abstract, full).shape)
    if index is not None:
      shape = shape[1:]
    shapes[key] = shape[::-1] if transpose else shape
  return shapes


def params_from_source(
  source, model: QwenImageTransformer, shardings=None, where: str = "transformer"
) -> dict:
  """Flax params (unboxed, `model.param_dtype`) read tensor by tensor from `source`.

  `source` has `shapes()` and `read(key)` (a `SafetensorsReader` or a `DictSource`).
  `shardings`: a tree of target shardings matching the params (e.g. from
  `parallel.tree_shardings(model.abstract_params(), mesh, rules)`); each leaf is placed directly
  with its sharding. None puts every leaf on the first local device.
  Raises CheckpointError listing every missing / unexpected / wrong-shape key first.
  """
  check_state_dict(source.shapes(), expected_torch_shapes(model), where)
  abstract = nn.meta.unbox(model.abstract_params())
  if shardings is None:
    shardings = placement.single_device(abstract)
  # Group the layers of each stacked leaf, so one stacked leaf is assembled at a time.
  groups: dict[tuple, list] = {}
  for key, layer, path, transpose in _leaf_map(model.num_layers):
    full, index = _flax_location(model, layer, path)
    groups.setdefault(full, []).append((key, index, transpose))
  params: dict[str, Any] = {}
  for full, entries in groups.items():
    sharding = _get(shardings, full)
    if entries[0][1] is None:
      ((key, _, transpose),) = entries
      value = source.read(key)
      _set(
        params, full, placement.put(value.T if transpose else value, sharding, model.param_dtype)
      )
      continue
    stack = placement.StackedLeaf(_get(abstract, full).shape, sharding, model.param_dtype)
    for key, index, transpose in entries:
      value = source.read(key)
      stack.set(index, value.T if transpose else value)
      del value  # one tensor on the host at a time
    _set(params, full, stack.result())
  return params


def params_from_torch_state_dict(
  state_dict: Mapping[str, np.ndarray],
  model: QwenImageTransformer,
  where: str = "transformer",
  shardings=None,
) -> dict:
  """Flax params from a diffusers state dict in memory (see `params_from_source`)."""
  return params_from_source(DictSource(state_dict), model, shardings, where)


def params_to_torch_state_dict(params, model: QwenImageTransformer) -> dict[str, np.ndarray]:
  """diffusers state dict (numpy, in the params' dtype) from Flax params (boxed or not)."""
  params = nn.meta.unbox(params)
  state = {}
  for key, layer, path, transpose in _leaf_map(model.num_layers):
    full, index = _flax_location(model, layer, path)
    value = np.asarray(jax.device_get(_get(params, full)))
    if index is not None:
      value = value[index]
    state[key] = np.ascontiguousarray(value.T if transpose else value)
  return state


def load_transformer(
  directory: str, dtype=jnp.float32, *, shardings=None, mesh=None, rules=None, **overrides
) -> tuple[QwenImageTransformer, dict]:
  """(model, params) from a diffusers `transformer/` folder (config.json + safetensors).

  `dtype` sets both the parameter and the compute dtype unless `overrides` name them;
  other overrides (scan_layers, remat_policy) set our own fields. Placement: `shardings` (a tree
  matching the params), or `mesh` (+ logical `rules`, default the package's) to derive them
  from the model's logical axes, or neither for everything on the first local device.
  Tensors are read one at a time, so host memory peaks near the model plus its largest tensor.
  """
  config = read_json(os.path.join(directory, "config.json"))
  config = known_config(config, DIFFUSERS_FIELDS, f"{directory}/config.json")
  overrides.setdefault("dtype", dtype)
  overrides.setdefault("param_dtype", dtype)
  try:
    model = QwenImageTransformer.from_config(config, **overrides)
  except (ValueError, NotImplementedError) as e:
    raise CheckpointError(f"{directory}/config.json: {e}") from e
  if shardings is None and mesh is not None:
    rules = parallel.DEFAULT_LOGICAL_AXIS_RULES if rules is None else rules
    shardings = parallel.tree_shardings(model.abstract_params(), mesh, rules)
  reader = SafetensorsReader(directory)
  return model, params_from_source(reader, model, shardings, where=directory)


def save_transformer(
  model: QwenImageTransformer, params, directory: str, *, max_shard_bytes: int = 5 * 2**30
) -> None:
  """Write config.json + safetensors that `QwenImageTransformer2DModel.from_pretrained` loads."""
  import json

  state = params_to_torch_state_dict(params, model)
  save_state_dict(
    state,
    directory,
    filename="diffusion_pytorch_model.safetensors",
    max_shard_bytes=max_shard_bytes,
  )
  tmp = os.path.join(directory, "config.json.tmp")
  with open(tmp, "w") as f:
    json.dump(model.to_config(), f, indent=2)
  os.replace(tmp, os.path.join(directory, "config.json"))
