"""What keeps a pipeline's samples from strict success, check by check, against its VAE's ceiling.

  python benchmarks/strict_blockers.py --pipeline=WORKDIR/base/export/pipeline [--n=256]
      [--vae=DIR] [--json=PATH]

Samples the held-out eval prompts (the eval config's val split, seed 0, CFG 4, 20 steps), and
encodes + decodes the same prompts' renders with the pipeline's VAE (or --vae). For each
category and kind of item-level check (oracle.check_kind: every shape's colour pooled as
'shape/colour') it prints the fraction of prompts that pass it in the renders, in the VAE's
reconstructions (what any generator in that latent space can reach) and in the samples, and
the fraction of samples that fail this kind alone (`only_failure`: strict success if this one
kind were fixed). A strict rate is a conjunction, so the table shows which checks to work on.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def blockers(images, specs, categories) -> dict:
  from qwen_image_rl import evaluation
  from qwen_image_rl.data import oracle

  scores, checks = oracle.score_and_check_t2i_batch(images, specs)
  return evaluation.summarise_t2i(scores, categories, checks)


def table(columns: dict) -> str:
  """Markdown: one row per category/check kind; pass rates per column, then the samples' only-
  failure share. `columns` {name: summarise_t2i output}, the samples last."""
  names = list(columns)
  samples = columns[names[-1]]
  lines = [
    "| check | " + " | ".join(f"pass: {n}" for n in names) + f" | only failure ({names[-1]}) |",
    "|---" * (len(names) + 2) + "|",
  ]
  for category in samples["strict_by_category"]:
    cells = [f"{columns[n]['strict_by_category'][category]:.3f}" for n in names]
    lines.append(f"| **{category}: strict** | " + " | ".join(cells) + " | |")
    kinds = sorted(k for k in samples["check_pass"] if k.startswith(category + "/"))
    for kind in kinds:
      cells = [f"{columns[n]['check_pass'].get(kind, float('nan')):.2f}" for n in names]
      only = samples["only_failure"][kind]
      lines.append(f"| {kind} | " + " | ".join(cells) + f" | {only:.3f} |")
  overall = [f"{columns[n]['strict']:.3f}" for n in names]
  lines.append("| **strict, mean over categories** | " + " | ".join(overall) + " | |")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--pipeline", required=True, help="an exported pipeline or its workdir")
  parser.add_argument("--vae", default=None, help="default: the pipeline's own vae/")
  parser.add_argument("--n", type=int, default=256, help="held-out prompts (4 categories)")
  parser.add_argument("--json", default=None, help="also write every column's summary here")
  args = parser.parse_args(argv)
  if args.n < 4:
    parser.error(f"--n={args.n}: need at least one prompt per category (4)")

  from configs import common as config_common
  from qwen_image_rl import evaluation, sample_grid
  from qwen_image_rl.pipelines.common import require_pipeline_dir

  try:
    pipeline = require_pipeline_dir(args.pipeline, "--pipeline", FileNotFoundError)
  except FileNotFoundError as e:
    parser.error(str(e))
  vae = args.vae or os.path.join(pipeline, "vae")
  if not os.path.isfile(os.path.join(vae, "config.json")):
    parser.error(f"--vae={vae!r} has no config.json (pass an exported vae/ directory)")
  import vae_ceiling

  cfg = config_common.tiny_eval(args.n, 0)
  t2i, _ = evaluation.eval_sets(cfg, seed=0)
  t2i_pipe, _ = sample_grid.load_pipelines(pipeline)
  print(f"sampling {args.n} held-out prompts with {pipeline} ...", flush=True)
  samples = evaluation.sample_t2i(t2i_pipe, t2i.prompts, cfg, seed=0)
  columns = {
    "renders": blockers(t2i.images, t2i.specs, t2i.categories),
    "VAE reconstructions": blockers(
      vae_ceiling.reconstruct(vae, t2i.images), t2i.specs, t2i.categories
    ),
    "samples": blockers(samples, t2i.specs, t2i.categories),
  }
  print(table(columns), flush=True)
  if args.json:
    keep = ("strict", "strict_by_category", "check_pass", "only_failure", "failed_kinds")
    with open(args.json, "w") as f:
      json.dump({n: {k: c[k] for k in keep} for n, c in columns.items()}, f, indent=1)


if __name__ == "__main__":
  main()
