"""Judge prompts (one rubric per reward, after the paper's sec. 6), chains of thought written from
the oracle's per-dimension verdicts, and the 1-5 score scale.

A judge answer is `<chain of thought> Score: <digit><|im_end|>`. The chain of thought never
contains the word "Score", so the marker token " Score" ends it unambiguously; the score position
is the token after " Score: ", where the five digit tokens' logits are read (see vlm_judge.py).
Without chain of thought the answer is just ` Score: <digit>`; the marker is then forced.
"""

from __future__ import annotations

import re

import numpy as np

SCORE_DIGITS = ('1', '2', '3', '4', '5')
SCORE_MARK = ' Score'  # one token; followed by ':' and ' ' (Qwen's regex splits them off)
SYSTEM = 'You are a careful judge of images. Reason briefly, then give a score from 1 to 5.'
IMAGE = '<|vision_start|><|image_pad|><|vision_end|>'

RUBRICS = {
  # Alignment ignores aesthetics; checks run in priority order and a failed earlier check caps
  # the score low (paper sec. 6, T2I reward 1).
  'alignment': (
    'Rate how well the image matches the prompt, ignoring beauty. Check in order: '
    'object presence and count, then attributes such as colour size and shape, '
    'then spatial relations, then action and pose. A failed earlier check caps the '
    'score low.'
  ),
  'aesthetics': (
    'Rate the visual quality of the image: composition, illumination, clean flat '
    'colours and sharp edges, no noise, no blur, no artefacts.'
  ),
  'portrait': (
    'Rate the portrait: a well formed face of plausible proportions, two clear eyes '
    'of one colour, a mouth, realistic skin and hair. Penalise distorted faces.'
  ),
  'instruction': (
    'The first image is the source, the second the edited output. First split the '
    'instruction into its core requirement and its non core requirements. Rate '
    'whether the core requirement is fulfilled, whether the non core ones are '
    'addressed, and whether the output is coherent.'
  ),
}
PROMPT_LABEL = {
  'alignment': 'prompt',
  'aesthetics': 'prompt',
  'portrait': 'prompt',
  'instruction': 'instruction',
}
NUM_IMAGES = {'alignment': 1, 'aesthetics': 1, 'portrait': 1, 'instruction': 2}

# Verdict words for an oracle dimension in [0, 1].
VERDICTS = ((0.85, 'good'), (0.6, 'fair'), (0.3, 'poor'), (-np.inf, 'failed'))
# The alignment rubric order of each category's oracle dimensions (the pose slot has no tiny-
# world counterpart; portraits' expression lives in their attributes).
DIM_ORDER = {
  'alignment': (
    'presence',
    'count',
    'glyphs',
    'elements',
    'well_formed',
    'attributes',
    'colour',
    'identity',
    'position',
    'order',
    'relation',
    'layout',
  ),
  'aesthetics': ('noise', 'sharpness', 'artefacts'),
  'portrait': ('structure', 'quality'),
  'instruction': ('core', 'noncore', 'coherent'),
}
DIM_WORDS = {'well_formed': 'face', 'noncore': 'non core', 'coherent': 'coherence'}


def check_task(task: str) -> str:
  if task not in RUBRICS:
    raise ValueError(f'unknown judge task {task!r}; known: {sorted(RUBRICS)}')
  return task


def user_text(task: str, prompt: str, seen: str = '') -> str:
  text = IMAGE * NUM_IMAGES[check_task(task)] + f'{RUBRICS[task]}\n{PROMPT_LABEL[task]}: {prompt}'
  return f'{text}\n{SEEN_LABEL}: {seen}' if seen else text


def chat_prompt(task: str, prompt: str, seen: str = '') -> str:
  """The full prompt up to the assistant turn (Qwen chat format); `seen` (seen_text) describes
  the image(s) in words, for describe-first judges."""
  return (
    f'<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{user_text(task, prompt, seen)}'
    f'<|im_end|>\n<|im_start|>assistant\n'
  )


# Describe-first judges (VLMJudge.describe_first) add a line with their own caption of each image
# to the alignment and instruction prompts, labelled with words already in the judge vocabulary.
DESCRIBED_TASKS = ('alignment', 'instruction')
SEEN_LABEL = 'image'


