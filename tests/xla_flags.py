"""XLA flags every test process uses (pytest's, via conftest, and the subprocesses it starts).

Tests run tiny programs once or twice, so XLA's compile time dominates them: XLA:CPU's backend at
-O0 with the older elemental fusion emitters compiles the tiny sft train step (977 fusions) in
~6-8 s of CPU instead of ~23 s, and cut the trainer tests ~3x (358 s -> 118 s for sft_trains +
opd_trains on one core). Numerics are unchanged within every tolerance here, and since every
process uses the same flags, exact-resume and 2x4 vs 1x8 comparisons are unaffected.
"""

FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"


def cpu_xla_flags(devices: int) -> str:
  """XLA_FLAGS for a CPU process with `devices` simulated devices."""
  return f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE_FLAGS}"
