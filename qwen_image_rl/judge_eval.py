"""Learned rewards against the oracle on held-out tiny-world images; prints one JSON line.

  python -m qwen_image_rl.judge_eval --judge=runs/demo/judge/export/judge [--split=val|test]
      [--n=256] [--mode=both|cot|no_cot] [--samples_from=runs/demo/base/export/pipeline]
  python -m qwen_image_rl.judge_eval --judge=face_id:runs/demo/face_id/export/face_id

VLM judge: per task (alignment, aesthetics, portrait, instruction) and mode, the Spearman and
Pearson correlations of the judge reward with the oracle reward over the valid outputs, the
pairwise accuracy (the two images of one spec, oracle gap >= 0.02: does the judge order them as
the oracle?), n, the number of invalid outputs, and `by_kind`: the mean judge reward and
oracle score per kind of image (clean render, pixel corruption, semantic mutation, unrelated
scene, face distortion; edits also the untouched source; pipeline samples). Images: n held-out
specs' renders corrupted as in training (n / 2 specs x 2 draws), and with --samples_from the base
pipeline's samples of the same prompts as the second draw. Face-ID: same- vs different-identity
AUC of the embedding cosine on held-out identities (clean, augmented and blurred renders).

Describe-first judges (configs/judge.py:tiny_describe_first) caption each image before judging;
--captions=true gives them the true caption of the scene each image draws instead, so the
alignment and instruction numbers measure the comparison alone, without the captioning.
--caption_loss adds the judge's caption cross-entropy on 64 held-out renders given the right
image, another image and a blank one (`caption_loss`).
"""

from __future__ import annotations

import json
import sys

import numpy as np
from absl import app, flags
from scipy import stats

from qwen_image_rl.judges import judge_data as D
from qwen_image_rl.judges import prompts as P

FLAGS = flags.FLAGS
flags.DEFINE_string("judge", None, "A judge export dir, or face_id:DIR for the face embedder.")
flags.DEFINE_enum("split", "val", ["val", "test"], "Held-out split of the world's specs.")
flags.DEFINE_integer("n", 256, "Images per task (face_id: identity pairs).")
flags.DEFINE_enum("mode", "both", ["both", "cot", "no_cot"], "Judge answer mode(s).")
flags.DEFINE_integer("max_cot_tokens", 0, "Override the judge's bound (0: the exported value).")
flags.DEFINE_string("samples_from", "", "A pipeline dir: its samples join the held-out images.")
flags.DEFINE_integer("seed", 1, "Seed of the held-out draws.")
flags.DEFINE_bool(
  "caption_loss", False, "Also the caption loss given the right, another and a blank image."
)
flags.DEFINE_enum(
  "captions", "own", ["own", "true"], "Describe-first judges: their own captions or the truth."
)
PAIR_MARGIN = 0.02


def correlation_metrics(judge: np.ndarray, oracle: np.ndarray, groups: int) -> dict:
  """Spearman / Pearson over valid entries and pairwise accuracy within groups of `groups`."""
  valid = ~np.isnan(judge)
  out = {"n": int(len(judge)), "invalid": int((~valid).sum())}
  if valid.sum() >= 3 and np.std(judge[valid]) > 0 and np.std(oracle[valid]) > 0:
    out["spearman"] = float(stats.spearmanr(judge[valid], oracle[valid])[0])
    out["pearson"] = float(stats.pearsonr(judge[valid], oracle[valid])[0])
  else:
    out["spearman"] = out["pearson"] = float("nan")
  right = total = 0
  for g in range(0, len(judge) - groups + 1, groups):
    for a in range(g, g + groups):
      for b in range(a + 1, g + groups):
        if abs(oracle[a] - oracle[b]) < PAIR_MARGIN:
          continue
        total += 1
        right += bool(valid[a] and valid[b] and (judge[a] - judge[b]) * (oracle[a] - oracle[b]) > 0)
  out["pairwise_accuracy"] = right / total if total else float("nan")
  out["pairs"] = total
  return out


