"""`curate` trainer: offline prompt curation by intra-group reward range (paper sec. 4).

The base model makes rl.group_size ODE rollouts (true CFG) per prompt; each is scored with the
composite reward, combined per sample with its category's weights (sec. 5). A prompt is kept when
max - min of its group's composite exceeds rl.curation.threshold: prompts whose rollouts all score
alike give GRPO no signal. Writes WORKDIR/<rl.curation.output> (.jsonl, with each tiny-world
prompt's scene spec, or for rl.task='edit' its edit triple, so the oracle rewards can score it),
results/curation.json (counts, range histogram, per-category keep rates) and a histogram image
to TensorBoard.

  python -m qwen_image_rl.main --config=configs/curate.py:tiny --workdir=runs/demo/curate \
      --config.init_from=runs/demo/base/export/pipeline
  python -m qwen_image_rl.main --config=configs/curate.py:edit --workdir=runs/demo/curate_edit \
      --config.init_from=runs/demo/base/export/pipeline
"""

from __future__ import annotations

import os
import time

import jax
import numpy as np

from qwen_image_rl import paths
from qwen_image_rl.config_lib import ConfigError
from qwen_image_rl.data import edits, prompt_files, world
from qwen_image_rl.metrics import MetricLogger
from qwen_image_rl.pipelines.edit import QwenImageEditPipeline
from qwen_image_rl.rewards.base import RewardBatch
from qwen_image_rl.rewards.composite import category_weighted_sum
from qwen_image_rl.rl import config_checks, reward_setup
from qwen_image_rl.rl.policy import load_base, with_params
from qwen_image_rl.rl.prompts import build_pool, negative_cond


class CurationError(RuntimeError):
  """No prompt passed the filter."""


REQUIRED = {
  "seed": int,
  "init_from": str,
  "model.dtype": str,
  "data.image_size": int,
  "data.max_text_tokens": int,
  "data.num_prompts": int,
  "data.prompt_file": str,
  "rl.task": str,
  "rl.group_size": int,
  "rl.prompts_per_step": int,
  "rl.num_steps": int,
  "rl.cfg_mode": str,
  "rl.cfg_scale": float,
  "rl.curation.threshold": float,
  "rl.curation.output": str,
  "rl.curation.bins": int,
  "rewards.names": tuple,
}


def validate(config):
  config_checks.check_rollout(config)
  if not config.rl.curation.threshold >= 0:
    raise ConfigError(f"config.rl.curation.threshold={config.rl.curation.threshold}: must be >= 0")
  if not prompt_files.is_jsonl(config.rl.curation.output):
    raise ConfigError(
      f"config.rl.curation.output={config.rl.curation.output!r}: must end in .jsonl"
    )


def histogram_image(counts, height: int = 64, bar: int = 6) -> np.ndarray:
  """A uint8 bar chart [H, W, 3] of histogram counts (for TensorBoard)."""
  counts = np.asarray(counts, np.float64)
  image = np.full((height, bar * len(counts), 3), 255, np.uint8)
  top = counts.max() if counts.size and counts.max() > 0 else 1.0
  for i, c in enumerate(counts):
    h = int(round((height - 1) * c / top))
    image[height - h :, i * bar : (i + 1) * bar - 1] = (40, 90, 200)
  return image


def group_ranges(composite: np.ndarray, group_size: int) -> np.ndarray:
  groups = composite.reshape(-1, group_size)
  return groups.max(axis=1) - groups.min(axis=1)


def curation_summary(rl, pool, ranges, keep, raw) -> tuple[dict, np.ndarray]:
  """The results JSON of a curation run (without its time) and the range histogram's counts."""
  cats = np.asarray(pool.categories, dtype=object)
  counts, edges = np.histogram(
    ranges, bins=rl.curation.bins, range=(0.0, max(float(ranges.max()), 1e-6))
  )
  by_category = {
    c: {
      "n": int((cats == c).sum()),
      "kept": int(keep[cats == c].sum()),
      "range_mean": float(ranges[cats == c].mean()),
    }
    for c in sorted(set(pool.categories))
  }
  summary = {
    "n_prompts": len(pool),
    "n_kept": int(keep.sum()),
    "threshold": float(rl.curation.threshold),
    "group_size": rl.group_size,
    "range_mean": float(ranges.mean()),
    "range_quantiles": {str(q): float(np.quantile(ranges, q)) for q in (0.1, 0.5, 0.9)},
    "histogram": {"counts": counts.tolist(), "edges": edges.tolist()},
    "by_category": by_category,
    "reward_means": {name: float(np.nanmean(v)) for name, v in raw.items()},
  }
  return summary, counts


