"""The tiny world's exact oracle: graded scores in [0, 1] from an image and its target spec.

The oracle plays the held-out "human": training never sees it. It reads the world definition
(palette, layout constants in world.py, the font) but never calls the renderer, and it measures
everything from pixels: colours are medians over regions, shapes come from connected components,
glyphs from template correlation, face features from coverage profiles. Scores are soft (colour
distances through a Gaussian, small dead zones for sub-pixel error) so mild blur and noise lower
them gradually instead of flipping them.

Alignment dimensions per category (a dimension that does not apply to a scene, like `relation`
with a single shape, is left out of the dict):
  general     presence, count (missing, extra and confetti objects), attributes (colour, size,
              kind), position, relation
  typography  glyphs (each requested glyph somewhere), count (no ink outside the slots), order
              (glyph i in slot i), colour
  portrait    well_formed (spec-free face structure), attributes (face shape, skin, eyes, hair,
              expression, glasses), identity (embedding similarity to the spec's identity)
  landscape   elements (sky colour, ground colour, one compact sun/moon of the right kind),
              layout (horizon height, sun/moon position)
`overall` is the rubric-capped alignment (capped_alignment: presence and count, then attributes,
then spatial relations; a failed tier caps the ones below it), `overall_mean` the plain mean of
the dimensions, `strict` 1.0 when every item-level check passes (strict_pass, t2i_checks), and
`quality` noise x sharpness x artefacts x ripple (not part of the alignment).

Edits (score_edit): core (the instruction's core requirement, core_checks), instruction_following
(capped: core, then the target scene), preservation (pixels outside the region the edit touches,
output vs source), identity (portrait edits only: identity_similarity(source, output)), overall
(capped: instruction following, then preservation and identity), strict, quality, the uncapped
`*_mean` twins, and `target/<dim>` entries with the target-spec scores.
"""

import functools
import itertools
import re

import numpy as np
from scipy import ndimage

from qwen_image_rl.data import font
from qwen_image_rl.data import world as W

COLOUR_SIGMA = 35.0  # RGB units; palette colours are >= 100 apart, so a wrong colour scores ~0


# ---------------------------------------------------------------------------------------------
# Helpers.
# ---------------------------------------------------------------------------------------------


class _Pixels(np.ndarray):
  """A float32 image already converted to [0, 255] (so nested calls do not rescale it)."""


def as_float_image(image) -> np.ndarray:
  """(H, W, 3) float32 in [0, 255]; accepts uint8, or floats in [0, 1]."""
  if isinstance(image, _Pixels):
    return image
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] != 3 or image.shape[0] != image.shape[1]:
    raise ValueError(f'expected a square RGB image (S, S, 3), got shape {image.shape}')
  if image.shape[0] < 16:
    raise ValueError(f'image side must be >= 16, got {image.shape[0]}')
  if image.dtype == np.uint8:
    pixels = image.astype(np.float32)
  elif np.issubdtype(image.dtype, np.floating):
    pixels = np.clip(image.astype(np.float32), 0.0, 1.0) * 255.0
  else:
    raise ValueError(f'expected uint8 or float image, got dtype {image.dtype}')
  return pixels.view(_Pixels)


def _dist(image: np.ndarray, colour) -> np.ndarray:
  return np.linalg.norm(image - np.asarray(colour, np.float32), axis=-1)


def colour_sim(measured, target, sigma: float = COLOUR_SIGMA) -> float:
  if measured is None:
    return 0.0
  d2 = float(np.sum((np.asarray(measured, np.float64) - np.asarray(target, np.float64)) ** 2))
  return float(np.exp(-d2 / (2 * sigma * sigma)))


def unmixed_colour_sim(measured, target, background, alpha_min: float = 0.4) -> float:
  """colour_sim after undoing dilution by `background` (blur mixes thin strokes with it).

  The measured colour is read as background + alpha * (colour - background) with alpha in
  [alpha_min, 1] fitted by projection onto the target direction; a wrong hue stays wrong.
  """
  if measured is None:
    return 0.0
  bg = np.asarray(background, np.float64)
  v, t = np.asarray(measured, np.float64) - bg, np.asarray(target, np.float64) - bg
  alpha = float(np.clip(v @ t / max(t @ t, 1e-6), alpha_min, 1.0))
  return colour_sim(bg + v / alpha, target)


def _gauss(x: float, sigma: float, dead_zone: float = 0.0) -> float:
  x = max(0.0, abs(float(x)) - dead_zone)
  return float(np.exp(-0.5 * (x / sigma) ** 2))


def _sigmoid(x: float) -> float:
  return float(1.0 / (1.0 + np.exp(-np.clip(x, -60, 60))))


def _softmax_pick(logits: dict, key) -> float:
  values = np.array(list(logits.values()), np.float64)
  values = np.exp(values - values.max())
  return float(values[list(logits).index(key)] / values.sum())


def _median_colour(image: np.ndarray, mask: np.ndarray):
  if not mask.any():
    return None
  return np.median(image[mask], axis=0)


@functools.lru_cache(maxsize=16)
def _coords(size: int) -> tuple[np.ndarray, np.ndarray]:
  c = (np.arange(size, dtype=np.float32) + 0.5) / size
  return np.meshgrid(c, c, indexing='ij')  # ys, xs


def _box_mask(size: int, x0, y0, x1, y1) -> np.ndarray:
  ys, xs = _coords(size)
  return (xs >= x0) & (xs <= x1) & (ys >= y0) & (ys <= y1)


def _expand(box, margin):
  x0, y0, x1, y1 = box
  return x0 - margin, y0 - margin, x1 + margin, y1 + margin


def _disc_mask(size: int, cx, cy, r0, r1=None) -> np.ndarray:
  """Pixels whose centre lies within radius r0 (or in the annulus r0..r1)."""
  ys, xs = _coords(size)
  r = np.hypot(xs - cx, ys - cy)
  return r <= r0 if r1 is None else (r >= r0) & (r <= r1)


# ---------------------------------------------------------------------------------------------
# Image quality (the aesthetics analogue): noise, sharpness, isolated-pixel artefacts, ripple.
# ---------------------------------------------------------------------------------------------

_LAPLACE = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], np.float32)
BLUR_CLEAN_MAX = 0.42  # re-blur ratio of clean renders stays below this (all sizes/categories)
# Ripple: a pixel where the intensity turns (adjacent steps of opposite sign, both > RIPPLE_STEP
# in some channel) along a row or column. Renders are flat fields with monotone edges (<= 0.017
# of pixels turn, at thin glasses frames) and the base's samples <= 0.03; a policy collapsed into
# high-frequency texture turned 0.10-0.27 while the median-Laplacian noise term still read 0.8-1
# (README, "The tiny world").
RIPPLE_STEP = 12.0
RIPPLE_FREE = 0.04  # fraction of turning pixels that costs nothing
RIPPLE_SCALE = 0.05


