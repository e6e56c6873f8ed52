"""The tiny-world oracle: near-perfect on clean renders, graded and monotone under corruption."""

import dataclasses
import itertools

import numpy as np
import pytest
from scipy import ndimage

from qwen_image_rl.data import edits as E
from qwen_image_rl.data import oracle as O
from qwen_image_rl.data import render as R
from qwen_image_rl.data import world as W

N_HELD_OUT = 200


def _noisy(image, sigma, seed=0):
  rng = np.random.default_rng(seed)
  return np.clip(image + rng.normal(0, sigma, image.shape), 0, 255).astype(np.uint8)


def _blurred(image, sigma):
  if sigma == 0:
    return image
  out = ndimage.gaussian_filter(image.astype(np.float32), (sigma, sigma, 0), mode='nearest')
  return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _assert_decreasing(means, what, min_drop):
  means = np.asarray(means)
  assert np.all(np.diff(means) <= 1e-6), f'{what}: not monotone {np.round(means, 4)}'
  assert means[0] - means[-1] >= min_drop, f'{what}: drops too little {np.round(means, 4)}'


@pytest.mark.parametrize('category', W.CATEGORIES)
def test_clean_held_out_scenes_score_at_least_099(category):
  rng = np.random.default_rng(2024)
  scores = []
  for _ in range(N_HELD_OUT):
    spec = W.sample_scene(rng, category, split='test')
    scores.append(O.score_t2i(R.render(spec, 64), spec))
  dims = set(O.ALIGNMENT_DIMS[category]) | {'overall', 'overall_mean', 'strict', 'quality'}
  worst = {k: min(s[k] for s in scores if k in s) for k in dims if any(k in s for s in scores)}
  print(category, {k: round(v, 4) for k, v in sorted(worst.items())})
  assert set(worst) >= dims - {'relation'}
  for k, v in worst.items():
    assert v >= 0.99, f'{category}/{k}: worst clean score {v:.4f}'
  assert all(
    set(s) - {'overall', 'overall_mean', 'strict', 'quality'} <= set(O.ALIGNMENT_DIMS[category])
    for s in scores
  )


def _all_specs(category):
  tables = {
    'portrait': (
      W.PortraitScene,
      (W.FACE_SHAPES, W.SKIN_TONES, W.EYE_COLOURS, W.HAIR_COLOURS, W.EXPRESSIONS, (False, True)),
    ),
    'landscape': (
      W.LandscapeScene,
      (W.SKY_COLOURS, W.BODIES, W.BODY_POSITIONS, W.GROUND_COLOURS, W.HORIZONS),
    ),
  }
  cls, options = tables[category]
  return [cls(*values) for values in itertools.product(*[list(o) for o in options])]


@pytest.mark.parametrize('category', ['portrait', 'landscape'])
def test_every_held_out_portrait_and_landscape_scores_at_least_099(category):
  # These spaces are small (1152 portraits, 288 landscapes), so the test split (~10%) holds
  # fewer distinct specs than the 200 samples above: score each of them once, exhaustively.
  specs = [s for s in _all_specs(category) if W.split_of(s) == 'test']
  assert len(specs) > 20
  scores = O.mean_scores([O.score_t2i(R.render(s), s) for s in specs])
  worst = min(min(O.score_t2i(R.render(s), s).values()) for s in specs)
  print(category, len(specs), 'held-out specs; worst dimension', round(worst, 4))
  assert worst >= 0.99 and scores['overall'] >= 0.995


@pytest.mark.parametrize('size', [128])
def test_clean_scores_hold_at_other_sizes(size):
  scores = [O.score_t2i(R.render(s, size), s) for s in W.sample_scenes(5, 40, split='test')]
  assert min(s['overall'] for s in scores) >= 0.99
  assert min(s['quality'] for s in scores) >= 0.99


