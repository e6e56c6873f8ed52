"""Tiny world: specs, sampling, rendering, captions, edits, splits."""

import dataclasses
import time

import numpy as np
import pytest

from qwen_image_rl.data import captions as C
from qwen_image_rl.data import edits as E
from qwen_image_rl.data import font
from qwen_image_rl.data import render as R
from qwen_image_rl.data import world as W


def test_unknown_category_lists_known_ones():
  rng = np.random.default_rng(0)
  with pytest.raises(ValueError, match="known categories.*general"):
    W.sample_scene(rng, 'animals')
  with pytest.raises(ValueError, match='known categories'):
    R.render(object())
  with pytest.raises(ValueError, match='known categories'):
    C.caption(object(), rng)
  with pytest.raises(ValueError, match='known kinds'):
    E.sample_edit(rng, 'rotate')


def test_invalid_specs_fail_loudly():
  with pytest.raises(ValueError, match='Shape.colour'):
    W.Shape('circle', 'mauve', 'small', 0, 0)
  red = W.Shape('circle', 'red', 'small', 0, 0)
  with pytest.raises(ValueError, match='relation'):
    W.GeneralScene((red, W.Shape('square', 'blue', 'small', 0, 2)), 'above')
  with pytest.raises(ValueError, match='distinct colours'):
    W.GeneralScene((red, W.Shape('square', 'red', 'small', 0, 2)), 'left of')
  with pytest.raises(ValueError, match='text'):
    W.TypographyScene('abcd', 'red')
  with pytest.raises(ValueError, match='size'):
    R.render(W.TypographyScene('A', 'red'), size=8)


def test_sampling_rendering_captions_are_deterministic():
  def draw(seed):
    rng = np.random.default_rng(seed)
    specs = [W.sample_scene(rng, c) for c in W.CATEGORIES * 10]
    caps = [C.caption(s, rng) for s in specs]
    pixels = [R.render(s, 64) for s in specs]
    eds = [E.sample_edit(rng) for _ in range(20)]
    return specs, caps, pixels, eds

  a, b = draw(7), draw(7)
  assert a[0] == b[0] and a[1] == b[1] and a[3] == b[3]
  assert all(np.array_equal(x, y) for x, y in zip(a[2], b[2]))
  c = draw(8)
  assert a[0] != c[0]


@pytest.mark.parametrize('size', [32, 64, 128])
def test_render_sizes_and_speed(size):
  specs = W.sample_scenes(1, 80)
  start = time.perf_counter()
  images = R.render_batch(specs, size)
  per_image_ms = (time.perf_counter() - start) / len(specs) * 1e3
  print(f'size {size}: {per_image_ms:.2f} ms/image')
  assert images.shape == (80, size, size, 3) and images.dtype == np.uint8
  # Every scene draws something on its background, and distinct specs give distinct images.
  assert all(len(np.unique(im.reshape(-1, 3), axis=0)) > 1 for im in images)
  if size == 64:
    assert per_image_ms < 10  # ~1 ms on an idle core; generous for a shared CI machine


def test_clean_colours_are_exact_away_from_edges():
  spec = W.GeneralScene((W.Shape('square', 'red', 'large', 1, 1),))
  img = R.render(spec, 64)
  assert tuple(img[32, 32]) == W.SHAPE_COLOURS['red']
  assert tuple(img[2, 2]) == W.GENERAL_BACKGROUND


def test_general_scenes_satisfy_their_relation_and_layout():
  rng = np.random.default_rng(3)
  counts = np.zeros(4, int)
  for _ in range(300):
    spec = W.sample_scene(rng, 'general')
    counts[len(spec.shapes)] += 1
    if len(spec.shapes) > 1:
      assert W.relation_holds(spec.relation, spec.shapes[0], spec.shapes[1])
    for shape in spec.shapes:  # a shape's box stays inside its cell
      hw, hh = W.shape_extent(shape.kind, shape.size)
      assert max(hw, hh) < 0.5 / W.GRID
  assert counts[1:].min() > 60


def test_spec_dict_round_trip():
  for spec in W.sample_scenes(4, 40):
    assert W.from_dict(W.to_dict(spec)) == spec


def test_splits_are_disjoint_deterministic_and_roughly_80_10_10():
  specs = W.sample_scenes(5, 4000)
  by_split = {s: set() for s in W.SPLITS}
  for spec in specs:
    by_split[W.split_of(spec)].add(W.spec_key(spec))
  assert not (by_split['train'] & by_split['test'])
  assert not (by_split['train'] & by_split['val'])
  assert not (by_split['val'] & by_split['test'])
  fractions = np.array([sum(W.split_of(s) == k for s in specs) for k in W.SPLITS]) / len(specs)
  np.testing.assert_allclose(fractions, [0.8, 0.1, 0.1], atol=0.03)
  rng = np.random.default_rng(6)
  for category in W.CATEGORIES:
    for _ in range(20):
      assert W.split_of(W.sample_scene(rng, category, split='test')) == 'test'
  assert W.split_of(specs[0]) == W.split_of(W.from_dict(W.to_dict(specs[0])))


