"""Reward interface, registry, composite rewards and weights, async pipeline, oracle rewards."""

import logging
import threading
import time

import numpy as np
import pytest

from qwen_image_rl.data import edits as E
from qwen_image_rl.data import oracle as O
from qwen_image_rl.data import render as R
from qwen_image_rl.data import world as W
from qwen_image_rl.rewards.async_pipeline import (
  AsyncRewardPipeline,
  RewardCancelledError,
  RewardWorkerError,
  SyncRewardPipeline,
)
from qwen_image_rl.rewards.base import FunctionReward, RewardBatch, RewardError, nan_counts
from qwen_image_rl.rewards.composite import CompositeReward, category_weighted_sum, validate_weights
from qwen_image_rl.rewards.registry import known_rewards, make_reward, register_reward

CATS = ('general', 'typography', 'portrait', 'landscape')


def make_batch(n=6, seed=0, first_id=0, size=8):
  rng = np.random.default_rng(seed)
  return RewardBatch(
    images=rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
    prompts=[f'prompt {first_id + i}' for i in range(n)],
    categories=[CATS[i % 4] for i in range(n)],
    sample_ids=np.arange(first_id, first_id + n),
  )


def brightness_and_id(batch):
  # Depends on both pixels and ids, so a score that moves to another sample is caught.
  return {
    'bright': batch.images.mean(axis=(1, 2, 3)) / 255,
    'id_echo': batch.sample_ids.astype(np.float32),
  }


BRIGHT = FunctionReward('bright_id', brightness_and_id, names=('bright', 'id_echo'))


# --- base ---------------------------------------------------------------------------------------


def test_batch_validation_names_the_field():
  good = make_batch()
  with pytest.raises(ValueError, match='images: expected uint8'):
    RewardBatch(
      images=good.images.astype(np.float32),
      prompts=good.prompts,
      categories=good.categories,
      sample_ids=good.sample_ids,
    )
  with pytest.raises(ValueError, match='unique'):
    RewardBatch(
      images=good.images,
      prompts=good.prompts,
      categories=good.categories,
      sample_ids=np.zeros(6, int),
    )
  with pytest.raises(ValueError, match='categories'):
    RewardBatch(
      images=good.images,
      prompts=good.prompts,
      categories=good.categories[:3],
      sample_ids=good.sample_ids,
    )
  sub = good.select([4, 1])
  np.testing.assert_array_equal(sub.sample_ids, [4, 1])
  assert sub.prompts == ('prompt 4', 'prompt 1')


def test_reward_output_is_checked():
  batch = make_batch()
  with pytest.raises(RewardError, match=r"shape \(5,\)"):
    FunctionReward('r', lambda b: np.zeros(5))(batch)
  with pytest.raises(RewardError, match=r"missing \['b'\]"):
    FunctionReward('r', lambda b: {'a': np.zeros(6)}, names=('a', 'b'))(batch)
  with pytest.raises(RewardError, match='inf'):
    FunctionReward('r', lambda b: np.full(6, np.inf))(batch)
  out = FunctionReward('r', lambda b: np.arange(6))(batch)
  assert out['r'].dtype == np.float32
  assert nan_counts({'a': np.array([np.nan, 1, np.nan])}) == {'a': 2}


# --- registry -----------------------------------------------------------------------------------


def constant_reward(value=0.25):
  return FunctionReward('test_constant', lambda b: np.full(b.size, value))


def test_registry():
  assert {
    'alignment',
    'aesthetics',
    'portrait',
    'instruction_following',
    'identity',
    'preservation',
  } <= set(known_rewards())
  with pytest.raises(ValueError, match=r"unknown reward 'nope'; known rewards: \[.*'aesthetics'"):
    make_reward('nope')
  with pytest.raises(ValueError, match='already registered'):
    register_reward('alignment')(lambda: None)
  with pytest.raises(ValueError, match='rejected its arguments'):
    make_reward('aesthetics', bogus=1)
  register_reward('test_constant')(constant_reward)
  register_reward('test_constant')(constant_reward)  # same factory again: allowed
  np.testing.assert_array_equal(
    make_reward('test_constant', value=0.5)(make_batch())['test_constant'],
    np.full(6, 0.5, np.float32),
  )
  assert make_reward('portrait', dims=('attributes',), neutral=0.0).dims == ('attributes',)


# --- composite ----------------------------------------------------------------------------------


