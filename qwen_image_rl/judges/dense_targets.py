"""Per-token layout targets: which object's attributes each of the tower's image tokens shows.

A bag-of-words head over the whole image (perception.PerceptionModel) lets the tower say "red"
and "circle" without saying which shape is red; the rubric caps a score on exactly that binding
(README, "What the tower alone reads"). Here every merged image token (a G x G grid over the
image, row-major like the tower's output) gets its own targets from the scene's geometry: for
each object, the share of its bounding box inside the token, under each of the object's
attribute words (a shape's kind, colour and size; a glyph and the text colour; the sun or the
moon). A per-token head shared by all tokens then has to read those words from the token
itself, so a token's features carry its own object's kind and colour together, at its place.

Portraits have one face, whose attributes are bound already, and sky and ground fill the image:
they get no per-token words.
"""

from __future__ import annotations

import numpy as np

from qwen_image_rl.data import world as W

DENSE_WORDS = (
  *W.SHAPE_KINDS,
  *W.SHAPE_COLOURS,
  *W.SHAPE_SIZES,
  *(f'glyph:{c}' for c in W.GLYPHS),
  *(f'text:{c}' for c in W.TEXT_COLOURS),
  *W.BODIES,
)
COLUMN = {w: i for i, w in enumerate(DENSE_WORDS)}


def caption_word(word: str) -> str:
  """The caption word that names a per-token word ('glyph:A' -> 'A', 'text:red' -> 'red')."""
  return word.split(':', 1)[-1]


Box = tuple[float, float, float, float]  # (x0, y0, x1, y1) in image fractions


def shape_words(shape: W.Shape) -> tuple[str, str, str]:
  return shape.kind, shape.colour, shape.size


def shape_box(shape: W.Shape) -> Box:
  x, y = W.cell_center(shape.row, shape.col)
  hw, hh = W.shape_extent(shape.kind, shape.size)
  return x - hw, y - hh, x + hw, y + hh


def objects(spec) -> list[tuple[tuple[str, ...], Box]]:
  """Each object of a scene with per-token words: (its words, its bounding box)."""
  if spec.category == 'general':
    return [(shape_words(s), shape_box(s)) for s in spec.shapes]
  if spec.category == 'typography':
    return [
      ((f'glyph:{c}', f'text:{spec.colour}'), box)
      for c, box in zip(spec.text, W.glyph_boxes(len(spec.text)))
    ]
  if spec.category == 'landscape':
    x, y = W.body_center(spec.body_pos, spec.horizon)
    r = W.BODY_RADIUS
    return [((spec.body,), (x - r, y - r, x + r, y + r))]
  return []


def coverage(box: Box, grid: int) -> np.ndarray:
  """[grid * grid] share of the box's area inside each token's cell (row-major; sums to 1)."""
  x0, y0, x1, y1 = box
  edges = np.arange(grid + 1) / grid
  overlap_x = np.clip(np.minimum(edges[1:], x1) - np.maximum(edges[:-1], x0), 0.0, None)
  overlap_y = np.clip(np.minimum(edges[1:], y1) - np.maximum(edges[:-1], y0), 0.0, None)
  return (np.outer(overlap_y, overlap_x) / ((x1 - x0) * (y1 - y0))).reshape(-1)


def dense_targets(spec, grid: int) -> np.ndarray:
  """[grid * grid, len(DENSE_WORDS)] soft targets: per token and word, the largest share of an
  object with that word inside the token (0 where no such object reaches it)."""
  out = np.zeros((grid * grid, len(DENSE_WORDS)), np.float32)
  for words, box in objects(spec):
    share = coverage(box, grid)
    for w in words:
      out[:, COLUMN[w]] = np.maximum(out[:, COLUMN[w]], share)
  return out


def object_log_probs(probs: np.ndarray, spec, grid: int) -> list[float]:
  """Per object of the scene with per-token words, how well per-token word probabilities
  [grid * grid, len(DENSE_WORDS)] show it bound at its place, with no learning: the mean over
  its words of log p(word | token), each token weighted by the share of the object's box it
  holds (benchmarks/perception_match.py --dense reads a scene by its least well shown one)."""
  logp = np.log(np.clip(probs, 1e-6, 1.0))
  return [
    float(coverage(box, grid) @ logp[:, [COLUMN[w] for w in words]].mean(axis=1))
    for words, box in objects(spec)
  ]
