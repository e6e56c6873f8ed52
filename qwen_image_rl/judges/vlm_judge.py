"""Chain-of-thought pointwise VLM judges on the Flax Qwen2.5-VL, with an expected-score readout.

Scoring one batch (`VLMJudge.score`):
  1. CoT mode: greedy generation from the judge prompt (jitted KV-cache loop) for at most
     `max_cot_tokens` tokens, stopping at the marker token " Score" (or <|im_end|>). A sample
     that never emits the marker has no parsable score position: it is INVALID, its reward is
     NaN (never a number) and `JudgeOutput.valid` says so. No-CoT mode skips this step.
  2. One forward pass over prompt + chain of thought + " Score: ". The score position is the last
     token; there the logits of the five digit tokens "1".."5" are read.
  3. Readout: p(s) = softmax over those five logits only (renormalised over the five score
     tokens; the rest of the vocabulary is ignored), E = sum_s s p(s) in [1, 5], and the reward
     is (E - 1) / 4 in [0, 1]. On the host this is the serving protocol's float64 readout of the
     five float32 log-probs (`score_logprobs`), the same function a remote client applies to a
     served judge's reply, so served and in-process rewards agree bit for bit.
The no-CoT path is step 2 with an empty chain of thought, so both paths read the same position
of the same template (tests check it). Training (trainers/reward_sft.py) builds its sequences
with the same `assemble`.

Decomposing checklist judges (`decompose`, configs/judge.py:tiny_decompose) write their alignment
chain of thought in two passes. First the prompt alone, with no image, is decomposed into its
items (`items_of`: "count. small red circle. top left."); an answer without <|im_end|> within
`max_item_tokens`, or with no item, is invalid. Then the checklist is written item by item: each
phrase is given and the judge chooses its verdict from the four verdict words' logits, greedily
(`verdict_samples` = 0) or sampled from their softmax; then the score is read as above. With
`verdict_samples` = K the reward is the mean over K sampled checklists of the expected score: a
Monte-Carlo estimate of E over chains of thought of sum_s s p(s | chain), the paper's expected
score with the chain of thought integrated out instead of fixed at its greedy decoding.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qwen_image_rl import paths
from qwen_image_rl.judges import prompts as P
from qwen_image_rl.models import qwen2_5_vl_generate as gen
from qwen_image_rl.models.qwen2_5_vl_processor import ImageProcessor, expand_image_tokens
from qwen_image_rl.serving import protocol

JUDGE_CONFIG = 'judge_config.json'
# judge_config.json keys that set up a loaded judge (the rest describe its training).
LOADED_SETTINGS = (
  'max_cot_tokens',
  'describe_first',
  'max_caption_tokens',
  'decompose',
  'max_item_tokens',
  'verdict_samples',
  'independent_items',
)
PREPROCESSOR_CONFIG = 'preprocessor_config.json'
P_VALUES = tuple(int(d) for d in P.SCORE_DIGITS)


def build_judge_tokenizer(directory: str):
  """The tiny world's tokenizer, extended with the judges' rubric and verdict words."""
  from qwen_image_rl.data import captions
  from qwen_image_rl.data.tokenizer import build_qwen_tokenizer, load_tokenizer

  if os.path.isfile(os.path.join(directory, 'tokenizer.json')):
    return load_tokenizer(directory)
  words = sorted(set(captions.vocabulary()) | set(P.vocabulary_words()))
  return build_qwen_tokenizer(words, directory, extra_texts=P.vocabulary_texts())


@dataclasses.dataclass(frozen=True)
class ScoreTokens:
  """Token ids of the answer format: marker " Score", ":", " ", the digits, <|im_end|>, pad."""

  marker: int
  colon: int
  space: int
  digits: tuple[int, ...]
  im_end: int
  pad: int

  @classmethod
  def from_tokenizer(cls, tokenizer) -> ScoreTokens:
    def single(text):
      ids = tokenizer(text, add_special_tokens=False)['input_ids']
      if len(ids) != 1:
        raise ValueError(
          f'judge tokenizer splits {text!r} into {len(ids)} tokens; the judge '
          'format needs one (build it with build_judge_tokenizer)'
        )
      return ids[0]

    suffix = tokenizer(P.SCORE_MARK + ': 3', add_special_tokens=False)['input_ids']
    expected = [single(P.SCORE_MARK), single(':'), single(' '), single('3')]
    if suffix != expected:
      raise ValueError(
        f'judge tokenizer: {P.SCORE_MARK + ": 3"!r} -> {suffix}, expected the pieces {expected}'
      )
    return cls(
      marker=expected[0],
      colon=expected[1],
      space=expected[2],
      digits=tuple(single(d) for d in P.SCORE_DIGITS),
      im_end=tokenizer.convert_tokens_to_ids('<|im_end|>'),
      pad=tokenizer.convert_tokens_to_ids('<|endoftext|>'),
    )

  @property
  def answer_prefix(self) -> list[int]:
    return [self.marker, self.colon, self.space]


def assemble(
  prompt_ids: Sequence[int], cot_ids: Sequence[int], tokens: ScoreTokens, digit: int | None = None
) -> tuple[list[int], int]:
  """(ids, score position): prompt + CoT + " Score: " [+ digit + <|im_end|>].

  The score position is the index of the last token before the digit: the logits there predict
  the digit.
  """
  ids = list(prompt_ids) + list(cot_ids) + tokens.answer_prefix
  position = len(ids) - 1
  if digit is not None:
    ids += [tokens.digits[digit - 1], tokens.im_end]
  return ids, position


def score_distribution(logits, digit_ids):
  """p(s) over the five score tokens: softmax of their logits only. logits [..., V]."""
  return jax.nn.softmax(
    jnp.take(logits.astype(jnp.float32), jnp.asarray(digit_ids), axis=-1), axis=-1
  )


def score_logprobs(logits, digit_ids):
  """float32 log p(s) over the five score tokens (renormalised over them). logits [..., V]."""
  return jax.nn.log_softmax(
    jnp.take(logits.astype(jnp.float32), jnp.asarray(digit_ids), axis=-1), axis=-1
  )


def readout(logprobs: np.ndarray, scale: str) -> np.ndarray:
  """float32 [B] from log p(s) [B, 5]: the protocol's expected-score readout per row."""
  values = [
    protocol.score_readout(list(zip(P_VALUES, map(float, row))), scale)
    for row in np.asarray(logprobs)
  ]
  return np.array([np.nan if v is None else v for v in values], np.float32)


