"""How much signal one GRPO batch carries: agreement of policy gradients from independent batches.

  python benchmarks/grpo_grad_snr.py --init_from=runs/demo/base/export/pipeline --batches=6 \
      [--set rl.noise_level=1.2 --set rl.timesteps.num_train=1 ...]

At fixed parameters, each of `--batches` iterations draws its own prompts and rollouts and the
GRPO gradient g_i is computed (no update). With g_i = s + n_i (signal plus independent noise),
the mean pairwise cosine is about |s|^2 / (|s|^2 + |n|^2), the fraction of a batch's gradient
that is signal. Dividing by the seconds per batch gives a rate to compare settings that cost
different amounts. The same rollouts are scored with several advantage estimators:
  gdpo      per-reward group normalisation, then the category-weighted sum (the trainer's);
  grpo      category-weighted composite, then group normalisation (vanilla GRPO);
  centred   category-weighted composite minus its group mean, no division by the group std,
            scaled by one batch-wide std (groups with little spread get little weight).
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


def parse_value(text: str):
  for cast in (int, float):
    try:
      return cast(text)
    except ValueError:
      pass
  return {"true": True, "false": False}.get(text.lower(), text)


def advantage_variants(scores, names, weights, group_ids, num_groups):
  from qwen_image_rl.rl.advantages import gdpo_advantages, group_normalize
  gdpo, _ = gdpo_advantages({n: scores[n] for n in names}, weights, group_ids, num_groups)
  composite = sum(np.asarray(weights[n]) * scores[n] for n in names)
  grpo, _ = group_normalize(composite, group_ids, num_groups)
  centred = composite - np.asarray(
      jax.ops.segment_sum(composite, group_ids, num_groups) / np.bincount(group_ids))[group_ids]
  centred = centred / (centred.std() + 1e-8)
  group_range = (np.asarray(jax.ops.segment_max(composite, group_ids, num_groups))
                 - np.asarray(jax.ops.segment_min(composite, group_ids, num_groups)))
  out = {"gdpo": np.asarray(gdpo), "grpo": np.clip(np.asarray(grpo), -5, 5), "centred": centred}
  for threshold in (0.05, 0.1):
    keep = (group_range >= threshold)[group_ids]
    out[f"gdpo_range>={threshold}"] = np.where(keep, np.asarray(gdpo), 0.0)
  return out


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--init_from", required=True)
  parser.add_argument("--config", default="grpo_t2i", choices=("grpo_t2i", "grpo_edit"))
  parser.add_argument("--batches", type=int, default=6)
  parser.add_argument("--set", action="append", default=[],
                      help="config override key=value, e.g. rl.noise_level=1.2")
  args = parser.parse_args()

  from configs import grpo_edit, grpo_t2i
  from qwen_image_rl import parallel
  from qwen_image_rl.rl import grpo as rl_grpo
  from qwen_image_rl.rl import reward_setup
  from qwen_image_rl.rl import rollout as rl_rollout
  from qwen_image_rl.rl.advantages import contiguous_group_ids, sample_weights
  from qwen_image_rl.rewards.async_pipeline import AsyncRewardPipeline
  from qwen_image_rl.trainers import grpo

  c = (grpo_t2i if args.config == "grpo_t2i" else grpo_edit).get_config("tiny")
  c.init_from = args.init_from
  c.data.num_prompts = 1024
  c.update_from_flattened_dict({k: parse_value(v) for k, v in
                                (s.split("=", 1) for s in args.set)})
  rl = c.rl
  pipe = grpo.load_base(c)
  reward_fn = reward_setup.build_reward(c)
  names = tuple(reward_fn.names)
  weights = reward_setup.category_weights(c)
  cats = tuple(sorted(weights))
  table = reward_setup.weight_table(weights, cats, names)
  pool = grpo.build_pool(c, pipe)
  mesh = parallel.make_mesh(dict(c.mesh))
  rules = tuple(tuple(r) for r in c.logical_axis_rules)
  params = pipe.transformer_params
  roller = grpo.Roller(c, pipe, pool, reward_fn, mesh, rules)
  img_shapes = tuple(tuple(int(v) for v in s) for s in roller.img_shapes)
  grad_fn = jax.jit(lambda p, b: rl_grpo.grpo_grads(
      p, pipe.transformer, b, cfg_mode=rl.cfg_mode, clip_eps=rl.clip_eps,
      noise_level=rl.noise_level, cfg_scale=rl.cfg_scale, img_shapes=img_shapes)[0])
  groups = contiguous_group_ids(roller.batch, rl.group_size)
  grads = {}
  seconds, rewards, spreads = [], [], []
  with AsyncRewardPipeline(reward_fn, max_pending=4) as pipeline:
    for it in range(args.batches + 1):  # batch 0 compiles and is not timed
      t0 = time.perf_counter()
      got = roller.collect(params, jax.random.key(1000 + it), 1000 + it, pipeline)
      cat_ids = np.array([cats.index(pool.categories[i]) for i in got.pool_index], np.int32)
      w = {k: np.asarray(v) for k, v in sample_weights(cat_ids, table, names).items()}
      composite = sum(w[n] * got.scores[n] for n in names).reshape(-1, rl.group_size)
      rewards.append(float(composite.mean()))
      spreads.append((float(composite.std(axis=1).mean()), float(composite.mean(axis=1).std())))
      inputs = roller.policy_inputs(got.pool_index)
      old = rl_rollout.recompute_old_log_probs(
          pipe.transformer, params, got.result, **inputs, cfg_mode=rl.cfg_mode,
          cfg_scale=rl.cfg_scale, noise_level=rl.noise_level, img_shapes=roller.img_shapes,
          rules=rules)
      if not rl_rollout.policy_is_guided(rl.cfg_mode):
        inputs.update(neg_cond=None, neg_mask=None)
      for variant, adv in advantage_variants(got.scores, names, w, groups,
                                             rl.prompts_per_step).items():
        batch = rl_rollout.rollout_batch(got.result, **inputs,
                                         advantages=jnp.asarray(adv, jnp.float32),
                                         old_log_probs=old)
        flat = jnp.concatenate([g.ravel() for g in jax.tree.leaves(grad_fn(params, batch))])
        if variant == "gdpo":
          flat.block_until_ready()
          if it > 0:
            seconds.append(time.perf_counter() - t0)
        grads.setdefault(variant, []).append(np.asarray(flat, np.float64))
  print(f"settings: {' '.join(args.set) or '(defaults)'}; batch {roller.batch} = "
        f"{rl.prompts_per_step} x G={rl.group_size}, {rl.num_steps} steps, K="
        f"{rl.timesteps.num_train} ({rl.timesteps.strategy}), noise {rl.noise_level}, "
        f"cfg_mode {rl.cfg_mode}; composite reward {np.mean(rewards):.3f}, its std within "
        f"groups {np.mean([a for a, _ in spreads]):.3f}, of group means "
        f"{np.mean([b for _, b in spreads]):.3f}")
  sec = float(np.median(seconds))
  for variant, gs in grads.items():
    # Adam divides each coordinate by its RMS; the cosine after that division is what its
    # update direction sees. Under pure noise both cosines average 0 (sign symmetry).
    rms = np.sqrt(np.mean(np.square(gs), axis=0)) + 1e-30
    for label, vs in (("raw", gs), ("per-coord", [g / rms for g in gs])):
      cos = [a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
             for a, b in itertools.combinations(vs, 2)]
      print(f"  {variant:8s} {label:9s} mean pairwise cosine {np.mean(cos):+.4f} "
            f"(+-{np.std(cos) / np.sqrt(len(cos)):.4f}); {sec:.2f} s per batch (median)")


if __name__ == "__main__":
  main()
