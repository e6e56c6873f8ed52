"""Qwen2.5-VL text encoder: transformers safetensors <-> Flax params.

On-disk layouts accepted (transformers v5 loads both):
  legacy (what save_pretrained writes, and the hub checkpoints): model.embed_tokens,
    model.layers.*, model.norm, visual.*, lm_head
  v5 in-memory names: model.language_model.*, model.visual.*, lm_head
Only the language model is converted; `visual.*` / `model.visual.*` / `lm_head.*` are returned
as "extra state" so that `save_text_encoder` can write a checkpoint transformers loads whole.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from qwen_image_rl.convert.safetensors_io import (
  CheckpointError,
  check_state_dict,
  load_state_dict,
  read_json,
  save_state_dict,
)
from qwen_image_rl.models.qwen2_5_vl import Qwen25VLTextModel, text_config_dict

LEGACY_PREFIX = "model."
V5_PREFIX = "model.language_model."
EXTRA_PREFIXES = ("visual.", "model.visual.", "lm_head.")
WEIGHTS_NAME = "model.safetensors"

# torch name (under layers.{i}.) -> (flax path under the layer, transpose?)
_LAYER_PARAMS = {
  "input_layernorm.weight": (("input_layernorm", "weight"), False),
  "post_attention_layernorm.weight": (("post_attention_layernorm", "weight"), False),
  "self_attn.q_proj.weight": (("self_attn", "q_proj", "kernel"), True),
  "self_attn.q_proj.bias": (("self_attn", "q_proj", "bias"), False),
  "self_attn.k_proj.weight": (("self_attn", "k_proj", "kernel"), True),
  "self_attn.k_proj.bias": (("self_attn", "k_proj", "bias"), False),
  "self_attn.v_proj.weight": (("self_attn", "v_proj", "kernel"), True),
  "self_attn.v_proj.bias": (("self_attn", "v_proj", "bias"), False),
  "self_attn.o_proj.weight": (("self_attn", "o_proj", "kernel"), True),
  "mlp.gate_proj.weight": (("mlp", "gate_proj", "kernel"), True),
  "mlp.up_proj.weight": (("mlp", "up_proj", "kernel"), True),
  "mlp.down_proj.weight": (("mlp", "down_proj", "kernel"), True),
}


def expected_text_shapes(
  model: Qwen25VLTextModel, prefix: str = LEGACY_PREFIX
) -> dict[str, tuple[int, ...]]:
  """torch key -> shape of every language-model tensor (torch Linear layout [out, in])."""
  h, m, d = model.hidden_size, model.intermediate_size, model.head_dim
  q, kv = model.num_attention_heads * d, model.num_key_value_heads * d
  per_layer = {
    "input_layernorm.weight": (h,),
    "post_attention_layernorm.weight": (h,),
    "self_attn.q_proj.weight": (q, h),
    "self_attn.q_proj.bias": (q,),
    "self_attn.k_proj.weight": (kv, h),
    "self_attn.k_proj.bias": (kv,),
    "self_attn.v_proj.weight": (kv, h),
    "self_attn.v_proj.bias": (kv,),
    "self_attn.o_proj.weight": (h, q),
    "mlp.gate_proj.weight": (m, h),
    "mlp.up_proj.weight": (m, h),
    "mlp.down_proj.weight": (h, m),
  }
  shapes = {f"{prefix}embed_tokens.weight": (model.vocab_size, h), f"{prefix}norm.weight": (h,)}
  for i in range(model.num_hidden_layers):
    for name, shape in per_layer.items():
      shapes[f"{prefix}layers.{i}.{name}"] = shape
  return shapes


def split_state_dict(state: Mapping[str, Any]) -> tuple[str, dict, dict]:
  """(text prefix, language-model tensors, extra tensors: visual / lm_head)."""
  prefix = V5_PREFIX if any(k.startswith(V5_PREFIX) for k in state) else LEGACY_PREFIX
  text, extra = {}, {}
  for key, value in state.items():
    (extra if key.startswith(EXTRA_PREFIXES) else text)[key] = value
  return prefix, text, extra


def params_from_torch_state_dict(
  state_dict: Mapping[str, Any], model: Qwen25VLTextModel, where: str = "text encoder state dict"
):
  """Flax params (float arrays in model.param_dtype) from a transformers state dict.

  Accepts torch tensors or numpy arrays, either key layout. Visual and lm_head keys are ignored;
  any other missing / unexpected / wrong-shape key raises CheckpointError naming it.
  """
  state = {k: to_numpy(v) for k, v in state_dict.items()}
  prefix, text, _ = split_state_dict(state)
  check_state_dict(text, expected_text_shapes(model, prefix), where)
  dtype = model.param_dtype
  cast = lambda a: jnp.asarray(a, dtype=dtype)

  layers = []
  for i in range(model.num_hidden_layers):
    layer: dict = {}
    for name, (path, transpose) in _LAYER_PARAMS.items():
      value = text[f"{prefix}layers.{i}.{name}"]
      _set(layer, path, value.T if transpose else value)
    layers.append(layer)
  params: dict = {
    "embed_tokens": {"embedding": cast(text[f"{prefix}embed_tokens.weight"])},
    "norm": {"weight": cast(text[f"{prefix}norm.weight"])},
  }
  if model.scan_layers:
    stacked = jax.tree.map(lambda *xs: cast(np.stack(xs)), *layers)
    params["layers"] = {"layer": stacked}
  else:
    for i, layer in enumerate(layers):
      params[f"layers_{i}"] = jax.tree.map(cast, layer)
  return params


def torch_state_dict_from_params(
  params, model: Qwen25VLTextModel, prefix: str = LEGACY_PREFIX
) -> dict[str, np.ndarray]:
  """Inverse of params_from_torch_state_dict: numpy arrays in torch layout and names."""
  params = flax.core.unfreeze(params)
  params = jax.tree.map(np.asarray, params)
  state = {
    f"{prefix}embed_tokens.weight": params["embed_tokens"]["embedding"],
    f"{prefix}norm.weight": params["norm"]["weight"],
  }
  for i in range(model.num_hidden_layers):
    if model.scan_layers:
      layer = jax.tree.map(lambda x: x[i], params["layers"]["layer"])
    else:
      layer = params[f"layers_{i}"]
    for name, (path, transpose) in _LAYER_PARAMS.items():
      value = _get(layer, path)
      state[f"{prefix}layers.{i}.{name}"] = np.ascontiguousarray(value.T if transpose else value)
  return state


def load_text_encoder(
  directory: str,
  dtype=jnp.float32,
  param_dtype=None,
  *,
  return_extra: bool = False,
  **model_overrides,
):
  """(model, params) from a transformers Qwen2_5_VLForConditionalGeneration directory.

  Reads config.json and the safetensors (one file or shards with an index). `param_dtype`
  defaults to `dtype`. With return_extra=True also returns {"config": dict, "state": the
  visual / lm_head tensors}, which `save_text_encoder` writes back unchanged.
  """
  config = read_json(os.path.join(directory, "config.json"))
  try:
    model = Qwen25VLTextModel.from_config(
      config, dtype=dtype, param_dtype=param_dtype or dtype, **model_overrides
    )
  except ValueError as e:
    raise CheckpointError(f"{directory}/config.json: {e}") from e
  state = load_state_dict(directory)
  params = params_from_torch_state_dict(state, model, where=directory)
  if return_extra:
    _, _, extra = split_state_dict(state)
    return model, params, {"config": config, "state": extra}
  return model, params


def save_text_encoder(
  model: Qwen25VLTextModel,
  params,
  directory: str,
  extra_state: Mapping[str, Any] | None = None,
  config: Mapping[str, Any] | None = None,
  *,
  max_shard_bytes: int = 5 * 2**30,
) -> None:
  """Write config.json + model.safetensors that transformers' from_pretrained loads.

  Language-model tensors use the legacy layout that transformers' save_pretrained writes.
  `extra_state` (visual.*, lm_head.*; e.g. from load_text_encoder(return_extra=True)) is written
  unchanged. `config` is the full Qwen2_5_VLConfig dict (it must agree with `model`); without it
  a config with only a text_config is written, and transformers then initialises the vision
  tower and lm_head randomly unless `extra_state` holds them for its default vision config.
  """
  extra = {k: to_numpy(v) for k, v in (extra_state or {}).items()}
  bad = [k for k in extra if not k.startswith(EXTRA_PREFIXES)]
  if bad:
    raise CheckpointError(
      f"extra_state may only hold {EXTRA_PREFIXES} keys, got {sorted(bad)[:10]}"
    )
  if config is None:
    config = {
      "architectures": ["Qwen2_5_VLForConditionalGeneration"],
      "model_type": "qwen2_5_vl",
      "tie_word_embeddings": False,
      "vocab_size": model.vocab_size,
      "text_config": text_config_dict(model),
    }
  else:
    config = dict(config)
    described = Qwen25VLTextModel.from_config(config)
    arch = lambda m: {
      f: getattr(m, f)
      for f in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "rms_norm_eps",
        "rope_theta",
        "mrope_section",
      )
    }
    if arch(described) != arch(model):
      raise ValueError(
        f"config does not describe the model: config {arch(described)} vs model {arch(model)}"
      )
  state = torch_state_dict_from_params(params, model)
  state.update(extra)
  dtype_names = {np.dtype(np.float32): "float32", np.dtype(np.float16): "float16"}
  # Describe the tensors actually written.
  config["dtype"] = dtype_names.get(
    np.dtype(state[f"{LEGACY_PREFIX}norm.weight"].dtype), "bfloat16"
  )
  os.makedirs(directory, exist_ok=True)
  save_state_dict(state, directory, filename=WEIGHTS_NAME, max_shard_bytes=max_shard_bytes)
  tmp = os.path.join(directory, "config.json.tmp")
  with open(tmp, "w") as f:
    json.dump(config, f, indent=2)
  os.replace(tmp, os.path.join(directory, "config.json"))


def to_numpy(value) -> np.ndarray:
  """torch tensor (bfloat16 too) / array-like -> numpy array."""
  if isinstance(value, np.ndarray):
    return value
  if hasattr(value, "detach"):  # torch.Tensor, without importing torch here.
    import torch

    value = value.detach().cpu()
    if value.dtype == torch.bfloat16:
      import ml_dtypes

      return value.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return value.numpy()
  return np.asarray(value)


def _set(tree: dict, path: tuple[str, ...], value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _get(tree, path: tuple[str, ...]):
  for key in path:
    tree = tree[key]
  return tree