def ripple_fraction(img: np.ndarray) -> float:
  """Mean over both axes of the fraction of pixels where the intensity turns (see RIPPLE_STEP)."""
  fractions = []
  for axis in (0, 1):
    d = np.diff(img, axis=axis)
    n = d.shape[axis]
    a, b = np.take(d, range(n - 1), axis=axis), np.take(d, range(1, n), axis=axis)
    turns = (a * b < 0) & (np.abs(a) > RIPPLE_STEP) & (np.abs(b) > RIPPLE_STEP)
    fractions.append(float(turns.any(-1).mean()))
  return float(np.mean(fractions))


def image_quality(image) -> dict:
  """{'noise', 'sharpness', 'artefacts', 'ripple', 'quality'} in [0, 1]; clean renders score 1."""
  img = as_float_image(image)
  # Noise: robust (median) Laplacian estimate; flat regions dominate clean images.
  sigma = np.mean(
    [np.median(np.abs(ndimage.convolve(img[..., c], _LAPLACE, mode='reflect'))) for c in range(3)]
  ) / (0.6745 * 6.0)
  noise = _gauss(sigma, 10.0, dead_zone=1.5)
  # Sharpness: how much a 5-tap box blur removes of the gradients (Crete-Roffet re-blur).
  gray = img.mean(-1)
  ratios = []
  for axis in (0, 1):
    d_img = np.abs(np.diff(gray, axis=axis))
    d_blur = np.abs(
      np.diff(ndimage.uniform_filter1d(gray, 5, axis=axis, mode='reflect'), axis=axis)
    )
    total = d_img.sum()
    ratios.append(1.0 if total < 1e-6 else (total - np.maximum(0, d_img - d_blur).sum()) / total)
  sharpness = _gauss(max(ratios), 0.17, dead_zone=BLUR_CLEAN_MAX)
  # Artefacts: impulses, pixels far outside the range of all 8 neighbours in some channel
  # (anti-aliased edge pixels lie between their neighbours, so they do not count).
  padded = np.pad(img, ((1, 1), (1, 1), (0, 0)), mode='edge')
  n = img.shape[0]
  neighbours = np.stack(
    [
      padded[1 + dy : 1 + dy + n, 1 + dx : 1 + dx + n]
      for dy in (-1, 0, 1)
      for dx in (-1, 0, 1)
      if dy or dx
    ]
  )
  outside = np.maximum(img - neighbours.max(0), neighbours.min(0) - img)
  isolated = float(np.mean(outside.max(-1) > 60))
  artefacts = float(np.exp(-max(0.0, isolated - 0.005) / 0.01))
  ripple = float(np.exp(-max(0.0, ripple_fraction(img) - RIPPLE_FREE) / RIPPLE_SCALE))
  return {
    'noise': noise,
    'sharpness': sharpness,
    'artefacts': artefacts,
    'ripple': ripple,
    'quality': noise * sharpness * artefacts * ripple,
  }


# ---------------------------------------------------------------------------------------------
# General: shapes from connected components.
# ---------------------------------------------------------------------------------------------

# Fill of the (soft) bounding box, and how far the centroid sits below the box centre (in box
# heights): a triangle (apex up) has its centroid a sixth of its height below the centre.
KIND_PROTOTYPES = {'circle': (np.pi / 4, 0.0), 'square': (1.0, 0.0), 'triangle': (0.5, 1 / 6)}
KIND_SIGMAS = (0.06, 0.04)
MAX_DETECTIONS = 8


def _soft_extent(profile: np.ndarray) -> tuple[float, float]:
  """(start, length) in pixels of a 1-d coverage profile (max coverage per row or column)."""
  length = float(profile.sum())
  first = int(np.argmax(profile >= 0.5)) if (profile >= 0.5).any() else int(np.argmax(profile))
  start = first + 1 - float(profile[: first + 1].sum())
  return start, length


def detect_shapes(image) -> list[dict]:
  """Foreground components: colour, area (image fraction), centroid (x, y), kind logits."""
  img = as_float_image(image)
  size = img.shape[0]
  dist = _dist(img, W.GENERAL_BACKGROUND)
  labels, _ = ndimage.label(dist > 50)
  min_pixels = 0.35 * W.shape_area('small') * size * size
  found = []
  for index, sl in enumerate(ndimage.find_objects(labels), start=1):
    # Grow the window by a pixel so faint anti-aliased edge pixels count as partial coverage.
    sl = tuple(slice(max(0, s.start - 1), min(size, s.stop + 1)) for s in sl)
    comp = labels[sl] == index
    if comp.sum() < min_pixels:
      continue
    colour = np.median(img[sl][comp], axis=0)
    # Core colour: the quarter of the component farthest from the background (no blurred rim).
    comp_dist = dist[sl][comp]
    core_colour = np.median(img[sl][comp][comp_dist >= np.percentile(comp_dist, 75)], axis=0)
    full = max(float(np.linalg.norm(colour - np.asarray(W.GENERAL_BACKGROUND))), 1.0)
    region = ndimage.binary_dilation(comp) & ((labels[sl] == 0) | comp)
    cov = np.clip(dist[sl] / full, 0, 1) * region
    area = float(cov.sum())
    rows, cols = np.indices(cov.shape)
    cy, cx = float((cov * rows).sum() / area), float((cov * cols).sum() / area)
    top, height = _soft_extent(cov.max(axis=1))
    _, width = _soft_extent(cov.max(axis=0))
    fill = area / max(height * width, 1e-6)
    offset = (cy + 0.5 - (top + height / 2)) / max(height, 1e-6)
    logits = {
      k: -0.5 * (((fill - f) / KIND_SIGMAS[0]) ** 2 + ((offset - o) / KIND_SIGMAS[1]) ** 2)
      for k, (f, o) in KIND_PROTOTYPES.items()
    }
    found.append(
      {
        'colour': colour,
        'core_colour': core_colour,
        'area': area / size**2,
        'fill': fill,
        'offset': offset,
        'x': (cx + sl[1].start + 0.5) / size,
        'y': (cy + sl[0].start + 0.5) / size,
        'kind_logits': logits,
      }
    )
  found.sort(key=lambda d: -d['area'])
  return found


SIZE_LOG_SCALE = 0.07
POSITION_SIGMA, POSITION_DEAD_ZONE = 0.07, 0.02
RELATION_MARGIN, RELATION_SCALE = 0.1, 0.03
JUNK_WEIGHT = 2.0  # one small shape's worth of speckle counts as two extra objects


def _shape_scores(shape: W.Shape, det: dict) -> dict:
  colour = unmixed_colour_sim(det['colour'], W.SHAPE_COLOURS[shape.colour], W.GENERAL_BACKGROUND)
  kind = _softmax_pick(det['kind_logits'], shape.kind)
  mid = np.sqrt(W.shape_area('small') * W.shape_area('large'))
  z = np.log(max(det['area'], 1e-6) / mid) / SIZE_LOG_SCALE
  size = _sigmoid(z if shape.size == 'large' else -z)
  ex, ey = W.shape_centroid(shape)
  position = _gauss(np.hypot(det['x'] - ex, det['y'] - ey), POSITION_SIGMA, POSITION_DEAD_ZONE)
  presence = min(1.0, det['area'] / (0.5 * W.shape_area('small')))
  return {'colour': colour, 'kind': kind, 'size': size, 'position': position, 'presence': presence}


