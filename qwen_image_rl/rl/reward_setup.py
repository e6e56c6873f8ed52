"""The composite reward and per-category weights of an RL run, built from `config.rewards`.

  config.rewards.names    ('alignment', 'aesthetics', 'portrait')   registered reward names
  config.rewards.kwargs   {'portrait': {'dims': ('well_formed',)}}  optional factory arguments
  config.rl.category_weights
      {'general': {'alignment': 0.6, 'aesthetics': 0.3, 'portrait': 0.1}, ...}

Every category a prompt can carry needs a weight vector over exactly these rewards that sums to 1
(Qwen-Image-2.0-RL Eq. 10, sec. 5). All checks raise ConfigError naming the field, so a bad run
fails before anything compiles.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from qwen_image_rl.config_lib import ConfigError, get_field
from qwen_image_rl.rewards.composite import CompositeReward, validate_weights
from qwen_image_rl.rewards.registry import known_rewards, make_reward
from qwen_image_rl.rl.advantages import category_weight_table


def reward_names(config) -> tuple[str, ...]:
  names = tuple(get_field(config, "rewards.names"))
  if not names:
    raise ConfigError(
      f"config.rewards.names is empty: name at least one reward (known: {known_rewards()})"
    )
  unknown = [n for n in names if n not in known_rewards()]
  if unknown:
    raise ConfigError(
      f"config.rewards.names has unknown rewards {unknown}; known: {known_rewards()}"
    )
  if len(set(names)) != len(names):
    raise ConfigError(f"config.rewards.names has duplicates: {list(names)}")
  return names


def category_weights(config) -> dict[str, dict[str, float]]:
  """Validated {category: {reward: weight}} from config.rl.category_weights."""
  names = reward_names(config)
  raw = get_field(config, "rl.category_weights")
  weights = {
    str(c): {str(k): float(v) for k, v in dict(vec).items()} for c, vec in dict(raw).items()
  }
  try:
    validate_weights(weights, names)
  except ValueError as e:
    raise ConfigError(f"config.rl.category_weights: {e}") from e
  return weights


def check_categories_covered(
  weights: Mapping[str, Mapping[str, float]], categories: Sequence[str], where: str
) -> None:
  missing = sorted(set(categories) - set(weights))
  if missing:
    raise ConfigError(
      f"{where} has prompts of categories {missing} but "
      f"config.rl.category_weights only defines {sorted(weights)}"
    )


def build_reward(config) -> CompositeReward:
  """The CompositeReward of config.rewards (each member scores the whole batch)."""
  names = reward_names(config)
  kwargs = dict(get_field(config, "rewards.kwargs", {}) or {})
  unknown = sorted(set(kwargs) - set(names))
  if unknown:
    raise ConfigError(
      f"config.rewards.kwargs names rewards {unknown} that are not in "
      f"config.rewards.names {list(names)}"
    )
  members = {}
  for name in names:
    try:
      members[name] = make_reward(name, **dict(kwargs.get(name, {}) or {}))
    except ValueError as e:
      raise ConfigError(f"config.rewards: {e}") from e
  reward = CompositeReward(members, name="+".join(names))
  if tuple(reward.names) != names:
    raise ConfigError(
      f"config.rewards.names {list(names)}: the rewards produce scores "
      f"{list(reward.names)}; each reward must produce exactly one score of "
      f"its own name"
    )
  return reward


def weight_table(weights, categories: Sequence[str], names: Sequence[str]) -> np.ndarray:
  """float32 [len(categories), len(names)]: row c is category c's weight vector."""
  return category_weight_table(weights, list(categories), list(names))
