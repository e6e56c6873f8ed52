"""The tiny world: scene specs, their geometry, and deterministic sampling.

Four categories mirror the paper's prompt categories (general objects, typography, portraits,
landscapes). A scene is a small frozen dataclass; everything that the renderer draws and the
oracle measures derives from the spec plus the world constants below (palette, layout). The
oracle reads the same constants (the "world definition") but never calls the renderer.

All coordinates are fractions of the image side, x to the right and y downwards, so one spec
renders at any resolution.
"""

import dataclasses
import hashlib
import json
from typing import ClassVar

import numpy as np

CATEGORIES = ('general', 'typography', 'portrait', 'landscape')
SPLITS = ('train', 'val', 'test')

# ---------------------------------------------------------------------------------------------
# World constants.
# ---------------------------------------------------------------------------------------------

# Shape colours: pairwise RGB distance >= 113, each >= 106 from the background.
SHAPE_COLOURS = {
  'red': (220, 40, 40),
  'yellow': (245, 235, 60),
  'green': (40, 170, 60),
  'cyan': (60, 220, 230),
  'blue': (40, 70, 220),
  'purple': (150, 50, 200),
  'white': (245, 245, 245),
}
GENERAL_BACKGROUND = (70, 70, 80)
SHAPE_KINDS = ('circle', 'square', 'triangle')
SHAPE_SIZES = ('small', 'large')
# Equal area for every kind of one size: radius of the circle with that area.
SIZE_RADIUS = {'small': 0.07, 'large': 0.115}  # large triangles stay 0.02 apart
GRID = 3  # Shapes sit at the centres of a GRID x GRID grid of cells.
ROW_NAMES = ('top', 'middle', 'bottom')
COL_NAMES = ('left', 'center', 'right')
RELATIONS = ('left of', 'right of', 'above', 'below')

TEXT_COLOURS = {
  'red': (210, 30, 30),
  'green': (30, 140, 50),
  'blue': (30, 60, 210),
  'purple': (130, 40, 170),
  'orange': (240, 130, 20),
  'black': (20, 20, 20),
}
TEXT_BACKGROUND = (240, 235, 225)
GLYPHS = '0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ'
MAX_GLYPHS = 3
GLYPH_HEIGHT = 0.33  # Glyph box height; the 5x7 bitmap makes the width 5/7 of it.
GLYPH_GAP = 0.05

PORTRAIT_BACKGROUND = (120, 185, 175)
FACE_SHAPES = {  # half-width a, half-height b, superellipse exponent n
  'round': (0.25, 0.25, 2.0),
  'oval': (0.21, 0.31, 2.0),
  'square': (0.24, 0.27, 4.0),
}
SKIN_TONES = {
  'pale': (245, 215, 195),
  'tan': (210, 160, 115),
  'brown': (150, 100, 65),
  'dark': (85, 55, 40),
}
EYE_COLOURS = {
  'blue': (50, 100, 230),
  'green': (40, 160, 60),
  'brown': (115, 65, 25),
  'gray': (150, 150, 160),
}
HAIR_COLOURS = {
  'black': (25, 25, 30),
  'blonde': (235, 205, 100),
  'red': (200, 70, 30),
  'white': (240, 240, 240),
}
EXPRESSIONS = ('smiling', 'neutral', 'frowning')
FACE_CENTER = (0.5, 0.55)
HAIR_MARGIN = 0.035  # back hair extends this far beyond the face outline
HAIR_BACK_BOTTOM = 0.35  # back hair shows down to cy - 0.35 b
FRINGE_BOTTOM = 0.6  # fringe covers the face down to cy - 0.6 b
EYE_DX, EYE_DY = 0.09, -0.03  # eye centres at (cx +- EYE_DX, cy + EYE_DY)
SCLERA_RADII = (0.07, 0.045)
SCLERA_COLOUR = (250, 250, 250)
IRIS_RADIUS = 0.038
GLASSES_RADII = (0.074, 0.096)  # inner / outer radius of each lens ring
GLASSES_COLOUR = (20, 20, 20)
MOUTH_Y = 0.14  # mouth line at cy + MOUTH_Y
MOUTH_HALF_WIDTH = 0.08
MOUTH_DEPTH = 0.04  # how far the mouth centre dips (smile) or rises (frown)
MOUTH_THICKNESS = 0.03
MOUTH_COLOUR = (200, 20, 100)  # >= 100 from every skin tone

