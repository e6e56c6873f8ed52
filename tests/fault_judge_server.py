"""The oracle judge server with injected faults, as a separate process for the remote-reward tests.

  python tests/fault_judge_server.py --port=0 --mode=MODE [--delay_s=S]

Modes (per request, keyed by its X-Request-Id so a retry of the same sample is recognised):
  delay         every request waits delay_s before it is served (a slow but healthy judge).
  slow_first    a request id's first attempt waits delay_s; later attempts are served at once.
  garbage_first a request id's first attempt gets a garbage reply (non-JSON, a JSON object that
                is no chat.completion, a reply echoing another request's id, or HTTP 503, chosen
                by the id); later attempts are served.
  garbage       every request gets a garbage reply.
  no_score      a well-formed chat.completion whose tokens contain no score token.
"""

import argparse
import asyncio
import collections
import sys
import zlib

from aiohttp import web

from qwen_image_rl import serve
from qwen_image_rl.serving import judges, protocol

MODES = ('delay', 'slow_first', 'garbage_first', 'garbage', 'no_score')


def garbage(request_id: str) -> web.Response:
  kind = zlib.crc32(request_id.encode()) % 4
  if kind == 0:
    return web.Response(text='<html>bad gateway</html>', content_type='text/html')
  if kind == 1:
    return web.json_response({'object': 'chat.completion', 'choices': []})
  if kind == 2:
    body = protocol.chat_response('x', 'oracle', 0, '5', [('5', 0.0, [('5', 0.0)])], 5)
    return web.json_response(body, headers={'X-Request-Id': 'someone-else'})
  return web.Response(status=503, text='overloaded')


def no_score(request_id: str) -> web.Response:
  tokens = [(t, -0.1, [(t, -0.1), ('x', -3.0)]) for t in ('The', ' image', ' is', ' fine')]
  body = protocol.chat_response(request_id, 'oracle', 0, 'The image is fine', tokens, 2)
  return web.json_response(body, headers={'X-Request-Id': request_id})


def fault_middleware(mode: str, delay_s: float):
  seen = collections.Counter()

  @web.middleware
  async def middleware(request, handler):
    if request.path != '/v1/chat/completions':
      return await handler(request)
    request_id = request.headers.get('X-Request-Id', '')
    seen[request_id] += 1
    first = seen[request_id] == 1
    if mode == 'delay' or (mode == 'slow_first' and first):
      await asyncio.sleep(delay_s)
    if mode == 'garbage' or (mode == 'garbage_first' and first):
      await request.read()
      return garbage(request_id)
    if mode == 'no_score':
      await request.read()
      return no_score(request_id)
    return await handler(request)

  return middleware


def main() -> int:
  parser = argparse.ArgumentParser()
  parser.add_argument('--port', type=int, default=0)
  parser.add_argument('--mode', choices=MODES, required=True)
  parser.add_argument('--delay_s', type=float, default=0.0)
  args = parser.parse_args()
  app = serve.make_app(
    judges.OracleJudge(), middlewares=[fault_middleware(args.mode, args.delay_s)]
  )
  asyncio.run(serve.serve(app, '127.0.0.1', args.port))
  return 0


if __name__ == '__main__':
  sys.exit(main())
