"""Judge server processes on loopback for the serving tests; every one is killed at test end.

  def test_x(judge_servers):
    server = judge_servers.start('--judge=oracle')        # python -m qwen_image_rl.serve ...
    fault = judge_servers.start_fault('--mode=delay', '--delay_s=0.05')
    server.url, server.port; server.kill(); server.restart()
"""

import os
import queue
import signal
import subprocess
import sys
import threading
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAULT_SERVER = os.path.join(ROOT, 'tests', 'fault_judge_server.py')
STARTUP_TIMEOUT_S = 60


class ServerProcess:
  """One server process; `--port=0` on the first start, the same port on restarts."""

  def __init__(self, command, env=None):
    self.command, self.env = list(command), env
    self.port = 0
    self.process = None
    self.output = []

  @property
  def url(self) -> str:
    return f'http://127.0.0.1:{self.port}'

  @property
  def base_url(self) -> str:
    return self.url + '/v1'

  def start(self) -> 'ServerProcess':
    env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT, **(self.env or {}))
    self.process = subprocess.Popen(
        [*self.command, f'--port={self.port}'], cwd=ROOT, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines = queue.Queue()
    threading.Thread(target=self._pump, args=(self.process, lines), daemon=True).start()
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
      try:
        line = lines.get(timeout=0.1)
      except queue.Empty:
        if self.process.poll() is not None:
          break
        continue
      if line.startswith('listening on http://'):
        self.port = int(line.rsplit(':', 1)[1])
        return self
    self.kill()
    raise RuntimeError(f'judge server did not start: {" ".join(self.command)}\n'
                       + ''.join(self.output[-30:]))

  def _pump(self, process, lines):
    for line in process.stdout:
      self.output.append(line)
      lines.put(line)

  def kill(self) -> None:
    """SIGKILL, as a crash would."""
    if self.process is not None and self.process.poll() is None:
      os.killpg(self.process.pid, signal.SIGKILL)
      self.process.wait(10)

  def restart(self) -> 'ServerProcess':
    self.kill()
    return self.start()


class ServerFactory:
  def __init__(self):
    self.servers = []

  def start(self, *args, env=None) -> ServerProcess:
    server = ServerProcess([sys.executable, '-m', 'qwen_image_rl.serve', *args], env)
    self.servers.append(server)
    return server.start()

  def start_fault(self, *args) -> ServerProcess:
    server = ServerProcess([sys.executable, FAULT_SERVER, *args])
    self.servers.append(server)
    return server.start()

  def kill_all(self) -> None:
    for server in self.servers:
      server.kill()


@pytest.fixture
def judge_servers():
  factory = ServerFactory()
  yield factory
  factory.kill_all()
