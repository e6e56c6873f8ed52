"""Captions (prompts) and edit instructions from templates with paraphrases.

Every caption states everything the oracle scores for its scene, so a perfect image for the
prompt scores 1. Texts are lower-case words separated by single spaces, except glyphs, which are
spelled one per word in upper case ('the text A 7 B in red'); there is no punctuation, so
`text.split()` is the word tokenisation and `vocabulary()` lists every word any template can
produce (case-sensitive: the article 'a' and the glyph 'A' are different words).
"""

import dataclasses
import string

import numpy as np

from qwen_image_rl.data import world as W

# ---------------------------------------------------------------------------------------------
# Phrase tables (every literal word in here ends up in the vocabulary).
# ---------------------------------------------------------------------------------------------

GENERAL_TEMPLATES = (
  '{objects}',
  'a picture of {objects}',
  'an image showing {objects}',
  '{objects} on a gray background',
  '{count} {objects}',
)
COUNT_WORDS = {1: 'a single shape', 2: 'two shapes', 3: 'three shapes'}
OBJECT_TEMPLATES = (
  'a {size} {colour} {kind} in the {pos}',
  'a {size} {colour} {kind} at the {pos}',
)
RELATION_TEMPLATES = ('with the {a} {rel} the {b}', 'and the {a} is {rel} the {b}')
RELATION_WORDS = {
  'left of': ('left of', 'to the left of'),
  'right of': ('right of', 'to the right of'),
  'above': ('above', 'over'),
  'below': ('below', 'under'),
}

TYPOGRAPHY_TEMPLATES = (
  'the text {glyphs} in {colour}',
  '{colour} letters {glyphs} on a plain background',
  'a sign that says {glyphs} written in {colour}',
  'the characters {glyphs} in {colour} on a light background',
  '{colour} text reading {glyphs}',
)

PORTRAIT_TEMPLATES = (
  'a portrait of a person with a {shape} face {skin} skin {eyes} eyes and {hair} hair {expr} '
  '{glasses}',
  'a {expr_adj} person with {hair} hair {eyes} eyes {skin} skin and a {shape} face {glasses}',
  'a face portrait {skin} skin {shape} face {hair} hair and {eyes} eyes {expr} {glasses}',
)
EXPRESSION_PHRASES = {
  'smiling': ('smiling', 'with a smile'),
  'neutral': ('with a neutral expression', 'with a straight face'),
  'frowning': ('frowning', 'with a frown'),
}
EXPRESSION_ADJECTIVES = {'smiling': 'smiling', 'neutral': 'calm', 'frowning': 'frowning'}
GLASSES_PHRASES = {
  True: ('wearing glasses', 'with glasses'),
  False: ('without glasses', 'with no glasses'),
}

LANDSCAPE_TEMPLATES = (
  'a landscape with {sky} and the {body} {pos} above {ground} with {horizon}',
  '{ground} under {sky} with the {body} {pos} and {horizon}',
  'a scenic view of {ground} and {sky} the {body} {pos} {horizon}',
)
SKY_PHRASES = {
  'blue': ('a blue sky', 'a clear blue sky'),
  'orange': ('an orange sky', 'an orange evening sky'),
  'dark': ('a dark sky', 'a dark night sky'),
  'gray': ('a gray sky', 'a cloudy gray sky'),
}
GROUND_PHRASES = {
  'grass': ('green grass', 'a grassy field'),
  'sand': ('sand', 'a sandy desert'),
  'snow': ('snow', 'a snowy field'),
  'water': ('water', 'the sea'),
}
BODY_POS_PHRASES = {
  'left': ('on the left',),
  'center': ('in the center', 'in the middle'),
  'right': ('on the right',),
}
HORIZON_PHRASES = {
  'high': ('a high horizon',),
  'middle': ('the horizon in the middle',),
  'low': ('a low horizon',),
}

INSTRUCTION_TEMPLATES = {
  'recolour_shape': (
    'make the {name} {new}',
    'change the colour of the {name} to {new}',
    'paint the {name} {new}',
  ),
  'recolour_text': ('make the text {new}', 'change the text colour to {new}'),
  'recolour_sky': ('make the sky {new}', 'change the sky to {new}'),
  'move_shape': ('move the {name} to the {pos}', 'put the {name} in the {pos}'),
  'move_body': ('move the {body} to the {pos}', 'put the {body} at the {pos}'),
  'add': (
    'add a {size} {colour} {kind} in the {pos}',
    'place a {size} {colour} {kind} at the {pos}',
  ),
  'remove': ('remove the {name}', 'delete the {name}', 'take away the {name}'),
  'change_text': (
    'change the text to {glyphs}',
    'replace the text with {glyphs}',
    'make it say {glyphs}',
  ),
  'expression': {
    'smiling': ('make the person smile', 'change the expression to smiling'),
    'neutral': ('give the person a neutral expression', 'change the expression to neutral'),
    'frowning': ('make the person frown', 'change the expression to frowning'),
  },
  'glasses': {
    True: ('add glasses', 'put glasses on the person'),
    False: ('remove the glasses', 'take off the glasses'),
  },
}


@dataclasses.dataclass(frozen=True)
class Prompt:
  text: str
  category: str


def _pick(rng: np.random.Generator, options) -> str:
  return options[int(rng.integers(len(options)))]


def _fill(template: str, **slots) -> str:
  return ' '.join(template.format(**slots).split())


def glyph_words(text: str) -> str:
  return ' '.join(text)


# ---------------------------------------------------------------------------------------------
# Captions.
# ---------------------------------------------------------------------------------------------