def test_composite_produces_every_name():
  batch = make_batch()
  composite = CompositeReward(
    {'b': BRIGHT, 'len': FunctionReward('plen', lambda b: [len(p) for p in b.prompts])}
  )
  assert composite.names == ('bright', 'id_echo', 'plen')
  out = composite(batch)
  assert set(out) == {'bright', 'id_echo', 'plen'}
  np.testing.assert_allclose(out['bright'], batch.images.mean(axis=(1, 2, 3)) / 255, rtol=1e-6)
  assert set(composite.last_seconds) == {'b', 'len'}
  with pytest.raises(ValueError, match="'bright' is produced by both 'b' and 'again'"):
    CompositeReward({'b': BRIGHT, 'again': BRIGHT})
  with pytest.raises(RewardError, match="reward 'bad' of 'composite' failed: ZeroDivisionError"):
    CompositeReward({'bad': FunctionReward('bad', lambda b: 1 / 0)})(batch)


WEIGHTS = {
  'general': {'alignment': 0.7, 'aesthetics': 0.3},
  'typography': {'alignment': 0.9, 'aesthetics': 0.1, 'portrait': 0.0},
  'portrait': {'alignment': 0.3, 'aesthetics': 0.2, 'portrait': 0.5},
  'landscape': {'alignment': 0.4, 'aesthetics': 0.6},
}


def test_category_weighted_sum_matches_numpy_loop():
  rng = np.random.default_rng(1)
  n = 37
  scores = {k: rng.random(n).astype(np.float32) for k in ('alignment', 'aesthetics', 'portrait')}
  scores['unused_diagnostic'] = rng.random(n).astype(np.float32)
  categories = [CATS[i] for i in rng.integers(0, 4, n)]
  got = category_weighted_sum(scores, categories, WEIGHTS)
  want = np.zeros(n)
  for i, c in enumerate(categories):
    for k, w in WEIGHTS[c].items():
      want[i] += w * float(scores[k][i])
  assert got.dtype == np.float32 and got.shape == (n,)
  np.testing.assert_allclose(got, want, atol=1e-6)
  # A failed score counts only where its weight does.
  scores['portrait'][:] = np.nan
  got = category_weighted_sum(scores, categories, WEIGHTS)
  is_portrait = np.array(categories) == 'portrait'
  assert np.isnan(got[is_portrait]).all() and np.isfinite(got[~is_portrait]).all()


@pytest.mark.parametrize(
  'category, vector, pattern',
  [
    ('general', {'alignment': 0.7, 'aesthetics': 0.2}, r"'general'.*sum to 0.8999"),
    ('portrait', {'alignment': 1.2, 'aesthetics': -0.2}, r"'portrait'.*'aesthetics' is -0.2"),
    ('landscape', {'alignment': 0.5, 'sharpness': 0.5}, r"'landscape'.*unknown reward 'sharpness'"),
    ('typography', {'alignment': float('nan'), 'aesthetics': 1.0}, r"'typography'.*is nan"),
  ],
)
def test_weight_validation_names_category_and_value(category, vector, pattern):
  weights = dict(WEIGHTS, **{category: vector})
  scores = {k: np.zeros(4, np.float32) for k in ('alignment', 'aesthetics', 'portrait')}
  with pytest.raises(ValueError, match=pattern):
    category_weighted_sum(scores, list(CATS), weights)


def test_weight_validation_missing_category():
  weights = {c: v for c, v in WEIGHTS.items() if c != 'landscape'}
  with pytest.raises(ValueError, match=r"no reward weights for categories \['landscape'\]"):
    validate_weights(weights, ['alignment', 'aesthetics', 'portrait'], CATS)
  validate_weights({'general': {'alignment': 1 - 5e-7}}, ['alignment'], ['general'])


# --- pipelines ----------------------------------------------------------------------------------


def jittery(seed):
  """brightness_and_id with random delays; records the order in which ids were scored."""
  rng = np.random.default_rng(seed)
  seen = []

  def fn(batch):
    time.sleep(float(rng.uniform(0, 0.03)))
    seen.append(batch.sample_ids[0])
    return brightness_and_id(batch)

  return FunctionReward('jitter', fn, names=('bright', 'id_echo')), seen


def test_async_equals_sync_with_order_and_ids_kept():
  batches = [make_batch(n=4 + i % 3, seed=i, first_id=100 * i) for i in range(8)]
  sync = SyncRewardPipeline(BRIGHT)
  want = [sync.result(sync.submit(b)) for b in batches]
  reward, seen = jittery(0)
  with AsyncRewardPipeline(reward, max_pending=2) as pipeline:
    tickets = [pipeline.submit(b) for b in batches[:2]]
    got = []
    for b in batches[2:]:
      got.append(pipeline.result(tickets[len(got)], expect_sample_ids=batches[len(got)].sample_ids))
      tickets.append(pipeline.submit(b))
    # Retrieve the rest out of order: results are keyed by ticket, not arrival.
    rest = {t: pipeline.result(t) for t in reversed(tickets[len(got) :])}
    got += [rest[t] for t in tickets[len(got) :]]
  assert seen == [b.sample_ids[0] for b in batches]  # FIFO scoring
  for b, g, w in zip(batches, got, want):
    np.testing.assert_array_equal(g.sample_ids, b.sample_ids)
    np.testing.assert_array_equal(g['id_echo'], b.sample_ids)
    for name in ('bright', 'id_echo'):
      np.testing.assert_array_equal(g[name], w[name])
  with pytest.raises(RewardError, match='expected'):
    want[0].check_sample_ids(batches[1].sample_ids[:4])


