"""glibc malloc settings for XLA:CPU's host buffers (applied by the entry points at start).

XLA:CPU takes its activation buffers from malloc. glibc serves blocks above its mmap threshold
with fresh mmap'd pages and gives them back on free, and trims freed memory off the top of the
heap above its trim threshold, so every jitted step pays page faults on all its large buffers
again. The threshold only adapts upwards after a large block is freed, so the speed of a run
depends on which functions happened to run first. Raising both thresholds keeps freed
buffers for reuse. Measured (`benchmarks/grpo_step.py --malloc_tuning=false` for the
comparison): a tiny GRPO iteration 4.6 s -> 3.1 s on the 2-core dev CPU. Neither setting
helps alone. Accelerator memory is unaffected; the cost is that the process keeps freed host
memory (up to TRIM_THRESHOLD) instead of returning it.

Blocks above 32 MiB (glibc's largest mmap threshold) are mmap'd whatever the settings: the
tiny sft step's 133 MB temporary buffer was faulted in 4 KiB pages on every step (34k page
faults a step; system time was 14% of a 2500-step run's CPU time). glibc's
`glibc.malloc.hugetlb=1` tunable asks for transparent huge pages on such blocks (2 MiB
faults): 400 sft steps 4.84 -> 5.34 steps/s (median), system time 29 -> 15 s (README,
Benchmarks). glibc reads tunables only at process start, so `tune_malloc` restarts the process
once (os.execve: same pid, arguments and environment) with it set. A GLIBC_TUNABLES that
already names the tunable is left as it is (`glibc.malloc.hugetlb=0` switches it off).

Set QWEN_IMAGE_RL_MALLOC_TUNING=0 to leave malloc alone.
"""

from __future__ import annotations

import ctypes
import os
import sys

ENV_VAR = "QWEN_IMAGE_RL_MALLOC_TUNING"
_M_TRIM_THRESHOLD = -1  # mallopt parameter numbers from glibc's malloc.h
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20  # glibc's largest allowed value on 64-bit hosts
TRIM_THRESHOLD = 2**30
HUGEPAGE_TUNABLE = "glibc.malloc.hugetlb"
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def tune_malloc() -> bool:
  """Raises glibc's mmap and trim thresholds; True if applied (False: opted out, not glibc).

  For entry points only, before jax runs anything: where glibc and the kernel support
  transparent huge pages and GLIBC_TUNABLES does not name them, this first restarts the
  process with them (`restart_with_hugepages`).
  """
  if os.environ.get(ENV_VAR, "1").strip().lower() in ("0", "false", "no", "off"):
    return False
  restart_with_hugepages()
  try:
    libc = ctypes.CDLL("libc.so.6")
    mallopt = libc.mallopt
  except (OSError, AttributeError):  # not Linux/glibc (e.g. macOS, musl): nothing to tune
    return False
  return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
    mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
  )


def restart_with_hugepages() -> None:
  """Re-executes this process (os.execve: same pid and arguments) with GLIBC_TUNABLES extended
  by glibc.malloc.hugetlb=1, unless it names that tunable already, glibc is older than 2.35
  (which has no such tunable) or the kernel's transparent huge pages are off."""
  tunables = os.environ.get("GLIBC_TUNABLES", "")
  if HUGEPAGE_TUNABLE in tunables or not hugepages_supported():
    return
  env = dict(os.environ, GLIBC_TUNABLES=":".join(filter(None, (tunables, f"{HUGEPAGE_TUNABLE}=1"))))
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, sys.orig_argv, env)


def hugepages_supported() -> bool:
  """glibc >= 2.35 (which has the tunable) and a kernel whose transparent huge pages are on."""
  return _glibc_has_hugetlb() and _kernel_has_thp()


def _glibc_has_hugetlb() -> bool:
  try:
    name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
    major, minor = (int(v) for v in version.split(".")[:2])
  except (AttributeError, OSError, ValueError):  # not glibc, or an unreadable version
    return False
  return name == "glibc" and (major, minor) >= (2, 35)


def _kernel_has_thp() -> bool:
  try:
    with open(THP_SETTING) as f:
      return "[never]" not in f.read()
  except OSError:
    return False
