"""The reward interface: a batch of generated images in, named per-sample scores out.

A reward function maps a `RewardBatch` to `{score name: float32 [B]}`. Scores stay in batch
order, so score i belongs to `batch.sample_ids[i]`. One function may produce several named scores
(a composite, or a judge that emits diagnostics next to its main score); `names` lists them all.

NaN means "this sample could not be scored" (e.g. a remote judge timed out) and nothing else.
It must never be hidden: `nan_counts` counts it, the pipelines report it, and the GRPO advantage
refuses it (rl/advantages.py needs finite rewards).

  class Brightness(RewardFn):
    name, names = 'brightness', ('brightness',)
    def score(self, batch):
      return {'brightness': batch.images.mean(axis=(1, 2, 3)) / 255}
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np


class RewardError(RuntimeError):
  """A reward function failed or returned malformed scores."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class RewardBatch:
  """What a reward function sees: B generated images and what they were generated for.

  Attributes:
    images: uint8 [B, H, W, 3] generated images (edit outputs for edits).
    prompts: B prompts (captions or edit instructions).
    categories: B prompt categories ('general', 'portrait', ...).
    sample_ids: int [B], unique within the batch; they identify each sample across the rollout,
      the reward pipeline and the advantage computation.
    source_images: uint8 [B, H, W, 3] edit sources, or None for text-to-image.
    meta: B dicts of per-sample extras (e.g. {'spec': scene} or {'edit': edit} in the tiny
      world), or None.
  """

  images: np.ndarray
  prompts: Sequence[str]
  categories: Sequence[str]
  sample_ids: np.ndarray
  source_images: np.ndarray | None = None
  meta: Sequence[Mapping[str, Any]] | None = None

  def __post_init__(self):
    images = _check_images('images', self.images)
    size = images.shape[0]
    set_ = lambda name, value: object.__setattr__(self, name, value)
    set_('images', images)
    for field in ('prompts', 'categories'):
      values = getattr(self, field)
      if isinstance(values, str) or len(values) != size:
        raise ValueError(
          f'RewardBatch.{field}: expected a sequence of {size} strings (one per '
          f'image), got {_describe(values)}'
        )
      set_(field, tuple(values))
    ids = np.asarray(self.sample_ids)
    if ids.shape != (size,) or not np.issubdtype(ids.dtype, np.integer):
      raise ValueError(
        f'RewardBatch.sample_ids: expected int [{size}], got {ids.dtype} {ids.shape}'
      )
    if len(np.unique(ids)) != size:
      raise ValueError(f'RewardBatch.sample_ids must be unique within a batch, got {ids.tolist()}')
    set_('sample_ids', ids.astype(np.int64))
    if self.source_images is not None:
      sources = _check_images('source_images', self.source_images)
      if sources.shape[0] != size:
        raise ValueError(
          f'RewardBatch.source_images has {sources.shape[0]} images, images has {size}'
        )
      set_('source_images', sources)
    if self.meta is not None:
      if len(self.meta) != size:
        raise ValueError(f'RewardBatch.meta: expected {size} dicts, got {len(self.meta)}')
      set_('meta', tuple(self.meta))

  @property
  def size(self) -> int:
    return self.images.shape[0]

  def __len__(self) -> int:
    return self.size

  def frozen_copy(self) -> RewardBatch:
    """A copy whose arrays are private and read-only: safe to score while the caller moves on."""
    return dataclasses.replace(
      self,
      images=_readonly_copy(self.images),
      sample_ids=_readonly_copy(self.sample_ids),
      source_images=None if self.source_images is None else _readonly_copy(self.source_images),
      meta=None if self.meta is None else tuple(dict(m) for m in self.meta),
    )

  def select(self, indices) -> RewardBatch:
    """The sub-batch at `indices` (e.g. the samples of one category)."""
    indices = np.asarray(indices, np.int64)
    pick = lambda seq: tuple(seq[i] for i in indices)
    return RewardBatch(
      images=self.images[indices],
      prompts=pick(self.prompts),
      categories=pick(self.categories),
      sample_ids=self.sample_ids[indices],
      source_images=None if self.source_images is None else self.source_images[indices],
      meta=None if self.meta is None else pick(self.meta),
    )


