"""Held-out evaluation in the tiny world: sample with the pipelines, score with the oracle.

Writes `results/eval_<step>.json` in the schema of DESIGN.md section 6 and image grids to
TensorBoard. The oracle is the held-out "human": nothing here feeds back into training.
"""

from __future__ import annotations

import functools
import time

import numpy as np

from qwen_image_rl import metrics
from qwen_image_rl.data import examples, oracle, world

T2I_DIMENSIONS = oracle.ALIGNMENT_DIMS


def eval_sets(cfg, seed: int):
  """The fixed held-out prompts and edits (val split, or test with cfg.split='test')."""
  return _rendered_sets(seed, cfg.num_t2i, cfg.num_edits, cfg.split, cfg.image_size)


@functools.lru_cache(maxsize=4)
def _rendered_sets(seed: int, num_t2i: int, num_edits: int, split: str, image_size: int):
  # Rendered once per process: a training run evaluates the same sets at every eval.
  t2i = examples.t2i_examples(seed + 7919, num_t2i, split, image_size) if num_t2i > 0 else None
  edits = (
    examples.edit_examples(seed + 7919, num_edits, split, image_size) if num_edits > 0 else None
  )
  for sets in (t2i, edits):  # shared between calls: make accidental writes fail loudly
    for value in vars(sets).values() if sets is not None else ():
      if isinstance(value, np.ndarray):
        value.flags.writeable = False
  return t2i, edits


def _batched(fn, n: int, batch_size: int):
  return np.concatenate([fn(i, min(i + batch_size, n)) for i in range(0, n, batch_size)])


def sample_t2i(pipe, prompts, cfg, seed: int) -> np.ndarray:
  """uint8 images for `prompts`, CFG against the empty prompt, one fixed seed per batch."""

  def one(i, j):
    return pipe(
      prompt=list(prompts[i:j]),
      negative_prompt=[cfg.negative_prompt] * (j - i),
      true_cfg_scale=cfg.cfg_scale,
      num_inference_steps=cfg.num_steps,
      height=cfg.image_size,
      width=cfg.image_size,
      seed=seed + i,
      max_sequence_length=cfg.max_text_tokens,
    )

  return _batched(one, len(prompts), cfg.batch_size)


def sample_edits(pipe, sources, instructions, cfg, seed: int) -> np.ndarray:
  def one(i, j):
    return pipe(
      sources[i:j],
      prompt=list(instructions[i:j]),
      negative_prompt=[cfg.negative_prompt] * (j - i),
      true_cfg_scale=cfg.cfg_scale,
      num_inference_steps=cfg.num_steps,
      seed=seed + i,
      image_area=None,
      max_sequence_length=cfg.max_text_tokens,
    )

  return _batched(one, len(instructions), cfg.batch_size)


def summarise_t2i(scores, categories, checks=None) -> dict:
  """Per-category means of the oracle's scores, and their mean over categories.

  `overall` / `by_category` are the rubric-capped alignment (oracle.capped_alignment);
  `overall_mean` / `by_category_mean` the plain mean of the dimensions (the pre-capping metric);
  `strict` / `strict_by_category` the fraction of prompts whose image passes every item-level
  check (GenEval-like; thresholds in oracle.STRICT_THRESHOLD). Category means weigh each
  category equally. `per_prompt` / `per_prompt_category` keep each prompt's capped score in eval
  order, for paired comparisons of two models on the same prompts (`paired_difference`).
  With each image's item-level `checks` (oracle.score_and_check_t2i_batch) it adds what stands
  between the samples and strict success (`strict_blockers`).
  """
  by_category, by_category_mean, strict_by_category, by_dimension = {}, {}, {}, {}
  for c in world.CATEGORIES:
    rows = [s for s, k in zip(scores, categories) if k == c]
    if not rows:
      continue
    by_category[c] = float(np.mean([r["overall"] for r in rows]))
    by_category_mean[c] = float(np.mean([r["overall_mean"] for r in rows]))
    strict_by_category[c] = float(np.mean([r["strict"] for r in rows]))
    for d in T2I_DIMENSIONS[c]:
      vals = [r[d] for r in rows if d in r]
      if vals:
        by_dimension[f"{c}/{d}"] = float(np.mean(vals))
  return {
    "overall": float(np.mean(list(by_category.values()))),
    "by_category": by_category,
    "by_dimension": by_dimension,
    "overall_mean": float(np.mean(list(by_category_mean.values()))),
    "by_category_mean": by_category_mean,
    "strict": float(np.mean(list(strict_by_category.values()))),
    "strict_by_category": strict_by_category,
    "quality": float(np.mean([s["quality"] for s in scores])),
    "per_prompt": [float(s["overall"]) for s in scores],
    "per_prompt_category": list(categories),
    **(strict_blockers(checks, categories) if checks is not None else {}),
  }


