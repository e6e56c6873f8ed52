"""How far a judge that reads content exactly gets with the oracle's alignment and instruction.

  python benchmarks/alignment_ceiling.py [--n=256] [--split=val] [--json=PATH]

`judge_eval`'s held-out images (the same set: n/2 specs x 2 draws, seed 1) are renders of a
scene, many of them noised, blurred, recoloured or with a distorted face. The oracle scores
alignment by detecting the prompt's objects in the pixels, so a corruption that hides a small
shape from its detectors lowers the score as a missing shape would. The `content_exact` reader
scores each image by the oracle on a clean render of the scene it shows: it knows the content
exactly and ignores the pixels, which is what "does the image show what the prompt asks for"
means for a judge. Its Spearman with the oracle, over all images and per category, is how much
of the held-out ranking is content; the rest is the oracle's detectors failing on corrupted
pixels (per kind: the mean oracle score and the content reader's). `judge_eval` reports each
judge's Spearman over the exact renders alone (`exact_renders`), where the two coincide.
"""

from __future__ import annotations

import argparse
import json

import numpy as np


def spearman(a, b) -> float:
  from qwen_image_rl import judge_eval

  return round(judge_eval.correlations(a, b)[0], 4)


def summary(content, oracle, kinds, categories) -> dict:
  kinds, categories = np.asarray(kinds), np.asarray(categories)
  return {
    "n": len(oracle),
    "spearman": spearman(content, oracle),
    "by_category": {
      c: spearman(content[categories == c], oracle[categories == c])
      for c in sorted(set(categories.tolist()))
    },
    "by_kind": {
      k: {
        "n": int((kinds == k).sum()),
        "oracle": round(float(oracle[kinds == k].mean()), 4),
        "content_exact": round(float(content[kinds == k].mean()), 4),
      }
      for k in sorted(set(kinds.tolist()))
    },
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--n", type=int, default=256, help="held-out images (n/2 specs x 2)")
  parser.add_argument("--split", default="val", choices=("val", "test"))
  parser.add_argument("--seed", type=int, default=1, help="judge_eval's held-out draws")
  parser.add_argument("--json", default="", help="also write the results here")
  args = parser.parse_args()

  from qwen_image_rl import judge_eval, paths
  from qwen_image_rl.data import oracle, render

  t2i, edits = judge_eval.held_out_sets(args.split, args.n, args.seed)
  clean = render.render_batch(list(t2i.shown), t2i.images.shape[1])
  content = np.array([oracle.score_t2i(im, spec)["overall"] for im, spec in zip(clean, t2i.specs)])
  clean_outputs = render.render_batch(list(edits.shown), edits.images.shape[1])
  edit_content = np.array(
    [
      oracle.score_edit(source, output, edit)["instruction_following"]
      for source, output, edit in zip(edits.sources, clean_outputs, edits.edits)
    ]
  )
  results = {
    "split": args.split,
    "alignment": summary(content, t2i.scores("alignment"), t2i.kinds, t2i.categories),
    "instruction": summary(
      edit_content, edits.scores("instruction"), edits.kinds, edits.categories
    ),
  }
  line = json.dumps(results)
  print(line, flush=True)
  if args.json:
    paths.write_text_atomic(args.json, line + "\n")


if __name__ == "__main__":
  main()