SKY_COLOURS = {
  'blue': (110, 170, 235),
  'orange': (240, 140, 90),
  'dark': (20, 30, 70),
  'gray': (160, 165, 175),
}
GROUND_COLOURS = {
  'grass': (60, 150, 50),
  'sand': (220, 195, 130),
  'snow': (245, 245, 250),
  'water': (30, 90, 150),
}
BODIES = {'sun': (255, 215, 50), 'moon': (235, 235, 215)}
BODY_POSITIONS = {'left': 0.2, 'center': 0.5, 'right': 0.8}
BODY_RADIUS = 0.08
MOON_BITE = (0.045, -0.025)  # offset of the sky-coloured disc that carves the crescent
HORIZONS = {'high': 0.4, 'middle': 0.55, 'low': 0.7}


def body_center(body_pos: str, horizon: str) -> tuple[float, float]:
  return BODY_POSITIONS[body_pos], 0.45 * HORIZONS[horizon]


def cell_center(row: int, col: int) -> tuple[float, float]:
  """(x, y) centre of a grid cell."""
  return (col + 0.5) / GRID, (row + 0.5) / GRID


def position_name(row: int, col: int) -> str:
  """'top left', 'top', 'center', 'bottom right' ..."""
  if row == 1 and col == 1:
    return 'center'
  if row == 1:
    return COL_NAMES[col]
  if col == 1:
    return ROW_NAMES[row]
  return f'{ROW_NAMES[row]} {COL_NAMES[col]}'


def glyph_boxes(n: int) -> list[tuple[float, float, float, float]]:
  """(x0, y0, x1, y1) of each of n glyph slots: one centred row of fixed-size glyphs."""
  height = GLYPH_HEIGHT
  width = height * 5 / 7
  total = n * width + (n - 1) * GLYPH_GAP
  x0, y0 = 0.5 - total / 2, 0.5 - height / 2
  return [
    (x0 + i * (width + GLYPH_GAP), y0, x0 + i * (width + GLYPH_GAP) + width, y0 + height)
    for i in range(n)
  ]


# ---------------------------------------------------------------------------------------------
# Specs.
# ---------------------------------------------------------------------------------------------


def _check(field: str, value, allowed):
  if value not in allowed:
    raise ValueError(f'{field}={value!r} is not one of {tuple(allowed)}')


@dataclasses.dataclass(frozen=True)
class Shape:
  kind: str
  colour: str
  size: str
  row: int
  col: int

  def __post_init__(self):
    _check('Shape.kind', self.kind, SHAPE_KINDS)
    _check('Shape.colour', self.colour, SHAPE_COLOURS)
    _check('Shape.size', self.size, SHAPE_SIZES)
    _check('Shape.row', self.row, range(GRID))
    _check('Shape.col', self.col, range(GRID))

  @property
  def name(self) -> str:
    """How captions refer to it: colours are unique within a scene."""
    return f'{self.colour} {self.kind}'


def relation_holds(relation: str, a: Shape, b: Shape) -> bool:
  return {
    'left of': a.col < b.col,
    'right of': a.col > b.col,
    'above': a.row < b.row,
    'below': a.row > b.row,
  }[relation]


@dataclasses.dataclass(frozen=True)
class GeneralScene:
  """1-3 shapes in distinct cells with distinct colours; `relation` links shapes[0], shapes[1]."""

  shapes: tuple[Shape, ...]
  relation: str | None = None
  category: ClassVar[str] = 'general'

  def __post_init__(self):
    if not 1 <= len(self.shapes) <= GRID * GRID:
      raise ValueError(f'GeneralScene.shapes needs 1..{GRID * GRID} shapes, got {len(self.shapes)}')
    if len({(s.row, s.col) for s in self.shapes}) != len(self.shapes):
      raise ValueError('GeneralScene.shapes must occupy distinct cells')
    if len({s.colour for s in self.shapes}) != len(self.shapes):
      raise ValueError('GeneralScene.shapes must have distinct colours')
    if len(self.shapes) >= 2:
      _check('GeneralScene.relation', self.relation, RELATIONS)
      if not relation_holds(self.relation, self.shapes[0], self.shapes[1]):
        raise ValueError(
          f'GeneralScene.relation {self.relation!r} does not hold for the cells of '
          f'shapes[0] and shapes[1]'
        )
    elif self.relation is not None:
      raise ValueError('GeneralScene.relation must be None with a single shape')


@dataclasses.dataclass(frozen=True)
class TypographyScene:
  text: str
  colour: str
  category: ClassVar[str] = 'typography'

  def __post_init__(self):
    if not 1 <= len(self.text) <= MAX_GLYPHS or any(c not in GLYPHS for c in self.text):
      raise ValueError(f'TypographyScene.text={self.text!r}: 1..{MAX_GLYPHS} of {GLYPHS}')
    _check('TypographyScene.colour', self.colour, TEXT_COLOURS)


