"""Learned rewards against the oracle on held-out tiny-world images; prints one JSON line.

  python -m qwen_image_rl.judge_eval --judge=runs/demo/judge/export/judge [--split=val|test]
      [--n=256] [--mode=both|cot|no_cot] [--samples_from=runs/demo/base/export/pipeline]
      [--verdicts] [--items=own|true] [--caption_match] [--caption_loss] [--examples=K]
      [--verdict_samples=K]
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
--examples=K adds K chains of thought per task (CoT mode), each with its prompt, kind of image,
oracle score and reward. --caption_loss adds the judge's caption cross-entropy on 64 held-out
renders given the right image, another image and a blank one (`caption_loss`). --verdicts adds
how well the judge reads each item of the oracle's alignment checklist, teacher-forced
(`verdicts`, verdict_reading): whether a checklist judge's verdicts look at the image or repeat
the prior; for judges with independent_items also each verdict read after its phrase alone
(`verdicts_alone`). --items=true adds `alignment/true_items`: a checklist judge's alignment with the
prompt's true items written into its chain of thought, the verdicts and the score its own
(score_with_true_items); --items=oracle adds `alignment/oracle_chain`: its score read after the
oracle's whole checklist, verdicts included (score_with_oracle_chain). --caption_match adds
the alignment read from the judge's caption likelihood of each prompt against a blank image's
(`caption_match`): what its eyes carry, whatever its score head makes of it. Decomposing
judges (configs/judge.py:tiny_decompose) also get `decomposition`: the share of held-out
prompts whose items they list exactly, and the shares of true items listed and of listed items
true; --verdict_samples=K scores their alignment checklists as the mean of K sampled ones (0:
greedy verdicts; default: the exported setting).
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
flags.DEFINE_integer("examples", 0, "Also print this many chains of thought per task (CoT mode).")
flags.DEFINE_bool(
  "caption_match",
  False,
  "Also the alignment read from the judge's caption likelihood of the prompt (caption_match).",
)
flags.DEFINE_enum(
  "items",
  "own",
  ["own", "true", "oracle"],
  "Checklist judges, alignment with CoT: their own items, the prompt's true items given, or "
  "the oracle's whole checklist (its verdicts too) given.",
)
flags.DEFINE_bool(
  "verdicts",
  False,
  "Also how well the judge reads each item of a checklist chain of thought (teacher-forced).",
)
flags.DEFINE_enum(
  "captions", "own", ["own", "true"], "Describe-first judges: their own captions or the truth."
)
flags.DEFINE_string(
  "against",
  "",
  "Another judge export dir: both score the same held-out images (--mode's first mode) and the "
  "output adds, per task, the difference of their Spearman correlations with a paired "
  "bootstrap standard error (paired_difference).",
)
flags.DEFINE_integer(
  "verdict_samples", -1, "Decomposing judges: sampled checklists per image (-1: exported value)."
)
PAIR_MARGIN = 0.02


def correlations(judge: np.ndarray, oracle: np.ndarray) -> tuple[float, float]:
  """(Spearman, Pearson) over the valid (non-NaN) judge scores; NaN for fewer than 3 or a
  constant side."""
  valid = ~np.isnan(judge)
  if valid.sum() >= 3 and np.std(judge[valid]) > 0 and np.std(oracle[valid]) > 0:
    return (
      float(stats.spearmanr(judge[valid], oracle[valid])[0]),
      float(stats.pearsonr(judge[valid], oracle[valid])[0]),
    )
  return float("nan"), float("nan")


def correlation_metrics(judge: np.ndarray, oracle: np.ndarray, groups: int) -> dict:
  """Spearman / Pearson over valid entries and pairwise accuracy within groups of `groups`."""
  valid = ~np.isnan(judge)
  out = {"n": int(len(judge)), "invalid": int((~valid).sum())}
  out["spearman"], out["pearson"] = correlations(judge, oracle)
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


def caption_arrays(judge, captions, grid):
  """(ids, mask, loss weights) [N, L] of "Describe the image." answered by each caption."""
  from qwen_image_rl.trainers.reward_sft import caption_tokens

  prompt = judge.caption_prompt_ids(grid)
  answers = [judge.tokenizer(c)["input_ids"] + [judge.tokens.im_end] for c in captions]
  length = -(-(len(prompt) + max(map(len, answers))) // 16) * 16
  return caption_tokens(prompt, answers, length, judge.tokens.pad)


def caption_logits(judge, ids, mask, images, grid):
  """The judge's logits [N, L, V] over captioning sequences, each with its image."""
  import jax.numpy as jnp

  from qwen_image_rl.trainers.reward_sft import model_inputs

  inputs = model_inputs(judge, ids, mask, list(images))
  layout = judge.model.layout(np.repeat(grid, len(images), axis=0))
  return judge.model.apply(
    {"params": judge.params},
    inputs["input_ids"],
    inputs["attention_mask"],
    inputs["pixel_values"],
    position_ids=inputs["position_ids"],
    vision_layout={k: jnp.asarray(v) for k, v in layout.items()},
  )


