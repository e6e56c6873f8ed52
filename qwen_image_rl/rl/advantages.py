"""GDPO-style multi-reward advantages (Qwen-Image-2.0-RL Eq. 10).

For each reward k, rewards are normalised within each prompt group g (the G rollouts of one
prompt), then combined with the sample's category weights:

  A_i = sum_k w_k(c_i) * (R_k,i - mean_k,g(i)) / (std_k,g(i) + eps),   sum_k w_k(c) = 1.

With std='batch' (Flow-GRPO's, DiffusionNFT's and AWM's `global_std`) each reward is only centred
per group, the weighted sum is divided by one batch-wide std:

  A_i = C_i / (std_batch(C) + eps),   C_i = sum_k w_k(c_i) * (R_k,i - mean_k,g(i)),

so a reward with little spread (oracle jitter in a flat group) stays small instead of becoming a
unit-variance term.

Options: whitening of A across the whole batch, (A - mean) / (std + eps), as NVlabs/GDPO does
(off by default, the paper does not say); clipping to [-clip, clip]. Defaults follow flow_grpo's
`stat_tracking.py`: population std (ddof=0), eps=1e-4, and its config's clip of 5.

Group statistics use segment sums over static `num_groups`, so the function is jittable and
handles unequal group sizes. Rewards must be finite (NaN would propagate into its group).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qwen_image_rl.rewards.composite import validate_weights

# --- category weights (host-side, checked before any compile) ------------------------------------


def category_weight_table(
  weights: Mapping[str, Mapping[str, float]], categories: Sequence[str], reward_names: Sequence[str]
) -> np.ndarray:
  """float32 table [len(categories), len(reward_names)] of per-category weights.

  Validated by `rewards.composite.validate_weights` (the one rule for weight vectors): a reward
  a category leaves out has weight 0.
  """
  validate_weights(weights, reward_names, categories)
  return np.array([[weights[c].get(r, 0.0) for r in reward_names] for c in categories], np.float32)


def sample_weights(category_ids, table, reward_names: Sequence[str]) -> dict[str, jax.Array]:
  """Per-sample weights {reward: [B]} from category indices [B] into a weight table [C, R]."""
  per_sample = jnp.asarray(table, jnp.float32)[jnp.asarray(category_ids)]
  return {name: per_sample[:, k] for k, name in enumerate(reward_names)}


# --- advantages (jittable) -------------------------------------------------------------------


def contiguous_group_ids(batch_size: int, group_size: int) -> np.ndarray:
  """Group ids for a batch laid out as [n_groups, group_size] (rollouts of a prompt adjacent)."""
  if group_size < 1 or batch_size % group_size:
    raise ValueError(f"batch size {batch_size} is not a multiple of group_size={group_size}.")
  return np.arange(batch_size, dtype=np.int32) // group_size


def group_normalize(values, group_ids, num_groups: int, *, eps: float = 1e-4, ddof: int = 0):
  """(values - group mean) / (group std + eps) for [B] values; also returns (mean, std, range) [B].

  `ddof` is the std's delta degrees of freedom (0: numpy / flow_grpo, 1: torch / GDPO). A group of
  one sample has std 0.
  """
  values = jnp.asarray(values, jnp.float32)
  ones = jnp.ones_like(values)
  count = jax.ops.segment_sum(ones, group_ids, num_groups)
  mean_g = jax.ops.segment_sum(values, group_ids, num_groups) / jnp.maximum(count, 1.0)
  centred = values - mean_g[group_ids]
  sum_sq = jax.ops.segment_sum(centred * centred, group_ids, num_groups)
  std_g = jnp.sqrt(sum_sq / jnp.maximum(count - ddof, 1.0))
  range_g = jax.ops.segment_max(values, group_ids, num_groups) - jax.ops.segment_min(
    values, group_ids, num_groups
  )
  normalized = centred / (std_g[group_ids] + eps)
  return normalized, (mean_g, std_g, jnp.where(count > 0, range_g, 0.0), count)


STDS = ("group", "batch")


def gdpo_advantages(
  rewards: Mapping[str, jax.Array],
  weights: Mapping[str, jax.Array],
  group_ids,
  num_groups: int,
  *,
  eps: float = 1e-4,
  ddof: int = 0,
  whiten: bool = False,
  clip: float | None = 5.0,
  std: str = "group",
):
  """Multi-reward advantages A [B] and a stats dict.

  Args:
    rewards: {reward name: [B] raw scores}.
    weights: {reward name: [B] per-sample weight} (e.g. from `sample_weights`), same keys; a
      scalar per reward is broadcast.
    group_ids: int [B] in [0, num_groups): which prompt group each sample belongs to.
    num_groups: static number of groups (e.g. B // G).
    eps: added to each group std (and to the batch std when whitening).
    ddof: std degrees of freedom (0 = population std as flow_grpo).
    whiten: subtract the batch mean and divide by the batch std (+ eps) after the weighted sum.
    clip: clip advantages to [-clip, clip]; None disables.
    std: 'group' divides each reward by its group std (GDPO); 'batch' centres each reward per
      group and divides the weighted sum by one batch-wide std (see the module docstring).

  Returns:
    advantages float32 [B]; stats {name: scalar}: per reward `<name>/mean`, `<name>/std`
    (batch), `<name>/group_std_mean`, `<name>/group_range_mean`, `<name>/zero_std_frac` (fraction
    of non-empty groups whose rewards are all equal); and `advantage/{mean,std,abs_mean,
    clip_frac}`, `advantage/zero_frac` (samples with A == 0 before clipping).
  """
  if set(rewards) != set(weights):
    raise ValueError(
      f"rewards {sorted(rewards)} and weights {sorted(weights)} must have the same keys."
    )
  if not rewards:
    raise ValueError("gdpo_advantages needs at least one reward.")
  if std not in STDS:
    raise ValueError(f"advantage std={std!r}: expected one of {STDS}.")
  group_ids = jnp.asarray(group_ids, jnp.int32)
  stats = {}
  total = None
  for name in sorted(rewards):
    values = jnp.asarray(rewards[name], jnp.float32)
    if values.ndim != 1 or values.shape != group_ids.shape:
      raise ValueError(
        f"reward {name!r} has shape {values.shape}; expected [B] = {group_ids.shape}."
      )
    normalized, (mean_g, std_g, range_g, count) = group_normalize(
      values, group_ids, num_groups, eps=eps, ddof=ddof
    )
    if std == "batch":
      normalized = values - mean_g[group_ids]
    term = jnp.asarray(weights[name], jnp.float32) * normalized
    total = term if total is None else total + term
    nonempty = (count > 0).astype(jnp.float32)
    n_groups = jnp.maximum(nonempty.sum(), 1.0)
    stats[f"{name}/mean"] = values.mean()
    stats[f"{name}/std"] = values.std()
    stats[f"{name}/group_std_mean"] = (std_g * nonempty).sum() / n_groups
    stats[f"{name}/group_range_mean"] = (range_g * nonempty).sum() / n_groups
    stats[f"{name}/zero_std_frac"] = ((range_g == 0) * nonempty).sum() / n_groups
  advantages = total
  if std == "batch":
    advantages = advantages / (advantages.std(ddof=ddof) + eps)
  if whiten:
    advantages = (advantages - advantages.mean()) / (advantages.std(ddof=ddof) + eps)
  stats["advantage/zero_frac"] = (advantages == 0).mean()
  if clip is not None:
    stats["advantage/clip_frac"] = (jnp.abs(advantages) > clip).mean()
    advantages = jnp.clip(advantages, -clip, clip)
  else:
    stats["advantage/clip_frac"] = jnp.zeros((), jnp.float32)
  stats["advantage/mean"] = advantages.mean()
  stats["advantage/std"] = advantages.std()
  stats["advantage/abs_mean"] = jnp.abs(advantages).mean()
  return advantages, stats


# --- reward shaping for near-constant rewards (host-side) ------------------------------------


def threshold_penalty(values, threshold: float) -> np.ndarray:
  """-max(0, threshold - R): 0 at or above the threshold, so a reward that is already high
  (preservation ~0.9 with little spread) only penalises real drops instead of rewarding
  "preserve more" through its jitter."""
  values = np.asarray(values, np.float32)
  return -np.maximum(0.0, threshold - values)


def readable_groups(values, group_ids, floor: float) -> np.ndarray:
  """bool [B]: the sample's prompt group has some score >= floor. For a face-identity score, a
  group that never reaches the floor is one where the oracle read no face: its spread is noise."""
  values = np.asarray(values, np.float32)
  group_ids = np.asarray(group_ids)
  best = np.full(group_ids.max() + 1, -np.inf, np.float32)
  np.maximum.at(best, group_ids, values)
  return best[group_ids] >= floor


def permute_within_groups(values, group_ids, seed) -> np.ndarray:
  """`values` [B] shuffled among the samples of each group (a placebo: the same advantages per
  prompt, no longer tied to the samples that earned them)."""
  values = np.asarray(values)
  group_ids = np.asarray(group_ids)
  rng = np.random.default_rng(seed)
  out = values.copy()
  for g in np.unique(group_ids):
    members = np.flatnonzero(group_ids == g)
    out[members] = values[rng.permutation(members)]
  return out
