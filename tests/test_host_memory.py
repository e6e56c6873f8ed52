"""The malloc tuning is applied by the entry points (never on import) on glibc hosts, and can be
switched off by env var."""

import os
import subprocess
import sys

import pytest

from qwen_image_rl import host_memory

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLIBC = sys.platform.startswith("linux") and os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")


def _run(code, env_value=None):
  env = dict(os.environ)
  env.pop(host_memory.ENV_VAR, None)
  if env_value is not None:
    env[host_memory.ENV_VAR] = env_value
  out = subprocess.run(
    [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True
  )
  return out.stdout.strip()


@pytest.mark.skipif(not GLIBC, reason="mallopt tuning is glibc-only (the dev and CI hosts are)")
def test_tuning_applies_and_honours_the_opt_out():
  code = "from qwen_image_rl import host_memory; print(host_memory.tune_malloc())"
  assert _run(code) == "True"
  assert _run(code, "0") == "False"
  assert _run(code, "off") == "False"
  assert _run(code, "1") == "True"


def test_importing_the_package_and_its_trainers_changes_no_malloc_setting():
  # Any mallopt call would go through ctypes.CDLL("libc.so.6"): make that fail loudly.
  code = (
    "import ctypes\n"
    "def refuse(name, *a, **k):\n"
    "  if 'libc' in str(name): raise SystemExit('libc loaded on import')\n"
    "  return ORIG(name, *a, **k)\n"
    "ORIG, ctypes.CDLL = ctypes.CDLL, refuse\n"
    "import qwen_image_rl, qwen_image_rl.main, qwen_image_rl.demo\n"
    "from qwen_image_rl.trainers import grpo, sft\n"
    "print('clean')"
  )
  assert _run(code) == "clean"
