"""`reward_sft` trainer: a tiny multi-task Qwen2.5-VL judge on oracle-labelled tiny-world data.

Pointwise (paper sec. 6): token-level SFT on `<chain of thought> Score: <digit>` targets, the
CoT written from the oracle's per-dimension verdicts and the digit binned from the oracle score,
plus the paper's regression L = (R - y)^2 on the expected score R = sum_s s p(s) at the score
position (y = 1 + 4 * oracle, continuous). A `data.no_cot_fraction` of the examples are
no-CoT answers (the forced " Score: " then the digit), so one judge serves both modes; the
forced marker carries no loss, so greedy CoT generation never starts with it.

Pairwise (the paper's ablation, `loss.kind='pairwise'`): the same backbone, images and prompts,
trained with Bradley-Terry -log sigmoid(R_w - R_l) on the two images of one spec ordered by the
oracle (near-ties, |delta| < loss.min_margin, are dropped); R is the no-CoT expected score.

Captioning (`data.caption_batch_size` > 0, both losses): each step adds that many examples of
"Describe the image." answered with the scene's caption, on renders of the training split (half
of them noised, blurred or speckled), with token cross-entropy weighted by `loss.caption_weight`.
The rubric targets can be met from language priors alone (most verdicts are "good"); a caption
cannot, so it is what makes a from-scratch vision tower encode objects, colours and positions.

Decomposition (`judge.decompose`, checklist judges; `data.decompose_batch_size` examples a
step, token cross-entropy weighted by `loss.decompose_weight`): the text-only request "List the
items of the prompt." answered with the training prompts' checklist items, the exported judge's
first pass before it writes an alignment checklist (VLMJudge.items_of). Item drills
(`data.drill_batch_size` examples a step, weighted by `loss.drill_weight`): the alignment prompt
and image, then one item's phrase alone as the chain of thought, the loss on its verdict only.
In a whole checklist the oracle's verdicts run together (an unrelated scene fails every item), so
a judge trained on whole checklists alone learns to repeat the verdict before; a drill must read
its item from the image (VLMJudge.independent_items reads each verdict so).

Perception pre-training (`perception.steps` > 0): before the first step of a fresh run the
vision tower is trained on dense oracle targets (judges/perception.py) and the judge starts
from it; a resumed run restores it from the checkpoint.

Describe-first judges (`judge.describe_first`): the alignment and instruction prompts carry a
line describing the image(s); training shows the true scene's caption there, the exported judge
writes its own in a separate captioning pass (VLMJudge.describe). With `language.steps` > 0 the
language model first learns the comparison from text alone (`pretrain_language`: images that
are exact renders, described by freshly phrased captions, with zero image features).

Lookup pre-training (`lookup.steps` > 0, before reward SFT, after the tower's): the language
model and the merger learn from balanced item drills alone (`pretrain_lookup`; half of each
batch items the oracle calls good), by default on scenes drawn afresh each step and rendered
without pixel or face corruption, the held-out AUC of p(good) logged on the val split's.
`data.drill_balance` balances the drills mixed into reward SFT the same way.

Each step holds `data.t2i_batch_size` one-image examples (alignment / aesthetics / portrait, by
`data.task_weights`) and `data.edit_batch_size` two-image instruction-following examples (pairs
for the pairwise loss), drawn from (seed, step): a resumed run replays the same batches.
Exports WORKDIR/export/judge (transformers layout + tokenizer + preprocessor + judge_config).
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from qwen_image_rl import config_lib, optim, parallel
from qwen_image_rl.data.tokenizer import special_token_ids
from qwen_image_rl.judges import judge_data as D
from qwen_image_rl.judges import perception
from qwen_image_rl.judges import prompts as P
from qwen_image_rl.judges import vlm_judge as V
from qwen_image_rl.models.qwen2_5_vl import Qwen25VLTextModel
from qwen_image_rl.models.qwen2_5_vl_full import Qwen25VL
from qwen_image_rl.models.qwen2_5_vl_processor import ImageProcessor
from qwen_image_rl.models.qwen2_5_vl_vision import Qwen25VLVisionModel, VisionConfig
from qwen_image_rl.train_state import TrainState, create_train_state, keep_if_finite
from qwen_image_rl.trainers import common

LOSS_KINDS = ("pointwise", "pairwise")
# Alignment chains of thought: a verdict per oracle dimension ('dims'), or per item the prompt
# names ('checklist': judge_data.alignment_items).
COT_STYLES = ("dims", "checklist")
# Images whose alignment and instruction labels follow from the prompt and the caption of the
# scene they show.
TEXT_KINDS = D.EXACT_RENDER_KINDS
TEXT_HEADROOM = 32  # tokens: freshly phrased captions run longer than the row's own


def validate(config):
  config_lib.check_positive(
    config,
    "total_steps",
    "data.n_specs",
    "data.n_edits",
    "data.t2i_batch_size",
    "data.edit_batch_size",
    "data.image_size",
  )
  if config.data.caption_batch_size < 0 or config.loss.caption_weight < 0:
    raise config_lib.ConfigError(
      f"config.data.caption_batch_size={config.data.caption_batch_size} and "
      f"config.loss.caption_weight={config.loss.caption_weight}: must be >= 0"
    )
  config_lib.check_choice(config, "loss.kind", LOSS_KINDS)
  try:
    D.variant_probs("general", dict(config.data.variant_weights))
  except ValueError as e:
    raise config_lib.ConfigError(f"config.data.variant_weights: {e}") from None
  validate_perception(config)
  if not 0.0 <= config.data.no_cot_fraction <= 1.0:
    raise config_lib.ConfigError(
      f"config.data.no_cot_fraction={config.data.no_cot_fraction}: must be in [0, 1]"
    )
  if config.data.cot_style not in COT_STYLES:
    raise config_lib.ConfigError(
      f"config.data.cot_style={config.data.cot_style!r}; known: {list(COT_STYLES)}"
    )
  weights = dict(config.data.task_weights)
  if set(weights) != set(D.T2I_TASKS) or min(weights.values()) < 0 or not sum(weights.values()):
    raise config_lib.ConfigError(
      f"config.data.task_weights={weights}: non-negative weights for exactly {D.T2I_TASKS}"
    )
  if config.data.variants < 2 and config.loss.kind == "pairwise":
    raise config_lib.ConfigError("pairwise training needs config.data.variants >= 2")
  if config.judge.describe_first and (config.data.samples_from or config.data.describe_in_cot):
    raise config_lib.ConfigError(
      "config.judge.describe_first trains on the caption of the scene each image shows: it "
      "cannot use config.data.samples_from (pipeline samples show unknown scenes) nor "
      "config.data.describe_in_cot (a second description)"
    )
  if config.judge.describe_first and not config.data.caption_batch_size:
    raise config_lib.ConfigError(
      "config.judge.describe_first needs config.data.caption_batch_size > 0: the judge writes "
      "its own captions at inference"
    )
  config_lib.check_positive(config, "judge.max_caption_tokens")
  if config.judge.decompose:
    config_lib.check_positive(config, "data.decompose_batch_size", "judge.max_item_tokens")
    if config.data.cot_style != "checklist" or config.loss.kind != "pointwise":
      raise config_lib.ConfigError(
        "config.judge.decompose writes alignment checklists of the judge's own items: it needs "
        "config.data.cot_style='checklist' and config.loss.kind='pointwise'"
      )
  validate_drills(config)
  if config.judge.verdict_samples < 0:
    raise config_lib.ConfigError(
      f"config.judge.verdict_samples={config.judge.verdict_samples}: must be >= 0"
    )
  if config.language.steps < 0:
    raise config_lib.ConfigError(f"config.language.steps={config.language.steps}: must be >= 0")
  if config.language.steps:
    config_lib.check_positive(config, "language.batch_size")
    if not config.judge.describe_first or config.loss.kind != "pointwise":
      raise config_lib.ConfigError(
        "config.language.steps > 0 pre-trains the comparison of the prompt with the image's "
        "description: it needs config.judge.describe_first=True and config.loss.kind='pointwise'"
      )
  if config.data.samples_from and not os.path.isdir(config.data.samples_from):
    raise config_lib.ConfigError(
      f"config.data.samples_from={config.data.samples_from!r} is not "
      "a directory (a pipeline exported by sft or grpo)"
    )


def validate_drills(config):
  """Raise ConfigError for item drill and lookup pre-training settings it cannot run."""
  if config.data.drill_batch_size < 0 or config.loss.drill_weight < 0:
    raise config_lib.ConfigError(
      f"config.data.drill_batch_size={config.data.drill_batch_size} and "
      f"config.loss.drill_weight={config.loss.drill_weight}: must be >= 0"
    )
  if config.data.drill_batch_size and config.data.cot_style != "checklist":
    raise config_lib.ConfigError(
      "config.data.drill_batch_size > 0 drills checklist items: it "
      "needs config.data.cot_style='checklist'"
    )
  if config.data.drill_balance and not config.data.drill_batch_size:
    raise config_lib.ConfigError(
      "config.data.drill_balance balances the item drills: it needs "
      "config.data.drill_batch_size > 0"
    )
  if config.lookup.steps < 0:
    raise config_lib.ConfigError(f"config.lookup.steps={config.lookup.steps}: must be >= 0")
  if config.lookup.steps:
    config_lib.check_positive(
      config, "lookup.batch_size", "lookup.held_out_specs", "lookup.held_out_batches"
    )
    if config.judge.describe_first:
      raise config_lib.ConfigError(
        "config.lookup.steps > 0 drills the plain alignment prompt: a describe_first judge's "
        "prompts carry a caption line the drills lack"
      )
  if config.judge.independent_items and not (
    config.judge.decompose and config.data.drill_batch_size
  ):
    raise config_lib.ConfigError(
      "config.judge.independent_items reads each item's verdict as the drills teach: it needs "
      "config.judge.decompose=True and config.data.drill_batch_size > 0"
    )


def validate_perception(config):
  """Raise ConfigError for perception pre-training settings it cannot run."""
  settings = config.perception
  if settings.steps < 0:
    raise config_lib.ConfigError(f"config.perception.steps={settings.steps}: must be >= 0")
  if settings.steps:
    config_lib.check_positive(config, "perception.batch_size", "perception.n_images")
  if settings.get("dense_targets", False):
    if settings.dense_weight < 0:
      raise config_lib.ConfigError(
        f"config.perception.dense_weight={settings.dense_weight}: must be >= 0"
      )
    try:
      perception.token_grid(config.model.vision, config.data.image_size)
    except ValueError as e:
      raise config_lib.ConfigError(f"config.perception.dense_targets: {e}") from None
  if settings.get("dense_embeddings", False) and not settings.get("dense_targets", False):
    raise config_lib.ConfigError(
      "config.perception.dense_embeddings seeds the language model from the per-token head: "
      "it needs config.perception.dense_targets=True"
    )
  if settings.get("dense_embeddings", False) and settings.get("grounded", False):
    raise config_lib.ConfigError(
      "config.perception.dense_embeddings and grounded both seed the word embeddings: pick one"
    )


def build_model(config, tokenizer) -> Qwen25VL:
  ids = special_token_ids(tokenizer)
  text = Qwen25VLTextModel(vocab_size=len(tokenizer), head="tied", **dict(config.model.text))
  settings = config.get("perception")
  frozen = bool(settings and settings.steps and settings.freeze_tower)
  return Qwen25VL(
    text,
    build_vision(config).clone(merger_gradients_only=frozen),
    ids["image_token_id"],
    ids["video_token_id"],
    ids["vision_start_token_id"],
    ids["vision_end_token_id"],
  )


def build_vision(config) -> Qwen25VLVisionModel:
  """The judge's vision tower (config.model.vision), merging into the text width."""
  vision = VisionConfig(
    out_hidden_size=config.model.text.hidden_size,
    **{
      k: tuple(v) if isinstance(v, (list, tuple)) else v
      for k, v in dict(config.model.vision).items()
    },
  )
  return Qwen25VLVisionModel(vision)


