"""Judges the server can host: a batched `score(requests) -> replies` callable.

  judge = OracleJudge()
  request = judge.prepare(parsed)       # per parse_chat_request body; JudgeInputError -> HTTP 400
  replies = judge.score([request, ...])  # one call per server batch

A `JudgeReply` is the generated text and, per generated token, its log-prob and the most likely
alternatives (best first), which the server returns as OpenAI `logprobs`. A learned VLM judge
(a reward_sft export) is `serving/vlm.py`'s `VLMServedJudge`: `prepare` renders the chat and
preprocesses the images, `score` runs the judge's jitted batched generation and scoring.

`OracleJudge` serves the tiny world's exact oracle (the registered in-process oracle rewards, so
the numbers are the same code's): its reply is one score token whose distribution over "1".."5"
encodes the oracle score v in [0, 1] exactly. With x = 4 v, k = min(floor(x), 3), f = x - k:

  p(score k+1) = 1 - f,  p(score k+2) = f,  all other scores 0,

so sum_s (s - 1)/4 p(s) = v (the protocol's 'unit' readout) and the remote reward reproduces
the in-process float32 reward bit for bit (float64 log/exp error is far below a float32 ulp).
"""

from __future__ import annotations

import abc
import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from qwen_image_rl.data import world
from qwen_image_rl.rewards import oracle_rewards
from qwen_image_rl.rewards.base import RewardBatch
from qwen_image_rl.rewards.registry import make_reward
from qwen_image_rl.serving import protocol
from qwen_image_rl.serving.context import EDIT_RUBRICS, RUBRICS, edit_from_dict


class JudgeInputError(ValueError):
  """A request the judge cannot score (wrong image count, bad context); HTTP 400."""


@dataclasses.dataclass(frozen=True)
class JudgeReply:
  """text: the generated text; tokens: per generated token (token, logprob, [(alternative,
  logprob), ...] best first)."""

  text: str
  tokens: tuple[tuple[str, float, tuple[tuple[str, float], ...]], ...]


class Judge(abc.ABC):
  """A judge the server batches requests for."""

  model_name: str = 'judge'

  @abc.abstractmethod
  def prepare(self, parsed: Mapping[str, Any]) -> Any:
    """Checks and converts one request (protocol.parse_chat_request's output); raises
    JudgeInputError."""

  @abc.abstractmethod
  def score(self, requests: Sequence[Any]) -> list[JudgeReply]:
    """One reply per prepared request, in order (one batched call)."""


# ---------------------------------------------------------------------------------------------
# The oracle judge.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _OracleItem:
  rubric: str
  category: str
  image: np.ndarray
  source: np.ndarray | None
  meta: dict


def _reward_batch(items: Sequence[_OracleItem]) -> RewardBatch:
  return RewardBatch(
    images=np.stack([it.image for it in items]),
    prompts=[''] * len(items),
    categories=[it.category for it in items],
    sample_ids=np.arange(len(items)),
    source_images=(np.stack([it.source for it in items]) if items[0].source is not None else None),
    meta=[it.meta for it in items],
  )


def score_distribution(value: float) -> np.ndarray:
  """float64 [5]: p(score 1..5) whose unit readout is exactly `value` in [0, 1]."""
  if not 0.0 <= value <= 1.0:
    raise ValueError(f'oracle score {value!r} is outside [0, 1]')
  x = 4.0 * float(value)
  k = min(int(math.floor(x)), 3)
  probs = np.zeros(5, np.float64)
  probs[k], probs[k + 1] = 1.0 - (x - k), x - k
  return probs


def distribution_reply(probs: np.ndarray) -> JudgeReply:
  """A one-token reply: the most likely score token, alternatives = all five best first."""
  logprobs = [math.log(p) if p > 0 else protocol.ZERO_LOGPROB for p in probs]
  order = sorted(range(5), key=lambda i: (-logprobs[i], i))
  alternatives = tuple((protocol.SCORE_TOKENS[i], logprobs[i]) for i in order)
  best = order[0]
  token = protocol.SCORE_TOKENS[best]
  return JudgeReply(text=token, tokens=((token, logprobs[best], alternatives),))


class OracleJudge(Judge):
  """The tiny world's oracle behind the judge API; rubric and spec come from `judge_context`."""

  model_name = 'oracle'

  def __init__(self):
    self._rewards = {rubric: make_reward(rubric) for rubric in RUBRICS}

  def prepare(self, parsed):
    # The oracle reads the ground truth, not the prompt text.
    images, context = parsed['images'], parsed['context']
    if not context:
      raise JudgeInputError(
        f'the oracle judge needs "{protocol.JUDGE_CONTEXT}": {{"rubric": one '
        f'of {RUBRICS}, "category", and "spec" (text-to-image) or "edit"}}'
      )
    rubric, category = context.get('rubric'), context.get('category')
    if rubric not in RUBRICS:
      raise JudgeInputError(f'{protocol.JUDGE_CONTEXT}.rubric {rubric!r} is not one of {RUBRICS}')
    if category not in world.CATEGORIES:
      raise JudgeInputError(
        f'{protocol.JUDGE_CONTEXT}.category {category!r} is not one of {world.CATEGORIES}'
      )
    edit = rubric in EDIT_RUBRICS
    want = 2 if edit else 1
    if len(images) != want:
      raise JudgeInputError(
        f'rubric {rubric!r} needs {want} image(s) '
        f'{"(source, then output)" if edit else "(the output)"}, got '
        f'{len(images)}'
      )
    key = 'edit' if edit else 'spec'
    try:
      meta = {key: edit_from_dict(context['edit']) if edit else world.from_dict(context['spec'])}
    except (KeyError, TypeError, ValueError, AttributeError) as e:
      raise JudgeInputError(
        f'{protocol.JUDGE_CONTEXT}.{key} is missing or malformed: {type(e).__name__}: {e}'
      ) from None
    if edit and images[0].shape != images[1].shape:
      raise JudgeInputError(
        f'source image {images[0].shape} and output {images[1].shape} differ in size'
      )
    item = _OracleItem(rubric, category, images[-1], images[0] if edit else None, meta)
    try:  # Category/spec mismatches are the requester's error: check them here, not in score.
      check = oracle_rewards.batch_edits if edit else oracle_rewards.batch_specs
      check(_reward_batch([item]))
    except ValueError as e:
      raise JudgeInputError(str(e)) from None
    return item

  def _score_group(self, items: Sequence[_OracleItem]) -> np.ndarray:
    reward = self._rewards[items[0].rubric]
    return reward(_reward_batch(items))[reward.name]

  def score(self, requests):
    values = [None] * len(requests)
    groups: dict[tuple, list[int]] = {}
    for i, item in enumerate(requests):  # One oracle batch per rubric and image shape.
      groups.setdefault((item.rubric, item.image.shape), []).append(i)
    for indices in groups.values():
      scores = self._score_group([requests[i] for i in indices])
      for i, value in zip(indices, scores):
        values[i] = float(value)  # the float32 reward, exactly
    return [distribution_reply(score_distribution(v)) for v in values]
