"""AOT-compile one joint attention (forward + backward) for a TPU topology: XLA vs Pallas flash.

  JAX_PLATFORMS=cpu python benchmarks/aot_attention.py --topology=v5p:2x2x1 [--txt_len=512]

The attention of one MMDiT block at the real shapes (24 heads x 128, 4096 image tokens of a
1024^2 image + `--txt_len` text tokens, bf16, per-chip batch `--per_chip_batch`), with the batch
sharded over all chips (fsdp), lowered with abstract inputs and compiled with libtpu: once as the
XLA path (`layers.chunked_attention`, query chunk `--query_chunk`, 0 = one block) and once as the
Pallas TPU flash kernel (`models/attention_kernels.py`, run under shard_map). Prints one JSON line
per implementation with per-chip temporaries and total bytes, the compiler's flops, bytes
accessed and time estimate. Nothing runs on a TPU: the figures are the compiler's analyses. XLA
counts a loop body once, so with `--query_chunk` the XLA path's flops and time estimate cover one
chunk only (its memory figures are whole); compare times with `--query_chunk=0`. The Pallas
kernel's flops and time come from the cost estimate the kernel hands the compiler.

Measured on the 2-core CPU dev box (libtpu 0.0.42.1, v5p:2x2x1 = 4 chips, q/k/v [4, 4608, 24, 128]
bf16, per chip one sample; compiler estimates, not TPU measurements):
  xla, --query_chunk=0:    temp 2.848 GiB, per chip 3.007 GiB, estimate 6.73 ms
  xla, --query_chunk=1024: temp 0.827 GiB, per chip 0.985 GiB (estimate covers one chunk)
  flash:                   temp 0.401 GiB, per chip 0.559 GiB, estimate 1.35 ms
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn
import jax
import jax.numpy as jnp
from aot_common import GiB, cost_of, memory_of, topology_devices
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from qwen_image_rl.models import attention_kernels
from qwen_image_rl.parallel import DEFAULT_LOGICAL_AXIS_RULES, make_mesh


def compile_one(implementation, mesh, shape, query_chunk):
  rules = DEFAULT_LOGICAL_AXIS_RULES
  qkv_sharding = NamedSharding(mesh, P(("fsdp", "data"), None, "tensor", None))
  mask_sharding = NamedSharding(mesh, P(("fsdp", "data"), None))

  def loss(q, k, v, mask):
    with nn.logical_axis_rules(rules):
      out = attention_kernels.attention(
        q,
        k,
        v,
        mask,
        implementation=implementation,
        query_chunk=query_chunk or None,
        kernel_off_tpu=True,
      )
    return jnp.sum(out.astype(jnp.float32))

  step = jax.jit(
    jax.grad(loss, argnums=(0, 1, 2)),
    in_shardings=(qkv_sharding,) * 3 + (mask_sharding,),
    out_shardings=(qkv_sharding,) * 3,
  )
  args = [jax.ShapeDtypeStruct(shape, jnp.bfloat16)] * 3 + [
    jax.ShapeDtypeStruct(shape[:2], jnp.bool_)
  ]
  start = time.time()
  with jax.set_mesh(mesh):
    compiled = step.lower(*args).compile()
  mem, cost = memory_of(compiled), cost_of(compiled)
  return {
    "implementation": implementation,
    "compile_seconds": round(time.time() - start, 1),
    "temp_bytes": mem["temp_bytes"],
    "per_chip_bytes": mem["program_bytes"],
    "flops_per_chip": float(cost.get("flops", 0.0)),
    "bytes_accessed": float(cost.get("bytes accessed", 0.0)),
    "estimated_seconds": float(cost.get("optimal_seconds", 0.0)),
  }


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--topology", default="v5p:2x2x1")
  p.add_argument("--image_tokens", type=int, default=4096)
  p.add_argument("--txt_len", type=int, default=512)
  p.add_argument("--per_chip_batch", type=int, default=1)
  p.add_argument("--heads", type=int, default=24)
  p.add_argument("--head_dim", type=int, default=128)
  p.add_argument("--query_chunk", type=int, default=1024, help="XLA path block; 0 = none")
  p.add_argument("--implementations", default="xla,flash")
  args = p.parse_args()
  devices = topology_devices(args.topology)
  mesh = make_mesh({"data": 1, "fsdp": -1, "tensor": 1}, devices)
  shape = (
    args.per_chip_batch * len(devices),
    args.image_tokens + args.txt_len,
    args.heads,
    args.head_dim,
  )
  print(
    f"# {args.topology}: {len(devices)} chips ({devices[0].device_kind}); q/k/v {shape} bf16, "
    f"batch sharded over fsdp={len(devices)}"
  )
  for implementation in args.implementations.split(","):
    result = compile_one(implementation, mesh, shape, args.query_chunk)
    result.update(topology=args.topology, shape=list(shape), query_chunk=args.query_chunk)
    print(json.dumps(result))
    print(
      f"#   {implementation}: temp {result['temp_bytes'] / GiB:.3f} GiB, per chip "
      f"{result['per_chip_bytes'] / GiB:.3f} GiB, estimate "
      f"{result['estimated_seconds'] * 1e3:.2f} ms",
      flush=True,
    )


if __name__ == "__main__":
  main()