def _match(shapes, dets) -> list:
  """Best injective assignment of requested shapes to detections (None = unmatched)."""
  dets = dets[:MAX_DETECTIONS]
  scores = [[_shape_scores(s, d) for d in dets] for s in shapes]

  def value(i, j):
    s = scores[i][j]
    return 2 * s['colour'] + s['kind'] + s['size'] + s['position']

  best, best_value = [None] * len(shapes), -1.0
  options = list(range(len(dets))) + [None] * len(shapes)
  for perm in set(itertools.permutations(options, len(shapes))):
    v = sum(value(i, j) for i, j in enumerate(perm) if j is not None)
    if v > best_value:
      best, best_value = list(perm), v
  return [None if j is None else (dets[j], scores[i][j]) for i, j in enumerate(best)]


def _relation_score(relation: str, a: dict, b: dict) -> float:
  gap = {
    'left of': b['x'] - a['x'],
    'right of': a['x'] - b['x'],
    'above': b['y'] - a['y'],
    'below': a['y'] - b['y'],
  }[relation]
  return _sigmoid((gap - RELATION_MARGIN) / RELATION_SCALE)


def _junk_objects(image: np.ndarray) -> float:
  """Foreground too small to be a shape, in units of one small shape (confetti, speckle)."""
  size = image.shape[0]
  labels, n = ndimage.label(_dist(image, W.GENERAL_BACKGROUND) > 50)
  if n == 0:
    return 0.0
  counts = np.bincount(labels.ravel())[1:]
  min_pixels = 0.35 * W.shape_area('small') * size * size
  return float(counts[counts < min_pixels].sum() / (W.shape_area('small') * size * size))


def _shape_check(p) -> float:
  return min(p['presence'], p['colour'], p['kind'], p['size'], p['position']) if p else 0.0


def _general(image, spec: W.GeneralScene) -> tuple[dict, dict]:
  dets = detect_shapes(image)
  matches = _match(spec.shapes, dets)
  per = [m[1] if m else None for m in matches]
  # Extra objects (and confetti too small to be one) are a count failure, as are missing ones.
  extra = abs(len(dets) - len(spec.shapes)) + JUNK_WEIGHT * _junk_objects(image)
  out = {
    'presence': np.mean([p['presence'] if p else 0.0 for p in per]),
    'count': 1.0 / (1.0 + extra),
    'attributes': np.mean(
      [np.mean([p['colour'], p['size'], p['kind']]) if p else 0.0 for p in per]
    ),
    'position': np.mean([p['position'] if p else 0.0 for p in per]),
  }
  checks = {'count': out['count']}
  for i, (shape, p) in enumerate(zip(spec.shapes, per)):
    for k in ('presence', 'colour', 'kind', 'size', 'position'):
      checks[f'shape{i}/{k}'] = p[k] if p else 0.0
    # Solid: the shape shows its own colour, not only a blurred mixture (`colour` unmixes).
    checks[f'shape{i}/solid'] = (
      colour_sim(matches[i][0]['core_colour'], W.SHAPE_COLOURS[shape.colour]) if p else 0.0
    )
  if spec.relation is not None:
    a, b = matches[0], matches[1]
    out['relation'] = _relation_score(spec.relation, a[0], b[0]) if a and b else 0.0
    checks['relation'] = out['relation']
  return {k: float(v) for k, v in out.items()}, {k: float(v) for k, v in checks.items()}


def score_general(image, spec: W.GeneralScene) -> dict:
  return _general(as_float_image(image), spec)[0]


def shape_absence(image, shape: W.Shape) -> float:
  """1 - how well some detected object is `shape`'s colour at `shape`'s place (edits: removed)."""
  best = 0.0
  for det in detect_shapes(image)[:MAX_DETECTIONS]:
    s = _shape_scores(shape, det)
    best = max(best, min(s['presence'], s['colour'], s['position']))
  return 1.0 - best


# ---------------------------------------------------------------------------------------------
# Typography: glyph templates correlated in each expected slot.
# ---------------------------------------------------------------------------------------------

INK_SCALE = 150.0  # RGB distance from the background that counts as full ink
GLYPH_TEMPERATURE = 0.02
SEARCH_FRACTION = 0.035  # slot search radius, fraction of the image side
STRAY_MARGIN = 0.03  # ink this far beyond a slot's search window still belongs to it
GLYPH_INK_FILL = 0.45  # rough ink fraction of a glyph box (the unit of stray ink)
STRAY_DEAD_ZONE = 0.1  # a tenth of a glyph of stray ink (blur halo, speckle) is free
STRAY_WEIGHT = 2.0  # like JUNK_WEIGHT: a glyph's worth of stray ink is two extra objects
STRAY_INK_FLOOR = 30.0  # RGB distance from the background below which nothing is stray ink


def _slot_pixels(size: int, box) -> tuple[int, int, int, int]:
  x0, y0, x1, y1 = box
  return (
    int(np.floor(y0 * size)),
    int(np.ceil(y1 * size)),
    int(np.floor(x0 * size)),
    int(np.ceil(x1 * size)),
  )


@functools.lru_cache(maxsize=64)
def _glyph_templates(size: int, n: int, slot: int) -> np.ndarray:
  """(len(GLYPHS), h, w) anti-aliased coverage of every glyph in a slot, zero-mean unit-norm."""
  box = W.glyph_boxes(n)[slot]
  r0, r1, c0, c1 = _slot_pixels(size, box)
  ss = 4
  ys = (np.arange(r0 * ss, r1 * ss) + 0.5) / (size * ss)
  xs = (np.arange(c0 * ss, c1 * ss) + 0.5) / (size * ss)
  ys, xs = np.meshgrid(ys, xs, indexing='ij')
  h, w = r1 - r0, c1 - c0
  out = []
  for char in W.GLYPHS:
    cov = font.glyph_mask(char, box, xs, ys).reshape(h, ss, w, ss).mean(axis=(1, 3))
    cov = cov - cov.mean()
    out.append(cov / np.linalg.norm(cov))
  return np.stack(out).astype(np.float32)


def glyph_probabilities(image, n: int) -> np.ndarray:
  """(n, len(GLYPHS)): probability of each glyph in each of the n expected slots."""
  img = as_float_image(image)
  size = img.shape[0]
  ink = np.clip(_dist(img, W.TEXT_BACKGROUND) / INK_SCALE, 0, 1)
  m = max(1, int(round(SEARCH_FRACTION * size)))
  padded = np.pad(ink, m)
  probs = []
  for slot, box in enumerate(W.glyph_boxes(n)):
    templates = _glyph_templates(size, n, slot)
    r0, r1, c0, c1 = _slot_pixels(size, box)
    patches = np.stack(
      [
        padded[r0 + m + dy : r1 + m + dy, c0 + m + dx : c1 + m + dx]
        for dy in range(-m, m + 1)
        for dx in range(-m, m + 1)
      ]
    )
    patches = patches - patches.mean(axis=(1, 2), keepdims=True)
    norms = np.linalg.norm(patches.reshape(len(patches), -1), axis=1)
    ncc = np.einsum('shw,ghw->sg', patches, templates) / np.maximum(norms, 1e-3)[:, None]
    logits = ncc.max(axis=0) / GLYPH_TEMPERATURE
    p = np.exp(logits - logits.max())
    probs.append(p / p.sum())
  return np.stack(probs)