def test_font_glyphs_are_distinct():
  bitmaps = {c: font.bitmap(c) for c in W.GLYPHS}
  for a in W.GLYPHS:
    for b in W.GLYPHS:
      if a < b:
        assert (bitmaps[a] != bitmaps[b]).sum() >= 3, (a, b)


def _all_texts(n=1500, seed=9):
  rng = np.random.default_rng(seed)
  texts = []
  for spec in W.sample_scenes(seed, n):
    texts.append(C.caption(spec, rng))
  for _ in range(n // 2):
    texts.append(E.sample_edit(rng).instruction)
  return texts


def test_vocabulary_covers_every_caption_and_instruction():
  vocab = set(C.vocabulary())
  used = set()
  for text in _all_texts():
    assert text == ' '.join(text.split()), repr(text)  # single spaces, no punctuation
    words = text.split()
    assert set(words) <= vocab, set(words) - vocab
    used |= set(words)
  assert len(vocab) < 300
  assert len(used) > 0.8 * len(vocab)  # the vocabulary is not padded with unused words
  assert 'A' in vocab and 'a' in vocab and '7' in vocab


def test_captions_state_the_scored_attributes_and_paraphrase():
  rng = np.random.default_rng(10)
  spec = W.GeneralScene(
    (W.Shape('circle', 'red', 'small', 0, 0), W.Shape('triangle', 'blue', 'large', 0, 2)), 'left of'
  )
  caps = {C.caption(spec, rng) for _ in range(60)}
  assert len(caps) >= 10
  for cap in caps:
    for word in ('small', 'red', 'circle', 'large', 'blue', 'triangle', 'top', 'left', 'right'):
      assert word in cap.split(), (word, cap)
  typo = W.TypographyScene('A7B', 'green')
  assert all('A 7 B' in C.caption(typo, rng) and 'green' in C.caption(typo, rng) for _ in range(10))
  portrait = W.PortraitScene('oval', 'tan', 'green', 'red', 'smiling', True)
  for _ in range(10):
    words = C.caption(portrait, rng).split()
    assert {'oval', 'tan', 'green', 'red', 'glasses'} <= set(words)
  p = C.prompt(portrait, rng)
  assert p.category == 'portrait' and p.text


@pytest.mark.parametrize('kind', E.EDIT_KINDS)
def test_edits_change_only_what_the_instruction_says(kind):
  rng = np.random.default_rng(11)
  for _ in range(30):
    edit = E.sample_edit(rng, kind)
    src, tgt = edit.source, edit.target
    assert src != tgt and src.category == tgt.category
    assert edit.category in E.EDIT_CATEGORIES[kind]
    assert edit.instruction and set(edit.instruction.split()) <= set(C.vocabulary())
    if src.category == 'portrait':
      assert src.identity == tgt.identity
      changed = {
        f.name for f in dataclasses.fields(src) if getattr(src, f.name) != getattr(tgt, f.name)
      }
      assert changed == {'expression' if kind == 'expression' else 'glasses'}
    elif src.category == 'general':
      before, after = set(src.shapes), set(tgt.shapes)
      if kind == 'add':
        assert len(after - before) == 1 and before <= after
      elif kind == 'remove':
        assert len(before - after) == 1 and after <= before
      else:  # recolour / move: one shape changes one field
        (old,), (new,) = before - after, after - before
        diff = {
          f.name for f in dataclasses.fields(old) if getattr(old, f.name) != getattr(new, f.name)
        }
        if kind == 'recolour':
          assert diff == {'colour'}
        else:
          assert diff and diff <= {'row', 'col'}
    elif src.category == 'typography':
      assert (src.text != tgt.text) == (kind == 'change_text')
      assert (src.colour != tgt.colour) == (kind == 'recolour')
    else:
      assert (src.sky != tgt.sky) == (kind == 'recolour')
      assert (src.body_pos != tgt.body_pos) == (kind == 'move')
      assert (src.body, src.ground, src.horizon) == (tgt.body, tgt.ground, tgt.horizon)


def test_sample_edit_category_checks():
  rng = np.random.default_rng(12)
  assert E.sample_edit(rng, category='portrait').kind in ('expression', 'glasses')
  with pytest.raises(ValueError, match='applies to'):
    E.sample_edit(rng, 'add', category='portrait')
  with pytest.raises(ValueError, match='known categories'):
    E.sample_edit(rng, category='animals')
