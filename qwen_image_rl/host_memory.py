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

Set QWEN_IMAGE_RL_MALLOC_TUNING=0 to leave malloc alone.
"""

from __future__ import annotations

import ctypes
import os

ENV_VAR = "QWEN_IMAGE_RL_MALLOC_TUNING"
_M_TRIM_THRESHOLD = -1  # mallopt parameter numbers from glibc's malloc.h
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20  # glibc's largest allowed value on 64-bit hosts
TRIM_THRESHOLD = 2**30


def tune_malloc() -> bool:
  """Raises glibc's mmap and trim thresholds; True if applied (False: opted out, not glibc)."""
  if os.environ.get(ENV_VAR, "1").strip().lower() in ("0", "false", "no", "off"):
    return False
  try:
    libc = ctypes.CDLL("libc.so.6")
    mallopt = libc.mallopt
  except (OSError, AttributeError):  # not Linux/glibc (e.g. macOS, musl): nothing to tune
    return False
  return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
    mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
  )
