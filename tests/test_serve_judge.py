"""A learned judge served (python -m qwen_image_rl.serve --judge=DIR) on a tiny random judge
export: the rewards through the server are the in-process judge's bit for bit, and the reply's
text and log-probs follow the OpenAI/vLLM format."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from judge_servers import ServerFactory
from test_serve import http

from qwen_image_rl import serve
from qwen_image_rl.judges import judge_data as D
from qwen_image_rl.judges import prompts as P
from qwen_image_rl.judges import vlm_judge as V
from qwen_image_rl.rewards.base import RewardBatch
from qwen_image_rl.rewards.registry import make_reward
from qwen_image_rl.serving import protocol, vlm
from tests import tiny_reference

# Scaling the tied " Score" embedding by this makes the random judge stop at once on some
# samples, after a few chain-of-thought tokens on one and never on another (checked below).
MARKER_SCALE = -9.5


@pytest.fixture(scope='module')
def judge_dir(tmp_path_factory):
  """A tiny random judge (the reward_sft model at toy width), exported as reward_sft does."""
  import flax

  from qwen_image_rl.trainers import reward_sft

  config = tiny_reference.tiny_judge_config()
  directory = str(tmp_path_factory.mktemp('judge'))
  tokenizer = V.build_judge_tokenizer(directory)
  model = reward_sft.build_model(config, tokenizer)
  params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))['params']
  params = jax.tree.map(np.array, flax.core.meta.unbox(params))
  marker = V.ScoreTokens.from_tokenizer(tokenizer).marker
  params['language_model']['embed_tokens']['embedding'][marker] *= MARKER_SCALE
  judge = V.VLMJudge(model, params, tokenizer, reward_sft.build_processor(config), max_cot_tokens=6)
  judge.save(directory)
  return directory


def t2i_batch():
  ds = D.t2i_set(12, 2, 'val', 64)
  return RewardBatch(
    images=ds.images,
    prompts=list(ds.prompts),
    categories=list(ds.categories),
    sample_ids=np.arange(len(ds)) + 500,
  )


def test_a_judge_request_renders_to_the_judges_training_prompt():
  from qwen_image_rl.rewards.remote import RemoteReward

  batch = t2i_batch()
  for rubric, task in (('alignment', 'alignment'), ('portrait', 'portrait')):
    reward = RemoteReward(rubric=rubric, prompt_format='judge', send_context=False)
    try:
      parsed = protocol.parse_chat_request(reward.request_body(batch, 1))
    finally:
      reward.close()
    assert vlm.render_chat(parsed['messages']) == P.chat_prompt(task, batch.prompts[1])
    np.testing.assert_array_equal(parsed['images'][0], batch.images[1])
  # Without a system message the chat template's default one is used, as vLLM's Qwen template.
  assert vlm.render_chat([('user', [('text', 'hi')])]).startswith(
    f'<|im_start|>system\n{vlm.DEFAULT_SYSTEM}<|im_end|>\n<|im_start|>user\nhi<|im_end|>'
  )
  with pytest.raises(ValueError, match='prompt_format'):
    RemoteReward(rubric='identity', prompt_format='judge')


@pytest.mark.slow  # a judge server process: JAX start-up and compiles (~1 min on 2 cores)
def test_served_judge_rewards_are_bit_identical_to_in_process(judge_dir):
  from qwen_image_rl.judges.rewards import load_judge

  batch = t2i_batch()
  n = batch.size
  want = make_reward('judge_alignment', judge_dir=judge_dir)(batch)['judge_alignment']
  in_process = load_judge(judge_dir).score('alignment', batch.images, list(batch.prompts))
  # The fixture's judge covers the cases: scored at once, after a chain of thought, never.
  cot_lengths = [len(c) for c, ok in zip(in_process.cot, in_process.valid) if ok]
  assert in_process.invalid_count >= 1 and 0 in cot_lengths and max(cot_lengths) > 0
  assert np.isnan(want).sum() == in_process.invalid_count

  factory = ServerFactory()
  try:
    # One server batch holds the whole reward batch (max_batch = n), as in-process.
    server = factory.start(
      f'--judge={judge_dir}', '--model_name=judge', f'--max_batch={n}', '--max_wait_ms=5000'
    )
    remote = make_reward(
      'remote_alignment',
      base_url=server.base_url,
      model='judge',
      prompt_format='judge',
      max_tokens=16,
      send_context=False,
      max_concurrency=n,
      timeout_s=900.0,  # the server compiles on the first batch; a retry would re-batch
    )
    got = remote(batch)['remote_alignment']
    np.testing.assert_array_equal(got.astype(np.float32), want)
    assert remote.last_metrics['remote/remote_alignment/invalid'] == in_process.invalid_count
    assert http(server.url + '/health')[1]['max_batch_seen'] == n
    remote.close()

    # One reply in full: text, per-token log-probs and top-k as vLLM returns them.
    body = remote.request_body(batch, int(np.argmax([len(c) for c in in_process.cot])))
    body['top_logprobs'] = 5
    status, reply = http(server.base_url + '/chat/completions', body, timeout=600)  # compiles
    assert status == 200, reply
    check_reply(reply, max_cot_tokens=6)
  finally:
    factory.kill_all()


def check_reply(reply, max_cot_tokens):
  text = reply['choices'][0]['message']['content']
  content = protocol.reply_token_logprobs(reply)
  assert reply['usage']['completion_tokens'] == len(content) <= max_cot_tokens + 4
  assert ''.join(e['token'] for e in content) == text
  assert text.endswith(' Score: ' + content[-1]['token'])
  for entry in content:
    top = [a['logprob'] for a in entry['top_logprobs']]
    assert len(top) == 5 and top == sorted(top, reverse=True) and all(lp <= 0 for lp in top)
  # The chain of thought and the marker were decoded greedily: each is its position's top-1.
  for entry in content[:-3]:
    assert entry['token'] == entry['top_logprobs'][0]['token']
    assert math.isclose(entry['logprob'], entry['top_logprobs'][0]['logprob'], rel_tol=1e-6)
  # The score token: the answer format's distribution over the five digits, best first.
  score = content[-1]
  assert sorted(a['token'] for a in score['top_logprobs']) == list(P.SCORE_DIGITS)
  assert score['token'] == score['top_logprobs'][0]['token']
  total = math.fsum(math.exp(a['logprob']) for a in score['top_logprobs'])
  assert math.isclose(total, 1.0, rel_tol=1e-6)  # float32 log-softmax


def test_a_judge_reply_is_read_after_its_score_marker_only():
  def entry(token, alternatives=()):
    return {
      'token': token,
      'logprob': -0.1,
      'top_logprobs': [{'token': t, 'logprob': lp} for t, lp in alternatives],
    }

  cot_digit = [entry('count'), entry(' 3'), entry('.')]  # reasoning that holds a digit
  assert protocol.expected_score(cot_digit) is not None  # the plain readout takes it
  assert protocol.expected_score(cot_digit, after='Score:') is None  # a judge's does not
  scored = cot_digit + [entry(' Score'), entry(':'), entry(' ')]
  scored.append(entry('5', [('5', math.log(0.75)), ('1', math.log(0.25))]))
  assert protocol.expected_score(scored, after='Score:') == pytest.approx(0.75, rel=1e-15)


def test_bad_judge_directories_are_refused_with_the_reason(tmp_path, capsys):
  with pytest.raises(ValueError, match='not a loadable judge export'):
    vlm.load(str(tmp_path))
  (tmp_path / 'config.json').write_text('{not json')
  (tmp_path / V.PREPROCESSOR_CONFIG).write_text(json.dumps({'patch_size': 8}))
  with pytest.raises(ValueError, match='not a loadable judge export'):
    vlm.load(str(tmp_path))
  with pytest.raises(SystemExit) as exit_info:
    serve.main(['--judge', str(tmp_path / 'missing')])
  assert exit_info.value.code == 2
  assert 'expected "oracle" or an existing judge directory' in capsys.readouterr().err


@pytest.mark.parametrize(
  'setting, refusal',
  [
    ('describe_first', 'describe_first judge .* is not served yet'),
    ('decompose', 'decompose judge .* without chain of thought only'),
  ],
)
def test_judges_whose_chain_of_thought_the_server_does_not_write_are_refused(
  judge_dir, tmp_path, setting, refusal
):
  directory = str(tmp_path / setting)
  judge = V.VLMJudge.load(judge_dir)
  setattr(judge, setting, True)
  judge.save(directory)
  with pytest.raises(ValueError, match=refusal):
    vlm.load(directory)
  if setting == 'decompose':  # its no-CoT answer is the one the server reads
    assert vlm.load(directory, cot=False).judge.decompose