def test_clean_edits_score_at_least_099():
  edits = E.sample_edits(11, 210, split='test')
  assert {e.kind for e in edits} == set(E.EDIT_KINDS)
  worst = {}
  for edit in edits:
    s = O.score_edit(R.render(edit.source), R.render(edit.target), edit)
    for k in ('instruction_following', 'preservation', 'identity', 'overall'):
      if k in s:
        worst[k] = min(worst.get(k, 1.0), s[k])
    assert ('identity' in s) == (edit.category == 'portrait')
  print({k: round(v, 4) for k, v in worst.items()})
  assert set(worst) == {'instruction_following', 'preservation', 'identity', 'overall'}
  assert min(worst.values()) >= 0.99, worst


def test_unedited_output_fails_instruction_but_preserves():
  edits = E.sample_edits(12, 70)
  follow, keep = [], []
  for edit in edits:
    src = R.render(edit.source)
    s = O.score_edit(src, src, edit)  # a model that ignores the instruction
    follow.append(s['instruction_following'])
    keep.append(s['preservation'])
  assert np.mean(follow) < 0.8 and min(keep) >= 0.99


def test_edit_that_breaks_untouched_content_loses_preservation():
  rng = np.random.default_rng(3)
  drops = []
  for _ in range(20):
    edit = E.sample_edit(rng, 'recolour', category='general')
    src, out = R.render(edit.source), R.render(edit.target)
    spoiled = out.copy()
    spoiled[:16, :] = 255 - spoiled[:16, :]  # vandalise a band that may include untouched shapes
    clean_p = O.score_edit(src, out, edit)['preservation']
    drops.append(clean_p - O.score_edit(src, spoiled, edit)['preservation'])
  assert min(drops) > 0.1


def _general_scenes(n_shapes, n, seed):
  rng = np.random.default_rng(seed)
  out = []
  while len(out) < n:
    spec = W.sample_scene(rng, 'general')
    if len(spec.shapes) == n_shapes:
      out.append(spec)
  return out


def test_wrong_colour_lowers_attributes_monotonically():
  levels = [0.0, 0.25, 0.5, 0.75, 1.0]
  attrs = {t: [] for t in levels}
  for spec in _general_scenes(2, 25, seed=1):
    used = {s.colour for s in spec.shapes}
    wrong = next(c for c in W.SHAPE_COLOURS if c not in used)
    bad = W.GeneralScene(
      (dataclasses.replace(spec.shapes[0], colour=wrong),) + spec.shapes[1:], spec.relation
    )
    good_img, bad_img = R.render(spec).astype(np.float32), R.render(bad).astype(np.float32)
    for t in levels:
      img = np.rint((1 - t) * good_img + t * bad_img).astype(np.uint8)
      attrs[t].append(O.score_t2i(img, spec)['attributes'])
  # One of two shapes has the wrong colour: 1 of its 3 attributes, so at most 1/6 of the mean.
  _assert_decreasing([np.mean(attrs[t]) for t in levels], 'colour', 0.15)


def test_missing_objects_lower_presence_and_count():
  presence, count, overall = [[] for _ in range(3)], [[] for _ in range(3)], [[] for _ in range(3)]
  for spec in _general_scenes(3, 25, seed=2):
    for k in range(3):  # remove the last k shapes from the image
      shown = W.GeneralScene(spec.shapes[: 3 - k], spec.relation if k < 2 else None)
      s = O.score_t2i(R.render(shown), spec)
      presence[k].append(s['presence'])
      count[k].append(s['count'])
      overall[k].append(s['overall'])
  _assert_decreasing([np.mean(p) for p in presence], 'presence', 0.6)
  _assert_decreasing([np.mean(c) for c in count], 'count', 0.6)
  _assert_decreasing([np.mean(o) for o in overall], 'overall', 0.3)


def test_moving_an_object_lowers_position():
  pos = {d: [] for d in range(3)}
  for spec in _general_scenes(1, 20, seed=3):
    shape = spec.shapes[0]
    for d in range(3):  # move d cells to the right, wrapping around the grid
      moved = dataclasses.replace(shape, col=(shape.col + d) % W.GRID)
      pos[d].append(O.score_t2i(R.render(W.GeneralScene((moved,))), spec)['position'])
  # Wrapping makes some 2-cell moves 1-cell moves; still, on average, farther is worse.
  _assert_decreasing([np.mean(pos[d]) for d in range(3)], 'position', 0.9)


