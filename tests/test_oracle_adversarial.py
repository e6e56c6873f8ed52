"""Images built to game a soft scorer must lose to the right image, on soft and strict metrics.

For every category a few held-out scenes are rendered correctly, as a plausible imperfect
render and as adversaries:
  blank      the category's background alone (the sky for landscapes)
  noise      uniform RGB noise
  blur       the correct render under a heavy Gaussian blur (sigma 3.5 px)
  confetti   80 small discs in the scene's own colours scattered over the background
  duplicated every object twice (shapes in free cells, the text above and below itself, four
             small faces, a second sun or moon)
  wrong      the right colours in the wrong shapes (other shape kinds, other glyphs, a face of
             colour blocks without eyes or mouth, the sun or moon as a stripe)
The plausible imperfect render is what a decent generator draws: the right scene shifted by one
pixel, blurred (sigma 0.6 px) and with mild noise (sigma 3). It keeps every attribute, so it
passes the strict metric; every adversary must fail it and score below it on the rubric-capped
soft score. A render with one attribute wrong (a worse but honest attempt) must still beat the
count gamers (duplicated, confetti) on the soft score. For edits the adversaries are a copy of
the source image, blank, noise and confetti over the source.

The image-quality score (the aesthetics reward) has its own gamer: the right scene under a
high-frequency ripple (a grating of period 3-5 px, what a policy collapsed by self-training
drew), which the median-Laplacian noise term alone scored 0.8-1.
"""

import dataclasses

import numpy as np
import pytest
from scipy import ndimage

from qwen_image_rl.data import edits as E
from qwen_image_rl.data import oracle as O
from qwen_image_rl.data import render as R
from qwen_image_rl.data import world as W
from qwen_image_rl.rewards.base import RewardBatch
from qwen_image_rl.rewards.registry import make_reward

SIZE = 64
SCENES_PER_CATEGORY = 6


def _u8(image):
  return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _blur(image, sigma):
  return _u8(ndimage.gaussian_filter(image.astype(np.float32), (sigma, sigma, 0), mode='nearest'))


def imperfect(image, seed=0):
  """A plausible imperfect render: one pixel off, mildly blurred, mildly noisy."""
  rng = np.random.default_rng(seed)
  shifted = np.roll(image, 1, axis=1).astype(np.float32)
  shifted[:, 0] = shifted[:, 1]
  out = ndimage.gaussian_filter(shifted, (0.6, 0.6, 0), mode='nearest')
  return _u8(out + rng.normal(0, 3, out.shape))


def _background(spec):
  return {
    'general': W.GENERAL_BACKGROUND,
    'typography': W.TEXT_BACKGROUND,
    'portrait': W.PORTRAIT_BACKGROUND,
  }.get(spec.category) or W.SKY_COLOURS[spec.sky]


def _palette(spec):
  if spec.category == 'general':
    return [W.SHAPE_COLOURS[s.colour] for s in spec.shapes]
  if spec.category == 'typography':
    return [W.TEXT_COLOURS[spec.colour]]
  if spec.category == 'portrait':
    return [
      W.SKIN_TONES[spec.skin],
      W.HAIR_COLOURS[spec.hair],
      W.EYE_COLOURS[spec.eyes],
      W.SCLERA_COLOUR,
      W.MOUTH_COLOUR,
    ]
  return [W.BODIES[spec.body], W.GROUND_COLOURS[spec.ground]]


def blank(spec):
  return _u8(np.broadcast_to(np.asarray(_background(spec), np.float32), (SIZE, SIZE, 3)))


def noise(spec, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE, 3)).astype(np.uint8)


def heavy_blur(spec):
  return _blur(R.render(spec, SIZE), 3.5)


def confetti(spec, base=None, seed=0):
  rng = np.random.default_rng(seed)
  out = blank(spec) if base is None else base.copy()
  ys, xs = np.mgrid[:SIZE, :SIZE]
  colours = _palette(spec)
  for i in range(80):
    cy, cx = rng.uniform(0, SIZE, 2)
    out[(ys - cy) ** 2 + (xs - cx) ** 2 <= rng.uniform(1.5, 3.0) ** 2] = colours[i % len(colours)]
  return out


def rippled(spec, period=4, amplitude=30.0):
  """The correct render under a diagonal grating of `period` pixels."""
  ys, xs = np.mgrid[:SIZE, :SIZE]
  grating = amplitude * np.cos(2 * np.pi * (xs + ys) / period)
  return _u8(R.render(spec, SIZE).astype(np.float32) + grating[..., None])


def _composite(under, over, background):
  """`over`'s pixels that differ from `background`, painted on `under`."""
  ink = np.abs(over.astype(np.int32) - np.asarray(background)).max(-1) > 8
  return np.where(ink[..., None], over, under)


