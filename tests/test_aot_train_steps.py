"""benchmarks/aot_train_steps.py in short form: a tiny GRPO config AOT-compiled for a 4-chip
v5p topology (libtpu, JAX_PLATFORMS=cpu) prints one JSON record per step with sane figures;
and the shared harness' extrapolation and per-chip byte count."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

TINY = [
  "model.transformer.num_layers=2",
  "model.transformer.num_attention_heads=2",
  "model.transformer.joint_attention_dim=64",
  "data.image_size=64",
  "data.max_text_tokens=32",
  "mesh.fsdp=4",
  "rl.prompts_per_step=4",
  "rl.group_size=2",
  "rl.rollout_chunks=2",
  "rl.micro_batch_size=4",
  "rl.num_steps=4",
  "rl.timesteps.num_train=2",
  "rl.timesteps.first_m=3",
]


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


def test_tiny_update_compiles_for_a_tpu_topology_and_reports_sane_figures():
  pytest.importorskip("libtpu")
  cmd = [
    sys.executable,
    "benchmarks/aot_train_steps.py",
    "--topology=v5p:2x2x1",
    "--steps=update",
    "--cost=update",
  ]
  for item in TINY:
    cmd += ["--set", item]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  records = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
  assert [r["step"] for r in records] == ["update"]
  r = records[0]
  for key in (
    "topology",
    "step",
    "per_chip_bytes",
    "hbm_bytes",
    "flops_per_chip",
    "estimated_seconds",
    "mfu",
  ):
    assert key in r, key
  assert r["topology"] == "v5p:2x2x1" and r["chips"] == 4 and r["mesh"]["fsdp"] == 4
  assert r["hbm_bytes"] == 95 * 2**30 and 0 < r["per_chip_bytes"] < r["hbm_bytes"]
  # The donated TrainState is aliased: outputs are (almost) all aliased arguments.
  assert r["alias_bytes"] > 0.9 * r["output_bytes"]
  assert r["flops_per_chip"] >= r["model_flops_per_chip"] > 0  # remat adds recompute
  assert 0 < r["estimated_seconds"] < 1 and 0 < r["mfu"] < 1
  assert np.isclose(
    r["mfu"] * r["estimated_seconds"] * 459e12, r["model_flops_per_chip"], rtol=1e-2
  )
