"""Edit triples (source scene, instruction, target scene), sampled deterministically.

Kinds and the categories they apply to:
  recolour     general (one shape), typography (the text), landscape (the sky)
  move         general (one shape to a free cell), landscape (the sun or moon)
  add          general (a new shape in a free cell; at most 3 shapes)
  remove       general (one of 2-3 shapes)
  change_text  typography
  expression   portrait (identity kept)
  glasses      portrait (toggled; identity kept)
Everything the instruction does not mention is copied from the source to the target.
"""

import dataclasses

import numpy as np

from qwen_image_rl.data import captions
from qwen_image_rl.data import world as W

EDIT_KINDS = ('recolour', 'move', 'add', 'remove', 'change_text', 'expression', 'glasses')
EDIT_CATEGORIES = {
  'recolour': ('general', 'typography', 'landscape'),
  'move': ('general', 'landscape'),
  'add': ('general',),
  'remove': ('general',),
  'change_text': ('typography',),
  'expression': ('portrait',),
  'glasses': ('portrait',),
}
MAX_SHAPES = 3


@dataclasses.dataclass(frozen=True)
class Edit:
  kind: str
  source: W.Scene
  instruction: str
  target: W.Scene

  @property
  def category(self) -> str:
    return self.source.category


def to_dict(edit: Edit) -> dict:
  """JSON-ready: kind, instruction, and the source and target specs (world.to_dict)."""
  return {
    'kind': edit.kind,
    'source': W.to_dict(edit.source),
    'instruction': edit.instruction,
    'target': W.to_dict(edit.target),
  }


def from_dict(d) -> Edit:
  """The inverse of `to_dict`; KeyError / TypeError / ValueError on a malformed dict."""
  if d['kind'] not in EDIT_KINDS:
    raise ValueError(f'unknown edit kind {d["kind"]!r}; known: {", ".join(EDIT_KINDS)}')
  return Edit(
    kind=d['kind'],
    source=W.from_dict(d['source']),
    instruction=d['instruction'],
    target=W.from_dict(d['target']),
  )


def _pick(rng, options):
  options = list(options)
  return options[int(rng.integers(len(options)))]


def _free_cells(shapes) -> list[tuple[int, int]]:
  used = {(s.row, s.col) for s in shapes}
  return [divmod(i, W.GRID) for i in range(W.GRID * W.GRID) if divmod(i, W.GRID) not in used]


def _with_relation(shapes, old: str | None, rng) -> W.GeneralScene:
  """Keeps the old relation of the first two shapes if it still holds, else picks one that does."""
  shapes = tuple(shapes)
  if len(shapes) < 2:
    return W.GeneralScene(shapes=shapes, relation=None)
  if old is not None and W.relation_holds(old, shapes[0], shapes[1]):
    return W.GeneralScene(shapes=shapes, relation=old)
  return W.GeneralScene(shapes=shapes, relation=W.pick_relation(shapes[0], shapes[1], rng))


# Each editor returns (instruction, target) or None when the edit does not apply to `src`.


def _recolour(src, rng):
  if src.category == 'general':
    i = int(rng.integers(len(src.shapes)))
    used = {s.colour for s in src.shapes}
    new = _pick(rng, [c for c in W.SHAPE_COLOURS if c not in used])
    shapes = list(src.shapes)
    shapes[i] = dataclasses.replace(shapes[i], colour=new)
    text = captions.instruction('recolour_shape', rng, name=src.shapes[i].name, new=new)
    return text, W.GeneralScene(shapes=tuple(shapes), relation=src.relation)
  if src.category == 'typography':
    new = _pick(rng, [c for c in W.TEXT_COLOURS if c != src.colour])
    return captions.instruction('recolour_text', rng, new=new), dataclasses.replace(src, colour=new)
  if src.category == 'landscape':
    new = _pick(rng, [c for c in W.SKY_COLOURS if c != src.sky])
    return captions.instruction('recolour_sky', rng, new=new), dataclasses.replace(src, sky=new)
  return None


def _move(src, rng):
  if src.category == 'general':
    i = int(rng.integers(len(src.shapes)))
    row, col = _pick(rng, _free_cells(src.shapes))
    shapes = list(src.shapes)
    shapes[i] = dataclasses.replace(shapes[i], row=row, col=col)
    text = captions.instruction(
      'move_shape', rng, name=src.shapes[i].name, pos=W.position_name(row, col)
    )
    return text, _with_relation(shapes, src.relation, rng)
  if src.category == 'landscape':
    pos = _pick(rng, [p for p in W.BODY_POSITIONS if p != src.body_pos])
    text = captions.instruction('move_body', rng, body=src.body, pos=pos)
    return text, dataclasses.replace(src, body_pos=pos)
  return None


