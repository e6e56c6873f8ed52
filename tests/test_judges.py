"""Learned rewards: the expected-score readout, CoT / no-CoT score positions, invalid outputs,
ArcFace vs numpy, a tiny face-ID embedder's AUC, the reward registry, judge_eval's metrics, and
exact resume of reward_sft after SIGKILL."""

import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen_image_rl.data import captions
from qwen_image_rl.data import world as W
from qwen_image_rl.judges import face_id as F
from qwen_image_rl.judges import judge_data as D
from qwen_image_rl.judges import prompts as P
from qwen_image_rl.judges import vlm_judge as V
from tests import kill_and_resume, tiny_reference


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def test_expected_score_is_the_renormalised_five_token_mean():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 40)).astype(np.float32) * 3
  digits = (7, 3, 30, 12, 21)
  p = _softmax(logits[:, list(digits)].astype(np.float64))
  hand = (p * np.arange(1, 6)).sum(-1)
  np.testing.assert_allclose(
    np.asarray(V.expected_score(jnp.asarray(logits), digits)), hand, rtol=1e-6
  )
  # Logits of every other token do not matter (renormalised over the five).
  other = logits.copy()
  other[:, 0] += 50
  np.testing.assert_allclose(
    V.expected_score(jnp.asarray(other), digits),
    V.expected_score(jnp.asarray(logits), digits),
    rtol=1e-6,
  )
  # One-hot cases: a certain "5" reads 5 (reward 1), a certain "1" reads 1 (reward 0).
  sure = np.full((2, 40), -1e4, np.float32)
  sure[0, digits[4]] = sure[1, digits[0]] = 0
  np.testing.assert_allclose(V.expected_score(jnp.asarray(sure), digits), [5, 1])
  np.testing.assert_allclose(P.to_unit([5, 1, 3]), [1, 0, 0.5])


def test_score_bins_and_chain_of_thought_follow_the_rubric_order():
  assert [P.score_bin(v) for v in (0, 0.12, 0.13, 0.5, 0.87, 1)] == [1, 1, 2, 3, 4, 5]
  cot = P.chain_of_thought(
    'alignment', {'relation': 0.1, 'presence': 1.0, 'attributes': 0.7, 'count': 0.4}
  )
  assert cot == 'presence good. count poor. attributes fair. relation failed.'
  assert P.chain_of_thought(
    'instruction', {'core': 0.9, 'noncore': 0.2, 'coherent': 0.95}, 'make the sky blue'
  ).startswith('core: make the sky blue. non core')


def test_checklist_names_each_requested_item_and_fails_only_what_a_mutation_changed():
  from qwen_image_rl.data import render

  spec = W.GeneralScene(
    shapes=(
      W.Shape(kind='circle', colour='red', size='small', row=2, col=1),
      W.Shape(kind='square', colour='blue', size='large', row=0, col=0),
    ),
    relation='right of',
  )
  clean = D.t2i_labels(render.render(spec, 64), spec)['items/alignment']
  assert [item.phrase for item in clean] == [
    'count',
    'small red circle',
    'bottom',
    'large blue square',
    'top left',
    'red circle right of blue square',
  ]
  assert [item.kind for item in clean] == [
    'count',
    'shape',
    'position',
    'shape',
    'position',
    'relation',
  ]
  assert all(P.verdict(item.value) == 'good' for item in clean)
  recoloured = dataclasses.replace(
    spec, shapes=(dataclasses.replace(spec.shapes[0], colour='yellow'), spec.shapes[1])
  )
  items = {
    i.phrase: i.value for i in D.t2i_labels(render.render(recoloured, 64), spec)['items/alignment']
  }
  assert P.verdict(items['small red circle']) != 'good'
  assert P.verdict(items['large blue square']) == 'good' and P.verdict(items['top left']) == 'good'
  assert (
    P.chain_of_thought('alignment', {}, items=clean[:2]) == 'count good. small red circle good.'
  )
  # Every category's items are named in words the judge's tokenizer has (none split into pieces).
  vocabulary = set(captions.vocabulary()) | set(P.vocabulary_words())
  for category in W.CATEGORIES:
    scene = W.sample_scene(np.random.default_rng(3), category)
    for phrase, value, _ in D.t2i_labels(render.render(scene, 64), scene)['items/alignment']:
      assert set(phrase.split()) <= vocabulary, phrase
      assert P.verdict(value) == 'good', (category, phrase)


@pytest.fixture(scope='module')
def judge(tmp_path_factory):
  """A tiny random judge (the reward_sft model at toy width)."""

  from qwen_image_rl.trainers import reward_sft

  config = tiny_reference.tiny_judge_config()
  tokenizer = V.build_judge_tokenizer(str(tmp_path_factory.mktemp('tok')))
  model = reward_sft.build_model(config, tokenizer)
  params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))['params']
  return V.VLMJudge(
    model,
    jax.tree.map(np.asarray, params),
    tokenizer,
    reward_sft.build_processor(config),
    max_cot_tokens=6,
  )


def test_cot_and_no_cot_read_the_same_score_position(judge):
  tokens = judge.tokens
  prompt = judge.prompt_ids(
    'alignment', 'a red circle', judge.processor(np.zeros((64, 64, 3), np.uint8))['image_grid_thw']
  )
  cot = judge.tokenizer('presence good.')['input_ids']
  for cot_ids in ([], cot):
    train_ids, train_pos = V.assemble(prompt, cot_ids, tokens, digit=4)
    infer_ids, infer_pos = V.assemble(prompt, cot_ids, tokens)
    # Training's target digit is the token after the position inference reads.
    assert train_pos == infer_pos == len(infer_ids) - 1
    assert train_ids[train_pos + 1] == tokens.digits[3]
    assert train_ids[: len(infer_ids)] == infer_ids
    assert infer_ids[-3:] == [tokens.marker, tokens.colon, tokens.space]
  # The CoT path with an empty chain of thought is the no-CoT path, logit for logit.
  ds = D.t2i_set(3, 2, 'val', 64)
  ids, processed = judge._inputs('alignment', ds.images, list(ds.prompts), None)
  no_cot = judge.score('alignment', ds.images, list(ds.prompts), cot=False)
  logits = judge.read_logits([V.assemble(p, [], tokens)[0] for p in ids], processed)
  np.testing.assert_allclose(no_cot.expected, V.expected_score(logits, tokens.digits), rtol=1e-5)
  assert no_cot.valid.all() and np.all((no_cot.expected >= 1) & (no_cot.expected <= 5))


def test_outputs_without_a_score_marker_are_invalid_nan_and_counted(judge):
  # All-zero weights: every logit ties, greedy picks token 0, never the " Score" marker.
  zero = V.VLMJudge(
    judge.model,
    jax.tree.map(np.zeros_like, judge.params),
    judge.tokenizer,
    judge.processor,
    max_cot_tokens=4,
  )
  assert zero.tokens.marker != 0 and zero.tokens.im_end != 0
  ds = D.t2i_set(3, 2, 'val', 64)
  out = zero.score('alignment', ds.images, list(ds.prompts), cot=True)
  assert out.invalid_count == len(ds) and np.isnan(out.reward).all()
  assert not np.isnan(zero.score('alignment', ds.images, list(ds.prompts), cot=False).reward).any()
  # Parsing: a marker ends the CoT; none, or <|im_end|> before it, is invalid.
  t = judge.tokens
  cots, valid = V.parse_cot([[5, 6, t.marker, t.pad], [5, 6, 7, 8], [5, t.im_end, t.marker, 0]], t)
  assert valid.tolist() == [True, False, False] and cots == [[5, 6], [], []]


def test_judge_reward_reports_invalid_as_nan_and_keeps_neutral_for_other_categories():
  from qwen_image_rl.rewards.base import RewardBatch, nan_counts
  from qwen_image_rl.rewards.registry import make_reward

  def scorer(task, images, prompts, sources, cot):
    n = len(images)
    valid = np.arange(n) % 2 == 0
    return V.JudgeOutput(
      expected=np.full(n, 4.0), reward=np.where(valid, 0.75, np.nan), valid=valid, cot=[''] * n
    )

  images = np.zeros((3, 16, 16, 3), np.uint8)
  batch = RewardBatch(
    images=images,
    prompts=['a', 'b', 'c'],
    categories=['portrait', 'general', 'portrait'],
    sample_ids=np.arange(3),
  )
  scores = make_reward('judge_portrait', scorer=scorer)(batch)['judge_portrait']
  np.testing.assert_array_equal(scores[:2], [0.75, 0.5])  # 2nd: not a portrait -> neutral
  assert np.isnan(scores[2]) and nan_counts({'x': scores}) == {'x': 1}
  with pytest.raises(ValueError, match='exactly one of judge_dir'):
    make_reward('judge_alignment')
  with pytest.raises(FileNotFoundError, match='not a judge directory'):
    make_reward('judge_alignment', judge_dir='/nonexistent/export/judge')


def test_rl_config_on_a_judge_replaces_every_oracle_reward():
  from configs import rl_t2i
  from qwen_image_rl import trainers

  oracle = rl_t2i.get_config('tiny')
  for variant, cot in (('judge', True), ('judge_no_cot', False)):
    c = rl_t2i.get_config(f'{variant}=runs/j/export/judge')
    assert c.rewards.names == ('judge_alignment', 'judge_aesthetics', 'judge_portrait')
    assert all(
      c.rewards.kwargs[n].to_dict() == dict(judge_dir='runs/j/export/judge', cot=cot)
      for n in c.rewards.names
    )
    assert c.rl.objective == oracle.rl.objective and c.total_steps == oracle.total_steps
    assert (
      c.rl.category_weights.portrait.judge_portrait == oracle.rl.category_weights.portrait.portrait
    )
    trainers.validate(c)
  for bad in ('judge', 'judge=', 'tiny_judge=x'):
    with pytest.raises(ValueError, match='unknown variant'):
      rl_t2i.get_config(bad)


