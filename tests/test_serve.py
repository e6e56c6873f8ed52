"""The judge server (python -m qwen_image_rl.serve) as a real process on loopback."""

import base64
import json
import urllib.error
import urllib.request

import numpy as np
import pytest
from judge_servers import ServerFactory, judge_servers  # noqa: F401  (fixture)

from qwen_image_rl import serve
from qwen_image_rl.data import render as R
from qwen_image_rl.data import world as W
from qwen_image_rl.rewards.base import RewardBatch
from qwen_image_rl.rewards.registry import make_reward
from qwen_image_rl.serving import context, protocol

KEY_ENV = 'QIRL_TEST_JUDGE_KEY'


@pytest.fixture(scope='module')
def oracle_server():
  factory = ServerFactory()
  try:
    yield factory.start('--judge=oracle', '--max_request_mb=0.25')
  finally:
    factory.kill_all()


def http(url, body=None, headers=None, raw=None, timeout=30):
  """(status, parsed JSON or text) of a GET (body None) or POST."""
  data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
  request = urllib.request.Request(
    url, data=data, headers={'Content-Type': 'application/json', **(headers or {})}
  )
  try:
    with urllib.request.urlopen(request, timeout=timeout) as response:
      status, text = response.status, response.read().decode()
  except urllib.error.HTTPError as e:
    status, text = e.code, e.read().decode()
  try:
    return status, json.loads(text)
  except json.JSONDecodeError:
    return status, text


def scene_request(spec, image, rubric='alignment', top_logprobs=5, **kwargs):
  return protocol.chat_request(
    'oracle',
    'rate it',
    [image],
    top_logprobs=top_logprobs,
    context=context.judge_context(rubric, spec.category, {'spec': spec}),
    **kwargs,
  )


@pytest.fixture(scope='module')
def scenes():
  specs = W.sample_scenes(11, 4)
  images = R.render_batch(specs, 64)
  images[1] = np.clip(
    images[1].astype(int) + np.random.default_rng(0).normal(0, 40, images[1].shape), 0, 255
  ).astype(np.uint8)
  images[0] = R.render_batch(W.sample_scenes(5, 1), 64)[0]  # another general scene
  return specs, images


def test_health_and_models(oracle_server):
  status, health = http(oracle_server.url + '/health')
  assert status == 200 and health['status'] == 'ok' and health['model'] == 'oracle'
  status, models = http(oracle_server.base_url + '/models')
  assert status == 200 and [m['id'] for m in models['data']] == ['oracle']


def test_reply_format_and_readout(oracle_server, scenes):
  specs, images = scenes
  want = make_reward('alignment')(
    RewardBatch(
      images=images,
      prompts=['p'] * 4,
      categories=[s.category for s in specs],
      sample_ids=np.arange(4),
      meta=[{'spec': s} for s in specs],
    )
  )['alignment']
  assert want.min() < 0.6  # the wrong scene scores low: not every reply is "5"
  tokens = set()
  for spec, image, expected in zip(specs, images, want):
    status, reply = http(oracle_server.base_url + '/chat/completions', scene_request(spec, image))
    assert status == 200, reply
    assert reply['object'] == 'chat.completion' and reply['model'] == 'oracle'
    choice = reply['choices'][0]
    content = choice['logprobs']['content']
    assert len(content) == 1 and choice['message']['content'] == content[0]['token']
    top = content[0]['top_logprobs']
    assert sorted(t['token'] for t in top) == list(protocol.SCORE_TOKENS)
    assert [t['logprob'] for t in top] == sorted((t['logprob'] for t in top), reverse=True)
    assert top[0]['token'] == content[0]['token']  # greedy: the reply is the most likely score
    tokens.add(content[0]['token'])
    assert np.float32(protocol.expected_score(content)) == expected  # bit for bit
  assert len(tokens) > 1
  status, reply = http(
    oracle_server.base_url + '/chat/completions', scene_request(specs[0], images[0], top_logprobs=2)
  )
  assert len(reply['choices'][0]['logprobs']['content'][0]['top_logprobs']) == 2
  body = scene_request(specs[0], images[0])
  body.pop('top_logprobs')
  body['logprobs'] = False
  status, reply = http(oracle_server.base_url + '/chat/completions', body)
  assert status == 200 and reply['choices'][0]['logprobs'] is None
  assert reply['choices'][0]['message']['content'] in protocol.SCORE_TOKENS


