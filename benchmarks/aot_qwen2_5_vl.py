"""AOT-compile the Qwen2.5-VL-7B forward (vision tower + language model + LM head) for a TPU
topology, on a CPU host.

Builds `Qwen25VL` from the Qwen2.5-VL-7B-Instruct config (bf16 params and compute, scanned
decoder layers), shards the parameters with the default logical axis rules on a
(data, fsdp, tensor) mesh over the topology's devices, and lowers + compiles the forward of a
batch of prompts, each with one image, to logits, with abstract inputs. Nothing is allocated:
the figures come from the compiler's memory and cost analyses.

Needs libtpu (`pip install 'jax[tpu]==0.10.2'`); on a machine without a TPU run with
JAX_PLATFORMS=cpu (and ALLOW_MULTIPLE_LIBTPU_LOAD=1 if another process holds libtpu):

  JAX_PLATFORMS=cpu .venv/bin/python benchmarks/aot_qwen2_5_vl.py --topology=v5p:2x2x1 \\
      --per_chip_batch=1 --text_len=256 --image_size=448

Measured on the shared 2-core CPU box (libtpu 0.0.42.1, other compiles running), the defaults:
v5p:2x2x1 = 4 chips, mesh fsdp=4, bf16, 8.292B params, global batch 4 x (256 text + 256 image
tokens; 448x448 images = 1024 patches), full logits: lower 4.1 s, compile 506 s; per chip:
arguments 3.867 GiB, outputs 0.145 GiB, temp 2.206 GiB -> 6.218 GiB total (v5p: 95 GiB HBM);
cost_analysis 4.93e12 flops (the scanned decoder layer counted once).
The vision tower attends over all patches of the batch with a block-diagonal mask (exact, but
quadratic in the batch's patches); per-image attention would cut its temp memory.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import topologies
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qwen_image_rl.models.mmdit import count_params
from qwen_image_rl.models.qwen2_5_vl_full import QWEN2_5_VL_7B_CONFIG, Qwen25VL
from qwen_image_rl.parallel import DEFAULT_LOGICAL_AXIS_RULES, make_mesh, tree_shardings
from qwen_image_rl.parallel.partitioning import batch_sharding

GiB = 2**30


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--topology", default="v5p:2x2x1", help="TPU topology, e.g. v5p:2x2x1, v5e:2x4")
  p.add_argument(
    "--mesh",
    default="data=1,fsdp=-1,tensor=1",
    help="mesh axis sizes; -1 takes the remaining devices",
  )
  p.add_argument("--per_chip_batch", type=int, default=1)
  p.add_argument("--text_len", type=int, default=256, help="text tokens per prompt")
  p.add_argument(
    "--image_size",
    type=int,
    default=448,
    help="square image side in pixels "
    "(multiple of 28): (side/14)^2 patches, a quarter of that LLM tokens",
  )
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument(
    "--last_logits_only",
    type=int,
    default=0,
    help="1: logits of the last position only (what generation needs)",
  )
  return p.parse_args(argv)


def build_inputs(model: Qwen25VL, batch: int, text_len: int, image_size: int):
  """Abstract shapes of one prompt layout, and the (concrete) vision layout arrays."""
  if image_size % 28:
    raise ValueError(f"--image_size={image_size} must be a multiple of 28 (patch 14 x merge 2)")
  side = image_size // 14
  grid = np.array([[1, side, side]] * batch)
  image_tokens = side * side // 4
  length = text_len + image_tokens
  layout = {k: jnp.asarray(v) for k, v in model.layout(grid).items()}
  return grid, image_tokens, length, layout


def main(argv=None):
  args = parse_args(argv)
  topo = topologies.get_topology_desc(platform="tpu", topology_name=args.topology)
  devices = topo.devices
  sizes = {k: int(v) for k, v in (kv.split("=") for kv in args.mesh.split(","))}
  mesh = make_mesh(sizes, devices=devices)
  rules = DEFAULT_LOGICAL_AXIS_RULES
  dtype = jnp.dtype(args.dtype)
  model = Qwen25VL.from_config(QWEN2_5_VL_7B_CONFIG, dtype=dtype, scan_layers=True)
  batch = args.per_chip_batch * mesh.shape["data"] * mesh.shape["fsdp"]
  grid, image_tokens, length, layout = build_inputs(model, batch, args.text_len, args.image_size)

  abstract = model.abstract_params()
  param_shardings = tree_shardings(abstract, mesh, rules)
  param_specs = jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
    nn.meta.unbox(abstract),
    param_shardings,
  )
  spec = lambda shape, dt, axis=0: jax.ShapeDtypeStruct(
    shape,
    dt,
    sharding=batch_sharding(mesh, len(shape), rules)
    if axis == 0
    else NamedSharding(mesh, P(None, *batch_sharding(mesh, len(shape) - 1, rules).spec)),
  )
  patches = int(grid.prod(-1).sum())
  inputs = dict(
    input_ids=spec((batch, length), jnp.int32),
    attention_mask=spec((batch, length), jnp.int32),
    position_ids=spec((3, batch, length), jnp.int32, axis=1),
    pixel_values=spec((patches, model.vision_config.patch_dim), dtype),
  )
  last = jnp.full((batch, 1), length - 1, jnp.int32) if args.last_logits_only else None

  def forward(params, inputs):
    with nn.logical_axis_rules(rules):
      return model.apply(
        {"params": params},
        inputs["input_ids"],
        inputs["attention_mask"],
        inputs["pixel_values"],
        position_ids=inputs["position_ids"],
        vision_layout=layout,
        output_positions=last,
      )

  t0 = time.time()
  with jax.set_mesh(mesh):
    lowered = jax.jit(forward).lower(param_specs, inputs)
  t1 = time.time()
  compiled = lowered.compile()
  print(f"lower {t1 - t0:.1f} s, compile {time.time() - t1:.1f} s")
  print(
    f"topology {args.topology}: {len(devices)} chips ({devices[0].device_kind}), mesh "
    f"{dict(mesh.shape)}; Qwen2.5-VL-7B {count_params(abstract) / 1e9:.3f}B params, "
    f"{args.dtype}; global batch {batch} prompts x ({args.text_len} text + {image_tokens} "
    f"image tokens = {length}), {patches // batch} patches per image"
  )
  mem = compiled.memory_analysis()
  if mem is not None:
    fields = (
      "argument_size_in_bytes",
      "output_size_in_bytes",
      "alias_size_in_bytes",
      "temp_size_in_bytes",
      "generated_code_size_in_bytes",
    )
    vals = {f: getattr(mem, f, 0) for f in fields}
    for f, v in vals.items():
      print(f"  {f:32s} {v / GiB:9.3f} GiB")
    peak = (
      vals["argument_size_in_bytes"]
      + vals["output_size_in_bytes"]
      - vals["alias_size_in_bytes"]
      + vals["temp_size_in_bytes"]
    )
    print(f"  per-chip total (args+out-alias+temp) {peak / GiB:9.3f} GiB")
  cost = compiled.cost_analysis()
  cost = (cost[0] if isinstance(cost, (list, tuple)) and cost else cost) or {}
  print(
    "  cost_analysis (a scanned layer counted once): "
    + ", ".join(f"{k} {cost.get(k, float('nan')):.3e}" for k in ("flops", "bytes accessed"))
  )
  return compiled


if __name__ == "__main__":
  main()
