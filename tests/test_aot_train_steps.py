"""The shared AOT harness (benchmarks/aot_common.py): cost extrapolation from unrolled probes,
per-chip bytes of sharded abstract inputs, chip table.

The AOT script itself is not run here: even a tiny config compiles three programs with libtpu,
which took 7.5 min on the loaded dev box (README "Pods" gives the short command)."""

import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))


def test_extrapolation_and_per_chip_bytes():
  import aot_common
  import jax
  import jax.numpy as jnp

  from qwen_image_rl import parallel

  one = {"flops": 10.0, "bytes accessed": 4.0, "optimal_seconds": 1.0}
  two = {"flops": 13.0, "bytes accessed": 5.0, "optimal_seconds": 1.5}
  got = aot_common.extrapolate(one, two, num_layers=60, repeat=4)
  assert got == pytest.approx(
    {"flops": 4 * 187.0, "bytes accessed": 4 * 63.0, "optimal_seconds": 4 * 30.5}
  )
  mesh = parallel.make_mesh(dict(data=2, fsdp=4, tensor=1), devices=jax.devices()[:8])
  sharded = aot_common.abstract((16, 6), jnp.float32, parallel.batch_sharding(mesh, (16, 6)))
  replicated = aot_common.abstract((3,), jnp.bfloat16, parallel.replicated(mesh))
  assert aot_common.per_chip_bytes([sharded, replicated]) == 2 * 6 * 4 + 3 * 2
  assert aot_common.chip_of("v6e:16x16")["hbm_bytes"] == 32 * 2**30
  with pytest.raises(ValueError, match="unknown TPU generation"):
    aot_common.chip_of("h100:8")
