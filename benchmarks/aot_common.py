"""Shared pieces of the AOT benchmarks: TPU topologies on a CPU host, abstract sharded inputs,
the compiler's memory and cost analyses, and what one chip of each TPU generation offers.

Nothing here allocates device memory: inputs are `jax.ShapeDtypeStruct`s carrying their
shardings, programs are lowered and compiled with libtpu (`JAX_PLATFORMS=cpu`, see DESIGN.md
section 4) and the figures come from `compiled.memory_analysis()` / `cost_analysis()`.
"""

from __future__ import annotations

import math
import time

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import topologies

from qwen_image_rl.parallel import tree_shardings

GiB = 2**30

# Per chip (Cloud TPU system architecture pages): HBM capacity (GiB), peak dense bf16 FLOP/s,
# HBM bandwidth (bytes/s).
CHIPS = {
  "v4": dict(hbm_gib=32, peak_flops=275e12, hbm_bandwidth=1228e9),
  "v5e": dict(hbm_gib=16, peak_flops=197e12, hbm_bandwidth=819e9),
  "v5p": dict(hbm_gib=95, peak_flops=459e12, hbm_bandwidth=2765e9),
  "v6e": dict(hbm_gib=32, peak_flops=918e12, hbm_bandwidth=1640e9),
}


def chip_of(topology: str) -> dict:
  """{'hbm_bytes', 'peak_flops', 'hbm_bandwidth'} of one chip of a topology such as 'v5p:2x4x4'."""
  kind = topology.split(":")[0]
  if kind not in CHIPS:
    raise ValueError(f"topology {topology!r}: unknown TPU generation; known: {sorted(CHIPS)}")
  c = CHIPS[kind]
  return dict(
    hbm_bytes=int(c["hbm_gib"] * GiB), peak_flops=c["peak_flops"], hbm_bandwidth=c["hbm_bandwidth"]
  )


def topology_devices(topology: str):
  """The TPU devices of a topology, for compiling on a machine without them (needs libtpu)."""
  return topologies.get_topology_desc(platform="tpu", topology_name=topology).devices


def abstract(shape, dtype, sharding) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding)


def abstract_tree(boxed_abstract, mesh, rules, dtype=None):
  """ShapeDtypeStructs (with their logical-axis shardings) of a boxed abstract tree, such as
  `model.abstract_params()`; `dtype` overrides every leaf's dtype."""
  shardings = tree_shardings(boxed_abstract, mesh, rules)
  return jax.tree.map(
    lambda a, s: abstract(a.shape, dtype or a.dtype, s), nn.meta.unbox(boxed_abstract), shardings
  )


def per_chip_bytes(tree) -> int:
  """Bytes one chip holds of a tree of sharded ShapeDtypeStructs (the largest shard)."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
    total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
  return int(total)


def compile_with(jitted, args, context, label: str = ""):
  """Lower `jitted(*args)` inside `context` (a sharding context manager) and compile it."""
  t0 = time.time()
  with context:
    lowered = jitted.lower(*args)
  t1 = time.time()
  compiled = lowered.compile()
  seconds = time.time() - t1
  if label:
    print(f"# [{label}] lower {t1 - t0:.1f} s, compile {seconds:.1f} s", flush=True)
  return compiled, seconds


def memory_of(compiled) -> dict:
  """Per-chip argument, output, alias and temporary bytes, and the program's total
  (arguments + outputs - aliased + temporaries)."""
  mem = compiled.memory_analysis()
  out = {
    "argument_bytes": int(mem.argument_size_in_bytes),
    "output_bytes": int(mem.output_size_in_bytes),
    "alias_bytes": int(mem.alias_size_in_bytes),
    "temp_bytes": int(mem.temp_size_in_bytes),
  }
  out["program_bytes"] = (
    out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"] + out["temp_bytes"]
  )
  return out


def cost_of(compiled) -> dict:
  """The compiler's cost analysis as a dict ({} when it has none). XLA counts the body of a
  while loop (scan) once, whatever its trip count."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return dict(cost or {})


def extrapolate(one: dict, two: dict, num_layers: int, repeat: int = 1) -> dict:
  """flops / bytes accessed / optimal_seconds of an L-layer program from unrolled 1- and
  2-layer compiles of one loop iteration, times `repeat` iterations."""
  keys = ("flops", "bytes accessed", "optimal_seconds")
  out = {}
  for k in keys:
    a, b = float(one.get(k, np.nan)), float(two.get(k, np.nan))
    out[k] = repeat * (a + (num_layers - 1) * (b - a))
  return out


def transformer_flops(model, n_img: int, n_txt: int) -> float:
  """Matmul FLOPs of one QwenImageTransformer forward per sample (2 per multiply-add), attention
  included: the analytic 'model FLOPs' of MFU (no rematerialisation)."""
  d, n = model.inner_dim, n_img + n_txt
  per_token = 2 * (4 * d * d + 2 * 4 * d * d)  # q, k, v, out + MLP (4x) per stream
  attention = 2 * 2 * n * n * d  # logits and weighted sum
  block = per_token * n + attention
  embed = 2 * n_img * model.in_channels * d + 2 * n_txt * model.joint_attention_dim * d
  return (
    model.num_layers * block + embed + 2 * n_img * d * model.patch_size**2 * model.output_channels
  )
