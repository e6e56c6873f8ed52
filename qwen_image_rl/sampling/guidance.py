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
