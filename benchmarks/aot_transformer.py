"""AOT-compile the Qwen-Image transformer forward+backward for a TPU topology, on a CPU host.

Builds the 20B `QwenImageTransformer` (bf16 params and compute, scan over blocks, remat), shards
its parameters with the default logical axis rules on a (data, fsdp, tensor) mesh over the
topology's devices, lowers `value_and_grad(mean(out**2))` with abstract inputs and compiles it
with libtpu. Nothing is allocated: the figures come from the compiler's memory and cost analyses.

Needs libtpu (`pip install 'jax[tpu]==0.10.2'`); on a machine without a TPU run with
JAX_PLATFORMS=cpu:

  JAX_PLATFORMS=cpu .venv/bin/python benchmarks/aot_transformer.py \
      --topology=v5p:4x4x4 --num_layers=60 --height=1024 --width=1024 --txt_len=512

Measured on the 2-core CPU dev box (libtpu 0.0.42.1; v5p:4x4x4 = 64 chips, mesh fsdp=64, bf16,
scan, remat 'full', per-chip batch 1, 4096 image + 512 text tokens, 20.430B params):
  compile 51-53 s (scanned 60 layers); per chip: arguments 0.609 GiB, outputs 0.606 GiB,
  temp 24.48 GiB -> 25.70 GiB total (v5p has 95 GiB HBM).
  With --attention_query_chunk=512: compile 98 s, temp 20.73 GiB -> 21.94 GiB total.
  cost_analysis of the scanned program counts the scan body once (5.6e12 flops, whatever the
  layer count), so the script also compiles unrolled 1- and 2-layer programs (95 s + 156 s) and
  extrapolates: 3.146e14 flops per chip per step (5.25e12 per layer; = 4x forward, i.e. the
  analytic 3x-forward 2.349e14 plus the remat recompute), 2.54e12 bytes accessed,
  optimal_seconds 1.61 s per step.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
from aot_common import (
  GiB,
  abstract_tree,
  compile_with,
  cost_of,
  extrapolate,
  memory_of,
  topology_devices,
  transformer_flops,
)
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from qwen_image_rl.models.mmdit import QwenImageTransformer, count_params
from qwen_image_rl.parallel import (
  DEFAULT_LOGICAL_AXIS_RULES,
  make_mesh,
  sharding_context,
  tree_shardings,
)
from qwen_image_rl.parallel.partitioning import batch_sharding


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument(
    "--topology",
    default="v5p:4x4x4",
    help="TPU topology name, e.g. v5p:4x4x4, v5e:16x16, v6e:16x16, v4:4x4x4",
  )
  p.add_argument("--num_layers", type=int, default=60)
  p.add_argument("--height", type=int, default=1024, help="image pixels (latent = /8, patch 2)")
  p.add_argument("--width", type=int, default=1024)
  p.add_argument("--txt_len", type=int, default=512)
  p.add_argument("--per_chip_batch", type=int, default=1)
  p.add_argument("--remat_policy", default="full")
  p.add_argument(
    "--mesh",
    default="data=1,fsdp=-1,tensor=1",
    help="mesh axis sizes; -1 takes the remaining devices",
  )
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument(
    "--attention_query_chunk",
    type=int,
    default=0,
    help="memory-efficient attention block (queries); 0 = plain attention",
  )
  p.add_argument(
    "--cost_from_unrolled",
    type=int,
    default=1,
    help="also compile unrolled 1- and 2-layer programs to extrapolate the cost",
  )
  return p.parse_args(argv)


def compile_step(args, mesh, num_layers: int, scan_layers: bool):
  """Lower and compile value_and_grad(mean(out**2)) wrt the params; returns (compiled, model)."""
  dtype = jnp.dtype(args.dtype)
  rules = DEFAULT_LOGICAL_AXIS_RULES
  batch = args.per_chip_batch * mesh.shape["data"] * mesh.shape["fsdp"]
  model = QwenImageTransformer(
    num_layers=num_layers,
    scan_layers=scan_layers,
    remat_policy=args.remat_policy,
    dtype=dtype,
    param_dtype=dtype,
    attention_query_chunk=args.attention_query_chunk or None,
  )
  h, w = args.height // 16, args.width // 16  # VAE /8, then 2x2 patches
  img_shapes = ((1, h, w),)

  abstract = model.abstract_params()
  param_shardings = tree_shardings(abstract, mesh, rules)
  param_specs = abstract_tree(abstract, mesh, rules)

  def batch_spec(shape, dt):
    return jax.ShapeDtypeStruct(shape, dt, sharding=batch_sharding(mesh, len(shape), rules))

  inputs = dict(
    hidden_states=batch_spec((batch, h * w, model.in_channels), dtype),
    encoder_hidden_states=batch_spec((batch, args.txt_len, model.joint_attention_dim), dtype),
    encoder_hidden_states_mask=batch_spec((batch, args.txt_len), jnp.int32),
    timestep=batch_spec((batch,), jnp.float32),
  )

  def loss_fn(params, inputs):
    out = model.apply({"params": params}, **inputs, img_shapes=img_shapes)
    return jnp.mean(jnp.square(out.astype(jnp.float32)))

  step = jax.jit(
    jax.value_and_grad(loss_fn), out_shardings=(NamedSharding(mesh, P()), param_shardings)
  )
  # jax.set_mesh: flax's activation constraints apply
  compiled, _ = compile_with(
    step,
    (param_specs, inputs),
    sharding_context(mesh, rules),
    f"{num_layers} layers, scan={scan_layers}",
  )
  return compiled, model


def main(argv=None):
  args = parse_args(argv)
  devices = topology_devices(args.topology)
  sizes = {k: int(v) for k, v in (kv.split("=") for kv in args.mesh.split(","))}
  mesh = make_mesh(sizes, devices=devices)
  n_img = (args.height // 16) * (args.width // 16)
  batch = args.per_chip_batch * mesh.shape["data"] * mesh.shape["fsdp"]

  compiled, model = compile_step(args, mesh, args.num_layers, scan_layers=True)
  print(
    f"topology {args.topology}: {len(devices)} chips ({devices[0].device_kind}), mesh "
    f"{dict(mesh.shape)}; {count_params(model.abstract_params()) / 1e9:.3f}B params "
    f"({args.num_layers} layers), {args.dtype}, remat={args.remat_policy}, attention query "
    f"chunk {args.attention_query_chunk or 'off'}; global batch "
    f"{batch}, tokens {n_img} image + {args.txt_len} text"
  )

  mem = memory_of(compiled)
  for f in ("argument_bytes", "output_bytes", "alias_bytes", "temp_bytes"):
    print(f"  {f:32s} {mem[f] / GiB:9.3f} GiB")
  print(f"  per-chip total (args+out-alias+temp) {mem['program_bytes'] / GiB:9.3f} GiB")

  keys = ("flops", "bytes accessed", "optimal_seconds")
  cost = cost_of(compiled)
  print("  cost_analysis of the scanned program (XLA counts a while-loop body once):")
  for k in keys:
    print(f"    {k:18s} {cost.get(k, float('nan')):.4e}")
  if args.cost_from_unrolled:
    # Unrolled 1- and 2-layer programs give the per-layer cost; extrapolate linearly.
    one, two = (cost_of(compile_step(args, mesh, n, scan_layers=False)[0]) for n in (1, 2))
    print(
      f"  cost extrapolated to {args.num_layers} layers from unrolled 1/2-layer compiles "
      f"(per chip):"
    )
    total = extrapolate(one, two, args.num_layers)
    for k in keys:
      print(f"    {k:18s} {total[k]:.4e}   (per layer {two.get(k, 0) - one.get(k, 0):.4e})")
  model_flops = 3 * transformer_flops(model, n_img, args.txt_len) * args.per_chip_batch
  print(f"  analytic fwd+bwd matmul FLOPs per chip (3x forward, before remat) {model_flops:.4e}")
  return compiled


if __name__ == "__main__":
  main()