def caption_loss(judge, split: str, n: int, seed: int) -> dict:
  """The judge's caption cross-entropy (nats per token) on n held-out renders' captions, given
  the right image, another image of the set and a blank one: how much its captions read the
  image rather than the language prior."""
  import jax.numpy as jnp

  from qwen_image_rl.data import examples
  from qwen_image_rl.trainers.reward_sft import token_ce

  ex = examples.t2i_examples(seed, n, split, 64)
  grid = judge.processor(ex.images[0])["image_grid_thw"]
  ids, mask, weights = caption_arrays(judge, ex.prompts, grid)
  images = {"right": ex.images, "other": np.roll(ex.images, 1, axis=0)}
  images["blank"] = np.zeros_like(ex.images)
  out = {}
  for name, shown in images.items():
    logits = caption_logits(judge, ids, mask, shown, grid)
    out[name] = round(float(token_ce(logits, jnp.asarray(ids), jnp.asarray(weights))), 4)
  return out


def caption_match(judge, data: D.JudgeSet, batch: int = 32) -> dict:
  """The alignment the judge's captioning reads: per image, the log-likelihood of its prompt as
  the answer to "Describe the image." (the prompts are captions of the same templates), per
  token, given the image, minus given a blank image (pointwise mutual information, the language
  prior taken out); also the worst token's. Spearman, pairwise accuracy and by-kind means
  against the oracle, as for the judge's own score: how much of the alignment signal the judge's
  eyes carry, whatever its score head makes of it."""
  import jax
  import jax.numpy as jnp

  grid = judge.processor(data.images[0])["image_grid_thw"]
  ids, mask, weights = caption_arrays(judge, data.prompts, grid)

  def token_logp(images, rows):
    logits = caption_logits(judge, ids[rows], mask[rows], images, grid)
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
    return np.asarray(jnp.take_along_axis(logp, jnp.asarray(ids[rows, 1:, None]), -1)[..., 0])

  pmi_mean, pmi_min = np.zeros(len(data), np.float32), np.zeros(len(data), np.float32)
  for start in range(0, len(data), batch):
    rows = np.arange(start, min(start + batch, len(data)))
    gain = token_logp(data.images[rows], rows) - token_logp(np.zeros_like(data.images[rows]), rows)
    w = weights[rows, 1:]
    pmi_mean[rows] = (gain * w).sum(-1) / w.sum(-1)
    pmi_min[rows] = np.where(w > 0, gain, np.inf).min(-1)
  oracle = data.scores("alignment")
  return {
    name: agreement(score, oracle, data.variants, data.kinds)
    for name, score in (("pmi_mean", pmi_mean), ("pmi_min", pmi_min))
  }


def true_descriptions(task: str, data: D.JudgeSet, rows, seed: int) -> list[str]:
  """The describe-first line of each row written from the scene its images draw."""
  rng = np.random.default_rng([seed, 3])
  return [P.seen_text(task, data.shown_captions(int(row), rng)) for row in rows]


def evaluate_judge(
  judge,
  t2i,
  edits,
  modes,
  true_captions: bool = False,
  seed: int = 0,
  examples: int = 0,
  rewards: dict | None = None,
) -> dict:
  """Per task and mode: correlation_metrics and by_kind, and with `examples` > 0 that many
  chains of thought (CoT mode) with their prompt, kind of image, oracle score and reward.
  `rewards`, when given, receives each "task/mode"'s rewards (for compare_judges)."""
  if true_captions and not judge.describe_first:
    raise ValueError("--captions=true needs a describe_first judge (tiny_describe_first)")
  results = {}
  for task in D.TASKS:
    data, oracle, rows = task_rows(task, t2i, edits)
    if not len(rows):  # e.g. no portrait among a few held-out specs
      continue
    seen = None
    if true_captions and task in P.DESCRIBED_TASKS:
      seen = true_descriptions(task, data, rows, seed)
    for mode in modes:
      out = score_rows(judge, task, data, rows, mode, seen)
      if rewards is not None:
        rewards[f"{task}/{mode}"] = out.reward
      results[f"{task}/{mode}"] = agreement(
        out.reward, oracle[rows], data.variants, [data.kinds[i] for i in rows]
      )
      if mode == "cot" and examples:
        results[f"{task}/{mode}"]["examples"] = [
          {
            "prompt": data.prompts[row],
            "kind": data.kinds[row],
            "cot": out.cot[i],
            "oracle": round(float(oracle[row]), 4),
            "reward": None if np.isnan(out.reward[i]) else round(float(out.reward[i]), 4),
          }
          for i, row in enumerate(rows[:examples])
        ]
  return results


