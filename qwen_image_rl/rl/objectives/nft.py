"""DiffusionNFT (arXiv 2509.16117): negative-aware fine-tuning on the forward process.

From the clean rollout latents x0 with advantages A (x_t, u, t drawn as in `forward`):

  r      = clip(1/2 + clip(A, -A_max, A_max) / (2 A_max), 0, 1)       reward -> optimality prob.
  v+     = beta v_theta + (1 - beta) v_old                             implicit positive policy
  v-     = (1 + beta) v_old - beta v_theta                             implicit negative policy
  e(v)   = x_t - t v - x0 = t (u - v)                                  x0-prediction error
  l(v)   = mean(e(v)^2) / sg(max(mean|e(v)|, 1e-5))                    adaptive weighting
  L_nft  = A_max / beta * mean_{i, draws}[ r l(v+) + (1 - r) l(v-) ]
  L      = L_nft + kl_beta * mean ||v_theta - v_ref||^2

(means over the latent's elements; sg the stop-gradient). v_old is the old policy (EMA of theta
or a snapshot, `old_policy`), never differentiated. At theta = theta_old, v+ = v- = v and both
weights equal w = mean|t (u - v)|, so

  dL_nft / dtheta = mean_{i, draws} 2 t^2 clip(A, -A_max, A_max) / w * mean((v - u) dv/dtheta):

advantage-weighted flow matching (positive A pulls v toward u), bounded per sample, with an
implicit trust region once theta leaves theta_old. The factor A_max makes the scale independent of
A_max (DiffusionNFT's code multiplies by it too). The velocity is the conditional one (or CFG with
cfg_mode='both'); the rollout is any sampler (`forward`). Settings: config.rl.nft.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qwen_image_rl.rl.objectives import forward, old_policy
from qwen_image_rl.rl.objectives.registry import register

WEIGHT_FLOOR = 1e-5


def optimality(advantages, adv_max: float):
  """r = clip(1/2 + A / (2 A_max), 0, 1) with A first clipped to [-A_max, A_max]."""
  a = jnp.clip(jnp.asarray(advantages, jnp.float32), -adv_max, adv_max)
  return jnp.clip(0.5 + a / (2.0 * adv_max), 0.0, 1.0)


def adaptive_x0_loss(x_t, x0, t, v):
  """mean(e^2) / sg(mean|e|) per draw, e = x_t - t v - x0; all [b, D, ...] with t [b, D]."""
  err = x_t - t[:, :, None, None] * v - x0[:, None]
  weight = jnp.maximum(jax.lax.stop_gradient(jnp.mean(jnp.abs(err), axis=(2, 3))), WEIGHT_FLOOR)
  return jnp.mean(err * err, axis=(2, 3)) / weight


def nft_draw_losses(v, v_old, x_t, x0, t, r, beta: float):
  """The per-draw DiffusionNFT loss [b, D] (before the A_max factor and the mean).

  v, v_old, x_t [b, D, S, C]; x0 [b, S, C]; t [b, D]; r [b].
  """
  v_old = jax.lax.stop_gradient(v_old)
  positive = beta * v + (1.0 - beta) * v_old
  negative = (1.0 + beta) * v_old - beta * v
  r = r[:, None]
  return (
    r * adaptive_x0_loss(x_t, x0, t, positive) + (1.0 - r) * adaptive_x0_loss(x_t, x0, t, negative)
  ) / beta


def nft_loss(
  params,
  micro,
  *,
  old_params,
  ref_params,
  model,
  beta,
  adv_max,
  kl_beta,
  cfg_mode,
  cfg_scale,
  img_shapes,
):
  """DiffusionNFT loss of a micro-batch with draws (see `forward.make_forward_step`)."""
  x_t, u = forward.noised(micro["x0"], micro["t"], micro["eps"])
  velocity = lambda p: forward.draw_velocities(
    model, p, micro, x_t, micro["t"], cfg_mode=cfg_mode, cfg_scale=cfg_scale, img_shapes=img_shapes
  )
  v = velocity(params)
  # Without a tracked old policy the batch is on-policy: theta_old = theta.
  v_old = jax.lax.stop_gradient(v if old_params is None else velocity(old_params))
  r = optimality(micro["advantages"], adv_max)
  policy_loss = adv_max * jnp.mean(nft_draw_losses(v, v_old, x_t, micro["x0"], micro["t"], r, beta))
  kl = jnp.zeros((), jnp.float32)
  if ref_params is not None:
    kl = jnp.mean(forward.velocity_kl(v, velocity(jax.lax.stop_gradient(ref_params))))
  loss = policy_loss + kl_beta * kl
  return loss, dict(
    loss=loss,
    policy_loss=policy_loss,
    kl=kl,
    r_mean=jnp.mean(r),
    fm_loss=jnp.mean((v - u) ** 2),
    old_gap=jnp.mean((v - v_old) ** 2),
  )


# ---------------------------------------------------------------------------------------------
# The objective as the RL loop sees it (rl/objectives/registry.py).
# ---------------------------------------------------------------------------------------------

DEFAULTS = dict(
  beta=1.0, adv_max=5.0, old_policy="ema", ema_decay=0.5, ema_ramp=0.001, refresh_every=1
)


def settings(rl) -> dict:
  """config.rl.nft with DiffusionNFT's defaults for missing fields."""
  return dict(DEFAULTS, **dict(rl.get("nft", {}) or {}))


def wrap_optimizer(tx, rl):
  s = settings(rl)
  return old_policy.with_old_policy(
    tx,
    mode=s["old_policy"],
    decay=s["ema_decay"],
    ramp=s["ema_ramp"],
    refresh_every=s["refresh_every"],
  )


def make_loss(model, rl, img_shapes):
  s = settings(rl)
  img_shapes = tuple(tuple(int(v) for v in shape) for shape in img_shapes)

  def loss(params, micro, *, old_params, ref_params):
    return nft_loss(
      params,
      micro,
      old_params=old_params,
      ref_params=ref_params,
      model=model,
      beta=float(s["beta"]),
      adv_max=float(s["adv_max"]),
      kl_beta=float(rl.kl_beta),
      cfg_mode=rl.cfg_mode,
      cfg_scale=rl.cfg_scale,
      img_shapes=img_shapes,
    )

  return loss


OBJECTIVE = register(forward.forward_objective("nft", make_loss, wrap_optimizer))
make_step, make_grads = OBJECTIVE.make_step, OBJECTIVE.make_grads
