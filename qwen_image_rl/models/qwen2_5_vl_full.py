"""Qwen2.5-VL for conditional generation: vision tower + language model + LM head (Flax).

Matches transformers `Qwen2_5_VLForConditionalGeneration(...).logits`. Image features replace
the `<|image_pad|>` token embeddings in order (row-major over batch and sequence, as
`masked_scatter`). With images, the three mRoPE streams come from `rope_index` (transformers'
`get_rope_index`): text tokens count up by one on all streams, an image's tokens get
(start + t, start + row, start + col) over its merged grid, and the text after it resumes at
start + max(rows, cols). Padded slots (attention_mask 0) get position 0.

Note: transformers v5 computes these 3-D positions only when the caller passes
`mm_token_type_ids` (its processor does); without them it falls back to arange(L). We always
use them when images are present, as the model was trained (transformers v4 derived them from
input_ids alone); `rope_index(..., sequential=True)` reproduces the fallback.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qwen_image_rl.models.qwen2_5_vl import Qwen25VLTextModel, text_config_dict
from qwen_image_rl.models.qwen2_5_vl_vision import (
  Qwen25VLVisionModel,
  VisionConfig,
  vision_layout,
)

Dtype = Any


# Qwen/Qwen2.5-VL-7B-Instruct config.json (the fields the architecture depends on).
QWEN2_5_VL_7B_CONFIG = {
  "architectures": ["Qwen2_5_VLForConditionalGeneration"],
  "model_type": "qwen2_5_vl",
  "vocab_size": 152064,
  "hidden_size": 3584,
  "intermediate_size": 18944,
  "num_hidden_layers": 28,
  "num_attention_heads": 28,
  "num_key_value_heads": 4,
  "rms_norm_eps": 1e-6,
  "rope_theta": 1000000.0,
  "hidden_act": "silu",
  "max_position_embeddings": 128000,
  "tie_word_embeddings": False,
  "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
  "image_token_id": 151655,
  "video_token_id": 151656,
  "vision_start_token_id": 151652,
  "vision_end_token_id": 151653,
  "bos_token_id": 151643,
  "eos_token_id": 151645,
  "vision_config": {
    "depth": 32,
    "hidden_act": "silu",
    "hidden_size": 1280,
    "intermediate_size": 3420,
    "num_heads": 16,
    "in_chans": 3,
    "out_hidden_size": 3584,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "window_size": 112,
    "fullatt_block_indexes": [7, 15, 23, 31],
    "tokens_per_second": 2,
  },
}


def rope_index(
  input_ids,
  attention_mask,
  image_grid_thw,
  *,
  image_token_id: int,
  spatial_merge_size: int,
  sequential: bool = False,
):
  """(position_ids [3, B, L] int32, deltas [B]) exactly as transformers' get_rope_index.

  deltas[b] = max position + 1 - number of real tokens: generated token k (0-based) of sample b
  sits at position (its real-token count + k + deltas[b]) on all three streams.
  """
  ids = np.asarray(input_ids)
  mask = np.ones_like(ids, bool) if attention_mask is None else np.asarray(attention_mask, bool)
  grids = iter([] if image_grid_thw is None else np.asarray(image_grid_thw).reshape(-1, 3))
  positions = np.zeros((3,) + ids.shape, np.int32)
  deltas = np.zeros(ids.shape[0], np.int32)
  for b in range(ids.shape[0]):
    is_image = ids[b][mask[b]] == image_token_id
    chunks, pos = [], 0
    if sequential:
      is_image = np.zeros_like(is_image)
    for image, group in itertools.groupby(is_image):
      count = len(list(group))
      if not image:
        chunks.append(np.broadcast_to(np.arange(count) + pos, (3, count)))
        pos += count
        continue
      while count > 0:  # one run may hold several images back to back
        try:
          t, h, w = (int(x) for x in next(grids))
        except StopIteration:
          raise ValueError("more image tokens than image_grid_thw rows describe") from None
        h, w = h // spatial_merge_size, w // spatial_merge_size
        tt, hh, ww = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
        chunks.append(np.stack([tt, hh, ww]).reshape(3, -1) + pos)
        pos += max(h, w)
        count -= t * h * w
      if count < 0:
        raise ValueError("image token runs do not match image_grid_thw")
    flat = np.concatenate(chunks, axis=1) if chunks else np.zeros((3, 0), np.int32)
    positions[:, b, mask[b]] = flat
    deltas[b] = (flat.max() + 1 if flat.size else 0) - flat.shape[1]
  return positions, deltas


def splice_image_features(input_ids, features, image_token_id: int):
  """(embeds [B, L, H], mask [B, L]): image features in the image-token slots, in order."""
  is_image = input_ids == image_token_id
  order = jnp.cumsum(is_image.reshape(-1)) - 1
  order = jnp.clip(order, 0, features.shape[0] - 1).reshape(input_ids.shape)
  return features[order], is_image


class Qwen25VL(nn.Module):
  """`Qwen2_5_VLForConditionalGeneration` in Flax: params {"visual", "language_model"}.

  The LM head lives in the language model (head="tied" or "separate"; the separate kernel is
  language_model/lm_head).
  """

  language_model: Qwen25VLTextModel
  visual: Qwen25VLVisionModel
  image_token_id: int
  video_token_id: int = -1
  vision_start_token_id: int = -1
  vision_end_token_id: int = -1

  @property
  def tie_word_embeddings(self) -> bool:
    return self.language_model.head == "tied"

  @property
  def vision_config(self) -> VisionConfig:
    return self.visual.config

  @classmethod
  def from_config(
    cls, config: Mapping[str, Any], dtype=jnp.float32, param_dtype=None, **text_overrides
  ) -> Qwen25VL:
    """From a transformers Qwen2_5_VLConfig dict (config.json)."""
    tied = bool(
      config.get("tie_word_embeddings")
      or (config.get("text_config") or {}).get("tie_word_embeddings", False)
    )
    param_dtype = param_dtype or dtype
    text = Qwen25VLTextModel.from_config(
      config,
      head="tied" if tied else "separate",
      dtype=dtype,
      param_dtype=param_dtype,
      **text_overrides,
    )
    vision = Qwen25VLVisionModel(
      VisionConfig.from_config(config), dtype=dtype, param_dtype=param_dtype
    )
    if "image_token_id" not in config:
      raise ValueError("config lacks image_token_id")
    get = lambda k: int(config.get(k, -1) if config.get(k) is not None else -1)
    return cls(
      text,
      vision,
      int(config["image_token_id"]),
      get("video_token_id"),
      get("vision_start_token_id"),
      get("vision_end_token_id"),
    )

  def config_dict(self) -> dict[str, Any]:
    """The config.json transformers needs to rebuild this model."""
    text = text_config_dict(self.language_model)
    text["tie_word_embeddings"] = self.tie_word_embeddings
    vision = self.vision_config.to_dict()
    if vision["out_hidden_size"] != self.language_model.hidden_size:
      raise ValueError("vision out_hidden_size must equal the text hidden_size")
    return {
      "architectures": ["Qwen2_5_VLForConditionalGeneration"],
      "model_type": "qwen2_5_vl",
      "tie_word_embeddings": self.tie_word_embeddings,
      "vocab_size": self.language_model.vocab_size,
      "text_config": text,
      "vision_config": vision,
      "image_token_id": self.image_token_id,
      "video_token_id": self.video_token_id,
      "vision_start_token_id": self.vision_start_token_id,
      "vision_end_token_id": self.vision_end_token_id,
    }

  def init_params(self, rng):
    """Random params (boxed with logical axis names); the vision tower sees a 1-group image."""
    return self.init(rng, jnp.zeros((1, 1), jnp.int32))["params"]

  def abstract_params(self):
    """ShapeDtypeStructs of the (boxed) parameters, without allocating anything."""
    return jax.eval_shape(self.init_params, jax.random.key(0))

  def rope_index(self, input_ids, attention_mask=None, image_grid_thw=None, **kw):
    return rope_index(
      input_ids,
      attention_mask,
      image_grid_thw,
      image_token_id=self.image_token_id,
      spatial_merge_size=self.vision_config.spatial_merge_size,
      **kw,
    )

  def layout(self, image_grid_thw) -> dict[str, np.ndarray]:
    """Vision index arrays for `image_grid_thw` (pass as `vision_layout` under jit)."""
    return vision_layout(image_grid_thw, self.vision_config).arrays()

  def __call__(
    self,
    input_ids,
    attention_mask=None,
    pixel_values=None,
    image_grid_thw=None,
    *,
    position_ids=None,
    vision_layout=None,
    image_features=None,
    kv_cache=None,
    cache_index=0,
    output_positions=None,
    output_hidden: bool = False,
  ):
    """Logits [B, L, V] (or at `output_positions` [B, K]); with kv_cache (logits, cache).

    pixel_values [N, C*T*P*P] with image_grid_thw [n, 3] (from `ImageProcessor`). Outside jit
    `vision_layout` and `position_ids` are derived from the concrete grid and ids; under jit
    pass them (`self.layout(grid)`, `self.rope_index(...)[0]`). `image_features`
    [n_tokens, H] skips the vision tower. output_hidden: return final hidden states instead.
    """
    if image_features is None and pixel_values is not None:
      if vision_layout is None:
        vision_layout = self.layout(_concrete(image_grid_thw, "image_grid_thw"))
      image_features = self.visual(pixel_values, vision_layout)
    elif self.is_initializing():
      m = self.vision_config.spatial_merge_size
      grid = np.array([[1, m, m]])
      self.visual(jnp.zeros((int(grid.prod()), self.vision_config.patch_dim)), self.layout(grid))
    splice, splice_mask = None, None
    if image_features is not None:
      if position_ids is None:
        position_ids = jnp.asarray(
          self.rope_index(
            _concrete(input_ids, "input_ids"),
            None if attention_mask is None else _concrete(attention_mask, "attention_mask"),
            _concrete(image_grid_thw, "image_grid_thw"),
          )[0]
        )
        _check_token_count(input_ids, image_features, self.image_token_id)
      splice, splice_mask = splice_image_features(input_ids, image_features, self.image_token_id)
    return self.language_model(
      input_ids,
      attention_mask,
      position_ids,
      kv_cache=kv_cache,
      cache_index=cache_index,
      splice_embeds=splice,
      splice_mask=splice_mask,
      output_positions=output_positions,
      skip_head=output_hidden,
    )


def _concrete(value, name: str) -> np.ndarray:
  try:
    return np.asarray(value)
  except jax.errors.TracerArrayConversionError:
    raise ValueError(
      f"{name} is traced: under jit pass position_ids and vision_layout "
      "(Qwen25VL.rope_index / Qwen25VL.layout) computed outside"
    ) from None


def _check_token_count(input_ids, features, image_token_id: int):
  count = int((np.asarray(input_ids) == image_token_id).sum())
  if count != features.shape[0]:
    raise ValueError(
      f"image features and image tokens do not match: {count} "
      f"<|image_pad|> tokens, {features.shape[0]} features"
    )