def stray_ink(image, n: int) -> float:
  """Ink outside the n glyph slots (and their search margin), in glyphs' worth of ink.

  The unit is the ink per slot inside the slots (floored, so a blank image has no stray ink
  to divide by zero); faint ink (noise, a blur halo) under STRAY_INK_FLOOR does not count.
  """
  img = as_float_image(image)
  size = img.shape[0]
  ink = np.clip((_dist(img, W.TEXT_BACKGROUND) - STRAY_INK_FLOOR) / INK_SCALE, 0, 1)
  slots = np.zeros((size, size), bool)
  for box in W.glyph_boxes(n):
    slots |= _box_mask(size, *_expand(box, SEARCH_FRACTION + STRAY_MARGIN))
  x0, y0, x1, y1 = W.glyph_boxes(1)[0]
  glyph_ink = GLYPH_INK_FILL * (x1 - x0) * (y1 - y0) * size * size
  per_glyph = max(float(ink[slots].sum()) / n, 0.25 * glyph_ink)
  return float(ink[~slots].sum() / per_glyph)


def _typography(img, spec: W.TypographyScene) -> tuple[dict, dict]:
  probs = glyph_probabilities(img, len(spec.text))
  idx = [W.GLYPHS.index(c) for c in spec.text]
  # Text colour: the pixels farthest from the background (stroke cores, not anti-aliased rims).
  dist = _dist(img, W.TEXT_BACKGROUND)
  core = dist >= max(0.85 * float(np.percentile(dist, 99.5)), 0.3 * INK_SCALE)
  out = {
    'glyphs': float(np.mean([probs[:, g].max() for g in idx])),
    'order': float(np.mean([probs[k, g] for k, g in enumerate(idx)])),
    'colour': unmixed_colour_sim(
      _median_colour(img, core), W.TEXT_COLOURS[spec.colour], W.TEXT_BACKGROUND
    ),
    # Extra glyphs or blotches outside the requested slots are a count failure.
    'count': 1.0
    / (1.0 + STRAY_WEIGHT * max(0.0, stray_ink(img, len(spec.text)) - STRAY_DEAD_ZONE)),
  }
  checks = {f'glyph{k}': float(probs[k, g]) for k, g in enumerate(idx)}
  # Solid ink: the stroke cores show the text colour itself, not only a blurred mixture that
  # the unmixing in `colour` reads back (a text blurred past legibility fails here).
  solid = colour_sim(_median_colour(img, core), W.TEXT_COLOURS[spec.colour], 2 * COLOUR_SIGMA)
  checks.update(colour=out['colour'], ink_solid=solid, count=out['count'])
  return out, checks


def score_typography(image, spec: W.TypographyScene) -> dict:
  return _typography(as_float_image(image), spec)[0]


# ---------------------------------------------------------------------------------------------
# Portrait: face features, identity embedding.
# ---------------------------------------------------------------------------------------------

CHEEK_OFFSET, CHEEK_RADIUS = (0.14, 0.1), 0.025  # clear of glasses, mouth and outline
SQUARENESS_ROW = 0.18  # width ratio measured this far below the face centre ...
FACE_WIDTH_ROW = 0.09  # ... to the width here: below the glasses' frames, which end at 0.066
SCLERA_PROBE_X = (W.IRIS_RADIUS + W.SCLERA_RADII[0]) / 2  # between iris and sclera edge
GLASSES_THRESHOLD, GLASSES_SCALE = 0.35, 0.06
CHIN_COLUMNS = 0.02  # chin height measured over columns within this of the centre
HAIR_BOX = (0.06, -0.235, -0.2)  # half-width, top and bottom (relative to the face centre)
COLOUR_SCALE = 60.0  # embedding units: RGB / 60 (identity colours are >= 60 apart)
SHAPE_SCALES = (0.025, 0.025, 0.06)  # a, b, squareness
IDENTITY_GROUPS = (slice(0, 3), slice(3, 6), slice(6, 9), slice(9, 12))
# Per group (skin, eyes, hair, face shape), in embedding units: identity colours are >= 1.38
# units (83 RGB) apart and face shapes >= 3 units, so a changed identity field still scores
# < 0.15 while blur, VAE softening and a generator's imprecision (up to about the dead zone plus
# a sigma) keep most of the similarity.
IDENTITY_DEAD_ZONES = (0.35, 0.35, 0.35, 0.6)
IDENTITY_SIGMAS = (0.5, 0.5, 0.5, 0.8)
# Blur mixes the small iris with the white sclera around it, a glasses frame and the skin: eye
# colours are compared after undoing a mixture of up to 1 - IRIS_ALPHA_MIN with them.
IRIS_ALPHA_MIN = 0.45
EXPRESSION_SIGN = {'smiling': 1.0, 'neutral': 0.0, 'frowning': -1.0}
# Curvature = mean mouth height in the centre columns minus that in the corner columns,
# about CURVE_GAIN * depth for a smile.
CURVE_CENTRE_U, CURVE_CORNER_U = (0.0, 0.3), (0.55, 0.9)
CURVE_GAIN = 0.55  # measured on clean renders: 0.53 (128 px) .. 0.59 (64 px)
CURVE_SIGMA = 0.15 * W.MOUTH_DEPTH


def _edges(line: np.ndarray) -> tuple[float, float]:
  """Sub-pixel (start, end), in pixels, of the covered span of a 1-d coverage line.

  Only the few pixels around each outer edge are summed, so features inside the face (whose
  anti-aliased mixtures can look like background) do not matter.
  """
  inside = np.nonzero(line >= 0.5)[0]
  if inside.size == 0:
    return 0.0, 0.0
  first, last = int(inside[0]), int(inside[-1])
  lo = max(0, first - 3)
  start = first + 2 - float(line[lo : first + 2].sum())  # pixels first+1 and last-1 are inside
  end = (last - 1) + float(line[last - 1 : last + 4].sum())
  return start, end


def _row_width(cov: np.ndarray, y: float) -> float:
  """Outline width (image fraction) at height y, interpolated between pixel rows."""
  size = cov.shape[0]
  t = y * size - 0.5
  r = int(np.clip(np.floor(t), 0, size - 2))
  f = float(np.clip(t - r, 0, 1))
  widths = [np.subtract(*_edges(cov[i])[::-1]) for i in (r, r + 1)]
  return float(((1 - f) * widths[0] + f * widths[1]) / size)


