"""GRPO math: GDPO multi-reward advantages and timestep selection."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen_image_rl.rl import advantages as adv
from qwen_image_rl.rl import timesteps as ts

REWARDS = ("aesthetic", "alignment", "portrait")
CATEGORY_WEIGHTS = {
  "general": {"aesthetic": 0.4, "alignment": 0.6, "portrait": 0.0},
  "portrait": {"aesthetic": 0.3, "alignment": 0.2, "portrait": 0.5},
  "typography": {"aesthetic": 0.1, "alignment": 0.9, "portrait": 0.0},
}


# --- advantages ----------------------------------------------------------------------------------


def _numpy_gdpo(rewards, weights, group_ids, eps, ddof, whiten, clip):
  """Straightforward loop over rewards and groups, float64."""
  batch = len(group_ids)
  total = np.zeros(batch)
  for name in rewards:
    r = np.asarray(rewards[name], np.float64)
    for g in np.unique(group_ids):
      members = np.nonzero(group_ids == g)[0]
      values = r[members]
      std = values.std(ddof=ddof) if len(values) > ddof else 0.0
      for i in members:
        total[i] += weights[name][i] * (r[i] - values.mean()) / (std + eps)
  if whiten:
    total = (total - total.mean()) / (total.std(ddof=ddof) + eps)
  if clip is not None:
    total = np.clip(total, -clip, clip)
  return total


def _random_batch(rng, batch, num_groups, tie_groups=()):
  # Unequal order, shuffled.
  group_ids = rng.permutation(np.arange(batch) % num_groups).astype(np.int32)
  rewards = {
    name: rng.normal(size=batch).astype(np.float32) * (k + 1) for k, name in enumerate(REWARDS)
  }
  for g in tie_groups:  # every rollout of this prompt scores the same on 'aesthetic'
    rewards["aesthetic"][group_ids == g] = 0.25
  categories = ["general", "portrait", "typography"]
  table = adv.category_weight_table(CATEGORY_WEIGHTS, categories, REWARDS)
  category_of_group = rng.integers(0, len(categories), size=num_groups)
  weights = adv.sample_weights(category_of_group[group_ids], table, REWARDS)
  return rewards, weights, group_ids


@pytest.mark.parametrize(
  "whiten,ddof,clip", [(False, 0, 5.0), (True, 0, None), (False, 1, 1.0), (True, 1, 5.0)]
)
def test_gdpo_matches_numpy_loop(whiten, ddof, clip):
  rng = np.random.default_rng(0)
  rewards, weights, group_ids = _random_batch(rng, batch=30, num_groups=7, tie_groups=(2,))
  fn = jax.jit(
    functools.partial(adv.gdpo_advantages, num_groups=7, whiten=whiten, ddof=ddof, clip=clip)
  )
  ours, stats = fn(rewards, weights, group_ids)
  expected = _numpy_gdpo(
    rewards, {k: np.asarray(v) for k, v in weights.items()}, group_ids, 1e-4, ddof, whiten, clip
  )
  assert ours.shape == (30,) and ours.dtype == jnp.float32
  assert np.abs(np.asarray(ours) - expected).max() <= 2e-5  # measured ~1e-6
  assert float(stats["aesthetic/zero_std_frac"]) == pytest.approx(1 / 7)
  assert float(stats["alignment/zero_std_frac"]) == 0.0
  if clip is not None:
    assert float(stats["advantage/clip_frac"]) == pytest.approx(
      np.mean(
        np.abs(
          _numpy_gdpo(
            rewards,
            {k: np.asarray(v) for k, v in weights.items()},
            group_ids,
            1e-4,
            ddof,
            whiten,
            None,
          )
        )
        > clip
      )
    )


def test_gdpo_contiguous_groups_and_single_reward_is_grpo():
  rng = np.random.default_rng(1)
  batch, group_size = 24, 6
  r = rng.normal(size=batch).astype(np.float32)
  group_ids = adv.contiguous_group_ids(batch, group_size)
  ours, stats = adv.gdpo_advantages(
    {"score": r}, {"score": np.ones(batch, np.float32)}, group_ids, batch // group_size, clip=None
  )
  grouped = r.reshape(-1, group_size).astype(np.float64)
  flow_grpo = (
    (grouped - grouped.mean(1, keepdims=True)) / (grouped.std(1, keepdims=True) + 1e-4)
  ).reshape(-1)
  np.testing.assert_allclose(ours, flow_grpo, atol=1e-5)
  assert float(stats["score/mean"]) == pytest.approx(r.mean(), abs=1e-6)
  assert float(stats["score/group_range_mean"]) == pytest.approx(
    np.ptp(grouped, axis=1).mean(), abs=1e-5
  )
  with pytest.raises(ValueError, match="group_size"):
    adv.contiguous_group_ids(10, 3)


def test_gdpo_all_ties_give_zero_advantage():
  group_ids = adv.contiguous_group_ids(8, 4)
  rewards = {"a": np.array([1, 1, 1, 1, 0, 0, 0, 0], np.float32)}
  ours, stats = adv.gdpo_advantages(rewards, {"a": np.ones(8, np.float32)}, group_ids, 2)
  np.testing.assert_array_equal(ours, np.zeros(8))
  assert float(stats["a/zero_std_frac"]) == 1.0 and float(stats["advantage/zero_frac"]) == 1.0
  with pytest.raises(ValueError, match="same keys"):
    adv.gdpo_advantages(rewards, {"b": np.ones(8)}, group_ids, 2)


def test_category_weight_table_validates_and_fills_omitted_rewards():
  table = adv.category_weight_table(CATEGORY_WEIGHTS, sorted(CATEGORY_WEIGHTS), REWARDS)
  np.testing.assert_allclose(table.sum(axis=1), 1.0, atol=1e-6)
  # A reward a category leaves out weighs 0 (the same rule as the composite reward).
  table = adv.category_weight_table(
    {"general": {"aesthetic": 0.5, "alignment": 0.5}}, ["general"], REWARDS
  )
  np.testing.assert_array_equal(
    table, [[0.5 if r in ("aesthetic", "alignment") else 0.0 for r in REWARDS]]
  )
  with pytest.raises(ValueError, match=r"'general'.*sum to"):
    adv.category_weight_table(
      {"general": {"aesthetic": 0.5, "alignment": 0.6}}, ["general"], REWARDS
    )
  with pytest.raises(ValueError, match="unknown reward 'ocr'"):
    adv.category_weight_table(
      {"general": {"aesthetic": 0.5, "alignment": 0.5, "ocr": 0.0}}, ["general"], REWARDS
    )
  with pytest.raises(ValueError, match="finite and >= 0"):
    adv.category_weight_table(
      {"general": {"aesthetic": 1.5, "alignment": -0.5}}, ["general"], REWARDS
    )
  adv.category_weight_table(
    {"general": {"aesthetic": 0.3, "alignment": 0.7 + 5e-7}}, ["general"], REWARDS
  )  # within 1e-6
  with pytest.raises(ValueError, match="no reward weights for categories.*'landscape'"):
    adv.category_weight_table(CATEGORY_WEIGHTS, ["general", "landscape"], REWARDS)
  with pytest.raises(ValueError, match="duplicates"):
    adv.category_weight_table(CATEGORY_WEIGHTS, ["general"], REWARDS + REWARDS[:1])


# --- timesteps -----------------------------------------------------------------------------------


def _draw_many(strategy, n_draws, **kwargs):
  keys = jax.random.split(jax.random.key(0), n_draws)
  fn = jax.jit(jax.vmap(lambda k: ts.select_timesteps(k, strategy, **kwargs)))
  return jax.tree.map(np.asarray, fn(keys))


def test_high_noise_distribution():
  indices, masks = _draw_many("high_noise", 2000, num_steps=40, num_train=4, first_m=12, power=8.0)
  assert indices.shape == (2000, 4) and indices.dtype == np.int32 and masks.shape == (2000, 40)
  assert indices.min() >= 0 and indices.max() < 12  # never outside the first M
  assert np.all(np.diff(indices, axis=1) > 0)  # distinct, sorted ascending
  np.testing.assert_array_equal(masks.sum(1), 4)
  np.testing.assert_array_equal(masks, np.eye(40, dtype=bool)[indices].any(1))
  counts = masks.sum(0)
  assert counts[:3].sum() > counts[9:12].sum() * 1.5  # favours low indices (t near 1)
  assert counts[0] > counts[11]
  # With K = 1 the empirical frequencies match the sigma^power probabilities.
  single, _ = _draw_many("high_noise", 2000, num_steps=40, num_train=1, first_m=12, power=8.0)
  probs = ts.high_noise_probs(40, 12, 8.0)
  freq = np.bincount(single[:, 0], minlength=40) / 2000
  assert np.abs(freq - probs).max() < 0.035 and probs[12:].sum() == 0


def test_uniform_window_sliding_all():
  indices, _ = _draw_many("uniform", 2000, num_steps=10, num_train=3)
  counts = np.bincount(indices.reshape(-1), minlength=10)
  assert np.all(np.diff(indices, axis=1) > 0)
  assert np.abs(counts / 6000 - 0.1).max() < 0.02
  idx, mask = ts.select_timesteps(None, "window", 40, 4, 16, window_start=5)
  np.testing.assert_array_equal(idx, [5, 6, 7, 8])
  assert mask.sum() == 4 and mask[5] and not mask[9]
  starts = [
    int(ts.select_timesteps(None, "sliding", 40, 4, 8, train_step=s, slide_every=2)[0][0])
    for s in range(12)
  ]
  assert starts == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 0, 0]  # 5 window positions in the first 8 steps
  idx, mask = ts.select_timesteps(None, "all", 6, 6)
  np.testing.assert_array_equal(idx, np.arange(6))
  assert bool(mask.all())
  # Sliding works with a traced training step.
  jitted = jax.jit(lambda s: ts.select_timesteps(None, "sliding", 40, 4, 8, train_step=s)[0])
  np.testing.assert_array_equal(jitted(jnp.int32(6)), [1, 2, 3, 4])


def test_timestep_selection_is_deterministic():
  a = ts.select_timesteps(jax.random.key(7), "high_noise", 40, 6, 20)
  b = ts.select_timesteps(jax.random.key(7), "high_noise", 40, 6, 20)
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])
  others = {
    tuple(np.asarray(ts.select_timesteps(jax.random.key(k), "high_noise", 40, 6, 20)[0]))
    for k in range(8, 13)
  }
  assert len(others) > 1  # different keys give different subsets


@pytest.mark.parametrize(
  "args,match",
  [
    (("bogus", 4, 8, 40), "strategy='bogus'"),
    (("uniform", 41, None, 40), r"num_train \(K=41\) > num_steps"),
    (("high_noise", 10, 8, 40), r"num_train \(K=10\) > first_m \(M=8\)"),
    (("high_noise", 4, 50, 40), r"first_m \(M=50\) > num_steps"),
    (("all", 4, None, 40), "must equal num_steps"),
    (("window", 0, None, 40), r"num_train \(K\) = 0"),
  ],
)
def test_validate_timestep_config_errors(args, match):
  with pytest.raises(ValueError, match=match):
    ts.validate_timestep_config(*args)


def test_validate_window_bounds():
  ts.validate_timestep_config("window", 4, 8, 40, window_start=4)
  with pytest.raises(ValueError, match="window_start=5"):
    ts.validate_timestep_config("window", 4, 8, 40, window_start=5)
