"""Oracle-labelled judge data: renders, corrupted renders and (optionally) pipeline samples.

The judge must see the distribution it will score, from perfect to broken, so each spec gets
`variants_per_spec` images drawn from a mix of: the clean render, pixel corruptions (noise, blur,
impulses, recolour), semantic corruptions (the render of a mutated spec: a missing or extra
object, a changed colour, text, expression or layout; the prompt still asks for the original),
face distortions (portraits: stretched face, erased mouth or eye, odd iris), and a render of an
unrelated scene. Labels come from the oracle, exactly what the registered oracle rewards return.

Edit examples are (source, instruction, output) with outputs from the same mix applied to the
target render, plus the untouched source (the edit not done).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np
from scipy import ndimage

from qwen_image_rl.data import captions, examples, oracle, render
from qwen_image_rl.data import edits as E
from qwen_image_rl.data import world as W

TASKS = ('alignment', 'aesthetics', 'portrait', 'instruction')
T2I_TASKS = ('alignment', 'aesthetics', 'portrait')


# ---------------------------------------------------------------------------------------------
# Corruptions.
# ---------------------------------------------------------------------------------------------


def _clip(x) -> np.ndarray:
  return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def noise(image, rng):
  return _clip(image + rng.normal(0, rng.uniform(4, 40), image.shape))


def blur(image, rng):
  sigma = rng.uniform(0.5, 2.5)
  return _clip(ndimage.gaussian_filter(image.astype(np.float32), (sigma, sigma, 0)))


def impulses(image, rng):
  out = image.copy()
  hit = rng.random(image.shape[:2]) < rng.uniform(0.005, 0.06)
  out[hit] = rng.integers(0, 256, (int(hit.sum()), 3))
  return out


def recolour(image, rng):
  return (
    image[..., rng.permutation(3)]
    if rng.random() < 0.5
    else _clip(
      (image.astype(np.float32) - 128) * rng.uniform(0.3, 0.8) + 128 + rng.uniform(-40, 40, 3)
    )
  )


PIXEL_CORRUPTIONS = (noise, blur, impulses, recolour)


def distort_face(image, rng):
  """A structural face defect the oracle's well_formed check sees."""
  size = image.shape[0]
  cx, cy = W.FACE_CENTER
  out = image.copy()
  kind = int(rng.integers(4))
  if kind == 0:  # too wide or too narrow: stretch horizontally about the centre
    zoom = rng.choice([rng.uniform(0.6, 0.8), rng.uniform(1.25, 1.6)])
    xs = (np.arange(size) + 0.5 - size * cx) / zoom + size * cx - 0.5
    coords = np.meshgrid(np.arange(size), xs, indexing='ij')
    return (
      np.stack(
        [
          ndimage.map_coordinates(image[..., c].astype(np.float32), coords, order=1, mode='nearest')
          for c in range(3)
        ],
        -1,
      )
      .round()
      .astype(np.uint8)
    )
  skin = image[int((cy + 0.1) * size), int((cx + 0.14) * size)]
  if kind == 1:  # no mouth
    y0, y1 = int((cy + W.MOUTH_Y - 0.08) * size), int((cy + W.MOUTH_Y + 0.08) * size)
    x0, x1 = int((cx - 0.11) * size), int((cx + 0.11) * size)
    out[y0:y1, x0:x1] = skin
    return out
  side = W.EYE_DX * (1 if rng.random() < 0.5 else -1)
  ey, ex = cy + W.EYE_DY, cx + side
  ys, xs = np.meshgrid(
    (np.arange(size) + 0.5) / size, (np.arange(size) + 0.5) / size, indexing='ij'
  )
  r = 0.075 if kind == 2 else W.IRIS_RADIUS
  disc = (xs - ex) ** 2 + (ys - ey) ** 2 <= r * r
  out[disc] = skin if kind == 2 else rng.integers(0, 256, 3)  # no eye / an odd iris
  return out