def test_swapped_or_wrong_glyphs_lower_typography_scores():
  rng = np.random.default_rng(4)
  order, glyphs = {k: [] for k in range(4)}, {k: [] for k in range(4)}
  swapped = []
  for _ in range(20):
    text = ''.join(rng.choice(list(W.GLYPHS), size=3, replace=False))
    spec = W.TypographyScene(text, 'blue')
    for k in range(4):  # replace the first k glyphs by different ones
      shown = ''.join(
        W.GLYPHS[(W.GLYPHS.index(c) + 7) % len(W.GLYPHS)] if i < k else c
        for i, c in enumerate(text)
      )
      s = O.score_t2i(R.render(W.TypographyScene(shown, 'blue')), spec)
      order[k].append(s['order'])
      glyphs[k].append(s['glyphs'])
    swap = O.score_t2i(R.render(W.TypographyScene(text[1] + text[0] + text[2], 'blue')), spec)
    swapped.append((swap['glyphs'], swap['order']))
  _assert_decreasing([np.mean(order[k]) for k in range(4)], 'order', 0.9)
  _assert_decreasing([np.mean(glyphs[k]) for k in range(4)], 'glyphs', 0.9)
  swapped = np.mean(swapped, axis=0)
  assert swapped[0] > 0.97 and swapped[1] < 0.45, swapped  # same glyphs, wrong order


def test_identity_changes_lower_identity_scores():
  rng = np.random.default_rng(5)
  ident, sim = {k: [] for k in range(5)}, {k: [] for k in range(5)}
  tables = {
    'face_shape': W.FACE_SHAPES,
    'skin': W.SKIN_TONES,
    'eyes': W.EYE_COLOURS,
    'hair': W.HAIR_COLOURS,
  }
  for _ in range(20):
    spec = W.sample_scene(rng, 'portrait')
    ref = R.render(spec)
    for k in range(5):  # change k identity attributes
      changes = {}
      for field in W.IDENTITY_FIELDS[:k]:
        options = [v for v in tables[field] if v != getattr(spec, field)]
        changes[field] = options[int(rng.integers(len(options)))]
      img = R.render(dataclasses.replace(spec, **changes))
      ident[k].append(O.score_t2i(img, spec)['identity'])
      sim[k].append(O.identity_similarity(ref, img))
  _assert_decreasing([np.mean(ident[k]) for k in range(5)], 'identity', 0.9)
  _assert_decreasing([np.mean(sim[k]) for k in range(5)], 'identity_similarity', 0.9)
  assert max(sim[1]) < 0.5


def test_state_changes_keep_identity():
  rng = np.random.default_rng(6)
  for _ in range(30):
    spec = W.sample_scene(rng, 'portrait')
    other = dataclasses.replace(
      spec, expression=W.EXPRESSIONS[int(rng.integers(3))], glasses=not spec.glasses
    )
    assert O.identity_similarity(R.render(spec), R.render(other)) >= 0.99
    s = O.score_t2i(R.render(other), spec)
    assert s['attributes'] < 0.9  # glasses (and maybe expression) no longer match


def _corruption_curve(corrupt, levels, key, n=24, seed=7):
  specs = W.sample_scenes(seed, n)
  means = []
  for level in levels:
    means.append(np.mean([O.score_t2i(corrupt(R.render(s), level), s)[key] for s in specs]))
  return means


def test_noise_lowers_quality_and_alignment():
  levels = [0, 4, 8, 16, 32, 64]
  _assert_decreasing(_corruption_curve(_noisy, levels, 'quality'), 'quality vs noise', 0.9)
  overall = _corruption_curve(_noisy, levels[::2] + [96], 'overall')
  _assert_decreasing(overall, 'overall vs noise', 0.1)


def test_blur_lowers_quality_gradually():
  levels = [0, 0.5, 1.0, 1.5, 2.5]
  quality = _corruption_curve(_blurred, levels, 'quality')
  _assert_decreasing(quality, 'quality vs blur', 0.8)
  overall = _corruption_curve(_blurred, levels, 'overall')
  _assert_decreasing(overall, 'overall vs blur', 0.02)
  assert overall[2] > 0.8  # mild blur keeps alignment mostly intact (soft, not brittle)