def test_reward_registry_names():
  from qwen_image_rl.rewards.registry import known_rewards

  assert {
    'judge_alignment',
    'judge_aesthetics',
    'judge_portrait',
    'judge_instruction',
    'face_id',
  } <= set(known_rewards())


def _arcface_reference(emb, centres, labels, scale, margin):
  emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
  centres = centres / np.linalg.norm(centres, axis=0, keepdims=True)
  cos = emb @ centres
  logits = scale * cos.copy()
  for i, y in enumerate(labels):
    theta = np.arccos(np.clip(cos[i, y], -1, 1))
    logits[i, y] = scale * (
      np.cos(theta + margin) if theta + margin <= np.pi else cos[i, y] - margin * np.sin(margin)
    )
  logits -= logits.max(1, keepdims=True)
  logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
  return -logp[np.arange(len(labels)), labels].mean()


def test_arcface_loss_matches_numpy():
  rng = np.random.default_rng(0)
  emb, centres = rng.normal(size=(6, 8)), rng.normal(size=(8, 5))
  labels = np.array([0, 1, 4, 2, 3, 0])
  centres[:, 2] = -emb[2] / np.linalg.norm(emb[2])  # theta ~ pi: the fallback branch
  for scale, margin in ((16.0, 0.3), (4.0, 0.5)):
    ours = F.arcface_loss(
      jnp.asarray(emb, jnp.float32),
      jnp.asarray(centres, jnp.float32),
      jnp.asarray(labels),
      scale=scale,
      margin=margin,
    )
    np.testing.assert_allclose(
      float(ours), _arcface_reference(emb, centres, labels, scale, margin), rtol=1e-4
    )
  assert float(
    F.arcface_loss(
      jnp.asarray(emb, jnp.float32),
      jnp.asarray(centres, jnp.float32),
      jnp.asarray(labels),
      scale=16.0,
      margin=0.3,
    )
  ) > float(
    F.arcface_loss(
      jnp.asarray(emb, jnp.float32),
      jnp.asarray(centres, jnp.float32),
      jnp.asarray(labels),
      scale=16.0,
      margin=0.0,
    )
  )


def test_auc_matches_pair_counting():
  pos, neg = np.array([0.9, 0.5, 0.3]), np.array([0.4, 0.3, 0.1, 0.95])
  pairs = [(p > n) + 0.5 * (p == n) for p in pos for n in neg]
  assert F.auc(pos, neg) == pytest.approx(np.mean(pairs))


def _tiny_face_id():
  from configs import face_id

  c = face_id.get_config('tiny')
  c.total_steps = 40
  c.data.batch_size = 32
  c.model.widths = (16, 32, 32)
  c.model.dim = 32
  c.eval.num_pairs = 128
  c.checkpoint.every = 10
  c.log.every = 10
  return c


def test_face_id_embedder_separates_held_out_identities(tmp_path):
  from qwen_image_rl import main

  results = main.run(_tiny_face_id(), str(tmp_path))
  assert results['auc_clean'] > 0.85 and results['auc_blurred'] > 0.8, results
  scorer = F.FaceIdScorer.load(str(tmp_path / 'export' / 'face_id'))
  a, b, same = F.identity_pairs(F.HELD_OUT, 64, 5, 64, None)
  cos = scorer.cosine(a, b)
  assert F.auc(cos[same], cos[~same]) > 0.8  # the exported embedder, on fresh pairs
  reward = scorer.reward(a, b)
  assert reward.min() >= 0 and reward.max() <= 1


def test_face_id_reward_and_bad_directory(tmp_path):
  from qwen_image_rl.rewards.registry import make_reward

  with pytest.raises(FileNotFoundError, match='lacks'):
    make_reward('face_id', embedder_dir=str(tmp_path))


def test_correlation_metrics_against_scipy_and_counts():
  from scipy import stats

  from qwen_image_rl import judge_eval

  oracle = np.array([0.1, 0.9, 0.5, 0.5, 0.8, 0.2])
  judge = np.array([0.2, 0.7, np.nan, 0.4, 0.9, 0.1])
  out = judge_eval.correlation_metrics(judge, oracle, groups=2)
  ok = ~np.isnan(judge)
  assert out['invalid'] == 1 and out['n'] == 6
  assert out['spearman'] == pytest.approx(stats.spearmanr(judge[ok], oracle[ok])[0])
  # Pairs (0,1) right, (2,3) a tie (skipped), (4,5) right.
  assert out['pairs'] == 2 and out['pairwise_accuracy'] == 1.0
  # exact_renders: the Spearman over the images without pixel or face corruption alone.
  kinds = ['clean', 'pixel', 'semantic', 'semantic', 'unrelated', 'face']
  exact = judge_eval.agreement(judge, oracle, 2, kinds)['exact_renders']
  rows = np.array([0, 3, 4])  # (2 is an invalid output)
  assert exact['n'] == 3
  assert exact['spearman'] == pytest.approx(stats.spearmanr(judge[rows], oracle[rows])[0], abs=1e-4)


def _tiny_judge_config():
  from configs import judge

  c = judge.get_config('tiny')
  c.total_steps = 6
  c.model.text = tiny_reference.tiny_judge_config().model.text.to_dict()
  c.model.vision.update(depth=1, hidden_size=32, intermediate_size=32, fullatt_block_indexes=(0,))
  c.data.update(n_specs=8, n_edits=4, t2i_batch_size=4, edit_batch_size=2, caption_batch_size=2)
  c.perception.update(steps=2, batch_size=4, n_images=8)
  c.checkpoint.every = 2
  c.checkpoint.async_save = False
  c.log.every = 2
  return c


def test_caption_examples_target_exactly_the_scene_caption(judge):
  from qwen_image_rl.trainers import reward_sft

  c = _tiny_judge_config()
  grid = judge.processor(np.zeros((64, 64, 3), np.uint8))['image_grid_thw']
  batcher = reward_sft.CaptionBatcher(c, judge, grid)
  batch = batcher(3)
  rng = np.random.default_rng([c.seed, 3, 1])
  rows = rng.choice(len(batcher.captions), c.data.caption_batch_size)
  for i, row in enumerate(rows):
    target = batch['caption/input_ids'][i][batch['caption/weights'][i] > 0].tolist()
    assert target[-1] == judge.tokens.im_end
    assert judge.tokenizer.decode(target[:-1]) == batcher.captions[row]
    # The prompt (with its image tokens) carries no loss.
    prompt = batch['caption/input_ids'][i][: len(batcher.prompt)]
    assert np.all(batch['caption/weights'][i][: len(batcher.prompt)] == 0)
    assert (prompt == judge.model.image_token_id).sum() == int(grid.prod()) // 4
  again = batcher(3)
  assert all(np.array_equal(batch[k], again[k]) for k in batch)
  assert not np.array_equal(batch['caption/input_ids'], batcher(4)['caption/input_ids'])


def test_corrupted_draws_record_the_scene_they_show():
  from qwen_image_rl.data import render

  t2i = D.t2i_set(0, 48, 'train', 64, 2)
  assert {'clean', 'semantic', 'unrelated', 'pixel'} <= set(t2i.kinds)
  for i, kind in enumerate(t2i.kinds):
    shown = t2i.shown[i]
    if kind in ('clean', 'semantic', 'unrelated'):  # no pixel corruption: the image IS its render
      np.testing.assert_array_equal(t2i.images[i], render.render(shown, 64))
    if kind in ('clean', 'pixel', 'face'):
      assert shown == t2i.specs[i]
    if kind == 'unrelated':
      assert shown != t2i.specs[i]
  edits = D.edit_set(0, 24, 'train', 64, 2)
  assert 'source' in edits.kinds
  for i, kind in enumerate(edits.kinds):
    if kind == 'source':  # the edit not done
      np.testing.assert_array_equal(edits.images[i], edits.sources[i])


def test_variant_weights_rescale_the_mix_and_all_ones_change_nothing():
  base = D.t2i_set(0, 16, 'train', 64, 2)
  same = D.t2i_set(0, 16, 'train', 64, 2, mix=dict.fromkeys(D.VARIANTS, 1.0))
  assert same.kinds == base.kinds and np.array_equal(same.images, base.images)
  probs = D.variant_probs('general', {'unrelated': 5.0, 'semantic': 2.0})
  want = np.array(D.VARIANT_PROBS) * [1, 1, 2, 1, 1, 5]
  np.testing.assert_allclose(probs, want / want.sum())
  heavy = D.t2i_set(0, 200, 'train', 64, 2, mix={'unrelated': 20.0})
  assert heavy.kinds.count('unrelated') > 3 * max(1, base.kinds.count('unrelated'))
  with pytest.raises(ValueError, match='unknown judge data variants'):
    D.variant_probs('general', {'blurry': 2.0})
  with pytest.raises(ValueError, match='must be >= 0'):
    D.variant_probs('general', {'unrelated': -1.0})


def test_describe_in_cot_puts_the_shown_scene_before_the_verdicts(judge):
  from qwen_image_rl.trainers import reward_sft

  c = _tiny_judge_config()
  c.data.describe_in_cot = True
  t2i, edits = D.t2i_set(0, 8, 'train', 64, 2), D.edit_set(0, 4, 'train', 64, 2)
  batcher = reward_sft.Batcher(c, judge, t2i, edits)
  mutated = [i for i, k in enumerate(t2i.kinds) if k in ('semantic', 'unrelated')]
  assert mutated
  for row in batcher.rows['alignment']:
    text = judge.tokenizer.decode(batcher.cot_ids('alignment', row))
    described = D.describe(t2i.shown[row])
    assert text.startswith(described + '.')
    assert text[len(described) + 1 :].strip() == P.chain_of_thought(
      'alignment', t2i.labels[row]['dims/alignment']
    )
    if row in mutated and t2i.shown[row] != t2i.specs[row]:
      assert described != D.describe(t2i.specs[row])  # the scene drawn, not the one asked for
  c = _tiny_judge_config()
  assert not c.data.describe_in_cot
  plain = reward_sft.Batcher(c, judge, t2i, edits)
  row = batcher.rows['alignment'][0]
  assert judge.tokenizer.decode(plain.cot_ids('alignment', row)) == P.chain_of_thought(
    'alignment', t2i.labels[row]['dims/alignment']
  )
  # Aesthetics and portrait never describe; instruction describes the source, then the output.
  assert batcher.cot_ids('aesthetics', row) == plain.cot_ids('aesthetics', row)
  for row in range(len(edits)):
    text = judge.tokenizer.decode(batcher.cot_ids('instruction', row))
    before, after = D.describe(edits.edits[row].source), D.describe(edits.shown[row])
    assert f'keep the rest. {before}. {after}. core ' in text
    if edits.kinds[row] == 'source':
      assert before == after