@dataclasses.dataclass(frozen=True)
class PortraitScene:
  """Identity: face_shape, skin, eyes, hair. State: expression, glasses."""

  face_shape: str
  skin: str
  eyes: str
  hair: str
  expression: str
  glasses: bool
  category: ClassVar[str] = 'portrait'

  def __post_init__(self):
    _check('PortraitScene.face_shape', self.face_shape, FACE_SHAPES)
    _check('PortraitScene.skin', self.skin, SKIN_TONES)
    _check('PortraitScene.eyes', self.eyes, EYE_COLOURS)
    _check('PortraitScene.hair', self.hair, HAIR_COLOURS)
    _check('PortraitScene.expression', self.expression, EXPRESSIONS)
    _check('PortraitScene.glasses', self.glasses, (True, False))

  @property
  def identity(self) -> tuple[str, str, str, str]:
    return self.face_shape, self.skin, self.eyes, self.hair


IDENTITY_FIELDS = ('face_shape', 'skin', 'eyes', 'hair')


@dataclasses.dataclass(frozen=True)
class LandscapeScene:
  sky: str
  body: str
  body_pos: str
  ground: str
  horizon: str
  category: ClassVar[str] = 'landscape'

  def __post_init__(self):
    _check('LandscapeScene.sky', self.sky, SKY_COLOURS)
    _check('LandscapeScene.body', self.body, BODIES)
    _check('LandscapeScene.body_pos', self.body_pos, BODY_POSITIONS)
    _check('LandscapeScene.ground', self.ground, GROUND_COLOURS)
    _check('LandscapeScene.horizon', self.horizon, HORIZONS)


Scene = GeneralScene | TypographyScene | PortraitScene | LandscapeScene
SCENE_TYPES = {
  t.category: t for t in (GeneralScene, TypographyScene, PortraitScene, LandscapeScene)
}


def check_category(category: str) -> str:
  if category not in CATEGORIES:
    raise ValueError(f'unknown category {category!r}; known categories: {CATEGORIES}')
  return category


# ---------------------------------------------------------------------------------------------
# Sampling.
# ---------------------------------------------------------------------------------------------


def _choice(rng: np.random.Generator, options):
  options = list(options)
  return options[int(rng.integers(len(options)))]


def pick_relation(a: Shape, b: Shape, rng: np.random.Generator | None = None) -> str:
  """A relation that holds between a and b (random among them, or the first)."""
  holding = [r for r in RELATIONS if relation_holds(r, a, b)]
  return _choice(rng, holding) if rng is not None else holding[0]


def sample_shape(rng: np.random.Generator, row: int, col: int, colour: str) -> Shape:
  return Shape(
    kind=_choice(rng, SHAPE_KINDS), colour=colour, size=_choice(rng, SHAPE_SIZES), row=row, col=col
  )


def _sample_general(rng: np.random.Generator) -> GeneralScene:
  n = int(rng.integers(1, 4))
  colours = rng.choice(len(SHAPE_COLOURS), size=n, replace=False)
  cells = rng.choice(GRID * GRID, size=n, replace=False)
  if n >= 2:
    # Sample the relation first (left of / above, as in most prompts), then order the first
    # two shapes so it holds; resample if their cells are in the same column/row.
    relation = _choice(rng, ('left of', 'above'))
    while True:
      (r0, c0), (r1, c1) = divmod(int(cells[0]), GRID), divmod(int(cells[1]), GRID)
      key0, key1 = (c0, c1) if relation == 'left of' else (r0, r1)
      if key0 != key1:
        break
      cells = rng.choice(GRID * GRID, size=n, replace=False)
    if key0 > key1:
      cells[[0, 1]] = cells[[1, 0]]
  else:
    relation = None
  names = list(SHAPE_COLOURS)
  shapes = tuple(
    sample_shape(rng, *divmod(int(cell), GRID), names[int(c)]) for cell, c in zip(cells, colours)
  )
  return GeneralScene(shapes=shapes, relation=relation)


def _sample_typography(rng: np.random.Generator) -> TypographyScene:
  n = int(rng.integers(1, MAX_GLYPHS + 1))
  text = ''.join(GLYPHS[int(i)] for i in rng.integers(len(GLYPHS), size=n))
  return TypographyScene(text=text, colour=_choice(rng, TEXT_COLOURS))


def _sample_portrait(rng: np.random.Generator) -> PortraitScene:
  return PortraitScene(
    face_shape=_choice(rng, FACE_SHAPES),
    skin=_choice(rng, SKIN_TONES),
    eyes=_choice(rng, EYE_COLOURS),
    hair=_choice(rng, HAIR_COLOURS),
    expression=_choice(rng, EXPRESSIONS),
    glasses=bool(rng.integers(2)),
  )


