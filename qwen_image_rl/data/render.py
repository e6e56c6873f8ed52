"""Renders tiny-world specs to uint8 RGB images.

Painter's algorithm on a supersampled canvas, then a box filter down to the output size: cheap
anti-aliasing that keeps flat colours exact away from edges. Deterministic (no randomness).
"""

import functools

import numpy as np

from qwen_image_rl.data import font
from qwen_image_rl.data import world as W


def _supersampling(size: int) -> int:
  return 4 if size <= 32 else 2


@functools.lru_cache(maxsize=8)
def _grid(n: int) -> tuple[np.ndarray, np.ndarray]:
  """Pixel-centre coordinates (ys, xs) in [0, 1) of an n x n canvas."""
  c = (np.arange(n, dtype=np.float32) + 0.5) / n
  ys, xs = np.meshgrid(c, c, indexing='ij')
  ys.setflags(write=False)
  xs.setflags(write=False)
  return ys, xs


class _Canvas:
  """A supersampled float canvas with primitive fills in normalised coordinates."""

  def __init__(self, size: int, background):
    self.size = size
    self.ss = _supersampling(size)
    n = size * self.ss
    self.ys, self.xs = _grid(n)
    self.rgb = np.empty((n, n, 3), np.float32)
    self.rgb[:] = background

  def fill(self, mask: np.ndarray, colour):
    self.rgb[mask] = colour

  def image(self) -> np.ndarray:
    n, ss = self.size, self.ss
    pooled = self.rgb.reshape(n, ss, n, ss, 3).mean(axis=(1, 3))
    return np.clip(np.rint(pooled), 0, 255).astype(np.uint8)

  # Primitives: each returns a boolean mask over the supersampled grid.
  def superellipse(self, cx, cy, a, b, n=2.0):
    return np.abs((self.xs - cx) / a) ** n + np.abs((self.ys - cy) / b) ** n <= 1.0

  def disc(self, cx, cy, r):
    return (self.xs - cx) ** 2 + (self.ys - cy) ** 2 <= r * r

  def rect(self, x0, y0, x1, y1):
    return (self.xs >= x0) & (self.xs < x1) & (self.ys >= y0) & (self.ys < y1)

  def triangle_up(self, cx, cy, half_width, half_height):
    t = (self.ys - (cy - half_height)) / (2 * half_height)  # 0 at the apex, 1 at the base
    return (t >= 0) & (t <= 1) & (np.abs(self.xs - cx) <= t * half_width)

  def curve(self, cx, cy, half_width, depth, thickness):
    """A parabolic stroke whose centre sits `depth` below its ends."""
    u = (self.xs - cx) / half_width
    y = cy + depth * (1 - u * u)
    return (np.abs(u) <= 1) & (np.abs(self.ys - y) <= thickness / 2)


def _render_general(spec: W.GeneralScene, c: _Canvas):
  for shape in spec.shapes:
    x, y = W.cell_center(shape.row, shape.col)
    hw, hh = W.shape_extent(shape.kind, shape.size)
    if shape.kind == 'circle':
      mask = c.disc(x, y, hw)
    elif shape.kind == 'square':
      mask = c.rect(x - hw, y - hh, x + hw, y + hh)
    else:
      mask = c.triangle_up(x, y, hw, hh)
    c.fill(mask, W.SHAPE_COLOURS[shape.colour])


def _render_typography(spec: W.TypographyScene, c: _Canvas):
  colour = W.TEXT_COLOURS[spec.colour]
  for char, box in zip(spec.text, W.glyph_boxes(len(spec.text))):
    c.fill(font.glyph_mask(char, box, c.xs, c.ys), colour)


def _render_portrait(spec: W.PortraitScene, c: _Canvas):
  cx, cy = W.FACE_CENTER
  a, b, n = W.FACE_SHAPES[spec.face_shape]
  hair, skin = W.HAIR_COLOURS[spec.hair], W.SKIN_TONES[spec.skin]
  m = W.HAIR_MARGIN
  c.fill(c.superellipse(cx, cy, a + m, b + m, n) & (c.ys < cy - W.HAIR_BACK_BOTTOM * b), hair)
  face = c.superellipse(cx, cy, a, b, n)
  c.fill(face, skin)
  c.fill(face & (c.ys < cy - W.FRINGE_BOTTOM * b), hair)
  ey = cy + W.EYE_DY
  for ex in (cx - W.EYE_DX, cx + W.EYE_DX):
    c.fill(c.superellipse(ex, ey, *W.SCLERA_RADII), W.SCLERA_COLOUR)
    c.fill(c.disc(ex, ey, W.IRIS_RADIUS), W.EYE_COLOURS[spec.eyes])
  if spec.glasses:
    r_in, r_out = W.GLASSES_RADII
    for ex in (cx - W.EYE_DX, cx + W.EYE_DX):
      c.fill(c.disc(ex, ey, r_out) & ~c.disc(ex, ey, r_in), W.GLASSES_COLOUR)
    half_thick = (r_out - r_in) / 2
    c.fill(
      c.rect(cx - W.EYE_DX + r_in, ey - half_thick, cx + W.EYE_DX - r_in, ey + half_thick),
      W.GLASSES_COLOUR,
    )
  sign = {'smiling': 1.0, 'neutral': 0.0, 'frowning': -1.0}[spec.expression]
  c.fill(
    c.curve(cx, cy + W.MOUTH_Y, W.MOUTH_HALF_WIDTH, sign * W.MOUTH_DEPTH, W.MOUTH_THICKNESS),
    W.MOUTH_COLOUR,
  )


def _render_landscape(spec: W.LandscapeScene, c: _Canvas):
  sky = W.SKY_COLOURS[spec.sky]
  c.fill(c.ys >= W.HORIZONS[spec.horizon], W.GROUND_COLOURS[spec.ground])
  bx, by = W.body_center(spec.body_pos, spec.horizon)
  body = c.disc(bx, by, W.BODY_RADIUS)
  c.fill(body, W.BODIES[spec.body])
  if spec.body == 'moon':
    c.fill(body & c.disc(bx + W.MOON_BITE[0], by + W.MOON_BITE[1], W.BODY_RADIUS), sky)


_BACKGROUNDS = {
  'general': lambda spec: W.GENERAL_BACKGROUND,
  'typography': lambda spec: W.TEXT_BACKGROUND,
  'portrait': lambda spec: W.PORTRAIT_BACKGROUND,
  'landscape': lambda spec: W.SKY_COLOURS[spec.sky],
}
_PAINTERS = {
  'general': _render_general,
  'typography': _render_typography,
  'portrait': _render_portrait,
  'landscape': _render_landscape,
}


def render(spec, size: int = 64) -> np.ndarray:
  """(size, size, 3) uint8 RGB image of a scene spec."""
  category = W.check_category(getattr(spec, 'category', None))
  if not isinstance(size, (int, np.integer)) or size < 16:
    raise ValueError(f'size must be an int >= 16, got {size!r}')
  canvas = _Canvas(int(size), _BACKGROUNDS[category](spec))
  _PAINTERS[category](spec, canvas)
  return canvas.image()


def render_batch(specs, size: int = 64) -> np.ndarray:
  """(N, size, size, 3) uint8."""
  return np.stack([render(s, size) for s in specs])