def test_checklist_style_writes_the_alignment_cot_item_by_item(judge):
  from qwen_image_rl.trainers import reward_sft

  c = _tiny_judge_config()
  c.data.cot_style = 'checklist'
  t2i, edits = D.t2i_set(0, 8, 'train', 64, 2), D.edit_set(0, 4, 'train', 64, 2)
  checklist = reward_sft.Batcher(c, judge, t2i, edits)
  plain = reward_sft.Batcher(_tiny_judge_config(), judge, t2i, edits)
  for row in checklist.rows['alignment']:
    items = t2i.labels[row]['items/alignment']
    text = judge.tokenizer.decode(checklist.cot_ids('alignment', row))
    assert text == ' '.join(f'{phrase} {P.verdict(v)}.' for phrase, v, _ in items)
  # Only alignment changes style.
  row = checklist.rows['aesthetics'][0]
  assert checklist.cot_ids('aesthetics', row) == plain.cot_ids('aesthetics', row)
  assert checklist.cot_ids('instruction', 0) == plain.cot_ids('instruction', 0)


def _describing(judge):
  return V.VLMJudge(
    judge.model, judge.params, judge.tokenizer, judge.processor, describe_first=True
  )


def test_describe_first_training_prompts_name_the_scene_each_image_shows(judge):
  from qwen_image_rl.data import captions
  from qwen_image_rl.trainers import reward_sft

  c = _tiny_judge_config()
  c.judge.describe_first = True
  t2i, edits = D.t2i_set(5, 40, 'train', 64, 2), D.edit_set(0, 4, 'train', 64, 2)
  batcher = reward_sft.Batcher(c, _describing(judge), t2i, edits)
  plain = reward_sft.Batcher(_tiny_judge_config(), judge, t2i, edits)
  texts = [s for s in t2i.shown if s.category == 'typography']
  checked = 0
  for row in batcher.rows['alignment']:
    given = batcher.given('alignment', row)
    assert given and given == batcher.given('alignment', row)
    prompt = judge.tokenizer.decode(batcher._example('alignment', row, cot=False)[0])
    assert f'\n{P.SEEN_LABEL}: {given}<|im_end|>' in prompt
    shown, asked = t2i.shown[row], t2i.specs[row]
    if shown.category == 'typography':
      assert captions.glyph_words(shown.text) in given
      if shown.text != asked.text and captions.glyph_words(asked.text) not in (
        captions.glyph_words(shown.text)
      ):
        assert captions.glyph_words(asked.text) not in given  # what is drawn, not asked
        checked += 1
  assert texts and checked
  # Only alignment and instruction are described; an edit names its source, then its output.
  row = batcher.rows['aesthetics'][0]
  assert batcher.given('aesthetics', row) == ''
  assert batcher._example('aesthetics', row, True)[0] == plain._example('aesthetics', row, True)[0]
  for row in range(len(edits)):
    given = batcher.given('instruction', row)
    assert given.startswith('source ') and '. output ' in given


def test_language_pretraining_compares_texts_of_exact_renders_and_leaves_the_tower(judge):
  from qwen_image_rl import config_lib
  from qwen_image_rl.trainers import reward_sft

  c = _tiny_judge_config()
  c.judge.describe_first = True
  c.language.update(steps=3, batch_size=4)
  t2i, edits = D.t2i_set(5, 24, 'train', 64, 2), D.edit_set(0, 12, 'train', 64, 2)
  describing = _describing(judge)
  batcher = reward_sft.Batcher(c, describing, t2i, edits)
  picks = batcher.text_picks(7, 6)
  batch = batcher.text_batch(7, 6)
  assert [p[0] for p in picks] == ['alignment'] * 3 + ['instruction'] * 3
  for i, (task, row, cot, seen) in enumerate(picks):
    data = edits if task == 'instruction' else t2i
    assert data.kinds[row] in reward_sft.TEXT_KINDS  # no pixel or face corruption
    assert batch['score_target'][i] == pytest.approx(1 + 4 * data.labels[row][task])
    ids = batch['input_ids'][i][batch['attention_mask'][i] > 0]
    assert f'\n{P.SEEN_LABEL}: {seen}<|im_end|>' in judge.tokenizer.decode(ids)
    images = P.NUM_IMAGES[task] * int(batcher.grid.prod()) // judge.processor.merge_size**2
    assert (ids == judge.model.image_token_id).sum() == images
    assert (batch['weights'][i] > 0).sum() > (0 if not cot else 3)
  again = batcher.text_batch(7, 6)
  assert all(np.array_equal(batch[k], again[k]) for k in batch)
  assert not np.array_equal(batch['input_ids'], batcher.text_batch(8, 6)['input_ids'])
  # Only the language model moves.
  params = nn.meta.unbox(judge.params)
  c.language.lr = 1e-2
  trained = reward_sft.pretrain_language(params, judge.model, batcher, c, log=lambda _: None)
  np.testing.assert_array_equal(
    jax.tree.leaves(trained['visual'])[0], jax.tree.leaves(params['visual'])[0]
  )
  moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()), trained, params)
  assert min(jax.tree.leaves({k: v for k, v in moved.items() if k != 'visual'})) > 0
  c = _tiny_judge_config()
  c.language.steps = 5
  with pytest.raises(config_lib.ConfigError, match='needs config.judge.describe_first=True'):
    reward_sft.validate(c)


def test_balanced_drills_and_lookup_pretraining_read_the_verdict_they_train(judge):
  from qwen_image_rl import config_lib
  from qwen_image_rl.trainers import reward_sft

  c = _tiny_judge_config()
  c.data.update(cot_style='checklist', drill_batch_size=6, drill_balance=True)
  c.lookup.update(steps=3, batch_size=6, lr=1e-2, held_out_batches=1)
  reward_sft.validate(c)
  t2i = D.t2i_set(1, 6, 'train', 64, 2)
  grid = judge.processor(t2i.images[0])['image_grid_thw']
  drills = reward_sft.DrillBatcher(c, judge, t2i, grid)
  verdicts = dict(zip(judge.verdict_ids, (w for _, w in P.VERDICTS)))
  for step in range(4):
    batch = drills(step)
    targets = batch['drill/input_ids'][batch['drill/weights'] > 0]
    assert [verdicts[t] == 'good' for t in targets] == [True] * 3 + [False] * 3
    assert [drills.is_good(r, k) for r, k in drills.picks(step)] == [True] * 3 + [False] * 3
  np.testing.assert_array_equal(drills(3)['drill/input_ids'], batch['drill/input_ids'])
  # Drills of exact renders only; fresh scenes each step, a pure function of (seed, step).
  exact = reward_sft.DrillBatcher(c, judge, t2i, grid, 6, True, exact_only=True)
  assert {t2i.kinds[r] for r, _ in exact.picks(0)} <= set(D.EXACT_RENDER_KINDS)
  assert {t2i.kinds[r] for r in exact.rows} == set(t2i.kinds) & set(D.EXACT_RENDER_KINDS)
  fresh = reward_sft.FreshDrillBatcher(c, judge, grid, 6, drills.length, D.EXACT_RENDER_MIX)
  first, again = fresh.drills(4), fresh.drills(4)
  assert first.t2i.prompts == again.t2i.prompts != fresh.drills(5).t2i.prompts
  assert set(first.t2i.kinds) <= set(D.EXACT_RENDER_KINDS)
  assert all(W.split_of(spec) == 'train' for spec in first.t2i.specs)
  np.testing.assert_array_equal(fresh(4)['drill/input_ids'], fresh(4)['drill/input_ids'])
  assert fresh(4)['drill/input_ids'].shape == (6, drills.length)
  # p(good) is read at the position that predicts each drill's verdict.
  params = nn.meta.unbox(judge.params)
  layout = reward_sft.repeated_layout(judge.model, grid, 6)
  logits_fn = lambda p, b: reward_sft.logits_of(judge.model, p, b, 'drill/', layout)
  p_good = reward_sft.drill_p_good(logits_fn, jnp.asarray(judge.verdict_ids), params, batch)
  logits = np.asarray(logits_fn(params, batch), np.float64)
  for i, at in enumerate(np.argmax(batch['drill/weights'], 1)):
    z = logits[i, at - 1, judge.verdict_ids]
    assert p_good[i] == pytest.approx(np.exp(z[0] - np.logaddexp.reduce(z)), rel=1e-4)
  # The stage moves the language model and the merger, never the tower.
  trained = reward_sft.pretrain_lookup(params, judge.model, drills, drills, c, log=lambda _: None)
  before = dict(jax.tree_util.tree_flatten_with_path(params)[0])
  for path, leaf in jax.tree_util.tree_flatten_with_path(trained)[0]:
    moved = float(np.abs(np.asarray(leaf) - before[path]).max()) > 0
    frozen = 'visual' in str(path[0]) and 'merger' not in str(path[1])
    assert moved != frozen, jax.tree_util.keystr(path)
  c.data.drill_batch_size = 0
  with pytest.raises(config_lib.ConfigError, match='drill_balance balances'):
    reward_sft.validate(c)
  c = _tiny_judge_config()
  c.lookup.steps = -1
  with pytest.raises(config_lib.ConfigError, match='lookup.steps=-1'):
    reward_sft.validate(c)
  c.lookup.steps, c.judge.describe_first = 5, True
  with pytest.raises(config_lib.ConfigError, match='caption line the drills lack'):
    reward_sft.validate(c)


