"""A learned VLM judge (a reward_sft export, judges/vlm_judge.py) behind the judge API.

  judge = load('runs/demo/judge/export/judge')    # ValueError naming the problem for a bad dir

A request is rendered with Qwen2.5-VL's chat template, as vLLM renders it: each message as
`<|im_start|>ROLE\\n...<|im_end|>\\n` with an image part as
`<|vision_start|><|image_pad|><|vision_end|>`, the default system message when none is given,
then the assistant header. A client reproduces the judge's training prompt by sending the
system message `prompts.SYSTEM` and a user message with the image(s) then
`RUBRIC\\nprompt: CAPTION` (rewards/remote.py, prompt_format='judge').

A server batch is scored exactly as `VLMJudge.score` scores a batch: greedy chain of thought
until the " Score" marker, then one forward pass over prompt + CoT + " Score: " whose score
position gives the five digits' logits. The reply is `<CoT> Score: <digit>`: the score token is
decoded under the answer format (only "1".."5" allowed, as constrained decoding would) and its
log-probs are that constrained distribution, log-softmax over the five digit logits (vLLM's
`processed_logprobs`); a client's expected-score readout of them is the in-process reward bit
for bit. Every other reply token carries the model's full-vocabulary log-prob and top-k, from
one teacher-forced forward pass. A sample that never emits the marker within `max_cot_tokens`
replies with what it generated and no score token: the client reads it as invalid (NaN), as
the in-process judge does.

Bit-identity holds per batch: the judge's numbers depend at the float32 ulp level on the padded
length and batch shape, so a sample scored in a server batch equals the in-process score of
the same set of samples (in any order); across different batchings they agree to ~1e-7.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qwen_image_rl.judges import prompts as P
from qwen_image_rl.judges import vlm_judge as V
from qwen_image_rl.models.qwen2_5_vl_processor import expand_image_tokens
from qwen_image_rl.serving import protocol
from qwen_image_rl.serving.judges import Judge, JudgeInputError, JudgeReply

DEFAULT_SYSTEM = 'You are a helpful assistant.'  # Qwen2.5-VL's chat template's default
ROLES = ('system', 'user', 'assistant')


def render_chat(messages: Sequence[tuple[str, Sequence[tuple[str, object]]]]) -> str:
  """Qwen2.5-VL's chat template with the generation prompt; messages as parse_chat_request's."""
  out = []
  if not messages or messages[0][0] != 'system':
    out.append(f'<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n')
  for role, parts in messages:
    body = ''.join(P.IMAGE if kind == 'image' else str(value) for kind, value in parts)
    out.append(f'<|im_start|>{role}\n{body}<|im_end|>\n')
  return ''.join(out) + '<|im_start|>assistant\n'


@dataclasses.dataclass(frozen=True)
class _Request:
  ids: list[int]
  pixel_values: np.ndarray
  grids: np.ndarray  # [images, 3]


@functools.partial(jax.jit, static_argnames=('k',))
def _token_logprobs(logits, tokens, k: int):
  """log p of `tokens` [B, K] and the top-k (log p, id) [B, K, k] under logits [B, K, V]."""
  logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  chosen = jnp.take_along_axis(logprobs, tokens[..., None], axis=-1)[..., 0]
  top, ids = jax.lax.top_k(logprobs, k)
  return chosen, top, ids


class VLMServedJudge(Judge):
  """`VLMJudge` batched behind the chat-completions API (chain of thought unless cot=False)."""

  def __init__(self, judge: V.VLMJudge, model_name: str = 'judge', cot: bool = True):
    self.judge, self.model_name, self.cot = judge, model_name, bool(cot)
    self.tokens = judge.tokens
    vocab = len(judge.tokenizer)
    self._texts = [judge.tokenizer.decode([i]) for i in range(vocab)]
    self._top_k = min(protocol.MAX_TOP_LOGPROBS, vocab)

  def prepare(self, parsed):
    messages, images = parsed['messages'], parsed['images']
    if not images:
      raise JudgeInputError(f'judge {self.model_name!r} needs at least one image_url part')
    if messages[-1][0] != 'user':
      raise JudgeInputError('the last message must be the user turn the judge answers')
    try:
      processed = self.judge.processor(list(images))
    except ValueError as e:
      raise JudgeInputError(f'image rejected by the judge processor: {e}') from None
    grids = np.asarray(processed['image_grid_thw'])
    text = expand_image_tokens([render_chat(messages)], grids, self.judge.processor.merge_size)
    ids = self.judge.tokenizer(text[0])['input_ids']
    return _Request(ids, processed['pixel_values'], grids)

  def score(self, requests):
    prompts = [r.ids for r in requests]
    processed = {
      'pixel_values': np.concatenate([r.pixel_values for r in requests]),
      'image_grid_thw': np.concatenate([r.grids for r in requests]),
    }
    if self.cot:  # The same calls, on the same batch, as VLMJudge.score.
      rows = self.judge.generate_rows(prompts, processed).tolist()
      cots, valid = V.parse_cot(rows, self.tokens)
    else:
      rows, cots, valid = None, [[] for _ in prompts], np.ones(len(prompts), bool)
    seqs = [V.assemble(p, c, self.tokens)[0] for p, c in zip(prompts, cots)]
    digit_logits = self.judge.read_logits(seqs, processed)
    score_lps = np.asarray(V.score_logprobs(digit_logits, self.tokens.digits), np.float64)
    replies = [
      seq[len(p) :] if valid[b] else self._generated(rows[b])
      for b, (p, seq) in enumerate(zip(prompts, seqs))
    ]
    forced = self._forced_logprobs(prompts, replies, processed)
    return [
      self._reply(tokens, lps, score_lps[b] if valid[b] else None)
      for b, (tokens, lps) in enumerate(zip(replies, forced))
    ]

  def _generated(self, row: Sequence[int]) -> list[int]:
    """An unscored sample's generated tokens, through <|im_end|> if it stopped there."""
    row = list(row)
    return row[: row.index(self.tokens.im_end) + 1] if self.tokens.im_end in row else row

  def _forced_logprobs(self, prompts, replies, processed):
    """Per sample, (log p, top-k ids, top-k log p) of each reply token, teacher-forced."""
    seqs = [list(p) + list(r) for p, r in zip(prompts, replies)]
    width = max(len(r) for r in replies)
    positions = np.zeros((len(seqs), width), np.int32)
    targets = np.zeros((len(seqs), width), np.int32)
    for b, (p, r) in enumerate(zip(prompts, replies)):
      n = len(r)  # The last prompt token predicts the first reply token, and so on.
      positions[b, :n] = np.arange(len(p) - 1, len(p) - 1 + n)
      positions[b, n:] = positions[b, n - 1] if n else len(p) - 1
      targets[b, :n] = r
    logits = self.judge.logits_at(seqs, processed, positions)
    chosen, top, ids = map(np.asarray, _token_logprobs(logits, jnp.asarray(targets), self._top_k))
    lengths = [len(r) for r in replies]
    return [(chosen[b, :n], ids[b, :n], top[b, :n]) for b, n in enumerate(lengths)]

  def _reply(self, tokens, forced, score_lp) -> JudgeReply:
    chosen, top_ids, top_lps = forced
    entries = [
      (
        self._texts[t],
        float(chosen[j]),
        tuple((self._texts[i], float(lp)) for i, lp in zip(top_ids[j], top_lps[j])),
      )
      for j, t in enumerate(tokens)
    ]
    if score_lp is not None:  # The score token under the answer format: digits only.
      order = sorted(range(5), key=lambda i: (-score_lp[i], i))
      alternatives = tuple((P.SCORE_DIGITS[i], float(score_lp[i])) for i in order)
      entries.append((P.SCORE_DIGITS[order[0]], float(score_lp[order[0]]), alternatives))
    return JudgeReply(text=''.join(e[0] for e in entries), tokens=tuple(entries))