def build_processor(config) -> ImageProcessor:
  v = config.model.vision
  return ImageProcessor(
    patch_size=v.patch_size,
    merge_size=v.spatial_merge_size,
    temporal_patch_size=v.temporal_patch_size,
    min_pixels=(v.patch_size * v.spatial_merge_size) ** 2,
  )


def pipeline_samples(directory: str, prompts, size: int, seed: int) -> np.ndarray:
  """uint8 [N, size, size, 3]: the base pipeline's samples of `prompts` (so the judge sees the
  distribution it will score)."""
  from qwen_image_rl.pipelines.qwen_image import QwenImagePipeline

  pipe = QwenImagePipeline.from_pretrained(directory)
  out = [
    pipe(
      prompt=list(prompts[i : i + 32]),
      num_inference_steps=20,
      height=size,
      width=size,
      seed=seed + i,
    )
    for i in range(0, len(prompts), 32)
  ]
  return np.concatenate(out)


def build_sets(config):
  d = config.data
  t2i_extra = None
  if d.samples_from:
    from qwen_image_rl.data import examples

    prompts = examples.t2i_examples(config.seed, d.n_specs, "train", d.image_size).prompts
    t2i_extra = pipeline_samples(d.samples_from, prompts, d.image_size, config.seed)
  mix = dict(d.variant_weights)
  t2i = D.t2i_set(config.seed, d.n_specs, "train", d.image_size, d.variants, t2i_extra, mix)
  edits = D.edit_set(config.seed, d.n_edits, "train", d.image_size, d.variants, mix=mix)
  return t2i, edits