def test_describe_first_judges_score_with_their_own_captions(judge, monkeypatch, tmp_path):
  from qwen_image_rl import judge_eval

  describing = _describing(judge)
  t2i, edits = D.t2i_set(3, 2, 'val', 64), D.edit_set(3, 1, 'val', 64)
  asked = []

  def fake_describe(images):
    asked.append(len(images))
    return [f'a caption {i}' for i in range(len(images))]

  monkeypatch.setattr(describing, 'describe', fake_describe)
  grid = judge.processor(np.zeros((64, 64, 3), np.uint8))['image_grid_thw']
  ids, _ = describing._inputs('alignment', t2i.images, list(t2i.prompts), None)
  assert ids == [
    describing.prompt_ids('alignment', p, grid, f'a caption {i}') for i, p in enumerate(t2i.prompts)
  ]
  ids, _ = describing._inputs('instruction', edits.images, list(edits.prompts), edits.sources)
  grids = np.repeat(grid, 2, axis=0)
  want = P.seen_text('instruction', ['a caption 0', 'a caption 1'])
  assert ids[0] == describing.prompt_ids('instruction', edits.prompts[0], grids, want)
  assert want == 'source a caption 0. output a caption 1'
  describing._inputs('aesthetics', t2i.images, list(t2i.prompts), None)
  judge._inputs('alignment', t2i.images, list(t2i.prompts), None)
  assert asked == [len(t2i), 2 * len(edits)]  # neither aesthetics nor a plain judge describes
  # Descriptions given (judge_eval --captions=true) replace the captioning pass.
  given = ['the truth', 'more truth']
  ids, _ = describing._inputs('alignment', t2i.images, list(t2i.prompts), None, given)
  assert len(asked) == 2 and ids[1] == describing.prompt_ids(
    'alignment', t2i.prompts[1], grid, given[1]
  )
  with pytest.raises(ValueError, match='does not read them'):
    judge.score('alignment', t2i.images, list(t2i.prompts), seen=given)
  with pytest.raises(ValueError, match='needs a describe_first judge'):
    judge_eval.evaluate_judge(judge, t2i, edits, ('no_cot',), true_captions=True)
  # The real captioning pass returns text cut at max_caption_tokens; the setting is exported.
  real = V.VLMJudge(
    judge.model,
    nn.meta.unbox(judge.params),
    judge.tokenizer,
    judge.processor,
    describe_first=True,
    max_caption_tokens=3,
  )
  out = real.describe(t2i.images)
  assert len(out) == len(t2i) and all(len(judge.tokenizer(c)['input_ids']) <= 3 for c in out)
  real.save(str(tmp_path / 'j'))
  loaded = V.VLMJudge.load(str(tmp_path / 'j'))
  assert loaded.describe_first and loaded.max_caption_tokens == 3


def test_caption_loss_reads_the_judge_with_right_other_and_blank_images(judge):
  from qwen_image_rl import judge_eval

  params = nn.meta.unbox(judge.params)
  plain = V.VLMJudge(judge.model, params, judge.tokenizer, judge.processor)
  out = judge_eval.caption_loss(plain, 'val', 4, seed=1)
  assert set(out) == {'right', 'other', 'blank'}
  assert all(np.isfinite(v) and v > 0 for v in out.values())
  assert out['right'] != out['blank']  # the image reaches the caption's logits
  assert judge_eval.caption_loss(plain, 'val', 4, seed=1) == out


def _plain(judge):
  params = nn.meta.unbox(judge.params)
  return V.VLMJudge(judge.model, params, judge.tokenizer, judge.processor)


def test_verdict_probabilities_read_each_items_verdict_position(judge):
  from qwen_image_rl import judge_eval

  plain = _plain(judge)
  t2i = D.t2i_set(1, 3, 'val', 64, 2)
  truths, kinds, probs = judge_eval.verdict_probabilities(plain, t2i, batch=4)
  items = [item for row in range(len(t2i)) for item in t2i.labels[row]['items/alignment']]
  assert list(kinds) == [item.kind for item in items]
  assert list(truths) == [P.verdict(item.value) for item in items]
  np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
  # The last item of image 0: its p equals the verdict distribution read after its phrase.
  row_items = t2i.labels[0]['items/alignment']
  grid = plain.processor(t2i.images[0])['image_grid_thw']
  prompt = plain.prompt_ids('alignment', t2i.prompts[0], grid)
  before = P.chain_of_thought('alignment', {}, items=row_items).rsplit(' ', 1)[0]
  logits = plain.read_logits(
    [prompt + plain.tokenizer(before)['input_ids']], plain.processor([t2i.images[0]])
  )[0]
  ids = [plain.tokenizer(f' {w}')['input_ids'][0] for _, w in P.VERDICTS]
  expected = np.exp(logits[ids] - logits[ids].max())
  np.testing.assert_allclose(
    probs[len(row_items) - 1], expected / expected.sum(), rtol=1e-3, atol=1e-5
  )
  summary = judge_eval.verdict_reading(plain, t2i)
  assert summary['n'] == len(items) and set(summary['by_item']) == set(kinds)
  # Read alone: the same items, each after the prompt and its phrase only.
  truths_alone, kinds_alone, alone = judge_eval.verdicts_alone(plain, t2i, batch=4)
  assert list(truths_alone) == list(truths) and list(kinds_alone) == list(kinds)
  last = row_items[-1].phrase
  logits = plain.read_logits(
    [prompt + plain.tokenizer(last)['input_ids']], plain.processor([t2i.images[0]])
  )[0]
  expected = np.exp(logits[ids] - logits[ids].max())
  np.testing.assert_allclose(
    alone[len(row_items) - 1], expected / expected.sum(), rtol=1e-3, atol=1e-5
  )
  assert not np.allclose(alone, probs)  # the chain before an item changes its verdict


def test_true_items_chain_names_the_prompts_items_in_order_and_reads_its_score(judge):
  from qwen_image_rl import judge_eval

  plain = _plain(judge)
  t2i = D.t2i_set(1, 2, 'val', 64, 2)
  plain.batch_size = 3
  rewards, chains = judge_eval.score_with_true_items(plain, t2i)
  verdicts = {w for _, w in P.VERDICTS}
  for row, chain in enumerate(chains):
    items = t2i.labels[row]['items/alignment']
    written = [part.rsplit(' ', 1) for part in chain.strip().rstrip('.').split('. ')]
    assert [phrase for phrase, _ in written] == [item.phrase for item in items]
    assert {v for _, v in written} <= verdicts
  # The reward is the expected score read after that chain, as VLMJudge reads any chain.
  grid = plain.processor(t2i.images[0])['image_grid_thw']
  prompt = plain.prompt_ids('alignment', t2i.prompts[0], grid)
  seq = V.assemble(prompt, plain.tokenizer(chains[0])['input_ids'], plain.tokens)[0]
  logits = plain.read_logits([seq], plain.processor([t2i.images[0]]))
  expected = V.readout(np.asarray(V.score_logprobs(logits, plain.tokens.digits)), 'unit')
  np.testing.assert_allclose(rewards[0], expected[0], rtol=1e-4)
  plain.batch_size = 32  # one chunk: the same rewards
  np.testing.assert_allclose(judge_eval.score_with_true_items(plain, t2i)[0], rewards, rtol=1e-5)
  # The oracle's whole chain, verdicts included, read the same way.
  oracle_chain = judge_eval.score_with_oracle_chain(plain, t2i, batch=3)
  chain = P.chain_of_thought('alignment', {}, items=t2i.labels[1]['items/alignment'])
  prompt = plain.prompt_ids('alignment', t2i.prompts[1], grid)
  seq = V.assemble(prompt, plain.tokenizer(chain)['input_ids'], plain.tokens)[0]
  logits = plain.read_logits([seq], plain.processor([t2i.images[1]]))
  expected = V.readout(np.asarray(V.score_logprobs(logits, plain.tokens.digits)), 'unit')
  np.testing.assert_allclose(oracle_chain[1], expected[0], rtol=1e-4)


def test_items_text_round_trips_and_refuses_phrases_it_could_not_parse():
  phrases = ['count', 'small red circle', 'top left', 'K', 'red circle left of blue square']
  text = P.items_text(phrases)
  assert text == 'count. small red circle. top left. K. red circle left of blue square.'
  assert P.parse_items(text) == phrases and P.parse_items('') == []
  for bad in ('', 'a.b', 'Score'):
    with pytest.raises(ValueError, match='item phrase'):
      P.items_text(['count', bad])
  assert P.DECOMPOSE_REQUEST in P.decompose_prompt('a red circle')
  assert '<|image_pad|>' not in P.decompose_prompt('a red circle')  # text only


def _decomposing(judge, **kw):
  params = nn.meta.unbox(judge.params)
  return V.VLMJudge(judge.model, params, judge.tokenizer, judge.processor, decompose=True, **kw)


