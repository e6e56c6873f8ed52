"""Full Qwen2.5-VL (vision tower + language model + LM head): transformers safetensors <-> Flax.

Layouts accepted (transformers v5 loads both): legacy (what save_pretrained writes and the hub
checkpoints hold: visual.*, model.*, lm_head.weight) and v5 in-memory (model.visual.*,
model.language_model.*, lm_head.weight). With `tie_word_embeddings` the checkpoint may lack
lm_head.weight; the head then reads the token embedding.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qwen_image_rl.convert import text_encoder
from qwen_image_rl.convert.safetensors_io import (
  CheckpointError,
  check_state_dict,
  load_state_dict,
  read_json,
  save_state_dict,
)
from qwen_image_rl.models.qwen2_5_vl_full import Qwen25VL
from qwen_image_rl.models.qwen2_5_vl_vision import Qwen25VLVisionModel, VisionConfig

LEGACY_VISUAL = "visual."
V5_VISUAL = "model.visual."
LM_HEAD = "lm_head.weight"

# torch name under blocks.{i}. -> (flax path under blocks_{i}, transpose?)
_BLOCK_PARAMS = {
  "norm1.weight": (("norm1", "weight"), False),
  "norm2.weight": (("norm2", "weight"), False),
  "attn.qkv.weight": (("attn", "qkv", "kernel"), True),
  "attn.qkv.bias": (("attn", "qkv", "bias"), False),
  "attn.proj.weight": (("attn", "proj", "kernel"), True),
  "attn.proj.bias": (("attn", "proj", "bias"), False),
  "mlp.gate_proj.weight": (("mlp", "gate_proj", "kernel"), True),
  "mlp.gate_proj.bias": (("mlp", "gate_proj", "bias"), False),
  "mlp.up_proj.weight": (("mlp", "up_proj", "kernel"), True),
  "mlp.up_proj.bias": (("mlp", "up_proj", "bias"), False),
  "mlp.down_proj.weight": (("mlp", "down_proj", "kernel"), True),
  "mlp.down_proj.bias": (("mlp", "down_proj", "bias"), False),
}
_MERGER_PARAMS = {
  "merger.ln_q.weight": (("merger", "ln_q", "weight"), False),
  "merger.mlp.0.weight": (("merger", "mlp_0", "kernel"), True),
  "merger.mlp.0.bias": (("merger", "mlp_0", "bias"), False),
  "merger.mlp.2.weight": (("merger", "mlp_2", "kernel"), True),
  "merger.mlp.2.bias": (("merger", "mlp_2", "bias"), False),
}


def expected_vision_shapes(cfg: VisionConfig, prefix: str) -> dict[str, tuple[int, ...]]:
  d, m, unit = cfg.hidden_size, cfg.intermediate_size, cfg.spatial_merge_size**2
  shapes = {
    f"{prefix}patch_embed.proj.weight": (
      d,
      cfg.in_channels,
      cfg.temporal_patch_size,
      cfg.patch_size,
      cfg.patch_size,
    ),
    f"{prefix}merger.ln_q.weight": (d,),
    f"{prefix}merger.mlp.0.weight": (d * unit, d * unit),
    f"{prefix}merger.mlp.0.bias": (d * unit,),
    f"{prefix}merger.mlp.2.weight": (cfg.out_hidden_size, d * unit),
    f"{prefix}merger.mlp.2.bias": (cfg.out_hidden_size,),
  }
  per_block = {
    "norm1.weight": (d,),
    "norm2.weight": (d,),
    "attn.qkv.weight": (3 * d, d),
    "attn.qkv.bias": (3 * d,),
    "attn.proj.weight": (d, d),
    "attn.proj.bias": (d,),
    "mlp.gate_proj.weight": (m, d),
    "mlp.gate_proj.bias": (m,),
    "mlp.up_proj.weight": (m, d),
    "mlp.up_proj.bias": (m,),
    "mlp.down_proj.weight": (d, m),
    "mlp.down_proj.bias": (d,),
  }
  for i in range(cfg.depth):
    for name, shape in per_block.items():
      shapes[f"{prefix}blocks.{i}.{name}"] = shape
  return shapes


def vision_params_from_state_dict(
  state: Mapping[str, np.ndarray],
  cfg: VisionConfig,
  prefix: str = LEGACY_VISUAL,
  dtype=jnp.float32,
  where: str = "vision state dict",
):
  """Flax vision params from torch-layout arrays whose keys start with `prefix`."""
  vision = {k: v for k, v in state.items() if k.startswith(prefix)}
  check_state_dict(vision, expected_vision_shapes(cfg, prefix), where)
  cast = lambda a: jnp.asarray(a, dtype=dtype)
  patch = vision[f"{prefix}patch_embed.proj.weight"]
  params: dict = {"patch_embed": {"kernel": cast(patch.reshape(patch.shape[0], -1).T)}}
  for i in range(cfg.depth):
    for name, (path, transpose) in _BLOCK_PARAMS.items():
      value = vision[f"{prefix}blocks.{i}.{name}"]
      _set(params, (f"blocks_{i}",) + path, cast(value.T if transpose else value))
  for name, (path, transpose) in _MERGER_PARAMS.items():
    value = vision[f"{prefix}{name}"]
    _set(params, path, cast(value.T if transpose else value))
  return params


def vision_state_dict_from_params(
  params, cfg: VisionConfig, prefix: str = LEGACY_VISUAL
) -> dict[str, np.ndarray]:
  params = jax.tree.map(np.asarray, params)
  kernel = params["patch_embed"]["kernel"]
  state = {
    f"{prefix}patch_embed.proj.weight": np.ascontiguousarray(kernel.T).reshape(
      cfg.hidden_size, cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size
    )
  }
  items = [
    (f"blocks.{i}.{n}", (f"blocks_{i}",) + p, t)
    for i in range(cfg.depth)
    for n, (p, t) in _BLOCK_PARAMS.items()
  ]
  items += [(n, p, t) for n, (p, t) in _MERGER_PARAMS.items()]
  for name, path, transpose in items:
    value = _get(params, path)
    state[prefix + name] = np.ascontiguousarray(value.T if transpose else value)
  return state


def params_from_state_dict(
  state_dict: Mapping[str, Any], model: Qwen25VL, where: str = "Qwen2.5-VL state dict"
):
  """Flax params {visual, language_model[, lm_head]} of `model` from a transformers state dict."""
  state = {k: text_encoder.to_numpy(v) for k, v in state_dict.items()}
  v5 = any(k.startswith(V5_VISUAL) for k in state)
  vis_prefix = V5_VISUAL if v5 else LEGACY_VISUAL
  dtype = model.language_model.param_dtype
  params = {
    "visual": vision_params_from_state_dict(state, model.visual.config, vis_prefix, dtype, where),
    "language_model": text_encoder.params_from_torch_state_dict(
      {k: v for k, v in state.items() if not k.startswith(vis_prefix)}, model.language_model, where
    ),
  }
  if not model.tie_word_embeddings:
    if LM_HEAD not in state:
      raise CheckpointError(f"{where}: missing {LM_HEAD} (config has tie_word_embeddings=False)")
    head = state[LM_HEAD]
    want = (model.language_model.vocab_size, model.language_model.hidden_size)
    if head.shape != want:
      raise CheckpointError(f"{where}: {LM_HEAD} has shape {head.shape}, expected {want}")
    params["language_model"]["lm_head"] = {"kernel": jnp.asarray(head.T, dtype=dtype)}
  return params


def state_dict_from_params(params, model: Qwen25VL) -> dict[str, np.ndarray]:
  """Inverse of params_from_state_dict, in the legacy layout save_pretrained writes."""
  text_params = {k: v for k, v in params["language_model"].items() if k != "lm_head"}
  state = text_encoder.torch_state_dict_from_params(text_params, model.language_model)
  state.update(vision_state_dict_from_params(params["visual"], model.visual.config))
  if not model.tie_word_embeddings:
    state[LM_HEAD] = np.ascontiguousarray(
      np.asarray(params["language_model"]["lm_head"]["kernel"]).T
    )
  return state


def load_qwen2_5_vl(directory: str, dtype=jnp.float32, param_dtype=None, **text_overrides):
  """(module, params) for a transformers Qwen2_5_VLForConditionalGeneration directory.

  `module.apply({"params": params}, input_ids=..., attention_mask=..., pixel_values=...,
  image_grid_thw=...)` returns the logits transformers returns for the same inputs (given
  `mm_token_type_ids` there, see `Qwen25VL`).
  """
  config = read_json(os.path.join(directory, "config.json"))
  try:
    model = Qwen25VL.from_config(
      config, dtype=dtype, param_dtype=param_dtype or dtype, **text_overrides
    )
  except ValueError as e:
    raise CheckpointError(f"{directory}/config.json: {e}") from e
  params = params_from_state_dict(load_state_dict(directory), model, where=directory)
  return model, params


def save_qwen2_5_vl(
  model: Qwen25VL, params, directory: str, *, max_shard_bytes: int = 5 * 2**30
) -> None:
  """config.json + safetensors that transformers' from_pretrained loads whole."""
  state = state_dict_from_params(params, model)
  config = model.config_dict()
  config["dtype"] = {np.dtype(np.float32): "float32", np.dtype(np.float16): "float16"}.get(
    np.dtype(state[LM_HEAD if LM_HEAD in state else "model.norm.weight"].dtype), "bfloat16"
  )
  os.makedirs(directory, exist_ok=True)
  save_state_dict(
    state, directory, filename=text_encoder.WEIGHTS_NAME, max_shard_bytes=max_shard_bytes
  )
  tmp = os.path.join(directory, "config.json.tmp")
  with open(tmp, "w") as f:
    json.dump(config, f, indent=2)
  os.replace(tmp, os.path.join(directory, "config.json"))


def _set(tree: dict, path: tuple[str, ...], value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _get(tree, path: tuple[str, ...]):
  for key in path:
    tree = tree[key]
  return tree


def vision_from_text_encoder_extra(extra: Mapping[str, Any], dtype=jnp.float32):
  """(vision module, vision params, image_token_id) from `load_text_encoder(...,
  return_extra=True)`'s extra {"config", "state"}: the vision tower a text-encoder checkpoint
  carries alongside the language model."""
  config, state = extra["config"], {k: text_encoder.to_numpy(v) for k, v in extra["state"].items()}
  if "image_token_id" not in config:
    raise CheckpointError("text encoder config.json lacks image_token_id")
  cfg = VisionConfig.from_config(config)
  prefix = V5_VISUAL if any(k.startswith(V5_VISUAL) for k in state) else LEGACY_VISUAL
  params = vision_params_from_state_dict(state, cfg, prefix, dtype, "text encoder vision tower")
  return (
    Qwen25VLVisionModel(cfg, dtype=dtype, param_dtype=dtype),
    params,
    int(config["image_token_id"]),
  )
