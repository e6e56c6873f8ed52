"""GRPO rollouts for flow matching: an ODE trajectory with SDE transitions on the trained steps.

One rollout integrates the flow from sigmas[0] = 1 to sigmas[N] = 0 in a single jitted
`lax.scan`. On the K trained steps (`train_idx`) it takes a Flow-GRPO SDE step and stores the
state before it, the state after it and the step's Gaussian log-prob; elsewhere it takes the
deterministic Euler step (MixGRPO / Flow-GRPO-Fast "SDE window"). The noise of step i is drawn
from fold_in(key, i), so it does not depend on which other steps are trained.

CFG modes (Qwen-Image-2.0-RL section 2, "hybrid CFG"):

  cfg_mode        rollout velocity     policy velocity (objective, old and new log-probs)
  'none'          conditional          conditional
  'rollout_only'  true_cfg(cond, neg)  conditional          <- the paper's choice
  'both'          true_cfg(cond, neg)  true_cfg(cond, neg)

Under 'rollout_only' the rollout's own log-probs (`RolloutResult.log_probs`, the behaviour
policy's) are not the policy's: the old log-probs must be recomputed with the conditional branch
(`recompute_old_log_probs`) or the importance ratio starts far from 1 (the peers' pitfall). The
recomputation and the training loss share `transition_log_probs` and the same micro-batch split,
so each sample goes through the same computation at the same batch shape (DanceGRPO #57).
"""

from __future__ import annotations

import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qwen_image_rl.parallel.context import sharding_context
from qwen_image_rl.parallel.partitioning import DEFAULT_LOGICAL_AXIS_RULES
from qwen_image_rl.sampling.guidance import guided_velocity
from qwen_image_rl.sampling.schedule import euler_step
from qwen_image_rl.sampling.sde import gaussian_log_prob, step_mean_std

CFG_MODES = ("none", "rollout_only", "both")
LATENT_AXES = ("act_batch", "act_length", "act_embed")
STEP_LATENT_AXES = ("act_batch", None, "act_length", "act_embed")


@flax.struct.dataclass
class RolloutResult:
  """What a rollout keeps for training. B samples, K trained steps, S tokens, C channels."""

  final_latents: jax.Array  # [B, S, C] float32, x at sigma = sigmas[N]
  latents_t: jax.Array  # [B, K, S, C] float32, state before each trained step
  latents_next: jax.Array  # [B, K, S, C] float32, state after it (the SDE sample)
  log_probs: jax.Array  # [B, K] float32, log-prob under the rollout (behaviour) velocity
  sigmas: jax.Array  # [B, K] float32, sigma of each trained step (the model's timestep)
  sigmas_next: jax.Array  # [B, K] float32, sigma it steps to
  step_indices: jax.Array  # [K] int32, the trained steps' indices in [0, N)


# ------------------------------------------------------------------------------------------
# CFG modes (the velocity itself is sampling.guidance.guided_velocity, as in the pipelines)
# ------------------------------------------------------------------------------------------


def check_cfg_mode(cfg_mode: str, neg_cond) -> None:
  if cfg_mode not in CFG_MODES:
    raise ValueError(f"cfg_mode={cfg_mode!r}: expected one of {CFG_MODES}.")
  if cfg_mode != "none" and neg_cond is None:
    raise ValueError(
      f"cfg_mode={cfg_mode!r} needs a negative prompt (neg_cond); pass one or use cfg_mode='none'."
    )


def policy_is_guided(cfg_mode: str) -> bool:
  """Whether the policy's objective branch (old and new log-probs) uses CFG."""
  return cfg_mode == "both"


def rollout_is_guided(cfg_mode: str) -> bool:
  return cfg_mode in ("rollout_only", "both")


# ------------------------------------------------------------------------------------------
# Rollout
# ------------------------------------------------------------------------------------------


def validate_train_idx(train_idx, num_steps: int) -> None:
  """Host-side check of concrete step indices: sorted, distinct, in [0, num_steps).

  An empty array is allowed: the plain ODE rollout, no transitions recorded (objectives that
  train on the final latents only).
  """
  idx = np.asarray(train_idx)
  if idx.ndim != 1:
    raise ValueError(f"train_idx must be a 1-D array of step indices, got shape {idx.shape}.")
  if idx.size == 0:
    return
  if idx.min() < 0 or idx.max() >= num_steps:
    raise ValueError(f"train_idx {idx.tolist()} must lie in [0, {num_steps}) (N = len(sigmas)-1).")
  if np.any(np.diff(idx) <= 0):
    raise ValueError(
      f"train_idx {idx.tolist()} must be sorted ascending without repeats "
      f"(as rl.timesteps.select_timesteps returns them)."
    )


