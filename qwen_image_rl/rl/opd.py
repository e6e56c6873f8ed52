"""On-policy distillation (Qwen-Image-2.0-RL sec. 7): a CFG-free student matches CFG teachers.

One iteration on a batch of one task:
  1. the student integrates its own conditional (CFG-free) ODE from x_{t_0} = noise over the N
     steps of the schedule and records every state x_{t_n} it evaluates a velocity at
     (`student_trajectory`; the states are samples of p_t^theta, stop-gradient);
  2. the task's teacher gives its norm-rescaled true-CFG velocity v_T(x_{t_n}, t_n, c) at the
     trained states (`teacher_velocities`, the pipelines' `guided_velocity`);
  3. the student minimises the uniform mean over samples and steps of
         ||v_theta(x_{t_n}, t_n, c) - v_T(x_{t_n}, t_n, c)||^2 / (S C)
     with its conditional velocity (`opd_loss`). Dividing the squared norm by the token count S
     and channel count C is a constant factor (per-element MSE), so learning rates carry over
     between image sizes.

Deviation (for cost, configurable): with `num_train_steps` K < N the loss uses K of the N states,
drawn without replacement per iteration (`select_steps`); an unbiased estimate of the mean over
all N steps (uniform weights), at K / N of the teacher and update cost.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from qwen_image_rl.parallel.context import sharding_context
from qwen_image_rl.parallel.partitioning import DEFAULT_LOGICAL_AXIS_RULES
from qwen_image_rl.rl.rollout import (
  LATENT_AXES,
  STEP_LATENT_AXES,
  merge_micro_batches,
  num_micro_batches,
  split_micro_batches,
)
from qwen_image_rl.sampling.guidance import guided_velocity
from qwen_image_rl.sampling.schedule import euler_step
from qwen_image_rl.train_state import TrainState, keep_if_finite

# ------------------------------------------------------------------------------------------
# Step subsets: a pure function of (seed, iteration) (task routing: rl/routing.py)
# ------------------------------------------------------------------------------------------


def select_steps(seed: int, iteration: int, num_steps: int, num_train: int) -> np.ndarray:
  """Sorted indices in [0, num_steps) of the states trained this iteration (all if num_train is
  0 or >= num_steps)."""
  if num_train <= 0 or num_train >= num_steps:
    return np.arange(num_steps, dtype=np.int32)
  rng = np.random.default_rng([seed, iteration, 12])
  return np.sort(rng.choice(num_steps, size=num_train, replace=False)).astype(np.int32)


# ------------------------------------------------------------------------------------------
# Student rollout and teacher velocities
# ------------------------------------------------------------------------------------------


def _trajectory(model, img_shapes, params, x_T, cond, mask, sigmas, ref_latents):
  sigmas = jnp.asarray(sigmas, jnp.float32)

  def step(x, i):
    x = nn.with_logical_constraint(x, LATENT_AXES)
    v = guided_velocity(
      model, params, x, sigmas[i], cond, mask, img_shapes=img_shapes, ref_latents=ref_latents
    )
    return euler_step(x, v, sigmas[i], sigmas[i + 1]), x

  final, states = jax.lax.scan(
    step, jnp.asarray(x_T, jnp.float32), jnp.arange(sigmas.shape[0] - 1, dtype=jnp.int32)
  )
  states = nn.with_logical_constraint(jnp.swapaxes(states, 0, 1), STEP_LATENT_AXES)
  return jax.lax.stop_gradient(states), final


@functools.cache
def jitted_trajectory(model, img_shapes):
  """fn(params, x_T, cond, mask, sigmas, ref_latents) -> (states, final); call it under
  `parallel.sharding_context`."""
  return jax.jit(functools.partial(_trajectory, model, img_shapes))


def student_trajectory(
  model,
  params,
  x_T,
  cond,
  mask,
  sigmas,
  *,
  img_shapes,
  ref_latents=None,
  mesh=None,
  rules=DEFAULT_LOGICAL_AXIS_RULES,
):
  """The student's CFG-free Euler ODE from x_T [B, S, C] over sigmas [N + 1].

  Returns (states [B, N, S, C]: x_{t_n} for n < N, the states whose velocity the sampler
  evaluates, stop-gradient; final latents [B, S, C]), both float32.
  """
  img_shapes = tuple(tuple(int(v) for v in s) for s in img_shapes)
  with sharding_context(mesh, rules):
    return jitted_trajectory(model, img_shapes)(params, x_T, cond, mask, sigmas, ref_latents)


def _fold(a, k):
  """[b, ...] conditioning repeated for each of K steps: [b * K, ...] (sample-major)."""
  return None if a is None else jnp.repeat(a, k, axis=0)


def step_velocity(model, params, batch, *, cfg_scale=None, img_shapes):
  """Velocities [b, K, S, C] at the batch's states [b, K, S, C] and sigmas [K]: the K steps of
  a sample are folded into one forward of b * K. With cfg_scale, the true-CFG velocity against
  batch['neg_cond'] (the teacher); without, the conditional one (the student)."""
  states = batch["states"]
  b, k = states.shape[:2]
  x = states.reshape((b * k,) + states.shape[2:])
  sigma = jnp.tile(jnp.asarray(batch["sigmas"], jnp.float32), b)
  guided = cfg_scale is not None
  v = guided_velocity(
    model,
    params,
    x,
    sigma,
    _fold(batch["cond"], k),
    _fold(batch.get("mask"), k),
    _fold(batch.get("neg_cond"), k) if guided else None,
    _fold(batch.get("neg_mask"), k) if guided else None,
    cfg_scale=1.0 if cfg_scale is None else cfg_scale,
    img_shapes=img_shapes,
    ref_latents=_fold(batch.get("ref_latents"), k),
  )
  return v.reshape(states.shape)


def _teacher_velocities(model, img_shapes, n, params, batch, cfg_scale):
  sigmas = batch["sigmas"]
  per_sample = {k: v for k, v in batch.items() if k != "sigmas"}

  def one(micro):
    return step_velocity(
      model, params, dict(micro, sigmas=sigmas), cfg_scale=cfg_scale, img_shapes=img_shapes
    )

  return merge_micro_batches(jax.lax.map(one, split_micro_batches(per_sample, n)))


@functools.cache
def jitted_teacher_velocities(model, img_shapes, n):
  """fn(params, batch, cfg_scale) -> velocities over n micro-batches; call it under
  `parallel.sharding_context`."""
  return jax.jit(functools.partial(_teacher_velocities, model, img_shapes, n))


def teacher_velocities(
  model,
  params,
  batch,
  *,
  cfg_scale: float,
  img_shapes,
  micro_batch_size: int | None = None,
  mesh=None,
  rules=DEFAULT_LOGICAL_AXIS_RULES,
):
  """The teacher's true-CFG velocities [B, K, S, C] at the batch's states, micro-batched.

  batch: states [B, K, S, C], sigmas [K], cond [B, T, D], mask [B, T], neg_cond / neg_mask
  (the negative prompt per sample) and ref_latents [B, S_ref, C] or None.
  """
  img_shapes = tuple(tuple(int(v) for v in s) for s in img_shapes)
  n = num_micro_batches(batch["states"].shape[0], micro_batch_size)
  batch = {k: v for k, v in batch.items() if v is not None}
  with sharding_context(mesh, rules):
    return jitted_teacher_velocities(model, img_shapes, n)(
      params, batch, jnp.asarray(cfg_scale, jnp.float32)
    )


# ------------------------------------------------------------------------------------------
# Loss and train step
# ------------------------------------------------------------------------------------------


def opd_loss(params, model, batch, *, img_shapes):
  """Mean over samples and steps of ||v_student - v_teacher||^2 / (S C); returns (loss,
  metrics). batch: as `teacher_velocities`' plus teacher_v [b, K, S, C]; the student's velocity
  is conditional (no CFG)."""
  v = step_velocity(model, params, batch, img_shapes=img_shapes)
  err = (v - jax.lax.stop_gradient(batch["teacher_v"])) ** 2
  per_step = jnp.mean(err, axis=(2, 3))  # [b, K]
  loss = jnp.mean(per_step)
  teacher_sq = jnp.mean(batch["teacher_v"] ** 2)
  return loss, dict(loss=loss, relative_error=loss / jnp.maximum(teacher_sq, 1e-12))


def opd_grads(params, model, batch, *, img_shapes, micro_batch_size: int | None = None):
  """Mean gradient and metrics of `opd_loss` over equal micro-batches (one scan); equals the
  whole batch's gradient up to rounding."""
  sigmas = batch["sigmas"]
  per_sample = {k: v for k, v in batch.items() if k != "sigmas" and v is not None}
  n = num_micro_batches(per_sample["states"].shape[0], micro_batch_size)
  grad_fn = jax.value_and_grad(opd_loss, has_aux=True)

  def body(acc, micro):
    (_, metrics), grads = grad_fn(params, model, dict(micro, sigmas=sigmas), img_shapes=img_shapes)
    return jax.tree.map(lambda a, g: a + g.astype(jnp.float32), acc, grads), metrics

  zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
  total, per_micro = jax.lax.scan(body, zeros, split_micro_batches(per_sample, n))
  grads = jax.tree.map(lambda g, p: (g / n).astype(p.dtype), total, params)
  return grads, jax.tree.map(jnp.mean, per_micro)


def make_opd_train_step(
  model, tx: optax.GradientTransformation, rules, *, img_shapes, micro_batch_size: int | None = None
):
  """step(state, batch) -> (state, metrics), to be jitted by the caller (donating the state).

  A non-finite loss or gradient leaves the state unchanged and reports loss = NaN.
  """
  img_shapes = tuple(tuple(int(v) for v in s) for s in img_shapes)

  def step(state: TrainState, batch):
    with nn.logical_axis_rules(rules):
      grads, metrics = opd_grads(
        state.params, model, batch, img_shapes=img_shapes, micro_batch_size=micro_batch_size
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