def _sample_landscape(rng: np.random.Generator) -> LandscapeScene:
  return LandscapeScene(
    sky=_choice(rng, SKY_COLOURS),
    body=_choice(rng, BODIES),
    body_pos=_choice(rng, BODY_POSITIONS),
    ground=_choice(rng, GROUND_COLOURS),
    horizon=_choice(rng, HORIZONS),
  )


_SAMPLERS = {
  'general': _sample_general,
  'typography': _sample_typography,
  'portrait': _sample_portrait,
  'landscape': _sample_landscape,
}


def sample_scene(rng: np.random.Generator, category: str, split: str | None = None) -> Scene:
  """A random scene of `category`; with `split`, rejection-sample until split_of(scene) == split."""
  sampler = _SAMPLERS[check_category(category)]
  if split is None:
    return sampler(rng)
  _check('split', split, SPLITS)
  while True:
    scene = sampler(rng)
    if split_of(scene) == split:
      return scene


def sample_scenes(seed: int, n: int, categories=CATEGORIES, split: str | None = None) -> list:
  """n scenes cycling through `categories`, all drawn from one Generator seeded with `seed`."""
  rng = np.random.default_rng(seed)
  return [sample_scene(rng, categories[i % len(categories)], split) for i in range(n)]


# ---------------------------------------------------------------------------------------------
# Canonical form and splits.
# ---------------------------------------------------------------------------------------------


def to_dict(spec) -> dict:
  return {'category': spec.category, **dataclasses.asdict(spec)}


def from_dict(d: dict) -> Scene:
  d = dict(d)
  cls = SCENE_TYPES[check_category(d.pop('category'))]
  if cls is GeneralScene:
    d['shapes'] = tuple(Shape(**s) for s in d['shapes'])
  return cls(**d)


def spec_key(spec) -> str:
  """Canonical JSON text of a spec: equal specs give equal keys."""
  return json.dumps(to_dict(spec), sort_keys=True, separators=(',', ':'))


SPLIT_FRACTIONS = {'train': 0.8, 'val': 0.1, 'test': 0.1}


def split_of(spec) -> str:
  """'train' / 'val' / 'test' from a stable hash of the canonical spec (80/10/10)."""
  digest = hashlib.sha256(spec_key(spec).encode()).digest()
  u = int.from_bytes(digest[:8], 'big') / 2.0**64
  if u < SPLIT_FRACTIONS['train']:
    return 'train'
  if u < SPLIT_FRACTIONS['train'] + SPLIT_FRACTIONS['val']:
    return 'val'
  return 'test'


# ---------------------------------------------------------------------------------------------
# Shape geometry shared by the renderer and the oracle.
# ---------------------------------------------------------------------------------------------

SQUARE_HALF = np.sqrt(np.pi) / 2  # x radius: a square of equal area
TRIANGLE_SIDE = np.sqrt(4 * np.pi / np.sqrt(3))  # x radius: an equilateral triangle of equal area


def shape_extent(kind: str, size: str) -> tuple[float, float]:
  """(half-width, half-height) of a shape's bounding box; the box is centred on its cell."""
  r = SIZE_RADIUS[size]
  if kind == 'circle':
    return r, r
  if kind == 'square':
    return SQUARE_HALF * r, SQUARE_HALF * r
  side = TRIANGLE_SIDE * r
  return side / 2, side * np.sqrt(3) / 4


def shape_centroid(shape: Shape) -> tuple[float, float]:
  """Area centroid (x, y); a triangle (apex up) has it height / 6 below its box centre."""
  x, y = cell_center(shape.row, shape.col)
  if shape.kind == 'triangle':
    y += 2 * shape_extent(shape.kind, shape.size)[1] / 6
  return x, y


def shape_area(size: str) -> float:
  return np.pi * SIZE_RADIUS[size] ** 2


def body_centroid(body: str, body_pos: str, horizon: str) -> tuple[float, float]:
  """Area centroid of the sun (a disc) or the moon (a disc minus an equal, offset disc)."""
  x, y = body_center(body_pos, horizon)
  if body == 'sun':
    return x, y
  r, (dx, dy) = BODY_RADIUS, MOON_BITE
  d = np.hypot(dx, dy)
  lens = 2 * r * r * np.arccos(d / (2 * r)) - d / 2 * np.sqrt(4 * r * r - d * d)
  disc = np.pi * r * r
  # The removed lens is symmetric about the midpoint of the two centres.
  w = lens / (disc - lens)
  return x - w * dx / 2, y - w * dy / 2