def duplicated(spec):
  image = R.render(spec, SIZE)
  if spec.category == 'general':
    used = {(s.row, s.col) for s in spec.shapes}
    free = [divmod(i, W.GRID) for i in range(W.GRID * W.GRID) if divmod(i, W.GRID) not in used]
    copies = tuple(dataclasses.replace(s, row=r, col=c) for s, (r, c) in zip(spec.shapes, free))
    twin = R.render(
      W.GeneralScene(
        shapes=copies, relation=None if len(copies) < 2 else W.pick_relation(copies[0], copies[1])
      ),
      SIZE,
    )
    return _composite(image, twin, W.GENERAL_BACKGROUND)
  if spec.category == 'typography':
    shift = int(0.34 * SIZE)
    out = _composite(image, np.roll(image, shift, axis=0), W.TEXT_BACKGROUND)
    return _composite(out, np.roll(image, -shift, axis=0), W.TEXT_BACKGROUND)
  if spec.category == 'portrait':
    small = image.reshape(SIZE // 2, 2, SIZE // 2, 2, 3).mean(axis=(1, 3))
    return _u8(np.tile(small, (2, 2, 1)))
  other = W.BODY_POSITIONS if spec.body_pos == 'center' else ['center']
  twin = R.render(
    dataclasses.replace(spec, body_pos=next(p for p in other if p != spec.body_pos)), SIZE
  )
  return _composite(image, twin, W.SKY_COLOURS[spec.sky])


def wrong_shapes(spec):
  """The scene's colours in the wrong shapes."""
  if spec.category == 'general':
    kinds = W.SHAPE_KINDS
    shapes = tuple(
      dataclasses.replace(s, kind=kinds[(kinds.index(s.kind) + 1) % len(kinds)])
      for s in spec.shapes
    )
    return R.render(dataclasses.replace(spec, shapes=shapes), SIZE)
  if spec.category == 'typography':
    text = ''.join(W.GLYPHS[(W.GLYPHS.index(c) + 7) % len(W.GLYPHS)] for c in spec.text)
    return R.render(dataclasses.replace(spec, text=text), SIZE)
  out = blank(spec)
  if spec.category == 'portrait':  # colour blocks where a face's colours are measured
    out[12:22, 16:48] = W.HAIR_COLOURS[spec.hair]
    out[22:56, 16:48] = W.SKIN_TONES[spec.skin]
    for x in (23, 35):
      out[30:36, x : x + 6] = W.EYE_COLOURS[spec.eyes]
    return out
  out[int(W.HORIZONS[spec.horizon] * SIZE) :] = W.GROUND_COLOURS[spec.ground]
  out[4:8] = W.BODIES[spec.body]  # the sun or moon as a stripe along the top
  return out


ADVERSARIES = {
  'blank': blank,
  'noise': noise,
  'blur': heavy_blur,
  'confetti': confetti,
  'duplicated': duplicated,
  'wrong': wrong_shapes,
}


def one_attribute_wrong(spec):
  """An honest but worse attempt: one colour wrong (a shape's, the text's, the hair), or the
  moon for the sun."""
  if spec.category == 'general':
    used = {s.colour for s in spec.shapes}
    new = next(c for c in W.SHAPE_COLOURS if c not in used)
    return dataclasses.replace(
      spec, shapes=(dataclasses.replace(spec.shapes[0], colour=new),) + spec.shapes[1:]
    )
  if spec.category == 'typography':
    return dataclasses.replace(spec, colour=next(c for c in W.TEXT_COLOURS if c != spec.colour))
  if spec.category == 'portrait':
    return dataclasses.replace(spec, hair=next(c for c in W.HAIR_COLOURS if c != spec.hair))
  return dataclasses.replace(spec, body=next(b for b in W.BODIES if b != spec.body))


def _scenes(category):
  rng = np.random.default_rng(77)
  scenes = [W.sample_scene(rng, category, split='test') for _ in range(SCENES_PER_CATEGORY)]
  if category == 'general':  # make sure one-, two- and three-shape scenes are all there
    assert {len(s.shapes) for s in scenes} == {1, 2, 3}, [len(s.shapes) for s in scenes]
  return scenes


@pytest.mark.parametrize('category', W.CATEGORIES)
def test_adversaries_lose_to_correct_and_imperfect_renders(category):
  failures = []
  for i, spec in enumerate(_scenes(category)):
    correct = O.score_t2i(R.render(spec, SIZE), spec)
    good = O.score_t2i(imperfect(R.render(spec, SIZE), seed=i), spec)
    assert correct['strict'] == 1.0 and good['strict'] == 1.0, (spec, good)
    assert good['overall'] > 0.75, (spec, good)
    for name, make in ADVERSARIES.items():
      s = O.score_t2i(make(spec), spec)
      if not (s['overall'] < min(good['overall'], correct['overall']) and s['strict'] == 0.0):
        failures.append(
          (name, spec, round(s['overall'], 3), s['strict'], round(good['overall'], 3))
        )
  assert not failures, failures


@pytest.mark.parametrize('category', W.CATEGORIES)
def test_ripple_loses_image_quality_to_imperfect_renders(category):
  for i, spec in enumerate(_scenes(category)):
    good = O.image_quality(imperfect(R.render(spec, SIZE), seed=i))['quality']
    assert good > 0.9, (spec, good)
    for period in (3, 4, 5):
      q = O.image_quality(rippled(spec, period))
      assert q['quality'] < 0.3 and q['ripple'] < 0.3, (spec, period, q)


@pytest.mark.parametrize('category', W.CATEGORIES)
def test_count_gamers_lose_to_an_honest_render_with_one_attribute_wrong(category):
  for spec in _scenes(category):
    honest = O.score_t2i(R.render(one_attribute_wrong(spec), SIZE), spec)['overall']
    for name in ('confetti', 'duplicated', 'blank', 'noise'):
      gamed = O.score_t2i(ADVERSARIES[name](spec), spec)
      assert gamed['overall'] < honest, (name, spec, gamed['overall'], honest)


def test_extra_objects_cap_the_score_although_presence_rises():
  # The gaming the uncapped mean rewarded: with one of two shapes missing, adding blobs in the
  # scene's colours raises presence and attributes; the capped score must still fall.
  rng = np.random.default_rng(5)
  rows = []
  while len(rows) < 6:
    spec = W.sample_scene(rng, 'general', split='test')
    if len(spec.shapes) < 2:
      continue
    partial = R.render(dataclasses.replace(spec, shapes=spec.shapes[:1], relation=None), SIZE)
    before = O.score_t2i(partial, spec)
    after = O.score_t2i(confetti(spec, base=partial), spec)
    rows.append((before, after))
    assert after['overall'] < before['overall'], (spec, before, after)
  # The uncapped mean, by contrast, is fooled at least sometimes (why the cap exists).
  assert any(a['presence'] > b['presence'] for b, a in rows)


def _edit_adversaries(edit, source):
  return {
    'copy of the source': source,
    'blank': blank(edit.target),
    'noise': noise(edit.target),
    'confetti over the source': confetti(edit.target, base=source),
  }


def test_edit_adversaries_lose_to_correct_and_imperfect_edits():
  edits = E.sample_edits(21, 28, split='test')
  assert {e.kind for e in edits} == set(E.EDIT_KINDS)
  failures = []
  for i, edit in enumerate(edits):
    source, target = R.render(edit.source, SIZE), R.render(edit.target, SIZE)
    correct = O.score_edit(source, target, edit)
    good = O.score_edit(source, imperfect(target, seed=i), edit)
    assert correct['strict'] == 1.0 and good['strict'] == 1.0, (edit, good)
    for name, image in _edit_adversaries(edit, source).items():
      s = O.score_edit(source, image, edit)
      ok = s['strict'] == 0.0 and s['overall'] < min(good['overall'], correct['overall'])
      ok &= s['instruction_following'] < good['instruction_following']
      if not ok:
        failures.append(
          (
            name,
            edit.kind,
            edit.instruction,
            round(s['overall'], 3),
            s['strict'],
            round(good['overall'], 3),
          )
        )
  assert not failures, failures


def test_alignment_reward_is_capped_by_default_and_keeps_the_mean_as_an_option():
  rng = np.random.default_rng(8)
  specs = [W.sample_scene(rng, 'general', split='test') for _ in range(6)]
  images = np.stack([duplicated(s) for s in specs])
  batch = RewardBatch(
    images=images,
    prompts=[''] * len(specs),
    categories=['general'] * len(specs),
    sample_ids=np.arange(len(specs)),
    meta=[{'spec': s} for s in specs],
  )
  capped = make_reward('alignment')(batch)['alignment']
  mean = make_reward('alignment', metric='mean')(batch)['alignment']
  expected = [O.score_t2i(im, s) for im, s in zip(images, specs)]
  np.testing.assert_allclose(capped, [e['overall'] for e in expected], rtol=1e-6)
  np.testing.assert_allclose(mean, [e['overall_mean'] for e in expected], rtol=1e-6)
  assert np.all(capped < mean - 0.1)  # duplicates fool the mean, not the capped score
  with pytest.raises(ValueError, match='metric'):
    make_reward('alignment', metric='median')