def _rollout(
  model,
  img_shapes,
  guided,
  sde_type,
  params,
  x_T,
  cond,
  mask,
  neg_cond,
  neg_mask,
  sigmas,
  train_idx,
  key,
  cfg_scale,
  noise_level,
  ref_latents,
):
  sigmas = jnp.asarray(sigmas, jnp.float32)
  train_idx = jnp.asarray(train_idx, jnp.int32)
  b = x_T.shape[0]
  k = train_idx.shape[0]
  x = jnp.asarray(x_T, jnp.float32)
  zeros = jnp.zeros((b, k) + x.shape[1:], jnp.float32)

  def step(carry, i):
    x, buf_t, buf_next, buf_logp = carry
    x = nn.with_logical_constraint(x, LATENT_AXES)
    t, t_next = sigmas[i], sigmas[i + 1]
    v = guided_velocity(
      model,
      params,
      x,
      t,
      cond,
      mask,
      neg_cond if guided else None,
      neg_mask,
      cfg_scale=cfg_scale,
      img_shapes=img_shapes,
      ref_latents=ref_latents,
    )
    mean, std = step_mean_std(sde_type, x, v, t, t_next, noise_level)
    noise = jax.random.normal(jax.random.fold_in(key, i), x.shape, jnp.float32)
    x_sde = mean + std * noise
    hits = train_idx == i
    is_train = jnp.any(hits)

    def store(bufs):
      buf_t, buf_next, buf_logp = bufs
      slot = jnp.argmax(hits)
      return (
        buf_t.at[:, slot].set(x),
        buf_next.at[:, slot].set(x_sde),
        buf_logp.at[:, slot].set(gaussian_log_prob(x_sde, mean, std)),
      )

    if k:  # static: an ODE-only rollout records nothing
      buf_t, buf_next, buf_logp = jax.lax.cond(
        is_train, store, lambda bufs: bufs, (buf_t, buf_next, buf_logp)
      )
    x_new = jnp.where(is_train, x_sde, euler_step(x, v, t, t_next))
    return (
      x_new,
      nn.with_logical_constraint(buf_t, STEP_LATENT_AXES),
      nn.with_logical_constraint(buf_next, STEP_LATENT_AXES),
      buf_logp,
    ), None

  init = (x, zeros, zeros, jnp.zeros((b, k), jnp.float32))
  (x, buf_t, buf_next, buf_logp), _ = jax.lax.scan(
    step, init, jnp.arange(sigmas.shape[0] - 1, dtype=jnp.int32)
  )
  step_sigmas = jnp.broadcast_to(sigmas[train_idx], (b, k))
  step_sigmas_next = jnp.broadcast_to(sigmas[train_idx + 1], (b, k))
  return RolloutResult(
    final_latents=x,
    latents_t=buf_t,
    latents_next=buf_next,
    log_probs=buf_logp,
    sigmas=step_sigmas,
    sigmas_next=step_sigmas_next,
    step_indices=train_idx,
  )


@functools.cache
def jitted_rollout(model, img_shapes, guided: bool, sde_type: str = "flow_grpo"):
  """fn(params, x_T, cond, mask, neg_cond, neg_mask, sigmas, train_idx, key, cfg_scale,
  noise_level, ref_latents) -> RolloutResult; call it under `parallel.sharding_context`."""
  return jax.jit(functools.partial(_rollout, model, img_shapes, guided, sde_type))


