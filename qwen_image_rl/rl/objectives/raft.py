"""Reward-ranked flow matching: plain flow matching on the best rollouts of each prompt group
(online rejection-sampling fine-tuning, RAFT arXiv 2304.06767; beyond the paper).

From the clean rollout latents x0 with advantages A (x_t, u, t drawn as in `forward`):

  keep_i = A_i is among the top_k of its group  and  A_i > min_advantage
  w_i    = keep_i / mean_j keep_j                     (so the loss is a mean over kept samples)
  L      = mean_{i, draws}[ w_i mean((v_theta(x_t) - u)^2) ] + kl_beta * mean ||v_theta - v_ref||^2

Why beside nft and awm: their gradient is sum_i A_i grad L_FM(x_i), whose terms cancel within a
group in expectation but whose flow-matching noise (the (t, eps) draws) does not, so a batch of
64 rollouts carries mostly noise, and the placebo controls show that noise alone moving the base
(README, "Why the targets are out of reach here"). Here no sample is pushed away: the update is
supervised flow matching toward the group's best samples, the regime in which the base itself
learned. An exactly flat group (all advantages 0) keeps nothing; a near-flat one (oracle jitter)
still keeps its top sample unless min_advantage is raised (the measured runs, at 0, kept one sample
per group in most iterations: kept_fraction 0.125, 0.11-0.22 with exact ties). Measured on the tiny
base it collapses (README, "Why the targets are out of reach here": T2I 0.307 -> 0.159, a self-
training loop), so it is a control, not a method. The weights need whole groups, which the strided
micro-batches split, so they are computed on the whole batch first (`forward.make_forward_grads`'s
prepare). Settings: config.rl.raft (top_k, min_advantage).
"""

from __future__ import annotations

import jax.numpy as jnp

from qwen_image_rl.rl.objectives import forward
from qwen_image_rl.rl.objectives.registry import register

DEFAULTS = dict(top_k=1, min_advantage=0.0)


def settings(rl) -> dict:
  """config.rl.raft with defaults for missing fields."""
  return dict(DEFAULTS, **dict(rl.get("raft", {}) or {}))


def top_of_group_weights(advantages, group_size: int, top_k: int, min_advantage: float):
  """w [B]: 1 / (kept fraction) for the top_k samples of each contiguous group whose advantage
  exceeds min_advantage, else 0 (all 0 when nothing is kept). Ties at the k-th value are kept.
  A non-finite advantage makes every weight NaN, so the step's non-finite guard sees it."""
  a = jnp.asarray(advantages, jnp.float32).reshape(-1, group_size)
  kth = jnp.sort(a, axis=1)[:, group_size - top_k][:, None]
  keep = ((a >= kth) & (a > min_advantage)).reshape(-1).astype(jnp.float32)
  weights = keep / jnp.maximum(jnp.mean(keep), 1.0 / keep.shape[0])
  return jnp.where(jnp.all(jnp.isfinite(a)), weights, jnp.nan)


def raft_loss(
  params, micro, *, old_params, ref_params, model, kl_beta, cfg_mode, cfg_scale, img_shapes
):
  """Weighted flow-matching loss of a micro-batch with draws and weights (module docstring)."""
  del old_params  # no trust region: the kept samples are the policy's own
  x_t, u = forward.noised(micro["x0"], micro["t"], micro["eps"])
  velocity = lambda p: forward.draw_velocities(
    model, p, micro, x_t, micro["t"], cfg_mode=cfg_mode, cfg_scale=cfg_scale, img_shapes=img_shapes
  )
  v = velocity(params)
  fm = jnp.mean((v - u) ** 2, axis=(2, 3))  # [b, D]
  weights = micro["raft_weights"]
  policy_loss = jnp.mean(weights[:, None] * fm)
  kl = jnp.zeros((), jnp.float32)
  if ref_params is not None:
    kl = jnp.mean(forward.velocity_kl(v, velocity(ref_params)))
  loss = policy_loss + kl_beta * kl
  return loss, dict(
    loss=loss,
    policy_loss=policy_loss,
    kl=kl,
    kept_fraction=jnp.mean(weights > 0),
    fm_loss=jnp.mean(fm),
  )


# ---------------------------------------------------------------------------------------------
# The objective as the RL loop sees it (rl/objectives/registry.py).
# ---------------------------------------------------------------------------------------------


def wrap_optimizer(tx, rl):
  """No old policy: the update is plain supervised flow matching."""
  del rl
  return tx


def make_prepare(rl):
  s = settings(rl)
  group_size, top_k, floor = int(rl.group_size), int(s["top_k"]), float(s["min_advantage"])

  def prepare(batch):
    weights = top_of_group_weights(batch["advantages"], group_size, top_k, floor)
    return dict(batch, raft_weights=weights)

  return prepare


def make_loss(model, rl, img_shapes):
  img_shapes = tuple(tuple(int(v) for v in shape) for shape in img_shapes)

  def loss(params, micro, *, old_params, ref_params):
    return raft_loss(
      params,
      micro,
      old_params=old_params,
      ref_params=ref_params,
      model=model,
      kl_beta=float(rl.kl_beta),
      cfg_mode=rl.cfg_mode,
      cfg_scale=rl.cfg_scale,
      img_shapes=img_shapes,
    )

  return loss


OBJECTIVE = register(
  forward.forward_objective("raft", make_loss, wrap_optimizer, make_prepare=make_prepare)
)
make_step, make_grads = OBJECTIVE.make_step, OBJECTIVE.make_grads