def _general(spec: W.GeneralScene, rng) -> str:
  objects = [
    _fill(
      _pick(rng, OBJECT_TEMPLATES),
      size=s.size,
      colour=s.colour,
      kind=s.kind,
      pos=W.position_name(s.row, s.col),
    )
    for s in spec.shapes
  ]
  listed = objects[0] if len(objects) == 1 else ' '.join(objects[:-1]) + ' and ' + objects[-1]
  if spec.relation is not None:
    listed += ' ' + _fill(
      _pick(rng, RELATION_TEMPLATES),
      a=spec.shapes[0].name,
      rel=_pick(rng, RELATION_WORDS[spec.relation]),
      b=spec.shapes[1].name,
    )
  return _fill(_pick(rng, GENERAL_TEMPLATES), objects=listed, count=COUNT_WORDS[len(spec.shapes)])


def _typography(spec: W.TypographyScene, rng) -> str:
  return _fill(_pick(rng, TYPOGRAPHY_TEMPLATES), glyphs=glyph_words(spec.text), colour=spec.colour)


def _portrait(spec: W.PortraitScene, rng) -> str:
  return _fill(
    _pick(rng, PORTRAIT_TEMPLATES),
    shape=spec.face_shape,
    skin=spec.skin,
    eyes=spec.eyes,
    hair=spec.hair,
    expr=_pick(rng, EXPRESSION_PHRASES[spec.expression]),
    expr_adj=EXPRESSION_ADJECTIVES[spec.expression],
    glasses=_pick(rng, GLASSES_PHRASES[spec.glasses]),
  )


def _landscape(spec: W.LandscapeScene, rng) -> str:
  return _fill(
    _pick(rng, LANDSCAPE_TEMPLATES),
    sky=_pick(rng, SKY_PHRASES[spec.sky]),
    body=spec.body,
    pos=_pick(rng, BODY_POS_PHRASES[spec.body_pos]),
    ground=_pick(rng, GROUND_PHRASES[spec.ground]),
    horizon=_pick(rng, HORIZON_PHRASES[spec.horizon]),
  )


_CAPTIONERS = {
  'general': _general,
  'typography': _typography,
  'portrait': _portrait,
  'landscape': _landscape,
}


def caption(spec, rng: np.random.Generator) -> str:
  """A paraphrased prompt that states every scored attribute of `spec`."""
  return _CAPTIONERS[W.check_category(getattr(spec, 'category', None))](spec, rng)


def prompt(spec, rng: np.random.Generator) -> Prompt:
  """The caption tagged with its category."""
  return Prompt(text=caption(spec, rng), category=spec.category)


# ---------------------------------------------------------------------------------------------
# Edit instructions.
# ---------------------------------------------------------------------------------------------


def instruction(which: str, rng: np.random.Generator, **slots) -> str:
  """Text of an edit instruction; `which` is a key of INSTRUCTION_TEMPLATES.

  Slots: recolour_shape(name, new), recolour_text(new), recolour_sky(new), move_shape(name, pos),
  move_body(body, pos), add(size, colour, kind, pos), remove(name), change_text(glyphs),
  expression(expression), glasses(glasses).
  """
  if which not in INSTRUCTION_TEMPLATES:
    raise ValueError(f'unknown instruction {which!r}; known: {tuple(INSTRUCTION_TEMPLATES)}')
  if which == 'expression':
    return _pick(rng, INSTRUCTION_TEMPLATES[which][slots['expression']])
  if which == 'glasses':
    return _pick(rng, INSTRUCTION_TEMPLATES[which][slots['glasses']])
  return _fill(_pick(rng, INSTRUCTION_TEMPLATES[which]), **slots)


# ---------------------------------------------------------------------------------------------
# Vocabulary.
# ---------------------------------------------------------------------------------------------


def _words(texts) -> set[str]:
  out = set()
  for t in texts:
    # Template slots are not words.
    for w in t.split():
      if not (w.startswith('{') and w.endswith('}')):
        out.add(w)
  return out


def _flatten(obj):
  if isinstance(obj, str):
    yield obj
  elif isinstance(obj, dict):
    for v in obj.values():
      yield from _flatten(v)
  elif isinstance(obj, (tuple, list)):
    for v in obj:
      yield from _flatten(v)


def vocabulary() -> tuple[str, ...]:
  """Sorted tuple of every word that can appear in any caption or instruction."""
  tables = (
    GENERAL_TEMPLATES,
    COUNT_WORDS,
    OBJECT_TEMPLATES,
    RELATION_TEMPLATES,
    RELATION_WORDS,
    TYPOGRAPHY_TEMPLATES,
    PORTRAIT_TEMPLATES,
    EXPRESSION_PHRASES,
    EXPRESSION_ADJECTIVES,
    GLASSES_PHRASES,
    LANDSCAPE_TEMPLATES,
    SKY_PHRASES,
    GROUND_PHRASES,
    BODY_POS_PHRASES,
    HORIZON_PHRASES,
    INSTRUCTION_TEMPLATES,
  )
  words = set()
  for table in tables:
    words |= _words(_flatten(table))
  fillers = (
    W.SHAPE_KINDS,
    W.SHAPE_COLOURS,
    W.SHAPE_SIZES,
    W.TEXT_COLOURS,
    W.FACE_SHAPES,
    W.SKIN_TONES,
    W.EYE_COLOURS,
    W.HAIR_COLOURS,
    W.BODIES,
    W.SKY_COLOURS,
  )
  for table in fillers:
    words |= _words(_flatten(list(table)))
  for row in range(W.GRID):
    for col in range(W.GRID):
      words |= set(W.position_name(row, col).split())
  words |= set(W.GLYPHS)
  assert not (set(string.punctuation) & set(''.join(words)))
  return tuple(sorted(words))