def mutate_spec(spec, rng):
  """A different scene of the same category that differs in one thing (or None)."""
  if spec.category == 'general':
    kinds = [
      k for k in ('recolour', 'move', 'add', 'remove') if k != 'remove' or len(spec.shapes) > 1
    ]
    edit = E.make_edit(spec, kinds[int(rng.integers(len(kinds)))], rng)
    return None if edit is None else edit.target
  options = {
    'typography': {'colour': W.TEXT_COLOURS, 'text': None},
    'portrait': {
      'face_shape': W.FACE_SHAPES,
      'skin': W.SKIN_TONES,
      'eyes': W.EYE_COLOURS,
      'hair': W.HAIR_COLOURS,
      'expression': W.EXPRESSIONS,
      'glasses': (True, False),
    },
    'landscape': {
      'sky': W.SKY_COLOURS,
      'body': W.BODIES,
      'body_pos': W.BODY_POSITIONS,
      'ground': W.GROUND_COLOURS,
      'horizon': W.HORIZONS,
    },
  }[spec.category]
  field = list(options)[int(rng.integers(len(options)))]
  if field == 'text':
    text = list(spec.text)
    text[int(rng.integers(len(text)))] = W.GLYPHS[int(rng.integers(len(W.GLYPHS)))]
    value = ''.join(text)
  else:
    values = list(options[field])
    value = values[int(rng.integers(len(values)))]
  new = dataclasses.replace(spec, **{field: value})
  return None if new == spec else new


VARIANTS = ('clean', 'pixel', 'semantic', 'semantic+pixel', 'face', 'unrelated')
# Images that are exactly the render of the scene they show (no pixel or face corruption): the
# oracle's alignment and instruction scores of these follow from the scene alone.
EXACT_RENDER_KINDS = ('clean', 'semantic', 'unrelated', 'source')
EXACT_RENDER_MIX = {'pixel': 0.0, 'semantic+pixel': 0.0, 'face': 0.0}  # draws only those
VARIANT_PROBS = (0.2, 0.3, 0.25, 0.1, 0.1, 0.05)
# Portraits: face defects are what the portrait reward judges, so they get a larger share.
PORTRAIT_VARIANT_PROBS = (0.15, 0.2, 0.15, 0.05, 0.4, 0.05)


def variant_probs(category: str, mix: dict | None = None) -> np.ndarray:
  """The corruption mix of a category, each variant's probability scaled by `mix[name]`
  (default 1) and renormalised."""
  probs = np.array(PORTRAIT_VARIANT_PROBS if category == 'portrait' else VARIANT_PROBS)
  if mix:  # (all weights 1: the table itself, so the default data is drawn exactly as before)
    unknown = set(mix) - set(VARIANTS)
    if unknown:
      raise ValueError(f'unknown judge data variants {sorted(unknown)}; known: {VARIANTS}')
    weights = np.array([float(mix.get(v, 1.0)) for v in VARIANTS])
    if weights.min() < 0 or not (probs * weights).sum():
      raise ValueError(f'judge data variant weights {mix}: must be >= 0, not all 0')
    if np.any(weights != 1.0):
      probs = probs * weights / (probs * weights).sum()
  return probs


def corrupt(spec, image, size, rng, mix: dict | None = None):
  """(image, variant name, shown spec): one draw from the corruption mix for a render of `spec`;
  the shown spec is the scene actually drawn (a mutated or unrelated one, else `spec`)."""
  probs = variant_probs(spec.category, mix)
  variant = VARIANTS[int(rng.choice(len(VARIANTS), p=probs))]
  if variant == 'face' and spec.category != 'portrait':
    variant = 'pixel'
  if variant == 'clean':
    return image, variant, spec
  if variant == 'face':
    out = distort_face(image, rng)
    return (
      PIXEL_CORRUPTIONS[int(rng.integers(4))](out, rng) if rng.random() < 0.3 else out,
      variant,
      spec,
    )
  if variant == 'unrelated':
    shown = W.sample_scene(rng, spec.category)
    return render.render(shown, size), variant, shown
  shown = spec
  if variant.startswith('semantic'):
    mutated = mutate_spec(spec, rng)
    if mutated is not None:
      image, shown = render.render(mutated, size), mutated
  if variant.endswith('pixel'):
    image = PIXEL_CORRUPTIONS[int(rng.integers(4))](image, rng)
  return image, variant, shown


