"""Variance fixes for the RL estimators: batch-wide advantage std, reward shaping of near-constant
rewards, and Coefficients-Preserving Sampling (float64 numpy references)."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from qwen_image_rl.rl import advantages as adv_lib
from qwen_image_rl.sampling import sde

G, N_GROUPS = 4, 3


def test_batch_std_centres_per_group_and_divides_by_one_std():
  rng = np.random.default_rng(0)
  b = G * N_GROUPS
  groups = adv_lib.contiguous_group_ids(b, G)
  rewards = {"a": rng.normal(size=b), "flat": 0.9 + 1e-3 * rng.normal(size=b)}
  weights = {"a": np.full(b, 0.7), "flat": np.full(b, 0.3)}
  got, _ = adv_lib.gdpo_advantages(rewards, weights, groups, N_GROUPS, std="batch", clip=None)
  centred = sum(
    w * (r - r.reshape(N_GROUPS, G).mean(1).repeat(G))
    for r, w in ((rewards["a"], 0.7), (rewards["flat"], 0.3))
  )
  want = centred / (centred.std() + 1e-4)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
  # The near-constant reward's jitter: a unit-variance term under GDPO, negligible under 'batch'.
  only_flat = {"a": np.zeros(b), "flat": np.full(b, 0.3)}
  group_flat, _ = adv_lib.gdpo_advantages(rewards, only_flat, groups, N_GROUPS, clip=None)
  batch_flat, _ = adv_lib.gdpo_advantages(
    rewards, {"a": weights["a"], "flat": np.zeros(b)}, groups, N_GROUPS, std="batch", clip=None
  )
  assert float(jnp.std(group_flat)) > 0.25
  assert np.max(np.abs(np.asarray(got) - np.asarray(batch_flat))) < 0.02
  with pytest.raises(ValueError, match="std"):
    adv_lib.gdpo_advantages(rewards, weights, groups, N_GROUPS, std="global")


def test_threshold_penalty_and_readable_groups():
  np.testing.assert_allclose(
    adv_lib.threshold_penalty([0.95, 0.9, 0.7], 0.9), [0.0, 0.0, -0.2], atol=1e-7
  )
  ids = adv_lib.contiguous_group_ids(6, 3)
  readable = adv_lib.readable_groups([0.05, 0.06, 0.07, 0.05, 0.4, 0.06], ids, 0.2)
  assert readable.tolist() == [False] * 3 + [True] * 3


def test_placebo_permutes_advantages_within_each_group_only():
  ids = adv_lib.contiguous_group_ids(12, 4)
  values = np.arange(12, dtype=np.float32) * 0.5 - 2.0
  got = adv_lib.permute_within_groups(values, ids, [0, 64])
  for g in range(3):  # every group keeps its own advantages (its mean and spread), reordered
    np.testing.assert_array_equal(np.sort(got[ids == g]), values[ids == g])
  assert not np.array_equal(got, values)
  np.testing.assert_array_equal(got, adv_lib.permute_within_groups(values, ids, [0, 64]))
  assert not np.array_equal(got, adv_lib.permute_within_groups(values, ids, [0, 128]))


def cps_reference(x, v, t, t_next, a):
  s = t_next * math.sin(a * math.pi / 2)
  x0_hat, eps_hat = x - t * v, x + (1 - t) * v
  return (1 - t_next) * x0_hat + math.sqrt(t_next**2 - s**2) * eps_hat, s


def test_cps_step_matches_float64_reference():
  rng = np.random.default_rng(1)
  x, v = rng.normal(size=(2, 5, 3)), rng.normal(size=(2, 5, 3))
  for t, t_next, a in ((1.0, 0.8, 0.8), (0.6, 0.45, 0.5), (0.3, 0.1, 1.0)):
    mean, std = sde.step_mean_std("cps", x, v, t, t_next, a)
    want_mean, want_std = cps_reference(x, v, t, t_next, a)
    np.testing.assert_allclose(np.asarray(mean), want_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(std).ravel(), want_std, rtol=1e-6)
    x_next = rng.normal(size=x.shape)
    lp = np.asarray(sde.gaussian_log_prob(x_next, mean, std))
    want_lp = np.mean(
      -((x_next - want_mean) ** 2) / (2 * want_std**2)
      - math.log(want_std)
      - 0.5 * math.log(2 * math.pi),
      axis=(1, 2),
    )
    np.testing.assert_allclose(lp, want_lp, rtol=1e-5)
  with pytest.raises(ValueError, match="sde_type"):
    sde.step_mean_std("ddim", x, v, 1.0, 0.5, 0.5)


def chain_variance(sde_type, sigmas, a, data_std):
  """Marginal variance after stochastic steps with the exact velocity of 1-D Gaussian data
  x0 ~ N(0, data_std^2): v(x, t) = k(t) x, k = (t - (1 - t) data_std^2) / m(t), m(t) = var x_t.
  The step is linear in x, so var' = c^2 var + std^2 with c its slope."""
  var, out = 1.0, []
  for t, t_next in zip(sigmas[:-1], sigmas[1:]):
    m = (1 - t) ** 2 * data_std**2 + t**2
    k = (t - (1 - t) * data_std**2) / m
    ones = jnp.ones((1, 1, 1))
    mean1, std = sde.step_mean_std(sde_type, ones, k * ones, t, t_next, a)
    mean0, _ = sde.step_mean_std(sde_type, 0 * ones, 0 * ones, t, t_next, a)
    c = float(mean1.ravel()[0] - mean0.ravel()[0])
    var = c * c * var + float(np.asarray(std).ravel()[0]) ** 2
    out.append((var, (1 - t_next) ** 2 * data_std**2 + t_next**2))
  return out