def rollout(
  model,
  params,
  x_T,
  cond,
  mask,
  neg_cond,
  neg_mask,
  sigmas,
  train_idx,
  key,
  *,
  cfg_scale: float,
  cfg_mode: str,
  noise_level: float,
  img_shapes,
  ref_latents=None,
  rules=DEFAULT_LOGICAL_AXIS_RULES,
  mesh=None,
  sde_type: str = "flow_grpo",
) -> RolloutResult:
  """Sample B trajectories; SDE on the steps `train_idx`, Euler ODE on the others.

  Args:
    model: a QwenImageTransformer; params: its (unboxed, possibly sharded) params.
    x_T: initial noise [B, S, C] (packed target tokens).
    cond, mask: prompt embeddings [B, T, D] and mask [B, T] (or None).
    neg_cond, neg_mask: negative prompt [B, T', D] / [B, T'] for CFG, or None with 'none'.
    sigmas: [N + 1] float32 schedule, decreasing to 0 (FlowMatchSchedule.sigmas).
    train_idx: int32 [K] sorted step indices in [0, N) (K static), e.g. select_timesteps.
    key: PRNG key of the SDE noise; step i uses fold_in(key, i).
    cfg_scale: true-CFG scale (traced; no recompile when it changes).
    cfg_mode: 'none' | 'rollout_only' | 'both' (static, see the module docstring).
    noise_level: the SDE's a in sigma_t = a sqrt(t / (1 - t)) (traced). At 0 the trained
      steps are Euler steps too and their log-probs are undefined (NaN).
    img_shapes: static ((1, h, w), [reference (1, h, w)]) in patches.
    ref_latents: packed reference latents [B, S_ref, C] for editing, or None.
    rules, mesh: the activation constraints' logical axis rules and mesh, entered with
      `parallel.sharding_context` around the jitted call (mesh None: the caller's, if any).
    sde_type: the trained steps' stochastic step, 'flow_grpo' or 'cps' (sampling/sde.py).

  Returns:
    RolloutResult (all float32; log_probs are the behaviour policy's, see the module docstring).
  """
  check_cfg_mode(cfg_mode, neg_cond)
  try:
    concrete_idx = np.asarray(train_idx)
  except jax.errors.TracerArrayConversionError:  # traced inside a caller's jit: checked there
    concrete_idx = None
  if concrete_idx is not None:
    validate_train_idx(concrete_idx, int(np.shape(sigmas)[0]) - 1)
  img_shapes = tuple(tuple(int(v) for v in s) for s in img_shapes)
  if not rollout_is_guided(cfg_mode):
    neg_cond = neg_mask = None
  fn = jitted_rollout(model, img_shapes, rollout_is_guided(cfg_mode), sde_type)
  with sharding_context(mesh, rules):
    return fn(
      params,
      x_T,
      cond,
      mask,
      neg_cond,
      neg_mask,
      sigmas,
      train_idx,
      key,
      jnp.asarray(cfg_scale, jnp.float32),
      jnp.asarray(noise_level, jnp.float32),
      ref_latents,
    )


# ------------------------------------------------------------------------------------------
# Policy log-probs of stored transitions (shared by the old-log-prob pass and the loss)
# ------------------------------------------------------------------------------------------


def transition_log_probs(
  model,
  params,
  batch,
  *,
  cfg_mode: str,
  cfg_scale,
  noise_level,
  img_shapes,
  sde_type: str = "flow_grpo",
):
  """Log-probs of the stored transitions under the policy's objective branch.

  The K steps of each sample are folded into the batch: one forward of b * K tokens sets.

  Args:
    batch: dict with latents_t / latents_next [b, K, S, C], sigmas / sigmas_next [b, K],
      cond [b, T, D], mask [b, T] or None, neg_cond / neg_mask (used with 'both'), and
      ref_latents [b, S_ref, C] or None.

  Returns:
    (log_probs [b, K] float32, means [b, K, S, C] float32, stds [b, K, 1, 1] float32).
  """
  x_t = batch["latents_t"]
  b, k = x_t.shape[:2]
  fold = lambda a: a.reshape((b * k,) + a.shape[2:])
  repeat = lambda a: None if a is None else jnp.repeat(a, k, axis=0)
  x = fold(nn.with_logical_constraint(jnp.asarray(x_t, jnp.float32), STEP_LATENT_AXES))
  t = fold(batch["sigmas"])
  t_next = fold(batch["sigmas_next"])
  guided = policy_is_guided(cfg_mode)
  v = guided_velocity(
    model,
    params,
    x,
    t,
    repeat(batch["cond"]),
    repeat(batch.get("mask")),
    repeat(batch.get("neg_cond")) if guided else None,
    repeat(batch.get("neg_mask")) if guided else None,
    cfg_scale=cfg_scale,
    img_shapes=img_shapes,
    ref_latents=repeat(batch.get("ref_latents")),
  )
  mean, std = step_mean_std(sde_type, x, v, t, t_next, noise_level)
  log_probs = gaussian_log_prob(fold(batch["latents_next"]), mean, std)
  unfold = lambda a: a.reshape((b, k) + a.shape[1:])
  return unfold(log_probs), unfold(mean), unfold(std)


# ------------------------------------------------------------------------------------------
# Micro-batches
# ------------------------------------------------------------------------------------------