def _malformed_cases(spec, image):
  good = scene_request(spec, image)

  def edited(fn):
    body = json.loads(json.dumps(good))
    fn(body)
    return body

  def set_url(url):
    return edited(lambda b: b['messages'][0]['content'][1]['image_url'].update(url=url))

  not_image = 'data:image/png;base64,' + base64.b64encode(b'not an image at all').decode()
  spec_other = W.sample_scenes(2, 3)[2]  # a portrait spec under a general category
  return [
    (b'{"model": "oracle", "messages": [', 'not valid JSON'),
    (edited(lambda b: b.pop('messages')), 'messages'),
    (edited(lambda b: b['messages'][0].update(role='robot')), 'role'),
    (set_url('data:image/png;base64,@@@not-base64@@@'), 'base64'),
    (set_url(not_image), 'undecodable image'),
    (set_url('http://example.com/cat.png'), 'remote URLs are not fetched'),
    (edited(lambda b: b.update(top_logprobs=99)), 'top_logprobs'),
    (edited(lambda b: b.pop(protocol.JUDGE_CONTEXT)), 'judge_context'),
    (edited(lambda b: b[protocol.JUDGE_CONTEXT].update(rubric='vibes')), 'rubric'),
    (edited(lambda b: b[protocol.JUDGE_CONTEXT].update(spec=W.to_dict(spec_other))), 'misaligned'),
    (edited(lambda b: b[protocol.JUDGE_CONTEXT].update(rubric='preservation')), 'needs 2 image'),
  ]


def test_malformed_requests_get_400_with_a_message(oracle_server, scenes):
  specs, images = scenes
  assert specs[0].category == 'general'
  for body, message in _malformed_cases(specs[0], images[0]):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    status, reply = http(oracle_server.base_url + '/chat/completions', raw=raw)
    assert status == 400, (message, reply)
    assert message in reply['error']['message'], reply
  status, reply = http(
    oracle_server.base_url + '/chat/completions',
    dict(scene_request(specs[0], images[0]), model='gpt-judge'),
  )
  assert status == 404 and 'gpt-judge' in reply['error']['message']
  status, _ = http(oracle_server.url + '/health')
  assert status == 200  # still serving


def test_oversized_request_gets_413(oracle_server, scenes):
  specs, images = scenes
  noise = np.random.default_rng(1).integers(0, 256, (400, 400, 3), np.uint8)  # ~480 KB as PNG
  body = scene_request(specs[0], noise)
  status, reply = http(oracle_server.base_url + '/chat/completions', body)
  assert status == 413 and 'exceeds the limit' in reply['error']['message']
  status, _ = http(oracle_server.base_url + '/chat/completions', scene_request(specs[0], images[0]))
  assert status == 200


def test_bearer_token(judge_servers, scenes, monkeypatch):  # noqa: F811
  specs, images = scenes
  server = judge_servers.start(
    '--judge=oracle', f'--api_key_env={KEY_ENV}', env={KEY_ENV: 'right-key'}
  )
  url = server.base_url + '/chat/completions'
  body = scene_request(specs[0], images[0])
  for headers in ({}, {'Authorization': 'Bearer wrong-key'}, {'Authorization': 'right-key'}):
    status, reply = http(url, body, headers)
    assert status == 401 and 'API key' in reply['error']['message']
  assert http(server.base_url + '/models')[0] == 401
  assert http(url, body, {'Authorization': 'Bearer right-key'})[0] == 200
  assert http(server.url + '/health')[0] == 200  # health checks need no key


def test_cli_errors(capsys, tmp_path, monkeypatch):
  with pytest.raises(SystemExit) as exit_info:
    serve.main(['--judge', str(tmp_path)])
  assert exit_info.value.code == 2
  assert 'not a loadable judge export' in capsys.readouterr().err
  with pytest.raises(SystemExit):
    serve.main(['--judge=gpt'])
  assert 'expected "oracle"' in capsys.readouterr().err
  monkeypatch.delenv(KEY_ENV, raising=False)
  with pytest.raises(SystemExit):
    serve.main(['--judge=oracle', f'--api_key_env={KEY_ENV}'])
  assert f'${KEY_ENV} is unset' in capsys.readouterr().err


def test_batcher_batches_and_keeps_replies_with_their_requests():
  import asyncio

  from qwen_image_rl.serving.batcher import Batcher

  calls = []

  def judge(items):
    calls.append(list(items))
    if -1 in items:
      raise RuntimeError('judge exploded')
    return [f'reply to {item}' for item in items]

  async def run():
    batcher = Batcher(judge, max_batch=8, max_wait_s=0.01)
    batcher.start()
    try:
      replies = await asyncio.gather(*(batcher.submit(i) for i in range(40)))
      failed = await asyncio.gather(batcher.submit(-1), return_exceptions=True)
      after = await batcher.submit(99)
    finally:
      await batcher.stop()
    return replies, failed, after, batcher.stats

  replies, failed, after, stats = asyncio.run(run())
  assert replies == [f'reply to {i}' for i in range(40)]
  assert all(len(c) <= 8 for c in calls) and len(calls[0]) == 8  # full batches under load
  assert sorted(i for c in calls[:-2] for i in c) == list(range(40))  # each scored once
  assert isinstance(failed[0], RuntimeError) and after == 'reply to 99'
  assert stats['requests'] == 41 and stats['max_batch_seen'] == 8