def test_decomposition_examples_answer_each_prompt_with_its_items_text_only(judge):
  from qwen_image_rl import config_lib
  from qwen_image_rl.trainers import reward_sft

  c = _tiny_judge_config()
  c.data.update(cot_style='checklist', decompose_batch_size=3)
  c.judge.decompose = True
  reward_sft.validate(c)
  t2i = D.t2i_set(1, 6, 'train', 64, 2)
  decomposer = reward_sft.DecomposeBatcher(c, judge, t2i)
  assert len(decomposer.prompts) == len(set(t2i.prompts))
  batch = decomposer(5)
  assert not any('pixel' in k for k in batch)
  ids, weights = batch['decompose/input_ids'], batch['decompose/weights']
  assert ids.shape == (3, decomposer.length) and not (ids == judge.model.image_token_id).any()
  truth = {t2i.prompts[r]: t2i.labels[r]['items/alignment'] for r in range(len(t2i))}
  for row in range(3):
    text = judge.tokenizer.decode(ids[row][batch['decompose/attention_mask'][row] == 1])
    prompt = text.split('prompt: ', 1)[1].split('<|im_end|>', 1)[0]
    answer = judge.tokenizer.decode(ids[row][weights[row] == 1])
    assert answer == P.items_text([i.phrase for i in truth[prompt]]) + '<|im_end|>'
  # Text only: plain positions on all three mRoPE streams.
  positions = batch['decompose/position_ids']
  np.testing.assert_array_equal(positions[0], positions[2])
  np.testing.assert_array_equal(
    batch['decompose/input_ids'],
    reward_sft.DecomposeBatcher(c, judge, t2i)(5)['decompose/input_ids'],
  )
  with pytest.raises(ValueError, match='max_item_tokens=4'):
    reward_sft.DecomposeBatcher(c, _decomposing(judge, max_item_tokens=4), t2i)
  c = _tiny_judge_config()
  c.judge.decompose = True
  with pytest.raises(config_lib.ConfigError, match='decompose_batch_size=0'):
    reward_sft.validate(c)
  c.data.decompose_batch_size = 2
  with pytest.raises(config_lib.ConfigError, match="cot_style='checklist'"):
    reward_sft.validate(c)


def test_decomposed_items_parse_at_im_end_and_answers_without_it_are_invalid(judge, monkeypatch):
  dec = _decomposing(judge)
  t = dec.tokens
  answer = dec.tokenizer(P.items_text(['count', 'small red circle']))['input_ids']
  rows = np.array(
    [answer + [t.im_end, t.pad], answer + [5, 5], [t.im_end] + [t.pad] * (len(answer) + 1)]
  )
  monkeypatch.setattr(dec, 'generate_rows', lambda *a, **k: rows)
  items, valid = dec.items_of(['a', 'b', 'c'])
  assert items[0] == ['count', 'small red circle'] and valid.tolist() == [True, False, False]
  # An invalid decomposition makes the alignment reward NaN; the others still score.
  ds = D.t2i_set(3, 2, 'val', 64)
  out = dec.score('alignment', ds.images[:3], ['a', 'b', 'c'], cot=True)
  assert out.valid.tolist() == [True, False, False]
  assert np.isfinite(out.reward[0]) and np.isnan(out.reward[1:]).all()


def test_checklist_verdicts_are_greedy_or_drawn_from_the_verdict_softmax(judge, monkeypatch):
  dec = _decomposing(judge)
  ids = dec.verdict_ids
  logits = np.full((1, max(ids) + 1), -1e9, np.float32)
  logits[0, ids] = np.log([0.6, 0.1, 0.1, 0.2])
  monkeypatch.setattr(dec, 'read_logits', lambda seqs, processed: np.repeat(logits, len(seqs), 0))
  items = [['count', 'small red circle']] * 400
  greedy = dec.fill_checklist([[1]] * 400, None, items)
  assert all(dec.tokenizer.decode(c) == 'count good. small red circle good.' for c in greedy[:2])
  drawn = dec.fill_checklist([[1]] * 400, None, items, np.random.default_rng(0))
  picked = np.array([[c.count(v) for v in ids] for c in drawn]).sum(0) / 800
  np.testing.assert_allclose(picked, [0.6, 0.1, 0.1, 0.2], atol=0.04)


def test_item_drills_hold_one_item_and_train_only_its_verdict(judge):
  from qwen_image_rl import config_lib
  from qwen_image_rl.trainers import reward_sft

  c = _tiny_judge_config()
  c.data.update(cot_style='checklist', drill_batch_size=5)
  reward_sft.validate(c)
  t2i = D.t2i_set(1, 4, 'train', 64, 2)
  grid = judge.processor(t2i.images[0])['image_grid_thw']
  drills = reward_sft.DrillBatcher(c, judge, t2i, grid)
  batch = drills(3)
  assert batch['drill/pixel_values'].shape[0] == 5 * int(grid.prod())
  assert (batch['drill/weights'].sum(1) == 1).all()  # one target a row: the verdict
  verdicts = dict(zip(judge.verdict_ids, (w for _, w in P.VERDICTS)))
  for row in range(len(t2i)):
    for k, item in enumerate(t2i.labels[row]['items/alignment']):
      ids, weights = drills._drill(row, k)
      (at,) = np.flatnonzero(weights)
      assert verdicts[ids[at]] == P.verdict(item.value)
      prompt = judge.prompt_ids('alignment', t2i.prompts[row], grid)
      assert ids[: len(prompt)] == prompt
      assert judge.tokenizer.decode(ids[len(prompt) :]) == f'{item.phrase} {P.verdict(item.value)}.'
  np.testing.assert_array_equal(drills(3)['drill/input_ids'], batch['drill/input_ids'])
  c.data.cot_style = 'dims'
  with pytest.raises(config_lib.ConfigError, match='drills checklist items'):
    reward_sft.validate(c)
  c = _tiny_judge_config()
  c.judge.independent_items = True
  with pytest.raises(config_lib.ConfigError, match='independent_items reads'):
    reward_sft.validate(c)


def test_independent_items_read_each_verdict_after_its_phrase_alone(judge, monkeypatch):
  dec = _decomposing(judge, independent_items=True)
  t2i = D.t2i_set(1, 2, 'val', 64, 2)
  prompts, processed = dec._inputs('alignment', t2i.images, list(t2i.prompts), None)
  items = [[i.phrase for i in t2i.labels[r]['items/alignment']] for r in range(len(t2i))]
  read = []
  real = dec.read_logits
  monkeypatch.setattr(dec, 'read_logits', lambda seqs, p: read.append(seqs) or real(seqs, p))
  cots = dec.fill_checklist(prompts, processed, items)
  for k, seqs in enumerate(read):
    for row, seq in enumerate(seqs):
      if k < len(items[row]):
        assert seq == prompts[row] + dec.tokenizer(items[row][k])['input_ids']
  for row, cot in enumerate(cots):  # the chain still names every item, in order
    written = dec.tokenizer.decode(cot).strip().rstrip('.').split('. ')
    assert [part.rsplit(' ', 1)[0] for part in written] == items[row]
  # Each verdict is the likeliest after the phrase alone.
  row, k = 0, len(items[0]) - 1
  logits = real([prompts[row] + dec.tokenizer(items[row][k])['input_ids']], processed)[0]
  best = dec.verdict_ids[int(np.argmax(logits[dec.verdict_ids]))]
  assert dec.tokenizer.decode(cot_tail(dec, cots[row])) == dec.tokenizer.decode([best])


def cot_tail(judge, cot):
  """The last verdict token of a checklist chain (before its period)."""
  period = judge.tokenizer('.')['input_ids']
  return cot[-len(period) - 1 : -len(period)]


def test_decomposing_judge_reward_is_the_mean_over_sampled_checklists(judge, monkeypatch):
  dec = _decomposing(judge, verdict_samples=3)
  t2i = D.t2i_set(1, 2, 'val', 64, 2)
  truth = [[i.phrase for i in t2i.labels[r]['items/alignment']] for r in range(len(t2i))]
  monkeypatch.setattr(dec, 'items_of', lambda prompts: (truth, np.ones(len(prompts), bool)))
  chains = []
  fill = dec.fill_checklist
  monkeypatch.setattr(
    dec, 'fill_checklist', lambda *a, **k: chains.append(fill(*a, **k)) or chains[-1]
  )
  out = dec.score('alignment', t2i.images, list(t2i.prompts), cot=True)
  assert len(chains) == 3
  for cots in chains:  # each names the true items, in order
    for row, cot in enumerate(cots):
      written = dec.tokenizer.decode(cot).strip().rstrip('.').split('. ')
      assert [part.rsplit(' ', 1)[0] for part in written] == truth[row]
  prompts, processed = dec._inputs('alignment', t2i.images, list(t2i.prompts), None)
  draws = [dec._readouts(prompts, cots, processed)[1] for cots in chains]
  np.testing.assert_allclose(out.reward, np.mean(draws, 0), rtol=1e-5)
  again = dec.score('alignment', t2i.images, list(t2i.prompts), cot=True)
  np.testing.assert_array_equal(again.reward, out.reward)  # fixed draws
  # No-CoT alignment reads as any judge does: no checklist.
  dec.score('alignment', t2i.images, list(t2i.prompts), cot=False)
  assert len(chains) == 6


def test_eval_decomposition_counts_exact_lists_and_found_items(judge, monkeypatch):
  from qwen_image_rl import judge_eval

  dec = _decomposing(judge)
  t2i = D.t2i_set(1, 3, 'val', 64, 2)
  truth = {
    t2i.prompts[r]: [i.phrase for i in t2i.labels[r]['items/alignment']] for r in range(len(t2i))
  }
  monkeypatch.setattr(
    dec, 'items_of', lambda prompts: ([truth[p] for p in prompts], np.ones(len(prompts), bool))
  )
  out = judge_eval.decomposition(dec, t2i)
  assert out == {'prompts': len(truth), 'invalid': 0, 'exact': 1.0, 'recall': 1.0, 'precision': 1.0}
  monkeypatch.setattr(
    dec, 'items_of', lambda prompts: ([truth[p][1:] for p in prompts], np.ones(len(prompts), bool))
  )
  out = judge_eval.decomposition(dec, t2i)
  n = sum(map(len, truth.values()))
  assert out['exact'] == 0.0 and out['precision'] == 1.0
  assert out['recall'] == round((n - len(truth)) / n, 4)


