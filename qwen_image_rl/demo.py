"""`make demo`: every stage of the tiny pipeline that exists, each in WORKDIR/<stage>/.

  python -m qwen_image_rl.demo --workdir=runs/demo

Stages run in order and a stage whose final checkpoint is already in its workdir is skipped, so
an interrupted demo resumes where it stopped (a stage itself resumes from its last checkpoint).
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time

from absl import app, flags

FLAGS = flags.FLAGS


def _define_flags():
  # Defined only when run as a program: `qwen_image_rl.main` owns --workdir in other processes.
  flags.DEFINE_string("workdir", "runs/demo", "Where every stage writes its run.")
  flags.DEFINE_list("stages", None, "Run only these stages (default: all).")


def _config(module: str, variant: str):
  # `configs` is the repo's config directory: run from the repo root, as `main` is.
  return importlib.import_module(f"configs.{module}").get_config(variant)


def stages(workdir: str):
  """(name, config) for every stage, with the links between them filled in."""
  vae = _config("vae", "tiny")
  base = _config("sft", "tiny")
  base.model.vae_from = os.path.join(workdir, "vae", "export", "vae")
  return [("vae", vae), ("base", base)]


def run_stage(name: str, config, workdir: str):
  from qwen_image_rl import runner
  from qwen_image_rl.trainers.common import final_checkpoint_exists

  stage_dir = os.path.join(workdir, name)
  if final_checkpoint_exists(stage_dir, config.total_steps):
    print(f"== {name}: final checkpoint exists in {stage_dir}, skipping", flush=True)
    return
  print(f"== {name}: {config.trainer} -> {stage_dir}", flush=True)
  start = time.time()
  runner.run(config, stage_dir)
  print(f"== {name}: done in {time.time() - start:.0f} s", flush=True)


def summary(workdir: str) -> str:
  """The latest results of each stage as a small table."""
  lines = []
  for name in sorted(os.listdir(workdir)) if os.path.isdir(workdir) else []:
    results = os.path.join(workdir, name, "results")
    if not os.path.isdir(results):
      continue
    files = sorted((f for f in os.listdir(results) if f.startswith("eval_")),
                   key=lambda f: int(f[5:-5]))
    if files:
      with open(os.path.join(results, files[-1])) as f:
        lines.append(f"{name:>8} {files[-1]}: " + json.dumps(json.load(f), sort_keys=True))
  return "\n".join(lines)


def main(argv):
  del argv
  workdir = FLAGS.workdir
  selected = FLAGS.stages
  all_stages = stages(workdir)
  unknown = set(selected or ()) - {n for n, _ in all_stages}
  if unknown:
    print(f"error: unknown stages {sorted(unknown)}; known: {[n for n, _ in all_stages]}",
          file=sys.stderr)
    sys.exit(2)
  start = time.time()
  for name, config in all_stages:
    if selected is None or name in selected:
      run_stage(name, config, workdir)
  print(f"== demo finished in {time.time() - start:.0f} s", flush=True)
  print(summary(workdir), flush=True)


if __name__ == "__main__":
  from qwen_image_rl import host_memory

  host_memory.tune_malloc()
  _define_flags()
  app.run(main)