def _describe(value) -> str:
  if isinstance(value, str):
    return f'the string {value[:40]!r}'
  return f'{type(value).__name__} of length {len(value)}'


def _check_images(field: str, images) -> np.ndarray:
  images = np.asarray(images)
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(
      f'RewardBatch.{field}: expected uint8 [B, H, W, 3], got {images.dtype} '
      f'{images.shape}; convert with np.clip(x * 255, 0, 255).astype(np.uint8)'
    )
  return images


def _readonly_copy(array: np.ndarray) -> np.ndarray:
  array = np.array(array, copy=True)
  array.setflags(write=False)
  return array


def check_scores(
  scores: Mapping[str, Any], names: Sequence[str], batch_size: int, where: str
) -> dict[str, np.ndarray]:
  """Validates a reward's output: exactly `names`, each a real [batch_size] array -> float32.

  Raises:
    RewardError naming `where` and the offending score.
  """
  if not isinstance(scores, Mapping):
    raise RewardError(f'{where} returned {type(scores).__name__}; expected a dict of scores.')
  missing, unexpected = sorted(set(names) - set(scores)), sorted(set(scores) - set(names))
  if missing or unexpected:
    raise RewardError(
      f'{where} returned scores {sorted(scores)}; declared names {list(names)} '
      f'(missing {missing}, unexpected {unexpected}).'
    )
  out = {}
  for name in names:
    value = np.asarray(scores[name])
    if value.shape != (batch_size,):
      raise RewardError(
        f'{where}: score {name!r} has shape {value.shape}; expected '
        f'[{batch_size}] (one per sample).'
      )
    if not (
      np.issubdtype(value.dtype, np.floating)
      or np.issubdtype(value.dtype, np.integer)
      or value.dtype == np.bool_
    ):
      raise RewardError(f'{where}: score {name!r} has dtype {value.dtype}; expected real numbers.')
    value = value.astype(np.float32)
    if np.isinf(value).any():
      raise RewardError(
        f'{where}: score {name!r} has inf at positions '
        f'{np.flatnonzero(np.isinf(value)).tolist()}; use NaN for a failed sample.'
      )
    out[name] = value
  return out


def nan_counts(scores: Mapping[str, np.ndarray]) -> dict[str, int]:
  """{name: number of NaN (failed) samples} for every score."""
  return {name: int(np.isnan(np.asarray(v, np.float32)).sum()) for name, v in scores.items()}


class RewardFn(abc.ABC):
  """Base class for rewards: subclasses set `name`, `names` and implement `score(batch)`.

  Calling the reward validates the output (`check_scores`), so every reward returns exactly its
  declared names as float32 [B] arrays. Rewards must be safe to call from a worker thread (no
  mutable state shared with the caller) because the async pipeline scores in the background.
  """

  name: str = ''
  names: tuple[str, ...] = ()

  @abc.abstractmethod
  def score(self, batch: RewardBatch) -> Mapping[str, Any]:
    """{name: [B]} scores for `batch`, in batch order."""

  def __call__(self, batch: RewardBatch) -> dict[str, np.ndarray]:
    if not isinstance(batch, RewardBatch):
      raise TypeError(f'reward {self.name!r} expects a RewardBatch, got {type(batch).__name__}')
    return check_scores(self.score(batch), self.names, batch.size, f'reward {self.name!r}')

  def __repr__(self) -> str:
    return f'{type(self).__name__}(name={self.name!r}, names={self.names})'


class FunctionReward(RewardFn):
  """Wraps `fn(batch) -> [B]` (one score called `name`) or `-> {name: [B]}` (names default to
  (name,))."""

  def __init__(
    self, name: str, fn: Callable[[RewardBatch], Any], names: Sequence[str] | None = None
  ):
    self.name = name
    self.names = tuple(names) if names is not None else (name,)
    self._fn = fn
    self._single = names is None

  def score(self, batch):
    out = self._fn(batch)
    return {self.name: out} if self._single and not isinstance(out, Mapping) else out