def task_rows(task: str, t2i: D.JudgeSet, edits: D.JudgeSet):
  """A task's held-out set, its oracle scores and the rows the oracle scores (whole groups of
  draws: the portrait task applies to every draw of a portrait spec)."""
  data = edits if task == "instruction" else t2i
  oracle = data.scores(task)
  return data, oracle, np.flatnonzero(~np.isnan(oracle))


def score_rows(judge, task: str, data: D.JudgeSet, rows, mode: str, seen=None):
  """The judge's output (JudgeOutput) for `rows` of a held-out set, in mode 'cot' or 'no_cot'."""
  return judge.score(
    task,
    data.images[rows],
    [data.prompts[i] for i in rows],
    None if data.sources is None else data.sources[rows],
    cot=mode == "cot",
    seen=seen,
  )


def paired_difference(
  a: np.ndarray, b: np.ndarray, oracle: np.ndarray, groups: int, draws: int = 1000, seed: int = 0
) -> dict:
  """Spearman(a, oracle) - Spearman(b, oracle) over the images both judges score validly, and
  its standard error from a bootstrap that resamples whole groups of `groups` draws (a spec's
  images) for both judges at once: two judges on the same images differ by much less noise
  than two evaluations on different images."""
  valid = ~(np.isnan(a) | np.isnan(b))
  rho = lambda x, idx: stats.spearmanr(x[idx], oracle[idx])[0]
  everything = np.flatnonzero(valid)
  starts = np.arange(0, len(a) - groups + 1, groups)
  rng = np.random.default_rng(seed)
  diffs = []
  for _ in range(draws):
    picked = (rng.choice(starts, len(starts))[:, None] + np.arange(groups)).reshape(-1)
    picked = picked[valid[picked]]
    diffs.append(rho(a, picked) - rho(b, picked))
  rho_a, rho_b = rho(a, everything), rho(b, everything)
  return {
    "spearman": round(float(rho_a), 4),
    "spearman_against": round(float(rho_b), 4),
    "difference": round(float(rho_a - rho_b), 4),
    "se": round(float(np.nanstd(diffs)), 4),
    "n": int(valid.sum()),
  }


def compare_judges(rewards: dict, judge_b, t2i: D.JudgeSet, edits: D.JudgeSet, mode: str) -> dict:
  """Per task, paired_difference of a judge's rewards (evaluate_judge's, by "task/mode") and
  judge_b's on the same rows, in `mode` (the first judge minus judge_b)."""
  out = {}
  for task in D.TASKS:
    data, oracle, rows = task_rows(task, t2i, edits)
    if len(rows):
      b = score_rows(judge_b, task, data, rows, mode).reward
      key = f"{task}/{mode}"
      out[key] = paired_difference(rewards[key], b, oracle[rows], data.variants)
  return out


def alignment_batches(judge, data: D.JudgeSet, batch: int):
  """(rows, the judge's processed images, the rows' alignment prompt ids), `batch` rows at a
  time: what the item-level diagnostics read."""
  grid = judge.processor(data.images[0])["image_grid_thw"]
  for start in range(0, len(data), batch):
    rows = range(start, min(start + batch, len(data)))
    processed = judge.processor(list(data.images[rows.start : rows.stop]))
    yield rows, processed, [judge.prompt_ids("alignment", data.prompts[r], grid) for r in rows]


