"""GRPO for flow matching: rollouts, old log-probs, the clipped objective and the train step.

A tiny random QwenImageTransformer (2 layers, 2 heads x 16, 4x4 patches) stands in for the 20B
model. Checks are numerical: log-probs against an independent step-by-step recomputation with
sampling/sde.py, gradients against direct autodiff of the unclipped objective, accumulation
against one big batch, and 8 simulated devices against one.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qwen_image_rl import parallel
from qwen_image_rl.models.mmdit import QwenImageTransformer
from qwen_image_rl.rl import rollout as rl_rollout
from qwen_image_rl.rl.objectives import grpo
from qwen_image_rl.sampling import guidance
from qwen_image_rl.sampling.guidance import true_cfg
from qwen_image_rl.sampling.schedule import FlowMatchSchedule, euler_step
from qwen_image_rl.sampling.sde import gaussian_log_prob, sde_step_mean_std
from qwen_image_rl.train_state import TrainState

B, T, T_NEG, N_STEPS = 8, 5, 3, 6
TRAIN_IDX = np.array([0, 2, 3], np.int32)  # the t = 1 step, a gap, then a consecutive step
IMG = ((1, 4, 4),)
EDIT_IMG = ((1, 4, 4), (1, 4, 4))
S, C = 16, 16
CFG_SCALE, NOISE = 4.0, 0.7
MICRO = 2
RULES = parallel.DEFAULT_LOGICAL_AXIS_RULES
CFG_MODES = ("none", "rollout_only", "both")


@pytest.fixture(scope="module")
def model():
  return QwenImageTransformer(
    patch_size=2,
    in_channels=C,
    out_channels=4,
    num_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=16,
    axes_dims_rope=(4, 6, 6),
  )


@pytest.fixture(scope="module")
def params(model):
  inputs = model.dummy_inputs(img_shapes=IMG)
  boxed = model.init(jax.random.key(0), **inputs)["params"]
  # A random init has zeroed output layers in places; perturb so every weight matters.
  unboxed = nn.meta.unbox(boxed)
  leaves, treedef = jax.tree.flatten(unboxed)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  leaves = [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
  return jax.tree.unflatten(treedef, leaves)


@pytest.fixture(scope="module")
def inputs():
  k = jax.random.split(jax.random.key(2), 6)
  mask = np.ones((B, T), np.int32)
  mask[::3, -2:] = 0  # some padded prompts
  return dict(
    x_T=jax.random.normal(k[0], (B, S, C)),
    cond=jax.random.normal(k[1], (B, T, 16)),
    mask=jnp.asarray(mask),
    neg_cond=jax.random.normal(k[2], (B, T_NEG, 16)),
    neg_mask=jnp.ones((B, T_NEG), jnp.int32),
    ref_latents=jax.random.normal(k[3], (B, S, C)),
    advantages=jax.random.normal(k[4], (B,)),
    sigmas=jnp.asarray(FlowMatchSchedule(shift=3.0).sigmas(N_STEPS)),
    key=jax.random.key(3),
  )


def do_rollout(
  model,
  params,
  inputs,
  cfg_mode,
  *,
  train_idx=TRAIN_IDX,
  key=None,
  noise_level=NOISE,
  img_shapes=IMG,
  ref_latents=None,
  rules=RULES,
):
  return rl_rollout.rollout(
    model,
    params,
    inputs["x_T"],
    inputs["cond"],
    inputs["mask"],
    inputs["neg_cond"],
    inputs["neg_mask"],
    inputs["sigmas"],
    train_idx,
    inputs["key"] if key is None else key,
    cfg_scale=CFG_SCALE,
    cfg_mode=cfg_mode,
    noise_level=noise_level,
    img_shapes=img_shapes,
    ref_latents=ref_latents,
    rules=rules,
  )


def old_log_probs(
  model, params, inputs, result, cfg_mode, *, img_shapes=IMG, ref_latents=None, rules=RULES
):
  return rl_rollout.recompute_old_log_probs(
    model,
    params,
    result,
    inputs["cond"],
    inputs["mask"],
    inputs["neg_cond"],
    inputs["neg_mask"],
    cfg_mode=cfg_mode,
    cfg_scale=CFG_SCALE,
    noise_level=NOISE,
    img_shapes=img_shapes,
    ref_latents=ref_latents,
    micro_batch_size=MICRO,
    rules=rules,
  )


def train_batch(inputs, result, old, cfg_mode, ref_latents=None):
  guided = cfg_mode == "both"
  return rl_rollout.rollout_batch(
    result,
    inputs["cond"],
    inputs["mask"],
    inputs["neg_cond"] if guided else None,
    inputs["neg_mask"] if guided else None,
    ref_latents,
    old_log_probs=old,
    advantages=inputs["advantages"],
  )


@functools.cache
def _jitted_grads(model, micro_batch_size, guided, img_shapes):
  # 'none' and 'rollout_only' train the same conditional policy: one compile serves both.
  cfg_mode = "both" if guided else "rollout_only"

  def fn(p, batch, clip_eps, kl_beta, ref):
    return grpo.grpo_grads(
      p,
      model,
      batch,
      micro_batch_size=micro_batch_size,
      ref_params=ref,
      cfg_mode=cfg_mode,
      clip_eps=clip_eps,
      kl_beta=kl_beta,
      noise_level=NOISE,
      cfg_scale=CFG_SCALE,
      img_shapes=img_shapes,
    )

  return jax.jit(fn)


def jitted_grads(model, micro_batch_size, cfg_mode, clip_eps=1e-4, kl_beta=0.0, img_shapes=IMG):
  """fn(params, batch, ref=None) -> (grads, metrics) of the GRPO loss.

  clip_eps and kl_beta are traced and the KL branch is always compiled (ref defaults to the
  params themselves), so tests share a handful of compiles; kl_beta = 0 multiplies the KL
  gradient by an exact zero.
  """
  fn = _jitted_grads(model, micro_batch_size, cfg_mode == "both", img_shapes)
  return lambda p, batch, ref=None: fn(
    p, batch, jnp.float32(clip_eps), jnp.float32(kl_beta), p if ref is None else ref
  )


@pytest.fixture(scope="module")
def rollouts(model, params, inputs):
  """One rollout per CFG mode (shared: each costs a compile)."""
  return {mode: do_rollout(model, params, inputs, mode) for mode in CFG_MODES}


def velocity_fn(model, img_shapes=IMG):
  return jax.jit(
    lambda p, x, t, c, m, ref=None: guidance.velocity(model, p, x, t, c, m, img_shapes, ref)
  )


def max_abs(a, b):
  return float(jnp.max(jnp.abs(jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32))))


def tree_max_abs(a, b):
  return max(max_abs(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def perturbed(params, scale, seed=7):
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(
    treedef, [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
  )


# ------------------------------------------------------------------------------------------
# Rollout
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg_mode", ["rollout_only", "none"])
def test_rollout_matches_independent_step_by_step_recomputation(
  model, params, inputs, rollouts, cfg_mode
):
  """Replays the whole trajectory with model.apply + sde.py from the stored latents."""
  result = rollouts[cfg_mode]
  vel = velocity_fn(model)
  sig = np.asarray(inputs["sigmas"])

  def v_rollout(x, t):
    v = vel(params, x, t, inputs["cond"], inputs["mask"])
    if cfg_mode == "none":
      return v
    return true_cfg(v, vel(params, x, t, inputs["neg_cond"], inputs["neg_mask"]), CFG_SCALE)

  x = inputs["x_T"]
  errs = dict(latents=0.0, log_prob=0.0)
  for i in range(N_STEPS):
    if i in TRAIN_IDX:
      k = list(TRAIN_IDX).index(i)
      errs["latents"] = max(errs["latents"], max_abs(result.latents_t[:, k], x))
      x_t = result.latents_t[:, k]  # continue from the stored state, as the policy sees it
      mean, std = sde_step_mean_std(x_t, v_rollout(x_t, sig[i]), sig[i], sig[i + 1], NOISE)
      logp = gaussian_log_prob(result.latents_next[:, k], mean, std)
      errs["log_prob"] = max(errs["log_prob"], max_abs(result.log_probs[:, k], logp))
      # The stored sample is a draw from N(mean, std^2): its standardised noise is ~N(0, 1).
      z = (result.latents_next[:, k] - mean) / std
      assert abs(float(jnp.std(z)) - 1.0) < 0.1
      assert float(result.sigmas[0, k]) == sig[i] and float(result.sigmas_next[0, k]) == sig[i + 1]
      x = result.latents_next[:, k]
    else:
      x = euler_step(x, v_rollout(x, sig[i]), sig[i], sig[i + 1])
  errs["final"] = max_abs(result.final_latents, x)
  print(f"[{cfg_mode}] rollout vs independent recomputation, max abs errors: {errs}")
  assert result.log_probs.dtype == jnp.float32 and result.log_probs.shape == (B, len(TRAIN_IDX))
  assert result.latents_t.shape == (B, len(TRAIN_IDX), S, C)
  assert errs["latents"] < 1e-5 and errs["final"] < 1e-5
  assert errs["log_prob"] < 1e-4


def test_ode_steps_are_deterministic(model, params, inputs, rollouts):
  again = do_rollout(model, params, inputs, "rollout_only")
  assert np.array_equal(
    np.asarray(again.final_latents), np.asarray(rollouts["rollout_only"].final_latents)
  )
  # A different key changes only the SDE steps: the states before step 0 agree exactly.
  other = do_rollout(model, params, inputs, "rollout_only", key=jax.random.key(99))
  assert np.array_equal(
    np.asarray(other.latents_t[:, 0]), np.asarray(rollouts["rollout_only"].latents_t[:, 0])
  )
  assert max_abs(other.final_latents, again.final_latents) > 1e-2


def test_all_steps_without_noise_is_the_euler_ode(model, params, inputs):
  result = do_rollout(
    model,
    params,
    inputs,
    "rollout_only",
    train_idx=np.arange(N_STEPS, dtype=np.int32),
    noise_level=0.0,
  )
  vel = velocity_fn(model)
  sig = np.asarray(inputs["sigmas"])
  x = inputs["x_T"]
  for i in range(N_STEPS):
    v = true_cfg(
      vel(params, x, sig[i], inputs["cond"], inputs["mask"]),
      vel(params, x, sig[i], inputs["neg_cond"], inputs["neg_mask"]),
      CFG_SCALE,
    )
    x = euler_step(x, v, sig[i], sig[i + 1])
  err = max_abs(result.final_latents, x)
  print(f"K = N, noise 0: rollout vs Euler ODE max abs error {err:.2e}")
  assert err < 1e-5


def test_rollout_rejects_bad_inputs(model, params, inputs):
  with pytest.raises(ValueError, match="sorted"):
    do_rollout(model, params, inputs, "none", train_idx=np.array([2, 1], np.int32))
  with pytest.raises(ValueError, match="lie in"):
    do_rollout(model, params, inputs, "none", train_idx=np.array([N_STEPS], np.int32))
  with pytest.raises(ValueError, match="negative prompt"):
    rl_rollout.rollout(
      model,
      params,
      inputs["x_T"],
      inputs["cond"],
      None,
      None,
      None,
      inputs["sigmas"],
      TRAIN_IDX,
      inputs["key"],
      cfg_scale=4.0,
      cfg_mode="both",
      noise_level=NOISE,
      img_shapes=IMG,
    )
  with pytest.raises(ValueError, match="cfg_mode"):
    do_rollout(model, params, inputs, "always")


# ------------------------------------------------------------------------------------------
# Old log-probs and the ratio
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg_mode", CFG_MODES)
def test_ratio_is_one_before_the_first_update(model, params, inputs, rollouts, cfg_mode):
  result = rollouts[cfg_mode]
  old = old_log_probs(model, params, inputs, result, cfg_mode)
  batch = train_batch(inputs, result, old, cfg_mode)
  _, metrics = jitted_grads(model, MICRO, cfg_mode)(params, batch)
  dev = max(abs(float(metrics["ratio_min"]) - 1.0), abs(float(metrics["ratio_max"]) - 1.0))
  behaviour_gap = max_abs(old, result.log_probs)
  print(
    f"[{cfg_mode}] max |ratio - 1| = {dev:.2e}; |old - rollout log-prob| = "
    f"{behaviour_gap:.2e}; clipfrac {float(metrics['clipfrac'])}"
  )
  assert dev <= 1e-6
  assert float(metrics["clipfrac"]) == 0.0
  if cfg_mode == "rollout_only":
    # The pitfall: the rollout's CFG log-probs are not the conditional policy's.
    assert behaviour_gap > 1e-4
  else:
    assert behaviour_gap < 2e-5


def test_gradient_at_ratio_one_is_the_policy_gradient(model, params, inputs, rollouts):
  mode = "rollout_only"
  result = rollouts[mode]
  old = old_log_probs(model, params, inputs, result, mode)
  batch = train_batch(inputs, result, old, mode)
  grads, _ = jitted_grads(model, None, mode)(params, batch)

  def unclipped(p):
    logp, _, _ = rl_rollout.transition_log_probs(
      model, p, batch, cfg_mode=mode, cfg_scale=CFG_SCALE, noise_level=NOISE, img_shapes=IMG
    )
    return -jnp.mean(inputs["advantages"][:, None] * logp)

  expected = jax.jit(jax.grad(unclipped))(params)
  scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(expected))
  err = tree_max_abs(grads, expected)
  print(f"grad at ratio 1 vs -A grad(logp): max abs error {err:.2e} (grad scale {scale:.2e})")
  assert scale > 1e-3
  assert err <= 1e-5 * scale


@pytest.mark.parametrize("cfg_mode", ["rollout_only", "both"])
def test_on_policy_batch_needs_no_old_log_probs(model, params, inputs, rollouts, cfg_mode):
  # old_log_probs=None (the trainer's single update) is the recomputed-old gradient, ratio 1.
  result = rollouts[cfg_mode]
  old = old_log_probs(model, params, inputs, result, cfg_mode)
  fn = jitted_grads(model, MICRO, cfg_mode)
  grads, metrics = fn(params, train_batch(inputs, result, old, cfg_mode))
  grads_none, metrics_none = fn(params, train_batch(inputs, result, None, cfg_mode))
  scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads))
  err = tree_max_abs(grads_none, grads)
  print(f"[{cfg_mode}] on-policy vs recomputed old: grad err {err:.2e} (scale {scale:.2e})")
  assert scale > 1e-3 and err <= 1e-5 * scale
  assert float(metrics_none["ratio_min"]) == float(metrics_none["ratio_max"]) == 1.0
  assert float(metrics_none["clipfrac"]) == 0.0
  assert abs(float(metrics_none["log_prob_mean"]) - float(jnp.mean(old))) < 1e-5


def test_clipping_zeroes_the_gradient_of_clipped_samples(model, params, inputs, rollouts):
  mode, eps = "rollout_only", 1e-3
  result = rollouts[mode]
  old = old_log_probs(model, params, inputs, result, mode)
  adv = inputs["advantages"]
  # Old log-probs that put samples 0..3 outside the clip range on the side that clips
  # (ratio = 1 + 2 eps for A > 0, 1 - 2 eps for A < 0); samples 4..7 stay at ratio 1.
  clipped = (jnp.arange(B) < 4)[:, None]
  shift = jnp.where(adv[:, None] > 0, jnp.log1p(2 * eps), jnp.log1p(-2 * eps))
  old_moved = jnp.where(clipped, old - shift, old)
  grads_fn = jitted_grads(model, None, mode, clip_eps=eps)
  grads, metrics = grads_fn(params, train_batch(inputs, result, old_moved, mode))
  assert abs(float(metrics["clipfrac"]) - 0.5) < 1e-6
  # Only the unclipped half contributes: same as the loss on samples 4..7 alone, halved.
  half = jax.tree.map(lambda a: a[4:], train_batch(inputs, result, old, mode))
  grads_half, _ = jitted_grads(model, None, mode, clip_eps=eps)(params, half)
  err_half = tree_max_abs(grads, jax.tree.map(lambda g: 0.5 * g, grads_half))
  # All samples clipped: the gradient is exactly zero.
  all_moved = old - shift
  grads_zero, m_zero = grads_fn(params, train_batch(inputs, result, all_moved, mode))
  zero = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads_zero))
  print(f"clipping: half clipped grad err {err_half:.2e}; all clipped max |grad| {zero}")
  assert float(m_zero["clipfrac"]) == 1.0 and zero == 0.0
  assert err_half < 1e-6

  # When the params move, ratios leave the trust region and clipping kicks in; the gradient is
  # that of the unclipped objective with the clipped (sample, step) pairs masked out.
  moved = perturbed(params, 2e-3)
  batch = train_batch(inputs, result, old, mode)
  new_logp = old_log_probs(model, moved, inputs, result, mode)
  dev = np.sort(np.abs(np.asarray(jnp.exp(new_logp - old)) - 1.0).ravel())
  gaps = np.diff(dev[dev.size // 4 : 3 * dev.size // 4 + 1])
  j = dev.size // 4 + int(np.argmax(gaps))
  eps = float(0.5 * (dev[j] + dev[j + 1]))  # a threshold far from every ratio
  grads, metrics = jitted_grads(model, None, mode, clip_eps=eps)(moved, batch)
  ratio = jnp.exp(new_logp - old)
  a = adv[:, None]
  active = ~(((a > 0) & (ratio > 1 + eps)) | ((a < 0) & (ratio < 1 - eps)))

  def masked(p):
    logp, _, _ = rl_rollout.transition_log_probs(
      model, p, batch, cfg_mode=mode, cfg_scale=CFG_SCALE, noise_level=NOISE, img_shapes=IMG
    )
    r = jnp.exp(logp - old)
    return -jnp.mean(a * r * active)

  expected = jax.jit(jax.grad(masked))(moved)
  scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(expected))
  err = tree_max_abs(grads, expected)
  clipfrac = float(metrics["clipfrac"])
  print(
    f"moved params: eps {eps:.2e}, clipfrac {clipfrac:.3f}, grad err {err:.2e} "
    f"(scale {scale:.2e}), ratio range [{float(metrics['ratio_min']):.5f}, "
    f"{float(metrics['ratio_max']):.5f}]"
  )
  assert 0.0 < clipfrac < 1.0
  assert abs(clipfrac - float(np.mean(dev > eps))) < 1e-6
  assert err <= 1e-5 * scale


def test_micro_batch_accumulation_equals_one_big_batch(model, params, inputs, rollouts):
  mode = "rollout_only"
  result = rollouts[mode]
  old = old_log_probs(model, params, inputs, result, mode)
  batch = train_batch(inputs, result, old, mode)
  moved = perturbed(params, 1e-3)
  big_g, big_m = jitted_grads(model, None, mode, kl_beta=0.1)(moved, batch, params)
  small_g, small_m = jitted_grads(model, MICRO, mode, kl_beta=0.1)(moved, batch, params)
  err = tree_max_abs(big_g, small_g)
  print(
    f"accumulation over {B // MICRO} micro-batches vs one batch: grad max abs err {err:.2e}; "
    f"kl {float(big_m['kl']):.3e} vs {float(small_m['kl']):.3e}; loss "
    f"{float(big_m['loss']):.6f} vs {float(small_m['loss']):.6f}"
  )
  kw = dict(cfg_mode=mode, cfg_scale=CFG_SCALE, noise_level=NOISE, img_shapes=IMG)
  _, mean_new, std = rl_rollout.transition_log_probs(model, moved, batch, **kw)
  _, mean_ref, _ = rl_rollout.transition_log_probs(model, params, batch, **kw)
  kl = float(jnp.mean((mean_new - mean_ref) ** 2 / (2 * std**2)))
  print(f"KL metric {float(big_m['kl']):.6e} vs independent {kl:.6e}")
  assert err < 1e-6
  assert kl > 0.0 and abs(float(big_m["kl"]) - kl) <= 1e-4 * kl
  for name in ("loss", "kl", "clipfrac", "approx_kl", "ratio_min", "ratio_max"):
    assert abs(float(big_m[name]) - float(small_m[name])) < 1e-6, name


# ------------------------------------------------------------------------------------------
# Sharding, the train step, editing
# ------------------------------------------------------------------------------------------


# The batch goes over ('fsdp', 'data'), not the default ('data', 'fsdp'): with the default
# order, a batch-sharded input and sharded params, QwenImageTransformer's text stream comes out
# wrong for samples 2..5 on this mesh (swapped between the data groups; the model's own sharding
# test replicates its inputs). Reported to the model owner; the GRPO code is order-agnostic.
SHARDED_RULES = (("act_batch", ("fsdp", "data")),) + tuple(r for r in RULES if r[0] != "act_batch")


def test_eight_devices_match_one(model, params, inputs):
  mode = "rollout_only"
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3))
  state = TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    opt_state=tx.init(params),
    rng=jax.random.key_data(jax.random.key(0)),
  )

  def run(params, state, inputs, rules):
    step = grpo.make_grpo_train_step(
      model,
      tx,
      rules,
      micro_batch_size=MICRO,
      cfg_mode=mode,
      clip_eps=1e-4,
      noise_level=NOISE,
      img_shapes=IMG,
      cfg_scale=CFG_SCALE,
      kl_beta=0.01,
    )
    result = do_rollout(model, params, inputs, mode, rules=rules)
    old = old_log_probs(model, params, inputs, result, mode, rules=rules)
    batch = train_batch(inputs, result, old, mode)
    new_state, metrics = jax.jit(step)(state, batch, params)
    return jax.device_get((result, new_state, metrics))

  one = run(params, state, inputs, RULES)

  mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  param_sh = parallel.tree_shardings(model.abstract_params(), mesh, SHARDED_RULES)
  sharded_params = parallel.shard_tree(params, param_sh)
  sharded_state = state.replace(
    params=sharded_params, opt_state=jax.device_put(state.opt_state, parallel.replicated(mesh))
  )
  sharded_inputs = {
    k: (
      jax.device_put(v, parallel.batch_sharding(mesh, v.ndim, SHARDED_RULES))
      if k not in ("sigmas", "key")
      else v
    )
    for k, v in inputs.items()
  }
  n_sharded = sum(not x.sharding.is_fully_replicated for x in jax.tree.leaves(sharded_params))
  assert n_sharded > 0
  with parallel.sharding_context(mesh, SHARDED_RULES):
    eight = run(sharded_params, sharded_state, sharded_inputs, SHARDED_RULES)

  err_roll = max(
    tree_max_abs(one[0].final_latents, eight[0].final_latents),
    tree_max_abs(one[0].log_probs, eight[0].log_probs),
  )
  err_params = tree_max_abs(one[1].params, eight[1].params)
  err_metrics = max(abs(float(one[2][k]) - float(eight[2][k])) for k in one[2])
  moved = tree_max_abs(one[1].params, params)
  print(
    f"8 devices vs 1: rollout err {err_roll:.2e}, params after step err {err_params:.2e} "
    f"(update size {moved:.2e}), metrics err {err_metrics:.2e}; "
    f"{n_sharded} param arrays sharded; metrics {one[2]}"
  )
  assert int(eight[1].step) == 1 and moved > 1e-5
  assert err_roll < 1e-5 and err_params < 1e-5 and err_metrics < 1e-5


def test_edit_rollout_with_reference_latents(model, params, inputs):
  mode = "rollout_only"
  ref = inputs["ref_latents"]
  result = do_rollout(model, params, inputs, mode, img_shapes=EDIT_IMG, ref_latents=ref)
  assert result.final_latents.shape == (B, S, C)
  plain = do_rollout(model, params, inputs, mode)
  assert max_abs(result.final_latents, plain.final_latents) > 1e-3  # the reference matters
  # Independent check of the first trained step's behaviour log-prob (reference tokens after
  # the target, both shapes in img_shapes).
  vel = velocity_fn(model, EDIT_IMG)
  sig = np.asarray(inputs["sigmas"])
  i, x_t = int(TRAIN_IDX[1]), result.latents_t[:, 1]
  v = true_cfg(
    vel(params, x_t, sig[i], inputs["cond"], inputs["mask"], ref),
    vel(params, x_t, sig[i], inputs["neg_cond"], inputs["neg_mask"], ref),
    CFG_SCALE,
  )
  mean, std = sde_step_mean_std(x_t, v, sig[i], sig[i + 1], NOISE)
  err_logp = max_abs(
    gaussian_log_prob(result.latents_next[:, 1], mean, std), result.log_probs[:, 1]
  )
  old = old_log_probs(model, params, inputs, result, mode, img_shapes=EDIT_IMG, ref_latents=ref)
  batch = train_batch(inputs, result, old, mode, ref_latents=ref)
  # Forward-only loss (the gradient path is covered above; this saves a backward compile).
  loss_fn = jax.jit(
    lambda p, batch: grpo.grpo_loss(
      p,
      model,
      batch,
      cfg_mode=mode,
      clip_eps=1e-4,
      noise_level=NOISE,
      cfg_scale=CFG_SCALE,
      img_shapes=EDIT_IMG,
    )
  )
  loss, metrics = loss_fn(params, batch)
  dev = max(abs(float(metrics["ratio_min"]) - 1.0), abs(float(metrics["ratio_max"]) - 1.0))
  print(f"edit: behaviour log-prob err {err_logp:.2e}; max |ratio - 1| {dev:.2e}")
  assert err_logp < 1e-4 and dev <= 1e-6 and np.isfinite(float(loss))
