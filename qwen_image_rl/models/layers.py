"""Building blocks of the Qwen-Image DiT: dense layers with logical axes, norms, timestep
embedding, multi-scale RoPE (MSRoPE), attention and the GELU MLP.

Numerics mirror diffusers: the timestep sinusoid, the RMSNorm variance and the RoPE rotation are
computed in float32 whatever the compute dtype, so bf16 runs stay close to the PyTorch model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any
LogicalAxes = tuple[str | None, ...]

# torch.nn.Linear's default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) has variance 1/(3 fan_in).
TORCH_LINEAR_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def dense(
  features: int,
  axes: LogicalAxes,
  *,
  name: str,
  dtype: Dtype,
  param_dtype: Dtype,
  use_bias: bool = True,
  kernel_init=TORCH_LINEAR_INIT,
) -> nn.Dense:
  """nn.Dense whose kernel carries `axes` (in, out) and whose bias carries (out,)."""
  return nn.Dense(
    features,
    use_bias=use_bias,
    dtype=dtype,
    param_dtype=param_dtype,
    name=name,
    kernel_init=nn.with_logical_partitioning(kernel_init, axes),
    bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[-1],)),
  )


def constrain(x: jax.Array, axes: LogicalAxes) -> jax.Array:
  return nn.with_logical_constraint(x, axes)


# Read at trace time; the speed benchmarks switch it off to measure what it buys.
CPU_COTANGENT_BARRIERS = True


def _fusion_barrier(tree):
  """Identity that XLA:CPU cannot fuse through: a conditional whose two branches both return
  the input (the second times 1.0, taken only when the first element is NaN). XLA:CPU drops
  optimization barriers before fusion, so those do not serve."""
  first = jax.tree.leaves(tree)[0].ravel()[0]
  same = lambda t: t
  times_one = lambda t: jax.tree.map(lambda a: a * jnp.ones((), a.dtype), t)
  return jax.lax.cond(first == first, same, times_one, tree)


def _barrier_on_cpu(tree):
  if not CPU_COTANGENT_BARRIERS:
    return tree
  return jax.lax.platform_dependent(tree, cpu=_fusion_barrier, default=lambda t: t)


@jax.custom_vjp
def materialize_cotangent(tree):
  """Identity whose cotangent is materialised when lowered for CPU (no-op elsewhere).

  XLA:CPU otherwise fuses the residual stream's gradient (a long elementwise chain over every
  later layer) into each transposing copy that feeds a weight-gradient dot, recomputing the
  chain per consumer with strided reads; in the tiny GRPO update those copies took a quarter
  of the step.
  """
  return tree


def _materialize_fwd(tree):
  return tree, None


def _materialize_bwd(_, cotangent):
  return (_barrier_on_cpu(cotangent),)


materialize_cotangent.defvjp(_materialize_fwd, _materialize_bwd)


# ----------------------------------------------------------------------------------------------
# Norms
# ----------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
  """diffusers RMSNorm: variance in float32, the normalised value cast back before the scale."""

  eps: float = 1e-6
  axis_name: str | None = "norm"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param(
      "scale",
      nn.with_logical_partitioning(nn.initializers.ones_init(), (self.axis_name,)),
      (x.shape[-1],),
      self.param_dtype,
    )
    x32 = x.astype(jnp.float32)
    variance = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    y = (x32 * jax.lax.rsqrt(variance + self.eps)).astype(self.dtype)
    return y * scale.astype(self.dtype)


def layer_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  """LayerNorm without affine parameters; statistics in float32 like torch's fused kernel."""
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
  return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
  """AdaLN: x * (1 + scale) + shift, with [B, D] parameters broadcast over the sequence."""
  return x * (1 + scale[:, None, :]) + shift[:, None, :]


# ----------------------------------------------------------------------------------------------
# Timestep embedding
# ----------------------------------------------------------------------------------------------


def timestep_sinusoid(
  t: jax.Array,
  dim: int = 256,
  *,
  flip_sin_to_cos: bool = True,
  downscale_freq_shift: float = 0.0,
  scale: float = 1000.0,
  max_period: float = 10000.0,
) -> jax.Array:
  """diffusers.get_timestep_embedding, in float32. t: [B] -> [B, dim]."""
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32)
  freqs = jnp.exp(exponent / (half - downscale_freq_shift))
  angles = scale * (t.astype(jnp.float32)[:, None] * freqs[None, :])
  sin, cos = jnp.sin(angles), jnp.cos(angles)
  emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class TimestepEmbedding(nn.Module):
  """linear_1 -> SiLU -> linear_2 on the 256-d sinusoid (diffusers TimestepEmbedding)."""

  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, proj: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = dense(self.features, (None, "mlp"), name="linear_1", **kw)(proj.astype(self.dtype))
    return dense(self.features, ("mlp", "embed"), name="linear_2", **kw)(nn.silu(h))


# ----------------------------------------------------------------------------------------------
# MSRoPE
# ----------------------------------------------------------------------------------------------


def _axis_inv_freq(dim: int, theta: float) -> np.ndarray:
  # Same float32 arithmetic as QwenEmbedRope.rope_params.
  exponents = np.arange(0, dim, 2).astype(np.float32) / np.float32(dim)
  return (np.float32(1.0) / np.power(np.float32(theta), exponents)).astype(np.float32)


