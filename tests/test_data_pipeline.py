"""Tiny-world tfds builders (pixel-exact vs the renderer, disjoint splits, determinism) and
users' prompt files (parsing, line-numbered errors, atomic round trip)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from qwen_image_rl.data import edits, examples, render, world
from qwen_image_rl.data import prompt_files as pf

SIZE = 32
T2I_SIZES = dict(num_train=24, num_validation=8, num_test=8)
EDIT_SIZES = dict(num_train=14, num_validation=7, num_test=7)  # two rounds of the 7 kinds
SPLITS = {'train': 'train', 'validation': 'val', 'test': 'test'}


# ---------------------------------------------------------------------------------------------
# tfds builders.
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope='module')
def tb():
  pytest.importorskip('tensorflow_datasets')
  pytest.importorskip('tensorflow')
  import tensorflow_datasets as tfds

  from qwen_image_rl.data import tfds_builders

  tfds.disable_progress_bar()
  return tfds_builders


def _load_all(tb, name, data_dir, **fields):
  return {
    split: list(tb.build_and_load(name, data_dir, split, image_size=SIZE, **fields))
    for split in SPLITS
  }


@pytest.fixture(scope='module')
def t2i(tb, tmp_path_factory):
  return _load_all(tb, 'tiny_world_t2i', tmp_path_factory.mktemp('tfds_t2i'), **T2I_SIZES)


@pytest.fixture(scope='module')
def edit(tb, tmp_path_factory):
  return _load_all(tb, 'tiny_world_edit', tmp_path_factory.mktemp('tfds_edit'), **EDIT_SIZES)


def _text(x) -> str:
  return x.decode() if isinstance(x, bytes) else str(x)


def test_t2i_matches_world_pixel_exact(t2i):
  for split, world_split in SPLITS.items():
    rows = t2i[split]
    n = T2I_SIZES[f'num_{split}']
    assert [int(r['index']) for r in rows] == list(range(n))
    ref = examples.t2i_examples(0, n, world_split, SIZE)
    for r, spec, prompt, category in zip(rows, ref.specs, ref.prompts, ref.categories):
      loaded_spec = world.from_dict(json.loads(_text(r['spec'])))
      assert loaded_spec == spec
      assert r['image'].dtype == np.uint8 and r['image'].shape == (SIZE, SIZE, 3)
      # PNG is lossless: the stored image is the renderer's, bit for bit.
      diff = np.abs(r['image'].astype(int) - render.render(loaded_spec, SIZE).astype(int)).max()
      assert diff == 0, (split, int(r['index']), diff)
      assert _text(r['prompt']) == prompt
      assert world.CATEGORIES[int(r['category'])] == category == spec.category
      assert world.split_of(spec) == world_split
    np.testing.assert_array_equal(np.stack([r['image'] for r in rows]), ref.images)


def test_t2i_splits_are_disjoint(t2i):
  keys = {split: {_text(r['spec']) for r in rows} for split, rows in t2i.items()}
  assert not keys['train'] & keys['validation']
  assert not keys['train'] & keys['test']
  assert not keys['validation'] & keys['test']
  # Every category shows up (the sets cycle through them).
  assert {int(r['category']) for r in t2i['train']} == set(range(len(world.CATEGORIES)))


def test_edit_matches_world_pixel_exact(tb, edit):
  for split, world_split in SPLITS.items():
    rows = edit[split]
    n = EDIT_SIZES[f'num_{split}']
    assert [int(r['index']) for r in rows] == list(range(n))
    ref = examples.edit_examples(0, n, world_split, SIZE)
    for r, e in zip(rows, ref.edits):
      loaded = tb.edit_from_key(_text(r['spec']))
      assert loaded == e
      assert tb.edit_key(loaded) == _text(r['spec'])
      for key, scene in (('source_image', e.source), ('target_image', e.target)):
        diff = np.abs(r[key].astype(int) - render.render(scene, SIZE).astype(int)).max()
        assert diff == 0, (split, key, int(r['index']), diff)
      assert _text(r['instruction']) == e.instruction
      assert edits.EDIT_KINDS[int(r['kind'])] == e.kind
      assert world.CATEGORIES[int(r['category'])] == e.category
      assert world.split_of(e.source) == world_split
    np.testing.assert_array_equal(np.stack([r['source_image'] for r in rows]), ref.sources)
    np.testing.assert_array_equal(np.stack([r['target_image'] for r in rows]), ref.targets)
  # Edits are split by source scene.
  sources = {
    split: {world.spec_key(tb.edit_from_key(_text(r['spec'])).source) for r in rows}
    for split, rows in edit.items()
  }
  assert not sources['train'] & sources['validation']
  assert not sources['train'] & sources['test']
  assert not sources['validation'] & sources['test']
  assert {int(r['kind']) for r in edit['train']} == set(range(len(edits.EDIT_KINDS)))


def test_builds_are_deterministic(tb, t2i, edit, tmp_path):
  again = _load_all(tb, 'tiny_world_t2i', tmp_path, **T2I_SIZES)
  again_edit = _load_all(tb, 'tiny_world_edit', tmp_path, **EDIT_SIZES)
  for first, second in ((t2i, again), (edit, again_edit)):
    for split in SPLITS:
      assert len(first[split]) == len(second[split])
      for a, b in zip(first[split], second[split]):
        assert a.keys() == b.keys()
        for k in a:
          np.testing.assert_array_equal(a[k], b[k])


def test_build_and_load_reuses_data_and_accepts_val_and_batches(tb, tmp_path):
  fields = dict(image_size=SIZE, num_train=4, num_validation=2, num_test=2, subset=('portrait',))
  rows = list(tb.build_and_load('tiny_world_t2i', tmp_path, 'train', **fields))
  assert [world.CATEGORIES[int(r['category'])] for r in rows] == ['portrait'] * 4
  builder = tb.get_builder('tiny_world_t2i', tmp_path, **fields)
  info = os.path.join(builder.data_dir, 'dataset_info.json')
  stamp = os.stat(info).st_mtime_ns
  batches = list(tb.build_and_load('tiny_world_t2i', tmp_path, 'val', batch_size=2, **fields))
  assert os.stat(info).st_mtime_ns == stamp  # prepared once, then only read
  assert len(batches) == 1 and batches[0]['image'].shape == (2, SIZE, SIZE, 3)
  ref = examples.t2i_examples(0, 2, 'val', SIZE, ('portrait',))
  np.testing.assert_array_equal(batches[0]['image'], ref.images)
  assert list(tb.build_and_load('tiny_world_t2i', tmp_path, 'val[:1]', **fields))[0]['index'] == 0
  ds = tb.build_and_load('tiny_world_t2i', tmp_path, 'test', as_numpy=False, **fields)
  assert int(ds.cardinality()) == 2


def test_builder_configs(tb):
  default = tb.TinyWorldT2I.BUILDER_CONFIGS[0]
  assert (default.image_size, default.num_train, default.num_validation, default.num_test) == (
    64,
    2048,
    256,
    256,
  )
  # The predefined config is reused when the fields match it (tfds rejects lookalikes).
  assert tb.TinyWorldT2I.make_config(image_size=64) is default
  custom = tb.TinyWorldEdit.make_config(image_size=48, seed=3, subset=('glasses', 'move'))
  assert custom.name == 's48_n2048_256_256_seed3_glasses_move'
  with pytest.raises(ValueError, match='image_size'):
    tb.TinyWorldT2I.make_config(image_size=8)
  with pytest.raises(ValueError, match='num_validation'):
    tb.TinyWorldT2I.make_config(num_validation=0)
  with pytest.raises(ValueError, match="unknown names \\['animals'\\].*general"):
    tb.TinyWorldT2I.make_config(subset=('animals',))
  with pytest.raises(ValueError, match='known.*recolour'):
    tb.TinyWorldEdit.make_config(subset=('portrait',))
  with pytest.raises(TypeError, match='resolution'):
    tb.TinyWorldT2I.make_config(resolution=32)
  with pytest.raises(ValueError, match='tiny_world_t2i'):
    tb.get_builder('tiny_world_video', '/nonexistent')


def test_light_modules_do_not_import_tensorflow():
  code = (
    'import sys\n'
    'from qwen_image_rl.data import tiny_world, examples, prompt_files\n'
    'assert "tensorflow_datasets" not in sys.modules\n'
    'from qwen_image_rl.data import tfds_builders\n'
    'assert "tensorflow" not in sys.modules, "tfds_builders imported TF eagerly"\n'
  )
  subprocess.run([sys.executable, '-c', code], check=True, timeout=120)


# ---------------------------------------------------------------------------------------------
# Prompt files.
# ---------------------------------------------------------------------------------------------


def _write(tmp_path, name: str, text: str):
  path = tmp_path / name
  path.write_text(text, encoding='utf-8')
  return path


def test_read_jsonl(tmp_path):
  path = _write(
    tmp_path,
    'p.jsonl',
    '{"prompt": "a red circle", "id": 7}\n'
    '\n'
    '{"prompt": " a face ", "category": "portrait", "tags": ["x"]}\n',
  )
  assert pf.read_prompt_file(path) == [
    pf.PromptRecord('a red circle', 'general', 1, {'id': 7}),
    pf.PromptRecord('a face', 'portrait', 3, {'tags': ['x']}),
  ]


def test_read_text(tmp_path):
  path = _write(tmp_path, 'p.txt', '# my prompts\n\na sunny beach\n  the text A B  \n#x\n')
  assert pf.read_prompt_file(path) == [
    pf.PromptRecord('a sunny beach', 'general', 3),
    pf.PromptRecord('the text A B', 'general', 4),
  ]


GOOD = '{"prompt": "ok"}\n'


@pytest.mark.parametrize(
  'bad_line, message',
  [
    ('{"prompt": "unterminated}', 'malformed JSON'),
    ('["a list"]', 'expected a JSON object'),
    ('"just a string"', 'expected a JSON object'),
    ('{"text": "no prompt key"}', 'missing "prompt"'),
    ('{"prompt": "   "}', '"prompt" is empty'),
    ('{"prompt": 3}', '"prompt" must be a string'),
    ('{"prompt": "x", "category": 1}', '"category" must be a string'),
    ('{"prompt": "x", "category": null}', '"category" must be a string'),
    ('{"prompt": "x", "category": "animals"}', "unknown category 'animals'"),
  ],
)
def test_jsonl_errors_name_file_and_line(tmp_path, bad_line, message):
  path = _write(tmp_path, 'bad.jsonl', GOOD + '\n' + GOOD + bad_line + '\n' + GOOD)
  with pytest.raises(pf.PromptFileError, match=message) as err:
    pf.read_prompt_file(path)
  assert f'{path}, line 4:' in str(err.value)
  assert err.value.line == 4 and isinstance(err.value, ValueError)


def test_unknown_category_lists_known_ones(tmp_path):
  path = _write(tmp_path, 'bad.jsonl', '{"prompt": "x", "category": "Portrait"}\n')
  with pytest.raises(pf.PromptFileError) as err:
    pf.read_prompt_file(path)
  assert 'line 1' in str(err.value)
  for category in world.CATEGORIES:
    assert category in str(err.value)


def test_invalid_utf8_names_the_line(tmp_path):
  path = tmp_path / 'bad.txt'
  path.write_bytes(b'fine\n\xff\xfe broken\n')
  with pytest.raises(pf.PromptFileError, match='line 2: not valid UTF-8'):
    pf.read_prompt_file(path)


@pytest.mark.parametrize(
  'name, text',
  [('e.jsonl', ''), ('e.jsonl', '\n  \n'), ('e.txt', ''), ('e.txt', '# only a comment\n\n')],
)
def test_empty_files_are_errors(tmp_path, name, text):
  path = _write(tmp_path, name, text)
  with pytest.raises(pf.PromptFileError, match='no prompts') as err:
    pf.read_prompt_file(path)
  assert str(path) in str(err.value)


def test_missing_file(tmp_path):
  with pytest.raises(pf.PromptFileError, match='no such prompt file'):
    pf.read_prompt_file(tmp_path / 'nope.txt')


def test_write_read_round_trip(tmp_path):
  records = [
    pf.PromptRecord('a red circle', 'general', extra={'reward_range': 0.25}),
    pf.PromptRecord('ein Gesicht mit Brille \u00fc', 'portrait'),
    {'prompt': 'sand under a blue sky', 'category': 'landscape', 'source': 'user'},
    {'prompt': 'line one\nline two'},
  ]
  path = tmp_path / 'curated.jsonl'
  assert pf.write_prompt_file(path, records) == 4
  back = pf.read_prompt_file(path)
  assert back == [
    pf.PromptRecord('a red circle', 'general', 1, {'reward_range': 0.25}),
    pf.PromptRecord('ein Gesicht mit Brille \u00fc', 'portrait', 2),
    pf.PromptRecord('sand under a blue sky', 'landscape', 3, {'source': 'user'}),
    pf.PromptRecord('line one\nline two', 'general', 4),
  ]
  # Writing what was read gives the same file.
  first = path.read_bytes()
  pf.write_prompt_file(path, back)
  assert path.read_bytes() == first
  assert os.listdir(tmp_path) == ['curated.jsonl']  # no temporary files left behind


def test_write_validates_before_touching_the_file(tmp_path):
  path = tmp_path / 'curated.jsonl'
  pf.write_prompt_file(path, [pf.PromptRecord('keep me')])
  before = path.read_bytes()
  with pytest.raises(pf.PromptFileError, match="line 2: unknown category 'animals'"):
    pf.write_prompt_file(path, [pf.PromptRecord('ok'), pf.PromptRecord('cat', 'animals')])
  with pytest.raises(pf.PromptFileError, match='not JSON-serialisable'):
    pf.write_prompt_file(path, [pf.PromptRecord('ok', extra={'x': object()})])
  with pytest.raises(pf.PromptFileError, match='no records'):
    pf.write_prompt_file(path, [])
  with pytest.raises(pf.PromptFileError, match='.jsonl'):
    pf.write_prompt_file(tmp_path / 'curated.txt', [pf.PromptRecord('ok')])
  assert path.read_bytes() == before
  assert sorted(os.listdir(tmp_path)) == ['curated.jsonl']


def test_t2i_prompt_file_carries_the_scene_specs_the_oracle_reads(tmp_path):
  from qwen_image_rl.data import examples, world

  path = str(tmp_path / 'val.jsonl')
  examples.write_t2i_prompt_file(path, 0, 6, 'val', 64)
  want = examples.t2i_examples(0, 6, 'val', 64)
  records = pf.read_prompt_file(path)
  assert [r.prompt for r in records] == list(want.prompts)
  assert [r.category for r in records] == list(want.categories)
  assert [world.from_dict(r.extra['spec']) for r in records] == list(want.specs)


def test_edit_prompt_file_round_trips_the_edit_triples(tmp_path):
  want = examples.edit_examples(0, 7, 'train', 32)  # every edit kind once
  path = tmp_path / 'edits.jsonl'
  pf.write_prompt_file(
    path,
    [
      pf.PromptRecord(e.instruction, e.category, extra={'edit': edits.to_dict(e), 'range': 0.1})
      for e in want.edits
    ],
  )
  pairs = pf.read_edit_prompt_file(path)
  assert [e for _, e in pairs] == list(want.edits)
  assert [r.prompt for r, _ in pairs] == list(want.instructions)
  # The RL pool renders the sources from the specs: the same pixels as the tiny world's.
  from qwen_image_rl.rl.prompts import edit_prompts

  class Config:
    data = type('Data', (), dict(prompt_file=str(path), image_size=32))

  instructions, categories, triples, sources = edit_prompts(Config)
  assert triples == want.edits and categories == want.categories
  np.testing.assert_array_equal(sources, want.sources)


@pytest.mark.parametrize(
  'record, message',
  [
    ({'prompt': 'make it red'}, 'line 1: missing "edit"'),
    (
      {'prompt': 'make it red', 'edit': {'kind': 'recolour'}},
      "line 1: malformed \"edit\": KeyError: 'source'",
    ),
    (
      {'prompt': 'x', 'edit': {'kind': 'paint', 'source': {}, 'instruction': 'x', 'target': {}}},
      'unknown edit kind',
    ),
  ],
)
def test_edit_prompt_file_errors_name_the_line(tmp_path, record, message):
  path = tmp_path / 'edits.jsonl'
  path.write_text(json.dumps(record) + '\n')
  with pytest.raises(pf.PromptFileError, match=message):
    pf.read_edit_prompt_file(path)


def test_edit_prompt_file_category_must_be_the_sources(tmp_path):
  edit = examples.edit_examples(0, 7, 'train', 32).edits[0]
  wrong = next(c for c in world.CATEGORIES if c != edit.category)
  path = tmp_path / 'edits.jsonl'
  pf.write_prompt_file(path, [pf.PromptRecord('x', wrong, extra={'edit': edits.to_dict(edit)})])
  with pytest.raises(pf.PromptFileError, match=f"line 1: \"category\" '{wrong}' is not"):
    pf.read_edit_prompt_file(path)
  with pytest.raises(pf.PromptFileError, match='JSON lines'):
    pf.read_edit_prompt_file(tmp_path / 'edits.txt')