def verdict_probabilities(judge, data: D.JudgeSet, batch: int = 32):
  """(oracle verdicts [M], item kinds [M], the judge's p over P.VERDICTS [M, 4]) for every item
  of every image's alignment checklist, teacher-forced on the oracle's chain of thought."""
  import jax

  verdict_ids = judge.verdict_ids
  truths, kinds, probs = [], [], []
  for rows, processed, prompts in alignment_batches(judge, data, batch):
    seqs, positions, row_items = [], [], []
    for row, prompt in zip(rows, prompts):
      items = data.labels[row]["items/alignment"]
      seq = prompt + judge.tokenizer(P.chain_of_thought("alignment", {}, items=items))["input_ids"]
      at = [k - 1 for k in range(len(prompt), len(seq)) if seq[k] in verdict_ids]
      if len(at) != len(items):
        raise ValueError(f"{len(at)} verdicts for {len(items)} items: {data.prompts[row]!r}")
      seqs.append(seq)
      positions.append(at)
      row_items.append(items)
    width = max(map(len, positions))
    padded = [at + [at[-1]] * (width - len(at)) for at in positions]
    logits = np.asarray(judge.logits_at(seqs, processed, padded), np.float32)
    p = np.asarray(jax.nn.softmax(logits[..., verdict_ids], -1))
    for i, items in enumerate(row_items):
      for k, item in enumerate(items):
        truths.append(P.verdict(item.value))
        kinds.append(item.kind)
        probs.append(p[i, k])
  return np.array(truths), np.array(kinds), np.array(probs)


def verdicts_alone(judge, data: D.JudgeSet, batch: int = 32):
  """verdict_probabilities with each item read after its phrase alone (the chain of thought
  holds nothing else), as item drills train it and VLMJudge.independent_items reads it."""
  truths, kinds, probs = [], [], []
  for rows, processed, prompts in alignment_batches(judge, data, batch):
    items = [data.labels[r]["items/alignment"] for r in rows]
    phrases = [[item.phrase for item in its] for its in items]
    for its, row_p in zip(items, judge.verdicts_alone(prompts, processed, phrases)):
      truths += [P.verdict(item.value) for item in its]
      kinds += [item.kind for item in its]
      probs += row_p
  return np.array(truths), np.array(kinds), np.array(probs)


def verdict_reading(judge, data: D.JudgeSet, alone: bool = False) -> dict:
  """How well the judge reads each requested item (configs/judge.py:tiny_checklist), from
  verdict_probabilities. Per item kind and over all: n, the share whose oracle verdict is good,
  the accuracy of the judge's likeliest verdict, and the AUC of p(good) for good against
  not-good items (0.5: the verdict does not read the image)."""
  from qwen_image_rl.judges import face_id as F

  truths, kinds, probs = (verdicts_alone if alone else verdict_probabilities)(judge, data)
  words = np.array([w for _, w in P.VERDICTS])

  def summary(rows) -> dict:
    good = truths[rows] == "good"
    out = {
      "n": int(rows.sum()),
      "good_share": round(float(good.mean()), 3),
      "accuracy": round(float(np.mean(words[probs[rows].argmax(-1)] == truths[rows])), 3),
    }
    if good.any() and (~good).any():
      p_good = probs[rows][:, list(words).index("good")]
      out["good_auc"] = round(F.auc(p_good[good], p_good[~good]), 3)
    return out

  result = summary(np.ones(len(truths), bool))
  result["by_item"] = {kind: summary(kinds == kind) for kind in sorted(set(kinds.tolist()))}
  return result


def score_with_true_items(judge, data: D.JudgeSet):
  """(alignment rewards [N], chains of thought) of a checklist judge whose chain of thought is
  written item by item from the prompt's true items (judge_data.alignment_items): each item's
  phrase is given, the judge picks its verdict (VLMJudge.score_checklists: greedy or sampled,
  after the chain so far or with independent_items after the phrase alone), and after the last
  item it gives the score. What a checklist judge reaches when it names the prompt's items
  correctly."""
  items = [[item.phrase for item in data.labels[r]["items/alignment"]] for r in range(len(data))]
  out = judge.score_checklists(data.images, list(data.prompts), items)
  return out.reward, out.cot


def score_with_oracle_chain(judge, data: D.JudgeSet, batch: int = 32) -> np.ndarray:
  """Alignment rewards [N] read after the oracle's own checklist, verdicts included (the
  training target's chain of thought): what the judge's score makes of right verdicts."""
  from qwen_image_rl.judges import vlm_judge as V

  rewards = np.zeros(len(data), np.float32)
  for rows, processed, prompts in alignment_batches(judge, data, batch):
    seqs = []
    for r, prompt in zip(rows, prompts):
      chain = P.chain_of_thought("alignment", {}, items=data.labels[r]["items/alignment"])
      seqs.append(V.assemble(prompt, judge.tokenizer(chain)["input_ids"], judge.tokens)[0])
    logprobs = V.score_logprobs(judge.read_logits(seqs, processed), judge.tokens.digits)
    rewards[rows.start : rows.stop] = V.readout(np.asarray(logprobs), "unit")
  return rewards


