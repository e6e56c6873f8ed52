"""A policy's held-out alignment under the GRPO training sampler vs the same steps without noise.

  python benchmarks/rl_sampler_gap.py --policy=runs/demo/base/export/pipeline \
      --policy=runs/curves_t2i/grpo/export/pipeline [--batches=4] [--noise=0.8,0]

GRPO trains the SDE sampler (rl.noise_level, rl.num_steps, CFG), while the evaluation and the
product sample the deterministic ODE. This rolls out val-split prompts (with their scene specs,
so the oracle scores them) through the trainer's own roller (rl/iteration.py) at each noise
level, noise 0 being the plain Euler ODE over the same steps, and prints the mean oracle
alignment per category and noise level for every policy. Each batch draws 8 prompts x G=8 from a
fixed pool of 256, every rollout with its own x_T (so that noise 0 gives 64 distinct images);
every policy and noise level sees the same prompts and initial noise.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import numpy as np


def alignment_by_category(policy: str, prompt_file: str, noise: float, batches: int) -> dict:
  from configs import grpo_t2i
  from qwen_image_rl import parallel
  from qwen_image_rl.rl import iteration

  c = grpo_t2i.get_config("tiny")
  c.init_from = policy
  c.data.prompt_file = prompt_file
  c.rl.noise_level = noise
  c.rl.async_rewards = False
  c.rl.shared_initial_noise = False  # at noise 0 a group sharing x_T would be one image 8 times
  mesh = parallel.make_mesh(dict(c.mesh))
  s = iteration.setup(c, mesh, parallel.as_rules(c.logical_axis_rules))
  categories, alignment = [], []
  with iteration.make_reward_pipeline(c, s.reward_fn) as rewards:
    for i in range(batches):
      got = iteration.roll_out(s, s.pipe.transformer_params, jax.random.key(1000 + i), i, rewards)
      categories += iteration.sample_categories(s, got)
      alignment += [float(a) for a in np.asarray(got.scores["alignment"])]
  categories, alignment = np.array(categories), np.array(alignment)
  out = {
    str(k): round(float(alignment[categories == k].mean()), 3) for k in sorted(set(categories))
  }
  out["mean"] = round(float(np.mean(list(out.values()))), 3)
  out["n"] = len(alignment)
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--policy", action="append", required=True, help="pipeline dirs")
  parser.add_argument("--noise", default="0.8,0", help="comma-separated rl.noise_level values")
  parser.add_argument("--batches", type=int, default=4)
  parser.add_argument("--num_prompts", type=int, default=256)
  args = parser.parse_args()
  for policy in args.policy:
    if not os.path.isdir(policy):
      raise SystemExit(f"--policy={policy!r}: no such directory")
  from qwen_image_rl.data import examples

  noises = [float(x) for x in args.noise.split(",")]
  with tempfile.TemporaryDirectory() as tmp:
    prompt_file = os.path.join(tmp, "val_prompts.jsonl")
    examples.write_t2i_prompt_file(prompt_file, 0, args.num_prompts, "val", 64)
    for policy in args.policy:
      for noise in noises:
        row = alignment_by_category(policy, prompt_file, noise, args.batches)
        print(json.dumps(dict(policy=policy, noise_level=noise, alignment=row)), flush=True)


if __name__ == "__main__":
  main()
