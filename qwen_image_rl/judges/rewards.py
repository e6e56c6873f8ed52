"""The learned rewards as registered rewards: judge_alignment, judge_aesthetics, judge_portrait,
judge_instruction (VLM judges, vlm_judge.py) and face_id (the ArcFace embedder, face_id.py).

  make_reward('judge_alignment', judge_dir='runs/demo/judge/export/judge')
  make_reward('judge_alignment', scorer=remote_score)      # served judge, same contract
  make_reward('face_id', embedder_dir='runs/demo/face_id/export/face_id')

A judge reward calls `scorer(task, images, prompts, sources, cot) -> JudgeOutput`; in-process
that is a loaded `VLMJudge.score` (one per directory, shared by the rewards that name it), and a
remote judge only has to provide the same callable. Samples whose judge output has no parsable
score are NaN (the reward contract's "could not be scored"): the reward pipelines count and
report them and the GRPO advantage refuses them, so they are never silently a number.

As the oracle rewards, `judge_portrait` scores portrait prompts only and `face_id` portrait
edits only; other samples get the constant `neutral` (0.5), which adds nothing to a prompt
group's normalised advantage.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np

from qwen_image_rl.judges import face_id as F
from qwen_image_rl.judges import prompts as P
from qwen_image_rl.rewards.base import RewardBatch, RewardFn
from qwen_image_rl.rewards.registry import register_reward

DEFAULT_NEUTRAL = 0.5
_LOADED: dict = {}
_LOCK = threading.Lock()


def _cached(key, load):
  with _LOCK:
    if key not in _LOADED:
      _LOADED[key] = load()
    return _LOADED[key]


def load_judge(judge_dir: str, max_cot_tokens: int | None = None):
  from qwen_image_rl.judges.vlm_judge import VLMJudge

  kw = {} if max_cot_tokens is None else {'max_cot_tokens': int(max_cot_tokens)}
  return _cached(('judge', judge_dir, max_cot_tokens), lambda: VLMJudge.load(judge_dir, **kw))


class JudgeReward(RewardFn):
  """One judge task as a reward in [0, 1]: (E[s] - 1) / 4, NaN where the output was invalid."""

  task = ''

  def __init__(
    self,
    judge_dir: str = '',
    *,
    scorer: Callable | None = None,
    cot: bool = True,
    max_cot_tokens: int | None = None,
    name: str | None = None,
    neutral: float = DEFAULT_NEUTRAL,
  ):
    if bool(judge_dir) == (scorer is not None):
      raise ValueError(
        f'judge_{self.task}: pass exactly one of judge_dir (a reward_sft export, '
        'WORKDIR/export/judge) or scorer (a served judge)'
      )
    if judge_dir:  # fail at start-up, not after the first rollouts
      from qwen_image_rl.judges.vlm_judge import check_judge_dir

      check_judge_dir(judge_dir)
    self.name = name or f'judge_{self.task}'
    self.names = (self.name,)
    self.cot, self.neutral = bool(cot), float(neutral)
    self._judge_dir, self._max_cot = judge_dir, max_cot_tokens
    self._scorer = scorer

  @property
  def scorer(self):
    if self._scorer is None:
      self._scorer = load_judge(self._judge_dir, self._max_cot).score
    return self._scorer

  def applies(self, batch: RewardBatch) -> np.ndarray:
    return np.ones(batch.size, bool)

  def score(self, batch):
    out = np.full(batch.size, self.neutral, np.float32)
    idx = np.flatnonzero(self.applies(batch))
    if len(idx):
      sub = batch.select(idx)
      result = self.scorer(
        self.task, sub.images, list(sub.prompts), sub.source_images, cot=self.cot
      )
      out[idx] = np.where(result.valid, result.reward, np.nan)
    return {self.name: out}


@register_reward('judge_alignment')
class JudgeAlignment(JudgeReward):
  task = 'alignment'


@register_reward('judge_aesthetics')
class JudgeAesthetics(JudgeReward):
  task = 'aesthetics'


@register_reward('judge_portrait')
class JudgePortrait(JudgeReward):
  task = 'portrait'

  def applies(self, batch):
    return np.array([c == 'portrait' for c in batch.categories])


@register_reward('judge_instruction')
class JudgeInstruction(JudgeReward):
  task = 'instruction'

  def score(self, batch):
    if batch.source_images is None:
      raise ValueError('judge_instruction needs batch.source_images (an edit batch)')
    return super().score(batch)


@register_reward('face_id')
class FaceIdReward(RewardFn):
  """Portrait edits: clip(cos(source, output embeddings), 0, 1); other edits: `neutral`."""

  def __init__(self, embedder_dir: str, name: str | None = None, neutral: float = DEFAULT_NEUTRAL):
    self.name = name or 'face_id'
    self.names = (self.name,)
    self.neutral = float(neutral)
    self.scorer = _cached(('face_id', embedder_dir), lambda: F.FaceIdScorer.load(embedder_dir))

  def score(self, batch):
    if batch.source_images is None:
      raise ValueError('face_id needs batch.source_images (an edit batch)')
    out = np.full(batch.size, self.neutral, np.float32)
    idx = np.flatnonzero([c == 'portrait' for c in batch.categories])
    if len(idx):
      out[idx] = self.scorer.reward(batch.source_images[idx], batch.images[idx])
    return {self.name: out}


JUDGE_REWARDS = {f'judge_{t}': t for t in P.RUBRICS}