def write_kept_prompts(pool, ranges, keep, path: str) -> str:
  """The kept prompts as a prompt file (with their range and spec); returns its path."""
  records = []
  for i in np.flatnonzero(keep):
    extra = {"range": float(ranges[i])}
    spec, edit = pool.metas[i].get("spec"), pool.metas[i].get("edit")
    if spec is not None:
      extra["spec"] = spec if isinstance(spec, dict) else world.to_dict(spec)
    if edit is not None:  # what rl.task='edit' runs read back (prompt_files.read_edit_prompt_file)
      extra["edit"] = edits.to_dict(edit)
    records.append(
      prompt_files.PromptRecord(prompt=pool.prompts[i], category=pool.categories[i], extra=extra)
    )
  paths.makedirs(os.path.dirname(path))
  prompt_files.write_prompt_file(path, records)
  return path


def rollout_images(config, pipe, pool, index, neg_cond, neg_mask, seed: int) -> np.ndarray:
  """uint8 ODE samples (true CFG unless rl.cfg_mode='none') for the pool rows `index`; edits
  condition on their source images. Rows are passed one per sample, so text and source stay
  paired (the edit pipeline tiles sources where prompts repeat in place)."""
  rl = config.rl
  k = len(index)
  kw = dict(
    prompt_embeds=pool.cond[index],
    prompt_embeds_mask=pool.mask[index],
    true_cfg_scale=rl.cfg_scale,
    num_inference_steps=rl.num_steps,
    height=config.data.image_size,
    width=config.data.image_size,
    seed=config.seed * 1_000_003 + seed,
    max_sequence_length=config.data.max_text_tokens,
  )
  if rl.cfg_mode != "none":
    kw.update(
      negative_prompt_embeds=np.repeat(neg_cond, k, 0),
      negative_prompt_embeds_mask=np.repeat(neg_mask, k, 0),
    )
  if pool.sources is None:
    return pipe(**kw)
  edit_pipe = with_params(pipe, pipe.transformer_params, QwenImageEditPipeline)
  return edit_pipe(pool.sources[index], image_area=None, **kw)


def train(config, workdir):
  """Prompt curation: keep prompts whose base-model rollouts' reward range exceeds a threshold."""
  rl = config.rl
  pipe = load_base(config)
  reward_fn = reward_setup.build_reward(config)
  weights = reward_setup.category_weights(config)
  pool = build_pool(config, pipe)
  reward_setup.check_categories_covered(weights, pool.categories, "the prompt set")
  logger = MetricLogger(workdir, total_steps=1, progress_every=1)
  neg_cond, neg_mask = negative_cond(config, pipe, 1)
  g = rl.group_size
  n = len(pool)
  start = time.time()
  composite = np.zeros((n * g,), np.float32)
  raw = {name: np.zeros((n * g,), np.float32) for name in reward_fn.names}
  for lo in range(0, n, rl.prompts_per_step):
    hi = min(lo + rl.prompts_per_step, n)
    index = np.repeat(np.arange(lo, hi), g)  # each prompt's group, contiguous
    images = rollout_images(config, pipe, pool, index, neg_cond, neg_mask, seed=lo)
    batch = RewardBatch(
      images=images,
      prompts=[pool.prompts[i] for i in index],
      categories=[pool.categories[i] for i in index],
      sample_ids=np.arange(lo * g, hi * g),
      meta=[pool.metas[i] for i in index],
      source_images=None if pool.sources is None else pool.sources[index],
    )
    scores = reward_fn(batch)
    for name, value in scores.items():
      raw[name][lo * g : hi * g] = value
    composite[lo * g : hi * g] = category_weighted_sum(scores, batch.categories, weights)
    print(f"curate: scored {hi}/{n} prompts ({time.time() - start:.0f}s)", flush=True)

  ranges = group_ranges(composite, g)
  keep = ranges > rl.curation.threshold
  summary, counts = curation_summary(rl, pool, ranges, keep, raw)
  summary["seconds"] = time.time() - start
  logger.write_results("curation", summary)
  logger.images(0, {"curation/range_histogram": histogram_image(counts)})
  logger.scalars(0, {"curation/kept_fraction": keep.mean(), "curation/range_mean": ranges.mean()})
  logger.close()
  if not keep.any():
    raise CurationError(
      f"no prompt kept: all {n} reward ranges are <= rl.curation.threshold="
      f"{rl.curation.threshold} (max range {float(ranges.max()):.4g}); lower the threshold or "
      f"raise rl.group_size. Histogram in {os.path.join(workdir, 'results', 'curation.json')}"
    )
  path = os.path.join(workdir, rl.curation.output)
  if jax.process_index() == 0:  # every process scored the same pool; one writes
    write_kept_prompts(pool, ranges, keep, path)
  records = int(keep.sum())
  summary["output"] = path
  print(
    f"curate: kept {records}/{n} prompts (range > {rl.curation.threshold}) -> {path}",
    flush=True,
  )
  return summary
