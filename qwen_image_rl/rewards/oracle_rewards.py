"""The tiny world's oracle as registered rewards: the analogues of the paper's five rewards.

Text-to-image (per-sample spec in `batch.meta[i]['spec']`, a scene or its `world.to_dict`):
  alignment     oracle alignment of the image to its spec: by default (`metric='capped'`) the
                paper's rubric-capped score (`oracle.score_t2i(...)['overall']`: a failed
                presence/count caps attributes and relations), so extra blobs cannot buy
                presence; `metric='mean'` is the plain mean of the dimensions (`overall_mean`,
                the earlier reward, which extra objects can game).
  aesthetics    spec-free image quality (noise x sharpness x artefacts, `oracle.image_quality`).
  portrait      portrait prompts: mean of the oracle's portrait dimensions `dims` (default the
                spec-free `well_formed` face structure, the analogue of the paper's penalty on
                distorted faces). Other categories get the constant `neutral` (0.5): a constant
                within a prompt group adds nothing to its group-normalised advantage nor to the
                group's reward range, and it keeps `reward/portrait/mean` mid-scale.
Edit (edit triple in `batch.meta[i]['edit']`, source pixels in `batch.source_images`):
  instruction_following   the output against the target spec (`oracle.score_edit`): by default
                the capped score (the instruction's core requirement first, then the target
                scene); `metric='mean'` the earlier uncapped target alignment.
  identity      portrait edits: identity similarity of source and output faces (the face-ID
                reward); other edits get the constant `neutral` (0.5), as for `portrait`.
  preservation  pixels outside the edited region kept from the source (visual consistency).

Each sample's category must match its spec's category: a mismatch means the metadata is
misaligned with the images and raises instead of scoring the wrong sample.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from qwen_image_rl.data import oracle, world
from qwen_image_rl.rewards.base import RewardBatch, RewardFn
from qwen_image_rl.rewards.registry import register_reward

DEFAULT_NEUTRAL = 0.5


def batch_specs(batch: RewardBatch) -> list:
  """The scene spec of each sample from `batch.meta[i]['spec']`, checked against its category."""
  if batch.meta is None:
    raise ValueError(
      'text-to-image oracle rewards need batch.meta[i]["spec"] (the scene spec); batch.meta is None'
    )
  specs = []
  for i, (meta, category) in enumerate(zip(batch.meta, batch.categories)):
    if 'spec' not in meta:
      raise ValueError(
        f'batch.meta[{i}] has no "spec" (keys {sorted(meta)}); sample id {batch.sample_ids[i]}'
      )
    spec = meta['spec']
    spec = world.from_dict(spec) if isinstance(spec, dict) else spec
    if spec.category != category:
      raise ValueError(
        f'sample {i} (id {batch.sample_ids[i]}): category {category!r} but its spec '
        f'is a {spec.category!r} scene; meta and images are misaligned'
      )
    specs.append(spec)
  return specs


def batch_edits(batch: RewardBatch) -> list:
  """The edit triple of each sample from `batch.meta[i]['edit']`, checked against its category."""
  if batch.meta is None or batch.source_images is None:
    raise ValueError('edit oracle rewards need batch.source_images and batch.meta[i]["edit"]')
  edits = []
  for i, (meta, category) in enumerate(zip(batch.meta, batch.categories)):
    if 'edit' not in meta:
      raise ValueError(
        f'batch.meta[{i}] has no "edit" (keys {sorted(meta)}); sample id {batch.sample_ids[i]}'
      )
    edit = meta['edit']
    if edit.category != category:
      raise ValueError(
        f'sample {i} (id {batch.sample_ids[i]}): category {category!r} but its '
        f'edit is on a {edit.category!r} scene; meta and images are misaligned'
      )
    edits.append(edit)
  return edits


class _OracleReward(RewardFn):
  """One named score; `name` may be overridden to register the same scorer twice."""

  default_name = ''

  def __init__(self, name: str | None = None):
    self.name = name or self.default_name
    self.names = (self.name,)


METRICS = ('capped', 'mean')


class _MetricReward(_OracleReward):
  """A score read under one of METRICS: the rubric-capped key or its uncapped `*_mean` twin."""

  key = ''

  def __init__(self, name: str | None = None, metric: str = 'capped'):
    super().__init__(name)
    if metric not in METRICS:
      raise ValueError(f'{self.default_name} reward metric={metric!r}: choose one of {METRICS}')
    self.metric = metric
    self.score_key = self.key if metric == 'capped' else f'{self.key}_mean'


@register_reward('alignment')
class OracleAlignment(_MetricReward):
  default_name = 'alignment'
  key = 'overall'

  def score(self, batch):
    specs = batch_specs(batch)
    return {
      self.name: np.array(
        [oracle.score_t2i(image, spec)[self.score_key] for image, spec in zip(batch.images, specs)],
        np.float32,
      )
    }


@register_reward('aesthetics')
class OracleAesthetics(_OracleReward):
  default_name = 'aesthetics'

  def score(self, batch):
    return {
      self.name: np.array(
        [oracle.image_quality(image)['quality'] for image in batch.images], np.float32
      )
    }


PORTRAIT_DIMS = ('well_formed', 'attributes', 'identity')


@register_reward('portrait')
class OraclePortrait(_OracleReward):
  default_name = 'portrait'

  def __init__(
    self,
    name: str | None = None,
    dims: Sequence[str] = ('well_formed',),
    neutral: float = DEFAULT_NEUTRAL,
  ):
    super().__init__(name)
    dims = tuple(dims)
    if not dims or any(d not in PORTRAIT_DIMS for d in dims):
      raise ValueError(
        f'portrait reward dims={dims!r}: choose a non-empty subset of {PORTRAIT_DIMS}'
      )
    self.dims, self.neutral = dims, float(neutral)

  def score(self, batch):
    specs = batch_specs(batch)
    out = np.full(batch.size, self.neutral, np.float32)
    for i, (image, spec) in enumerate(zip(batch.images, specs)):
      if spec.category == 'portrait':
        scores = oracle.score_portrait(image, spec)
        out[i] = np.mean([scores[d] for d in self.dims])
    return {self.name: out}


@register_reward('instruction_following')
class OracleInstructionFollowing(_MetricReward):
  default_name = 'instruction_following'
  key = 'instruction_following'

  def score(self, batch):
    edits = batch_edits(batch)
    return {
      self.name: np.array(
        [
          oracle.score_edit(src, out, edit)[self.score_key]
          for src, out, edit in zip(batch.source_images, batch.images, edits)
        ],
        np.float32,
      )
    }


@register_reward('identity')
class OracleIdentity(_OracleReward):
  default_name = 'identity'

  def __init__(self, name: str | None = None, neutral: float = DEFAULT_NEUTRAL):
    super().__init__(name)
    self.neutral = float(neutral)

  def score(self, batch):
    edits = batch_edits(batch)
    out = np.full(batch.size, self.neutral, np.float32)
    for i, (src, image, edit) in enumerate(zip(batch.source_images, batch.images, edits)):
      if edit.category == 'portrait':
        out[i] = oracle.identity_similarity(src, image)
    return {self.name: out}


@register_reward('preservation')
class OraclePreservation(_OracleReward):
  default_name = 'preservation'

  def score(self, batch):
    edits = batch_edits(batch)
    return {
      self.name: np.array(
        [
          oracle.preservation(src, out, edit.source, edit.target)
          for src, out, edit in zip(batch.source_images, batch.images, edits)
        ],
        np.float32,
      )
    }
