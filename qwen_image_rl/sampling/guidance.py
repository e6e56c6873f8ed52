"""Qwen-Image "true CFG" with per-token norm rescaling.

diffusers' QwenImagePipeline (and the edit pipelines) combine two separate forward passes as

  comb = uncond + scale * (cond - uncond)
  out  = comb * (||cond|| / ||comb||)        L2 norms over the last (channel) dim, per token

with no epsilon: a token whose combined prediction is exactly zero gives NaN there too. The
pipeline only applies this when scale > 1 and a negative prompt is given; at scale == 1 the
formula returns `cond` up to rounding.
"""

from __future__ import annotations

import jax.numpy as jnp


def true_cfg(cond, uncond, scale):
  """Norm-rescaled classifier-free guidance, computed in float32.

  Args:
    cond: conditional velocity [..., C] (e.g. packed latents [B, L, 64]).
    uncond: unconditional (negative-prompt) velocity, same shape.
    scale: guidance scale (`true_cfg_scale`), a python float or a scalar / broadcastable array.

  Returns:
    float32 array of the input shape.
  """
  cond = jnp.asarray(cond, jnp.float32)
  uncond = jnp.asarray(uncond, jnp.float32)
  comb = uncond + scale * (cond - uncond)
  cond_norm = jnp.linalg.norm(cond, axis=-1, keepdims=True)
  comb_norm = jnp.linalg.norm(comb, axis=-1, keepdims=True)
  # Same association as diffusers: comb * (cond_norm / comb_norm).
  return comb * (cond_norm / comb_norm)


# ------------------------------------------------------------------------------------------
# The velocity every sampler, rollout and objective uses
# ------------------------------------------------------------------------------------------


def model_timestep(sigma, batch: int):
  """The transformer's timestep [batch] for sigma (scalar or [batch]), float32, as diffusers
  computes it: the scheduler's timestep sigma * 1000, divided by 1000 again by the pipeline
  (one rounding each way, so not always bit-equal to sigma)."""
  t = (jnp.asarray(sigma, jnp.float32) * 1000.0) / 1000.0
  return jnp.broadcast_to(t, (batch,))


def velocity(model, params, x, sigma, cond, mask, img_shapes, ref_latents=None):
  """One transformer call: float32 velocity [B, S, C] of the target tokens x [B, S, C].

  ref_latents (packed reference tokens, editing) go after the target tokens; the model sees its
  own dtype, as in diffusers.
  """
  b = x.shape[0]
  inputs = x if ref_latents is None else jnp.concatenate([x, ref_latents.astype(x.dtype)], 1)
  out = model.apply(
    {"params": params}, inputs.astype(model.dtype), cond, mask, model_timestep(sigma, b), img_shapes
  )
  return out.astype(jnp.float32)


def _pad_text(cond, mask, length):
  """Right-pad [B, T, D] conditioning and its [B, T] mask (None = all real) to `length`."""
  b, t = cond.shape[:2]
  if mask is None:
    mask = jnp.ones((b, t), jnp.int32)
  cond = jnp.pad(cond, ((0, 0), (0, length - t), (0, 0)))
  mask = jnp.pad(mask.astype(jnp.int32), ((0, 0), (0, length - t)))
  return cond, mask


def cfg_batch(cond, mask, neg_cond, neg_mask):
  """[cond; negative] text batch of size 2B, padded to a common length with masked keys."""
  if mask is None and neg_mask is None and cond.shape[1] == neg_cond.shape[1]:
    return jnp.concatenate([cond, neg_cond.astype(cond.dtype)]), None
  length = max(cond.shape[1], neg_cond.shape[1])
  c1, m1 = _pad_text(cond, mask, length)
  c2, m2 = _pad_text(neg_cond.astype(cond.dtype), neg_mask, length)
  return jnp.concatenate([c1, c2]), jnp.concatenate([m1, m2])


def guided_velocity(
  model,
  params,
  x,
  sigma,
  cond,
  mask,
  neg_cond=None,
  neg_mask=None,
  *,
  cfg_scale=1.0,
  img_shapes,
  ref_latents=None,
):
  """Qwen-Image's norm-rescaled true-CFG velocity, or the conditional one when neg_cond is None.

  The conditional and negative branches run as one forward of batch 2B (the shorter text padded
  with masked keys, exact up to rounding), which keeps the compiled graph and the accelerator's
  batch twice as large as two separate calls would. sigma: scalar or [B].
  """
  if neg_cond is None:
    return velocity(model, params, x, sigma, cond, mask, img_shapes, ref_latents)
  b = x.shape[0]
  text, text_mask = cfg_batch(cond, mask, neg_cond, neg_mask)
  double = lambda a: None if a is None else jnp.concatenate([a, a])
  t = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), (b,))
  v = velocity(
    model, params, double(x), double(t), text, text_mask, img_shapes, double(ref_latents)
  )
  return true_cfg(v[:b], v[b:], cfg_scale)
