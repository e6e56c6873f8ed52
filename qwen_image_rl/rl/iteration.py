"""One RL iteration, as named steps: roll out a batch, score it, compute advantages, update.

  s = iteration.setup(config, mesh, rules)              # base policy, rewards, prompts, objective
  tx = iteration.make_optimizer(s, total_updates)       # config.optim, wrapped by the objective
  step = iteration.make_update_step(s, tx, shardings)   # the objective's jitted train step
  got = iteration.roll_out(s, params, key, it, reward_pipeline)  # scored asynchronously
  scalars = iteration.score(s, got)                     # reward statistics (one composite)
  adv, stats = iteration.advantages(s, got)             # GDPO per reward, category weights
  state, metrics = iteration.update(s, step, state, got, adv)

The grpo trainer composes these, and the benchmarks call them as they are, so what a benchmark
measures is what the trainer runs. The objective (`config.rl.objective`, see
`rl/objectives/registry.py`) decides what the rollout records and what the update optimises.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qwen_image_rl import optim, parallel
from qwen_image_rl.rewards.composite import category_weighted_sum
from qwen_image_rl.rl import objectives, reward_setup
from qwen_image_rl.rl.advantages import (
  contiguous_group_ids,
  gdpo_advantages,
  permute_within_groups,
  readable_groups,
  sample_weights,
  threshold_penalty,
)
from qwen_image_rl.rl.collect import Collected, Roller, make_reward_pipeline
from qwen_image_rl.rl.policy import load_base
from qwen_image_rl.rl.prompts import PromptPool, build_pool

__all__ = [
  "Collected",
  "RLSetup",
  "advantages",
  "composite_reward",
  "make_grad_fn",
  "make_optimizer",
  "make_reward_pipeline",
  "make_update_step",
  "roll_out",
  "score",
  "setup",
  "shaped_rewards",
  "update",
]


@dataclasses.dataclass
class RLSetup:
  """Everything an iteration needs that does not change between iterations."""

  config: Any
  pipe: Any  # the base pipeline (its transformer params are the initial policy)
  pool: PromptPool
  reward_fn: Any  # a CompositeReward
  weights: dict  # {category: {reward: weight}}
  objective: objectives.Objective
  roller: Roller
  mesh: Any
  rules: tuple

  @property
  def rl(self):
    return self.config.rl

  @property
  def model(self):
    return self.pipe.transformer

  @property
  def img_shapes(self):
    return self.roller.img_shapes

  @property
  def names(self) -> tuple[str, ...]:
    return tuple(self.reward_fn.names)

  @property
  def batch_size(self) -> int:
    return self.roller.batch


def setup(config, mesh, rules, pipe=None) -> RLSetup:
  """Load the base pipeline (unless `pipe` is one already loaded from config.init_from), build
  the rewards, the prompt pool and the roller."""
  pipe = pipe or load_base(config)  # ConfigError on a bad init_from, before any compile
  reward_fn = reward_setup.build_reward(config)
  weights = reward_setup.category_weights(config)
  objective = objectives.get(config.rl.objective)
  pool = build_pool(config, pipe)
  reward_setup.check_categories_covered(weights, pool.categories, "the prompt set")
  roller = Roller(
    config, pipe, pool, mesh, rules, record_transitions=objective.records == "transitions"
  )
  return RLSetup(config, pipe, pool, reward_fn, weights, objective, roller, mesh, rules)


def make_optimizer(s: RLSetup, total_updates: int):
  """config.optim's optimiser, wrapped by the objective (e.g. to keep an old policy in its
  state; see registry.Objective.wrap_optimizer)."""
  return s.objective.wrap_optimizer(optim.make_optimizer(s.config.optim, total_updates), s.rl)


def make_update_step(s: RLSetup, tx, shardings=None):
  """The objective's train step, jitted: step(state, batch, ref_params) -> (state, metrics).

  The state is donated; with `shardings` (the TrainState's) the new state keeps them.
  """
  step = s.objective.make_step(s.model, tx, s.rules, s.rl, s.img_shapes)
  out = None if shardings is None else (shardings, None)
  return jax.jit(step, donate_argnums=(0,), out_shardings=out)


def make_grad_fn(s: RLSetup, objective: str | None = None):
  """The gradient of an objective (default: the run's) without an update, jitted:
  fn(params, batch, key) -> (grads, metrics); the batch from that objective's make_batch."""
  obj = s.objective if objective is None else objectives.get(objective)
  if obj.make_grads is None:
    raise ValueError(f"objective {obj.name!r} provides no make_grads")
  fn = jax.jit(obj.make_grads(s.model, s.rules, s.rl, s.img_shapes))

  def grads(params, batch, key):
    with parallel.sharding_context(s.mesh, s.rules):  # as `update`'s step
      return fn(params, batch, key)

  return grads


def roll_out(s: RLSetup, params, key, iteration: int, reward_pipeline) -> Collected:
  """The iteration's rollouts under `params`, each chunk scored by `reward_pipeline` (from
  `make_reward_pipeline`) while the next one rolls out."""
  return s.roller.collect(params, key, iteration, reward_pipeline)


def sample_categories(s: RLSetup, got: Collected) -> list[str]:
  return [s.pool.categories[i] for i in got.pool_index]


def composite_reward(s: RLSetup, got: Collected) -> np.ndarray:
  """float32 [B]: each sample's category-weighted sum of its rewards (paper Eq. 10's weights)."""
  return category_weighted_sum(got.scores, sample_categories(s, got), s.weights)


def scores_finite(got: Collected) -> bool:
  return all(np.isfinite(v).all() for v in got.scores.values())


def score(s: RLSetup, got: Collected) -> dict[str, float]:
  """Reward statistics: per reward mean / std / NaN count over finite scores, and the composite
  (overall and per category) when every score is finite."""
  out = {}
  for name, value in got.scores.items():
    finite = value[np.isfinite(value)]
    out[f"reward/{name}/mean"] = float(finite.mean()) if finite.size else float("nan")
    out[f"reward/{name}/std"] = float(finite.std()) if finite.size else float("nan")
    out[f"reward/{name}/nan_count"] = float(np.isnan(value).sum())
  if scores_finite(got):
    composite = composite_reward(s, got)
    out["reward/composite/mean"] = float(composite.mean())
    cats = np.asarray(sample_categories(s, got), dtype=object)
    for c in sorted(set(cats)):
      out[f"reward/composite/{c}"] = float(composite[cats == c].mean())
  return out


def reward_weights(s: RLSetup, got: Collected) -> dict[str, jax.Array]:
  """Per-sample weight of each reward {name: [B]} from the samples' categories."""
  categories = tuple(sorted(s.weights))
  table = reward_setup.weight_table(s.weights, categories, s.names)
  index = {c: i for i, c in enumerate(categories)}
  cat_ids = np.array([index[c] for c in sample_categories(s, got)], np.int32)
  return sample_weights(cat_ids, table, s.names)


def shaped_rewards(s: RLSetup, got: Collected):
  """The rewards and per-sample weights the advantages see, after rl.shaping (if any):
  preservation_threshold > 0 turns preservation into the penalty -max(0, tau - R);
  identity_floor > 0 zeroes identity's weight in groups where no sample reaches the floor
  (the oracle read no face there). Returns ({name: [B]}, {name: [B] weights})."""
  rewards = {n: np.asarray(got.scores[n], np.float32) for n in s.names}
  weights = {k: np.asarray(v) for k, v in reward_weights(s, got).items()}
  shaping = s.rl.get("shaping", None) or {}
  tau = float(shaping.get("preservation_threshold", 0.0))
  if tau > 0 and "preservation" in rewards:
    rewards["preservation"] = threshold_penalty(rewards["preservation"], tau)
  floor = float(shaping.get("identity_floor", 0.0))
  if floor > 0 and "identity" in rewards:
    groups = contiguous_group_ids(s.batch_size, s.rl.group_size)
    weights["identity"] = np.where(
      readable_groups(rewards["identity"], groups, floor), weights["identity"], 0.0
    ).astype(np.float32)
  return rewards, weights


def advantages(s: RLSetup, got: Collected):
  """Advantages [B] (per reward, per prompt group, then category-weighted; rl.advantage_std
  'group' is GDPO, 'batch' one batch-wide std; rl.placebo shuffles them within each group) and
  their statistics as {'train/advantage/...': float}. Scores must be finite (see `score`)."""
  rl = s.rl
  rewards, weights = shaped_rewards(s, got)
  groups = contiguous_group_ids(s.batch_size, rl.group_size)
  adv, stats = gdpo_advantages(
    rewards,
    weights,
    groups,
    rl.prompts_per_step,
    eps=rl.adv_eps,
    whiten=rl.whiten_advantages,
    clip=rl.adv_clip if rl.adv_clip > 0 else None,
    std=rl.get("advantage_std", "group"),
  )
  if rl.get("placebo", False):
    # The control run: each group's advantages shuffled among its samples, so the update
    # carries the optimiser's noise but no reward signal (its held-out change is the drift).
    adv = permute_within_groups(adv, groups, [s.config.seed, int(got.sample_ids[0])])
  return adv, {f"train/{k}": float(v) for k, v in stats.items() if k.startswith("advantage/")}


def update(s: RLSetup, step_fn, state, got: Collected, adv, ref_params=None):
  """rl.inner_updates steps of the objective on the batch. Returns (state, metrics): the last
  step's as 'train/...', its 'loss', and what the objective reports of the first one."""
  inputs = s.roller.policy_inputs(got.pool_index)
  batch = s.objective.make_batch(s, state.params, got.result, inputs, s.roller.put(np.asarray(adv)))
  history = []
  with parallel.sharding_context(s.mesh, s.rules):
    for _ in range(s.rl.inner_updates):
      state, m = step_fn(state, batch, ref_params)
      history.append({k: float(np.asarray(v)) for k, v in jax.device_get(m).items()})
  nonfinite = [h["loss"] for h in history if not np.isfinite(h["loss"])]
  metrics = {f"train/{k}": v for k, v in history[-1].items()}
  metrics["loss"] = nonfinite[0] if nonfinite else history[-1]["loss"]
  if "ratio_mean" in history[0]:
    metrics["train/first_ratio_mean"] = history[0]["ratio_mean"]
  if s.objective.records == "transitions":
    metrics["rollout/behaviour_log_prob"] = float(jnp.mean(got.result.log_probs))
    old = batch.get("old_log_probs")
    metrics["rollout/old_log_prob"] = (
      history[0].get("log_prob_mean", float("nan")) if old is None else float(jnp.mean(old))
    )
  return state, metrics
