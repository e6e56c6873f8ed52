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

from qwen_image_rl.rl.advantages import (  # noqa: E402
    contiguous_group_ids, gdpo_advantages, group_normalize)


def parse_value(text: str):
  for cast in (int, float):
    try:
      return cast(text)
    except ValueError:
      pass
  return {"true": True, "false": False}.get(text.lower(), text)


def advantage_variants(scores, names, weights, composite, group_ids, num_groups):
  """{variant: advantages [B]}; `composite` is the trainer's category-weighted reward [B]."""
  gdpo, _ = gdpo_advantages({n: scores[n] for n in names}, weights, group_ids, num_groups)
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
  from qwen_image_rl import host_memory, parallel
  from qwen_image_rl.rl import iteration
  from qwen_image_rl.rl.objectives import grpo

  host_memory.tune_malloc()
  c = (grpo_t2i if args.config == "grpo_t2i" else grpo_edit).get_config("tiny")
  c.init_from = args.init_from
  c.data.num_prompts = 1024
  c.rl.old_log_probs = "recompute"  # the ratio of each gradient as after a first update
  c.update_from_flattened_dict({k: parse_value(v) for k, v in
                                (s.split("=", 1) for s in args.set)})
  rl = c.rl
  # The trainer's set-up and iteration steps, as it calls them (qwen_image_rl/rl/iteration.py).
  mesh = parallel.make_mesh(dict(c.mesh))
  rules = parallel.as_rules(c.logical_axis_rules)
  s = iteration.setup(c, mesh, rules)
  names, params = s.names, s.pipe.transformer_params
  grad_fn = jax.jit(lambda p, b: grpo.grpo_grads(
      p, s.model, b, cfg_mode=rl.cfg_mode, clip_eps=rl.clip_eps, noise_level=rl.noise_level,
      cfg_scale=rl.cfg_scale, img_shapes=s.img_shapes)[0])
  groups = contiguous_group_ids(s.batch_size, rl.group_size)
  grads = {}
  seconds, rewards, spreads = [], [], []
  with iteration.make_reward_pipeline(c, s.reward_fn) as reward_pipeline:
    for it in range(args.batches + 1):  # batch 0 compiles and is not timed
      t0 = time.perf_counter()
      got = iteration.roll_out(s, params, jax.random.key(1000 + it), 1000 + it,
                               reward_pipeline)
      w = {k: np.asarray(v) for k, v in iteration.reward_weights(s, got).items()}
      composite = iteration.composite_reward(s, got)
      per_group = composite.reshape(-1, rl.group_size)
      rewards.append(float(per_group.mean()))
      spreads.append((float(per_group.std(axis=1).mean()), float(per_group.mean(axis=1).std())))
      inputs = s.roller.policy_inputs(got.pool_index)
      for variant, adv in advantage_variants(got.scores, names, w, composite, groups,
                                             rl.prompts_per_step).items():
        batch = s.objective.make_batch(s, params, got.result, inputs,
                                       jnp.asarray(adv, jnp.float32))
        with parallel.sharding_context(mesh, rules):  # as iteration.update's step
          grads = grad_fn(params, batch)
        flat = jnp.concatenate([g.ravel() for g in jax.tree.leaves(grads)])
        if variant == "gdpo":
          flat.block_until_ready()
          if it > 0:
            seconds.append(time.perf_counter() - t0)
        grads.setdefault(variant, []).append(np.asarray(flat, np.float64))
  print(f"settings: {' '.join(args.set) or '(defaults)'}; batch {s.batch_size} = "
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
