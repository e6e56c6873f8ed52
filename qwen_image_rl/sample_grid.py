"""Samples side by side, and the oracle's soft / capped / strict scores of exported pipelines.

  python -m qwen_image_rl.sample_grid --pipelines=base=runs/demo/base/export/pipeline \
      [--pipelines=grpo=runs/grpo_t2i] [--pipelines=student=runs/demo/opd@1] \
      --out=assets/samples_grid.png [--n=8] [--split=test]
  python -m qwen_image_rl.sample_grid --pipelines=base=runs/demo/base --score_json=base.json

The grid has one row per source, 8 held-out test-split prompts per row: the world's own render
(the target) on top, then each pipeline's samples in the order given, with the eval's sampler
settings (configs/common.py tiny_eval: 20 steps, CFG 4; `DIR@CFG` samples that pipeline at
its own CFG scale, e.g. a CFG-free OPD student at 1). The cells are upscaled (nearest) so
a 64 px image stays legible. With --score_json, each pipeline is also evaluated like a training
run's eval (the val split's 128 prompts and 64 edits, or --num_t2i / --num_edits; the test split's
with --score_split=test) and the eval JSON of each is written there, keyed by name; every
pipeline after the first is also compared with the first on the same prompts and noise (T2I
capped and edit instruction following, the difference with its paired standard error,
`evaluation.paired_differences`).
"""

from __future__ import annotations

import copy
import json
import os

import numpy as np
from absl import app, flags

FLAGS = flags.FLAGS


def _define_flags():
  flags.DEFINE_multi_string(
    "pipelines", [], "name=DIR[@CFG]: an exported pipeline (or its workdir), its CFG scale."
  )
  flags.DEFINE_string("out", "", "Where to write the grid PNG ('' skips the grid).")
  flags.DEFINE_integer("n", 8, "Prompts in the grid.")
  flags.DEFINE_string("split", "test", "Split the grid's prompts come from.")
  flags.DEFINE_integer("seed", 0, "Seed of the grid's prompts and of sampling.")
  flags.DEFINE_integer("scale", 2, "Nearest-neighbour upscaling of each cell.")
  flags.DEFINE_string("score_json", "", "Also evaluate each pipeline; write here.")
  flags.DEFINE_enum(
    "score_split", "val", ["val", "test"], "--score_json: the held-out split it evaluates."
  )
  flags.DEFINE_integer("num_t2i", None, "--score_json: T2I prompts (default: tiny_eval's).")
  flags.DEFINE_integer("num_edits", None, "--score_json: edits (default: tiny_eval's).")


def parse_pipelines(entries) -> dict[str, str]:
  """{'name': directory} from 'name=DIR' entries; bad entries raise naming the problem."""
  out = {}
  for entry in entries:
    name, sep, directory = entry.partition("=")
    if not sep or not name or not directory:
      raise ValueError(f"--pipelines={entry!r}: expected name=DIR")
    if name in out:
      raise ValueError(f"--pipelines: name {name!r} given twice")
    out[name] = directory
  return out


def split_cfg(spec: str) -> tuple[str, float | None]:
  """'DIR@CFG' -> (DIR, CFG); 'DIR' -> (DIR, None): the eval's own CFG scale. The arena's
  syntax (arena.split_cfg), with a positive scale."""
  from qwen_image_rl import arena

  try:
    directory, scale = arena.split_cfg(spec)
  except ValueError as e:
    raise ValueError(f"--pipelines: {spec!r}: {e}") from None
  if not directory or (scale is not None and scale <= 0):
    raise ValueError(f"--pipelines: {spec!r}: expected DIR@CFG with a positive CFG scale")
  return directory, scale


def with_cfg_scale(cfg, scale: float | None):
  """A copy of the eval config `cfg` sampling at `scale` (None: unchanged)."""
  if scale is None:
    return cfg
  out = copy.deepcopy(cfg)
  out.cfg_scale = scale
  return out


def load_pipelines(directory: str):
  """(t2i, edit) pipelines sharing one set of components, from an export or its workdir."""
  from qwen_image_rl.rl.policy import load_exported

  return load_exported(directory, "--pipelines")


def grid_image(pipes: dict, cfgs: dict, n: int, split: str, seed: int, scale: int) -> np.ndarray:
  """pipes {name: (t2i, edit)}, cfgs {name: its eval config}."""
  from qwen_image_rl import evaluation, metrics
  from qwen_image_rl.data import examples

  image_size = next(iter(cfgs.values())).image_size
  prompts = examples.t2i_examples(seed + 7919, n, split, image_size)
  rows = [prompts.images]
  for name, (t2i, _) in pipes.items():
    rows.append(evaluation.sample_t2i(t2i, prompts.prompts, cfgs[name], seed))
  images = np.concatenate(rows)
  if scale > 1:
    images = images.repeat(scale, axis=1).repeat(scale, axis=2)
  return metrics.image_grid(images, n, pad=2, pad_value=255)


def score_config(num_t2i: int | None, num_edits: int | None, split: str = "val"):
  """The eval settings --score_json uses (tiny_eval's sampler; the grid ignores the counts and
  the split)."""
  from configs import common as config_common

  cfg = config_common.tiny_eval(num_t2i, num_edits)
  cfg.split = split
  return cfg


def format_paired(results: dict) -> str:
  """Each pipeline after the first minus the first: 'name - first: T2I +d (SE s), edit IF ...'."""
  from qwen_image_rl import evaluation

  names = list(results)
  lines = []
  for name in names[1:]:
    found = evaluation.paired_differences(results[name], results[names[0]])
    parts = [
      f"{label} {found[task][0]:+.3f} (paired SE {found[task][1]:.3f})"
      for task, label in (("t2i", "T2I capped"), ("edit", "edit IF"))
      if task in found
    ]
    lines.append(f"{name} - {names[0]}: " + ", ".join(parts))
  return "\n".join(lines)


def main(argv):
  del argv
  from PIL import Image

  from qwen_image_rl import evaluation

  named = parse_pipelines(FLAGS.pipelines)
  if not named:
    raise app.UsageError("give at least one --pipelines=name=DIR")
  specs = {name: split_cfg(spec) for name, spec in named.items()}
  pipes = {name: load_pipelines(d) for name, (d, _) in specs.items()}
  eval_cfg = score_config(FLAGS.num_t2i, FLAGS.num_edits, FLAGS.score_split)
  cfgs = {name: with_cfg_scale(eval_cfg, s) for name, (_, s) in specs.items()}
  if FLAGS.out:
    image = grid_image(pipes, cfgs, FLAGS.n, FLAGS.split, FLAGS.seed, FLAGS.scale)
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
    Image.fromarray(image).save(FLAGS.out, optimize=True)
    print(f"wrote {FLAGS.out} ({image.shape[1]}x{image.shape[0]})", flush=True)
  if FLAGS.score_json:
    results = {}
    for name, (t2i, edit) in pipes.items():
      results[name] = evaluation.evaluate(t2i, edit, cfgs[name], step=0, seed=0)
      print(f"== {name}\n{evaluation.format_table(results[name])}", flush=True)
    with open(FLAGS.score_json, "w") as f:
      json.dump(results, f, indent=1, sort_keys=True)
    print(format_paired(results), flush=True)


if __name__ == "__main__":  # run from the repository root, as `qwen_image_rl.main`
  _define_flags()
  app.run(main)