def held_out_sets(split: str, n: int, seed: int, samples_from: str = "", size: int = 64):
  extra = None
  if samples_from:
    from qwen_image_rl.data import examples
    from qwen_image_rl.trainers.reward_sft import pipeline_samples

    prompts = examples.t2i_examples(seed, n // 2, split, size).prompts
    extra = pipeline_samples(samples_from, prompts, size, seed)
  return (D.t2i_set(seed, n // 2, split, size, 2, extra), D.edit_set(seed, n // 2, split, size, 2))


def caption_loss(judge, split: str, n: int, seed: int) -> dict:
  """The judge's caption cross-entropy (nats per token) on n held-out renders' captions, given
  the right image, another image of the set and a blank one: how much its captions read the
  image rather than the language prior."""
  import jax.numpy as jnp

  from qwen_image_rl.data import examples
  from qwen_image_rl.trainers.reward_sft import caption_tokens, model_inputs, token_ce

  ex = examples.t2i_examples(seed, n, split, 64)
  grid = judge.processor(ex.images[0])["image_grid_thw"]
  prompt = judge.caption_prompt_ids(grid)
  answers = [judge.tokenizer(c)["input_ids"] + [judge.tokens.im_end] for c in ex.prompts]
  length = -(-(len(prompt) + max(map(len, answers))) // 16) * 16
  ids, mask, weights = caption_tokens(prompt, answers, length, judge.tokens.pad)
  layout = {k: jnp.asarray(v) for k, v in judge.model.layout(np.repeat(grid, n, axis=0)).items()}
  images = {"right": ex.images, "other": np.roll(ex.images, 1, axis=0)}
  images["blank"] = np.zeros_like(ex.images)
  out = {}
  for name, shown in images.items():
    batch = model_inputs(judge, ids, mask, list(shown))
    logits = judge.model.apply(
      {"params": judge.params},
      batch["input_ids"],
      batch["attention_mask"],
      batch["pixel_values"],
      position_ids=batch["position_ids"],
      vision_layout=layout,
    )
    out[name] = round(float(token_ce(logits, jnp.asarray(ids), jnp.asarray(weights))), 4)
  return out


def true_descriptions(task: str, data: D.JudgeSet, rows, seed: int) -> list[str]:
  """The describe-first line of each row written from the scene its images draw."""
  rng = np.random.default_rng([seed, 3])
  return [P.seen_text(task, data.shown_captions(int(row), rng)) for row in rows]


def evaluate_judge(judge, t2i, edits, modes, true_captions: bool = False, seed: int = 0) -> dict:
  if true_captions and not judge.describe_first:
    raise ValueError("--captions=true needs a describe_first judge (tiny_describe_first)")
  results = {}
  for task in D.TASKS:
    data = edits if task == "instruction" else t2i
    oracle = data.scores(task)
    rows = np.flatnonzero(~np.isnan(oracle))
    seen = None
    if true_captions and task in P.DESCRIBED_TASKS:
      seen = true_descriptions(task, data, rows, seed)
    # Keep whole groups (the portrait task applies to every draw of a portrait spec).
    for mode in modes:
      out = judge.score(
        task,
        data.images[rows],
        [data.prompts[i] for i in rows],
        None if data.sources is None else data.sources[rows],
        cot=mode == "cot",
        seen=seen,
      )
      results[f"{task}/{mode}"] = {
        **correlation_metrics(out.reward, oracle[rows], data.variants),
        "by_kind": by_kind(out.reward, oracle[rows], [data.kinds[i] for i in rows]),
      }
  return results


def by_kind(judge: np.ndarray, oracle: np.ndarray, kinds) -> dict:
  """Mean judge reward and oracle score per image kind (clean, pixel, semantic, unrelated, ...):
  a judge that reads only image quality rates a semantic mutation like the clean render."""
  kinds = np.asarray(kinds)
  out = {}
  for kind in sorted(set(kinds.tolist())):
    rows = kinds == kind
    out[kind] = {
      "n": int(rows.sum()),
      "judge": round(float(np.nanmean(judge[rows])), 4) if np.any(~np.isnan(judge[rows])) else None,
      "oracle": round(float(np.mean(oracle[rows])), 4),
    }
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS.judge:
    raise app.UsageError("--judge is required (a judge export dir or face_id:DIR)")
  if FLAGS.judge.startswith("face_id:"):
    from qwen_image_rl.judges import face_id as F

    scorer = F.FaceIdScorer.load(FLAGS.judge[len("face_id:") :])
    result = {
      "judge": FLAGS.judge,
      "held_out_identities": len(F.HELD_OUT),
      "pairs": FLAGS.n,
      **F.evaluate_auc(scorer, n_pairs=FLAGS.n, seed=FLAGS.seed),
    }
  else:
    from qwen_image_rl.judges.vlm_judge import VLMJudge

    kw = {"max_cot_tokens": FLAGS.max_cot_tokens} if FLAGS.max_cot_tokens else {}
    judge = VLMJudge.load(FLAGS.judge, **kw)
    modes = ("cot", "no_cot") if FLAGS.mode == "both" else (FLAGS.mode,)
    true_captions = FLAGS.captions == "true"
    if true_captions and not judge.describe_first:
      raise app.UsageError(f"--captions=true: {FLAGS.judge} is not a describe_first judge")
    t2i, edits = held_out_sets(FLAGS.split, FLAGS.n, FLAGS.seed, FLAGS.samples_from)
    result = {
      "judge": FLAGS.judge,
      "split": FLAGS.split,
      "max_cot_tokens": judge.max_cot_tokens,
      "describe_first": judge.describe_first,
      "captions": FLAGS.captions if judge.describe_first else None,
      **evaluate_judge(judge, t2i, edits, modes, true_captions, FLAGS.seed),
    }
    if FLAGS.caption_loss:
      result["caption_loss"] = caption_loss(judge, FLAGS.split, 64, FLAGS.seed)
  print(json.dumps(result, sort_keys=True), flush=True)


if __name__ == "__main__":
  try:
    app.run(main)
  except FileNotFoundError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
