"""Qwen2.5-VL language model (text path) in Flax linen.

Matches transformers `Qwen2_5_VLForConditionalGeneration(...).hidden_states[-1]` (the last
decoder output after the final RMSNorm):
  x = embed_tokens(ids)
  per layer: x += o_proj(attn(RMSNorm(x)));  x += down(silu(gate(h)) * up(h)), h = RMSNorm(x)
  out = RMSNorm(x)
Attention is causal GQA (q/k/v with bias, o without), rotate_half RoPE with inverse frequencies
theta^(-2j/head_dim); the padding mask only masks keys. RMSNorm runs in float32.

Positions: transformers ignores the attention mask for text-only input and uses arange(L) for
every sample, also with left padding (RoPE is relative, so valid tokens come out the same as
unpadded). We do the same by default. For the vision path, `position_ids` may carry the 3 mRoPE
streams (temporal, height, width) as [3, B, L]; frequency chunks of sizes `mrope_section` then
come from the streams in rotation, exactly as `Qwen2_5_VLRotaryEmbedding`. With `inputs_embeds`
a vision tower can splice image features in before the decoder.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# transformers' Qwen2_5_VLRotaryEmbedding default when the config names none.
DEFAULT_MROPE_SECTION = (16, 24, 24)
REMAT_POLICIES = {
  "none": None,  # no rematerialisation
  "full": "nothing_saveable",
  "dots": "checkpoint_dots",
  "dots_no_batch": "checkpoint_dots_with_no_batch_dims",
}


def logical_dense(
  features: int, axes: tuple[str, str], use_bias: bool, dtype, param_dtype, name: str
):
  """nn.Dense whose kernel/bias carry logical axis names (so they shard by rules)."""
  return nn.Dense(
    features,
    use_bias=use_bias,
    dtype=dtype,
    param_dtype=param_dtype,
    name=name,
    kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), axes),
    bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[1],)),
  )


class RMSNorm(nn.Module):
  """w * (x * rsqrt(mean(x^2) + eps)); statistics in float32, cast back before the weight."""

  eps: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    weight = self.param(
      "weight",
      nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
      (x.shape[-1],),
      self.param_dtype,
    )
    input_dtype = x.dtype
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return weight.astype(self.dtype) * x32.astype(input_dtype).astype(self.dtype)


def rope_inv_freq(head_dim: int, theta: float) -> jax.Array:
  return 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def mrope_cos_sin(
  position_ids: jax.Array, head_dim: int, theta: float, mrope_section: Sequence[int], dtype
) -> tuple[jax.Array, jax.Array]:
  """cos, sin [B, L, head_dim] for 3-stream positions [3, B, L] (float32 math, then `dtype`)."""
  freqs = position_ids[..., None].astype(jnp.float32) * rope_inv_freq(head_dim, theta)
  # Chunk i of the head_dim/2 frequencies comes from stream i % 3.
  chunks, start = [], 0
  for i, size in enumerate(mrope_section):
    chunks.append(freqs[i % 3, ..., start : start + size])
    start += size
  freqs = jnp.concatenate(chunks, axis=-1)
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def rotate_half(x):
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x, cos, sin):
  """x [B, L, heads, D]; cos/sin [B, L, D]."""
  cos, sin = cos[:, :, None, :], sin[:, :, None, :]
  return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
  """Causal grouped-query self-attention with RoPE."""

  num_heads: int
  num_kv_heads: int
  head_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, cos, sin, mask, kv_cache=None, cache_index=None):
    """mask [B, Lq, Lk] bool. With kv_cache {"k", "v": [B, S, kv_heads, D]} the new keys and
    values are written at slot `cache_index` and the queries attend over all S slots (mask
    [B, Lq, S]); returns (out, updated cache), else (out, None)."""
    batch, length, _ = x.shape
    hidden = x.shape[-1]
    dense = lambda n, axes, bias, name: logical_dense(
      n, axes, bias, self.dtype, self.param_dtype, name
    )
    q = dense(self.num_heads * self.head_dim, ("embed", "heads"), True, "q_proj")(x)
    k = dense(self.num_kv_heads * self.head_dim, ("embed", "heads"), True, "k_proj")(x)
    v = dense(self.num_kv_heads * self.head_dim, ("embed", "heads"), True, "v_proj")(x)
    q = q.reshape(batch, length, self.num_heads, self.head_dim)
    k = k.reshape(batch, length, self.num_kv_heads, self.head_dim)
    v = v.reshape(batch, length, self.num_kv_heads, self.head_dim)
    heads_axes = ("act_batch", "act_length", "act_heads", "act_kv")
    q = nn.with_logical_constraint(apply_rope(q, cos, sin), heads_axes)
    k = nn.with_logical_constraint(apply_rope(k, cos, sin), heads_axes)
    v = nn.with_logical_constraint(v, heads_axes)
    new_cache = None
    if kv_cache is not None:
      start = (0, cache_index, 0, 0)
      k = jax.lax.dynamic_update_slice(kv_cache["k"], k.astype(kv_cache["k"].dtype), start)
      v = jax.lax.dynamic_update_slice(kv_cache["v"], v.astype(kv_cache["v"].dtype), start)
      new_cache = {"k": k, "v": v}
      k, v = k.astype(self.dtype), v.astype(self.dtype)

    # Group the query heads by their shared KV head instead of repeating K and V.
    groups = self.num_heads // self.num_kv_heads
    q = q.reshape(batch, length, self.num_kv_heads, groups, self.head_dim)
    scores = jnp.einsum("bqhgd,bkhd->bhgqk", q, k, preferred_element_type=jnp.float32)
    scores = scores * (self.head_dim**-0.5)
    # Finite fill: a fully masked row (left padding) softmaxes to uniform instead of NaN.
    scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", probs, v)
    out = out.reshape(batch, length, self.num_heads * self.head_dim)
    return dense(hidden, ("heads", "embed"), False, "o_proj")(out), new_cache


class MLP(nn.Module):
  """SwiGLU: down(silu(gate(x)) * up(x)), no biases."""

  intermediate_size: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    dense = lambda n, axes, name: logical_dense(n, axes, False, self.dtype, self.param_dtype, name)
    h = nn.silu(dense(self.intermediate_size, ("embed", "mlp"), "gate_proj")(x)) * dense(
      self.intermediate_size, ("embed", "mlp"), "up_proj"
    )(x)
    h = nn.with_logical_constraint(h, ("act_batch", "act_length", "act_mlp"))
    return dense(x.shape[-1], ("mlp", "embed"), "down_proj")(h)


class DecoderLayer(nn.Module):
  num_heads: int
  num_kv_heads: int
  head_dim: int
  intermediate_size: int
  rms_norm_eps: float
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, cos, sin, mask, kv_cache=None, cache_index=None):
    """Returns (x, updated kv_cache or None)."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = RMSNorm(self.rms_norm_eps, name="input_layernorm", **kw)(x)
    attn, kv_cache = Attention(
      self.num_heads, self.num_kv_heads, self.head_dim, name="self_attn", **kw
    )(h, cos, sin, mask, kv_cache, cache_index)
    x = x + attn
    h = RMSNorm(self.rms_norm_eps, name="post_attention_layernorm", **kw)(x)
    x = x + MLP(self.intermediate_size, name="mlp", **kw)(h)
    return nn.with_logical_constraint(x, ("act_batch", "act_length", "act_embed")), kv_cache