def describe(spec) -> str:
  """What a judge that describes before it judges writes of the scene it sees: the world's
  caption in one fixed phrasing (the prompt it is compared with is paraphrased freely)."""
  return captions.caption(spec, np.random.default_rng(0))


# ---------------------------------------------------------------------------------------------
# Labelled sets.
# ---------------------------------------------------------------------------------------------


class Item(NamedTuple):
  """One requested item of a scene: its name in the prompt's words, the oracle's check of it in
  [0, 1], and what kind of check it is ('count', 'shape', 'position', 'glyph', ...)."""

  phrase: str
  value: float
  kind: str


def alignment_items(spec, checks: dict) -> tuple[Item, ...]:
  """The requested scene's items with the oracle's item-level check of each
  (`oracle.t2i_checks`; the ones the alignment score reads, not the strict-only solidity
  checks): what a checklist chain of thought goes through, one lookup in the image per item, in
  the rubric's order (count and presence first)."""
  if spec.category == 'general':
    items = [Item('count', checks['count'], 'count')]
    for i, shape in enumerate(spec.shapes):
      looks = min(checks[f'shape{i}/{k}'] for k in ('presence', 'colour', 'kind', 'size'))
      items.append(Item(f'{shape.size} {shape.name}', looks, 'shape'))
      position = W.position_name(shape.row, shape.col)
      items.append(Item(position, checks[f'shape{i}/position'], 'position'))
    if spec.relation is not None:
      a, b = spec.shapes[:2]
      items.append(Item(f'{a.name} {spec.relation} {b.name}', checks['relation'], 'relation'))
    return tuple(items)
  if spec.category == 'typography':
    return (
      Item('count', checks['count'], 'count'),
      *(Item(glyph, checks[f'glyph{k}'], 'glyph') for k, glyph in enumerate(spec.text)),
      Item(f'{spec.colour} text', checks['colour'], 'colour'),
    )
  if spec.category == 'portrait':
    attributes = {
      'face_shape': f'{spec.face_shape} face',
      'skin': f'{spec.skin} skin',
      'eyes': f'{spec.eyes} eyes',
      'hair': f'{spec.hair} hair',
      'expression': spec.expression,
      'glasses': 'glasses' if spec.glasses else 'no glasses',
    }
    return (
      Item('face', checks['well_formed'], 'face'),
      *(Item(phrase, checks[f'attributes/{k}'], k) for k, phrase in attributes.items()),
      Item('identity', checks['identity'], 'identity'),
    )
  return (
    Item(f'{spec.sky} sky', checks['sky'], 'sky'),
    Item(spec.ground, checks['ground'], 'ground'),
    Item(spec.body, min(checks['body'], checks['body_count']), 'body'),
    Item(spec.body_pos, checks['body_position'], 'body_position'),
    Item(f'{spec.horizon} horizon', checks['horizon'], 'horizon'),
  )


def t2i_labels(image, spec) -> dict:
  """The oracle's alignment / aesthetics / portrait rewards, per-dimension verdict inputs and
  the alignment checklist (`alignment_items`)."""
  scores, checks = oracle.score_and_check_t2i(image, spec)
  quality = oracle.image_quality(image)
  out = {
    'alignment': scores['overall'],
    'aesthetics': quality['quality'],
    'dims/alignment': {k: v for k, v in scores.items() if k not in ('overall', 'quality')},
    'dims/aesthetics': {k: quality[k] for k in ('noise', 'sharpness', 'artefacts')},
    'items/alignment': alignment_items(spec, checks),
  }
  if spec.category == 'portrait':
    out['portrait'] = scores['well_formed']
    out['dims/portrait'] = {'structure': scores['well_formed'], 'quality': quality['quality']}
  return out