def expected_score(logits, digit_ids):
  """E = sum_s s p(s) in [1, 5] (s = 1..5) at the score position. logits [..., V]."""
  p = score_distribution(logits, digit_ids)
  return jnp.sum(p * jnp.arange(1, 6, dtype=jnp.float32), axis=-1)


@dataclasses.dataclass
class JudgeOutput:
  """expected [B] in [1, 5] (NaN where invalid), reward [B] = (expected - 1) / 4, valid [B],
  cot [B] decoded chains of thought ('' without CoT)."""

  expected: np.ndarray
  reward: np.ndarray
  valid: np.ndarray
  cot: list

  @property
  def invalid_count(self) -> int:
    return int((~self.valid).sum())

  @classmethod
  def concatenate(cls, outs: Sequence[JudgeOutput]) -> JudgeOutput:
    return cls(
      expected=np.concatenate([o.expected for o in outs]),
      reward=np.concatenate([o.reward for o in outs]),
      valid=np.concatenate([o.valid for o in outs]),
      cot=[c for o in outs for c in o.cot],
    )


def padded_length(longest: int, multiple: int = 16) -> int:
  """`longest` rounded up to a multiple of `multiple` (fewer distinct shapes to compile)."""
  return -(-longest // multiple) * multiple


def _left_pad(seqs: Sequence[Sequence[int]], pad: int, multiple: int = 16):
  length = padded_length(max(len(s) for s in seqs), multiple)
  ids = np.full((len(seqs), length), pad, np.int32)
  mask = np.zeros((len(seqs), length), np.int32)
  for i, s in enumerate(seqs):
    ids[i, length - len(s) :], mask[i, length - len(s) :] = s, 1
  return ids, mask


def is_judge_dir(directory: str) -> bool:
  """Whether `directory` holds a judge export (the files VLMJudge.load needs first)."""
  return all(paths.isfile(paths.join(directory, f)) for f in ('config.json', PREPROCESSOR_CONFIG))


def check_judge_dir(directory: str) -> None:
  """FileNotFoundError naming what is missing unless `directory` holds a judge export."""
  if not is_judge_dir(directory):
    raise FileNotFoundError(
      f'{directory!r} is not a judge directory (needs config.json and '
      f'{PREPROCESSOR_CONFIG}; reward_sft exports WORKDIR/export/judge)'
    )


def find_judge_dir(path: str) -> str | None:
  """The judge `path` names (itself, or a reward_sft workdir's export/judge) as a local
  directory, a URL's tree downloaded once (paths.local_copy); None when neither holds one."""
  return paths.find_export(path, 'judge', is_judge_dir)


class VLMJudge:
  """A Qwen2.5-VL judge: `score(task, images, prompts, sources)` for the four judge tasks."""

  def __init__(
    self,
    model,
    params,
    tokenizer,
    processor: ImageProcessor,
    *,
    max_cot_tokens: int = 48,
    batch_size: int = 32,
    describe_first: bool = False,
    max_caption_tokens: int = 64,
    decompose: bool = False,
    max_item_tokens: int = 48,
    verdict_samples: int = 0,
    independent_items: bool = False,
  ):
    if max_cot_tokens < 1:
      raise ValueError(
        f'max_cot_tokens={max_cot_tokens} must be >= 1 (use cot=False to score '
        'without a chain of thought)'
      )
    self.model, self.params, self.tokenizer, self.processor = model, params, tokenizer, processor
    self.tokens = ScoreTokens.from_tokenizer(tokenizer)
    self.max_cot_tokens, self.batch_size = max_cot_tokens, batch_size
    # describe_first: alignment and instruction prompts carry the judge's own caption of each
    # image, written in a separate "Describe the image." pass that cannot see (and so cannot
    # copy) the prompt; the judge then compares two texts as well as reading the image.
    self.describe_first, self.max_caption_tokens = describe_first, max_caption_tokens
    if verdict_samples < 0:
      raise ValueError(f'verdict_samples={verdict_samples} must be >= 0 (0: greedy verdicts)')
    # decompose: alignment chains of thought are checklists of the judge's own items of the
    # prompt, from a text-only first pass (module docstring).
    self.decompose, self.max_item_tokens = decompose, max_item_tokens
    self.verdict_samples = verdict_samples
    # Each item's verdict read with its phrase alone after the prompt, as item drills train it,
    # not after the verdicts before it (reward_sft, item drills).
    self.independent_items = independent_items
    self._prompt_cache: dict = {}

  # -- persistence ----------------------------------------------------------------------------

  @classmethod
  def load(cls, directory: str, **kw) -> VLMJudge:
    from qwen_image_rl.convert import load_qwen2_5_vl
    from qwen_image_rl.data.tokenizer import load_tokenizer

    path = os.path.join(directory, PREPROCESSOR_CONFIG)
    check_judge_dir(directory)
    model, params = load_qwen2_5_vl(directory)
    with open(path) as f:
      processor = ImageProcessor.from_dict(json.load(f))
    settings = {}
    if os.path.isfile(os.path.join(directory, JUDGE_CONFIG)):
      with open(os.path.join(directory, JUDGE_CONFIG)) as f:
        settings = {k: v for k, v in json.load(f).items() if k in LOADED_SETTINGS}
    settings.update(kw)
    return cls(model, params, load_tokenizer(directory), processor, **settings)

  def save(self, directory: str, extra: dict | None = None) -> None:
    from qwen_image_rl.convert import save_qwen2_5_vl

    save_qwen2_5_vl(self.model, jax.device_get(self.params), directory)
    # Our vocabulary's special-token ids (transformers would default to the real Qwen's).
    path = os.path.join(directory, 'config.json')
    with open(path) as f:
      config = json.load(f)
    ids = {
      'bos_token_id': None,
      'eos_token_id': self.tokens.im_end,
      'pad_token_id': self.tokens.pad,
    }
    config.update(ids)
    config['text_config'].update(ids)
    with open(path, 'w') as f:
      json.dump(config, f, indent=2)
    self.tokenizer.save_pretrained(directory)
    save_processor(self.processor, directory)
    with open(os.path.join(directory, JUDGE_CONFIG), 'w') as f:
      json.dump(
        {
          'max_cot_tokens': self.max_cot_tokens,
          'describe_first': self.describe_first,
          'max_caption_tokens': self.max_caption_tokens,
          'decompose': self.decompose,
          'max_item_tokens': self.max_item_tokens,
          'verdict_samples': self.verdict_samples,
          'independent_items': self.independent_items,
          'tasks': sorted(P.RUBRICS),
          'score_digits': list(P.SCORE_DIGITS),
          **(extra or {}),
        },
        f,
        indent=2,
      )

  # -- inputs ---------------------------------------------------------------------------------

  def prompt_ids(self, task: str, prompt: str, grids, seen: str = '') -> list[int]:
    """Token ids of the judge prompt with its image placeholders expanded for `grids` (and the
    description `seen` of the image(s), P.seen_text)."""
    key = (task, prompt, seen, tuple(map(tuple, np.asarray(grids).tolist())))
    if key not in self._prompt_cache:
      chat = P.chat_prompt(task, prompt, seen)
      text = expand_image_tokens([chat], grids, self.processor.merge_size)
      self._prompt_cache[key] = self.tokenizer(text[0])['input_ids']
    return self._prompt_cache[key]

  def caption_prompt_ids(self, grid) -> list[int]:
    """Token ids of the "Describe the image." prompt for one image of `grid` [1, 3]."""
    text = expand_image_tokens([P.caption_prompt()], grid, self.processor.merge_size)
    return self.tokenizer(text[0])['input_ids']

  def decompose_prompt_ids(self, prompt: str) -> list[int]:
    """Token ids of the text-only decomposition prompt (P.decompose_prompt)."""
    return self.tokenizer(P.decompose_prompt(prompt))['input_ids']

  @property
  def verdict_ids(self) -> list[int]:
    """The token ids of the verdict words (P.VERDICTS order), each one token after a space."""
    return [self.tokenizer(f' {w}')['input_ids'][0] for _, w in P.VERDICTS]

  def items_of(self, prompts: Sequence[str]) -> tuple[list[list[str]], np.ndarray]:
    """(item phrases, valid [B]): the judge's greedy decomposition of each prompt, text only."""
    ids = [self.decompose_prompt_ids(p) for p in prompts]
    rows = self.generate_rows(ids, None, self.max_item_tokens, (self.tokens.im_end,))
    items, valid = [], np.zeros(len(prompts), bool)
    for b, row in enumerate(rows.tolist()):
      ended = self.tokens.im_end in row
      text = self.tokenizer.decode(row[: row.index(self.tokens.im_end)] if ended else [])
      items.append(P.parse_items(text))
      valid[b] = ended and bool(items[b])
    return items, valid

  def _verdict_softmax(self, logits) -> np.ndarray:
    """p over the verdict words (float64) from logits [V] at a verdict position."""
    z = np.asarray(logits)[self.verdict_ids].astype(np.float64)
    p = np.exp(z - z.max())
    return p / p.sum()

  def verdicts_alone(self, prompt_ids, processed, items) -> list[list[np.ndarray]]:
    """Per row, per item, p over the verdict words read after the item's phrase alone (the chain
    of thought holds nothing else), as item drills train it."""
    probs = [[] for _ in prompt_ids]
    for k in range(max(map(len, items), default=0)):
      going = [i for i, its in enumerate(items) if k < len(its)]
      alone = {i: self.tokenizer(items[i][k])['input_ids'] for i in going}
      logits = self.read_logits([p + alone.get(i, []) for i, p in enumerate(prompt_ids)], processed)
      for i in going:
        probs[i].append(self._verdict_softmax(logits[i]))
    return probs

  def fill_checklist(self, prompt_ids, processed, items, rng=None, alone=None) -> list[list[int]]:
    """Checklist chains of thought (id lists) over the given item phrases: after each phrase
    the judge's verdict, its likeliest (rng None) or drawn from the softmax over the verdict
    words, then a period. The verdict is read after the chain so far, or with
    `independent_items` after the item's phrase alone (`alone`: verdicts_alone, when already
    read)."""
    if self.independent_items and alone is None:
      alone = self.verdicts_alone(prompt_ids, processed, items)
    verdict_ids = self.verdict_ids
    period = self.tokenizer('.')['input_ids']
    cots = [[] for _ in prompt_ids]
    for k in range(max(map(len, items), default=0)):
      going = [i for i, its in enumerate(items) if k < len(its)]
      for i in going:
        cots[i] += self.tokenizer(items[i][k] if k == 0 else f' {items[i][k]}')['input_ids']
      if alone is None:
        logits = self.read_logits([p + c for p, c in zip(prompt_ids, cots)], processed)
      for i in going:
        p = alone[i][k] if alone is not None else self._verdict_softmax(logits[i])
        pick = int(p.argmax()) if rng is None else int(rng.choice(len(p), p=p))
        cots[i] += [verdict_ids[pick]] + period
    return cots

  def describe(self, images) -> list[str]:
    """The judge's greedy captions of images [B, H, W, 3] (cut at max_caption_tokens)."""
    processed = self.processor(list(images))
    grids = np.asarray(processed['image_grid_thw'])
    ids = [self.caption_prompt_ids(g[None]) for g in grids]
    rows = self.generate_rows(ids, processed, self.max_caption_tokens, (self.tokens.im_end,))
    out = []
    for row in rows.tolist():
      end = row.index(self.tokens.im_end) if self.tokens.im_end in row else len(row)
      out.append(self.tokenizer.decode([t for t in row[:end] if t != self.tokens.pad]).strip())
    return out

  def _inputs(self, task, images, prompts, sources, seen=None):
    per_sample = (
      [[s, im] for s, im in zip(sources, images)]
      if P.NUM_IMAGES[task] == 2
      else [[im] for im in images]
    )
    flat = [im for pair in per_sample for im in pair]
    processed = self.processor(flat)
    grids = np.asarray(processed['image_grid_thw']).reshape(len(images), -1, 3)
    if seen is None and self.describe_first and task in P.DESCRIBED_TASKS:
      captions = self.describe(flat)
      k = P.NUM_IMAGES[task]
      seen = [P.seen_text(task, captions[i * k : (i + 1) * k]) for i in range(len(images))]
    if seen is None:
      seen = [''] * len(images)
    ids = [self.prompt_ids(task, p, g, s) for p, g, s in zip(prompts, grids, seen)]
    return ids, processed

  # -- scoring --------------------------------------------------------------------------------

  def score(
    self,
    task: str,
    images,
    prompts: Sequence[str],
    sources=None,
    *,
    cot: bool = True,
    seen: Sequence[str] | None = None,
  ) -> JudgeOutput:
    """Scores images [B, H, W, 3] uint8 against prompts (edit instructions with `sources`).

    seen: describe_first judges only, the description of each image (P.seen_text) in place of
    the judge's own captions (judge_eval's --captions=true: its comparison, without its eyes).
    """
    P.check_task(task)
    images = np.asarray(images)
    if len(prompts) != len(images):
      raise ValueError(f'{len(images)} images but {len(prompts)} prompts')
    if P.NUM_IMAGES[task] == 2 and (sources is None or len(sources) != len(images)):
      raise ValueError(f'judge task {task!r} needs one source image per output')
    if seen is not None and (not self.describe_first or task not in P.DESCRIBED_TASKS):
      raise ValueError(f'descriptions given for task {task!r} of a judge that does not read them')
    if seen is not None and len(seen) != len(images):
      raise ValueError(f'{len(images)} images but {len(seen)} descriptions')
    part = lambda xs, i: None if xs is None else xs[i : i + self.batch_size]
    outs = [
      self._score_chunk(
        task, part(images, i), part(prompts, i), part(sources, i), cot, part(seen, i)
      )
      for i in range(0, len(images), self.batch_size)
    ]
    return JudgeOutput.concatenate(outs)

  def _score_chunk(self, task, images, prompts, sources, cot: bool, seen=None) -> JudgeOutput:
    prompt_ids, processed = self._inputs(task, images, prompts, sources, seen)
    batch = len(prompt_ids)
    if cot and self.decompose and task == 'alignment':
      return self._checklists(prompt_ids, processed, *self.items_of(prompts))
    cots, valid = [[] for _ in range(batch)], np.ones(batch, bool)
    if cot:
      cots, valid = self.generate_cot(prompt_ids, processed)
    return self._output(*self._readouts(prompt_ids, cots, processed), valid, cots)

  def score_checklists(self, images, prompts: Sequence[str], items) -> JudgeOutput:
    """Alignment of images [B, H, W, 3] read through checklists over the given item phrases
    ([B] lists; `score` takes a decomposing judge's own, items_of), as `score` reads them."""
    outs = []
    for i in range(0, len(images), self.batch_size):
      part = slice(i, i + self.batch_size)
      prompt_ids, processed = self._inputs('alignment', images[part], prompts[part], None)
      given = list(items[part])
      outs.append(self._checklists(prompt_ids, processed, given, np.ones(len(given), bool)))
    return JudgeOutput.concatenate(outs)

  def _checklists(self, prompt_ids, processed, items, valid) -> JudgeOutput:
    """fill_checklist once greedily or `verdict_samples` times sampled (the mean expected
    score); rows not `valid` (no items) are NaN."""
    # Read alone, the verdict distributions do not depend on the draws: read them once.
    alone = self.verdicts_alone(prompt_ids, processed, items) if self.independent_items else None
    if not self.verdict_samples:
      cots = self.fill_checklist(prompt_ids, processed, items, alone=alone)
      return self._output(*self._readouts(prompt_ids, cots, processed), valid, cots)
    # Fixed draws: the same images and prompts get the same reward.
    rng = np.random.default_rng([len(prompt_ids), *map(len, prompt_ids)])
    draws = []
    for _ in range(self.verdict_samples):
      cots = self.fill_checklist(prompt_ids, processed, items, rng, alone)
      draws.append(self._readouts(prompt_ids, cots, processed))
    expected, reward = np.mean(draws, axis=0)
    return self._output(expected, reward, valid, cots)

  def _readouts(self, prompt_ids, cots, processed) -> tuple[np.ndarray, np.ndarray]:
    """(expected score in [1, 5], reward in [0, 1]), each [B], read after each chain of thought."""
    seqs = [assemble(p, c, self.tokens)[0] for p, c in zip(prompt_ids, cots)]
    logprobs = np.asarray(score_logprobs(self.read_logits(seqs, processed), self.tokens.digits))
    return readout(logprobs, 'raw'), readout(logprobs, 'unit')

  def _output(self, expected, reward, valid, cots) -> JudgeOutput:
    return JudgeOutput(
      expected=np.where(valid, expected, np.nan).astype(np.float32),
      reward=np.where(valid, reward, np.nan).astype(np.float32),
      valid=valid,
      cot=[self.tokenizer.decode(c) for c in cots],
    )

  def generate_cot(self, prompt_ids, processed):
    """(chains of thought as id lists, valid [B]): greedy until the " Score" marker."""
    return parse_cot(self.generate_rows(prompt_ids, processed).tolist(), self.tokens)

  def generate_rows(self, prompt_ids, processed, max_new_tokens=None, stop=None) -> np.ndarray:
    """The greedy tokens [B, max_new_tokens] after each prompt (pad after a stop token);
    defaults: a chain of thought (max_cot_tokens, stopping at the marker or <|im_end|>)."""
    ids, mask = _left_pad(prompt_ids, self.tokens.pad)
    processed = processed or {}
    config = gen.GenerationConfig(
      max_new_tokens=max_new_tokens or self.max_cot_tokens,
      stop_token_ids=stop or (self.tokens.marker, self.tokens.im_end),
      pad_token_id=self.tokens.pad,
    )
    return np.asarray(
      gen.generate(
        self.model,
        self.params,
        ids,
        mask,
        pixel_values=processed.get('pixel_values'),
        image_grid_thw=processed.get('image_grid_thw'),
        config=config,
      )
    )

  def read_logits(self, seqs, processed) -> np.ndarray:
    """Logits [B, V] at the last token of each (left-padded) sequence: the score position."""
    ids, mask = _left_pad(seqs, self.tokens.pad)
    positions = np.full((len(seqs), 1), ids.shape[1] - 1, np.int32)
    logits = gen.score(
      self.model,
      self.params,
      ids,
      positions,
      mask,
      pixel_values=processed['pixel_values'],
      image_grid_thw=processed['image_grid_thw'],
    )
    return np.asarray(logits[:, 0], np.float32)

  def logits_at(self, seqs, processed, positions) -> jax.Array:
    """Logits [B, K, V] at `positions` [B, K], indices into each unpadded sequence."""
    ids, mask = _left_pad(seqs, self.tokens.pad)
    offsets = ids.shape[1] - np.array([len(s) for s in seqs], np.int32)
    return gen.score(
      self.model,
      self.params,
      ids,
      np.asarray(positions, np.int32) + offsets[:, None],
      mask,
      pixel_values=processed['pixel_values'],
      image_grid_thw=processed['image_grid_thw'],
    )


def parse_cot(rows: Sequence[Sequence[int]], tokens: ScoreTokens):
  """(chains of thought, valid [B]) from generated rows: a chain of thought ends at the first
  " Score" marker; a row without one, or with <|im_end|> before it, is invalid."""
  cots, valid = [], np.zeros(len(rows), bool)
  for b, row in enumerate(rows):
    row = list(row)
    end = row.index(tokens.marker) if tokens.marker in row else None
    valid[b] = end is not None and tokens.im_end not in row[:end]
    cots.append(row[:end] if valid[b] else [])
  return cots, valid


def save_processor(processor: ImageProcessor, directory: str) -> None:
  config = {
    'image_processor_type': 'Qwen2VLImageProcessor',
    'min_pixels': processor.min_pixels,
    'max_pixels': processor.max_pixels,
    'patch_size': processor.patch_size,
    'temporal_patch_size': processor.temporal_patch_size,
    'merge_size': processor.merge_size,
    'image_mean': list(processor.image_mean),
    'image_std': list(processor.image_std),
  }
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, PREPROCESSOR_CONFIG), 'w') as f:
    json.dump(config, f, indent=2)