class Batcher:
  """Builds the step's token / image arrays from the labelled sets (a pure function of step)."""

  def __init__(self, config, judge: V.VLMJudge, t2i: D.JudgeSet, edits: D.JudgeSet):
    self.config, self.judge, self.t2i, self.edits = config, judge, t2i, edits
    self.pairwise = config.loss.kind == "pairwise"
    weights = dict(config.data.task_weights)
    self.tasks = D.T2I_TASKS
    self.task_probs = np.array([weights[t] for t in self.tasks], np.float64)
    self.task_probs /= self.task_probs.sum()
    self.rows = {t: np.flatnonzero(~np.isnan(t2i.scores(t))) for t in self.tasks}
    self.rows["instruction"] = np.arange(len(edits))
    size = config.data.image_size
    grid = judge.processor(np.zeros((size, size, 3), np.uint8))["image_grid_thw"]
    self.grid = grid
    self.length = self._max_length()

  def _data(self, task) -> D.JudgeSet:
    return self.edits if task == "instruction" else self.t2i

  def _example(self, task, row, cot: bool, with_target: bool = True, seen: str | None = None):
    data = self._data(task)
    grids = np.repeat(self.grid, P.NUM_IMAGES[task], axis=0)
    seen = self.given(task, row) if seen is None else seen
    prompt = self.judge.prompt_ids(task, data.prompts[row], grids, seen)
    label = data.labels[row]
    cot_ids = self.cot_ids(task, row) if cot else []
    digit = P.score_bin(label[task]) if with_target else None
    ids, pos = V.assemble(prompt, cot_ids, self.judge.tokens, digit)
    weights = np.zeros(len(ids), np.float32)
    # Targets: the CoT and its marker (CoT mode), then the digit and <|im_end|>.
    weights[len(prompt) if cot else pos + 1 :] = 1.0
    return ids, weights, pos, 1.0 + 4.0 * label[task]

  def cot_ids(self, task, row) -> list[int]:
    """The target chain of thought of a training example, as token ids."""
    data = self._data(task)
    label = data.labels[row]
    items = label.get(f"items/{task}", ()) if self.config.data.cot_style == "checklist" else ()
    text = P.chain_of_thought(
      task, label[f"dims/{task}"], data.prompts[row], self._seen(task, row), items
    )
    return self.judge.tokenizer(text)["input_ids"]

  def _seen(self, task, row) -> str:
    """describe_in_cot: the alignment CoT describes the image; the instruction CoT the source,
    then the output (so the check becomes a comparison of texts). "" otherwise."""
    if not self.config.data.describe_in_cot or task not in ("alignment", "instruction"):
      return ""
    data = self._data(task)
    if data.shown[row] is None:  # a pipeline sample: its scene is unknown
      return ""
    seen = D.describe(data.shown[row])
    return f"{D.describe(data.edits[row].source)}. {seen}" if task == "instruction" else seen

  def given(self, task, row) -> str:
    """describe_first judges: the prompt's description of the image(s), here the true scene's
    caption in a phrasing drawn from (seed, row) (at inference, the judge's own caption)."""
    if not self.judge.describe_first or task not in P.DESCRIBED_TASKS:
      return ""
    rng = np.random.default_rng([self.config.seed, row, P.NUM_IMAGES[task]])
    return P.seen_text(task, self._data(task).shown_captions(row, rng))

  def _max_length(self) -> int:
    longest = longest_cot = 0
    # Described prompts vary in length with their captions: measure every example.
    scan = None if self.judge.describe_first else 64
    for task, rows in self.rows.items():
      for row in rows[:scan]:
        longest = max(longest, len(self._example(task, row, cot=True)[0]))
        longest_cot = max(longest_cot, len(self.cot_ids(task, row)) + 1)  # + the marker
    if longest_cot > self.judge.max_cot_tokens:  # e.g. describe_in_cot at the default bound
      print(
        f"reward_sft: WARNING: training chains of thought run to {longest_cot} tokens (with the "
        f"score marker) but config.judge.max_cot_tokens={self.judge.max_cot_tokens}: at "
        "inference longer ones are cut and counted invalid",
        flush=True,
      )
    return V.padded_length(longest + 16)  # headroom for longer verdict lists

  def _images(self, task, row):
    data = self._data(task)
    return [data.sources[row], data.images[row]] if task == "instruction" else [data.images[row]]

  def picks(self, step: int):
    """[(task, row, cot)] of the step: t2i examples first, then edit examples."""
    rng = np.random.default_rng([self.config.seed, step])
    d = self.config.data
    tasks = [
      self.tasks[i] for i in rng.choice(len(self.tasks), d.t2i_batch_size, p=self.task_probs)
    ]
    tasks += ["instruction"] * d.edit_batch_size
    picks = []
    for task in tasks:
      row = int(rng.choice(self.rows[task]))
      cot = bool(rng.random() >= d.no_cot_fraction)
      picks.append((task, row, cot))
    return picks

  def pair_picks(self, step: int):
    """[(task, winner row, loser row, weight)]: the two images of one spec, oracle-ordered."""
    rng = np.random.default_rng([self.config.seed, step])
    picks = []
    for task, row, _ in self.picks(step):
      data = self._data(task)
      group = row - row % data.variants
      a, b = group + rng.choice(data.variants, 2, replace=False)
      sa, sb = data.labels[a].get(task), data.labels[b].get(task)
      if sa is None or sb is None:  # portrait task: both rows are portraits (same spec)
        sa = sb = 0.0
      w, l = (a, b) if sa >= sb else (b, a)
      picks.append((task, w, l, float(abs(sa - sb) >= self.config.loss.min_margin)))
    return picks

  def __call__(self, step: int) -> dict:
    if self.pairwise:
      pairs = self.pair_picks(step)
      rows = [(t, w, False) for t, w, _, _ in pairs] + [(t, l, False) for t, _, l, _ in pairs]
      batch = self._arrays(rows, with_target=False)
      batch["pair_weight"] = np.array([p[3] for p in pairs], np.float32)
      return batch
    return self._arrays(self.picks(step))

  def text_batch(self, step: int, n: int) -> dict:
    """Language pre-training (describe_first): n examples, half alignment and half instruction,
    of images that are exactly a scene's render (TEXT_KINDS), each described by a freshly
    phrased caption of its scene. Fed without image features, their verdicts and score follow
    from the two texts alone. Token arrays only, each image's tokens left in place."""
    picks = self.text_picks(step, n)
    seqs, w, pos, target = zip(*(self._example(t, r, c, seen=s) for t, r, c, s in picks))
    ids, mask, weights = padded_tokens(seqs, w, self.length + TEXT_HEADROOM, self.judge.tokens.pad)
    grids = np.concatenate([np.repeat(self.grid, P.NUM_IMAGES[p[0]], axis=0) for p in picks])
    positions, _ = self.judge.model.rope_index(ids, mask, grids)
    return {
      "input_ids": ids,
      "attention_mask": mask,
      "position_ids": positions,
      "weights": weights,
      "score_pos": np.array(pos, np.int32),
      "score_target": np.array(target, np.float32),
    }

  def text_picks(self, step: int, n: int):
    """[(task, row, cot, description)] of text_batch(step, n)."""
    rng = np.random.default_rng([self.config.seed, step, 2])
    picks = []
    for task in ("alignment",) * (n - n // 2) + ("instruction",) * (n // 2):
      row = int(rng.choice(self.text_rows[task]))
      cot = bool(rng.random() >= self.config.data.no_cot_fraction)
      picks.append((task, row, cot, P.seen_text(task, self._data(task).shown_captions(row, rng))))
    return picks

  @functools.cached_property
  def text_rows(self) -> dict:
    out = {}
    for task in P.DESCRIBED_TASKS:
      kinds = self._data(task).kinds
      out[task] = np.array([r for r in self.rows[task] if kinds[r] in TEXT_KINDS])
      if not len(out[task]):
        raise ValueError(f"no {task} example shows an exact render ({TEXT_KINDS})")
    return out

  def _arrays(self, picks, with_target: bool = True) -> dict:
    seqs, w, pos, target = zip(*(self._example(t, r, c, with_target) for t, r, c in picks))
    ids, mask, weights = padded_tokens(seqs, w, self.length, self.judge.tokens.pad)
    images = [image for task, row, _ in picks for image in self._images(task, row)]
    return {
      **model_inputs(self.judge, ids, mask, images),
      "weights": weights,
      "score_pos": np.array(pos, np.int32),
      "score_target": np.array(target, np.float32),
    }


def padded_tokens(seqs, weights, length: int, pad: int):
  """(ids, attention mask, loss weights), each [n, length]: the sequences right-padded, each
  with its per-token loss weights."""
  n = len(seqs)
  ids = np.full((n, length), pad, np.int32)
  mask, out = np.zeros((n, length), np.int32), np.zeros((n, length), np.float32)
  for i, (seq, w) in enumerate(zip(seqs, weights)):
    if len(seq) > length:
      raise ValueError(f"judge example of {len(seq)} tokens exceeds the batch length {length}")
    ids[i, : len(seq)], mask[i, : len(seq)], out[i, : len(seq)] = seq, 1, w
  return ids, mask, out


def answered_tokens(prompts, answers, length: int, pad: int):
  """padded_tokens of each prompt followed by its answer, the loss on the answer."""
  weights = [[0.0] * len(p) + [1.0] * len(a) for p, a in zip(prompts, answers)]
  return padded_tokens([p + a for p, a in zip(prompts, answers)], weights, length, pad)


def caption_tokens(prompt, answers, length: int, pad: int):
  """answered_tokens of captioning examples: one prompt, then each answer."""
  return answered_tokens([prompt] * len(answers), answers, length, pad)


def model_inputs(judge: V.VLMJudge, ids, mask, images, prefix: str = "") -> dict:
  """The forward pass's arrays (ids, mask, mRoPE positions, pixels), keys under `prefix`."""
  processed = judge.processor(images)
  positions, _ = judge.model.rope_index(ids, mask, processed["image_grid_thw"])
  inputs = {
    "input_ids": ids,
    "attention_mask": mask,
    "position_ids": positions,
    "pixel_values": processed["pixel_values"],
  }
  return {prefix + k: v for k, v in inputs.items()}


class CaptionBatcher:
  """The step's captioning examples (a pure function of step): arrays under "caption/" keys."""

  def __init__(self, config, judge: V.VLMJudge, grid):
    from qwen_image_rl.data import examples

    d = config.data
    self.config, self.judge, self.grid = config, judge, grid
    ex = examples.t2i_examples(config.seed, d.n_specs, "train", d.image_size)
    self.images, self.captions = ex.images, ex.prompts
    self.prompt = judge.caption_prompt_ids(grid)
    self.answers = [judge.tokenizer(c)["input_ids"] + [judge.tokens.im_end] for c in self.captions]
    longest_answer = max(map(len, self.answers))
    if judge.describe_first and longest_answer > judge.max_caption_tokens:
      print(
        f"reward_sft: WARNING: training captions run to {longest_answer} tokens but "
        f"config.judge.max_caption_tokens={judge.max_caption_tokens}: described prompts will "
        "carry cut captions",
        flush=True,
      )
    self.length = V.padded_length(len(self.prompt) + max(map(len, self.answers)))

  def __call__(self, step: int) -> dict:
    n, L = self.config.data.caption_batch_size, self.length
    rng = np.random.default_rng([self.config.seed, step, 1])
    rows = rng.choice(len(self.captions), n)
    answers = [self.answers[row] for row in rows]
    ids, mask, weights = caption_tokens(self.prompt, answers, L, self.judge.tokens.pad)
    images = []
    for row in rows:
      image = self.images[row]
      if rng.random() < 0.5:  # the content, not the pixels, is what the caption names
        image = perception.CORRUPTIONS[int(rng.integers(len(perception.CORRUPTIONS)))](image, rng)
      images.append(image)
    return {**model_inputs(self.judge, ids, mask, images, "caption/"), "caption/weights": weights}


class DrillBatcher:
  """The step's item drills (a pure function of step): an alignment example of the training
  set, one item of its checklist as the whole chain of thought, the loss on that item's verdict.
  Arrays under "drill/" keys. `balanced`: half the drills a step are of items the oracle calls
  good, half of the rest (74% of the items are good: unbalanced, "good" is a safe guess)."""

  def __init__(
    self,
    config,
    judge: V.VLMJudge,
    t2i: D.JudgeSet,
    grid,
    batch_size=None,
    balanced=None,
    length=None,
    exact_only=False,
  ):
    self.config, self.judge, self.t2i, self.grid = config, judge, t2i, grid
    d = config.data
    self.batch_size = d.drill_batch_size if batch_size is None else batch_size
    self.balanced = d.drill_balance if balanced is None else balanced
    self.rows = np.flatnonzero(~np.isnan(t2i.scores("alignment")))
    if exact_only:  # the verdicts then read the content, not the oracle's detectors' failures
      self.rows = np.array([r for r in self.rows if t2i.kinds[r] in D.EXACT_RENDER_KINDS])
    self.verdict_ids = dict(zip((w for _, w in P.VERDICTS), judge.verdict_ids))
    self.period = judge.tokenizer(".")["input_ids"]
    if length is None:
      length = V.padded_length(max(len(self._drill(int(r), 0)[0]) for r in self.rows[:64]) + 16)
    self.length = length
    if self.balanced:
      items = [(r, k) for r in self.rows for k in range(len(self.items(r)))]
      good = np.array([self.is_good(r, k) for r, k in items], bool)
      self.by_verdict = (np.array(items)[good], np.array(items)[~good])
      if not (good.any() and (~good).any()):
        raise ValueError("balanced item drills need items the oracle calls good and others")

  def items(self, row: int):
    return self.t2i.labels[row]["items/alignment"]

  def is_good(self, row: int, k: int) -> bool:
    return P.verdict(self.items(row)[k].value) == "good"

  def _drill(self, row: int, k: int):
    item = self.items(row)[k]
    prompt = self.judge.prompt_ids("alignment", self.t2i.prompts[row], self.grid)
    phrase = self.judge.tokenizer(item.phrase)["input_ids"]
    ids = prompt + phrase + [self.verdict_ids[P.verdict(item.value)]] + self.period
    weights = [0.0] * len(ids)
    weights[len(prompt) + len(phrase)] = 1.0
    return ids, weights

  def picks(self, step: int) -> list[tuple[int, int]]:
    """[(row, item index)] of the step's drills."""
    rng = np.random.default_rng([self.config.seed, step, 5])
    n = self.batch_size
    if self.balanced:
      good, rest = self.by_verdict
      chosen = [good[i] for i in rng.integers(len(good), size=n - n // 2)]
      chosen += [rest[i] for i in rng.integers(len(rest), size=n // 2)]
      return [(int(r), int(k)) for r, k in chosen]
    picks = []
    for row in rng.choice(self.rows, n):
      picks.append((int(row), int(rng.integers(len(self.items(row))))))
    return picks

  def arrays(self, picks) -> dict:
    seqs, weights = zip(*(self._drill(row, k) for row, k in picks))
    ids, mask, w = padded_tokens(seqs, weights, self.length, self.judge.tokens.pad)
    images = [self.t2i.images[row] for row, _ in picks]
    return {**model_inputs(self.judge, ids, mask, images, "drill/"), "drill/weights": w}

  def __call__(self, step: int) -> dict:
    return self.arrays(self.picks(step))


class FreshDrillBatcher:
  """Balanced item drills on scenes drawn afresh for each step (train split; a pure function of
  (seed, step)): a fixed set's drills are learnt by heart long before the lookup generalises."""

  def __init__(self, config, judge: V.VLMJudge, grid, batch_size: int, length: int, mix: dict):
    self.config, self.judge, self.grid = config, judge, grid
    self.batch_size, self.length, self.mix = batch_size, length, mix

  def drills(self, step: int) -> DrillBatcher:
    d = self.config.data
    specs = max(2, self.batch_size // d.variants)
    scenes = D.t2i_set(
      int(np.random.default_rng([self.config.seed, step, 6]).integers(2**31)),
      specs,
      "train",
      d.image_size,
      d.variants,
      mix=self.mix,
    )
    return DrillBatcher(
      self.config, self.judge, scenes, self.grid, self.batch_size, True, self.length
    )

  def __call__(self, step: int) -> dict:
    drills = self.drills(step)
    return drills.arrays(drills.picks(step))


class DecomposeBatcher:
  """The step's decomposition examples (a pure function of step), text only: each training
  prompt answered by its checklist items (P.items_text). Arrays under "decompose/" keys."""

  def __init__(self, config, judge: V.VLMJudge, t2i: D.JudgeSet):
    self.config, self.judge = config, judge
    self.prompts, seen = [], set()
    answers = []
    for row, prompt in enumerate(t2i.prompts):
      if prompt in seen:  # the items are the prompt's (the requested scene's), whatever is shown
        continue
      seen.add(prompt)
      self.prompts.append(judge.decompose_prompt_ids(prompt))
      phrases = [item.phrase for item in t2i.labels[row]["items/alignment"]]
      answers.append(judge.tokenizer(P.items_text(phrases))["input_ids"] + [judge.tokens.im_end])
    self.answers = answers
    longest_answer = max(map(len, answers))
    if longest_answer > judge.max_item_tokens:
      raise ValueError(
        f"reward_sft: decompositions run to {longest_answer} tokens but "
        f"config.judge.max_item_tokens={judge.max_item_tokens}: the judge could not finish them"
      )
    self.length = V.padded_length(max(len(p) + len(a) for p, a in zip(self.prompts, answers)))

  def __call__(self, step: int) -> dict:
    rng = np.random.default_rng([self.config.seed, step, 4])
    rows = rng.choice(len(self.answers), self.config.data.decompose_batch_size)
    ids, mask, w = answered_tokens(
      [self.prompts[r] for r in rows],
      [self.answers[r] for r in rows],
      self.length,
      self.judge.tokens.pad,
    )
    positions, _ = self.judge.model.rope_index(ids, mask, None)
    arrays = dict(input_ids=ids, attention_mask=mask, position_ids=positions, weights=w)
    return {f"decompose/{k}": v for k, v in arrays.items()}


def token_ce(logits, input_ids, weights):
  """Weighted next-token cross-entropy (weights on the target positions)."""
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
  nll = -jnp.take_along_axis(logp, input_ids[:, 1:, None], axis=-1)[..., 0]
  w = weights[:, 1:]
  return jnp.sum(nll * w) / jnp.maximum(jnp.sum(w), 1.0)


def pointwise_terms(logits, batch, digit_ids, mse_weight: float):
  """The pointwise judge loss: token CE on the answer + mse_weight (R - y)^2 at the score."""
  logits = logits.astype(jnp.float32)
  ce = token_ce(logits, batch["input_ids"], batch["weights"])
  at = jnp.take_along_axis(logits, batch["score_pos"][:, None, None], axis=1)[:, 0]
  mse = jnp.mean((V.expected_score(at, digit_ids) - batch["score_target"]) ** 2)
  return ce + mse_weight * mse, {"token_ce": ce, "score_mse": mse}


def logits_of(model: Qwen25VL, params, batch, prefix: str, vision_layout):
  """The model's logits on the forward-pass arrays stored under `prefix` (model_inputs)."""
  return model.apply(
    {"params": params},
    batch[prefix + "input_ids"],
    batch[prefix + "attention_mask"],
    batch[prefix + "pixel_values"],
    position_ids=batch[prefix + "position_ids"],
    vision_layout=vision_layout,
  )


def make_loss(model: Qwen25VL, digit_ids, layout, config, caption_layout=None, drill_layout=None):
  kind, mse_weight = config.loss.kind, config.loss.score_mse_weight

  def forward(params, batch, prefix="", vision_layout=layout):
    return logits_of(model, params, batch, prefix, vision_layout)

  def pointwise(params, batch):
    return pointwise_terms(forward(params, batch), batch, digit_ids, mse_weight)

  def pairwise(params, batch):
    # Only the score position is needed: the LM head runs there alone.
    hidden_logits = model.apply(
      {"params": params},
      batch["input_ids"],
      batch["attention_mask"],
      batch["pixel_values"],
      position_ids=batch["position_ids"],
      vision_layout=layout,
      output_positions=batch["score_pos"][:, None],
    )
    r = V.expected_score(hidden_logits[:, 0], digit_ids)
    half = r.shape[0] // 2
    w = batch["pair_weight"]
    bt = -jax.nn.log_sigmoid(r[:half] - r[half:])
    loss = jnp.sum(bt * w) / jnp.maximum(jnp.sum(w), 1.0)
    acc = jnp.sum((r[:half] > r[half:]) * w) / jnp.maximum(jnp.sum(w), 1.0)
    return loss, {"pair_accuracy": acc}

  judge_loss = pointwise if kind == "pointwise" else pairwise

  def with_auxiliary(params, batch):
    loss, aux = judge_loss(params, batch)
    for name, aux_layout in (("caption", caption_layout), ("drill", drill_layout)):
      if aux_layout is None:
        continue
      logits = forward(params, batch, f"{name}/", aux_layout)
      ce = token_ce(logits, batch[f"{name}/input_ids"], batch[f"{name}/weights"])
      loss = loss + config.loss[f"{name}_weight"] * ce
      aux = {**aux, f"{name}_ce": ce}
    if "decompose/input_ids" in batch:  # text only: no image in these sequences
      logits = model.apply(
        {"params": params},
        batch["decompose/input_ids"],
        batch["decompose/attention_mask"],
        position_ids=batch["decompose/position_ids"],
      )
      ce = token_ce(logits, batch["decompose/input_ids"], batch["decompose/weights"])
      loss, aux = loss + config.loss.decompose_weight * ce, {**aux, "decompose_ce": ce}
    return loss, aux

  return with_auxiliary


def make_train_step(loss_fn, tx):
  def step(state: TrainState, batch):
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new = state.replace(
      step=state.step + 1, params=jax.tree.map(jnp.add, state.params, updates), opt_state=opt_state
    )
    return keep_if_finite(state, new, loss), {"loss": loss, **aux}

  return step


def freeze_vision_tower(tx):
  """`tx` with the vision tower's updates set to zero, except its merger (which maps the tower's
  features into the language model and must learn with it). The update is zeroed after `tx`,
  so the optimiser state keeps the parameters' tree (and shardings)."""
  frozen = lambda path: "visual" in str(path[0]) and "merger" not in str(path[1])

  def update(updates, state, params=None):
    del params
    zeroed = jax.tree_util.tree_map_with_path(
      lambda path, u: jnp.zeros_like(u) if frozen(path) else u, updates
    )
    return zeroed, state

  return optax.chain(tx, optax.GradientTransformation(lambda _: optax.EmptyState(), update))


def with_pretrained_vision(state, shardings, model, judge: V.VLMJudge, config):
  """`state` with its vision tower replaced by one pre-trained on perception targets (and, for
  a grounded head, the language model's embeddings of the head's words replaced by the head's;
  with `perception.dense_embeddings`, those of the per-token words by the directions in which
  the per-token head reads them, so a prompt word matches the image tokens that show it)."""
  trained = perception.train_perception(
    model.visual.clone(merger_gradients_only=False),
    judge.processor,
    config.perception,
    config.seed,
    config.data.image_size,
  )
  print(
    f"reward_sft: vision tower pre-trained, final perception loss {trained.loss:.4f}", flush=True
  )
  params = {
    **state.params,
    "visual": jax.device_put(trained.params["visual"], shardings.params["visual"]),
  }
  dense = config.perception.get("dense_embeddings", False)
  if dense or trained.word_embedding is not None:
    language_model = jax.device_get(params["language_model"])
    words, rows = trained.dense_word_embedding if dense else (trained.words, trained.word_embedding)
    if dense:  # a kernel's columns have their own scale
      rows = at_embedding_scale(rows, language_model["embed_tokens"]["embedding"])
    seeded = with_word_embeddings(language_model, judge.tokenizer, words, rows)
    params["language_model"] = jax.device_put(seeded, shardings.params["language_model"])
  return state.replace(params=params)


def at_embedding_scale(rows, table) -> np.ndarray:
  """`rows` rescaled to the embedding table's mean row norm (a head's kernel columns have
  their own scale; the language model's layers expect its embeddings')."""
  rows = np.asarray(rows)
  target = np.linalg.norm(np.asarray(table), axis=-1).mean()
  return rows / np.maximum(np.linalg.norm(rows, axis=-1, keepdims=True), 1e-12) * target


def with_word_embeddings(language_model: dict, tokenizer, words, embedding) -> dict:
  """The language model's params with the embedding row of each word that is one token (after a
  space; a glyph digit is the piece after a bare space token) set to `embedding`'s row."""
  space = tokenizer(" ")["input_ids"]
  table = np.array(language_model["embed_tokens"]["embedding"], copy=True)
  for word, row in zip(words, np.asarray(embedding)):
    ids = tokenizer(" " + word)["input_ids"]
    if len(ids) == 2 and ids[:1] == space:
      ids = ids[1:]
    if len(ids) == 1:
      table[ids[0]] = row
  return {**language_model, "embed_tokens": {"embedding": table}}


def repeated_layout(model: Qwen25VL, grid, n: int) -> dict:
  """The vision layout (as jit arguments) of `n` images of one grid."""
  return {k: jnp.asarray(v) for k, v in model.layout(np.repeat(grid, n, axis=0)).items()}


def stage_optimizer(settings) -> optax.GradientTransformation:
  """AdamW on a warmup-cosine schedule for a pre-training stage (`settings.lr`, `.steps`)."""
  schedule = optax.warmup_cosine_decay_schedule(
    0.0, settings.lr, min(50, settings.steps // 4), settings.steps
  )
  return optax.adamw(schedule, weight_decay=1e-4)


def pretrain_language(params, model: Qwen25VL, batcher: Batcher, config, log=print):
  """`params` with the language model pre-trained on text_batch examples (the vision tower is
  untouched): a from-scratch LM does not learn to compare the prompt with a description from
  rubric SFT alone (README, learned rewards). A pure function of (params, seed, config)."""
  settings = config.language
  n = settings.batch_size
  # The image tokens stay in place with zero features: the same layout as the judge's prompts.
  image_tokens = int((batcher.text_batch(0, n)["input_ids"] == model.image_token_id).sum())
  features = jnp.zeros((image_tokens, model.language_model.hidden_size), jnp.float32)
  digit_ids = jnp.asarray(batcher.judge.tokens.digits)
  frozen = {"visual": params["visual"]}
  text = {k: v for k, v in params.items() if k != "visual"}
  tx = stage_optimizer(settings)

  def loss_fn(text, batch):
    logits = model.apply(
      {"params": {**text, **frozen}},
      batch["input_ids"],
      batch["attention_mask"],
      image_features=features,
      position_ids=batch["position_ids"],
    )
    return pointwise_terms(logits, batch, digit_ids, config.loss.score_mse_weight)

  @jax.jit
  def step(text, opt, batch):
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(text, batch)
    updates, opt = tx.update(grads, opt, text)
    return optax.apply_updates(text, updates), opt, {"loss": loss, **aux}

  opt = tx.init(text)
  for i in range(settings.steps):
    text, opt, aux = step(text, opt, batcher.text_batch(i, n))
    if (i + 1) % max(1, settings.steps // 10) == 0 or i + 1 == settings.steps:
      numbers = ", ".join(f"{k} {float(v):.4f}" for k, v in sorted(aux.items()))
      log(f"language pre-training: step {i + 1}/{settings.steps}, {numbers}")
  return {**text, **frozen}


def pretrain_lookup(params, model: Qwen25VL, driller, held_out, config, log=print):
  """`params` with the language model (and the tower's merger) trained on balanced item drills
  alone before reward SFT: each drill one lookup of an item of the prompt in the image, half of
  them items the oracle does not call good, so no prior on the verdict answers them. Logs the
  held-out AUC of p(good) for good against other items (`held_out`, a balanced DrillBatcher of
  the val split). A pure function of (params, seed, config)."""
  settings = config.lookup
  layout = repeated_layout(model, driller.grid, settings.batch_size)
  tx = freeze_vision_tower(stage_optimizer(settings))

  logits = lambda params, batch: logits_of(model, params, batch, "drill/", layout)

  def loss_fn(params, batch):
    return token_ce(logits(params, batch), batch["drill/input_ids"], batch["drill/weights"])

  @jax.jit
  def step(params, opt, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt, loss

  p_good = jax.jit(functools.partial(drill_p_good, logits, jnp.asarray(driller.judge.verdict_ids)))
  held_out_picks = [held_out.picks(i) for i in range(settings.held_out_batches)]
  held_out_batches = [held_out.arrays(p) for p in held_out_picks]
  truths = np.array([held_out.is_good(r, k) for picks in held_out_picks for r, k in picks])
  kinds = np.array([held_out.items(r)[k].kind for picks in held_out_picks for r, k in picks])

  opt = tx.init(params)
  for i in range(settings.steps):
    params, opt, loss = step(params, opt, driller(i))
    if (i + 1) % max(1, settings.steps // 10) == 0 or i + 1 == settings.steps:
      probs = np.concatenate([np.asarray(p_good(params, b)) for b in held_out_batches])
      log(
        f"lookup pre-training: step {i + 1}/{settings.steps}, drill_ce {float(loss):.4f}, "
        f"held-out good AUC {good_auc(probs, truths):.3f}, accuracy "
        f"{np.mean((probs > 0.5) == truths):.3f} (balanced, {len(truths)} items)"
      )
  by_kind = {k: good_auc(probs[kinds == k], truths[kinds == k]) for k in sorted(set(kinds))}
  log(
    "lookup pre-training: held-out good AUC by item "
    + ", ".join(f"{k} {v:.2f}" for k, v in by_kind.items())
  )
  return params


def run_lookup_stage(params, model, judge, t2i, batcher, config):
  """pretrain_lookup on the training set's drills, held out on the val split's."""
  d, settings = config.data, config.lookup
  mix = {**d.variant_weights, **(D.EXACT_RENDER_MIX if settings.exact_renders else {})}
  held_out_set = D.t2i_set(config.seed, settings.held_out_specs, "val", d.image_size, 2, mix=mix)
  drills = lambda data, length=None: DrillBatcher(
    config, judge, data, batcher.grid, settings.batch_size, True, length, settings.exact_renders
  )
  held_out = drills(held_out_set, drills(t2i).length + 16)  # val prompts may run longer
  train_drills = (
    FreshDrillBatcher(config, judge, batcher.grid, settings.batch_size, held_out.length, mix)
    if settings.fresh_scenes
    else drills(t2i, held_out.length)
  )
  return pretrain_lookup(params, model, train_drills, held_out, config)


def drill_p_good(logits_fn, verdict_ids, params, batch):
  """[n] p(good) among the verdict words at each drill's verdict (the token its weight marks)."""
  logits = logits_fn(params, batch).astype(jnp.float32)
  before = jnp.argmax(batch["drill/weights"], axis=1) - 1  # the position that predicts it
  at = jnp.take_along_axis(logits, before[:, None, None], axis=1)[:, 0]
  good = [w for _, w in P.VERDICTS].index("good")
  return jax.nn.softmax(at[:, verdict_ids], axis=-1)[:, good]


def good_auc(p_good, truths) -> float:
  """AUC of p(good) for good against other items; NaN without both."""
  from qwen_image_rl.judges import face_id as F

  truths = np.asarray(truths, bool)
  if truths.all() or not truths.any():
    return float("nan")
  return F.auc(p_good[truths], p_good[~truths])


REQUIRED = {
  "total_steps": int,
  "seed": int,
  "data.image_size": int,
  "data.n_specs": int,
  "data.n_edits": int,
  "data.variants": int,
  "data.t2i_batch_size": int,
  "data.edit_batch_size": int,
  "data.no_cot_fraction": float,
  "data.caption_batch_size": int,
  "data.decompose_batch_size": int,
  "data.drill_batch_size": int,
  "data.samples_from": str,
  "data.describe_in_cot": bool,
  "data.cot_style": str,
  "data.variant_weights": ml_collections.ConfigDict,
  "loss.kind": str,
  "loss.score_mse_weight": float,
  "loss.min_margin": float,
  "loss.caption_weight": float,
  "loss.decompose_weight": float,
  "loss.drill_weight": float,
  "perception.steps": int,
  "perception.batch_size": int,
  "perception.lr": float,
  "perception.n_images": int,
  "perception.freeze_tower": bool,
  "perception.balance_groups": bool,
  "perception.grounded": bool,
  "perception.dense_targets": bool,
  "perception.dense_weight": float,
  "perception.dense_embeddings": bool,
  "judge.max_cot_tokens": int,
  "judge.describe_first": bool,
  "judge.max_caption_tokens": int,
  "judge.decompose": bool,
  "judge.max_item_tokens": int,
  "judge.verdict_samples": int,
  "judge.independent_items": bool,
  "language.steps": int,
  "language.batch_size": int,
  "language.lr": float,
  "lookup.steps": int,
  "lookup.batch_size": int,
  "lookup.lr": float,
  "lookup.held_out_specs": int,
  "lookup.held_out_batches": int,
  "lookup.fresh_scenes": bool,
  "lookup.exact_renders": bool,
  "data.drill_balance": bool,
}


def train(config, workdir):
  """Tiny multi-task VLM judge (CoT SFT + expected-score regression, or Bradley-Terry pairs)."""
  ctx = common.make_context(config, workdir)
  export = os.path.join(workdir, "export")
  tokenizer = V.build_judge_tokenizer(os.path.join(export, "tokenizer"))
  model = build_model(config, tokenizer)
  judge = V.VLMJudge(
    model,
    None,
    tokenizer,
    build_processor(config),
    max_cot_tokens=config.judge.max_cot_tokens,
    describe_first=config.judge.describe_first,
    max_caption_tokens=config.judge.max_caption_tokens,
    decompose=config.judge.decompose,
    max_item_tokens=config.judge.max_item_tokens,
    verdict_samples=config.judge.verdict_samples,
    independent_items=config.judge.independent_items,
  )
  print("reward_sft: rendering, corrupting and labelling the training set ...", flush=True)
  t2i, edits = build_sets(config)
  batcher = Batcher(config, judge, t2i, edits)
  captioner = (
    CaptionBatcher(config, judge, batcher.grid) if config.data.caption_batch_size else None
  )
  decomposer = DecomposeBatcher(config, judge, t2i) if config.judge.decompose else None
  driller = DrillBatcher(config, judge, t2i, batcher.grid) if config.data.drill_batch_size else None
  print(
    f"reward_sft: {len(t2i)} T2I and {len(edits)} edit images, sequence length "
    f"{batcher.length}, loss {config.loss.kind}",
    flush=True,
  )

  example = batcher(0)
  images_layout = lambda n: repeated_layout(model, batcher.grid, n)
  layout = images_layout(len(example["pixel_values"]) // int(batcher.grid.prod()))
  caption_layout = images_layout(config.data.caption_batch_size) if captioner else None
  drill_layout = images_layout(config.data.drill_batch_size) if driller else None
  tx = optim.make_optimizer(config.optim, config.total_steps)
  if config.perception.steps and config.perception.freeze_tower:
    tx = freeze_vision_tower(tx)
  init = lambda key: model.init(key, jnp.zeros((1, 8), jnp.int32), jnp.ones((1, 8), jnp.int32))[
    "params"
  ]
  state, shardings = create_train_state(init, tx, ctx.mesh, ctx.rules, config.seed)
  state, start = common.restore_or_keep(ctx, state, shardings)
  if start == 0 and config.perception.steps:
    state = with_pretrained_vision(state, shardings, model, judge, config)
  if start == 0 and config.lookup.steps:
    params = run_lookup_stage(jax.device_get(state.params), model, judge, t2i, batcher, config)
    state = state.replace(params=jax.device_put(params, shardings.params))
  if start == 0 and config.language.steps:
    params = pretrain_language(jax.device_get(state.params), model, batcher, config)
    state = state.replace(params=jax.device_put(params, shardings.params))

  def batch_for_step(step):
    batch = batcher(step)
    if captioner:
      batch.update(captioner(step))
    if decomposer:
      batch.update(decomposer(step))
    if driller:
      batch.update(driller(step))
    out = {}
    for k, v in batch.items():
      if k.endswith(("position_ids", "pixel_values")):
        out[k] = jax.device_put(v, parallel.replicated(ctx.mesh))
      else:
        out[k] = jax.device_put(v, parallel.batch_sharding(ctx.mesh, v.shape, ctx.rules))
    return out

  loss_fn = make_loss(
    model, jnp.asarray(judge.tokens.digits), layout, config, caption_layout, drill_layout
  )
  step_fn = jax.jit(
    make_train_step(loss_fn, tx), donate_argnums=(0,), out_shardings=(shardings, None)
  )
  with parallel.sharding_context(ctx.mesh, ctx.rules):
    state, history = common.fit(
      ctx,
      state,
      train_step=step_fn,
      batch_for_step=batch_for_step,
      start_step=start,
      total_steps=config.total_steps,
    )
  judge.params = jax.device_get(state.params)
  if jax.process_index() == 0:
    judge.save(os.path.join(export, "judge"), extra={"loss": config.loss.kind})
    print(f"reward_sft: exported {os.path.join(export, 'judge')}", flush=True)
  ctx.close()
  return history