class _ScanLayer(nn.Module):
  """DecoderLayer in the (carry, xs) -> (carry, ys) form nn.scan wants (xs: the layer's cache)."""

  layer_kwargs: Mapping[str, Any]

  @nn.compact
  def __call__(self, x, cos, sin, mask, kv_cache, cache_index):
    return DecoderLayer(**self.layer_kwargs, name="layer")(x, cos, sin, mask, kv_cache, cache_index)


class Qwen25VLTextModel(nn.Module):
  """Qwen2.5-VL decoder; returns the last hidden state after the final norm, [B, L, H].

  Param tree mirrors transformers names: embed_tokens/embedding, layers_{i}/{input_layernorm,
  self_attn/{q,k,v,o}_proj, post_attention_layernorm, mlp/{gate,up,down}_proj}, norm.
  With scan_layers=True the layers are one stacked tree `layers/layer/...` with a leading
  layer axis (logical name "layers").
  """

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  num_key_value_heads: int
  rms_norm_eps: float = 1e-6
  rope_theta: float = 1_000_000.0
  mrope_section: tuple[int, ...] = DEFAULT_MROPE_SECTION
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat_policy: str = "none"
  scan_layers: bool = False
  # LM head: "none" (return hidden states, the text-encoder use), "tied" (logits through the
  # token embedding) or "separate" (its own [H, V] kernel, transformers' lm_head).
  head: str = "none"

  @property
  def head_dim(self) -> int:
    # transformers derives it this way and ignores any head_dim in the config.
    return self.hidden_size // self.num_attention_heads

  @classmethod
  def from_config(cls, config: Mapping[str, Any], **overrides) -> Qwen25VLTextModel:
    """Build from a transformers Qwen2_5_VLConfig dict (config.json) or its text_config."""
    return cls(**text_fields_from_config(config), **overrides)

  def _validate(self):
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(
        f"hidden_size={self.hidden_size} is not divisible by "
        f"num_attention_heads={self.num_attention_heads}"
      )
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(
        f"num_attention_heads={self.num_attention_heads} is not a multiple of "
        f"num_key_value_heads={self.num_key_value_heads}"
      )
    if sum(self.mrope_section) != self.head_dim // 2:
      raise ValueError(
        f"mrope_section={tuple(self.mrope_section)} must sum to head_dim/2 = {self.head_dim // 2}"
      )
    if self.head not in ("none", "tied", "separate"):
      raise ValueError(f"head={self.head!r}: expected 'none', 'tied' or 'separate'")
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(
        f"remat_policy={self.remat_policy!r}: expected one of {sorted(REMAT_POLICIES)}"
      )

  @nn.compact
  def __call__(
    self,
    input_ids=None,
    attention_mask=None,
    position_ids=None,
    inputs_embeds=None,
    *,
    kv_cache=None,
    cache_index=0,
    splice_embeds=None,
    splice_mask=None,
    output_positions=None,
    skip_head: bool = False,
  ):
    """
    Args:
      input_ids: [B, L] int token ids (or None when `inputs_embeds` is given).
      attention_mask: [B, L] (or [B, S] over the cache slots with `kv_cache`), 1 for real
        tokens, 0 for padding (keys only); None = all real.
      position_ids: None (arange(L) + cache_index for every sample, as transformers for
        text-only input), [B, L], or [3, B, L] mRoPE streams (temporal, height, width).
      inputs_embeds: [B, L, H] embeddings used instead of looking up `input_ids`.
      kv_cache: None, or per-layer {"k", "v": [B, S, kv_heads, head_dim]} (a list; with
        scan_layers one tree with a leading layer axis) from `init_kv_cache`. The L new tokens
        occupy slots cache_index .. cache_index + L - 1 and attend causally over the slots.
      splice_embeds, splice_mask: [B, L, H] and [B, L] bool: embeddings (image features) that
        replace the token embeddings where the mask is set.
      output_positions: [B, K] int: return only these positions (before the LM head).
      skip_head: return hidden states even when the model has an LM head.
    Returns:
      the last hidden state after the final norm [B, L, H] (head="none") or logits [B, L, V];
      with kv_cache a pair (that, updated kv_cache).
    """
    self._validate()
    embed = nn.Embed(
      self.vocab_size,
      self.hidden_size,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name="embed_tokens",
      embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
    )
    if (input_ids is None) == (inputs_embeds is None):
      raise ValueError("pass exactly one of input_ids and inputs_embeds")
    if inputs_embeds is None:
      x = embed(input_ids)
    else:
      # Create the embedding param anyway so the param tree does not depend on the call.
      if self.is_initializing():
        embed(jnp.zeros((1, 1), jnp.int32))
      x = inputs_embeds.astype(self.dtype)
    if splice_embeds is not None:
      x = jnp.where(splice_mask[..., None], splice_embeds.astype(self.dtype), x)
    batch, length, _ = x.shape
    x = nn.with_logical_constraint(x, ("act_batch", "act_length", "act_embed"))

    cos, sin = mrope_cos_sin(
      self._position_streams(position_ids, batch, length, cache_index),
      self.head_dim,
      self.rope_theta,
      self.mrope_section,
      self.dtype,
    )
    slots = length if kv_cache is None else _cache_length(kv_cache, self.scan_layers)
    mask = causal_mask(attention_mask, batch, length, slots, cache_index)
    x, kv_cache = self._layers(x, cos, sin, mask, kv_cache, cache_index)
    x = RMSNorm(self.rms_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype, name="norm")(x)
    if output_positions is not None:
      x = jnp.take_along_axis(x, output_positions[..., None], axis=1)
    if not skip_head:
      x = self._head(x, embed)
    return x if kv_cache is None else (x, kv_cache)

  def _position_streams(self, position_ids, batch, length, cache_index):
    if position_ids is None:
      positions = jnp.arange(length) + cache_index
      return jnp.broadcast_to(positions[None, None, :], (3, batch, length))
    if position_ids.ndim == 2:
      return jnp.broadcast_to(position_ids[None], (3,) + position_ids.shape)
    if position_ids.ndim != 3 or position_ids.shape[0] != 3:
      raise ValueError(f"position_ids shape {position_ids.shape}: expected [B,L] or [3,B,L]")
    return position_ids

  def _layers(self, x, cos, sin, mask, kv_cache, cache_index):
    layer_kwargs = dict(
      num_heads=self.num_attention_heads,
      num_kv_heads=self.num_key_value_heads,
      head_dim=self.head_dim,
      intermediate_size=self.intermediate_size,
      rms_norm_eps=self.rms_norm_eps,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
    )
    policy = REMAT_POLICIES[self.remat_policy]
    if self.scan_layers:
      block = _ScanLayer
      if policy is not None:
        block = nn.remat(block, policy=getattr(jax.checkpoint_policies, policy), prevent_cse=False)
      scanned = nn.scan(
        block,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0, nn.broadcast),
        length=self.num_hidden_layers,
        metadata_params={nn.PARTITION_NAME: "layers"},
      )
      return scanned(layer_kwargs, name="layers")(x, cos, sin, mask, kv_cache, cache_index)
    block = DecoderLayer
    if policy is not None:
      block = nn.remat(block, policy=getattr(jax.checkpoint_policies, policy))
    new_cache = []
    for i in range(self.num_hidden_layers):
      layer_cache = None if kv_cache is None else kv_cache[i]
      x, layer_cache = block(**layer_kwargs, name=f"layers_{i}")(
        x, cos, sin, mask, layer_cache, cache_index
      )
      new_cache.append(layer_cache)
    return x, (None if kv_cache is None else new_cache)

  def _head(self, x, embed):
    if self.head == "none":
      return x
    if self.head == "tied":
      return embed.attend(x)
    return logical_dense(
      self.vocab_size, ("embed", "vocab"), False, self.dtype, self.param_dtype, "lm_head"
    )(x)


