"""How much of the oracle's alignment the judge's vision tower reads, with no language model.

  python benchmarks/perception_match.py [--n=128] [--split=val] [--steps=400] [--bound]
      [--dense] [--dense_weight=W] [--json=PATH]

Pre-trains the judge's vision tower as configs/judge.py:tiny does (judges/perception.py: same
seed and settings, `--steps` aside) and keeps the bag-of-words head that the judge throws away.
Each held-out alignment image of `judge_eval` (the same set: n/2 specs x 2 draws, seed 1) is
then scored by fixed rules over the head's word probabilities p(w | image) for the words w of
its prompt: their mean, the mean of log p, and their minimum; the content_* rules read only the
words in at most 30% of the prompts (objects, colours, glyphs, positions; not "a", "with"). For
each rule it prints the Spearman correlation and pairwise accuracy with the oracle
(`judge_eval.correlation_metrics`, as the judge table reads them) and the mean score per kind of
image.

What it measures: whether the tower's content alone carries the alignment signal a judge is
asked for. A rule that matches prompt words against what the tower sees needs no learned
comparison; if it correlates with the oracle far better than the trained judges do, the
language model's comparison is the bottleneck; if not, perception is. A bag of words cannot
bind attributes to objects (which shape is red) or read counts, so it is a reference, not a
ceiling. --bound trains the tower with `perception.bound_targets` (pseudo-words such as 'red@01',
'red_circle') and adds the bound_* rules over the requested scene's pseudo-words, and the
pseudo-words' own AUCs: whether the tower binds. --dense trains with
`perception.dense_targets` (per image token the words of the objects it shows,
judges/dense_targets.py) and adds the dense_* rules: `dense_bound` (per requested object, the
mean log p of its words at the tokens its box covers, weighted by the share of the box in each;
the minimum over the objects; NaN for portraits), `dense_bound_mean` (the mean over the objects)
and `dense_bound_and_content` (dense_bound + log content_min_p; portraits: log content_min_p),
and the per-token words' held-out AUCs. `dense_bound_ideal` is dense_bound over an ideal head's
probabilities (each image's true per-token targets, smoothed: 0.01 + 0.98 t): what the rule
itself can reach; the gap to dense_bound is the tower's.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

RULES = ("mean_p", "mean_log_p", "min_p", "content_mean_log_p", "content_min_p")
# With --bound: the same rules over the requested scene's bound pseudo-words
# (perception.bound_words: which colour and size at which cell, the glyph in each slot).
BOUND_RULES = ("bound_mean_log_p", "bound_min_p")
# With --dense: the requested objects read at their places from the per-token head.
DENSE_RULES = ("dense_bound", "dense_bound_mean", "dense_bound_and_content", "dense_bound_ideal")
# Words in more than this share of the prompts ("a", "with", "portrait") say little about a
# scene: the content_* rules leave them out.
COMMON_WORD_SHARE = 0.3


def content_words(words, prompts) -> set[str]:
  """The `words` in at most COMMON_WORD_SHARE of `prompts`."""
  counts = collections.Counter(w for p in prompts for w in set(p.split()))
  return {w for w in words if counts[w] <= COMMON_WORD_SHARE * len(prompts)}


def log_and_min(p: np.ndarray) -> tuple[float, float]:
  """The mean log p (p clipped at 1e-6) and the minimum p of some words' probabilities."""
  return float(np.log(np.clip(p, 1e-6, 1.0)).mean()), float(p.min())


def rule_scores(word_probs: np.ndarray, words, prompts) -> dict[str, np.ndarray]:
  """Per image, each rule over p(w | image) for its prompt's words that the head knows (the
  content_* rules: only its `content_words`)."""
  column = {w: i for i, w in enumerate(words)}
  informative = content_words(words, prompts)
  out = {rule: np.full(len(prompts), np.nan, np.float32) for rule in RULES}
  for i, prompt in enumerate(prompts):
    known = [w for w in prompt.split() if w in column]
    content = [w for w in known if w in informative]
    for prefix, chosen in (("", known), ("content_", content)):
      p = word_probs[i, [column[w] for w in chosen]]
      if p.size:
        out[f"{prefix}mean_log_p"][i], out[f"{prefix}min_p"][i] = log_and_min(p)
        if not prefix:
          out["mean_p"][i] = p.mean()
  return out


