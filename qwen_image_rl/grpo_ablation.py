"""The tiny-world GRPO ablation: timestep strategies and CFG modes, reward model vs oracle.

  python -m qwen_image_rl.grpo_ablation --init_from=runs/demo/base/export/pipeline \
      --workdir=runs/ablation [--iterations=20] [--variants=high_noise,all]

Runs `configs/grpo_t2i.py:tiny` once per variant (each in WORKDIR/<variant>, skipped when its
final checkpoint exists, so an interrupted ablation resumes). Every variant starts from the same
base and eval settings, so only the first one evaluates the base. Then prints a markdown table: the
training composite reward (mean of the last iterations, the "reward model's" view) next to the
held-out oracle T2I score before and after, the "human's" view. A variant whose reward rises
while the oracle does not is reward hacking.
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags

FLAGS = flags.FLAGS

# name -> overrides of configs/grpo_t2i.py:tiny. 'high_noise' is the default run.
VARIANTS = {
  "high_noise": {},
  "all": {"rl.timesteps.strategy": "all"},
  "cfg_both": {"rl.cfg_mode": "both"},
  "cfg_none": {"rl.cfg_mode": "none"},
}


def _define_flags():
  flags.DEFINE_string("workdir", "runs/ablation", "One subdirectory per variant.")
  flags.DEFINE_string("init_from", "runs/demo/base/export/pipeline", "The base pipeline.")
  flags.DEFINE_integer("iterations", 20, "GRPO iterations per variant.")
  flags.DEFINE_integer("num_t2i", 128, "Held-out prompts scored before and after.")
  flags.DEFINE_list("variants", list(VARIANTS), f"Subset of {list(VARIANTS)}.")


def variant_config(
  name: str, init_from: str, iterations: int, num_t2i: int, eval_base: bool = True
):
  """configs/grpo_t2i.py:tiny with the variant's overrides; `eval_base`: evaluate at step 0."""
  from configs import grpo_t2i  # the repo's config directory: run from the repo root

  c = grpo_t2i.get_config("tiny")
  c.init_from = init_from
  c.total_steps = iterations
  c.eval.update(dict(num_t2i=num_t2i, num_edits=0, every=0, at_start=eval_base))
  c.update_from_flattened_dict(VARIANTS[name])
  if c.rl.timesteps.strategy == "all":  # every step is trained
    c.rl.timesteps.num_train = c.rl.timesteps.first_m = c.rl.num_steps
  return c


def _results(run_dir: str) -> dict[int, dict]:
  directory = os.path.join(run_dir, "results")
  out = {}
  for f in os.listdir(directory) if os.path.isdir(directory) else []:
    if f.startswith("eval_") and f.endswith(".json"):
      with open(os.path.join(directory, f)) as fh:
        out[int(f[5:-5])] = json.load(fh)
  return out


def table(workdir: str, names) -> str:
  rows = [
    "| variant | timesteps | CFG mode | training composite reward | held-out oracle T2I "
    "(before -> after) | change |",
    "|---|---|---|---|---|---|",
  ]
  runs = {name: _results(os.path.join(workdir, name)) for name in names}
  # The base is evaluated once (by the first variant that ran); all variants share it.
  base = [r[0]["t2i"]["overall"] for r in runs.values() if 0 in r]
  for name in names:
    with open(os.path.join(workdir, name, "config.json")) as f:
      config = json.load(f)
    results = runs[name]
    if not base or not results or max(results) == 0:
      rows.append(f"| {name} | (incomplete) | | | | |")
      continue
    before, after = base[0], results[max(results)]["t2i"]["overall"]
    reward = results[max(results)].get("rewards", {}).get("composite/mean", float("nan"))
    rows.append(
      f"| {name} | {config['rl']['timesteps']['strategy']} | {config['rl']['cfg_mode']} "
      f"| {reward:.3f} | {before:.3f} -> {after:.3f} | {after - before:+.3f} |"
    )
  return "\n".join(rows)


def main(argv):
  del argv
  from qwen_image_rl import config_lib, runner, trainers
  from qwen_image_rl.trainers.common import final_checkpoint_exists

  unknown = sorted(set(FLAGS.variants) - set(VARIANTS))
  if unknown:
    print(f"error: unknown variants {unknown}; known: {list(VARIANTS)}", file=sys.stderr)
    sys.exit(2)
  configs = {
    name: variant_config(name, FLAGS.init_from, FLAGS.iterations, FLAGS.num_t2i, eval_base=(i == 0))
    for i, name in enumerate(FLAGS.variants)
  }
  for name, config in configs.items():  # every variant is checked before the first one runs
    try:
      trainers.validate(config)
    except config_lib.ConfigError as e:
      print(f"error: variant {name}: {e}", file=sys.stderr)
      sys.exit(2)
  for name, config in configs.items():
    run_dir = os.path.join(FLAGS.workdir, name)
    if final_checkpoint_exists(run_dir, config.total_steps):
      print(f"== {name}: final checkpoint exists in {run_dir}, skipped", flush=True)
      continue
    start = time.time()
    print(f"== {name}: {dict(VARIANTS[name]) or 'defaults'} -> {run_dir}", flush=True)
    runner.run(config, run_dir)
    print(f"== {name}: {time.time() - start:.0f} s", flush=True)
  print(table(FLAGS.workdir, FLAGS.variants), flush=True)


if __name__ == "__main__":
  from qwen_image_rl import host_memory

  host_memory.tune_malloc()
  _define_flags()
  app.run(main)