def num_micro_batches(batch_size: int, micro_batch_size: int | None) -> int:
  if micro_batch_size is None:
    return 1
  if micro_batch_size < 1 or batch_size % micro_batch_size:
    raise ValueError(
      f"micro_batch_size={micro_batch_size} must divide the batch size {batch_size}."
    )
  return batch_size // micro_batch_size


def split_micro_batches(tree, n: int):
  """[B, ...] leaves -> [n, B / n, ...]; micro-batch j holds samples j, j + n, j + 2n, ...

  Strided rather than contiguous so that, with the batch sharded in contiguous blocks over the
  data-parallel devices, every micro-batch is spread over all devices.
  """

  def one(a):
    a = jnp.asarray(a)
    return jnp.swapaxes(a.reshape((a.shape[0] // n, n) + a.shape[1:]), 0, 1)

  return jax.tree.map(one, tree)


def merge_micro_batches(tree):
  """Inverse of `split_micro_batches`: [n, m, ...] -> [n * m, ...] in the original order."""

  def one(a):
    a = jnp.swapaxes(a, 0, 1)
    return a.reshape((a.shape[0] * a.shape[1],) + a.shape[2:])

  return jax.tree.map(one, tree)


def rollout_batch(
  result: RolloutResult, cond, mask=None, neg_cond=None, neg_mask=None, ref_latents=None, **extra
) -> dict[str, Any]:
  """The per-sample training batch (every leaf has leading dim B) for a rollout."""
  batch = dict(
    latents_t=result.latents_t,
    latents_next=result.latents_next,
    sigmas=result.sigmas,
    sigmas_next=result.sigmas_next,
    cond=cond,
    mask=mask,
    neg_cond=neg_cond,
    neg_mask=neg_mask,
    ref_latents=ref_latents,
  )
  batch.update(extra)
  return batch


def _old_log_probs(model, img_shapes, cfg_mode, n, sde_type, params, batch, cfg_scale, noise_level):
  def one(micro):
    return transition_log_probs(
      model,
      params,
      micro,
      cfg_mode=cfg_mode,
      cfg_scale=cfg_scale,
      noise_level=noise_level,
      img_shapes=img_shapes,
      sde_type=sde_type,
    )[0]

  per_micro = jax.lax.map(one, split_micro_batches(batch, n))
  return merge_micro_batches(per_micro)


@functools.cache
def jitted_old_log_probs(model, img_shapes, cfg_mode, n, sde_type="flow_grpo"):
  """fn(params, batch, cfg_scale, noise_level) -> [B, K] policy log-probs, micro-batched;
  call it under `parallel.sharding_context`."""
  return jax.jit(functools.partial(_old_log_probs, model, img_shapes, cfg_mode, n, sde_type))


def recompute_old_log_probs(
  model,
  params,
  result: RolloutResult,
  cond,
  mask,
  neg_cond=None,
  neg_mask=None,
  *,
  cfg_mode: str,
  cfg_scale: float,
  noise_level: float,
  img_shapes,
  ref_latents=None,
  micro_batch_size: int | None = None,
  rules=DEFAULT_LOGICAL_AXIS_RULES,
  mesh=None,
  sde_type: str = "flow_grpo",
):
  """Old log-probs [B, K] of the stored transitions under the policy's objective branch.

  'rollout_only' and 'none' use the conditional velocity, 'both' the CFG one. Pass the train
  step's `micro_batch_size` so that each sample is evaluated in the same batch composition as in
  the loss; the ratio is then 1 (to rounding) before the first update. `rules` and `mesh` as
  in `rollout`.
  """
  check_cfg_mode(cfg_mode, neg_cond)
  img_shapes = tuple(tuple(int(v) for v in s) for s in img_shapes)
  n = num_micro_batches(result.latents_t.shape[0], micro_batch_size)
  batch = rollout_batch(result, cond, mask, neg_cond, neg_mask, ref_latents)
  if not policy_is_guided(cfg_mode):
    batch["neg_cond"] = batch["neg_mask"] = None
  # 'none' and 'rollout_only' share the conditional policy, hence one compile.
  policy_mode = "both" if policy_is_guided(cfg_mode) else "none"
  fn = jitted_old_log_probs(model, img_shapes, policy_mode, n, sde_type)
  with sharding_context(mesh, rules):
    return fn(
      params, batch, jnp.asarray(cfg_scale, jnp.float32), jnp.asarray(noise_level, jnp.float32)
    )
