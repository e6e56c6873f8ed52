"""A reward scored by a judge behind any OpenAI-compatible chat-completions endpoint.

Ours (`python -m qwen_image_rl.serve --judge=oracle`) or vLLM serving a Qwen2.5-VL judge. One
request per sample: the rubric's prompt text and the image(s) as PNG data URIs, greedy decoding
with `logprobs: true, top_logprobs: k`. The reward is the expected score over the score tokens
"1".."5" at the reply's last score position, renormalised over the five values
(serving/protocol.py `expected_score`); scale='unit' maps it to [0, 1] as (E - 1)/4, the oracle
rewards' scale, scale='raw' keeps E in [1, 5].

Failure handling, per sample:
  * a reply without a score token is INVALID: NaN, counted in `invalid`, never a number;
  * connection errors, timeouts, HTTP 408/429/5xx and garbage replies (not JSON, not a
    chat.completion with log-probs, an echoed X-Request-Id of another request) are retried
    up to `max_retries` times with exponential backoff and full jitter
    (sleep ~ U(0, min(backoff_max_s, backoff_base_s * 2^attempt))); a sample whose retries run out
    is FAILED: NaN, counted in `failures`;
  * other HTTP errors (400, 401, 403, 404, 413) are configuration errors and raise
    RemoteRewardError at once (a wrong key or model will not fix itself);
  * `max_consecutive_failures` failed samples in a row raise RemoteRewardError: the run stops
    (the trainer propagates reward errors; orbax only ever renames complete checkpoints, so the
    last one stays intact) instead of training on NaN-skipped iterations forever.
NaN rewards make the GRPO trainer skip that iteration's update (rl.max_consecutive_nonfinite).

At most `max_concurrency` requests are in flight. Each response is matched to its sample by its
request (and by the X-Request-Id the server echoes, when it does), so no score is lost, moved or
counted twice. `last_metrics` holds the latest call's latency p50/p95 (per sample, from its first
attempt to its reply, retries included, queueing for a free slot not), retries, failures and
invalid replies (`remote/<name>/...`), for TensorBoard; the async pipeline attaches them to each
RewardResult (`extra_metrics`, included in `RewardResult.metrics()`). The reward is thread-safe:
concurrent calls (AsyncRewardPipeline(workers > 1)) share one event loop and connection pool,
and `last_metrics` is per calling thread.

A learned judge (ours, `serve --judge=DIR`, or a reward_sft export served by vLLM) is asked with
prompt_format='judge': the judge's own training prompt, the system message `prompts.SYSTEM` and
a user turn with the image(s) then the rubric and the caption, so the served judge sees the
tokens it was trained on, and its score is read only after " Score:" (its chain of thought may
hold digits); max_tokens must cover the chain of thought plus " Score: d" (4 more tokens):

  c.rewards.kwargs = {'remote_alignment': {'base_url': ..., 'model': 'judge',
                                           'prompt_format': 'judge', 'max_tokens': 64,
                                           'send_context': False}}

Config (rewards registered as `remote` and `remote_<rubric>`):
  c.rewards.names = ('remote_alignment', 'aesthetics', 'portrait')
  c.rewards.kwargs = {'remote_alignment': {'base_url': 'http://judge-host:8000/v1',
                                           'model': 'qwen2.5-vl-judge',
                                           'api_key_env': 'JUDGE_API_KEY'}}
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import random
import secrets
import threading
import time
import weakref
from typing import Any

import aiohttp
import numpy as np

from qwen_image_rl.judges import prompts as judge_prompts
from qwen_image_rl.rewards.base import RewardBatch, RewardError, RewardFn
from qwen_image_rl.rewards.registry import register_reward
from qwen_image_rl.serving import context as context_lib
from qwen_image_rl.serving import protocol

RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_DIGITS = 'Answer with a single digit from 1 (worst) to 5 (best).'
# No-CoT prompts following the paper's rubrics; a CoT judge takes its own via prompt_template.
PROMPTS = {
  'alignment': (
    'Rate how well the image matches the prompt "{prompt}". Check presence and '
    'count first, then attributes, then spatial relations, then pose; failing a '
    'higher-priority item caps the score low. ' + _DIGITS
  ),
  'aesthetics': 'Rate the visual quality of the image: sharpness, noise, artefacts. ' + _DIGITS,
  'portrait': (
    'Rate the face in the image for the prompt "{prompt}": a well-formed face '
    'without distortions scores high. ' + _DIGITS
  ),
  'instruction_following': (
    'The first image is the source, the second the edited output. '
    'Rate how well the output follows the instruction "{prompt}", '
    'core requirements first. ' + _DIGITS
  ),
  'identity': (
    'The first image is the source, the second the edited output ("{prompt}"). '
    'Rate how well the person keeps their identity. ' + _DIGITS
  ),
  'preservation': (
    'The first image is the source, the second the edited output ("{prompt}"). '
    'Rate how well everything the instruction does not ask to change is '
    'kept. ' + _DIGITS
  ),
}


# prompt_format='judge': the remote rubric -> the learned judges' task (judges/prompts.py).
JUDGE_TASKS = {
  'alignment': 'alignment',
  'aesthetics': 'aesthetics',
  'portrait': 'portrait',
  'instruction_following': 'instruction',
}
PROMPT_FORMATS = ('plain', 'judge')
# A judge's chain of thought may hold digits: its score is the token after this text.
JUDGE_SCORE_MARK = judge_prompts.SCORE_MARK.strip() + ':'


class RemoteRewardError(RewardError):
  """The judge endpoint failed in a way retrying cannot fix; the run should stop."""


class _Retryable(Exception):
  """One attempt failed in a way a retry may fix."""


class _LoopThread:
  """An event loop on a daemon thread: `run(coro)` from any thread blocks for its result.

  One loop for the reward's lifetime keeps its HTTP connections alive between batches (a new
  loop per batch would reconnect, and redo TLS, every time).
  """

  def __init__(self, name: str):
    self.session: aiohttp.ClientSession | None = None  # created and used on the loop
    self.loop = asyncio.new_event_loop()
    self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
    self._thread.start()

  def run(self, coro):
    if self.loop.is_closed():
      coro.close()
      raise RemoteRewardError('the remote reward was closed')
    return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

  def close(self) -> None:
    if self.loop.is_closed():
      return
    if self.session is not None:
      asyncio.run_coroutine_threadsafe(self.session.close(), self.loop).result()
      self.session = None
    self.loop.call_soon_threadsafe(self.loop.stop)
    self._thread.join()
    self.loop.close()


@dataclasses.dataclass
class _Outcome:
  index: int
  value: float  # NaN for failed / invalid
  status: str  # 'ok' | 'invalid' | 'failed'
  seconds: float
  retries: int
  error: str = ''


class RemoteReward(RewardFn):
  """Scores each sample with one chat-completions request to a judge endpoint.

  Args:
    name: the score's name.
    rubric: which judge prompt (and, for the oracle judge, which oracle score) to ask for; edit
      rubrics send the source image then the output.
    base_url: the API root, e.g. 'http://127.0.0.1:8000/v1'.
    model: the served model name.
    api_key_env: environment variable holding the bearer key ('' sends none).
    max_concurrency: requests in flight at most.
    timeout_s: per-attempt timeout (connect + reply).
    max_retries: retries after the first attempt of a sample.
    backoff_base_s, backoff_max_s: exponential backoff with full jitter between attempts.
    max_consecutive_failures: failed samples in a row that raise RemoteRewardError.
    top_logprobs: alternatives requested per token (>= 5 sees all five scores).
    max_tokens: generation budget (1 for a no-CoT judge; a CoT judge needs its reasoning's).
    scale: 'unit' ((E - 1)/4 in [0, 1]) or 'raw' (E in [1, 5]).
    send_context: send the tiny world's ground truth in `judge_context` (the oracle judge needs
      it; a learned judge ignores it).
    prompt_template: overrides the rubric's prompt; '{prompt}' is replaced by the sample's prompt.
    prompt_format: 'plain' (the rubric's one-message prompt above) or 'judge' (a learned judge's
      training prompt: system message, then the image(s) and the rubric with the caption).
    seed: seeds the backoff jitter.
  """

  def __init__(
    self,
    name: str = 'remote',
    rubric: str = 'alignment',
    base_url: str = 'http://127.0.0.1:8000/v1',
    model: str = 'oracle',
    api_key_env: str = '',
    max_concurrency: int = 16,
    timeout_s: float = 60.0,
    max_retries: int = 4,
    backoff_base_s: float = 0.5,
    backoff_max_s: float = 8.0,
    max_consecutive_failures: int = 16,
    top_logprobs: int = 5,
    max_tokens: int = 1,
    scale: str = 'unit',
    send_context: bool = True,
    prompt_template: str | None = None,
    prompt_format: str = 'plain',
    seed: int = 0,
  ):
    if rubric not in context_lib.RUBRICS:
      raise ValueError(f'remote reward rubric={rubric!r}: choose one of {context_lib.RUBRICS}')
    if scale not in protocol.SCALES:
      raise ValueError(f'remote reward scale={scale!r}: choose one of {protocol.SCALES}')
    if not isinstance(base_url, str) or not base_url.startswith(('http://', 'https://')):
      raise ValueError(f'remote reward base_url={base_url!r}: expected http(s)://host:port/v1')
    for field, value, low in (
      ('max_concurrency', max_concurrency, 1),
      ('max_retries', max_retries, 0),
      ('max_consecutive_failures', max_consecutive_failures, 1),
      ('top_logprobs', top_logprobs, 1),
      ('max_tokens', max_tokens, 1),
    ):
      if not isinstance(value, int) or value < low:
        raise ValueError(f'remote reward {field}={value!r} must be an int >= {low}')
    if top_logprobs > protocol.MAX_TOP_LOGPROBS:
      raise ValueError(
        f'remote reward top_logprobs={top_logprobs} exceeds {protocol.MAX_TOP_LOGPROBS}'
      )
    if not (timeout_s > 0 and backoff_base_s >= 0 and backoff_max_s >= backoff_base_s):
      raise ValueError(
        f'remote reward needs timeout_s > 0 and 0 <= backoff_base_s <= '
        f'backoff_max_s; got {timeout_s}, {backoff_base_s}, {backoff_max_s}'
      )
    if prompt_format not in PROMPT_FORMATS:
      raise ValueError(f'remote reward prompt_format={prompt_format!r}: one of {PROMPT_FORMATS}')
    if prompt_format == 'judge' and (rubric not in JUDGE_TASKS or prompt_template is not None):
      raise ValueError(
        f"remote reward prompt_format='judge' asks a learned judge in its own prompt: rubric "
        f'must be one of {sorted(JUDGE_TASKS)} (got {rubric!r}) and prompt_template unset'
      )
    self.prompt_format = prompt_format
    template = PROMPTS[rubric] if prompt_template is None else prompt_template
    try:
      template.format(prompt='')
    except (KeyError, IndexError, ValueError) as e:
      raise ValueError(
        f'remote reward prompt_template {template!r}: only {{prompt}} may be substituted ({e})'
      ) from None
    self.name, self.names = name, (name,)
    self.rubric, self.model, self.scale = rubric, model, scale
    self.url = base_url.rstrip('/') + '/chat/completions'
    self.api_key_env = api_key_env
    self.max_concurrency, self.timeout_s, self.max_retries = max_concurrency, timeout_s, max_retries
    self.backoff_base_s, self.backoff_max_s = backoff_base_s, backoff_max_s
    self.max_consecutive_failures = max_consecutive_failures
    self.top_logprobs, self.max_tokens = top_logprobs, max_tokens
    self.send_context, self.template = send_context, template
    self._rng = random.Random(seed)
    self._consecutive_failures = 0
    self.totals = {'requests': 0, 'retries': 0, 'failures': 0, 'invalid': 0}
    self._totals_lock = threading.Lock()
    self._local = threading.local()  # last_metrics per calling thread (pipeline workers)
    self._loop = _LoopThread(f'remote-reward-{name}')
    weakref.finalize(self, self._loop.close)

  # --- requests ---------------------------------------------------------------------------

  def _headers(self) -> dict:
    headers = {'Content-Type': 'application/json'}
    if self.api_key_env:
      key = os.environ.get(self.api_key_env, '')
      if not key:
        raise RemoteRewardError(
          f'remote reward {self.name!r}: api_key_env='
          f'{self.api_key_env!r} but ${self.api_key_env} is unset or empty'
        )
      headers['Authorization'] = f'Bearer {key}'
    return headers

  def request_body(self, batch: RewardBatch, i: int) -> dict:
    """The chat-completions body for sample i."""
    edit = self.rubric in context_lib.EDIT_RUBRICS
    if edit and batch.source_images is None:
      raise ValueError(
        f'remote reward {self.name!r} (rubric {self.rubric!r}) needs batch.source_images'
      )
    images = [batch.source_images[i], batch.images[i]] if edit else [batch.images[i]]
    context = None
    if self.send_context:
      context = context_lib.judge_context(
        self.rubric, batch.categories[i], None if batch.meta is None else batch.meta[i]
      )
    judge = self.prompt_format == 'judge'
    prompt = batch.prompts[i]
    return protocol.chat_request(
      self.model,
      self._judge_text(prompt) if judge else self.template.format(prompt=prompt),
      images,
      top_logprobs=self.top_logprobs,
      max_tokens=self.max_tokens,
      context=context,
      system=judge_prompts.SYSTEM if judge else None,
      images_first=judge,
    )

  def _judge_text(self, prompt: str) -> str:
    """The judge's user text after its image placeholders (they travel as image parts)."""
    task = JUDGE_TASKS[self.rubric]
    text = judge_prompts.user_text(task, prompt)
    return text[len(judge_prompts.IMAGE) * judge_prompts.NUM_IMAGES[task] :]

  def _backoff(self, attempt: int) -> float:
    return self._rng.uniform(0, min(self.backoff_max_s, self.backoff_base_s * 2**attempt))

  async def _attempt(self, session, data: bytes, request_id: str, headers: dict) -> float | None:
    """One POST; the readout, None for an invalid reply; raises _Retryable or
    RemoteRewardError."""
    try:
      async with session.post(
        self.url, data=data, headers={**headers, 'X-Request-Id': request_id}
      ) as resp:
        text = await resp.text(errors='replace')
        status, echoed = resp.status, resp.headers.get('X-Request-Id')
    except (TimeoutError, aiohttp.ClientError) as e:
      raise _Retryable(f'{type(e).__name__}: {e}') from None
    if status in RETRYABLE_STATUS:
      raise _Retryable(f'HTTP {status}: {text[:200]}')
    if status != 200:
      raise RemoteRewardError(
        f'remote reward {self.name!r}: {self.url} answered HTTP {status}: '
        f'{text[:500]}; check base_url, model, api_key_env and the '
        f'request size'
      )
    if echoed is not None and echoed != request_id:
      raise _Retryable(f'reply is for request {echoed!r}, sent {request_id!r}')
    try:
      content = protocol.reply_token_logprobs(json.loads(text))
    except (json.JSONDecodeError, protocol.ProtocolError) as e:
      raise _Retryable(f'garbage reply ({e}): {text[:200]!r}') from None
    after = JUDGE_SCORE_MARK if self.prompt_format == 'judge' else None
    return protocol.expected_score(content, self.scale, after)

  async def _one(
    self, session, slots: asyncio.Semaphore, index: int, data: bytes, request_id: str, headers: dict
  ) -> _Outcome:
    start, error = None, ''  # latency counts from the first attempt, not the wait for a slot
    for attempt in range(self.max_retries + 1):
      if attempt:
        await asyncio.sleep(self._backoff(attempt - 1))
      async with slots:
        start = time.perf_counter() if start is None else start
        try:
          value = await asyncio.wait_for(
            self._attempt(session, data, request_id, headers), self.timeout_s
          )
        except (TimeoutError, _Retryable) as e:
          error = str(e) or f'timed out after {self.timeout_s} s'
          continue
      self._consecutive_failures = 0
      status = 'invalid' if value is None else 'ok'
      return _Outcome(
        index,
        float('nan') if value is None else value,
        status,
        time.perf_counter() - start,
        attempt,
      )
    self._consecutive_failures += 1
    if self._consecutive_failures >= self.max_consecutive_failures:
      raise RemoteRewardError(
        f'remote reward {self.name!r}: {self._consecutive_failures} consecutive samples failed '
        f'after {self.max_retries} retries each (last: {error}); is the judge at {self.url} '
        f'up? Stopping.'
      )
    return _Outcome(
      index, float('nan'), 'failed', time.perf_counter() - start, self.max_retries, error
    )

  async def _score_all(self, bodies: list[bytes], request_ids: list[str]) -> list[_Outcome]:
    headers = self._headers()
    if self._loop.session is None:  # Kept open across calls: connections are reused.
      self._loop.session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=self.max_concurrency),
        timeout=aiohttp.ClientTimeout(total=None),
      )
    slots = asyncio.Semaphore(self.max_concurrency)
    tasks = [
      asyncio.create_task(self._one(self._loop.session, slots, i, body, rid, headers))
      for i, (body, rid) in enumerate(zip(bodies, request_ids))
    ]
    try:
      return await asyncio.gather(*tasks)
    finally:
      for task in tasks:
        task.cancel()
      await asyncio.gather(*tasks, return_exceptions=True)

  @property
  def last_metrics(self) -> dict[str, float]:
    """Metrics of this thread's latest call (a pipeline worker reads its own batch's)."""
    return dict(getattr(self._local, 'metrics', {}))

  def close(self) -> None:
    """Closes the HTTP connections and stops the client's event-loop thread. Idempotent."""
    self._loop.close()

  # --- the reward -------------------------------------------------------------------------

  def score(self, batch: RewardBatch) -> dict[str, np.ndarray]:
    bodies = [json.dumps(self.request_body(batch, i)).encode() for i in range(batch.size)]
    nonce = secrets.token_hex(4)
    request_ids = [f'{nonce}-{int(sid)}' for sid in batch.sample_ids]
    outcomes = self._loop.run(self._score_all(bodies, request_ids))
    if [o.index for o in outcomes] != list(range(batch.size)):  # bookkeeping guard
      raise RemoteRewardError(f'remote reward {self.name!r}: outcomes out of order')
    self._record(outcomes)
    return {self.name: np.array([o.value for o in outcomes], np.float64)}

  def _record(self, outcomes: list[_Outcome]) -> None:
    counts = {
      status: sum(o.status == status for o in outcomes) for status in ('ok', 'invalid', 'failed')
    }
    retries = sum(o.retries for o in outcomes)
    answered = [o.seconds for o in outcomes if o.status != 'failed']
    p50, p95 = np.percentile(answered, [50, 95]) if answered else (float('nan'),) * 2
    with self._totals_lock:
      for key, value in (
        ('requests', len(outcomes)),
        ('retries', retries),
        ('failures', counts['failed']),
        ('invalid', counts['invalid']),
      ):
        self.totals[key] += value
    prefix = f'remote/{self.name}'
    self._local.metrics = {
      f'{prefix}/latency_p50_s': float(p50),
      f'{prefix}/latency_p95_s': float(p95),
      f'{prefix}/requests': float(len(outcomes)),
      f'{prefix}/retries': float(retries),
      f'{prefix}/failures': float(counts['failed']),
      f'{prefix}/invalid': float(counts['invalid']),
    }


def _rubric_factory(rubric: str):
  def make(**kwargs: Any) -> RemoteReward:
    kwargs.setdefault('name', f'remote_{rubric}')
    kwargs.setdefault('rubric', rubric)
    return RemoteReward(**kwargs)

  make.__qualname__ = f'remote_{rubric}'
  return make


register_reward('remote')(RemoteReward)
for _rubric in context_lib.RUBRICS:
  register_reward(f'remote_{_rubric}')(_rubric_factory(_rubric))