def test_float_images_match_uint8():
  for spec in W.sample_scenes(8, 8):
    img = R.render(spec)
    a, b = O.score_t2i(img, spec), O.score_t2i(img.astype(np.float32) / 255.0, spec)
    assert a.keys() == b.keys()
    np.testing.assert_allclose([a[k] for k in a], [b[k] for k in a], atol=1e-5)


def test_bad_inputs_raise():
  spec = W.sample_scene(np.random.default_rng(0), 'general')
  with pytest.raises(ValueError, match='square RGB'):
    O.score_t2i(np.zeros((64, 32, 3), np.uint8), spec)
  with pytest.raises(ValueError, match='known categories'):
    O.score_t2i(np.zeros((64, 64, 3), np.uint8), object())
  with pytest.raises(ValueError, match='dtype'):
    O.score_t2i(np.zeros((64, 64, 3), np.int32), spec)


def test_mean_scores_averages_only_present_keys():
  out = O.mean_scores([{'a': 1.0, 'relation': 0.0}, {'a': 0.0}])
  assert out == {'a': 0.5, 'relation': 0.0}


def test_scores_stay_in_unit_interval_on_garbage_images():
  rng = np.random.default_rng(13)
  garbage = [
    np.zeros((64, 64, 3), np.uint8),
    np.full((64, 64, 3), 255, np.uint8),
    rng.integers(0, 256, (64, 64, 3)).astype(np.uint8),
    _blurred(rng.integers(0, 256, (64, 64, 3)).astype(np.uint8), 3.0),
  ]
  for category in W.CATEGORIES:
    spec = W.sample_scene(rng, category)
    others = [R.render(W.sample_scene(rng, c)) for c in W.CATEGORIES if c != category]
    for img in garbage + others:  # nothing here shows the requested scene
      s = O.score_t2i(img, spec)
      values = np.array(list(s.values()))
      assert np.all(np.isfinite(values)) and values.min() >= 0 and values.max() <= 1, s
      assert s['overall'] < 0.8, (category, s)
  edit = E.sample_edit(rng, 'expression')
  for img in garbage:
    s = O.score_edit(R.render(edit.source), img, edit)
    assert all(0 <= v <= 1 for v in s.values()) and s['overall'] < 0.7, s


def test_identity_reads_blurred_faces_and_still_tells_identities_apart():
  # Generated faces are soft (the VAE, few sampling steps): the identity of a face blurred by
  # sigma 2 px, with mild noise and another expression, must stay recognisably the same,
  # while a different identity under the same degradation must not.
  rng = np.random.default_rng(17)
  tables = {
    'face_shape': W.FACE_SHAPES,
    'skin': W.SKIN_TONES,
    'eyes': W.EYE_COLOURS,
    'hair': W.HAIR_COLOURS,
  }
  same, one_changed, different = [], [], []
  for i in range(20):
    spec = W.sample_scene(rng, 'portrait')
    state = dataclasses.replace(spec, expression=W.EXPRESSIONS[i % 3], glasses=not spec.glasses)

    def soft(s, seed=i):
      return _noisy(_blurred(R.render(s), 2.0), 4, seed=seed)

    others = {f: [v for v in tables[f] if v != getattr(spec, f)] for f in tables}
    field = W.IDENTITY_FIELDS[i % 4]
    ref = R.render(spec)
    same.append(O.identity_similarity(ref, soft(state)))
    one_changed.append(
      O.identity_similarity(ref, soft(dataclasses.replace(state, **{field: others[field][0]})))
    )
    different.append(
      O.identity_similarity(
        ref, soft(dataclasses.replace(state, **{f: o[-1] for f, o in others.items()}))
      )
    )
    assert O.score_t2i(soft(state), spec)['identity'] > 0.5, spec
  print(np.mean(same), np.mean(one_changed), np.max(different))
  assert np.mean(same) > 0.85 and min(same) > 0.5
  assert np.mean(one_changed) < 0.35
  assert max(different) < 0.05
