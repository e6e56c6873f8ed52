"""Forward-process RL objectives (DiffusionNFT `nft`, AWM `awm`, reward-ranked flow matching
`raft`) and their old policy.

The gradient at theta = theta_old is checked against its closed form, computed in float64 numpy
on a linear velocity model v = x_t W; the train steps run on a tiny random QwenImageTransformer:
micro-batches against one batch, 8 simulated devices against one, the non-finite guard, and the
old policy's EMA / snapshot updates.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qwen_image_rl import parallel
from qwen_image_rl.models.mmdit import QwenImageTransformer
from qwen_image_rl.rl.objectives import awm, forward, nft, old_policy, raft
from qwen_image_rl.sampling.schedule import FlowMatchSchedule
from qwen_image_rl.train_state import TrainState

B, D, S, C, T = 8, 3, 16, 16, 5
IMG = ((1, 4, 4),)
RULES = parallel.DEFAULT_LOGICAL_AXIS_RULES
# As tests/test_grpo.py: the batch over ('fsdp', 'data') on the 2x2x2 mesh.
SHARDED_RULES = (("act_batch", ("fsdp", "data")),) + tuple(r for r in RULES if r[0] != "act_batch")


# ------------------------------------------------------------------------------------------
# Closed forms at theta = theta_old on a linear velocity model (float64 numpy reference)
# ------------------------------------------------------------------------------------------


def linear_problem(seed=0, channels=6):
  rng = np.random.default_rng(seed)
  x0 = rng.normal(size=(B, S, channels))
  eps = rng.normal(size=(B, D, S, channels))
  t = rng.uniform(0.05, 1.0, size=(B, D))
  adv = rng.normal(size=(B,)) * 3.0  # some beyond A_max = 2 below: r saturates there
  w = rng.normal(size=(channels, channels)) * 0.3
  x_t = (1 - t[..., None, None]) * x0[:, None] + t[..., None, None] * eps
  return x0, eps, t, adv, w, x_t


def test_nft_gradient_at_old_policy_is_advantage_weighted_flow_matching():
  adv_max, beta = 2.0, 0.7
  x0, eps, t, adv, w, x_t = linear_problem()

  def loss(w_):
    xt, _ = forward.noised(jnp.float32(x0), jnp.float32(t), jnp.float32(eps))
    v = xt @ w_
    r = nft.optimality(adv, adv_max)
    return adv_max * jnp.mean(nft.nft_draw_losses(v, jax.lax.stop_gradient(v), xt, x0, t, r, beta))

  got = np.asarray(jax.grad(loss)(jnp.float32(w)), np.float64)
  # dL/dW = mean_{b,d} 2 t^2 clip(A) / w_bd * mean_elements((v - u) dv/dW), dv/dW = x_t.
  v = x_t @ w
  u = eps - x0[:, None]
  weight = np.mean(np.abs(t[..., None, None] * (u - v)), axis=(2, 3))
  coef = 2 * t**2 * np.clip(adv, -adv_max, adv_max)[:, None] / weight / (S * w.shape[0])
  want = np.einsum("bd,bdsi,bdsj->ij", coef, x_t, v - u) / (B * D)
  err = np.max(np.abs(got - want)) / np.max(np.abs(want))
  print(f"nft grad vs float64 closed form: rel err {err:.2e}")
  assert err < 1e-5
  # beta drops out at theta = theta_old; the sign follows A.
  assert np.max(np.abs(got - np.asarray(jax.grad(loss)(jnp.float32(w)), np.float64))) == 0


@pytest.mark.parametrize("weighting", ["uniform", "t"])
def test_awm_gradient_at_old_policy_is_minus_advantage_times_fm_gradient(weighting):
  x0, eps, t, adv, w, x_t = linear_problem(1)

  def loss(w_):
    xt, u = forward.noised(jnp.float32(x0), jnp.float32(t), jnp.float32(eps))
    log_lik = awm.fm_log_likelihood(xt @ w_, u, jnp.float32(t), weighting)
    return awm.awm_surrogate(log_lik, log_lik, adv, clip=5.0)[0]

  got = np.asarray(jax.grad(loss)(jnp.float32(w)), np.float64)
  v, u = x_t @ w, eps - x0[:, None]
  tw = t if weighting == "t" else np.ones_like(t)
  # L_FM,i = mean_d w(t) mean((v - u)^2); dL/dW = mean_i A_i dL_FM,i/dW.
  coef = adv[:, None] * tw * 2 / (S * w.shape[0]) / D
  want = np.einsum("bd,bdsi,bdsj->ij", coef, x_t, v - u) / B
  err = np.max(np.abs(got - want)) / np.max(np.abs(want))
  print(f"awm ({weighting}) grad vs float64 closed form: rel err {err:.2e}")
  assert err < 1e-5


def test_raft_keeps_the_top_of_each_group_above_the_floor():
  adv = jnp.array([0.5, -1.0, 2.0, 0.1, 0.0, 0.0, 0.0, 0.0, -0.3, 0.2, 0.2, -0.1])
  w = np.asarray(raft.top_of_group_weights(adv, 4, top_k=2, min_advantage=0.0))
  keep = np.array([1, 0, 1, 0, 0, 0, 0, 0, 0, 1, 1, 0], bool)  # the flat group keeps nothing
  np.testing.assert_allclose(w, np.where(keep, 12 / 4, 0.0))  # mean weight 1: a mean over kept
  w1 = np.asarray(raft.top_of_group_weights(adv, 4, top_k=1, min_advantage=0.3))
  np.testing.assert_allclose(w1, np.where(np.arange(12) == 2, 12.0, 0.0))  # 0.2 <= the floor
  assert not np.any(raft.top_of_group_weights(jnp.zeros(8), 4, 1, 0.0))
  assert np.all(np.isnan(raft.top_of_group_weights(adv.at[5].set(jnp.inf), 4, 1, 0.0)))


def test_raft_gradient_is_flow_matching_on_the_kept_samples():
  x0, eps, t, adv, w, x_t = linear_problem(2)
  weights = raft.top_of_group_weights(jnp.float32(adv), 4, top_k=1, min_advantage=0.0)

  def loss(w_):
    xt, u = forward.noised(jnp.float32(x0), jnp.float32(t), jnp.float32(eps))
    return jnp.mean(weights[:, None] * jnp.mean((xt @ w_ - u) ** 2, axis=(2, 3)))

  got = np.asarray(jax.grad(loss)(jnp.float32(w)), np.float64)
  kept = [4 * g + int(np.argmax(adv[4 * g : 4 * g + 4])) for g in range(B // 4)]
  kept = [i for i in kept if adv[i] > 0]
  v, u = x_t @ w, eps - x0[:, None]
  # Plain flow matching, mean over the kept samples and draws: d mean((v - u)^2) / dW.
  want = sum(
    np.einsum("dsi,dsj->ij", x_t[i], v[i] - u[i]) * 2 / (D * S * w.shape[0]) for i in kept
  ) / len(kept)
  err = np.max(np.abs(got - want)) / np.max(np.abs(want))
  print(f"raft grad vs float64 flow matching on {len(kept)} kept samples: rel err {err:.2e}")
  assert kept and err < 1e-5


def test_nft_bounds_and_implicit_trust_region():
  """r saturates at |A| >= A_max; away from theta_old the negative branch pushes back."""
  r = np.asarray(nft.optimality(jnp.array([-9.0, -1.0, 0.0, 1.0, 9.0]), 2.0))
  np.testing.assert_allclose(r, [0.0, 0.25, 0.5, 0.75, 1.0])


# ------------------------------------------------------------------------------------------
# The old policy in the optimiser state
# ------------------------------------------------------------------------------------------


def test_old_policy_ema_and_snapshot():
  params = {"w": jnp.ones((3,))}
  grads = {"w": jnp.ones((3,))}
  sgd = optax.sgd(0.5)
  ema = old_policy.with_old_policy(sgd, mode="ema", decay=0.3, ramp=0.2)
  state = ema.init(params)
  p = params
  expect_old = np.ones(3)
  for n in range(1, 4):
    updates, state = ema.update(grads, state, p)
    p = optax.apply_updates(p, updates)
    d = min(0.2 * n, 0.3)
    expect_old = d * expect_old + (1 - d) * np.asarray(p["w"])
    np.testing.assert_allclose(np.asarray(old_policy.old_params(state)["w"]), expect_old, rtol=1e-6)
  snap = old_policy.with_old_policy(sgd, mode="snapshot", refresh_every=2)
  state, p, seen = snap.init(params), params, []
  for _ in range(4):
    updates, state = snap.update(grads, state, p)
    p = optax.apply_updates(p, updates)
    seen.append(float(old_policy.old_params(state)["w"][0]))
  assert seen == [1.0, 0.0, 0.0, -1.0]  # refreshed to the new params after updates 2 and 4
  assert old_policy.old_params(sgd.init(params)) is None
  with pytest.raises(ValueError, match="mode"):
    old_policy.with_old_policy(sgd, mode="polyak")


# ------------------------------------------------------------------------------------------
# Train steps on a tiny transformer
# ------------------------------------------------------------------------------------------


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
  boxed = model.init(jax.random.key(0), **model.dummy_inputs(img_shapes=IMG))["params"]
  leaves, treedef = jax.tree.flatten(nn.meta.unbox(boxed))
  keys = jax.random.split(jax.random.key(1), len(leaves))
  return jax.tree.unflatten(
    treedef, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
  )


@pytest.fixture(scope="module")
def batch():
  k = jax.random.split(jax.random.key(2), 4)
  mask = np.ones((B, T), np.int32)
  mask[::3, -2:] = 0
  sigmas = np.asarray(FlowMatchSchedule(shift=3.0).sigmas(6), np.float32)[:-1]
  return dict(
    x0=jax.random.normal(k[0], (B, S, C)),
    cond=jax.random.normal(k[1], (B, T, 16)),
    mask=jnp.asarray(mask),
    neg_cond=None,
    neg_mask=None,
    ref_latents=None,
    advantages=jax.random.normal(k[2], (B,)) * 2.0,
    schedule=jnp.asarray(np.broadcast_to(sigmas, (B, sigmas.size))),
  )


class RL(dict):
  """A stand-in for config.rl (attribute access and .get)."""

  __getattr__ = dict.__getitem__


def rl_config(objective, **kw):
  return RL(
    dict(
      objective=objective,
      micro_batch_size=None,
      cfg_mode="rollout_only",
      cfg_scale=4.0,
      kl_beta=0.0,
      inner_updates=1,
      fm_draws=2,
      fm_time="schedule",
      nft=dict(ema_ramp=0.25),
      awm={},
      raft=dict(top_k=2),
      group_size=4,
    ),
    **kw,
  )


def make_state(tx, params):
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    opt_state=tx.init(params),
    rng=jax.random.key_data(jax.random.key(5)),
  )


def run_step(model, params, batch, objective, rules=RULES, **rl_kw):
  module = {"nft": nft, "awm": awm, "raft": raft}[objective]
  rl = rl_config(objective, **rl_kw)
  # SGD: the params moved are the gradient (Adam's first step is sign-like near g = 0).
  tx = module.wrap_optimizer(optax.sgd(0.1), rl)
  step = module.make_step(model, tx, rules, rl, IMG)
  state = make_state(tx, params)
  new, metrics = jax.jit(step)(state, batch)
  return jax.device_get((new, metrics))


def tree_max_abs(a, b):
  return max(
    float(np.max(np.abs(np.asarray(x, np.float32) - np.asarray(y, np.float32))))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
  )


@pytest.mark.parametrize("objective", ["nft", "awm", "raft"])
def test_micro_batches_equal_one_batch(model, params, batch, objective):
  one = run_step(model, params, batch, objective)
  micro = run_step(model, params, batch, objective, micro_batch_size=2)
  err = tree_max_abs(one[0].params, micro[0].params)
  moved = tree_max_abs(one[0].params, params)
  print(f"{objective}: micro-batched vs one batch params err {err:.2e} (update {moved:.2e})")
  assert moved > 1e-5 and err < 1e-6
  assert abs(float(one[1]["loss"]) - float(micro[1]["loss"])) < 1e-5
  if objective == "nft":
    # EMA with d = 0.25 after one update: theta_old = 0.25 theta_0 + 0.75 theta_1.
    old = old_policy.old_params(one[0].opt_state)
    want = jax.tree.map(lambda a, b: 0.25 * a + 0.75 * b, params, one[0].params)
    assert tree_max_abs(old, want) < 1e-6


@pytest.mark.parametrize("objective", ["nft", "awm", "raft"])
def test_eight_devices_match_one(model, params, batch, objective):
  one = run_step(model, params, batch, objective, kl_beta=0.0)
  mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  param_sh = parallel.tree_shardings(model.abstract_params(), mesh, SHARDED_RULES)
  sharded = parallel.shard_tree(params, param_sh)
  sharded_batch = {
    k: None
    if v is None
    else jax.device_put(v, parallel.batch_sharding(mesh, np.ndim(v), SHARDED_RULES))
    for k, v in batch.items()
  }
  with parallel.sharding_context(mesh, SHARDED_RULES):
    eight = run_step(model, sharded, sharded_batch, objective, rules=SHARDED_RULES)
  err = tree_max_abs(one[0], eight[0])
  print(f"{objective}: 8 devices vs 1, state err {err:.2e}")
  assert err < 1e-5
  assert abs(float(one[1]["loss"]) - float(eight[1]["loss"])) < 1e-5


@pytest.mark.parametrize("objective", ["nft", "awm", "raft"])
def test_nonfinite_advantages_leave_the_state_unchanged(model, params, batch, objective):
  bad = dict(batch, advantages=batch["advantages"].at[3].set(jnp.nan))
  new, metrics = run_step(model, params, bad, objective)
  assert np.isnan(float(metrics["loss"]))
  assert int(new.step) == 0 and tree_max_abs(new.params, params) == 0.0


def test_awm_inner_updates_share_draws_and_keep_the_start_params(model, params, batch):
  rl = rl_config("awm", inner_updates=2)
  tx = awm.wrap_optimizer(optax.adam(1e-3), rl)
  step = jax.jit(awm.make_step(model, tx, RULES, rl, IMG))
  state = make_state(tx, params)
  state, m1 = step(state, batch)
  assert abs(float(m1["ratio_mean"]) - 1.0) < 1e-6  # theta = theta_old at the first update
  state, m2 = step(state, batch)
  assert abs(float(m2["ratio_mean"]) - 1.0) > 1e-7  # theta moved, theta_old did not
  # Refreshed: theta_old is the new params. The optimiser and the train state each compute
  # params + updates, and XLA may contract the two copies differently (1 ulp apart).
  assert tree_max_abs(old_policy.old_params(state.opt_state), state.params) < 1e-6