def _axis_angles(positions: np.ndarray, dim: int, theta: float) -> np.ndarray:
  return np.outer(positions.astype(np.float32), _axis_inv_freq(dim, theta)).astype(np.float32)


def centred_positions(n: int) -> np.ndarray:
  """scale_rope positions of an axis of length n: -(n - n//2) .. n//2 - 1."""
  return np.arange(n) - (n - n // 2)


def msrope_angles(
  img_shapes: Sequence[Sequence[int]],
  txt_len: int,
  axes_dims: Sequence[int],
  theta: float = 10000.0,
) -> tuple[np.ndarray, np.ndarray]:
  """Rotation angles [S_img, head_dim/2] and [S_txt, head_dim/2] of diffusers' QwenEmbedRope.

  The idx-th image (f, h, w) gets frame positions idx..idx+f-1 and centred h/w positions,
  row-major over (f, h, w). Text token j sits at max_i max(h_i//2, w_i//2) + j on all 3 axes.
  The tables are static (shapes are static), so they are numpy constants inside jit.
  """
  d_f, d_h, d_w = axes_dims
  img_tables, max_vid_index = [], 0
  for idx, (f, h, w) in enumerate(img_shapes):
    frame = _axis_angles(idx + np.arange(f), d_f, theta)
    height = _axis_angles(centred_positions(h), d_h, theta)
    width = _axis_angles(centred_positions(w), d_w, theta)
    grid = np.concatenate(
      [
        np.broadcast_to(frame[:, None, None, :], (f, h, w, frame.shape[-1])),
        np.broadcast_to(height[None, :, None, :], (f, h, w, height.shape[-1])),
        np.broadcast_to(width[None, None, :, :], (f, h, w, width.shape[-1])),
      ],
      axis=-1,
    )
    img_tables.append(grid.reshape(f * h * w, -1))
    max_vid_index = max(max_vid_index, h // 2, w // 2)
  txt_pos = max_vid_index + np.arange(txt_len)
  txt = np.concatenate([_axis_angles(txt_pos, d, theta) for d in axes_dims], axis=-1)
  return np.concatenate(img_tables, axis=0), txt


def apply_rope_interleaved(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotate interleaved pairs (x[2k], x[2k+1]) by the angle k, in float32.

  x: [B, S, H, D]; cos, sin: [S, D/2]. This is diffusers' complex multiplication
  (use_real=False); it is not the rotate_half convention of the text encoder.
  """
  b, s, h, d = x.shape
  pairs = x.astype(jnp.float32).reshape(b, s, h, d // 2, 2)
  re, im = pairs[..., 0], pairs[..., 1]
  cos = cos[None, :, None, :]
  sin = sin[None, :, None, :]
  out = jnp.stack([re * cos - im * sin, re * sin + im * cos], axis=-1)
  return out.reshape(b, s, h, d).astype(x.dtype)


# ----------------------------------------------------------------------------------------------
# Attention and MLP
# ----------------------------------------------------------------------------------------------


def dot_product_attention(
  q: jax.Array, k: jax.Array, v: jax.Array, key_mask: jax.Array | None = None
) -> jax.Array:
  """Non-causal softmax attention, scale 1/sqrt(head_dim), softmax in float32.

  q, k, v: [B, S, H, D]; key_mask: [B, S] bool (False keys get zero weight) or None.
  """
  scale = 1.0 / math.sqrt(q.shape[-1])
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
  if key_mask is not None:
    logits = jnp.where(key_mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


def chunked_attention(
  q: jax.Array, k: jax.Array, v: jax.Array, key_mask: jax.Array | None, query_chunk: int | None
) -> jax.Array:
  """dot_product_attention over blocks of `query_chunk` queries, each rematerialised.

  Same result; the [B, H, S, S] logits never exist at once, so a 4608-token 1024^2 step holds
  [B, H, query_chunk, S] per block in both passes (memory-efficient attention in plain XLA).
  """
  b, s, h, d = q.shape
  if query_chunk is None or s <= query_chunk:
    return dot_product_attention(q, k, v, key_mask)
  n = -(-s // query_chunk)
  q = jnp.pad(q, ((0, 0), (0, n * query_chunk - s), (0, 0), (0, 0)))
  blocks = q.reshape(b, n, query_chunk, h, d).swapaxes(0, 1)
  one = jax.checkpoint(lambda qb: dot_product_attention(qb, k, v, key_mask))
  out = jax.lax.map(one, blocks)
  return out.swapaxes(0, 1).reshape(b, n * query_chunk, h, d)[:, :s]


class FeedForward(nn.Module):
  """diffusers FeedForward(activation_fn='gelu-approximate').

  Dense(4d) -> GELU(tanh) -> Dense(d).
  """

  features: int
  hidden: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = dense(self.hidden, ("embed", "mlp"), name="proj_in", **kw)(x)
    h = constrain(nn.gelu(h, approximate=True), ("act_batch", "act_length", "act_mlp"))
    return dense(self.features, ("mlp", "embed"), name="proj_out", **kw)(h)
