"""The malloc tuning is applied on import on glibc hosts and can be switched off by env var."""

import os
import subprocess
import sys

import pytest

from qwen_image_rl import host_memory

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLIBC = sys.platform.startswith("linux") and os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")


def _import_flag(env_value):
  env = dict(os.environ)
  env.pop(host_memory.ENV_VAR, None)
  if env_value is not None:
    env[host_memory.ENV_VAR] = env_value
  code = "import qwen_image_rl; print(qwen_image_rl.MALLOC_TUNED)"
  out = subprocess.run([sys.executable, "-c", code],
                       cwd=REPO, env=env, capture_output=True, text=True, check=True)
  return out.stdout.strip()


@pytest.mark.skipif(not GLIBC, reason="mallopt tuning is glibc-only (the dev and CI hosts are)")
def test_tuning_applies_on_import_and_honours_the_opt_out():
  assert _import_flag(None) == "True"
  assert _import_flag("0") == "False"
  assert _import_flag("off") == "False"
  assert _import_flag("1") == "True"
