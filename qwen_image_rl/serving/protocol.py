"""The OpenAI chat-completions wire format shared by the judge server and the remote reward.

A judge request is one chat completion: a user message whose content holds the judge's text
prompt and its images as `image_url` parts with PNG data URIs (`data:image/png;base64,...`); the
reply is the judge's text and, with `logprobs: true, top_logprobs: k`, per generated token the k
most likely tokens and their log-probs (`choices[0].logprobs.content[t].top_logprobs`), as vLLM
and OpenAI return them.

Score readout (`expected_score`): the score position is the LAST generated token whose text is a
score token "1".."5" (a judge reasons first and scores last). Its top log-probs give p(s) for
the score values s present among them; tokens that decode to the same value (e.g. "4" and " 4")
are summed, values missing from the top k count as 0, and p is renormalised over the five values:

  p(s) = sum_{tok -> s} exp(lp_tok) / sum_{s'=1..5} sum_{tok -> s'} exp(lp_tok)
  E[s] = sum_s s p(s)                     scale='raw'   (1..5)
  R    = sum_s (s - 1)/4 p(s) = (E - 1)/4  scale='unit'  (0..1, the oracle rewards' scale)

The unit readout is computed as the weighted sum of non-negative terms (not as (E - 1)/4), so
it has a relative error of a few float64 ulps and no cancellation near 0. A reply with no score
token at any position gives None ("invalid"), never a number.

The tiny world's ground truth travels in the extra top-level field `judge_context` (see
`JUDGE_CONTEXT`): the oracle judge needs the prompt's structured spec, which a caption does not
determine uniquely in general. A learned judge must ignore it; vLLM ignores unknown fields.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

SCORE_VALUES = (1, 2, 3, 4, 5)
SCORE_TOKENS = tuple(str(s) for s in SCORE_VALUES)
SCALES = ('unit', 'raw')
JUDGE_CONTEXT = 'judge_context'
MAX_TOP_LOGPROBS = 20  # OpenAI's and vLLM's default bound
IMAGE_FORMATS = ('PNG', 'JPEG', 'WEBP')
MAX_IMAGE_PIXELS = 4096 * 4096
# A log-prob standing for probability 0 (JSON has no -inf): exp(-9999.0) == 0.0 in float64.
ZERO_LOGPROB = -9999.0


class ProtocolError(ValueError):
  """A request or reply does not follow the protocol; the message says what is wrong."""


# ---------------------------------------------------------------------------------------------
# Images as data URIs.
# ---------------------------------------------------------------------------------------------


def image_to_data_uri(image: np.ndarray) -> str:
  """uint8 [H, W, 3] -> 'data:image/png;base64,...' (lossless)."""
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f'expected a uint8 [H, W, 3] image, got {image.dtype} {image.shape}')
  buffer = io.BytesIO()
  Image.fromarray(image, 'RGB').save(buffer, format='PNG', compress_level=1)
  return 'data:image/png;base64,' + base64.b64encode(buffer.getvalue()).decode('ascii')


def data_uri_to_image(uri: Any) -> np.ndarray:
  """'data:image/<png|jpeg|webp>;base64,...' -> uint8 [H, W, 3].

  Raises:
    ProtocolError: not a base64 data URI, undecodable, or too large an image. Remote URLs are
      refused: the server never fetches anything.
  """
  if not isinstance(uri, str) or not uri.startswith('data:'):
    shown = uri[:40] if isinstance(uri, str) else type(uri).__name__
    raise ProtocolError(
      f'image_url.url must be a data URI (data:image/png;base64,...); got '
      f'{shown!r}; remote URLs are not fetched'
    )
  header, sep, payload = uri.partition(',')
  if not sep or not header.endswith(';base64') or not header[5:].startswith('image/'):
    raise ProtocolError(
      f'image data URI header {header[:60]!r}: expected data:image/<format>;base64,'
    )
  try:
    raw = base64.b64decode(payload, validate=True)
  except (binascii.Error, ValueError) as e:
    raise ProtocolError(f'image data URI is not valid base64: {e}') from None
  try:
    with Image.open(io.BytesIO(raw), formats=IMAGE_FORMATS) as im:
      if im.width * im.height > MAX_IMAGE_PIXELS:
        raise ProtocolError(f'image is {im.width}x{im.height}; at most {MAX_IMAGE_PIXELS} pixels')
      return np.asarray(im.convert('RGB'), np.uint8)
  except ProtocolError:
    raise
  except Exception as e:  # PIL raises many types for corrupt data.
    raise ProtocolError(
      f'undecodable image ({IMAGE_FORMATS} accepted): {type(e).__name__}: {e}'
    ) from None


# ---------------------------------------------------------------------------------------------
# Requests.
# ---------------------------------------------------------------------------------------------


def chat_request(
  model: str,
  text: str,
  images: Sequence[np.ndarray],
  *,
  top_logprobs: int = 5,
  max_tokens: int = 1,
  context: Mapping[str, Any] | None = None,
  system: str | None = None,
  images_first: bool = False,
) -> dict:
  """A chat-completions body: [a system message,] one user message with `text` and the images
  (text first, or the images first as Qwen judges are prompted), greedy decoding."""
  text_part = [{'type': 'text', 'text': text}]
  image_parts = [
    {'type': 'image_url', 'image_url': {'url': image_to_data_uri(im)}} for im in images
  ]
  content = image_parts + text_part if images_first else text_part + image_parts
  messages = [] if system is None else [{'role': 'system', 'content': system}]
  body = {
    'model': model,
    'messages': [*messages, {'role': 'user', 'content': content}],
    'max_tokens': int(max_tokens),
    'temperature': 0.0,
    'logprobs': True,
    'top_logprobs': int(top_logprobs),
  }
  if context is not None:
    body[JUDGE_CONTEXT] = dict(context)
  return body


def _require(condition: bool, message: str) -> None:
  if not condition:
    raise ProtocolError(message)


def parse_chat_request(body: Any) -> dict:
  """Validates a chat-completions body and returns its parts.

  Returns:
    {'model', 'texts' (list of str), 'images' (list of uint8 [H, W, 3], message order),
     'messages' (list of (role, parts); a part is ('text', str) or ('image', index into
     images)), 'logprobs' (bool), 'top_logprobs' (int), 'max_tokens' (int or None), 'context'
     (dict or None)}.

  Raises:
    ProtocolError naming the offending field.
  """
  _require(isinstance(body, dict), f'request body must be a JSON object, got {type(body).__name__}')
  model = body.get('model')
  _require(isinstance(model, str) and bool(model), 'request needs "model" (a non-empty string)')
  messages = body.get('messages')
  _require(
    isinstance(messages, list) and bool(messages), 'request needs "messages" (a non-empty list)'
  )
  texts, images, structured = [], [], []
  for i, message in enumerate(messages):
    where = f'messages[{i}]'
    _require(isinstance(message, dict), f'{where} must be an object')
    _require(
      message.get('role') in ('system', 'user', 'assistant'),
      f'{where}.role must be system, user or assistant, got {message.get("role")!r}',
    )
    content = message.get('content')
    parts = []
    structured.append((message['role'], parts))
    if isinstance(content, str):
      texts.append(content)
      parts.append(('text', content))
      continue
    _require(isinstance(content, list), f'{where}.content must be a string or a list of parts')
    for j, part in enumerate(content):
      kind = part.get('type') if isinstance(part, dict) else None
      if kind == 'text' and isinstance(part.get('text'), str):
        texts.append(part['text'])
        parts.append(('text', part['text']))
      elif kind == 'image_url' and isinstance(part.get('image_url'), dict):
        try:
          images.append(data_uri_to_image(part['image_url'].get('url')))
        except ProtocolError as e:
          raise ProtocolError(f'{where}.content[{j}]: {e}') from None
        parts.append(('image', len(images) - 1))
      else:
        raise ProtocolError(
          f'{where}.content[{j}] must be {{"type": "text", "text": str}} or '
          f'{{"type": "image_url", "image_url": {{"url": data URI}}}}'
        )
  logprobs = body.get('logprobs', False)
  _require(isinstance(logprobs, bool), '"logprobs" must be a boolean')
  top = body.get('top_logprobs', 0 if not logprobs else 1)
  _require(
    isinstance(top, int) and not isinstance(top, bool) and 0 <= top <= MAX_TOP_LOGPROBS,
    f'"top_logprobs" must be an integer in [0, {MAX_TOP_LOGPROBS}], got {top!r}',
  )
  _require(logprobs or not body.get('top_logprobs'), '"top_logprobs" needs "logprobs": true')
  max_tokens = body.get('max_tokens', body.get('max_completion_tokens'))
  _require(
    max_tokens is None or (isinstance(max_tokens, int) and max_tokens >= 1),
    f'"max_tokens" must be an integer >= 1, got {max_tokens!r}',
  )
  _require(body.get('n', 1) == 1, '"n" must be 1')
  _require(not body.get('stream', False), 'streaming is not supported')
  context = body.get(JUDGE_CONTEXT)
  _require(context is None or isinstance(context, dict), f'"{JUDGE_CONTEXT}" must be an object')
  return {
    'model': model,
    'texts': texts,
    'images': images,
    'messages': structured,
    'logprobs': logprobs,
    'top_logprobs': top,
    'max_tokens': max_tokens,
    'context': context,
  }


# ---------------------------------------------------------------------------------------------
# Replies.
# ---------------------------------------------------------------------------------------------


def _token_entry(token: str, logprob: float) -> dict:
  return {'token': token, 'logprob': float(logprob), 'bytes': list(token.encode('utf-8'))}


def chat_response(
  request_id: str,
  model: str,
  created: int,
  text: str,
  tokens: Sequence[tuple[str, float, Sequence[tuple[str, float]]]],
  top_logprobs: int | None,
  prompt_tokens: int = 0,
) -> dict:
  """A chat.completion object. `tokens`: per generated token (token, logprob, [(alternative,
  logprob), ...] best first); `top_logprobs` None leaves `logprobs` null."""
  logprobs = None
  if top_logprobs is not None:
    logprobs = {
      'content': [
        dict(
          _token_entry(tok, lp),
          top_logprobs=[_token_entry(t, l) for t, l in list(alternatives)[:top_logprobs]],
        )
        for tok, lp, alternatives in tokens
      ]
    }
  return {
    'id': f'chatcmpl-{request_id}',
    'object': 'chat.completion',
    'created': int(created),
    'model': model,
    'choices': [
      {
        'index': 0,
        'message': {'role': 'assistant', 'content': text},
        'logprobs': logprobs,
        'finish_reason': 'stop',
      }
    ],
    'usage': {
      'prompt_tokens': int(prompt_tokens),
      'completion_tokens': len(tokens),
      'total_tokens': int(prompt_tokens) + len(tokens),
    },
  }


def error_body(message: str, kind: str, code: int) -> dict:
  """OpenAI's error object."""
  return {'error': {'message': message, 'type': kind, 'code': code}}


