"""The GRPO objective for flow matching (Qwen-Image-2.0-RL Eq. 5) and its train step.

Per sample i and trained step t, with r = exp(log pi_theta - log pi_old) the ratio of the SDE
transition densities (see rl/rollout.py for which velocity each CFG mode uses):

  L_clip = -mean_{i,t} min(r A_i, clip(r, 1 - eps, 1 + eps) A_i)
  L      = L_clip + kl_beta * mean_{i,t} KL(pi_theta || pi_ref)

with the KL in closed form on the step means, ||mu_theta - mu_ref||^2 / (2 std^2) (Flow-GRPO;
the paper itself has no KL term, so kl_beta defaults to 0). Means over samples and steps are
plain means, so gradient accumulation over equal micro-batches equals one big batch.

The training batch is a dict of per-sample arrays (leading dim B, see `rollout.rollout_batch`):
latents_t, latents_next [B, K, S, C]; sigmas, sigmas_next, old_log_probs [B, K];
advantages [B]; cond [B, T, D]; mask [B, T] or None; neg_cond / neg_mask (for 'both');
ref_latents [B, S_ref, C] or None (editing).

old_log_probs = None means the batch is on-policy for these parameters: the old log-probs are
the current ones under stop_gradient, so the ratio is exactly 1 and the gradient is the plain
policy gradient. With one update per rollout batch that saves the separate old-log-prob
forward pass (`rollout.recompute_old_log_probs`), which later updates need.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from qwen_image_rl.rl.objectives.registry import Objective, register
from qwen_image_rl.rl.rollout import (
  CFG_MODES,
  num_micro_batches,
  policy_is_guided,
  recompute_old_log_probs,
  rollout_batch,
  split_micro_batches,
  transition_log_probs,
)
from qwen_image_rl.sampling.sde import kl_closed_form
from qwen_image_rl.train_state import TrainState, keep_if_finite

# Metrics reduced over micro-batches by min / max instead of the mean.
_MIN_METRICS = ("ratio_min",)
_MAX_METRICS = ("ratio_max",)


def clipped_surrogate(log_probs, old_log_probs, advantages, clip_eps: float):
  """PPO-clip loss and ratio statistics for log-probs [b, K] and advantages [b]."""
  log_ratio = log_probs - old_log_probs
  ratio = jnp.exp(log_ratio)
  adv = jnp.asarray(advantages, jnp.float32)[:, None]
  unclipped = -adv * ratio
  clipped = -adv * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
  loss = jnp.mean(jnp.maximum(unclipped, clipped))
  metrics = dict(
    approx_kl=0.5 * jnp.mean(log_ratio**2),  # flow_grpo's estimate
    clipfrac=jnp.mean((jnp.abs(ratio - 1.0) > clip_eps).astype(jnp.float32)),
    ratio_mean=jnp.mean(ratio),
    ratio_min=jnp.min(ratio),
    ratio_max=jnp.max(ratio),
  )
  return loss, metrics


def _uses_kl(kl_beta, ref_params) -> bool:
  """Static: whether the KL term is computed. kl_beta may be traced (then ref_params decides)."""
  concrete = isinstance(kl_beta, (int, float))
  if ref_params is None:
    if concrete and kl_beta > 0.0:
      raise ValueError("grpo_loss: kl_beta > 0 needs ref_params (the frozen reference policy).")
    return False
  return not (concrete and kl_beta == 0.0)


def grpo_loss(
  params,
  model,
  batch,
  *,
  cfg_mode: str,
  clip_eps,
  kl_beta=0.0,
  ref_params=None,
  noise_level,
  cfg_scale=1.0,
  img_shapes,
  sde_type: str = "flow_grpo",
):
  """GRPO loss of one (micro-)batch. Returns (loss, metrics); metrics are scalars.

  clip_eps, kl_beta, noise_level and cfg_scale may be traced. The KL term is computed when
  `ref_params` (the frozen reference policy) is given, unless kl_beta is a python 0.
  """
  if cfg_mode not in CFG_MODES:
    raise ValueError(f"cfg_mode={cfg_mode!r}: expected one of {CFG_MODES}.")
  if policy_is_guided(cfg_mode) and batch.get("neg_cond") is None:
    raise ValueError("cfg_mode='both' trains the CFG velocity: the batch needs neg_cond.")
  kw = dict(
    cfg_mode=cfg_mode,
    cfg_scale=cfg_scale,
    noise_level=noise_level,
    img_shapes=img_shapes,
    sde_type=sde_type,
  )
  log_probs, mean, std = transition_log_probs(model, params, batch, **kw)
  old_log_probs = batch.get("old_log_probs")
  if old_log_probs is None:  # on-policy: the ratio is exactly 1 (see the module docstring)
    old_log_probs = jax.lax.stop_gradient(log_probs)
  policy_loss, metrics = clipped_surrogate(log_probs, old_log_probs, batch["advantages"], clip_eps)
  kl = jnp.zeros((), jnp.float32)
  if _uses_kl(kl_beta, ref_params):
    _, ref_mean, _ = transition_log_probs(model, jax.lax.stop_gradient(ref_params), batch, **kw)
    b, k = log_probs.shape
    fold = lambda a: a.reshape((b * k,) + a.shape[2:])
    kl = jnp.mean(kl_closed_form(fold(mean), fold(jax.lax.stop_gradient(ref_mean)), fold(std)))
  loss = policy_loss + kl_beta * kl
  metrics.update(loss=loss, policy_loss=policy_loss, kl=kl, log_prob_mean=jnp.mean(log_probs))
  return loss, metrics


def grpo_grads(
  params, model, batch, *, micro_batch_size: int | None = None, ref_params=None, **loss_kw
):
  """Mean gradient and metrics over micro-batches of `micro_batch_size` samples (one scan).

  The micro-batch size is a per-step number of samples, independent of the device count; the
  result equals the gradient of `grpo_loss` on the whole batch (to rounding).
  """
  batch_size = batch["advantages"].shape[0]
  n = num_micro_batches(batch_size, micro_batch_size)
  grad_fn = jax.value_and_grad(grpo_loss, has_aux=True)

  def body(acc, micro):
    (_, metrics), grads = grad_fn(params, model, micro, ref_params=ref_params, **loss_kw)
    acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), acc, grads)
    return acc, metrics

  zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
  total, per_micro = jax.lax.scan(body, zeros, split_micro_batches(batch, n))
  grads = jax.tree.map(lambda g, p: (g / n).astype(p.dtype), total, params)
  metrics = {}
  for name, values in per_micro.items():
    if name in _MIN_METRICS:
      metrics[name] = jnp.min(values)
    elif name in _MAX_METRICS:
      metrics[name] = jnp.max(values)
    else:
      metrics[name] = jnp.mean(values)
  return grads, metrics


def make_grpo_train_step(
  model,
  tx: optax.GradientTransformation,
  rules,
  *,
  micro_batch_size: int | None,
  cfg_mode: str,
  clip_eps: float,
  noise_level,
  img_shapes,
  cfg_scale=1.0,
  kl_beta: float = 0.0,
  sde_type: str = "flow_grpo",
):
  """step(state, batch, ref_params=None) -> (state, metrics), to be jitted by the caller.

  Gradients are accumulated over micro-batches; clipping and the optimiser live in `tx` (e.g.
  optim.make_optimizer's chain). A step whose loss or gradient is not finite leaves the state
  unchanged and reports loss = NaN (trainers.common.fit counts it as skipped). Call the jitted
  step under `parallel.sharding_context(mesh, rules)`, or its activation constraints are off.
  """
  img_shapes = tuple(tuple(int(v) for v in s) for s in img_shapes)
  loss_kw = dict(
    cfg_mode=cfg_mode,
    clip_eps=clip_eps,
    kl_beta=kl_beta,
    noise_level=noise_level,
    cfg_scale=cfg_scale,
    img_shapes=img_shapes,
    sde_type=sde_type,
  )

  def step(state: TrainState, batch, ref_params=None):
    with nn.logical_axis_rules(rules):
      grads, metrics = grpo_grads(
        state.params,
        model,
        batch,
        micro_batch_size=micro_batch_size,
        ref_params=ref_params,
        **loss_kw,
      )
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new = state.replace(
      step=state.step + 1, params=optax.apply_updates(state.params, updates), opt_state=opt_state
    )
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
    metrics["loss"] = jnp.where(finite, metrics["loss"], jnp.nan)
    metrics["grad_norm"] = grad_norm
    return keep_if_finite(state, new, metrics["loss"]), metrics

  return step


# ---------------------------------------------------------------------------------------------
# The objective as the RL loop sees it (rl/objectives/registry.py).
# ---------------------------------------------------------------------------------------------

OLD_LOG_PROBS = ("auto", "recompute")


def make_step_from_config(model, tx, rules, rl, img_shapes):
  """`make_grpo_train_step` with the settings of config.rl."""
  return make_grpo_train_step(
    model,
    tx,
    rules,
    micro_batch_size=rl.micro_batch_size,
    cfg_mode=rl.cfg_mode,
    clip_eps=rl.clip_eps,
    noise_level=rl.noise_level,
    img_shapes=img_shapes,
    cfg_scale=rl.cfg_scale,
    kl_beta=rl.kl_beta,
    sde_type=rl.get("sde_type", "flow_grpo"),
  )


def recomputes_old_log_probs(rl) -> bool:
  """Later updates need the old log-probs fixed before the first one; a single update takes
  its own (ratio exactly 1, one forward less) unless rl.old_log_probs='recompute'."""
  return rl.inner_updates > 1 or rl.get("old_log_probs", "auto") == "recompute"


def make_batch(policy, params, result, inputs, advantages):
  """The GRPO batch of a rollout: its transitions, conditioning, advantages, old log-probs."""
  rl = policy.rl
  old = None
  if recomputes_old_log_probs(rl):
    old = recompute_old_log_probs(
      policy.model,
      params,
      result,
      **inputs,
      cfg_mode=rl.cfg_mode,
      cfg_scale=rl.cfg_scale,
      noise_level=rl.noise_level,
      img_shapes=policy.img_shapes,
      micro_batch_size=rl.micro_batch_size,
      rules=policy.rules,
      mesh=policy.mesh,
      sde_type=rl.get("sde_type", "flow_grpo"),
    )
  if not policy_is_guided(rl.cfg_mode):
    # The unconditional branch enters the objective only with cfg_mode='both'.
    inputs = dict(inputs, neg_cond=None, neg_mask=None)
  return rollout_batch(result, **inputs, advantages=advantages, old_log_probs=old)


def make_grads(model, rules, rl, img_shapes):
  """grads(params, batch, key) -> (grads, metrics): `grpo_grads` with config.rl's settings
  (the key is unused: the batch holds the rollout's noise)."""
  img_shapes = tuple(tuple(int(v) for v in s) for s in img_shapes)

  def grads(params, batch, key):
    del key
    with nn.logical_axis_rules(rules):
      return grpo_grads(
        params,
        model,
        batch,
        micro_batch_size=rl.micro_batch_size,
        cfg_mode=rl.cfg_mode,
        clip_eps=rl.clip_eps,
        noise_level=rl.noise_level,
        cfg_scale=rl.cfg_scale,
        img_shapes=img_shapes,
        sde_type=rl.get("sde_type", "flow_grpo"),
      )

  return grads


register(
  Objective(
    name="grpo",
    records="transitions",
    make_step=make_step_from_config,
    make_batch=make_batch,
    make_grads=make_grads,
  )
)
