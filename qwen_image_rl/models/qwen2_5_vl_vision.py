"""Qwen2.5-VL vision tower in Flax linen (transformers `Qwen2_5_VisionTransformerPretrainedModel`).

  pixel_values [N, C*T*P*P] (the image processor's patch rows)
  -> patch_embed (Conv3d with kernel == stride, i.e. one matmul per patch)
  -> reorder the 2x2 merge groups window by window (window_index)
  -> depth x block: x += proj(attn(RMSNorm(x))), x += SwiGLU(RMSNorm(x)); blocks listed in
     `fullatt_block_indexes` attend over the whole image, the others inside their window
  -> merger: RMSNorm, group 2x2 neighbours, Linear-GELU-Linear to the LLM width
  -> undo the window order. Output [N / merge^2, out_hidden_size].
2-D rotary: per patch (row, col) with frequencies theta^(-4j/head_dim), rotating the whole head.
Attention over variable-length windows is a masked full attention (same numbers as transformers'
per-window loop up to float rounding). The window layout depends only on `grid_thw`, so it is
computed once in numpy (`vision_layout`) and handed to the jitted module as integer arrays.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qwen_image_rl.models.qwen2_5_vl import RMSNorm, logical_dense, rotate_half

Dtype = Any


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """Fields of transformers' Qwen2_5_VLVisionConfig that shape the computation."""

  depth: int = 32
  hidden_size: int = 1280
  intermediate_size: int = 3420
  num_heads: int = 16
  in_channels: int = 3
  patch_size: int = 14
  spatial_merge_size: int = 2
  temporal_patch_size: int = 2
  window_size: int = 112
  out_hidden_size: int = 3584
  fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
  tokens_per_second: int = 4
  rope_theta: float = 10000.0

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def patch_dim(self) -> int:
    return self.in_channels * self.temporal_patch_size * self.patch_size**2

  @classmethod
  def from_config(cls, config: Mapping[str, Any]) -> VisionConfig:
    """From a Qwen2_5_VLConfig dict (uses its `vision_config`) or a vision config dict."""
    vision = dict(config.get("vision_config") or config)
    act = vision.get("hidden_act", "silu")
    if act != "silu":
      raise ValueError(f"vision hidden_act={act!r}: only silu is implemented")
    names = {f.name for f in dataclasses.fields(cls)} - {"rope_theta", "fullatt_block_indexes"}
    fields = {k: vision[k] for k in names if k in vision}
    if "in_channels" not in vision and "in_chans" in vision:  # hub configs' legacy name
      fields["in_channels"] = vision["in_chans"]
    rope = vision.get("rope_parameters") or {}
    fields["rope_theta"] = float(rope.get("rope_theta", vision.get("rope_theta", 10000.0)))
    if "fullatt_block_indexes" in vision:
      fields["fullatt_block_indexes"] = tuple(int(i) for i in vision["fullatt_block_indexes"])
    for key in ("patch_size", "temporal_patch_size"):
      if isinstance(fields.get(key), (list, tuple)):
        raise ValueError(f"vision {key}={fields[key]}: only a single int is supported")
    out = cls(**fields)
    if out.hidden_size % out.num_heads or out.head_dim % 4:
      raise ValueError(
        f"vision hidden_size={out.hidden_size} / num_heads={out.num_heads} must "
        "give a head_dim divisible by 4 (2-D rotary)"
      )
    return out

  def to_dict(self) -> dict[str, Any]:
    out = dataclasses.asdict(self)
    out["fullatt_block_indexes"] = list(self.fullatt_block_indexes)
    out["rope_parameters"] = {"rope_type": "axial", "rope_theta": out.pop("rope_theta")}
    out.update(model_type="qwen2_5_vl_vision", hidden_act="silu")
    return out


@dataclasses.dataclass(frozen=True)
class VisionLayout:
  """Index arrays the vision tower needs for one set of image grids (numpy, int32).

  window_index [N/m^2]: merge groups in window order. rope_positions [N, 2]: (row, col) of each
  patch, already in window order. window_segments / full_segments: attention segment of each
  (window-ordered) patch for window blocks / full blocks, [N]; or [S, N / S] when all S
  segments hold the same number of patches, so attention runs segment by segment (a static
  shape under jit) instead of over all N patches with a mask. restore_index [N/m^2]: undoes
  window_index on the merged tokens.
  """

  window_index: np.ndarray
  rope_positions: np.ndarray
  window_segments: np.ndarray
  full_segments: np.ndarray
  restore_index: np.ndarray

  def arrays(self) -> dict[str, np.ndarray]:
    return dataclasses.asdict(self)


def check_grid_thw(grid_thw, config: VisionConfig) -> np.ndarray:
  grid = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
  m = config.spatial_merge_size
  bad = [g.tolist() for g in grid if g[0] < 1 or g[1] % m or g[2] % m or min(g[1:]) < m]
  if bad:
    raise ValueError(
      f"image_grid_thw rows {bad}: height and width (in patches) must be positive "
      f"multiples of spatial_merge_size={m}, t >= 1"
    )
  return grid