def reply_token_logprobs(response: Any) -> list:
  """`choices[0].logprobs.content` of a chat.completion, checked for shape.

  Raises:
    ProtocolError: not a chat.completion with log-probs (a garbage or truncated reply).
  """
  try:
    choice = response['choices'][0]
    content = choice['logprobs']['content']
  except (KeyError, IndexError, TypeError):
    raise ProtocolError(
      'reply is not a chat.completion with choices[0].logprobs.content '
      '(did the request set logprobs: true?)'
    ) from None
  _require(isinstance(content, list), 'choices[0].logprobs.content must be a list')
  for t, entry in enumerate(content):
    ok = (
      isinstance(entry, dict)
      and isinstance(entry.get('token'), str)
      and _is_number(entry.get('logprob'))
      and isinstance(entry.get('top_logprobs', []), list)
      and all(
        isinstance(a, dict) and isinstance(a.get('token'), str) and _is_number(a.get('logprob'))
        for a in entry.get('top_logprobs', [])
      )
    )
    _require(ok, f'choices[0].logprobs.content[{t}] is not {{token, logprob, top_logprobs}}')
  return content


def _is_number(x) -> bool:
  """A log-prob: a finite number or -inf (JSON from Python may carry -Infinity)."""
  return (
    isinstance(x, (int, float)) and not isinstance(x, bool) and not math.isnan(x) and x != math.inf
  )