def causal_mask(attention_mask, batch: int, length: int, slots: int, cache_index) -> jax.Array:
  """[B, L, S] bool: query i (slot cache_index + i) sees key slots <= its own that are real."""
  q_slots = cache_index + jnp.arange(length)
  mask = (jnp.arange(slots)[None, :] <= q_slots[:, None])[None]
  if attention_mask is None:
    return jnp.broadcast_to(mask, (batch, length, slots))
  if attention_mask.shape[-1] != slots:
    raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} keys, expected {slots}")
  return mask & attention_mask.astype(jnp.bool_)[:, None, :]


def _cache_length(kv_cache, scan_layers: bool) -> int:
  return (kv_cache if scan_layers else kv_cache[0])["k"].shape[-3]


def init_kv_cache(model: Qwen25VLTextModel, batch: int, slots: int, dtype=None):
  """Zero KV cache for `slots` positions, in the form Qwen25VLTextModel takes."""
  shape = (batch, slots, model.num_key_value_heads, model.head_dim)
  dtype = dtype or model.dtype
  if model.scan_layers:
    layered = (model.num_hidden_layers,) + shape
    return {"k": jnp.zeros(layered, dtype), "v": jnp.zeros(layered, dtype)}
  return [
    {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
    for _ in range(model.num_hidden_layers)
  ]


def text_fields_from_config(config: Mapping[str, Any]) -> dict[str, Any]:
  """Qwen25VLTextModel fields from a Qwen2_5_VLConfig dict (nested or flat, v4 or v5 RoPE).

  The nested `text_config` wins; top-level keys (legacy flat configs) fill what it lacks.
  RoPE: v5 `rope_parameters={"rope_theta", "mrope_section", ...}`, or legacy `rope_theta` plus
  `rope_scaling={"type": "mrope"|"default", "mrope_section": ...}`.
  """
  text = dict(config)
  text.pop("text_config", None)
  text.pop("vision_config", None)
  text.update(config.get("text_config") or {})
  required = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
  )
  missing = [k for k in required if k not in text]
  if missing:
    raise ValueError(f"Qwen2.5-VL config lacks {missing} (looked in text_config and top level)")
  rope = dict(text.get("rope_parameters") or {})
  legacy_scaling = dict(text.get("rope_scaling") or {})
  rope_type = rope.get(
    "rope_type", legacy_scaling.get("rope_type", legacy_scaling.get("type", "default"))
  )
  if rope_type not in ("default", "mrope"):
    raise ValueError(f"rope type {rope_type!r} is not supported (only default/mrope)")
  theta = rope.get("rope_theta", text.get("rope_theta", 1_000_000.0))
  section = rope.get("mrope_section", legacy_scaling.get("mrope_section", DEFAULT_MROPE_SECTION))
  act = text.get("hidden_act", "silu")
  if act != "silu":
    raise ValueError(f"hidden_act={act!r}: only silu is implemented")
  return dict(
    vocab_size=int(text["vocab_size"]),
    hidden_size=int(text["hidden_size"]),
    intermediate_size=int(text["intermediate_size"]),
    num_hidden_layers=int(text["num_hidden_layers"]),
    num_attention_heads=int(text["num_attention_heads"]),
    num_key_value_heads=int(text.get("num_key_value_heads") or text["num_attention_heads"]),
    rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
    rope_theta=float(theta),
    mrope_section=tuple(int(s) for s in section),
  )


def text_config_dict(model: Qwen25VLTextModel) -> dict[str, Any]:
  """The `text_config` transformers needs to rebuild `model` (v5 rope_parameters form)."""
  return {
    "model_type": "qwen2_5_vl_text",
    "vocab_size": model.vocab_size,
    "hidden_size": model.hidden_size,
    "intermediate_size": model.intermediate_size,
    "num_hidden_layers": model.num_hidden_layers,
    "num_attention_heads": model.num_attention_heads,
    "num_key_value_heads": model.num_key_value_heads,
    "rms_norm_eps": model.rms_norm_eps,
    "hidden_act": "silu",
    "rope_parameters": {
      "rope_type": "default",
      "rope_theta": model.rope_theta,
      "mrope_section": list(model.mrope_section),
    },
  }
