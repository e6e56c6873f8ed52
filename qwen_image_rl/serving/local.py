"""A judge server as a child process on this machine (tests, benchmarks, single-host runs).

  with local_server('--judge=oracle', '--max_batch=32') as server:
    reward = make_reward('remote_alignment', base_url=server.base_url)

The child prints `listening on http://HOST:PORT` when ready (serve.py); the first start asks
for a free port (--port=0), restarts reuse it. `kill()` is SIGKILL to the child's process group,
as a crash would be.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STARTUP_TIMEOUT_S = 300.0  # JAX start-up and a judge load on a busy machine
READY_PREFIX = 'listening on http://'


class ServerProcess:
  """One server process running `command` (which must accept --port and print READY_PREFIX)."""

  def __init__(self, command: Sequence[str], env: dict | None = None):
    self.command, self.env = list(command), dict(env or {})
    self.port = 0
    self.process: subprocess.Popen | None = None
    self._pump_thread: threading.Thread | None = None
    self.output: list[str] = []

  @property
  def url(self) -> str:
    return f'http://127.0.0.1:{self.port}'

  @property
  def base_url(self) -> str:
    return self.url + '/v1'

  def start(self, timeout_s: float = STARTUP_TIMEOUT_S) -> ServerProcess:
    """Starts the child and waits until it listens.

    Raises:
      RuntimeError with the child's last output if it exits or stays silent for timeout_s.
    """
    pythonpath = os.pathsep.join(p for p in (ROOT, os.environ.get('PYTHONPATH', '')) if p)
    env = dict(
      os.environ,
      JAX_PLATFORMS=os.environ.get('JAX_PLATFORMS', 'cpu'),
      PYTHONPATH=pythonpath,
      **self.env,
    )
    self.process = subprocess.Popen(
      [*self.command, f'--port={self.port}'],
      cwd=ROOT,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
      start_new_session=True,
    )
    lines: queue.Queue = queue.Queue()
    self._pump_thread = threading.Thread(target=self._pump, args=(self.process, lines), daemon=True)
    self._pump_thread.start()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
      try:
        line = lines.get(timeout=0.05)
      except queue.Empty:
        if self.process.poll() is not None:
          break
        continue
      if line.startswith(READY_PREFIX):
        self.port = int(line.strip().rsplit(':', 1)[1])
        return self
    self.kill()
    raise RuntimeError(
      f'judge server did not start: {" ".join(self.command)}\n' + ''.join(self.output[-30:])
    )

  def _pump(self, process, lines) -> None:
    for line in process.stdout:
      self.output.append(line)
      lines.put(line)

  def kill(self) -> None:
    """SIGKILL to the child's process group; a no-op if it is not running."""
    if self.process is None:
      return
    if self.process.poll() is None:
      os.killpg(self.process.pid, signal.SIGKILL)
      self.process.wait(10)
    self._pump_thread.join(10)  # the pipe is at EOF once the child is gone
    self.process.stdout.close()

  def restart(self) -> ServerProcess:
    self.kill()
    return self.start()


def serve_command(*args: str) -> list[str]:
  return [sys.executable, '-m', 'qwen_image_rl.serve', *args]


@contextlib.contextmanager
def local_server(*args: str, env: dict | None = None):
  """`python -m qwen_image_rl.serve ARGS` for the duration of the block; killed at exit."""
  server = ServerProcess(serve_command(*args), env)
  try:
    yield server.start()
  finally:
    server.kill()
