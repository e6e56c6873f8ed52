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

# name -> overrides of configs/grpo_t2i.py:tiny. 'high_noise' is the default run (K=3 of the
# first 5 of 10 steps, weighted toward high noise); 'uniform' draws its K=3 from all 10 steps.
VARIANTS = {
  "high_noise": {},
  "uniform": {"rl.timesteps.strategy": "uniform"},
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
  name: str,
  init_from: str,
  iterations: int,
  num_t2i: int,
  eval_base: bool = True,
  overrides=(),
):
  """configs/grpo_t2i.py:tiny with `overrides` ((key, value) pairs for every variant, e.g. the
  notebooks' micro sizes), then the variant's own; `eval_base`: evaluate at step 0."""
  from configs import grpo_t2i  # the repo's config directory: run from the repo root

  c = grpo_t2i.get_config("tiny")
  c.update_from_flattened_dict(dict(overrides))
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


def summary(workdir: str, names) -> list[dict]:
  """One row per variant: its timestep strategy and CFG mode, the training composite reward at
  the last evaluation, the held-out oracle T2I score of the base and after training (None while
  a variant is incomplete)."""
  runs = {name: _results(os.path.join(workdir, name)) for name in names}
  # The base is evaluated once (by the first variant that ran); all variants share it.
  base = [r[0]["t2i"]["overall"] for r in runs.values() if 0 in r]
  rows = []
  for name in names:
    with open(os.path.join(workdir, name, "config.json")) as f:
      config = json.load(f)
    results = runs[name]
    row = dict(
      variant=name,
      timesteps=config["rl"]["timesteps"]["strategy"],
      cfg_mode=config["rl"]["cfg_mode"],
      train_reward=None,
      before=None,
      after=None,
    )
    if base and results and max(results) > 0:
      last = results[max(results)]
      row.update(
        train_reward=last.get("rewards", {}).get("composite/mean", float("nan")),
        before=base[0],
        after=last["t2i"]["overall"],
      )
    rows.append(row)
  return rows


def table(workdir: str, names) -> str:
  rows = [
    "| variant | timesteps | CFG mode | training composite reward | held-out oracle T2I "
    "(before -> after) | change |",
    "|---|---|---|---|---|---|",
  ]
  for r in summary(workdir, names):
    if r["after"] is None:
      rows.append(f"| {r['variant']} | (incomplete) | | | | |")
      continue
    rows.append(
      f"| {r['variant']} | {r['timesteps']} | {r['cfg_mode']} | {r['train_reward']:.3f} "
      f"| {r['before']:.3f} -> {r['after']:.3f} | {r['after'] - r['before']:+.3f} |"
    )
  return "\n".join(rows)


def run_variants(
  workdir: str, names, init_from: str, iterations: int, num_t2i: int, overrides=()
) -> list[dict]:
  """Train every variant in WORKDIR/<variant> (a finished one is skipped), then return
  `summary`'s rows. Every variant's config is checked (ConfigError naming the variant) before
  the first one trains; an unknown name raises KeyError."""
  from qwen_image_rl import config_lib, runner, trainers
  from qwen_image_rl.trainers.common import final_checkpoint_exists

  unknown = sorted(set(names) - set(VARIANTS))
  if unknown:
    raise KeyError(f"unknown variants {unknown}; known: {list(VARIANTS)}")
  configs = {
    name: variant_config(name, init_from, iterations, num_t2i, i == 0, overrides)
    for i, name in enumerate(names)
  }
  for name, config in configs.items():
    try:
      trainers.validate(config)
    except config_lib.ConfigError as e:
      raise config_lib.ConfigError(f"variant {name}: {e}") from e
  for name, config in configs.items():
    run_dir = os.path.join(workdir, name)
    if final_checkpoint_exists(run_dir, config.total_steps):
      print(f"== {name}: final checkpoint exists in {run_dir}, skipped", flush=True)
      continue
    start = time.time()
    print(f"== {name}: {dict(VARIANTS[name]) or 'defaults'} -> {run_dir}", flush=True)
    runner.run(config, run_dir)
    print(f"== {name}: {time.time() - start:.0f} s", flush=True)
  return summary(workdir, names)


def main(argv):
  del argv
  from qwen_image_rl import config_lib

  try:
    run_variants(FLAGS.workdir, FLAGS.variants, FLAGS.init_from, FLAGS.iterations, FLAGS.num_t2i)
  except (config_lib.ConfigError, KeyError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(table(FLAGS.workdir, FLAGS.variants), flush=True)


if __name__ == "__main__":
  from qwen_image_rl import host_memory

  host_memory.tune_malloc()
  _define_flags()
  app.run(main)
