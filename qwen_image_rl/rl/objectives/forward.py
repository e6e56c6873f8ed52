"""What the forward-process objectives (records='final_latents': `nft`, `awm`) share.

They train on the clean rollout latents x0 only, so the rollout is the plain ODE sampler (the
eval sampler at the rollout's steps and CFG scale, `rl.Roller` with no trained steps) and every
noise level is trained. Each update draws `rl.fm_draws` pairs (t, eps) per sample afresh and
noises x0 along the flow-matching path,

  x_t = (1 - t) x0 + t eps,   u = eps - x0   (the flow-matching target velocity),

with t, per `rl.fm_time`:
  'schedule'  one of the rollout schedule's N sigmas (shifted, as the sampler visits them),
              uniformly (DiffusionNFT and AWM's 'discrete' timesteps);
  'uniform'   U(T_MIN, 1).

The draws come from the train state's key folded with the update's iteration
(state.step // rl.inner_updates): a pure function of (seed, iteration), so a resumed run draws
what an uninterrupted one did, and the inner updates of one iteration share their draws (an
AWM ratio then compares the same x_t). They are drawn for the whole batch before the
micro-batch split, so micro-batching does not change them.

The step accumulates the objective's gradient over micro-batches (plain means: equal micro-batches
give the one-batch gradient), applies `tx`, and leaves the state unchanged on a non-finite loss
or gradient (train_state.keep_if_finite), as the GRPO step does.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from qwen_image_rl.rl.objectives import old_policy
from qwen_image_rl.rl.objectives.registry import Objective
from qwen_image_rl.rl.rollout import num_micro_batches, policy_is_guided, split_micro_batches
from qwen_image_rl.sampling.guidance import guided_velocity
from qwen_image_rl.train_state import TrainState, keep_if_finite

TIME_SAMPLING = ("schedule", "uniform")
T_MIN = 1e-3  # lower end of 'uniform' t: at t = 0 x_t is x0 and the loss carries nothing
_DRAW_STREAM = 0x6E6F6973  # separates the (t, eps) draws from the rollouts' keys


def draw_key(rng_data, update_index):
  """The (t, eps) key of an iteration from the train state's raw key data."""
  base = jax.random.fold_in(jax.random.wrap_key_data(rng_data), _DRAW_STREAM)
  return jax.random.fold_in(base, update_index)


def draw_times_and_noise(key, x0, schedule, draws: int, time_sampling: str):
  """t [B, D] and eps [B, D, S, C] for clean latents x0 [B, S, C]; schedule [B, N] (its rows
  equal: the rollout's sigmas without the final 0)."""
  if time_sampling not in TIME_SAMPLING:
    raise ValueError(f"fm_time={time_sampling!r}: expected one of {TIME_SAMPLING}.")
  b = x0.shape[0]
  k_t, k_eps = jax.random.split(key)
  if time_sampling == "schedule":
    idx = jax.random.randint(k_t, (b, draws), 0, schedule.shape[1])
    t = jnp.take_along_axis(jnp.asarray(schedule, jnp.float32), idx, axis=1)
  else:
    t = jax.random.uniform(k_t, (b, draws), jnp.float32, T_MIN, 1.0)
  eps = jax.random.normal(k_eps, (b, draws) + x0.shape[1:], jnp.float32)
  return t, eps


def noised(x0, t, eps):
  """x_t [B, D, S, C] and the target u = eps - x0 for x0 [B, S, C], t [B, D], eps [B, D, S, C]."""
  x0 = jnp.asarray(x0, jnp.float32)[:, None]
  tb = t[:, :, None, None]
  return (1.0 - tb) * x0 + tb * eps, eps - x0


def draw_velocities(model, params, micro, x_t, t, *, cfg_mode: str, cfg_scale, img_shapes):
  """The policy's velocity [b, D, S, C] at the draws x_t [b, D, S, C], t [b, D] of a micro-batch:
  the conditional one, or the CFG one with cfg_mode='both'. The D draws of a sample are folded
  into the batch (one forward of b * D samples)."""
  b, d = t.shape
  repeat = lambda a: None if a is None else jnp.repeat(a, d, axis=0)
  guided = policy_is_guided(cfg_mode)
  x = x_t.reshape((b * d,) + x_t.shape[2:])
  v = guided_velocity(
    model,
    params,
    x,
    t.reshape(-1),
    repeat(micro["cond"]),
    repeat(micro.get("mask")),
    repeat(micro.get("neg_cond")) if guided else None,
    repeat(micro.get("neg_mask")) if guided else None,
    cfg_scale=cfg_scale,
    img_shapes=img_shapes,
    ref_latents=repeat(micro.get("ref_latents")),
  )
  return v.reshape(x_t.shape)


def velocity_kl(v, v_ref):
  """Per-draw [b, D] mean squared velocity gap to the reference (both papers' KL surrogate: the
  KL of two Euler-step Gaussians up to a per-t factor)."""
  return jnp.mean((v - jax.lax.stop_gradient(v_ref)) ** 2, axis=(2, 3))


def accumulate_grads(loss_fn: Callable, params, batch, n: int, **kw):
  """Mean gradient and metrics of loss_fn(params, micro, **kw) -> (loss, metrics) over n strided
  micro-batches (one scan); equals the one-batch gradient for a loss that is a plain mean."""
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def body(acc, micro):
    (_, metrics), grads = grad_fn(params, micro, **kw)
    return jax.tree.map(lambda a, g: a + g.astype(jnp.float32), acc, grads), metrics

  zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
  total, per_micro = jax.lax.scan(body, zeros, split_micro_batches(batch, n))
  grads = jax.tree.map(lambda g, p: (g / n).astype(p.dtype), total, params)
  return grads, jax.tree.map(jnp.mean, per_micro)