@dataclasses.dataclass(frozen=True)
class JudgeSet:
  """Images with their prompts and oracle labels. Groups of `variants` images share a spec.

  T2I: images [N, H, W, 3], prompts, categories, specs, labels (dicts from `t2i_labels`).
  Edits: sources, images (outputs), prompts (instructions), categories, edits, labels.
  kinds: each image's variant (VARIANTS, 'sample' for a pipeline sample, 'source' for an edit's
  untouched source); shown: the scene each image (an edit's output) draws (None for a pipeline
  sample).
  """

  images: np.ndarray
  prompts: tuple
  categories: tuple
  labels: tuple
  variants: int
  sources: np.ndarray | None = None
  specs: tuple = ()
  edits: tuple = ()
  kinds: tuple = ()
  shown: tuple = ()

  def __len__(self):
    return len(self.prompts)

  def scores(self, task: str) -> np.ndarray:
    return np.array([l.get(task, np.nan) for l in self.labels], np.float32)

  def shown_captions(self, row: int, rng) -> list[str]:
    """Captions of the scenes an example's images draw (an edit's source, then its output), in
    a phrasing drawn from `rng`: what a describe-first judge should write of them."""
    if self.shown[row] is None:
      raise ValueError(f'image {row} is a pipeline sample: the scene it draws is unknown')
    scenes = [self.shown[row]]
    if self.sources is not None:
      scenes.insert(0, self.edits[row].source)
    return [captions.caption(scene, rng) for scene in scenes]


def t2i_set(
  seed: int,
  n_specs: int,
  split: str,
  size: int,
  variants: int = 2,
  extra_images: np.ndarray | None = None,
  mix: dict | None = None,
) -> JudgeSet:
  """`variants` corrupted draws per spec (`extra_images` [n_specs, H, W, 3], e.g. pipeline
  samples of the same prompts, replace the last draw when given; `mix`: see variant_probs)."""
  ex = examples.t2i_examples(seed, n_specs, split, size)
  rng = np.random.default_rng([seed, W.SPLITS.index(split), 7])
  images, rows, kinds, shown = [], [], [], []
  for i, spec in enumerate(ex.specs):
    for v in range(variants):
      if extra_images is not None and v == variants - 1:
        image, kind, scene = extra_images[i], 'sample', None
      else:
        image, kind, scene = corrupt(spec, ex.images[i], size, rng, mix)
      images.append(image)
      rows.append(i)
      kinds.append(kind)
      shown.append(scene)
  images = np.stack(images)
  return JudgeSet(
    images=images,
    prompts=tuple(ex.prompts[i] for i in rows),
    categories=tuple(ex.categories[i] for i in rows),
    labels=tuple(t2i_labels(im, ex.specs[i]) for im, i in zip(images, rows)),
    variants=variants,
    specs=tuple(ex.specs[i] for i in rows),
    kinds=tuple(kinds),
    shown=tuple(shown),
  )


def edit_labels(source, output, edit) -> dict:
  scores = oracle.score_edit(source, output, edit)
  return {
    'instruction': scores['instruction_following'],
    'dims/instruction': {
      'core': scores['instruction_following'],
      'noncore': scores['preservation'],
      'coherent': scores['quality'],
    },
  }


def edit_set(
  seed: int,
  n_edits: int,
  split: str,
  size: int,
  variants: int = 2,
  extra_outputs: np.ndarray | None = None,
  mix: dict | None = None,
) -> JudgeSet:
  ex = examples.edit_examples(seed, n_edits, split, size)
  rng = np.random.default_rng([seed, W.SPLITS.index(split), 8])
  outputs, rows, kinds, shown = [], [], [], []
  for i, edit in enumerate(ex.edits):
    for v in range(variants):
      if extra_outputs is not None and v == variants - 1:
        out, kind, scene = extra_outputs[i], 'sample', None
      elif rng.random() < 0.15:
        out, kind, scene = ex.sources[i], 'source', edit.source  # the edit not done
      else:
        out, kind, scene = corrupt(edit.target, ex.targets[i], size, rng, mix)
      outputs.append(out)
      rows.append(i)
      kinds.append(kind)
      shown.append(scene)
  outputs = np.stack(outputs)
  sources = ex.sources[rows]
  return JudgeSet(
    images=outputs,
    sources=sources,
    prompts=tuple(ex.instructions[i] for i in rows),
    categories=tuple(ex.categories[i] for i in rows),
    labels=tuple(edit_labels(s, o, ex.edits[i]) for s, o, i in zip(sources, outputs, rows)),
    variants=variants,
    edits=tuple(ex.edits[i] for i in rows),
    kinds=tuple(kinds),
    shown=tuple(shown),
  )