def seen_text(task: str, captions) -> str:
  """The described-images line: one caption, or for edits the source's then the output's."""
  if NUM_IMAGES[check_task(task)] == 1:
    (caption,) = captions
    return caption
  source, output = captions
  return f'source {source}. output {output}'


# Captioning, an auxiliary training task only (not a reward): the judge must name every object,
# colour and position of the image, which a rubric verdict alone does not force it to read. Its
# words are left out of the tokenizer's vocabulary ("Describe" is split into pieces), so adding
# the task changed no judge's tokenizer.
CAPTION_REQUEST = 'Describe the image.'


def caption_prompt() -> str:
  """The captioning prompt up to the assistant turn; the answer is the scene's caption."""
  return (
    f'<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{IMAGE}{CAPTION_REQUEST}'
    f'<|im_end|>\n<|im_start|>assistant\n'
  )


# Decomposition, a checklist judge's first pass (VLMJudge.decompose): the prompt alone, with no
# image, answered by the items a checklist goes through ("count. small red circle. top left.").
# Without the image in its context the judge can copy the prompt's items but not name the
# image's instead, which its chains of thought do when they write the items themselves. Its
# words are left out of the tokenizer's vocabulary, as the captioning request's are.
DECOMPOSE_REQUEST = 'List the items of the prompt.'


def decompose_prompt(prompt: str) -> str:
  """The decomposition prompt up to the assistant turn; the answer is items_text of its items."""
  return (
    f'<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{DECOMPOSE_REQUEST}\n'
    f'{PROMPT_LABEL["alignment"]}: {prompt}<|im_end|>\n<|im_start|>assistant\n'
  )


def items_text(phrases) -> str:
  """Item phrases as a decomposition answer: each ended by a period."""
  for phrase in phrases:
    if not phrase or '.' in phrase or 'Score' in phrase:
      raise ValueError(f'item phrase {phrase!r}: must be non-empty, without "." or "Score"')
  return ' '.join(f'{phrase}.' for phrase in phrases)


def parse_items(text: str) -> list[str]:
  """The item phrases of a decomposition answer (items_text's inverse)."""
  return [part.strip() for part in text.split('.') if part.strip()]


def verdict(value: float) -> str:
  return next(word for threshold, word in VERDICTS if value >= threshold)


def chain_of_thought(task: str, dims: dict, instruction: str = '', seen: str = '', items=()) -> str:
  """`dim verdict.` for each oracle dimension in rubric order; edits first restate the core. A
  `seen` description of the image(s) (describe, then judge) comes before the verdicts. With
  `items` ((phrase, value, ...) tuples, judge_data.alignment_items) a checklist instead:
  `phrase verdict.` per requested item, each a lookup of one thing the prompt names."""
  parts = []
  if check_task(task) == 'instruction':
    parts.append(f'core: {instruction}. non core: keep the rest.')
  if seen:
    parts.append(f'{seen}.')
  if items:
    parts += [f'{phrase} {verdict(value)}.' for phrase, value, *_ in items]
  else:
    parts += [
      f'{DIM_WORDS.get(dim, dim)} {verdict(dims[dim])}.' for dim in DIM_ORDER[task] if dim in dims
    ]
  cot = ' '.join(parts)
  assert 'Score' not in cot
  return cot


def score_bin(value: float) -> int:
  """Oracle score in [0, 1] -> the 1..5 target: 1 + round(4 v)."""
  return int(1 + np.clip(np.rint(4 * float(value)), 0, 4))


def to_unit(expected_score):
  """Expected score in [1, 5] -> reward in [0, 1]."""
  return (np.asarray(expected_score, np.float32) - 1.0) / 4.0


def vocabulary_texts() -> list[str]:
  """Text the judge tokenizer is trained on, so rubric and verdict words are single tokens."""
  texts = [
    SYSTEM,
    *RUBRICS.values(),
    *PROMPT_LABEL.values(),
    SCORE_MARK,
    'Score: 3',
    'core: non core: keep the rest.',
  ]
  texts += [w for _, w in VERDICTS] + list(DIM_WORDS.values())
  texts += [d for dims in DIM_ORDER.values() for d in dims]
  return texts


def vocabulary_words() -> list[str]:
  return sorted({w for t in vocabulary_texts() for w in re.findall(r'[A-Za-z]+', t)})