def apply_update(state: TrainState, tx, grads, metrics):
  """One optimiser step, or the old state (loss reported NaN) if loss or gradient is not finite."""
  grad_norm = optax.tree.norm(grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  new = state.replace(
    step=state.step + 1, params=optax.apply_updates(state.params, updates), opt_state=opt_state
  )
  finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
  metrics = dict(metrics, loss=jnp.where(finite, metrics["loss"], jnp.nan), grad_norm=grad_norm)
  return keep_if_finite(state, new, metrics["loss"]), metrics


def make_forward_grads(
  loss_fn: Callable,
  *,
  micro_batch_size: int | None,
  draws: int,
  time_sampling: str,
  prepare: Callable | None = None,
):
  """grads(params, batch, key, old_params=None, ref_params=None) -> (grads, metrics).

  loss_fn(params, micro, *, old_params, ref_params) -> (loss, metrics) sees a micro-batch with
  the draws from `key` added (t [b, D], eps [b, D, S, C]); old_params None means theta_old =
  theta. `prepare(batch) -> batch`, if given, runs on the whole batch first (for per-sample
  weights that need whole prompt groups, which the strided micro-batches split). Run under
  `nn.logical_axis_rules` / `parallel.sharding_context`.
  """
  if draws < 1:
    raise ValueError(f"fm_draws={draws} must be >= 1.")
  if time_sampling not in TIME_SAMPLING:
    raise ValueError(f"fm_time={time_sampling!r}: expected one of {TIME_SAMPLING}.")

  def grads(params, batch, key, old_params=None, ref_params=None):
    if prepare is not None:
      batch = prepare(batch)
    t, eps = draw_times_and_noise(key, batch["x0"], batch["schedule"], draws, time_sampling)
    batch = dict(batch, t=t, eps=eps)
    n = num_micro_batches(batch["advantages"].shape[0], micro_batch_size)
    return accumulate_grads(loss_fn, params, batch, n, old_params=old_params, ref_params=ref_params)

  return grads


def make_forward_step(
  loss_fn: Callable,
  tx,
  rules,
  *,
  micro_batch_size: int | None,
  draws: int,
  time_sampling: str,
  inner_updates: int = 1,
  prepare: Callable | None = None,
):
  """step(state, batch, ref_params=None) -> (state, metrics), to be jitted by the caller: the
  draws keyed by the iteration (module docstring), theta_old from the optimiser state
  (`old_policy.with_old_policy`, else None). Call the jitted step under
  `parallel.sharding_context(mesh, rules)`.
  """
  grads_fn = make_forward_grads(
    loss_fn,
    micro_batch_size=micro_batch_size,
    draws=draws,
    time_sampling=time_sampling,
    prepare=prepare,
  )

  def step(state: TrainState, batch, ref_params=None):
    key = draw_key(state.rng, state.step // inner_updates)
    with nn.logical_axis_rules(rules):
      grads, metrics = grads_fn(
        state.params, batch, key, old_policy.old_params(state.opt_state), ref_params
      )
    return apply_update(state, tx, grads, metrics)

  return step


def forward_objective(
  name: str,
  make_loss: Callable,
  wrap_optimizer: Callable,
  make_prepare: Callable | None = None,
) -> Objective:
  """The registry entry of a forward-process objective whose loss is
  make_loss(model, rl, img_shapes) -> loss_fn (see `make_forward_grads`); make_prepare(rl) ->
  prepare(batch) -> batch, if given, runs on the whole batch before the micro-batch split."""

  def settings(rl):
    return dict(
      micro_batch_size=rl.micro_batch_size,
      draws=int(rl.get("fm_draws", 4)),
      time_sampling=rl.get("fm_time", "schedule"),
      prepare=None if make_prepare is None else make_prepare(rl),
    )

  def make_step(model, tx, rules, rl, img_shapes):
    return make_forward_step(
      make_loss(model, rl, img_shapes),
      tx,
      rules,
      inner_updates=int(rl.inner_updates),
      **settings(rl),
    )

  def make_grads(model, rules, rl, img_shapes):
    grads_fn = make_forward_grads(make_loss(model, rl, img_shapes), **settings(rl))

    def grads(params, batch, key):
      with nn.logical_axis_rules(rules):
        return grads_fn(params, batch, key)

    return grads

  return Objective(
    name=name,
    records="final_latents",
    make_step=make_step,
    make_batch=make_batch,
    wrap_optimizer=wrap_optimizer,
    make_grads=make_grads,
  )


def make_batch(policy, params, result, inputs, advantages):
  """The batch of a forward-process objective: clean latents x0 [B, S, C], the rollout
  schedule [B, N] (rows equal, see `draw_times_and_noise`), conditioning and advantages [B]."""
  del params  # no forward pass before the update
  if not policy_is_guided(policy.rl.cfg_mode):
    inputs = dict(inputs, neg_cond=None, neg_mask=None)
  sigmas = np.asarray(policy.roller.sigmas[:-1], np.float32)
  schedule = np.ascontiguousarray(np.broadcast_to(sigmas, (advantages.shape[0], sigmas.size)))
  schedule = policy.roller.put(schedule)
  return dict(x0=result.final_latents, schedule=schedule, advantages=advantages, **inputs)
