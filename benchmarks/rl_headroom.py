"""What a policy's own groups of samples hold for RL to find: mean vs best-of-G under the oracle.

  python benchmarks/rl_headroom.py --policy=runs/demo/base/export/pipeline \
      [--task=t2i|edit] [--batches=16] [--group_size=8]

Reward-weighted objectives (GRPO, DiffusionNFT, AWM) move the policy toward the better samples
of each prompt's group. What they can reach in a few iterations is bounded by how much better
those samples are than the group mean: if every sample of a prompt scores alike, its group has
no signal to rank. This rolls out the forward objectives' training sampler (configs/rl_t2i.py or
rl_edit.py: ODE with CFG, independent x_T, the config's prompt pool) under `--policy` and prints
per category, over prompt groups of G samples:

  mean        the oracle metric's mean (T2I: capped alignment; edit: instruction following)
  best_of_G   the mean over groups of the best sample: a policy that always drew its group's
              best would score this
  top_quarter the mean over groups of the best G/4 samples: what a sharper reweighting reaches
  flat        the fraction of groups whose training composite reward spans no more than
              rl.curation.threshold (0.05): no ranking signal, what prompt curation drops

with bootstrap 95% intervals over groups for best_of_G - mean, and which reward the ranking
follows: each reward's share of the within-group variance of the weighted, shaped rewards the
advantages see (`rl/iteration.py: shaped_rewards`; covariances between rewards left out).

For edits it also prints where the ranking points: the within-group Spearman correlation of the
metric with closeness to the source (minus the mean absolute pixel difference of output and
source), averaged over the groups where both vary, with a bootstrap interval. Above 0, the
samples an objective moves toward are the ones that change the source less.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import numpy as np

METRIC = {"t2i": "alignment", "edit": "instruction_following"}


def build_config(policy: str, task: str, group_size: int):
  from configs import rl_edit, rl_t2i

  c = (rl_t2i if task == "t2i" else rl_edit).get_config("tiny")
  c.init_from = policy
  c.rl.async_rewards = False
  c.rl.group_size = group_size
  return c


def collect_groups(config, batches: int):
  """(categories [n_groups], metric [n_groups, G], composite [n_groups, G], {reward: weighted
  shaped reward [n_groups, G]}, closeness to the source [n_groups, G] or None for T2I) over
  `batches` rollout batches of the config's sampler."""
  from qwen_image_rl import parallel
  from qwen_image_rl.rl import iteration

  mesh = parallel.make_mesh(dict(config.mesh))
  s = iteration.setup(config, mesh, parallel.as_rules(config.logical_axis_rules))
  g = config.rl.group_size
  metric_name = METRIC[config.rl.task]
  categories, metric, composite, terms, closeness = [], [], [], {}, []
  with iteration.make_reward_pipeline(config, s.reward_fn) as rewards:
    for i in range(batches):
      got = iteration.roll_out(s, s.pipe.transformer_params, jax.random.key(2000 + i), i, rewards)
      cats = iteration.sample_categories(s, got)
      categories += cats[::g]
      metric.append(np.asarray(got.scores[metric_name], np.float64).reshape(-1, g))
      composite.append(iteration.composite_reward(s, got).astype(np.float64).reshape(-1, g))
      shaped, weights = iteration.shaped_rewards(s, got)
      for name in shaped:
        term = np.asarray(weights[name], np.float64) * np.asarray(shaped[name], np.float64)
        terms.setdefault(name, []).append(term.reshape(-1, g))
      if s.pool.sources is not None:
        sources = s.pool.sources[got.pool_index].astype(np.float64)
        diff = np.abs(got.images.astype(np.float64) - sources).mean(axis=(1, 2, 3))
        closeness.append(-diff.reshape(-1, g))
      print(f"batch {i + 1}/{batches}: {metric_name} {metric[-1].mean():.3f}", flush=True)
  terms = {name: np.concatenate(parts) for name, parts in terms.items()}
  closeness = np.concatenate(closeness) if closeness else None
  return np.array(categories), np.concatenate(metric), np.concatenate(composite), terms, closeness


def variance_shares(terms: dict) -> dict:
  """{reward: its share of the summed within-group variance} of weighted rewards [n, G]."""
  within = {name: float(t.var(axis=1).sum()) for name, t in terms.items()}
  total = sum(within.values())
  return {name: round(v / total, 3) if total > 0 else float("nan") for name, v in within.items()}