def test_eval_examples_show_the_chains_of_thought_it_scored(judge):
  from qwen_image_rl import judge_eval

  t2i, edits = D.t2i_set(1, 2, 'val', 64, 2), D.edit_set(1, 1, 'val', 64, 2)
  out = judge_eval.evaluate_judge(judge, t2i, edits, ('cot', 'no_cot'), examples=2)
  assert 'examples' not in out['alignment/no_cot']
  shown = out['alignment/cot']['examples']
  assert [e['prompt'] for e in shown] == list(t2i.prompts[:2])
  assert [e['kind'] for e in shown] == list(t2i.kinds[:2])
  scored = judge.score('alignment', t2i.images[:2], list(t2i.prompts[:2]), cot=True)
  assert [e['cot'] for e in shown] == scored.cot
  for e, reward in zip(shown, scored.reward):
    assert e['reward'] is None if np.isnan(reward) else e['reward'] == round(float(reward), 4)


def test_paired_difference_of_two_judges_resamples_specs_for_both():
  from scipy import stats

  from qwen_image_rl import judge_eval

  rng = np.random.default_rng(0)
  oracle = rng.random(64)
  a = oracle + 0.1 * rng.normal(size=64)
  b = oracle + 0.5 * rng.normal(size=64)
  b[5] = np.nan  # an invalid answer drops the image for both judges
  out = judge_eval.paired_difference(a, b, oracle, groups=2, draws=200)
  ok = ~np.isnan(b)
  want = stats.spearmanr(a[ok], oracle[ok])[0] - stats.spearmanr(b[ok], oracle[ok])[0]
  assert out['difference'] == pytest.approx(want, abs=1e-4) and out['n'] == 63
  assert out['spearman'] == pytest.approx(stats.spearmanr(a[ok], oracle[ok])[0], abs=1e-4)
  assert out['spearman_against'] == pytest.approx(stats.spearmanr(b[ok], oracle[ok])[0], abs=1e-4)
  assert 0 < out['se'] < 0.5 * out['difference']
  assert judge_eval.paired_difference(a, b, oracle, groups=2, draws=200) == out
  # The same scores: no difference and no spread, whatever is resampled.
  same = judge_eval.paired_difference(a, a.copy(), oracle, groups=2, draws=50)
  assert (same['difference'], same['se'], same['n']) == (0.0, 0.0, 64)


def test_compare_judges_scores_both_on_the_same_images(judge):
  from qwen_image_rl import judge_eval

  t2i, edits = D.t2i_set(1, 4, 'val', 64, 2), D.edit_set(1, 2, 'val', 64, 2)
  rewards = {}
  judge_eval.evaluate_judge(judge, t2i, edits, ('no_cot',), rewards=rewards)
  out = judge_eval.compare_judges(rewards, judge, t2i, edits, 'no_cot')
  assert set(out) == {f'{t}/no_cot' for t in D.TASKS if len(judge_eval.task_rows(t, t2i, edits)[2])}
  assert all(v['difference'] == 0.0 and v['se'] == 0.0 for v in out.values()), out


def test_caption_match_is_zero_for_a_blank_image_and_reads_the_image_otherwise(judge):
  from qwen_image_rl import judge_eval

  plain = _plain(judge)
  t2i = D.t2i_set(1, 2, 'val', 64, 2)
  out = judge_eval.caption_match(plain, t2i, batch=3)
  assert set(out) == {'pmi_mean', 'pmi_min'}
  assert out['pmi_mean']['n'] == len(t2i) and 'by_kind' in out['pmi_mean']
  blank = dataclasses.replace(t2i, images=np.zeros_like(t2i.images))
  zero = judge_eval.caption_match(plain, blank, batch=3)
  for rule in ('pmi_mean', 'pmi_min'):
    assert all(v['judge'] == 0 for v in zero[rule]['by_kind'].values())
    assert any(v['judge'] != 0 for v in out[rule]['by_kind'].values())


def test_eval_breaks_scores_down_by_kind_of_image():
  from qwen_image_rl import judge_eval

  judge = np.array([0.9, 0.8, np.nan, 0.2, 0.4])
  oracle = np.array([1.0, 1.0, 0.5, 0.1, 0.6])
  out = judge_eval.by_kind(judge, oracle, ['clean', 'clean', 'semantic', 'semantic', 'pixel'])
  assert out['clean'] == {'n': 2, 'judge': 0.85, 'oracle': 1.0}
  assert out['semantic'] == {'n': 2, 'judge': 0.2, 'oracle': 0.3}  # NaN (invalid) left out
  assert out['pixel']['judge'] == 0.4


def test_perception_targets_are_the_caption_words_and_the_oracle_quality():
  from qwen_image_rl.data import examples, oracle
  from qwen_image_rl.judges import perception

  data = perception.perception_set(0, 24, 64)
  ex = examples.t2i_examples(0, 24, 'train', 64)
  n_words = len(data.words)
  corrupted = 0
  for i, spec in enumerate(ex.specs):
    words = {data.words[k] for k in np.flatnonzero(data.targets[i, :n_words])}
    assert words == set(ex.prompts[i].split())
    quality = oracle.image_quality(data.images[i])
    np.testing.assert_allclose(
      data.targets[i, n_words:-1], [quality[d] for d in perception.QUALITY_DIMS], rtol=1e-6
    )
    assert data.mask[i, -1] == (spec.category == 'portrait')
    corrupted += not np.array_equal(data.images[i], ex.images[i])
  assert 0 < corrupted < len(ex.specs)
  assert data.names[-1] == 'well_formed' and len(data.names) == data.targets.shape[1]


def test_bound_perception_targets_bind_attributes_to_objects_and_places():
  from qwen_image_rl.data import examples, world
  from qwen_image_rl.judges import perception

  shapes = (
    world.Shape('circle', 'red', 'small', 0, 1),
    world.Shape('square', 'blue', 'large', 2, 2),
  )
  scene = world.GeneralScene(shapes=shapes, relation='above')
  words = perception.bound_words(scene)
  assert {'#shapes=2', 'circle@01', 'red@01', 'red_circle', 'blue@22', 'blue_square'} <= set(words)
  assert 'red_square' not in words and 'red@22' not in words  # what a bag of words cannot tell
  assert perception.bound_words(world.TypographyScene(text='AB', colour='black'))[1:] == [
    'A@0',
    'B@1',
  ]
  plain = perception.perception_set(0, 24, 64)
  bound = perception.perception_set(0, 24, 64, bound=True)
  assert set(plain.words) < set(bound.words)
  np.testing.assert_array_equal(bound.images, plain.images)
  specs = examples.t2i_examples(0, 24, 'train', 64).specs
  for i, spec in enumerate(specs):
    marked = {bound.words[k] for k in np.flatnonzero(bound.targets[i, : len(bound.words)])}
    assert set(perception.bound_words(spec)) <= marked
  assert any(perception.bound_words(spec) for spec in specs)


def test_perception_loss_averages_within_each_target_group():
  from qwen_image_rl.judges import perception

  rng = np.random.default_rng(0)
  n_words, k = 6, 6 + len(perception.QUALITY_DIMS) + 1
  logits, targets = rng.normal(size=(4, k)), rng.random((4, k))
  mask = np.ones((4, k))
  mask[[0, 2], -1] = 0  # two images without a face label
  ce = np.logaddexp(0, logits) - targets * logits
  groups = [slice(0, n_words), slice(n_words, k - 1), slice(k - 1, k)]
  want = sum((ce * mask)[:, g].sum() / mask[:, g].sum() for g in groups)
  got = perception.bce(logits, targets, mask, n_words)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  plain = perception.bce(logits, targets, mask, n_words, balance_groups=False)
  np.testing.assert_allclose(float(plain), (ce * mask).sum() / mask.sum(), rtol=1e-5)
  # Per-token words: the entries an object reaches and the rest weigh one half each.
  dense_logits = rng.normal(size=(2, 16, 5))
  dense = np.where(rng.random((2, 16, 5)) < 0.1, rng.random((2, 16, 5)), 0.0)
  ce = np.logaddexp(0, dense_logits) - dense * dense_logits
  want = ce[dense > 0].mean() + ce[dense == 0].mean()
  np.testing.assert_allclose(float(perception.dense_bce(dense_logits, dense)), want, rtol=1e-5)


def test_perception_pretraining_fits_its_targets_and_returns_the_vision_tree(judge):
  import flax.linen as nn
  import ml_collections

  from qwen_image_rl.judges import perception

  settings = ml_collections.ConfigDict(
    dict(steps=40, batch_size=8, lr=3e-3, n_images=16, balance_groups=True)
  )
  losses = []
  trained = perception.train_perception(
    judge.model.visual, judge.processor, settings, 0, 64, log=losses.append
  )
  visual, last = trained.params['visual'], trained.loss
  first = perception.train_perception(
    judge.model.visual,
    judge.processor,
    ml_collections.ConfigDict({**settings.to_dict(), 'steps': 1}),
    0,
    64,
    log=lambda _: None,
  ).loss
  assert last < 0.6 * first, (first, last, losses)
  shapes = lambda tree: jax.tree.map(np.shape, tree)
  assert shapes(visual) == shapes(nn.meta.unbox(judge.params['visual']))


def test_trained_perception_keeps_its_head_and_reads_any_number_of_images(judge):
  import ml_collections

  from qwen_image_rl.judges import perception

  settings = ml_collections.ConfigDict(
    dict(steps=2, batch_size=4, lr=3e-3, n_images=8, balance_groups=True)
  )
  trained = perception.train_perception(
    judge.model.visual, judge.processor, settings, 0, 64, log=lambda _: None
  )
  data = perception.perception_set(0, 10, 64, 'val', trained.words)
  assert trained.names == data.names and len(trained.words) == len(data.words)
  # Images are read one by one: a padded last batch and another batch size give the same logits.
  by_4 = trained.logits(judge.processor, data.images, 4)
  by_5 = trained.logits(judge.processor, data.images, 5)
  assert by_4.shape == (10, len(data.names))
  np.testing.assert_allclose(by_4, by_5, rtol=1e-4, atol=1e-5)


