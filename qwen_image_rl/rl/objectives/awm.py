"""Advantage Weighted Matching (AWM, arXiv 2509.25050): policy gradient on the flow-matching loss.

From the clean rollout latents x0 with advantages A (x_t, u, t drawn as in `forward`, D draws):

  l_theta,i = -mean_{draws} w(t) mean((v_theta(x_t, t) - u)^2)     a per-sample log-likelihood
                                                                   surrogate (w: rl.awm.weighting,
                                                                   'uniform' 1 or 't' t)
  rho_i     = exp(l_theta,i - l_old,i)
  L_awm     = mean_i max(-A_i rho_i, -A_i clip(rho_i, 1 - c, 1 + c))   (PPO form, wide clip c)
  L         = L_awm + kl_beta * mean ||v_theta - v_ref||^2

l_old is the same quantity under theta_old at the same draws: stop_gradient(l_theta) with one
update per rollout batch (rho = 1 exactly), else the iteration's starting params kept by
`old_policy` (snapshot refreshed every rl.inner_updates updates; the inner updates share their
draws). At theta = theta_old the gradient is

  dL_awm / dtheta = -mean_i A_i dl_theta,i / dtheta
                  = mean_i A_i mean_{draws} w(t) mean(2 (v - u) dv/dtheta) = mean_i A_i grad L_FM,i:

flow matching on each sample weighted by its advantage (descent lowers the loss on positive
samples and raises it on negative ones). Settings: config.rl.awm.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qwen_image_rl.rl.objectives import forward, old_policy
from qwen_image_rl.rl.objectives.registry import register

WEIGHTINGS = ("uniform", "t")


def fm_log_likelihood(v, u, t, weighting: str):
  """l [b] = -mean_draws w(t) mean((v - u)^2); v, u [b, D, S, C], t [b, D]."""
  if weighting not in WEIGHTINGS:
    raise ValueError(f"awm weighting={weighting!r}: expected one of {WEIGHTINGS}.")
  per_draw = jnp.mean((v - u) ** 2, axis=(2, 3))
  if weighting == "t":
    per_draw = per_draw * t
  return -jnp.mean(per_draw, axis=1)


def awm_surrogate(log_lik, old_log_lik, advantages, clip: float):
  """PPO-form loss on the likelihood ratio and its statistics; all [b]."""
  ratio = jnp.exp(log_lik - jax.lax.stop_gradient(old_log_lik))
  adv = jnp.asarray(advantages, jnp.float32)
  loss = jnp.mean(jnp.maximum(-adv * ratio, -adv * jnp.clip(ratio, 1.0 - clip, 1.0 + clip)))
  return loss, dict(
    ratio_mean=jnp.mean(ratio), clipfrac=jnp.mean((jnp.abs(ratio - 1.0) > clip).astype(jnp.float32))
  )


def awm_loss(
  params,
  micro,
  *,
  old_params,
  ref_params,
  model,
  clip,
  weighting,
  kl_beta,
  cfg_mode,
  cfg_scale,
  img_shapes,
):
  """AWM loss of a micro-batch with draws (see `forward.make_forward_step`)."""
  t = micro["t"]
  x_t, u = forward.noised(micro["x0"], t, micro["eps"])
  velocity = lambda p: forward.draw_velocities(
    model, p, micro, x_t, t, cfg_mode=cfg_mode, cfg_scale=cfg_scale, img_shapes=img_shapes
  )
  v = velocity(params)
  log_lik = fm_log_likelihood(v, u, t, weighting)
  if old_params is None:  # on-policy: the ratio is exactly 1
    old_log_lik = jax.lax.stop_gradient(log_lik)
  else:
    old_log_lik = fm_log_likelihood(jax.lax.stop_gradient(velocity(old_params)), u, t, weighting)
  policy_loss, metrics = awm_surrogate(log_lik, old_log_lik, micro["advantages"], clip)
  kl = jnp.zeros((), jnp.float32)
  if ref_params is not None:
    kl = jnp.mean(forward.velocity_kl(v, velocity(jax.lax.stop_gradient(ref_params))))
  loss = policy_loss + kl_beta * kl
  metrics.update(loss=loss, policy_loss=policy_loss, kl=kl, fm_loss=-jnp.mean(log_lik))
  return loss, metrics


# ---------------------------------------------------------------------------------------------
# The objective as the RL loop sees it (rl/objectives/registry.py).
# ---------------------------------------------------------------------------------------------

DEFAULTS = dict(clip=5.0, weighting="uniform")


def settings(rl) -> dict:
  """config.rl.awm with defaults for missing fields."""
  return dict(DEFAULTS, **dict(rl.get("awm", {}) or {}))


def wrap_optimizer(tx, rl):
  """theta_old is needed only when an iteration makes more than one update."""
  if int(rl.inner_updates) == 1:
    return tx
  return old_policy.with_old_policy(tx, mode="snapshot", refresh_every=int(rl.inner_updates))


def make_loss(model, rl, img_shapes):
  s = settings(rl)
  img_shapes = tuple(tuple(int(v) for v in shape) for shape in img_shapes)

  def loss(params, micro, *, old_params, ref_params):
    return awm_loss(
      params,
      micro,
      old_params=old_params,
      ref_params=ref_params,
      model=model,
      clip=float(s["clip"]),
      weighting=s["weighting"],
      kl_beta=float(rl.kl_beta),
      cfg_mode=rl.cfg_mode,
      cfg_scale=rl.cfg_scale,
      img_shapes=img_shapes,
    )

  return loss


OBJECTIVE = register(forward.forward_objective("awm", make_loss, wrap_optimizer))
make_step, make_grads = OBJECTIVE.make_step, OBJECTIVE.make_grads