def strict_blockers(checks, categories) -> dict:
  """Which item-level checks keep prompts from strict success, per category and check kind.

  `check_pass` is the fraction of a category's prompts whose checks of that kind all pass (item
  indices pooled: 'shape/colour' covers every requested shape's colour); `only_failure` the
  fraction whose one failing kind is this one, so `strict_by_category` plus a category's
  `only_failure` values is its strict rate if any single kind were forgiven. `failed_kinds`
  gives the fraction failing 0, 1, 2 and 3 or more kinds.
  """
  check_pass, only_failure, failed_kinds = {}, {}, {}
  for c in world.CATEGORIES:
    rows = [k for k, cat in zip(checks, categories) if cat == c]
    if not rows:
      continue
    failed = [oracle.failed_check_kinds(k) for k in rows]
    for kind in sorted({oracle.check_kind(name) for k in rows for name in k}):
      check_pass[f"{c}/{kind}"] = float(np.mean([kind not in f for f in failed]))
      only_failure[f"{c}/{kind}"] = float(np.mean([f == (kind,) for f in failed]))
    counts = np.bincount([min(len(f), 3) for f in failed], minlength=4)
    failed_kinds[c] = [float(n / len(rows)) for n in counts]
  return {"check_pass": check_pass, "only_failure": only_failure, "failed_kinds": failed_kinds}


def summarise_edits(scores, edits) -> dict:
  """Edit means; `overall` / `instruction_following` rubric-capped (the `*_mean` keys hold the
  pre-capping means), `strict` the fraction of edits that fulfil the instruction's core, match
  the target on every check and preserve the rest (oracle.score_edit). `per_edit_instruction_
  following` keeps each edit's capped score in eval order (`paired_difference`)."""

  def mean(key, rows):
    vals = [r[key] for r in rows if key in r]
    return float(np.mean(vals)) if vals else None

  def by_kind(key):
    return {
      k: mean(key, [s for s, e in zip(scores, edits) if e.kind == k])
      for k in sorted({e.kind for e in edits})
    }

  keys = (
    "overall",
    "instruction_following",
    "preservation",
    "identity",
    "quality",
    "core",
    "strict",
    "overall_mean",
    "instruction_following_mean",
  )
  out = {k: mean(k, scores) for k in keys}
  out["instruction_following_by_kind"] = by_kind("instruction_following")
  out["strict_by_kind"] = by_kind("strict")
  out["per_edit_instruction_following"] = [float(s["instruction_following"]) for s in scores]
  return out


def paired_difference(a, b, groups=None) -> tuple[float, float]:
  """(mean of a - b, its standard error) for two models scored on the same held-out items.

  The evaluation draws the same prompts and the same initial noise for every model, so the
  per-item difference removes the prompt-to-prompt spread that dominates each model's own error.
  With `groups` (the T2I categories) the difference is the mean over groups of the group means,
  as `overall` weighs them, and the variance adds up per group: SE^2 = sum_c var_c / n_c / C^2.
  """
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.ndim != 1 or a.shape != b.shape or len(a) < 2:  # no broadcasting: items pair one to one
    raise ValueError(
      f"paired_difference needs two equal-length score lists of >= 2 items, got {a.shape} "
      f"and {b.shape}"
    )
  d = a - b
  groups = np.zeros(len(d), int) if groups is None else np.asarray(groups)
  if groups.shape != d.shape:
    raise ValueError(f"{len(groups)} group labels for {len(d)} paired scores")
  means, variances = [], []
  for g in sorted(set(groups.tolist())):
    dg = d[groups == g]
    means.append(dg.mean())
    variances.append(dg.var(ddof=1) / len(dg) if len(dg) > 1 else 0.0)
  k = len(means)
  return float(np.mean(means)), float(np.sqrt(np.sum(variances)) / k)