def test_dense_targets_put_each_objects_words_at_its_tokens():
  from qwen_image_rl.data import world
  from qwen_image_rl.judges import dense_targets as DT

  col = DT.COLUMN
  scene = world.GeneralScene(
    shapes=(
      world.Shape('circle', 'red', 'small', 0, 0),
      world.Shape('square', 'blue', 'large', 1, 1),
    ),
    relation='above',
  )
  t = DT.dense_targets(scene, 4)
  assert t.shape == (16, len(DT.DENSE_WORDS))
  # The small top-left circle lies inside token 0; the centre square splits over tokens 5, 6, 9
  # and 10; each object's shares sum to 1.
  np.testing.assert_allclose(t[:, [col['red'], col['circle'], col['small']]].sum(0), 1.0)
  assert t[0, col['red']] == t[0, col['circle']] == 1.0
  np.testing.assert_allclose(t[[5, 6, 9, 10], col['blue']], 0.25, rtol=1e-5)
  assert t[:, col['blue']].sum() == pytest.approx(1.0) and t[0, col['blue']] == 0
  assert t[:, [col['triangle'], col['green'], col['glyph:A'], col['sun']]].sum() == 0
  # Binding: the same words with colours swapped between the shapes read 0, the scene itself 1.
  swapped = world.GeneralScene(
    shapes=(
      world.Shape('circle', 'blue', 'small', 0, 0),
      world.Shape('square', 'red', 'large', 1, 1),
    ),
    relation='above',
  )
  sure = np.where(t > 0, 0.9, 0.01)  # a head that shows each object's words where it lies
  assert DT.object_log_probs(sure, scene, 4) == pytest.approx([np.log(0.9)] * 2, rel=1e-5)
  # The swapped scene asks for blue where the head shows red and circle: two of three words.
  want = (2 * np.log(0.9) + np.log(0.01)) / 3
  assert DT.object_log_probs(sure, swapped, 4) == pytest.approx([want, want], rel=1e-5)
  text = DT.dense_targets(world.TypographyScene(text='AB', colour='red'), 4)
  assert text[:, col['glyph:A']].sum() == pytest.approx(1.0)
  assert text[:, col['text:red']].max() > 0 and text[:, col['glyph:C']].sum() == 0
  # A glyph's tokens lie left of the next glyph's.
  cols_of = lambda w: {i % 4 for i in np.flatnonzero(text[:, col[w]])}
  assert max(cols_of('glyph:A')) <= min(cols_of('glyph:B'))
  portrait = world.PortraitScene(
    face_shape='round',
    skin='pale',
    eyes='brown',
    hair='black',
    expression='smiling',
    glasses=False,
  )
  assert DT.dense_targets(portrait, 4).sum() == 0
  assert DT.object_log_probs(t, portrait, 4) == []


def _tower_tokens(judge, trained, images) -> np.ndarray:
  """The trained tower's merged tokens [N, T, D] of uint8 images."""
  from qwen_image_rl.judges import perception

  layout = perception.batch_layout(judge.model.visual, judge.processor, images[0], len(images))
  pixels = perception.pixels_of(judge.processor, images)
  tokens = judge.model.visual.apply({'params': trained.params['visual']}, pixels, layout)
  return np.asarray(tokens).reshape(len(images), -1, tokens.shape[-1])


def test_dense_perception_reads_each_tokens_words_with_one_shared_linear_head(judge):
  import ml_collections

  from qwen_image_rl.data import examples
  from qwen_image_rl.judges import dense_targets as DT
  from qwen_image_rl.judges import perception
  from qwen_image_rl.trainers import reward_sft

  grid = perception.token_grid(judge.model.visual.config, 64)
  data = perception.perception_set(0, 6, 64, dense_grid=grid)
  specs = examples.t2i_examples(0, 6, 'train', 64).specs
  np.testing.assert_array_equal(data.dense, np.stack([DT.dense_targets(s, grid) for s in specs]))
  settings = ml_collections.ConfigDict(dict(steps=2, batch_size=4, lr=3e-3, n_images=8))
  settings.update(balance_groups=True, dense_targets=True, dense_weight=1.0)
  logs = []
  trained = perception.train_perception(
    judge.model.visual, judge.processor, settings, 0, 64, log=logs.append
  )
  assert 'dense_auc' in logs[-1]
  held_out = perception.perception_set(0, 5, 64, 'val', trained.words, dense_grid=grid)
  logits, dense = trained.outputs(judge.processor, held_out.images, 4)
  assert dense.shape == (5, grid * grid, len(DT.DENSE_WORDS))
  np.testing.assert_allclose(
    logits, trained.logits(judge.processor, held_out.images, 5), rtol=1e-4, atol=1e-5
  )
  tokens = _tower_tokens(judge, trained, held_out.images)
  head = trained.params['dense_head']
  want = tokens @ np.asarray(head['kernel']) + np.asarray(head['bias'])
  np.testing.assert_allclose(dense, want, rtol=1e-4, atol=1e-4)
  # The words' reading directions seed the LM's embeddings, at the table's scale.
  words, rows = trained.dense_word_embedding
  kernel = np.asarray(head['kernel'])
  assert len(set(words)) == len(words) and {'A', '7', 'orange', 'red', 'moon'} <= set(words)
  np.testing.assert_array_equal(rows[words.index('red')], kernel[:, DT.COLUMN['red']])
  np.testing.assert_array_equal(rows[words.index('orange')], kernel[:, DT.COLUMN['text:orange']])
  lm = nn.meta.unbox(judge.params['language_model'])
  table = np.asarray(lm['embed_tokens']['embedding'])
  scaled = reward_sft.at_embedding_scale(rows, table)
  norm = np.linalg.norm(table, axis=-1).mean()
  np.testing.assert_allclose(np.linalg.norm(scaled, axis=-1), norm, rtol=1e-5)
  seeded = reward_sft.with_word_embeddings(lm, judge.tokenizer, words, scaled)['embed_tokens']
  red = judge.tokenizer(' red')['input_ids']
  np.testing.assert_allclose(seeded['embedding'][red[0]], scaled[words.index('red')], rtol=1e-6)
  with pytest.raises(ValueError, match='multiple of the merged patch side'):
    perception.token_grid(judge.model.visual.config, 63)


def test_grounded_perception_scores_words_per_token_and_seeds_the_lm_embeddings(judge):
  import ml_collections

  from qwen_image_rl.judges import perception
  from qwen_image_rl.trainers import reward_sft

  settings = ml_collections.ConfigDict(
    dict(steps=2, batch_size=4, lr=3e-3, n_images=8, balance_groups=True, grounded=True)
  )
  trained = perception.train_perception(
    judge.model.visual, judge.processor, settings, 0, 64, log=lambda _: None
  )
  data = perception.perception_set(0, 4, 64, 'val', trained.words)
  logits = trained.logits(judge.processor, data.images, 4)
  # A word's logit: log-sum-exp over the image's tokens of token . word embedding, plus a bias.
  tokens = _tower_tokens(judge, trained, data.images)
  per_token = np.einsum('btd,wd->btw', tokens, trained.word_embedding)
  expected = np.log(np.exp(per_token).sum(1)) + np.asarray(trained.params['word_bias'])
  np.testing.assert_allclose(logits[:, : len(trained.words)], expected, rtol=1e-4, atol=1e-4)
  # The LM's embedding rows of one-token words (and of glyph digits, after a bare space) take
  # the head's; the others stay.
  lm = nn.meta.unbox(judge.params['language_model'])
  seeded = reward_sft.with_word_embeddings(
    lm, judge.tokenizer, trained.words, trained.word_embedding
  )
  table, before = seeded['embed_tokens']['embedding'], np.asarray(lm['embed_tokens']['embedding'])
  column = {w: i for i, w in enumerate(trained.words)}
  checked = [w for w in trained.words if w in ('red', 'circle', 'square', 'sky') or w.isdigit()]
  assert checked
  for word in checked:
    token = judge.tokenizer(' ' + word)['input_ids'][-1]
    np.testing.assert_array_equal(table[token], trained.word_embedding[column[word]])
  changed = np.flatnonzero(np.any(table != before, axis=1))
  assert 0 < len(changed) <= len(trained.words)
  assert judge.tokenizer(' Score')['input_ids'][0] not in changed


def test_perception_match_rules_read_only_the_prompts_known_words():
  from benchmarks import perception_match

  probs = np.array([[0.9, 0.1, 0.5, 0.99]] + [[0.2, 0.8, 0.5, 0.99]] * 3, np.float32)
  words = ('red', 'blue', 'circle', 'a')
  prompts = ['a red circle', 'a cat', 'a dog', 'a cow']
  out = perception_match.rule_scores(probs, words, prompts)
  np.testing.assert_allclose(
    [out['mean_p'][0], out['min_p'][0], out['mean_log_p'][0]],
    [(0.9 + 0.5 + 0.99) / 3, 0.5, (np.log(0.9) + np.log(0.5) + np.log(0.99)) / 3],
    rtol=1e-6,
  )
  # 'a' is in every prompt: the content rules leave it out.
  np.testing.assert_allclose(out['content_min_p'][0], 0.5, rtol=1e-6)
  np.testing.assert_allclose(out['content_mean_log_p'][0], np.log(0.45) / 2, rtol=1e-6)
  assert np.isnan(out['content_min_p'][1])  # only 'a' is known
  assert out['min_p'][1] == pytest.approx(0.99)