def _add(src, rng):
  if src.category != 'general' or len(src.shapes) >= MAX_SHAPES:
    return None
  used = {s.colour for s in src.shapes}
  row, col = _pick(rng, _free_cells(src.shapes))
  shape = W.sample_shape(rng, row, col, _pick(rng, [c for c in W.SHAPE_COLOURS if c not in used]))
  text = captions.instruction(
    'add', rng, size=shape.size, colour=shape.colour, kind=shape.kind, pos=W.position_name(row, col)
  )
  return text, _with_relation(src.shapes + (shape,), src.relation, rng)


def _remove(src, rng):
  if src.category != 'general' or len(src.shapes) < 2:
    return None
  i = int(rng.integers(len(src.shapes)))
  shapes = src.shapes[:i] + src.shapes[i + 1 :]
  relation = src.relation if i >= 2 else None
  return (
    captions.instruction('remove', rng, name=src.shapes[i].name),
    _with_relation(shapes, relation, rng),
  )


def _change_text(src, rng):
  if src.category != 'typography':
    return None
  while True:
    n = int(rng.integers(1, W.MAX_GLYPHS + 1))
    text = ''.join(W.GLYPHS[int(k)] for k in rng.integers(len(W.GLYPHS), size=n))
    if text != src.text:
      break
  return (
    captions.instruction('change_text', rng, glyphs=captions.glyph_words(text)),
    dataclasses.replace(src, text=text),
  )


def _expression(src, rng):
  if src.category != 'portrait':
    return None
  new = _pick(rng, [e for e in W.EXPRESSIONS if e != src.expression])
  return (
    captions.instruction('expression', rng, expression=new),
    dataclasses.replace(src, expression=new),
  )


def _glasses(src, rng):
  if src.category != 'portrait':
    return None
  return (
    captions.instruction('glasses', rng, glasses=not src.glasses),
    dataclasses.replace(src, glasses=not src.glasses),
  )


_EDITORS = {
  'recolour': _recolour,
  'move': _move,
  'add': _add,
  'remove': _remove,
  'change_text': _change_text,
  'expression': _expression,
  'glasses': _glasses,
}


def make_edit(source, kind: str, rng: np.random.Generator) -> Edit | None:
  """Applies an edit of `kind` to `source`; None when that kind does not apply to it."""
  if kind not in _EDITORS:
    raise ValueError(f'unknown edit kind {kind!r}; known kinds: {EDIT_KINDS}')
  result = _EDITORS[kind](source, rng)
  if result is None:
    return None
  text, target = result
  return Edit(kind=kind, source=source, instruction=text, target=target)


def sample_edit(
  rng: np.random.Generator,
  kind: str | None = None,
  category: str | None = None,
  split: str | None = None,
) -> Edit:
  """A random edit triple; `kind`/`category` default to uniform choices among the valid ones.

  With `split`, the source scene comes from that split (W.split_of(edit.source)).
  """
  if kind is None:
    kinds = [k for k in EDIT_KINDS if category is None or category in EDIT_CATEGORIES[k]]
    if not kinds:
      W.check_category(category)
      raise ValueError(f'no edit kind applies to category {category!r}')
    kind = _pick(rng, kinds)
  if kind not in EDIT_CATEGORIES:
    raise ValueError(f'unknown edit kind {kind!r}; known kinds: {EDIT_KINDS}')
  if category is None:
    category = _pick(rng, EDIT_CATEGORIES[kind])
  elif category not in EDIT_CATEGORIES[kind]:
    W.check_category(category)
    raise ValueError(f'edit kind {kind!r} applies to {EDIT_CATEGORIES[kind]}, not {category!r}')
  while True:
    edit = make_edit(W.sample_scene(rng, category, split), kind, rng)
    if edit is not None:
      return edit


def sample_edits(seed: int, n: int, kinds=EDIT_KINDS, split: str | None = None) -> list[Edit]:
  """n edits cycling through `kinds`, from one Generator seeded with `seed`."""
  rng = np.random.default_rng(seed)
  return [sample_edit(rng, kinds[i % len(kinds)], split=split) for i in range(n)]