def test_async_overlaps_scoring_with_caller_work():
  n, work = 5, 0.2

  def slow(batch):
    time.sleep(work)
    return {'r': np.zeros(batch.size)}

  batches = [make_batch(first_id=10 * i) for i in range(n + 1)]
  start = time.perf_counter()
  with AsyncRewardPipeline(FunctionReward('r', slow)) as pipeline:
    ticket = pipeline.submit(batches[0])
    waits = []
    for i in range(n):
      time.sleep(work)  # rollout of batch i + 1
      next_ticket = pipeline.submit(batches[i + 1]) if i + 1 < n else None
      waits.append(pipeline.result(ticket).wait_seconds)
      ticket = next_ticket
  elapsed = time.perf_counter() - start
  print(f'overlap: {n} batches in {elapsed:.3f} s (serial {n * 2 * work:.1f} s), waits {waits}')
  assert elapsed < 0.75 * n * 2 * work, elapsed


def test_worker_exception_surfaces_on_its_result_only():
  def flaky(batch):
    if batch.sample_ids[0] == 100:
      raise KeyError('judge returned no score token')
    return brightness_and_id(batch)

  pipeline = AsyncRewardPipeline(FunctionReward('flaky', flaky, names=('bright', 'id_echo')))
  tickets = [pipeline.submit(make_batch(first_id=100 * i)) for i in range(3)]
  assert pipeline.result(tickets[0])['id_echo'][0] == 0
  with pytest.raises(RewardWorkerError) as info:
    pipeline.result(tickets[1])
  text = str(info.value)
  assert 'worker traceback' in text and 'in flaky' in text and 'judge returned no score' in text
  assert 'sample ids [100, 101' in text
  assert isinstance(info.value.__cause__, KeyError)
  assert pipeline.result(tickets[2])['id_echo'][0] == 200
  with pytest.raises(ValueError, match='already retrieved'):
    pipeline.result(tickets[1])
  pipeline.close()


def test_close_is_clean_and_cancels_on_request():
  release = threading.Event()

  def blocked(batch):
    release.wait(5)
    return {'r': np.ones(batch.size)}

  pipeline = AsyncRewardPipeline(FunctionReward('r', blocked), max_pending=2)
  tickets = [pipeline.submit(make_batch(first_id=10 * i)) for i in range(3)]  # 1 busy + 2 queued
  with pytest.raises(TimeoutError, match='2 batches still waiting'):
    pipeline.submit(make_batch(first_id=99), timeout=0.1)
  with pytest.raises(TimeoutError, match='not scored within'):
    pipeline.result(tickets[0], timeout=0.05)
  release.set()
  pipeline.close(cancel_pending=True, timeout=5)
  assert not pipeline._thread.is_alive()
  np.testing.assert_array_equal(pipeline.result(tickets[0])['r'], np.ones(6))  # scored before close
  for t in tickets[1:]:
    with pytest.raises(RewardCancelledError):
      pipeline.result(t)
  with pytest.raises(RuntimeError, match='closed'):
    pipeline.submit(make_batch())
  pipeline.close()  # idempotent

  with AsyncRewardPipeline(BRIGHT) as pipeline:  # close() waits for queued work by default
    tickets = [pipeline.submit(make_batch(first_id=10 * i)) for i in range(3)]
  assert not pipeline._thread.is_alive()
  assert [pipeline.result(t)['id_echo'][0] for t in tickets] == [0, 10, 20]


def test_submit_copies_the_batch():
  release = threading.Event()

  def wait_then_score(batch):
    release.wait(5)
    return brightness_and_id(batch)

  batch = make_batch()
  want = brightness_and_id(batch)['bright'].astype(np.float32)
  with AsyncRewardPipeline(FunctionReward('w', wait_then_score, names=('bright', 'id_echo'))) as p:
    ticket = p.submit(batch)
    batch.images[...] = 0  # the caller reuses its buffer for the next rollout
    release.set()
    np.testing.assert_array_equal(p.result(ticket)['bright'], want)