def test_cps_preserves_the_marginal_variance_where_flow_grpo_adds_some():
  sigmas = [1.0, 0.8, 0.6, 0.4, 0.2]
  # Point-mass data (std 0): the predictions x0_hat, eps_hat are exact, CPS keeps var = t'^2.
  for var, want in chain_variance("cps", sigmas, 0.8, 0.0):
    assert abs(var - want) < 1e-5 * want
  # Flow-GRPO's Euler-Maruyama step at these few steps overshoots (the first, at t = 1, most).
  (first, want), *_ = chain_variance("flow_grpo", sigmas, 0.8, 0.0)
  print(f"one step 1 -> 0.8, a = 0.8: flow_grpo var {first:.4f} vs marginal {want:.4f}")
  assert first > 1.1 * want


def test_b_noise_and_its_jackknife_interval_on_synthetic_gradients():
  import os
  import sys

  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from benchmarks import grad_snr

  rng = np.random.default_rng(3)
  dim, n, batch = 4000, 40, 64
  signal = rng.normal(size=dim) * 0.1  # |s|^2 = 40
  noise_sd = 0.5  # |n|^2 = 1000 per batch: B_noise = 64 * 1000 / 40 = 1600
  g = signal + noise_sd * rng.normal(size=(n, dim))
  stats = grad_snr.jackknife(g @ g.T, batch)
  truth = batch * noise_sd**2 * dim / float(signal @ signal)
  est, lo, hi = stats["b_noise"]
  print(f"B_noise {est:.0f} [{lo:.0f}, {hi:.0f}] vs true {truth:.0f}")
  assert lo < truth < hi and hi - lo < truth
  pure_noise = rng.normal(size=(n, dim))
  assert grad_snr.jackknife(pure_noise @ pure_noise.T, batch)["signal"][1] < 0.0


def test_headroom_reads_best_of_group_top_quarter_and_flat_groups():
  import os
  import sys

  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from benchmarks import rl_headroom

  # Two groups of 8: one sample at 1.0 among zeros, and a constant group (no signal to rank).
  metric = np.array([[0.0] * 7 + [1.0], [0.5] * 8])
  composite = np.array([[0.0] * 7 + [0.4], [0.3] * 7 + [0.32]])
  got = rl_headroom.headroom(metric, composite, flat_range=0.05)
  assert got["mean"] == round((1 / 8 + 0.5) / 2, 3)
  assert got["best_of_G"] == 0.75
  assert got["top_quarter"] == round((0.5 + 0.5) / 2, 3)  # best 2 of 8: (1+0)/2 and 0.5
  assert got["gap"] == round(((1 - 1 / 8) + 0.0) / 2, 3)
  assert got["flat"] == 0.5  # the second group's composite spans 0.02 < 0.05
  # The bootstrap interval of the gap covers its expectation on random groups.
  rng = np.random.default_rng(0)
  draws = rng.uniform(size=(400, 8))
  low, high = rl_headroom.headroom(draws, draws, flat_range=0.05)["gap_ci95"]
  expected = 8 / 9 - 0.5  # E[max of 8 uniforms] - E[mean]
  assert low < expected < high and high - low < 0.05