def within_group_spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Spearman correlation of a and b [n, G] inside each group, for the groups where both vary."""
  from scipy.stats import rankdata

  keep = (np.ptp(a, axis=1) > 0) & (np.ptp(b, axis=1) > 0)
  ra, rb = rankdata(a[keep], axis=1), rankdata(b[keep], axis=1)
  ra, rb = ra - ra.mean(axis=1, keepdims=True), rb - rb.mean(axis=1, keepdims=True)
  return (ra * rb).sum(axis=1) / np.sqrt((ra**2).sum(axis=1) * (rb**2).sum(axis=1))


def bootstrap_ci(values: np.ndarray, draws: int = 2000, seed: int = 0) -> tuple[float, float]:
  rng = np.random.default_rng(seed)
  means = values[rng.integers(0, len(values), (draws, len(values)))].mean(axis=1)
  return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def headroom(metric: np.ndarray, composite: np.ndarray, flat_range: float) -> dict:
  """Statistics of groups [n, G] (see the module docstring); a group is flat when its composite
  spans at most `flat_range`, the rule of prompt curation (trainers/curate.py)."""
  g = metric.shape[1]
  ordered = np.sort(metric, axis=1)[:, ::-1]
  gap = ordered[:, 0] - metric.mean(axis=1)
  low, high = bootstrap_ci(gap)
  return dict(
    groups=int(len(metric)),
    mean=round(float(metric.mean()), 3),
    best_of_G=round(float(ordered[:, 0].mean()), 3),
    top_quarter=round(float(ordered[:, : max(1, g // 4)].mean()), 3),
    gap=round(float(gap.mean()), 3),
    gap_ci95=[round(low, 3), round(high, 3)],
    within_group_std=round(float(metric.std(axis=1).mean()), 3),
    flat=round(float((np.ptp(composite, axis=1) <= flat_range).mean()), 3),
  )


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--policy", required=True, help="an exported pipeline directory")
  parser.add_argument("--task", default="t2i", choices=tuple(METRIC))
  parser.add_argument("--batches", type=int, default=16)
  parser.add_argument("--group_size", type=int, default=8)
  args = parser.parse_args()
  if not os.path.isdir(args.policy):
    raise SystemExit(f"--policy={args.policy!r}: no such directory")
  if args.group_size < 2 or args.batches < 1:
    raise SystemExit("--group_size must be >= 2 and --batches >= 1")
  config = build_config(args.policy, args.task, args.group_size)
  categories, metric, composite, terms, closeness = collect_groups(config, args.batches)
  flat_range = float(config.rl.curation.threshold)
  rows = {
    str(c): headroom(metric[categories == c], composite[categories == c], flat_range)
    for c in sorted(set(categories))
  }
  rows["all"] = headroom(metric, composite, flat_range)
  for name, row in rows.items():
    keep = slice(None) if name == "all" else categories == name
    row["variance_share"] = variance_shares({k: t[keep] for k, t in terms.items()})
    if closeness is not None:
      rho = within_group_spearman(metric[keep], closeness[keep])
      low, high = bootstrap_ci(rho) if len(rho) else (float("nan"),) * 2
      row["copy_rho"] = round(float(rho.mean()), 3) if len(rho) else float("nan")
      row["copy_rho_ci95"] = [round(low, 3), round(high, 3)]
      row["copy_rho_groups"] = int(len(rho))
  print(
    json.dumps(
      dict(
        policy=args.policy,
        task=args.task,
        metric=METRIC[args.task],
        group_size=args.group_size,
        by_category=rows,
      )
    )
  )
  edit = closeness is not None
  print(
    f"\n| category | groups | mean | best of {args.group_size} | top quarter | "
    "best - mean [95% CI] | within-group std | flat groups | ranking variance by reward |"
    + (" metric vs closeness to the source, Spearman [95% CI] (groups) |" if edit else "")
  )
  print("|---|---|---|---|---|---|---|---|---|" + ("---|" if edit else ""))
  for name, r in rows.items():
    copy = ""
    if edit:
      low, high = r["copy_rho_ci95"]
      copy = f" {r['copy_rho']:+.3f} [{low:+.3f}, {high:+.3f}] ({r['copy_rho_groups']}) |"
    print(
      f"| {name} | {r['groups']} | {r['mean']:.3f} | {r['best_of_G']:.3f} | "
      f"{r['top_quarter']:.3f} | {r['gap']:+.3f} [{r['gap_ci95'][0]:+.3f}, "
      f"{r['gap_ci95'][1]:+.3f}] | {r['within_group_std']:.3f} | {r['flat']:.2f} | "
      + ", ".join(f"{k} {v:.2f}" for k, v in r["variance_share"].items())
      + " |"
      + copy
    )


if __name__ == "__main__":
  main()