def test_perception_match_bound_rules_read_the_requested_scenes_pseudo_words():
  from benchmarks import perception_match
  from qwen_image_rl.judges import perception

  shape = W.Shape(kind='circle', colour='red', size='small', row=0, col=2)
  general = W.GeneralScene(shapes=(shape,), relation=None)
  portrait = W.sample_scene(np.random.default_rng(0), 'portrait')
  words = tuple(perception.bound_words(general)) + ('red',)
  probs = np.linspace(0.1, 0.9, len(words))[None].repeat(2, 0).astype(np.float32)
  out = perception_match.bound_rule_scores(probs, words, [general, portrait])
  bound = probs[0, : len(words) - 1]  # the caption word 'red' is not a bound word
  np.testing.assert_allclose(out['bound_min_p'][0], bound.min(), rtol=1e-6)
  np.testing.assert_allclose(out['bound_mean_log_p'][0], np.log(bound).mean(), rtol=1e-6)
  assert np.isnan(out['bound_min_p'][1])  # a portrait has no bound words
  assert all(perception_match.is_bound_word(w) for w in words[:-1])
  assert not perception_match.is_bound_word('red')


def test_perception_match_item_aucs_read_each_item_at_its_objects_place():
  from benchmarks import perception_match
  from qwen_image_rl.judges import dense_targets

  shapes = (
    W.Shape(kind='circle', colour='red', size='small', row=0, col=0),
    W.Shape(kind='square', colour='blue', size='large', row=2, col=2),
  )
  spec = W.GeneralScene(shapes=shapes, relation='left of')
  shown = 0.01 + 0.98 * dense_targets.dense_targets(spec, 4)
  only_first = 0.01 + 0.98 * dense_targets.dense_targets(W.GeneralScene(shapes=shapes[:1]), 4)

  def label(first: float, second: float) -> dict:
    items = (D.Item('count', 1.0, 'count'), D.Item('small red circle', first, 'shape'))
    items += (D.Item('top left', 1.0, 'position'), D.Item('large blue square', second, 'shape'))
    return {'items/alignment': items}

  # The square's item is read where the square is asked for: good where it is drawn.
  out = perception_match.dense_item_aucs(
    np.stack([shown, only_first]), [spec, spec], [label(1.0, 1.0), label(1.0, 0.0)]
  )
  assert out == {'shape': {'n': 4, 'auc': 1.0}}
  both = perception_match.dense_item_aucs(
    np.stack([shown, only_first]), [spec, spec], [label(1.0, 1.0), label(1.0, 0.0)], ['clean'] * 2
  )
  assert both['exact_renders'] == out
  one = perception_match.dense_item_aucs(
    np.stack([shown, only_first]),
    [spec, spec],
    [label(1.0, 1.0), label(1.0, 0.0)],
    ['clean', 'pixel'],
  )
  assert one['exact_renders'] == {}  # the first image's items are all good: no AUC
  flipped = perception_match.dense_item_aucs(
    np.stack([shown, only_first]), [spec, spec], [label(1.0, 0.0), label(1.0, 1.0)]
  )
  # The drawn square called bad reads above the missing one, below the small circles (whose
  # box shares per token are larger): 2 of 3 good items above it.
  assert flipped['shape']['auc'] == pytest.approx(2 / 3, abs=1e-3)


def test_alignment_ceiling_reads_content_exactly_on_exact_renders(monkeypatch, capsys):
  from benchmarks import alignment_ceiling

  monkeypatch.setattr('sys.argv', ['alignment_ceiling.py', '--n=16'])
  alignment_ceiling.main()
  out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  for task in ('alignment', 'instruction'):
    kinds = out[task]['by_kind']
    assert sum(k['n'] for k in kinds.values()) == 16
    for kind, row in kinds.items():
      if kind in D.EXACT_RENDER_KINDS:  # the oracle scores the content alone
        assert row['content_exact'] == pytest.approx(row['oracle'], abs=1e-4), (task, kind)
      elif kind == 'pixel':  # the scene asked for, drawn right: the content reader's 1
        assert row['content_exact'] > 0.99 and row['oracle'] < row['content_exact'], task


def test_frozen_vision_tower_gets_no_updates_but_its_merger_and_the_lm_do(judge):
  import flax.linen as nn
  import optax

  from qwen_image_rl.trainers import reward_sft

  params = nn.meta.unbox(judge.params)
  tx = reward_sft.freeze_vision_tower(optax.sgd(1.0))
  updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
  moved = lambda tree: {bool(np.any(np.asarray(x) != 0)) for x in jax.tree.leaves(tree)}
  tower = {k: v for k, v in updates['visual'].items() if k != 'merger'}
  assert moved(tower) == {False}
  assert moved(updates['visual']['merger']) == moved(updates['language_model']) == {True}


@pytest.mark.parametrize(
  'overrides, match',
  [
    ({'data.caption_batch_size': -1}, 'caption_batch_size=-1'),
    ({'perception.steps': -1}, 'perception.steps=-1'),
    ({'judge.describe_first': True, 'data.caption_batch_size': 0}, 'describe_first needs'),
    (
      {'judge.describe_first': True, 'data.samples_from': '/tmp'},
      'cannot use config.data.samples_from',
    ),
    ({'data.cot_style': 'slots'}, "cot_style='slots'"),
    (
      {'perception.dense_targets': True, 'perception.dense_weight': -1.0},
      'dense_weight=-1.0: must be >= 0',
    ),
    ({'perception.dense_targets': True, 'data.image_size': 72}, 'dense_targets: image size 72'),
    ({'perception.dense_embeddings': True}, 'needs config.perception.dense_targets=True'),
    (
      {
        'perception.dense_targets': True,
        'perception.dense_embeddings': True,
        'perception.grounded': True,
      },
      'pick one',
    ),
  ],
)
def test_bad_judge_settings_are_rejected(overrides, match):
  from qwen_image_rl import config_lib
  from qwen_image_rl.trainers import reward_sft

  c = _tiny_judge_config()
  for key, value in overrides.items():
    section, name = key.split('.')
    c[section][name] = value
  with pytest.raises(config_lib.ConfigError, match=match):
    reward_sft.validate(c)


@pytest.mark.parametrize(
  'kind', ['pointwise', 'pairwise', 'describe_first', 'checklist', 'decompose']
)
def test_reward_sft_trains_and_exports_a_loadable_judge(tmp_path, kind):
  from qwen_image_rl import main

  c = _tiny_judge_config()
  c.judge.describe_first = kind == 'describe_first'
  # a tower also taught per-token words, whose reading directions seed the LM's embeddings
  c.perception.dense_targets = c.perception.dense_embeddings = kind == 'pointwise'
  if kind == 'checklist':  # with the grounded tower, whose word embeddings seed the LM's
    c.data.cot_style, c.perception.grounded = 'checklist', True
  if kind == 'decompose':
    c.data.update(cot_style='checklist', decompose_batch_size=2, drill_batch_size=2)
    c.judge.update(decompose=True, verdict_samples=2, independent_items=True)
  decompose = kind == 'decompose'
  kind = 'pointwise' if kind in ('describe_first', 'checklist', 'decompose') else kind
  c.loss.kind = kind
  c.perception.freeze_tower = kind == 'pairwise'  # the frozen tower's optimiser, sharded
  history = main.run(c, str(tmp_path))
  assert all(np.isfinite(h['loss']) for h in history)
  assert all(h['caption_ce'] > 0 for h in history)
  assert all(('decompose_ce' in h) == ('drill_ce' in h) == decompose for h in history)
  loaded = V.VLMJudge.load(str(tmp_path / 'export' / 'judge'), max_cot_tokens=3)
  assert loaded.describe_first == c.judge.describe_first
  assert (loaded.decompose, loaded.verdict_samples) == (decompose, 2 * decompose)
  assert loaded.independent_items == decompose
  with open(tmp_path / 'export' / 'judge' / V.JUDGE_CONFIG) as f:
    assert json.load(f)['loss'] == kind
  ds = D.edit_set(2, 2, 'val', 64)
  out = loaded.score('instruction', ds.images, list(ds.prompts), ds.sources, cot=False)
  assert out.valid.all() and np.all((out.reward >= 0) & (out.reward <= 1))


@pytest.mark.slow
def test_reward_sft_exact_resume_after_sigkill(tmp_path):
  code = 'from tests.test_judges import _tiny_judge_config\nc = _tiny_judge_config()'
  kill_and_resume.assert_killed_then_resumed_run_is_exact(
    code, str(tmp_path / 'straight'), str(tmp_path / 'resumed'), 6, kill_after_step=2
  )


@pytest.mark.slow
def test_face_id_exact_resume_after_sigkill(tmp_path):
  code = (
    'from tests.test_judges import _tiny_face_id\n'
    'c = _tiny_face_id(); c.total_steps = 20; c.eval.num_pairs = 0\n'
    'c.checkpoint.async_save = False'
  )
  kill_and_resume.assert_killed_then_resumed_run_is_exact(
    code, str(tmp_path / 'straight'), str(tmp_path / 'resumed'), 20, kill_after_step=10
  )


def test_judge_share_of_an_rl_iteration_is_read_from_the_run_log(tmp_path):
  from benchmarks import judge_throughput

  log = tmp_path / 'rl.log'
  lines = [
    'iteration 1: loss 1.9, reward judge_alignment 0.7; 30.0s (rollout 9.0, reward 9.0 waited '
    '5.0, update 16.0)',
    'I1203 some absl line',
  ]
  for i, (total, reward, waited) in enumerate([(8.0, 3.0, 0.5), (9.0, 4.0, 1.0), (7.0, 2.0, 0.0)]):
    lines.append(
      f'iteration {i + 2}: loss 1.1, reward judge_alignment 0.8; {total}s (rollout 4.0, '
      f'reward {reward} waited {waited}, update 3.5)'
    )
  log.write_text('\n'.join(lines))
  out = judge_throughput.iteration_times(str(log))  # iteration 1 (compile) left out
  assert out['iterations'] == 3 and out['iteration_s'] == 8.0 and out['reward_s'] == 3.0
  assert out['waited_share'] == pytest.approx(0.5 / 8.0)
  (tmp_path / 'empty.log').write_text('nothing here')
  with pytest.raises(SystemExit, match='no RL iteration lines'):
    judge_throughput.iteration_times(str(tmp_path / 'empty.log'))