def agreement(judge: np.ndarray, oracle: np.ndarray, variants: int, kinds) -> dict:
  """correlation_metrics of a judge's scores with the oracle's, their by_kind means, and the
  Spearman over the exact renders alone (`exact_renders`: no pixel or face corruption, where
  the oracle's score is the content's; on the rest it also reads its detectors' failures,
  benchmarks/alignment_ceiling.py)."""
  exact = np.isin(np.asarray(kinds), D.EXACT_RENDER_KINDS)
  return {
    **correlation_metrics(judge, oracle, variants),
    "exact_renders": exact_render_spearman(judge[exact], oracle[exact]),
    "by_kind": by_kind(judge, oracle, kinds),
  }


def exact_render_spearman(judge: np.ndarray, oracle: np.ndarray) -> dict:
  return {"n": int((~np.isnan(judge)).sum()), "spearman": round(correlations(judge, oracle)[0], 4)}


def decomposition(judge, data: D.JudgeSet) -> dict:
  """How a decomposing judge lists the items of the held-out prompts (text only, greedy): the
  share of prompts whose items it lists exactly (in order), the share of true items among its
  lists, the share of its items that are true, and how many answers are invalid."""
  prompts = sorted(set(data.prompts))
  truth = {
    data.prompts[r]: [i.phrase for i in data.labels[r]["items/alignment"]] for r in range(len(data))
  }
  listed, valid = judge.items_of(prompts)
  true_items = sum(len(truth[p]) for p in prompts)
  found = sum(len(set(items) & set(truth[p])) for p, items in zip(prompts, listed))
  return {
    "prompts": len(prompts),
    "invalid": int((~valid).sum()),
    "exact": round(float(np.mean([items == truth[p] for p, items in zip(prompts, listed)])), 4),
    "recall": round(found / true_items, 4),
    "precision": round(found / max(1, sum(len(set(items)) for items in listed)), 4),
  }


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
    if FLAGS.verdict_samples >= 0:
      kw["verdict_samples"] = FLAGS.verdict_samples
    judge = VLMJudge.load(FLAGS.judge, **kw)
    modes = ("cot", "no_cot") if FLAGS.mode == "both" else (FLAGS.mode,)
    true_captions = FLAGS.captions == "true"
    if true_captions and not judge.describe_first:
      raise app.UsageError(f"--captions=true: {FLAGS.judge} is not a describe_first judge")
    t2i, edits = held_out_sets(FLAGS.split, FLAGS.n, FLAGS.seed, FLAGS.samples_from)
    rewards = {}
    result = {
      "judge": FLAGS.judge,
      "split": FLAGS.split,
      "max_cot_tokens": judge.max_cot_tokens,
      "describe_first": judge.describe_first,
      "captions": FLAGS.captions if judge.describe_first else None,
      **evaluate_judge(
        judge, t2i, edits, modes, true_captions, FLAGS.seed, FLAGS.examples, rewards
      ),
    }
    if judge.decompose:
      result["decomposition"] = decomposition(judge, t2i)
      result["verdict_samples"] = judge.verdict_samples
    if FLAGS.caption_loss:
      result["caption_loss"] = caption_loss(judge, FLAGS.split, 64, FLAGS.seed)
    if FLAGS.items == "true":
      reward, _ = score_with_true_items(judge, t2i)
      result["alignment/true_items"] = agreement(
        reward, t2i.scores("alignment"), t2i.variants, t2i.kinds
      )
    if FLAGS.items == "oracle":
      reward = score_with_oracle_chain(judge, t2i)
      result["alignment/oracle_chain"] = agreement(
        reward, t2i.scores("alignment"), t2i.variants, t2i.kinds
      )
    if FLAGS.verdicts:
      result["verdicts"] = verdict_reading(judge, t2i)
      if judge.independent_items:
        result["verdicts_alone"] = verdict_reading(judge, t2i, alone=True)
    if FLAGS.caption_match:
      result["caption_match"] = caption_match(judge, t2i)
    if FLAGS.against:
      other = VLMJudge.load(FLAGS.against, **kw)
      result["against"] = {
        "judge": FLAGS.against,
        **compare_judges(rewards, other, t2i, edits, modes[0]),
      }
  print(json.dumps(result, sort_keys=True), flush=True)


if __name__ == "__main__":
  try:
    app.run(main)
  except FileNotFoundError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