@pytest.mark.parametrize('pipeline_cls', [SyncRewardPipeline, AsyncRewardPipeline])
def test_nan_scores_are_counted_and_reported(pipeline_cls, caplog):
  def half_failed(batch):
    out = brightness_and_id(batch)
    out['bright'][::2] = np.nan
    return out

  reward = FunctionReward('half', half_failed, names=('bright', 'id_echo'))
  with pipeline_cls(reward) as pipeline, caplog.at_level(logging.WARNING):
    result = pipeline.result(pipeline.submit(make_batch(first_id=40)))
  assert result.nan_counts == {'bright': 3, 'id_echo': 0} and result.num_failed == 3
  assert 'failed sample ids [40, 42, 44]' in caplog.text
  metrics = result.metrics()
  assert metrics['reward/bright/nan_count'] == 3.0
  np.testing.assert_allclose(metrics['reward/bright/mean'], np.nanmean(result['bright']), rtol=1e-6)
  with pipeline_cls(reward, on_nan='raise') as pipeline:
    with pytest.raises(RewardError, match=r"NaN \(failed\) scores \{'bright': 3\}"):
      pipeline.result(pipeline.submit(make_batch()))


# --- oracle rewards -----------------------------------------------------------------------------

NOISY = np.array([1, 3, 5, 6])
CLEAN = np.array([0, 2, 4, 7])


def t2i_batch(n=8, seed=3, size=64):
  specs = W.sample_scenes(seed, n)
  images = R.render_batch(specs, size)
  noisy = NOISY[n > NOISY]  # lower scores; includes one portrait (categories cycle)
  images[noisy] = np.clip(
    images[noisy].astype(int) + np.random.default_rng(0).normal(0, 25, images[noisy].shape), 0, 255
  ).astype(np.uint8)
  return RewardBatch(
    images=images,
    prompts=['p'] * n,
    categories=[s.category for s in specs],
    sample_ids=np.arange(n),
    meta=[{'spec': W.to_dict(s) if i % 2 else s} for i, s in enumerate(specs)],
  )


def test_t2i_oracle_rewards_match_the_oracle():
  batch = t2i_batch()
  specs = [W.from_dict(m['spec']) if isinstance(m['spec'], dict) else m['spec'] for m in batch.meta]
  composite = CompositeReward({k: make_reward(k) for k in ('alignment', 'aesthetics', 'portrait')})
  with AsyncRewardPipeline(composite) as pipeline:
    got = pipeline.result(pipeline.submit(batch), expect_sample_ids=np.arange(8))
  want_align = [O.score_t2i(im, s)['overall'] for im, s in zip(batch.images, specs)]
  want_aes = [O.image_quality(im)['quality'] for im in batch.images]
  want_portrait = [
    O.score_portrait(im, s)['well_formed'] if s.category == 'portrait' else 0.5
    for im, s in zip(batch.images, specs)
  ]
  errors = {
    k: float(np.abs(got[k] - w).max())
    for k, w in (('alignment', want_align), ('aesthetics', want_aes), ('portrait', want_portrait))
  }
  print(
    't2i oracle reward max abs errors',
    errors,
    'scores',
    {k: np.round(v, 3) for k, v in got.items()},
  )
  assert max(errors.values()) < 1e-6
  assert got['alignment'][CLEAN].min() > 0.99 and got['aesthetics'][CLEAN].min() > 0.99
  assert got['aesthetics'][NOISY].max() < 0.9  # noisy renders lose quality
  assert got['portrait'][2] > 0.99 and got['portrait'][6] < got['portrait'][2]  # the portraits
  bad = RewardBatch(
    images=batch.images,
    prompts=batch.prompts,
    categories=['general'] * 8,
    sample_ids=batch.sample_ids,
    meta=batch.meta,
  )
  with pytest.raises(RewardWorkerError, match='misaligned'):
    with AsyncRewardPipeline(make_reward('alignment')) as pipeline:
      pipeline.result(pipeline.submit(bad))


def test_edit_oracle_rewards_match_the_oracle():
  edits = E.sample_edits(5, 7)  # one of each kind
  sources = R.render_batch([e.source for e in edits], 64)
  outputs = R.render_batch([e.target for e in edits], 64)
  outputs[0] = sources[0]  # a no-op edit fails its instruction
  batch = RewardBatch(
    images=outputs,
    source_images=sources,
    prompts=[e.instruction for e in edits],
    categories=[e.category for e in edits],
    sample_ids=np.arange(7) + 50,
    meta=[{'edit': e} for e in edits],
  )
  reward = CompositeReward(
    {k: make_reward(k) for k in ('instruction_following', 'identity', 'preservation')}
  )
  got = reward(batch)
  want = [O.score_edit(s, o, e) for s, o, e in zip(sources, outputs, edits)]
  for name in ('instruction_following', 'preservation'):
    np.testing.assert_allclose(got[name], [w[name] for w in want], atol=1e-6)
  np.testing.assert_allclose(got['identity'], [w.get('identity', 0.5) for w in want], atol=1e-6)
  assert got['instruction_following'][0] < 0.9 and got['instruction_following'][1:].min() > 0.99
  with pytest.raises(ValueError, match='source_images'):
    make_reward('identity')(make_batch())
