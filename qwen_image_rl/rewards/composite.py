"""Several rewards as one, and the per-category weighted sum of their scores.

`CompositeReward` runs each member on the whole batch and returns every member's named scores:
the GRPO advantage (Qwen-Image-2.0-RL Eq. 10) normalises each reward separately per prompt group,
so the raw scores are what the trainer needs. `category_weighted_sum` is the scalar composite
sum_k w_k(category) R_k used for prompt curation's intra-group reward range (paper section 4).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence

import numpy as np

from qwen_image_rl.rewards.base import RewardBatch, RewardError, RewardFn, check_scores

WEIGHT_SUM_TOLERANCE = 1e-6


class CompositeReward(RewardFn):
  """Runs `rewards` ({member label: reward}) in order and merges their scores.

  Output keys are the members' own score names; two members producing the same name is an error.
  A member failing raises RewardError naming it. `last_seconds` holds each member's wall time of
  the latest call (for perf logging; written by whichever thread called).
  """

  def __init__(self, rewards: Mapping[str, RewardFn], name: str = 'composite'):
    if not rewards:
      raise ValueError('CompositeReward needs at least one reward.')
    owner = {}
    for label, reward in rewards.items():
      names = tuple(getattr(reward, 'names', ()) or ())
      if not callable(reward) or not names:
        raise ValueError(
          f'CompositeReward member {label!r} is {reward!r}: not a reward (needs '
          f'__call__ and non-empty `names`).'
        )
      for score_name in names:
        if score_name in owner:
          raise ValueError(
            f'score {score_name!r} is produced by both {owner[score_name]!r} and '
            f'{label!r}; rename one of them.'
          )
        owner[score_name] = label
    self.name = name
    self.rewards = dict(rewards)
    self.names = tuple(owner)
    self.last_seconds: dict[str, float] = {}

  def score(self, batch: RewardBatch) -> dict[str, np.ndarray]:
    out, seconds = {}, {}
    for label, reward in self.rewards.items():
      start = time.perf_counter()
      try:
        scores = reward(batch)
      except Exception as e:
        raise RewardError(
          f'reward {label!r} of {self.name!r} failed: {type(e).__name__}: {e}'
        ) from e
      out.update(check_scores(scores, reward.names, batch.size, f'reward {label!r}'))
      seconds[label] = time.perf_counter() - start
    self.last_seconds = seconds
    return out

  @property
  def last_metrics(self) -> dict[str, float]:
    """The members' `last_metrics` (e.g. a remote judge's latency and retries), merged."""
    out = {}
    for reward in self.rewards.values():
      out.update(getattr(reward, 'last_metrics', None) or {})
    return out


def validate_weights(
  weights: Mapping[str, Mapping[str, float]],
  reward_names: Sequence[str],
  categories: Sequence[str] = (),
) -> None:
  """Checks per-category weight vectors.

  Each vector must name only `reward_names` (a reward left out has weight 0), have non-negative
  finite weights and sum to 1 within WEIGHT_SUM_TOLERANCE; every category in `categories` needs
  a vector.

  Raises:
    ValueError naming the category and the offending value.
  """
  known = set(reward_names)
  if len(known) != len(reward_names):
    raise ValueError(f'reward names have duplicates: {list(reward_names)}')
  if not weights:
    raise ValueError('reward weights are empty: give a weight vector for at least one category')
  for category, vector in weights.items():
    where = f'reward weights for category {category!r}'
    for reward_name, w in vector.items():
      if reward_name not in known:
        raise ValueError(
          f'{where}: unknown reward {reward_name!r} (weight {w!r}); known rewards: {sorted(known)}'
        )
      if not (isinstance(w, (int, float, np.number)) and math.isfinite(w) and w >= 0):
        raise ValueError(
          f'{where}: weight of {reward_name!r} is {w!r}; weights must be finite and >= 0'
        )
    total = float(sum(vector.values()))
    if abs(total - 1.0) > WEIGHT_SUM_TOLERANCE:
      raise ValueError(
        f'{where}: weights {dict(vector)} sum to {total!r}; they must sum to 1 '
        f'(tolerance {WEIGHT_SUM_TOLERANCE})'
      )
  missing = sorted(set(categories) - set(weights))
  if missing:
    raise ValueError(
      f'no reward weights for categories {missing}; weights are defined for {sorted(weights)}'
    )


def category_weighted_sum(
  scores: Mapping[str, np.ndarray],
  categories: Sequence[str],
  weights: Mapping[str, Mapping[str, float]],
) -> np.ndarray:
  """float32 [B]: sample i gets sum_k weights[categories[i]][k] * scores[k][i].

  Only rewards with a positive weight enter a category's sum, so a NaN (failed) score poisons a
  sample only when its weight counts. Weights are validated first (see `validate_weights`).
  """
  categories = list(categories)
  size = len(categories)
  for name, value in scores.items():
    if np.shape(value) != (size,):
      raise ValueError(
        f'score {name!r} has shape {np.shape(value)}; expected [{size}] (one per category entry)'
      )
  validate_weights(weights, list(scores), categories)
  total = np.zeros(size, np.float32)
  category_array = np.array(categories, dtype=object)
  for category in set(categories):
    rows = category_array == category
    for name, w in weights[category].items():
      if w > 0:
        total[rows] += np.float32(w) * np.asarray(scores[name], np.float32)[rows]
  return total