def portrait_features(image) -> dict:
  """Spec-free measurements of a portrait image (colours in RGB, lengths in image fractions)."""
  img = as_float_image(image)
  size = img.shape[0]
  cx, cy = W.FACE_CENTER
  ey = cy + W.EYE_DY
  cheeks = _disc_mask(size, cx - CHEEK_OFFSET[0], cy + CHEEK_OFFSET[1], CHEEK_RADIUS) | _disc_mask(
    size, cx + CHEEK_OFFSET[0], cy + CHEEK_OFFSET[1], CHEEK_RADIUS
  )
  skin = _median_colour(img, cheeks)
  bg_dist = _dist(img, W.PORTRAIT_BACKGROUND)
  cov = np.clip(bg_dist / max(40.0, float(np.linalg.norm(skin - W.PORTRAIT_BACKGROUND))), 0, 1)
  width0 = _row_width(cov, cy + FACE_WIDTH_ROW)
  a = width0 / 2
  squareness = _row_width(cov, cy + SQUARENESS_ROW) / max(width0, 1e-3)
  cols = slice(int(np.floor((cx - CHIN_COLUMNS) * size)), int(np.ceil((cx + CHIN_COLUMNS) * size)))
  b = float(np.mean([_edges(cov[:, c])[1] for c in range(cols.start, cols.stop)]) / size - cy)
  hw, top, bottom = HAIR_BOX
  hair = _median_colour(img, _box_mask(size, cx - hw, cy + top, cx + hw, cy + bottom))
  # Iris colour: the quarter of iris pixels least like the sclera (blur mixes the rim with it).
  eyes = []
  for s in (-1, 1):
    pixels = img[_disc_mask(size, cx + s * W.EYE_DX, ey, max(W.IRIS_RADIUS, 0.75 / size))]
    order = np.argsort(-_dist(pixels, W.SCLERA_COLOUR))
    eyes.append(pixels[order[: max(2, len(order) // 4)]].mean(axis=0))
  eye = (eyes[0] + eyes[1]) / 2
  # Sclera: between the iris edge and the sclera edge, left and right of each iris.
  sclera = np.zeros((size, size), bool)
  for s in (-1, 1):
    for side in (-1, 1):
      sclera |= _disc_mask(size, cx + s * W.EYE_DX + side * SCLERA_PROBE_X, ey, 0.008)
  whiteness = float(np.mean(np.exp(-0.5 * (_dist(img[sclera], W.SCLERA_COLOUR) / 80) ** 2)))
  # Mouth: weighted height of non-skin pixels in centre vs corner columns.
  ys, xs = _coords(size)
  region = _box_mask(
    size,
    cx - W.MOUTH_HALF_WIDTH,
    cy + W.MOUTH_Y - 0.07,
    cx + W.MOUTH_HALF_WIDTH,
    cy + W.MOUTH_Y + 0.07,
  )
  contrast = max(30.0, float(np.linalg.norm(np.asarray(W.MOUTH_COLOUR) - skin)))
  mouthness = np.clip((_dist(img, skin) - 15) / (0.5 * contrast), 0, 1) * region
  u = np.abs(xs - cx) / W.MOUTH_HALF_WIDTH

  def mean_y(lo, hi):
    w = mouthness * (u >= lo) * (u <= hi)
    return float((w * ys).sum() / w.sum()) if w.sum() > 1e-3 else cy + W.MOUTH_Y

  curvature = mean_y(*CURVE_CENTRE_U) - mean_y(*CURVE_CORNER_U)
  col_max = mouthness.max(axis=0)[np.abs(xs[0] - cx) <= 0.5 * W.MOUTH_HALF_WIDTH]
  mouth_present = float(col_max.mean()) if col_max.size else 0.0
  # Glasses: how far the ring band moves from the skin towards the frame colour (0 .. 1).
  band = np.zeros((size, size), bool)
  for s in (-1, 1):
    band |= _disc_mask(
      size, cx + s * W.EYE_DX, ey, W.GLASSES_RADII[0] + 0.004, W.GLASSES_RADII[1] - 0.004
    )
  axis = np.asarray(W.GLASSES_COLOUR, np.float64) - skin
  along = (img[band] - skin) @ axis / max(float(axis @ axis), 1.0)
  glasses = float(np.clip(along, 0, 1).mean())
  return {
    'skin': skin,
    'eye': eye,
    'eye_left': eyes[0],
    'eye_right': eyes[1],
    'hair': hair,
    'a': a,
    'b': b,
    'squareness': squareness,
    'curvature': curvature,
    'mouth_present': mouth_present,
    'glasses': glasses,
    'sclera_whiteness': whiteness,
  }


def _embedding(skin, eye, hair, a, b, squareness) -> np.ndarray:
  colours = [np.zeros(3) if c is None else np.asarray(c, np.float64) for c in (skin, eye, hair)]
  shape = np.array([a, b, squareness]) / np.array(SHAPE_SCALES)
  return np.concatenate([c / COLOUR_SCALE for c in colours] + [shape]).astype(np.float32)


def expected_half_width(face_shape: str, dy: float) -> float:
  """Half-width of a face outline dy below the face centre (the superellipse)."""
  a, b, n = W.FACE_SHAPES[face_shape]
  return float(a * (1 - (dy / b) ** n) ** (1 / n))


def expected_shape(face_shape: str) -> tuple[float, float, float]:
  """(a, b, squareness) as portrait_features measures them on a clean render."""
  a = expected_half_width(face_shape, FACE_WIDTH_ROW)
  squareness = expected_half_width(face_shape, SQUARENESS_ROW) / a
  return a, W.FACE_SHAPES[face_shape][1], squareness


def identity_embedding(image) -> np.ndarray:
  """12-d identity vector: skin, eye and hair RGB / 60, face (a, b, squareness) / scales.

  a is the half-width FACE_WIDTH_ROW below the face centre, squareness the width ratio of the
  rows SQUARENESS_ROW and FACE_WIDTH_ROW below it, b the chin's depth below the centre.
  """
  f = portrait_features(image)
  return _embedding(f['skin'], f['eye'], f['hair'], f['a'], f['b'], f['squareness'])


def spec_identity_embedding(spec: W.PortraitScene) -> np.ndarray:
  """The embedding a perfect render of `spec` has, from the world definition."""
  return _embedding(
    W.SKIN_TONES[spec.skin],
    W.EYE_COLOURS[spec.eyes],
    W.HAIR_COLOURS[spec.hair],
    *expected_shape(spec.face_shape),
  )


def _iris_candidates(eye, skin) -> np.ndarray:
  """Iris colours (embedding units) that `eye` may be a blurred mixture of: measured = a iris +
  the rest split between the sclera, a glasses frame and the skin, a >= IRIS_ALPHA_MIN."""
  others = np.stack(
    [
      np.asarray(W.SCLERA_COLOUR, np.float64) / COLOUR_SCALE,
      np.asarray(W.GLASSES_COLOUR, np.float64) / COLOUR_SCALE,
      np.asarray(skin, np.float64),
    ]
  )
  steps = 4
  splits = (
    np.array(
      [(i, j, steps - i - j) for i in range(steps + 1) for j in range(steps + 1 - i)], np.float64
    )
    / steps
  )
  alphas = np.linspace(IRIS_ALPHA_MIN, 1.0, 12)[:, None, None]
  rest = (1 - alphas) * (splits @ others)[None]
  candidates = (np.asarray(eye, np.float64) - rest) / alphas
  return np.clip(candidates.reshape(-1, 3), 0.0, 255.0 / COLOUR_SCALE)


def iris_colour_sim(eye, skin, target) -> float:
  """colour_sim of the measured eye colour, unmixed as in the identity, to an iris colour."""
  candidates = (
    _iris_candidates(
      np.asarray(eye, np.float64) / COLOUR_SCALE, np.asarray(skin, np.float64) / COLOUR_SCALE
    )
    * COLOUR_SCALE
  )
  return colour_sim(candidates[np.argmin(np.linalg.norm(candidates - target, axis=-1))], target)


def _unmixed_eye_distance(ea: np.ndarray, eb: np.ndarray) -> float:
  """Smallest distance (embedding units) between any iris colours the two eyes may show."""
  groups = IDENTITY_GROUPS
  a, b = (
    _iris_candidates(ea[groups[1]], ea[groups[0]]),
    _iris_candidates(eb[groups[1]], eb[groups[0]]),
  )
  return float(np.min(np.linalg.norm(a[:, None] - b[None], axis=-1)))


def embedding_similarity(ea: np.ndarray, eb: np.ndarray) -> float:
  """exp(-sum_g max(0, d_g - dead_zone_g)^2 / (2 sigma_g^2)) over the four feature groups.

  d_g is the Euclidean distance of group g (the eyes' after unmixing from the sclera).
  """
  z = 0.0
  for i, g in enumerate(IDENTITY_GROUPS):
    if i == 1:
      d = _unmixed_eye_distance(ea, eb)
    else:
      d = float(np.linalg.norm(ea[g] - eb[g]))
    z += (max(0.0, d - IDENTITY_DEAD_ZONES[i]) / IDENTITY_SIGMAS[i]) ** 2
  return float(np.exp(-z / 2))


def identity_similarity(img_a, img_b) -> float:
  """Similarity in [0, 1] of the identities (face shape, skin, eyes, hair) of two portraits."""
  return embedding_similarity(identity_embedding(img_a), identity_embedding(img_b))


def _portrait(img, spec: W.PortraitScene) -> tuple[dict, dict]:
  f = portrait_features(img)
  emb = _embedding(f['skin'], f['eye'], f['hair'], f['a'], f['b'], f['squareness'])
  shape_logits = {}
  for name in W.FACE_SHAPES:
    proto = np.array(expected_shape(name)) / np.array(SHAPE_SCALES)
    shape_logits[name] = -0.5 * float(np.sum((emb[9:] - proto) ** 2))
  curve_logits = {
    e: -0.5 * ((f['curvature'] - CURVE_GAIN * s * W.MOUTH_DEPTH) / CURVE_SIGMA) ** 2
    for e, s in EXPRESSION_SIGN.items()
  }
  p_glasses = _sigmoid((f['glasses'] - GLASSES_THRESHOLD) / GLASSES_SCALE)
  attributes = {
    'face_shape': _softmax_pick(shape_logits, spec.face_shape),
    'skin': colour_sim(f['skin'], W.SKIN_TONES[spec.skin]),
    'eyes': iris_colour_sim(f['eye'], f['skin'], W.EYE_COLOURS[spec.eyes]),
    'hair': colour_sim(f['hair'], W.HAIR_COLOURS[spec.hair]),
    'expression': _softmax_pick(curve_logits, spec.expression),
    'glasses': p_glasses if spec.glasses else 1 - p_glasses,
  }
  # Spec-free structure: a face of plausible width, white sclera, distinct irises, a mouth,
  # and left/right symmetry.
  a_lo, a_hi = 0.17, 0.29
  iris_vs_sclera = min(
    colour_sim(f['eye_left'], W.SCLERA_COLOUR, 25), colour_sim(f['eye_right'], W.SCLERA_COLOUR, 25)
  )
  structure = {
    'face_width': _gauss(max(a_lo - f['a'], f['a'] - a_hi, 0.0), 0.03),
    'sclera': f['sclera_whiteness'],
    'irises': 1 - iris_vs_sclera,
    'mouth': min(1.0, f['mouth_present'] / 0.8),
    'symmetry': colour_sim(f['eye_left'], f['eye_right'], 30),
  }
  out = {
    'well_formed': float(np.mean(list(structure.values()))),
    'attributes': float(np.mean(list(attributes.values()))),
    'identity': embedding_similarity(emb, spec_identity_embedding(spec)),
  }
  # Strict checks: each requested attribute, the identity, and the face structure as a whole
  # (its parts are small, blur-sensitive probes: one weak part alone is no failure).
  checks = {
    **{f'attributes/{k}': v for k, v in attributes.items()},
    'well_formed': out['well_formed'],
    'identity': out['identity'],
  }
  return out, {k: float(v) for k, v in checks.items()}


def score_portrait(image, spec: W.PortraitScene) -> dict:
  return _portrait(as_float_image(image), spec)[0]


# ---------------------------------------------------------------------------------------------
# Landscape.
# ---------------------------------------------------------------------------------------------

HORIZON_SIGMA, HORIZON_DEAD_ZONE = 0.04, 0.015
BODY_COMPACT_RADIUS = 1.6  # body radii around the body's centroid that hold a disc's mass
BODY_X_SIGMA, BODY_X_DEAD_ZONE = 0.07, 0.02


def _landscape(img, spec: W.LandscapeScene) -> tuple[dict, dict]:
  size = img.shape[0]
  sky, ground = W.SKY_COLOURS[spec.sky], W.GROUND_COLOURS[spec.ground]
  rows = np.median(img, axis=1)  # robust to the sun/moon (narrower than half the width)
  d_sky, d_ground = _dist(rows, sky), _dist(rows, ground)
  groundness = d_sky / np.maximum(d_sky + d_ground, 1e-3)
  horizon = float((1 - groundness).sum() / size)
  ys, xs = _coords(size)
  sky_region = ys < horizon - 0.02
  # The sun/moon is found on a 3x3-median-filtered copy, so pixel noise does not count as body.
  # (Not at small sizes, where the filter would erase the thin crescent of the moon.)
  if size >= 48:
    img = ndimage.median_filter(img, size=(3, 3, 1), mode='nearest')
  sky_measured = _median_colour(img, sky_region)
  ground_measured = _median_colour(img, ys > horizon + 0.02)
  if sky_measured is not None:
    body_cov = np.clip((_dist(img, sky_measured) - 35) / 40, 0, 1) * sky_region
  else:
    body_cov = np.zeros((size, size), np.float32)
  mass = float(body_cov.sum())
  present = min(1.0, mass / size**2 / (0.3 * np.pi * W.BODY_RADIUS**2))
  # More than one body (or sky blotches as large as a fifth of one) is a count failure.
  labels, n = ndimage.label(body_cov >= 0.5)
  blobs = np.bincount(labels.ravel())[1:] if n else np.zeros(0)
  extra = max(0, int(np.sum(blobs >= 0.2 * np.pi * (W.BODY_RADIUS * size) ** 2)) - 1)
  count = 1.0 / (1.0 + extra)
  if mass > 1e-3:
    kind = unmixed_colour_sim(
      _median_colour(img, body_cov >= 0.99), W.BODIES[spec.body], sky_measured
    )
    body_x, body_y = float((body_cov * xs).sum() / mass), float((body_cov * ys).sum() / mass)
    expected_x = W.body_centroid(spec.body, spec.body_pos, spec.horizon)[0]
    position = _gauss(body_x - expected_x, BODY_X_SIGMA, BODY_X_DEAD_ZONE)
    # A disc (or crescent): its mass sits near its centroid, unlike a stripe of the colour.
    near = np.hypot(xs - body_x, ys - body_y) <= BODY_COMPACT_RADIUS * W.BODY_RADIUS
    compact = float(np.clip(((body_cov * near).sum() / mass - 0.5) / 0.4, 0, 1))
    # Solid: somewhere the body shows its own colour, not only a blurred mixture with the sky.
    solid = float(
      np.max(np.exp(-0.5 * (_dist(img[sky_region], W.BODIES[spec.body]) / COLOUR_SIGMA) ** 2))
    )
  else:
    kind, position, compact, solid = 0.0, 0.0, 0.0, 0.0
  checks = {
    'sky': colour_sim(sky_measured, sky),
    'ground': colour_sim(ground_measured, ground),
    'body': present * kind * compact,
    'body_solid': solid,
    'body_count': count,
    'horizon': _gauss(horizon - W.HORIZONS[spec.horizon], HORIZON_SIGMA, HORIZON_DEAD_ZONE),
    'body_position': present * position,
  }
  out = {
    'elements': count * np.mean([checks['sky'], checks['ground'], checks['body']]),
    'layout': np.mean([checks['horizon'], checks['body_position']]),
  }
  return ({k: float(v) for k, v in out.items()}, {k: float(v) for k, v in checks.items()})


def score_landscape(image, spec: W.LandscapeScene) -> dict:
  return _landscape(as_float_image(image), spec)[0]


# ---------------------------------------------------------------------------------------------
# Public scoring API.
# ---------------------------------------------------------------------------------------------

ALIGNMENT_DIMS = {
  'general': ('presence', 'count', 'attributes', 'position', 'relation'),
  'typography': ('glyphs', 'count', 'order', 'colour'),
  'portrait': ('well_formed', 'attributes', 'identity'),
  'landscape': ('elements', 'layout'),
}
# The paper's alignment rubric (presence and count, then attributes, then spatial relations,
# then pose) mapped onto each category's dimensions, highest priority first.
RUBRIC_TIERS = {
  'general': (('presence', 'count'), ('attributes',), ('position', 'relation')),
  'typography': (('glyphs', 'count'), ('colour',), ('order',)),
  'portrait': (('well_formed',), ('attributes', 'identity')),
  'landscape': (('elements',), ('layout',)),
  # Edits (the paper's edit rubric): the core requirement, then the rest of the target scene;
  # instruction following, then preserving what the instruction did not touch.
  'edit': (('core',), ('target',)),
  'edit_overall': (('instruction_following',), ('preservation', 'identity')),
}
# A tier whose worst dimension reaches TIER_PASS does not cap the tiers below it; under it, the
# later tiers are scaled by (score / TIER_PASS)^TIER_GATE_POWER, so a failed tier caps the score
# low (a count of 0.5, one extra object, leaves the later tiers 15%).
TIER_PASS, TIER_GATE_POWER = 0.8, 4
# Strict (GenEval-like) success: every item-level check of the category (each requested shape's
# presence, colour, kind, size and position; each glyph slot; each face attribute, structure
# part and the identity; each landscape element) must reach STRICT_THRESHOLD, the count checks
# (no missing, extra or confetti objects; one extra object scores 0.5) STRICT_COUNT_THRESHOLD.
STRICT_THRESHOLD = 0.5
STRICT_COUNT_THRESHOLD = 0.7
_SCORERS = {
  'general': _general,
  'typography': _typography,
  'portrait': _portrait,
  'landscape': _landscape,
}


def capped_alignment(scores: dict, category: str) -> float:
  """Rubric-capped alignment: mean over tiers of tier score x the gates of the tiers above.

  A tier's score is its worst dimension (all of its items must hold); dimensions that do not
  apply to a scene (a single shape's relation) are skipped.
  """
  if category not in RUBRIC_TIERS:
    raise ValueError(f'no rubric for {category!r}; known: {tuple(RUBRIC_TIERS)}')
  total, gate, tiers = 0.0, 1.0, 0
  for tier in RUBRIC_TIERS[category]:
    values = [scores[d] for d in tier if d in scores]
    if not values:
      continue
    tier_score = min(values)
    total += gate * tier_score
    gate *= min(1.0, tier_score / TIER_PASS) ** TIER_GATE_POWER
    tiers += 1
  return float(total / max(tiers, 1))


def strict_pass(checks: dict) -> bool:
  """Every item-level check reaches its threshold (count checks their own)."""
  return all(
    v >= (STRICT_COUNT_THRESHOLD if k.endswith('count') else STRICT_THRESHOLD)
    for k, v in checks.items()
  )


def check_kind(name: str) -> str:
  """A check's kind, its item index dropped ('shape1/colour' -> 'shape/colour')."""
  return re.sub(r'\d+', '', name)


def failed_check_kinds(checks: dict) -> tuple[str, ...]:
  """Sorted kinds of the checks that miss their strict threshold (empty: strict passes)."""
  return tuple(sorted({check_kind(k) for k, v in checks.items() if not strict_pass({k: v})}))


def t2i_checks(image, spec) -> dict:
  """The item-level checks behind `score_t2i`'s `strict` (name -> score in [0, 1])."""
  return _SCORERS[W.check_category(getattr(spec, 'category', None))](as_float_image(image), spec)[1]


def score_and_check_t2i(image, spec) -> tuple[dict, dict]:
  """(`score_t2i`, `t2i_checks`) of one image, from one pass of the category's scorer."""
  category = W.check_category(getattr(spec, 'category', None))
  img = as_float_image(image)
  scores, checks = _SCORERS[category](img, spec)
  scores = dict(scores)
  mean = float(np.mean(list(scores.values())))
  scores['overall'] = capped_alignment(scores, category)
  scores['overall_mean'] = mean
  scores['strict'] = float(strict_pass(checks))
  scores['quality'] = image_quality(img)['quality']
  return scores, checks


def score_t2i(image, spec) -> dict:
  """Alignment dimensions of `spec`'s category, their rubric-capped `overall`, the plain mean
  `overall_mean` (the scorer before capping), `strict` (1.0 when every check passes) and
  `quality`."""
  return score_and_check_t2i(image, spec)[0]


EDIT_MARGIN = 0.03


def changed_boxes(source, target) -> list[tuple[float, float, float, float]]:
  """Boxes (x0, y0, x1, y1) that may differ between renders of `source` and `target`."""
  everything = [(0.0, 0.0, 1.0, 1.0)]
  if source.category != target.category:
    return everything
  boxes = []
  if source.category == 'general':
    for shape in set(source.shapes) ^ set(target.shapes):
      x, y = W.cell_center(shape.row, shape.col)
      hw, hh = W.shape_extent(shape.kind, shape.size)
      boxes.append((x - hw, y - hh, x + hw, y + hh))
  elif source.category == 'typography':
    if source != target:
      boxes += W.glyph_boxes(len(source.text)) + W.glyph_boxes(len(target.text))
  elif source.category == 'portrait':
    if source.identity != target.identity:
      return everything
    cx, cy = W.FACE_CENTER
    if source.expression != target.expression:
      hw, depth = W.MOUTH_HALF_WIDTH, W.MOUTH_DEPTH + W.MOUTH_THICKNESS
      boxes.append((cx - hw, cy + W.MOUTH_Y - depth, cx + hw, cy + W.MOUTH_Y + depth))
    if source.glasses != target.glasses:
      r, ey = W.GLASSES_RADII[1], cy + W.EYE_DY
      boxes.append((cx - W.EYE_DX - r, ey - r, cx + W.EYE_DX + r, ey + r))
  else:
    if source.sky != target.sky or source.horizon != target.horizon:
      return everything
    if source.ground != target.ground:
      boxes.append((0.0, W.HORIZONS[source.horizon], 1.0, 1.0))
    if (source.body, source.body_pos) != (target.body, target.body_pos):
      for spec in (source, target):
        bx, by = W.body_center(spec.body_pos, spec.horizon)
        r = W.BODY_RADIUS
        boxes.append((bx - r, by - r, bx + r, by + r))
  return [_expand(b, EDIT_MARGIN) for b in boxes]


def changed_region(source, target, size: int) -> np.ndarray:
  """(size, size) bool mask of pixels an edit from `source` to `target` may change."""
  mask = np.zeros((size, size), bool)
  for box in changed_boxes(source, target):
    mask |= _box_mask(size, *box)
  return mask


def preservation(source_image, output_image, source, target) -> float:
  """Mean per-pixel agreement (tolerant to small differences) outside the changed region."""
  src, out = as_float_image(source_image), as_float_image(output_image)
  if src.shape != out.shape:
    raise ValueError(f'source {src.shape} and output {out.shape} images differ in shape')
  keep = ~changed_region(source, target, src.shape[0])
  if not keep.any():
    return 1.0
  diff = np.abs(out - src).max(-1)[keep] / 255.0
  return float(np.clip(1 - (diff - 0.06) / 0.25, 0, 1).mean())


PRESERVATION_STRICT = 0.9  # strict edit success keeps 90% of the untouched pixels


def core_checks(output_image, source, target, checks=None) -> dict:
  """The instruction's core requirement: the target's checks on what the edit changes.

  Derived from the spec difference, so it holds for any edit: new or changed shapes must be
  there with every attribute and removed ones gone from their place (general); changed glyph
  slots or the new colour (typography); the new expression or glasses (portrait); the new sky,
  ground or body position (landscape). An output that ignores the instruction fails it.
  `checks` may pass `t2i_checks(output_image, target)` when the caller already has them.
  """
  img = as_float_image(output_image)
  checks = t2i_checks(img, target) if checks is None else checks
  core = {}
  if target.category == 'general':
    for i, shape in enumerate(target.shapes):
      if shape not in source.shapes:
        core.update({k: v for k, v in checks.items() if k.startswith(f'shape{i}/')})
    for j, shape in enumerate(set(source.shapes) - set(target.shapes)):
      if (shape.row, shape.col) not in {(t.row, t.col) for t in target.shapes}:
        core[f'absent{j}'] = shape_absence(img, shape)
  elif target.category == 'typography':
    same_length = len(source.text) == len(target.text)
    for k, char in enumerate(target.text):
      if not same_length or source.text[k] != char:
        core[f'glyph{k}'] = checks[f'glyph{k}']
    if source.colour != target.colour:
      core['colour'] = checks['colour']
  elif target.category == 'portrait':
    for field in ('expression', 'glasses'):
      if getattr(source, field) != getattr(target, field):
        core[field] = checks[f'attributes/{field}']
  else:
    fields = {
      'sky': ('sky',),
      'ground': ('ground',),
      'body': ('body', 'body_position'),
      'body_pos': ('body_position',),
    }
    for field, names in fields.items():
      if getattr(source, field) != getattr(target, field):
        core.update({n: checks[n] for n in names})
  return core


def score_edit(source_image, output_image, edit) -> dict:
  """Edit scores: `core` (the instruction's core requirement, the worst of `core_checks`),
  `instruction_following` (rubric-capped: core, then the output's capped alignment to the
  target spec), preservation, identity (portraits), `overall` (capped: instruction following,
  then preservation and identity), `strict` (core, target and identity checks pass and
  preservation >= PRESERVATION_STRICT), quality, `target/*`, and the uncapped means
  `instruction_following_mean` and `overall_mean` (the scorer before capping)."""
  output_image = as_float_image(output_image)
  target_scores, target_checks = score_and_check_t2i(output_image, edit.target)
  core = core_checks(output_image, edit.source, edit.target, target_checks)
  core_score = min(core.values()) if core else 1.0
  out = {
    'core': core_score,
    'instruction_following': capped_alignment(
      {'core': core_score, 'target': target_scores['overall']}, 'edit'
    ),
    'preservation': preservation(source_image, output_image, edit.source, edit.target),
  }
  checks = {**target_checks, **{f'core/{k}': v for k, v in core.items()}}
  if edit.target.category == 'portrait':
    out['identity'] = identity_similarity(source_image, output_image)
    checks['source_identity'] = out['identity']
  keep = {k: out[k] for k in ('preservation', 'identity') if k in out}
  out['overall'] = capped_alignment(
    {'instruction_following': out['instruction_following'], **keep}, 'edit_overall'
  )
  out['overall_mean'] = float(np.mean([target_scores['overall_mean'], *keep.values()]))
  out['instruction_following_mean'] = target_scores['overall_mean']
  out['strict'] = float(strict_pass(checks) and out['preservation'] >= PRESERVATION_STRICT)
  out['quality'] = target_scores['quality']
  out.update({f'target/{k}': v for k, v in target_scores.items()})
  return out


def score_t2i_batch(images, specs) -> list[dict]:
  return score_and_check_t2i_batch(images, specs)[0]


def score_and_check_t2i_batch(images, specs) -> tuple[list[dict], list[dict]]:
  """`score_t2i` of each image and its item-level checks (`t2i_checks`), from one pass."""
  if len(images) != len(specs):
    raise ValueError(f'{len(images)} images but {len(specs)} specs')
  pairs = [score_and_check_t2i(im, s) for im, s in zip(images, specs)]
  return [p[0] for p in pairs], [p[1] for p in pairs]


def score_edit_batch(source_images, output_images, edits) -> list[dict]:
  if not len(source_images) == len(output_images) == len(edits):
    raise ValueError(
      f'{len(source_images)} sources, {len(output_images)} outputs, {len(edits)} edits'
    )
  return [score_edit(s, o, e) for s, o, e in zip(source_images, output_images, edits)]


def mean_scores(score_dicts) -> dict:
  """Per-key mean over the dicts that have the key (dimensions that apply to a sample only)."""
  keys = {}
  for d in score_dicts:
    for k, v in d.items():
      keys.setdefault(k, []).append(v)
  return {k: float(np.mean(v)) for k, v in keys.items()}
