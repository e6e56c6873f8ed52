"""Qwen-Image MMDiT (diffusers `QwenImageTransformer2DModel`) in Flax linen.

Dual-stream blocks: image and text tokens keep separate weights (AdaLN modulation, QKV, output
projection, MLP) and meet in one joint attention over [text, image]. Positions use MSRoPE (frame,
height, width) with centred image coordinates and text placed after the largest image. Edit
conditioning appends reference-image tokens after the target tokens; only target outputs return.

Parameters are weight-exact with diffusers (see qwen_image_rl/convert/transformer.py). With
`scan_layers=True` the blocks are one `nn.scan` whose parameters carry a leading `layers` axis,
so the 60-layer model compiles once per block.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qwen_image_rl.models import attention_kernels, layers
from qwen_image_rl.models.layers import constrain, dense

Dtype = Any
ImgShapes = tuple[tuple[int, int, int], ...]

HIDDEN_AXES = ("act_batch", "act_length", "act_embed")
HEAD_AXES = ("act_batch", "act_length", "act_heads", "act_kv")

REMAT_POLICIES = {
  "none": None,  # no rematerialisation at all
  "full": "full",  # save nothing, recompute the whole block in the backward pass
  "dots_saveable": jax.checkpoint_policies.dots_saveable,
  "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
  "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
  "everything_saveable": jax.checkpoint_policies.everything_saveable,
}

# How fresh parameters are drawn (loaded checkpoints overwrite them all). 'torch': every linear
# layer as torch.nn.Linear, like diffusers. 'adaln_zero' (DiT, Peebles & Xie 2023): the blocks'
# and norm_out's modulation and proj_out start at zero, so every block starts as the identity
# (its gates are 0) and the model predicts velocity 0.
INIT_SCHEMES = ("torch", "adaln_zero")

# diffusers config fields, with the diffusers defaults (the 20B Qwen-Image model).
DIFFUSERS_FIELDS = (
  "patch_size",
  "in_channels",
  "out_channels",
  "num_layers",
  "attention_head_dim",
  "num_attention_heads",
  "joint_attention_dim",
  "guidance_embeds",
  "axes_dims_rope",
  "zero_cond_t",
  "use_additional_t_cond",
  "use_layer3d_rope",
)
_IGNORED_CONFIG_KEYS = ("_class_name", "_diffusers_version", "_name_or_path", "_use_default_values")


class JointAttention(nn.Module):
  """Joint attention over [text, image] with per-stream projections and QK RMSNorm."""

  num_heads: int
  head_dim: int
  query_chunk: int | None = None
  implementation: str = "xla"  # 'flash': the Pallas TPU kernel (attention_kernels.py)
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, img, txt, key_mask, rope_cos, rope_sin):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    inner = self.num_heads * self.head_dim
    dim = img.shape[-1]

    def heads(x, proj_name, norm_name=None):
      y = dense(inner, ("embed", "heads"), name=proj_name, **kw)(x)
      y = y.reshape(*y.shape[:2], self.num_heads, self.head_dim)
      if norm_name is not None:
        y = layers.RMSNorm(eps=1e-6, name=norm_name, **kw)(y)
      return constrain(y, HEAD_AXES)

    q = jnp.concatenate(
      [heads(txt, "add_q_proj", "norm_added_q"), heads(img, "to_q", "norm_q")], axis=1
    )
    k = jnp.concatenate(
      [heads(txt, "add_k_proj", "norm_added_k"), heads(img, "to_k", "norm_k")], axis=1
    )
    v = jnp.concatenate([heads(txt, "add_v_proj"), heads(img, "to_v")], axis=1)
    q = layers.apply_rope_interleaved(q, rope_cos, rope_sin)
    k = layers.apply_rope_interleaved(k, rope_cos, rope_sin)
    out = attention_kernels.attention(
      q, k, v, key_mask, implementation=self.implementation, query_chunk=self.query_chunk
    )
    out = constrain(out, HEAD_AXES).reshape(*out.shape[:2], inner)
    n_txt = txt.shape[1]
    img_out = dense(dim, ("heads", "embed"), name="to_out", **kw)(out[:, n_txt:])
    txt_out = dense(dim, ("heads", "embed"), name="to_add_out", **kw)(out[:, :n_txt])
    return img_out, txt_out


class QwenImageBlock(nn.Module):
  """One dual-stream block. `num_target_tokens` < S_img means the rest are reference tokens,
  which take their image modulation from `temb_ref` (zero_cond_t) when it is given."""

  dim: int
  num_heads: int
  head_dim: int
  num_target_tokens: int
  attention_query_chunk: int | None = None
  attention_implementation: str = "xla"
  modulation_init: Any = layers.TORCH_LINEAR_INIT
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, carry, temb, temb_ref, key_mask, rope_cos, rope_sin):
    img, txt = layers.materialize_cotangent(carry)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    mod_kw = dict(kernel_init=self.modulation_init, **kw)
    img_mod = dense(6 * self.dim, ("embed", "modulation"), name="img_mod", **mod_kw)
    txt_mod = dense(6 * self.dim, ("embed", "modulation"), name="txt_mod", **mod_kw)
    img_params = self._per_token(
      img_mod(nn.silu(temb)), None if temb_ref is None else img_mod(nn.silu(temb_ref)), img.shape[1]
    )
    txt_params = [p[:, None, :] for p in jnp.split(txt_mod(nn.silu(temb)), 6, axis=-1)]
    # Each list: shift1, scale1, gate1, shift2, scale2, gate2, shaped [B, 1 or S, D].

    def mod(x, params, i):
      shift, scale, gate = params[3 * i : 3 * i + 3]
      return layers.layer_norm(x) * (1 + scale) + shift, gate

    img_in, img_gate = mod(img, img_params, 0)
    txt_in, txt_gate = mod(txt, txt_params, 0)
    img_attn, txt_attn = JointAttention(
      self.num_heads,
      self.head_dim,
      self.attention_query_chunk,
      self.attention_implementation,
      name="attn",
      **kw,
    )(img_in, txt_in, key_mask, rope_cos, rope_sin)
    img = constrain(img + img_gate * img_attn, HIDDEN_AXES)
    txt = constrain(txt + txt_gate * txt_attn, HIDDEN_AXES)
    img, txt = layers.materialize_cotangent((img, txt))

    hidden = 4 * self.dim
    img_in, img_gate = mod(img, img_params, 1)
    img = img + img_gate * layers.FeedForward(self.dim, hidden, name="img_mlp", **kw)(img_in)
    txt_in, txt_gate = mod(txt, txt_params, 1)
    txt = txt + txt_gate * layers.FeedForward(self.dim, hidden, name="txt_mlp", **kw)(txt_in)
    return (constrain(img, HIDDEN_AXES), constrain(txt, HIDDEN_AXES)), None

  def _per_token(self, params, ref_params, seq_len):
    """Six [B, 1|S, D] modulation tensors; reference tokens use `ref_params` when given."""
    chunks = [p[:, None, :] for p in jnp.split(params, 6, axis=-1)]
    n_ref = seq_len - self.num_target_tokens
    if ref_params is None or n_ref == 0:
      return chunks
    ref_chunks = [p[:, None, :] for p in jnp.split(ref_params, 6, axis=-1)]
    b = params.shape[0]
    return [
      jnp.concatenate(
        [
          jnp.broadcast_to(c, (b, self.num_target_tokens, self.dim)),
          jnp.broadcast_to(r, (b, n_ref, self.dim)),
        ],
        axis=1,
      )
      for c, r in zip(chunks, ref_chunks)
    ]


class QwenImageTransformer(nn.Module):
  """diffusers `QwenImageTransformer2DModel` (field names and defaults match its config)."""

  patch_size: int = 2
  in_channels: int = 64
  out_channels: int | None = 16
  num_layers: int = 60
  attention_head_dim: int = 128
  num_attention_heads: int = 24
  joint_attention_dim: int = 3584
  guidance_embeds: bool = False
  axes_dims_rope: tuple[int, int, int] = (16, 56, 56)
  zero_cond_t: bool = False
  use_additional_t_cond: bool = False
  use_layer3d_rope: bool = False
  remat_policy: str = "none"
  scan_layers: bool = False
  attention_query_chunk: int | None = None  # memory-efficient attention block; None = one block
  # 'xla' (any backend) | 'flash' (Pallas TPU kernel on TPU, the XLA path elsewhere)
  attention_implementation: str = "xla"
  init_scheme: str = "torch"  # INIT_SCHEMES: how init_params draws fresh weights
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def __post_init__(self):
    for flag in ("guidance_embeds", "use_additional_t_cond", "use_layer3d_rope"):
      if getattr(self, flag):
        raise NotImplementedError(
          f"QwenImageTransformer.{flag}=True is not supported (diffusers uses it only for the "
          f"Layered pipeline / a guidance path that is broken upstream); set it to False."
        )
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(
        f"QwenImageTransformer.remat_policy={self.remat_policy!r}: expected one of "
        f"{sorted(REMAT_POLICIES)}"
      )
    if len(self.axes_dims_rope) != 3 or sum(self.axes_dims_rope) != self.attention_head_dim:
      raise ValueError(
        f"QwenImageTransformer.axes_dims_rope={tuple(self.axes_dims_rope)} "
        f"must be 3 even sizes summing to "
        f"attention_head_dim={self.attention_head_dim}"
      )
    if self.attention_query_chunk is not None and self.attention_query_chunk < 1:
      raise ValueError(
        f"QwenImageTransformer.attention_query_chunk={self.attention_query_chunk}: "
        f"expected a positive block size or None"
      )
    if self.attention_implementation not in attention_kernels.IMPLEMENTATIONS:
      raise ValueError(
        f"QwenImageTransformer.attention_implementation="
        f"{self.attention_implementation!r}: expected one of "
        f"{list(attention_kernels.IMPLEMENTATIONS)}"
      )
    if self.init_scheme not in INIT_SCHEMES:
      raise ValueError(
        f"QwenImageTransformer.init_scheme={self.init_scheme!r}: expected one of {INIT_SCHEMES}"
      )
    if any(d % 2 for d in self.axes_dims_rope):
      raise ValueError(
        f"QwenImageTransformer.axes_dims_rope={tuple(self.axes_dims_rope)}: sizes must be even"
      )
    super().__post_init__()

  # ------------------------------------------------------------------------------------------
  # Config
  # ------------------------------------------------------------------------------------------

  @property
  def inner_dim(self) -> int:
    return self.num_attention_heads * self.attention_head_dim

  @property
  def output_channels(self) -> int:
    return self.out_channels or self.in_channels

  @classmethod
  def from_config(cls, config: Mapping[str, Any], **overrides) -> QwenImageTransformer:
    """Build from a diffusers config.json dict; `overrides` set our own fields (dtype, scan...)."""
    unknown = [
      k
      for k in config
      if k not in DIFFUSERS_FIELDS and k not in _IGNORED_CONFIG_KEYS and not k.startswith("_")
    ]
    if unknown:
      raise ValueError(
        f"QwenImageTransformer.from_config: unknown config keys {sorted(unknown)}; "
        f"known: {list(DIFFUSERS_FIELDS)}"
      )
    kwargs = {k: config[k] for k in DIFFUSERS_FIELDS if k in config}
    if "axes_dims_rope" in kwargs:
      kwargs["axes_dims_rope"] = tuple(int(a) for a in kwargs["axes_dims_rope"])
    own = {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}
    bad = [k for k in overrides if k not in own]
    if bad:
      raise ValueError(f"QwenImageTransformer.from_config: unknown overrides {sorted(bad)}")
    kwargs.update(overrides)
    return cls(**kwargs)

  def to_config(self) -> dict[str, Any]:
    """The diffusers config.json dict of this model."""
    config = {"_class_name": "QwenImageTransformer2DModel", "_diffusers_version": "0.42.1"}
    for k in DIFFUSERS_FIELDS:
      v = getattr(self, k)
      config[k] = list(v) if isinstance(v, tuple) else v
    return config

  # ------------------------------------------------------------------------------------------
  # Forward
  # ------------------------------------------------------------------------------------------

  def _block_cls(self):
    policy = REMAT_POLICIES[self.remat_policy]
    if policy is None:
      return QwenImageBlock
    return nn.remat(
      QwenImageBlock, policy=None if policy == "full" else policy, prevent_cse=not self.scan_layers
    )

  @nn.compact
  def __call__(
    self,
    hidden_states: jax.Array,
    encoder_hidden_states: jax.Array,
    encoder_hidden_states_mask: jax.Array | None,
    timestep: jax.Array,
    img_shapes: Sequence[Sequence[int]],
  ) -> jax.Array:
    """Velocity for the target image.

    hidden_states: [B, S, in_channels] packed latents, target tokens first, then references.
    encoder_hidden_states: [B, T, joint_attention_dim]; encoder_hidden_states_mask: [B, T] (1 =
    real token) or None. timestep: [B] sigma in [0, 1]. img_shapes: static ((f, h, w), ...) of
    the target then each reference image (in patches). Returns [B, S_target, p*p*out_channels].
    """
    img_shapes = tuple(tuple(int(v) for v in s) for s in img_shapes)
    self._check_inputs(hidden_states, encoder_hidden_states, encoder_hidden_states_mask, img_shapes)
    b, txt_len = encoder_hidden_states.shape[:2]
    n_target = math.prod(img_shapes[0])
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    d = self.inner_dim

    img = dense(d, (None, "embed"), name="img_in", **kw)(hidden_states.astype(self.dtype))
    img = constrain(img, HIDDEN_AXES)
    txt = layers.RMSNorm(eps=1e-6, name="txt_norm", **kw)(encoder_hidden_states.astype(self.dtype))
    txt = dense(d, ("joint_embed", "embed"), name="txt_in", **kw)(txt)
    txt = constrain(txt, HIDDEN_AXES)

    # diffusers casts the timestep to the model dtype before the float32 sinusoid.
    t = jnp.broadcast_to(jnp.asarray(timestep), (b,)).astype(self.dtype)
    time_embed = layers.TimestepEmbedding(d, name="time_text_embed", **kw)
    temb = time_embed(layers.timestep_sinusoid(t).astype(self.dtype))
    temb_ref = None
    if self.zero_cond_t and len(img_shapes) > 1:
      temb_ref = time_embed(layers.timestep_sinusoid(jnp.zeros_like(t)).astype(self.dtype))

    key_mask = None
    if encoder_hidden_states_mask is not None:
      key_mask = jnp.concatenate(
        [encoder_hidden_states_mask.astype(bool), jnp.ones((b, img.shape[1]), bool)], axis=1
      )

    img_angles, txt_angles = layers.msrope_angles(img_shapes, txt_len, self.axes_dims_rope)
    angles = np.concatenate([txt_angles, img_angles], axis=0)  # joint order: text, image
    rope_cos, rope_sin = jnp.asarray(np.cos(angles)), jnp.asarray(np.sin(angles))

    block_kw = dict(
      dim=d,
      num_heads=self.num_attention_heads,
      head_dim=self.attention_head_dim,
      num_target_tokens=n_target,
      attention_query_chunk=self.attention_query_chunk,
      attention_implementation=self.attention_implementation,
      modulation_init=self._zero_or_torch_init(),
      **kw,
    )
    block_cls = self._block_cls()
    carry = (img, txt)
    if self.scan_layers:
      scanned = nn.scan(
        block_cls,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=(nn.broadcast,) * 5,
        length=self.num_layers,
        metadata_params={nn.PARTITION_NAME: "layers"},
      )
      carry, _ = scanned(name="transformer_blocks", **block_kw)(
        carry, temb, temb_ref, key_mask, rope_cos, rope_sin
      )
    else:
      for i in range(self.num_layers):
        carry, _ = block_cls(name=f"transformer_blocks_{i}", **block_kw)(
          carry, temb, temb_ref, key_mask, rope_cos, rope_sin
        )
    img = carry[0][:, :n_target]

    # norm_out (AdaLayerNormContinuous) chunks as scale, shift: the opposite of the blocks.
    last_kw = dict(kernel_init=self._zero_or_torch_init(), **kw)
    emb = dense(2 * d, ("embed", "modulation"), name="norm_out", **last_kw)(nn.silu(temb))
    scale, shift = jnp.split(emb, 2, axis=-1)
    img = layers.modulate(layers.layer_norm(img), shift, scale)
    out_features = self.patch_size**2 * self.output_channels
    return dense(out_features, ("embed", None), name="proj_out", **last_kw)(img)

  def _zero_or_torch_init(self):
    """The kernel init of the layers that adaLN-Zero starts at zero (INIT_SCHEMES)."""
    if self.init_scheme == "adaln_zero":
      return nn.initializers.zeros_init()
    return layers.TORCH_LINEAR_INIT

  def _check_inputs(self, hidden_states, encoder_hidden_states, mask, img_shapes):
    if not img_shapes or any(len(s) != 3 for s in img_shapes):
      raise ValueError(
        f"img_shapes={img_shapes}: expected a tuple of (frame, height, width) "
        f"tuples, the target image first"
      )
    n_img = sum(math.prod(s) for s in img_shapes)
    if hidden_states.ndim != 3 or hidden_states.shape[1:] != (n_img, self.in_channels):
      raise ValueError(
        f"hidden_states shape {hidden_states.shape}: expected [B, {n_img}, "
        f"{self.in_channels}] (tokens of img_shapes={img_shapes}, in_channels)"
      )
    if (
      encoder_hidden_states.ndim != 3
      or encoder_hidden_states.shape[0] != hidden_states.shape[0]
      or encoder_hidden_states.shape[2] != self.joint_attention_dim
    ):
      raise ValueError(
        f"encoder_hidden_states shape {encoder_hidden_states.shape}: expected "
        f"[{hidden_states.shape[0]}, T, {self.joint_attention_dim}]"
      )
    if mask is not None and mask.shape != encoder_hidden_states.shape[:2]:
      raise ValueError(
        f"encoder_hidden_states_mask shape {mask.shape}: expected {encoder_hidden_states.shape[:2]}"
      )

  # ------------------------------------------------------------------------------------------
  # Helpers
  # ------------------------------------------------------------------------------------------

  def dummy_inputs(self, batch: int = 1, img_shapes: ImgShapes = ((1, 2, 2),), txt_len: int = 4):
    """Zero inputs of the right shapes (for init / eval_shape)."""
    n = sum(math.prod(s) for s in img_shapes)
    return dict(
      hidden_states=jnp.zeros((batch, n, self.in_channels), self.dtype),
      encoder_hidden_states=jnp.zeros((batch, txt_len, self.joint_attention_dim), self.dtype),
      encoder_hidden_states_mask=None,
      timestep=jnp.zeros((batch,), jnp.float32),
      img_shapes=img_shapes,
    )

  def init_params(self, rng: jax.Array):
    """Random parameters (boxed with logical axes), from tiny dummy inputs."""
    return self.init(rng, **self.dummy_inputs())["params"]

  def abstract_params(self):
    """ShapeDtypeStructs of the (boxed) parameters, without allocating anything."""
    return jax.eval_shape(self.init_params, jax.random.key(0))


def count_params(params) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nn.meta.unbox(params))))
