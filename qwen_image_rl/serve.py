"""An OpenAI-compatible judge server (vLLM's chat-completions API subset that judges use).

  python -m qwen_image_rl.serve --judge=DIR|oracle [--host=127.0.0.1] [--port=8000]
      [--api_key_env=NAME] [--max_batch=32] [--max_request_mb=16] [--max_wait_ms=2]
      [--model_name=NAME] [--no_cot] [--max_cot_tokens=N]

--judge=oracle serves the tiny world's oracle (serving/judges.py); --judge=DIR a learned judge
exported by reward_sft (WORKDIR/export/judge; serving/vlm.py), named after the directory's
basename unless --model_name says otherwise, with its chain of thought unless --no_cot.

Routes:
  POST /v1/chat/completions  messages with text and image_url data-URI parts -> the judge's text
                             and, with logprobs: true, top_logprobs: k, the top-k log-probs of
                             each generated token (OpenAI/vLLM format; serving/protocol.py).
  GET  /v1/models            the served model (the judge's name, e.g. "oracle").
  GET  /health               {"status": "ok", ...batching counters}; never needs the key.

Concurrent requests are batched into one judge call (serving/batcher.py). Binds loopback unless
--host says otherwise. With --api_key_env=NAME the key is read from $NAME and /v1 routes need
`Authorization: Bearer <key>` (401 otherwise). Bodies over --max_request_mb get 413; malformed
JSON, a bad field, an undecodable image or a request the judge cannot score gets 400 with a
message; an unknown model 404. JSON only: nothing is ever unpickled.

Prints `listening on http://HOST:PORT` once ready (--port=0 picks a free port).
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import os
import re
import signal
import sys
import time
import uuid
from collections.abc import Sequence

from aiohttp import web

from qwen_image_rl.serving import judges, protocol
from qwen_image_rl.serving.batcher import Batcher

_BATCHER = web.AppKey('batcher', Batcher)
_REQUEST_ID = re.compile(r'^[A-Za-z0-9._:-]{1,128}$')
LOOPBACK = ('127.0.0.1', '::1', 'localhost')


def _error(status: int, message: str, kind: str = 'invalid_request_error') -> web.Response:
  return web.json_response(protocol.error_body(message, kind, status), status=status)


def _auth_middleware(api_key: str | None):
  expected = f'Bearer {api_key}'.encode() if api_key else None

  @web.middleware
  async def middleware(request, handler):
    if expected is not None and request.path.startswith('/v1/'):
      given = request.headers.get('Authorization', '').encode()
      if not hmac.compare_digest(given, expected):
        return _error(
          401,
          'missing or wrong API key (send "Authorization: Bearer <key>")',
          'authentication_error',
        )
    return await handler(request)

  return middleware


class _Handlers:
  """The routes over one judge and its batcher."""

  def __init__(self, judge: judges.Judge, max_request_bytes: int):
    self.judge = judge
    self.max_request_bytes = max_request_bytes

  async def chat(self, request: web.Request) -> web.Response:
    limit = self.max_request_bytes
    if request.content_length is not None and request.content_length > limit:
      return _error(
        413,
        f'request body of {request.content_length} bytes exceeds the limit of '
        f'{limit} bytes (--max_request_mb)',
      )
    try:
      raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
      return _error(413, f'request body exceeds the limit of {limit} bytes (--max_request_mb)')
    request_id = request.headers.get('X-Request-Id') or uuid.uuid4().hex
    if not _REQUEST_ID.match(request_id):
      return _error(400, 'X-Request-Id must be 1-128 characters of [A-Za-z0-9._:-]')
    loop = asyncio.get_running_loop()
    try:  # Decoding images is CPU work: keep it off the event loop.
      parsed, prepared = await loop.run_in_executor(None, self._parse, raw)
    except (protocol.ProtocolError, judges.JudgeInputError) as e:
      return _error(400, str(e))
    if parsed['model'] != self.judge.model_name:
      return _error(
        404,
        f'model {parsed["model"]!r} does not exist; this server serves {self.judge.model_name!r}',
        'not_found_error',
      )
    try:
      reply = await request.app[_BATCHER].submit(prepared)
    except Exception as e:  # pylint: disable=broad-except
      return _error(500, f'judge failed: {type(e).__name__}: {e}', 'server_error')
    tokens = reply.tokens[: parsed['max_tokens'] or len(reply.tokens)]
    body = protocol.chat_response(
      request_id,
      self.judge.model_name,
      int(time.time()),
      ''.join(t[0] for t in tokens),
      tokens,
      parsed['top_logprobs'] if parsed['logprobs'] else None,
    )
    return web.json_response(body, headers={'X-Request-Id': request_id})

  def _parse(self, raw: bytes):
    try:
      body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise protocol.ProtocolError(f'request body is not valid JSON: {e}') from None
    parsed = protocol.parse_chat_request(body)
    return parsed, self.judge.prepare(parsed)

  async def models(self, request: web.Request) -> web.Response:
    del request
    return web.json_response(
      {
        'object': 'list',
        'data': [
          {
            'id': self.judge.model_name,
            'object': 'model',
            'created': 0,
            'owned_by': 'qwen_image_rl',
          }
        ],
      }
    )

  async def health(self, request: web.Request) -> web.Response:
    return web.json_response(
      {'status': 'ok', 'model': self.judge.model_name, **request.app[_BATCHER].stats}
    )


def make_app(
  judge: judges.Judge,
  *,
  api_key: str | None = None,
  max_batch: int = 32,
  max_request_mb: float = 16,
  max_wait_ms: float = 2.0,
  middlewares: Sequence = (),
) -> web.Application:
  """The aiohttp application serving `judge`; `middlewares` run after authentication (the
  fault tests inject delays and garbage there)."""
  max_bytes = int(max_request_mb * 2**20)
  app = web.Application(
    middlewares=[_auth_middleware(api_key), *middlewares], client_max_size=max_bytes
  )
  handlers = _Handlers(judge, max_bytes)
  app.router.add_post('/v1/chat/completions', handlers.chat)
  app.router.add_get('/v1/models', handlers.models)
  app.router.add_get('/health', handlers.health)

  async def start(app):
    app[_BATCHER] = Batcher(judge.score, max_batch=max_batch, max_wait_s=max_wait_ms / 1000)
    app[_BATCHER].start()

  async def stop(app):
    await app[_BATCHER].stop()

  app.on_startup.append(start)
  app.on_cleanup.append(stop)
  return app


async def serve(app: web.Application, host: str, port: int) -> None:
  """Runs `app` until SIGINT/SIGTERM; prints the bound address once listening."""
  runner = web.AppRunner(app, access_log=None)
  await runner.setup()
  site = web.TCPSite(runner, host, port)
  await site.start()
  bound = runner.addresses[0]
  print(f'listening on http://{host}:{bound[1]}', flush=True)
  stop = asyncio.Event()
  loop = asyncio.get_running_loop()
  for sig in (signal.SIGINT, signal.SIGTERM):
    loop.add_signal_handler(sig, stop.set)
  try:
    await stop.wait()
  finally:
    await runner.cleanup()


def parse_args(argv):
  parser = argparse.ArgumentParser(
    prog='python -m qwen_image_rl.serve',
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  parser.add_argument('--judge', required=True, help='"oracle" or a judge directory')
  parser.add_argument('--model_name', default='', help='served name (default: DIR basename)')
  parser.add_argument('--no_cot', action='store_true', help='score without chain of thought')
  parser.add_argument(
    '--max_cot_tokens', type=int, default=0, help="chain-of-thought budget (0: the judge's)"
  )
  parser.add_argument('--host', default='127.0.0.1', help='bind address (loopback by default)')
  parser.add_argument('--port', type=int, default=8000, help='0 picks a free port')
  parser.add_argument(
    '--api_key_env', default='', help='environment variable holding the API key; unset: no auth'
  )
  parser.add_argument('--max_batch', type=int, default=32)
  parser.add_argument('--max_request_mb', type=float, default=16.0)
  parser.add_argument(
    '--max_wait_ms', type=float, default=2.0, help='how long a batch waits for more requests'
  )
  args = parser.parse_args(argv)
  if args.max_batch < 1 or args.max_request_mb <= 0 or args.max_wait_ms < 0:
    parser.error('--max_batch must be >= 1, --max_request_mb > 0, --max_wait_ms >= 0')
  if args.max_cot_tokens < 0:
    parser.error(f'--max_cot_tokens={args.max_cot_tokens} must be >= 0')
  if not 0 <= args.port <= 65535:
    parser.error(f'--port={args.port} is not a TCP port')
  return parser, args


def api_key_from_env(name: str) -> str | None:
  if not name:
    return None
  key = os.environ.get(name, '')
  if not key:
    raise ValueError(f'--api_key_env={name}: ${name} is unset or empty')
  return key


def load_judge(args) -> judges.Judge:
  """The judge --judge names. Raises ValueError naming the problem."""
  if args.judge == 'oracle':
    return judges.OracleJudge()
  if not os.path.isdir(args.judge):
    raise ValueError(f'--judge={args.judge!r}: expected "oracle" or an existing judge directory')
  from qwen_image_rl.serving import vlm  # Lazy: the oracle needs no model code.

  return vlm.load(
    args.judge, model_name=args.model_name, cot=not args.no_cot, max_cot_tokens=args.max_cot_tokens
  )


def main(argv=None) -> int:
  parser, args = parse_args(sys.argv[1:] if argv is None else argv)
  try:
    api_key = api_key_from_env(args.api_key_env)
    judge = load_judge(args)
  except ValueError as e:
    parser.error(str(e))
  if args.host not in LOOPBACK and api_key is None:
    print(
      f'warning: serving on {args.host} without an API key (--api_key_env)',
      file=sys.stderr,
      flush=True,
    )
  app = make_app(
    judge,
    api_key=api_key,
    max_batch=args.max_batch,
    max_request_mb=args.max_request_mb,
    max_wait_ms=args.max_wait_ms,
  )
  asyncio.run(serve(app, args.host, args.port))
  return 0


if __name__ == '__main__':
  sys.exit(main())
