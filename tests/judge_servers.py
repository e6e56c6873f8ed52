"""Judge server processes on loopback for the serving tests; every one is killed at test end.

def test_x(judge_servers):
  server = judge_servers.start('--judge=oracle')          # python -m qwen_image_rl.serve ...
  fault = judge_servers.start_fault('--mode=delay', '--delay_s=0.05')  # fault_judge_server.py
  server.base_url; server.kill(); server.start()          # same port again
"""

import os
import sys

import pytest

from qwen_image_rl.serving.local import ServerProcess, serve_command

FAULT_SERVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fault_judge_server.py')


class ServerFactory:
  def __init__(self):
    self.servers = []

  def _start(self, command, env=None) -> ServerProcess:
    server = ServerProcess(command, env)
    self.servers.append(server)
    return server.start()

  def start(self, *args, env=None) -> ServerProcess:
    return self._start(serve_command(*args), env)

  def start_fault(self, *args) -> ServerProcess:
    return self._start([sys.executable, FAULT_SERVER, *args])

  def kill_all(self) -> None:
    for server in self.servers:
      server.kill()


@pytest.fixture
def judge_servers():
  factory = ServerFactory()
  yield factory
  factory.kill_all()