def bound_rule_scores(word_probs: np.ndarray, words, specs) -> dict[str, np.ndarray]:
  """Per image, the mean log p and the min p over the requested scene's `bound_words` that the
  head knows (NaN for a scene without any: portraits)."""
  from qwen_image_rl.judges import perception

  column = {w: i for i, w in enumerate(words)}
  out = {rule: np.full(len(specs), np.nan, np.float32) for rule in BOUND_RULES}
  for i, spec in enumerate(specs):
    p = word_probs[i, [column[w] for w in perception.bound_words(spec) if w in column]]
    if p.size:
      out["bound_mean_log_p"][i], out["bound_min_p"][i] = log_and_min(p)
  return out


def dense_rule_scores(dense_probs: np.ndarray, specs, shown, content_min_p: np.ndarray) -> dict:
  """Per image, the DENSE_RULES over the per-token probabilities [N, T, V] of its requested
  scene's objects (dense_targets.object_log_probs); `shown`: the scene each image draws."""
  from qwen_image_rl.judges import dense_targets

  grid = int(round(np.sqrt(dense_probs.shape[1])))
  per_object = [dense_targets.object_log_probs(p, s, grid) for p, s in zip(dense_probs, specs)]
  bound = np.array([min(o) if o else np.nan for o in per_object], np.float32)
  ideal = [
    dense_targets.object_log_probs(0.01 + 0.98 * dense_targets.dense_targets(seen, grid), s, grid)
    for s, seen in zip(specs, shown)
  ]
  mean = np.array([np.mean(o) if o else np.nan for o in per_object], np.float32)
  log_content = np.log(np.clip(content_min_p, 1e-6, 1.0))
  both = np.where(np.isnan(bound), log_content, bound + log_content)
  return {
    "dense_bound": bound,
    "dense_bound_mean": mean,
    "dense_bound_and_content": both,
    "dense_bound_ideal": np.array([min(o) if o else np.nan for o in ideal], np.float32),
  }


ITEM_KINDS_READ = ("shape", "glyph", "body")  # checklist items with one object at its place


def dense_item_aucs(dense_probs: np.ndarray, specs, labels, kinds=None) -> dict:
  """Per checklist item kind that names one object (a shape, a glyph, the sun or moon), the AUC
  of that object's dense reading at its requested place (dense_targets.object_log_probs) for
  items the oracle calls good against the rest: what a judge's lookup of the item can find in
  the tower (reward_sft.pretrain_lookup logs the judge's own). With `kinds` (each image's
  variant) also `exact_renders`: the same over the images without pixel or face corruption,
  where a verdict is the content's alone (the lookup stage's held-out set)."""
  from qwen_image_rl.judges import dense_targets
  from qwen_image_rl.judges import face_id as F
  from qwen_image_rl.judges import judge_data as D
  from qwen_image_rl.judges import prompts as P

  grid = int(round(np.sqrt(dense_probs.shape[1])))
  read = {kind: ([], []) for kind in ITEM_KINDS_READ}
  for probs, spec, label in zip(dense_probs, specs, labels):
    items = [it for it in label.get("items/alignment", ()) if it.kind in ITEM_KINDS_READ]
    for item, score in zip(items, dense_targets.object_log_probs(probs, spec, grid), strict=True):
      read[item.kind][0].append(score)
      read[item.kind][1].append(P.verdict(item.value) == "good")
  out = {}
  for kind, (scores, good) in read.items():
    scores, good = np.array(scores), np.array(good, bool)
    if good.any() and (~good).any():
      out[kind] = {"n": len(good), "auc": round(F.auc(scores[good], scores[~good]), 3)}
  if kinds is not None:
    exact = [i for i, k in enumerate(kinds) if k in D.EXACT_RENDER_KINDS]
    out["exact_renders"] = dense_item_aucs(
      dense_probs[exact], [specs[i] for i in exact], [labels[i] for i in exact]
    )
  return out


def is_bound_word(word: str) -> bool:
  """A bound pseudo-word ('red@01', 'red_circle', '#shapes=2'), not a caption word."""
  return any(c in word for c in "@_=#")