def load(directory: str, *, model_name: str = '', cot: bool = True, max_cot_tokens: int = 0):
  """A `VLMServedJudge` from a reward_sft judge export.

  Raises:
    ValueError naming the directory and what is wrong with it.
  """
  if not os.path.isdir(directory):
    raise ValueError(f'--judge={directory!r} is not a directory')
  kw = {'max_cot_tokens': int(max_cot_tokens)} if max_cot_tokens else {}
  try:
    judge = V.VLMJudge.load(directory, **kw)
  except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError) as e:
    raise ValueError(
      f'--judge={directory}: not a loadable judge export ({type(e).__name__}: {e}); '
      f'reward_sft writes one to WORKDIR/export/judge'
    ) from None
  if judge.describe_first:
    # Its prompts need the judge's own caption of each image (a second request the API's
    # clients do not make yet); served as is it would score without one.
    raise ValueError(
      f'--judge={directory}: a describe_first judge (configs/judge.py:tiny_describe_first) is '
      'not served yet; use it in-process (configs/rl_t2i.py:judge=DIR)'
    )
  if judge.decompose and cot:
    # Its alignment CoT is a text-only decomposition then a checklist written item by item, not
    # the one greedy generation this server runs; served as is it would score another chain.
    raise ValueError(
      f'--judge={directory}: a decompose judge (configs/judge.py:tiny_decompose) is served '
      'without chain of thought only (--no_cot); use its CoT in-process '
      '(configs/rl_t2i.py:judge=DIR)'
    )
  name = model_name or os.path.basename(os.path.normpath(directory))
  return VLMServedJudge(judge, model_name=name, cot=cot)