def paired_differences(a: dict, b: dict) -> dict:
  """{'t2i': (difference, SE), 'edit': (...)}: eval results `a` minus `b` on T2I capped overall
  and edit instruction following, for the tasks both evaluated on the same items."""
  out = {}
  t2i_a, t2i_b = a.get("t2i") or {}, b.get("t2i") or {}
  if "per_prompt" in t2i_a and "per_prompt" in t2i_b:
    out["t2i"] = paired_difference(
      t2i_a["per_prompt"], t2i_b["per_prompt"], groups=t2i_a["per_prompt_category"]
    )
  key = "per_edit_instruction_following"
  edit_a, edit_b = a.get("edit") or {}, b.get("edit") or {}
  if key in edit_a and key in edit_b:
    out["edit"] = paired_difference(edit_a[key], edit_b[key])
  return out


def enabled(cfg) -> bool:
  """Whether `cfg` asks for any evaluation (num_t2i or num_edits > 0)."""
  return cfg.num_t2i > 0 or cfg.num_edits > 0


def evaluate(t2i_pipe, edit_pipe, cfg, *, step: int, seed: int, logger=None) -> dict:
  """Sample and score the held-out sets; log grids and write results if `logger` is given.

  A task with no samples (num_t2i or num_edits = 0) is skipped and left out of the results.
  """
  start = time.time()
  t2i, edits = eval_sets(cfg, seed)
  results = {"step": int(step), "n_samples": 0}
  grids, scalars = {}, {}
  n = 16
  if cfg.num_t2i > 0:
    images = sample_t2i(t2i_pipe, t2i.prompts, cfg, seed)
    scores, checks = oracle.score_and_check_t2i_batch(images, t2i.specs)
    results["t2i"] = summarise_t2i(scores, t2i.categories, checks)
    results["n_samples"] += len(images)
    grids["eval/t2i"] = metrics.image_grid(
      np.concatenate([t2i.images[:n], images[:n]]), min(n, len(images))
    )
    scalars.update({f"eval/t2i/{c}": v for c, v in results["t2i"]["by_category"].items()})
    scalars["eval/t2i/overall"] = results["t2i"]["overall"]
    scalars.update(metrics.flat_scalars("eval/t2i/strict", results["t2i"]["strict_by_category"]))
    # Per check kind: a reward that rises while these fall is being gamed.
    scalars.update(metrics.flat_scalars("eval/t2i/check_pass", results["t2i"]["check_pass"]))
  if cfg.num_edits > 0:
    outputs = sample_edits(edit_pipe, edits.sources, edits.instructions, cfg, seed)
    results["edit"] = summarise_edits(
      oracle.score_edit_batch(edits.sources, outputs, edits.edits), edits.edits
    )
    results["n_samples"] += len(outputs)
    grids["eval/edit"] = metrics.image_grid(
      np.concatenate([edits.sources[:n], edits.targets[:n], outputs[:n]]), min(n, len(outputs))
    )
    # Means and their per-kind breakdowns (eval/edit/<metric>_by_kind/<kind>).
    scalars.update(metrics.flat_scalars("eval/edit", results["edit"]))
  results["eval_seconds"] = time.time() - start
  if logger is not None:
    logger.images(step, grids)
    logger.scalars(step, scalars)
    logger.write_results(f"eval_{step}", results)
  return results


def format_table(results: dict) -> str:
  """A per-category table for the terminal."""
  rows = []
  if "t2i" in results:
    t = results["t2i"]
    rows += [("t2i overall", t["overall"])] + [(f"  {c}", v) for c, v in t["by_category"].items()]
    rows += [
      ("t2i overall (uncapped mean)", t.get("overall_mean")),
      ("t2i strict", t.get("strict")),
      ("t2i quality", t["quality"]),
    ]
  if "edit" in results:
    e = results["edit"]
    rows += [
      ("edit instruction_following", e["instruction_following"]),
      ("edit preservation", e["preservation"]),
      ("edit identity", e["identity"]),
      ("edit strict", e.get("strict")),
    ]
  if not rows:
    return "(no evaluation samples)"
  width = max(len(r[0]) for r in rows)
  return "\n".join(f"{name:<{width}}  {'n/a' if v is None else f'{v:.3f}'}" for name, v in rows)
