"""The malloc tuning is applied by the entry points (never on import) on glibc hosts, and can be
switched off by env var; where glibc and the kernel offer transparent huge pages the process
restarts once with them."""

import os
import subprocess
import sys

import pytest

from qwen_image_rl import host_memory

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLIBC = sys.platform.startswith("linux") and os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")


def _run(code, env_value=None, tunables=None):
  env = dict(os.environ)
  env.pop(host_memory.ENV_VAR, None)
  env.pop("GLIBC_TUNABLES", None)
  if env_value is not None:
    env[host_memory.ENV_VAR] = env_value
  if tunables is not None:
    env["GLIBC_TUNABLES"] = tunables
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


HUGEPAGES = GLIBC and host_memory.hugepages_supported()


@pytest.mark.skipif(not HUGEPAGES, reason="needs glibc >= 2.35 and transparent huge pages")
def test_tuning_restarts_once_with_huge_pages_unless_told_otherwise():
  code = (
    "import os\n"
    "print('started', os.getpid(), flush=True)\n"
    "from qwen_image_rl import host_memory\n"
    "host_memory.tune_malloc()\n"
    "print(os.getpid(), os.environ.get('GLIBC_TUNABLES'))"
  )
  out = _run(code).splitlines()
  pid = out[0].split()[1]
  # Started twice in the same process (execve), then went on with the tunable set.
  assert out == [f"started {pid}", f"started {pid}", f"{pid} glibc.malloc.hugetlb=1"]
  out = _run(code, tunables="glibc.malloc.arena_max=4").splitlines()
  assert out[-1].endswith(" glibc.malloc.arena_max=4:glibc.malloc.hugetlb=1") and len(out) == 3
  # Named already (here: switched off), or tuning opted out: no restart, nothing changed.
  out = _run(code, tunables="glibc.malloc.hugetlb=0").splitlines()
  assert len(out) == 2 and out[-1].endswith(" glibc.malloc.hugetlb=0")
  out = _run(code, env_value="0").splitlines()
  assert len(out) == 2 and out[-1].endswith(" None")


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