def test_headroom_variance_shares_follow_the_reward_that_ranks_the_group():
  import os
  import sys

  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from benchmarks import rl_headroom

  rng = np.random.default_rng(1)
  moving = 0.3 * rng.normal(size=(50, 8))  # std 0.3 within every group
  still = 0.1 * rng.normal(size=(50, 8)) + rng.normal(size=(50, 1))  # std 0.1; groups offset
  shares = rl_headroom.variance_shares({"identity": moving, "instruction": still})
  assert abs(shares["identity"] - 0.9) < 0.03 and abs(sum(shares.values()) - 1) < 1e-3


def test_headroom_within_group_spearman_reads_the_copy_direction():
  import os
  import sys

  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from benchmarks import rl_headroom

  rng = np.random.default_rng(2)
  metric = rng.uniform(size=(40, 8))
  # Closeness that follows the metric inside every group, groups offset: rho = 1 per group.
  closeness = 3.0 * metric + rng.normal(size=(40, 1))
  rho = rl_headroom.within_group_spearman(metric, closeness)
  np.testing.assert_allclose(rho, 1.0)
  assert abs(rl_headroom.within_group_spearman(metric, -closeness).mean() + 1.0) < 1e-9
  # A constant group has no ranking and is left out; unrelated draws average near 0.
  metric[0] = 0.5
  assert len(rl_headroom.within_group_spearman(metric, closeness)) == 39
  unrelated = rl_headroom.within_group_spearman(metric, rng.uniform(size=(40, 8)))
  assert abs(unrelated.mean()) < 0.15


def test_policy_drift_separates_the_branches_and_the_cfg_gap():
  import os
  import sys

  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from benchmarks import policy_drift

  rng = np.random.default_rng(3)
  cond, uncond = rng.normal(size=(2, 6, 16, 4))
  assert set(policy_drift.drift((cond, uncond), (cond, uncond)).values()) == {0.0, 1.0}
  # Both branches moved by the same vector: the gap, which CFG multiplies, did not change.
  shift = 0.1 * rng.normal(size=cond.shape)
  same = policy_drift.drift((cond, uncond), (cond + shift, uncond + shift))
  assert same["cond_change"] > 0.05 and same["uncond_change"] > 0.05
  assert same["gap_change"] == 0.0 and same["gap_norm_ratio"] == 1.0
  # Only the unconditional branch moved toward the conditional one: the gap shrank by half.
  half = policy_drift.drift((cond, uncond), (cond, uncond + 0.5 * (cond - uncond)))
  assert half["cond_change"] == 0.0 and half["gap_norm_ratio"] == 0.5
  assert half["gap_change"] == 0.5


def test_policy_drift_random_control_matches_each_tensors_motion():
  import os
  import sys

  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from benchmarks import policy_drift

  rng = np.random.default_rng(4)
  base = {"a": rng.normal(size=(8, 16)), "b": {"c": rng.normal(size=(32,))}}
  moved = {"a": base["a"] + 0.3 * np.sign(base["a"]), "b": {"c": base["b"]["c"]}}
  control = policy_drift.random_like(base, moved, seed=1)
  delta = control["a"] - base["a"]
  np.testing.assert_allclose(np.linalg.norm(delta), np.linalg.norm(0.3 * np.ones((8, 16))), 1e-5)
  assert abs(np.corrcoef(delta.ravel(), np.sign(base["a"]).ravel())[0, 1]) < 0.3  # not the motion
  np.testing.assert_array_equal(control["b"]["c"], base["b"]["c"].astype(np.float32))  # unmoved