def word_auc_summary(trained, processor, config, prompts, lowest: int = 12) -> dict:
  """Per-word AUC of the head on 512 held-out val renders: the mean over content words (in at
  most COMMON_WORD_SHARE of `prompts`) and over the others, and the `lowest` content words."""
  from qwen_image_rl.judges import perception

  bound = config.perception.bound_targets
  held_out = perception.perception_set(
    config.seed, 512, config.data.image_size, "val", trained.words, bound
  )
  logits = trained.logits(processor, held_out.images, config.perception.batch_size)
  aucs = perception.word_aucs(held_out, logits)
  pseudo = {w: a for w, a in aucs.items() if is_bound_word(w)}
  aucs = {w: a for w, a in aucs.items() if w not in pseudo}
  informative = content_words(aucs, prompts)
  content = {w: a for w, a in aucs.items() if w in informative}
  common = [a for w, a in aucs.items() if w not in informative]
  bound_summary = {}
  if pseudo:
    bound_summary = {
      "bound_mean": round(float(np.mean(list(pseudo.values()))), 3),
      "bound_words": len(pseudo),
      "bound_lowest": {
        w: round(a, 3) for w, a in sorted(pseudo.items(), key=lambda kv: kv[1])[:lowest]
      },
    }
  return {
    **bound_summary,
    "content_mean": round(float(np.mean(list(content.values()))), 3),
    "content_words": len(content),
    "common_mean": round(float(np.mean(common)), 3) if common else None,
    "lowest": {w: round(a, 3) for w, a in sorted(content.items(), key=lambda kv: kv[1])[:lowest]},
  }


def dense_auc_summary(trained, processor, config, lowest: int = 12) -> dict:
  """Per-token words' AUC on 512 held-out val renders (perception.dense_aucs): their mean and
  the `lowest` words."""
  from qwen_image_rl.judges import perception

  grid = perception.token_grid(config.model.vision, config.data.image_size)
  held_out = perception.perception_set(
    config.seed, 512, config.data.image_size, "val", trained.words, dense_grid=grid
  )
  _, dense_logits = trained.outputs(processor, held_out.images, config.perception.batch_size)
  aucs = perception.dense_aucs(held_out, dense_logits)
  return {
    "mean": round(float(np.mean(list(aucs.values()))), 3),
    "words": len(aucs),
    "lowest": {w: round(a, 3) for w, a in sorted(aucs.items(), key=lambda kv: kv[1])[:lowest]},
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--n", type=int, default=128, help="held-out images (n/2 specs x 2)")
  parser.add_argument("--split", default="val", choices=("val", "test"))
  parser.add_argument("--steps", type=int, default=None, help="perception steps (config's)")
  parser.add_argument("--seed", type=int, default=1, help="judge_eval's held-out draws")
  parser.add_argument("--json", default="", help="also write the results here")
  parser.add_argument(
    "--bound", action="store_true", help="train with bound_targets; also the bound_* rules"
  )
  parser.add_argument(
    "--dense", action="store_true", help="train with dense_targets; also the dense_* rules"
  )
  parser.add_argument("--dense_weight", type=float, default=None, help="(config's)")
  args = parser.parse_args()

  from configs import judge as judge_config
  from qwen_image_rl import host_memory, judge_eval, paths
  from qwen_image_rl.judges import perception
  from qwen_image_rl.trainers.reward_sft import build_processor, build_vision

  host_memory.tune_malloc()
  config = judge_config.get_config("tiny")
  if args.steps is not None:
    config.perception.steps = args.steps
  config.perception.bound_targets = args.bound
  config.perception.dense_targets = args.dense
  if args.dense_weight is not None:
    config.perception.dense_weight = args.dense_weight
  processor = build_processor(config)
  trained = perception.train_perception(
    build_vision(config), processor, config.perception, config.seed, config.data.image_size
  )
  t2i, _ = judge_eval.held_out_sets(args.split, args.n, args.seed)
  oracle = t2i.scores("alignment")
  logits, dense_logits = trained.outputs(processor, t2i.images, config.perception.batch_size)
  probs = 1.0 / (1.0 + np.exp(-logits[:, : len(trained.words)]))
  results = {"perception_steps": config.perception.steps, "n": len(t2i), "split": args.split}
  results["word_auc"] = word_auc_summary(trained, processor, config, t2i.prompts)
  if args.dense:
    results["dense_auc"] = dense_auc_summary(trained, processor, config)
  scores = rule_scores(probs, trained.words, t2i.prompts)
  if args.bound:
    scores.update(bound_rule_scores(probs, trained.words, t2i.specs))
  if args.dense:
    dense_probs = 1.0 / (1.0 + np.exp(-dense_logits))
    scores.update(dense_rule_scores(dense_probs, t2i.specs, t2i.shown, scores["content_min_p"]))
    results["dense_item_auc"] = dense_item_aucs(dense_probs, t2i.specs, t2i.labels, t2i.kinds)
  for rule, score in scores.items():
    results[rule] = judge_eval.agreement(score, oracle, t2i.variants, t2i.kinds)
  line = json.dumps(results)
  print(line, flush=True)
  if args.json:
    paths.write_text_atomic(args.json, line + "\n")


if __name__ == "__main__":
  main()