def _patch_positions(t: int, h: int, w: int, m: int) -> np.ndarray:
  """(row, col) of each patch in the processor's order: merge blocks, then inside a block."""
  rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  shape = (h // m, m, w // m, m)
  rows = rows.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
  cols = cols.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
  return np.tile(np.stack([rows, cols], axis=-1), (t, 1))


def _window_order(t: int, h: int, w: int, window: int) -> tuple[np.ndarray, np.ndarray]:
  """Merge-group indices window by window, and the number of groups in each window."""
  index = np.arange(t * h * w).reshape(t, h, w)
  pad_h, pad_w = -h % window, -w % window
  padded = np.pad(index, ((0, 0), (0, pad_h), (0, pad_w)), constant_values=-1)
  nh, nw = (h + pad_h) // window, (w + pad_w) // window
  windows = padded.reshape(t, nh, window, nw, window).transpose(0, 1, 3, 2, 4)
  windows = windows.reshape(t * nh * nw, window * window)
  sizes = (windows >= 0).sum(-1)
  order = windows.reshape(-1)
  return order[order >= 0], sizes[sizes > 0]


def segment_ids(sizes: np.ndarray) -> np.ndarray:
  """int32 segment id of each patch: [N], or [S, L] when all S segments have L patches."""
  ids = np.repeat(np.arange(len(sizes)), sizes).astype(np.int32)
  return ids.reshape(len(sizes), -1) if sizes.min() == sizes.max() else ids


def vision_layout(grid_thw, config: VisionConfig) -> VisionLayout:
  """The window / rotary bookkeeping of transformers' vision forward, for `grid_thw` [n, 3]."""
  grid = check_grid_thw(grid_thw, config)
  m, unit = config.spatial_merge_size, config.spatial_merge_size**2
  window = config.window_size // m // config.patch_size
  if window < 1:
    raise ValueError(
      f"window_size={config.window_size} is smaller than one merge group "
      f"({m} x patch_size {config.patch_size})"
    )
  orders, window_sizes, positions, frame_sizes = [], [], [], []
  offset = 0
  for t, h, w in grid.tolist():
    order, sizes = _window_order(t, h // m, w // m, window)
    orders.append(order + offset)
    window_sizes.append(sizes * unit)
    positions.append(_patch_positions(t, h, w, m))
    frame_sizes.append(np.full(t, h * w))
    offset += t * (h // m) * (w // m)
  window_index = np.concatenate(orders)
  patch_order = (window_index[:, None] * unit + np.arange(unit)).reshape(-1)
  rope_positions = np.concatenate(positions)[patch_order]
  return VisionLayout(
    window_index=window_index.astype(np.int32),
    rope_positions=rope_positions.astype(np.int32),
    window_segments=segment_ids(np.concatenate(window_sizes)),
    full_segments=segment_ids(np.concatenate(frame_sizes)),
    restore_index=np.argsort(window_index).astype(np.int32),
  )


def vision_rope(positions: jax.Array, head_dim: int, theta: float):
  """cos, sin [N, head_dim] (float32) for (row, col) positions [N, 2]."""
  quarter = head_dim // 2
  inv_freq = 1.0 / (theta ** (jnp.arange(0, quarter, 2, dtype=jnp.float32) / quarter))
  freqs = positions[..., None].astype(jnp.float32) * inv_freq  # [N, 2, head_dim/4]
  freqs = jnp.concatenate([freqs[:, 0], freqs[:, 1]], axis=-1)
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def segment_attention(q, k, v, mask=None):
  """Softmax attention per segment: q, k, v [S, L, heads, head_dim], mask [S, 1, L, L] or None."""
  scores = jnp.einsum("sqhd,skhd->shqk", q, k, preferred_element_type=jnp.float32)
  scores = scores * q.shape[-1] ** -0.5
  if mask is not None:
    scores = jnp.where(mask, scores, -jnp.inf)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  return jnp.einsum("shqk,skhd->sqhd", probs, v)


class VisionAttention(nn.Module):
  num_heads: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, cos, sin, segments):
    n, dim = x.shape
    head_dim = dim // self.num_heads
    qkv = logical_dense(3 * dim, ("embed", "heads"), True, self.dtype, self.param_dtype, "qkv")(x)
    q, k, v = jnp.moveaxis(qkv.reshape(n, 3, self.num_heads, head_dim), 1, 0)
    # transformers rotates in float32 and casts back.
    rope = lambda t: (
      t.astype(jnp.float32) * cos[:, None] + rotate_half(t.astype(jnp.float32)) * sin[:, None]
    ).astype(t.dtype)
    q, k = rope(q), rope(k)
    if segments.ndim == 2:  # equal segments: attend within each, O(N L) instead of O(N^2)
      out = segment_attention(*(t.reshape(*segments.shape, *t.shape[1:]) for t in (q, k, v)))
    else:
      same = segments[:, None] == segments[None, :]
      out = segment_attention(q[None], k[None], v[None], same[None, None])
    out = out.reshape(n, dim)
    return logical_dense(dim, ("heads", "embed"), True, self.dtype, self.param_dtype, "proj")(out)


class VisionMLP(nn.Module):
  """SwiGLU with biases."""

  intermediate_size: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    dense = lambda n, axes, name: logical_dense(n, axes, True, self.dtype, self.param_dtype, name)
    h = nn.silu(dense(self.intermediate_size, ("embed", "mlp"), "gate_proj")(x)) * dense(
      self.intermediate_size, ("embed", "mlp"), "up_proj"
    )(x)
    return dense(x.shape[-1], ("mlp", "embed"), "down_proj")(h)


class VisionBlock(nn.Module):
  num_heads: int
  intermediate_size: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, cos, sin, segments):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = x + VisionAttention(self.num_heads, name="attn", **kw)(
      RMSNorm(1e-6, name="norm1", **kw)(x), cos, sin, segments
    )
    return x + VisionMLP(self.intermediate_size, name="mlp", **kw)(
      RMSNorm(1e-6, name="norm2", **kw)(x)
    )


class PatchMerger(nn.Module):
  """RMSNorm, concatenate each 2x2 group, Linear-GELU(erf)-Linear."""

  out_features: int
  merge_unit: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = RMSNorm(1e-6, dtype=self.dtype, param_dtype=self.param_dtype, name="ln_q")(x)
    x = x.reshape(-1, self.merge_unit * x.shape[-1])
    dense = lambda n, axes, name: logical_dense(n, axes, True, self.dtype, self.param_dtype, name)
    x = nn.gelu(dense(x.shape[-1], ("embed", "mlp"), "mlp_0")(x), approximate=False)
    return dense(self.out_features, ("mlp", "embed"), "mlp_2")(x)


class Qwen25VLVisionModel(nn.Module):
  """Vision tower: pixel patches -> merged image tokens [N / merge^2, out_hidden_size].

  Param tree mirrors transformers: patch_embed/proj, blocks_{i}/{norm1, attn/{qkv, proj}, norm2,
  mlp/{gate,up,down}_proj}, merger/{ln_q, mlp_0, mlp_2}.
  """

  config: VisionConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  # Gradients reach the merger only (the blocks' output under stop_gradient): for a tower whose
  # blocks stay fixed, so XLA drops their backward pass instead of computing zeroed gradients.
  merger_gradients_only: bool = False

  @nn.compact
  def __call__(self, pixel_values, layout: Mapping[str, jax.Array]):
    """pixel_values [N, patch_dim]; layout: `vision_layout(grid_thw, config).arrays()`."""
    cfg = self.config
    if pixel_values.ndim != 2 or pixel_values.shape[-1] != cfg.patch_dim:
      raise ValueError(
        f"pixel_values shape {pixel_values.shape}: expected [N, {cfg.patch_dim}] "
        "(C * temporal_patch * patch^2)"
      )
    if pixel_values.shape[0] != layout["rope_positions"].shape[0]:
      raise ValueError(
        f"{pixel_values.shape[0]} patch rows but image_grid_thw describes "
        f"{layout['rope_positions'].shape[0]}"
      )
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    unit = cfg.spatial_merge_size**2
    x = logical_dense(
      cfg.hidden_size, ("conv_in", "embed"), False, self.dtype, self.param_dtype, "patch_embed"
    )(pixel_values.astype(self.dtype))
    n = x.shape[0]
    x = x.reshape(n // unit, unit, -1)[layout["window_index"]].reshape(n, -1)
    cos, sin = vision_rope(layout["rope_positions"], cfg.head_dim, cfg.rope_theta)
    for i in range(cfg.depth):
      full = i in cfg.fullatt_block_indexes
      segments = layout["full_segments"] if full else layout["window_segments"]
      x = VisionBlock(cfg.num_heads, cfg.intermediate_size, name=f"blocks_{i}", **kw)(
        x, cos, sin, segments
      )
    if self.merger_gradients_only:
      x = jax.lax.stop_gradient(x)
    merged = PatchMerger(cfg.out_hidden_size, unit, name="merger", **kw)(x)
    return merged[layout["restore_index"]]


def split_image_features(
  features: jax.Array, grid_thw, config: VisionConfig
) -> Sequence[jax.Array]:
  """Per-image slices of the merged features (transformers' pooler_output split)."""
  grid = check_grid_thw(grid_thw, config)
  sizes = (grid.prod(-1) // config.spatial_merge_size**2).tolist()
  return jnp.split(features, np.cumsum(sizes)[:-1].tolist())