def _score_of(token: str) -> int | None:
  stripped = token.strip()
  return int(stripped) if stripped in SCORE_TOKENS else None


def expected_score(
  content: Sequence[Mapping[str, Any]], scale: str = 'unit', after: str | None = None
) -> float | None:
  """The expected score at the last score position of `content` (see the module doc), or None.

  Args:
    content: `choices[0].logprobs.content` (from `reply_token_logprobs`).
    scale: 'unit' -> sum_s (s - 1)/4 p(s) in [0, 1]; 'raw' -> sum_s s p(s) in [1, 5].
    after: if given, a score token counts only where the reply text before it ends with this
      (e.g. 'Score:' for a chain-of-thought judge, whose reasoning may contain digits).
  """
  if scale not in SCALES:
    raise ValueError(f'scale={scale!r} is not one of {SCALES}')
  position, text = None, ''
  for entry in content:
    if _score_of(entry['token']) is not None and (after is None or text.rstrip().endswith(after)):
      position = entry
    text += entry['token']
  if position is None:
    return None
  candidates = {}  # token text -> logprob (the sampled token and its alternatives)
  for alt in [*position.get('top_logprobs', []), position]:
    candidates.setdefault(alt['token'], float(alt['logprob']))
  by_value = [(s, lp) for tok, lp in candidates.items() if (s := _score_of(tok)) is not None]
  return score_readout(by_value, scale)


def score_readout(by_value: Sequence[tuple[int, float]], scale: str = 'unit') -> float | None:
  """The module doc's readout from (score value, log-prob) pairs (one pair per token, so values
  may repeat); None when every score has probability 0. The in-process VLM judge reads its
  score tokens' log-probs with this same function, so served and in-process rewards agree bit
  for bit."""
  if scale not in SCALES:
    raise ValueError(f'scale={scale!r} is not one of {SCALES}')
  top = max(lp for _, lp in by_value)
  if not math.isfinite(top):  # every score token has probability 0 (or the reply is broken)
    return None
  mass = dict.fromkeys(SCORE_VALUES, 0.0)
  for s, lp in by_value:
    mass[s] += math.exp(lp - top)
  total = math.fsum(mass.values())
  weight = (lambda s: (s - 1) / 4) if scale == 'unit' else float
  return math.fsum(weight(s) * m for s, m in mass.items()) / total
