"""Peak host memory of loading a full-width Qwen-Image transformer checkpoint.

  python benchmarks/load_memory.py [--num_layers=2] [--devices=1] [--scan_layers=true]

Writes a random bf16 checkpoint with the released model's width (3072, 24 heads, MLP 12288,
text 3584) and `--num_layers` blocks in diffusers layout (safetensors shards + index, ~1.4 GB
for 2 layers) to a temp dir, then loads it with `load_transformer` in a fresh subprocess, once
streaming (tensor by tensor into the target shardings, over `--devices` simulated CPU devices
with fsdp over all of them) and once the eager way for comparison (`load_state_dict` reads the
whole checkpoint into memory, then the params are built from it). Each child prints its
resident set after imports and JAX start-up (the baseline), its peak (VmHWM), and the growth
over the baseline as a multiple of the checkpoint size.

On CPU the loaded parameters themselves live in host memory (the CPU devices' memory), so the
growth cannot be below 1.0x; on a TPU host they live in HBM and the host only holds the tensor in
flight. Target: streaming growth <= 1.2x the checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _status_kib(field: str) -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1])
  raise RuntimeError(f"/proc/self/status has no {field}")


def write_checkpoint(directory: str, num_layers: int) -> int:
  """A random bf16 full-width checkpoint; returns its tensor bytes."""
  import ml_dtypes
  import numpy as np

  from qwen_image_rl.convert.safetensors_io import save_state_dict
  from qwen_image_rl.convert.transformer import expected_torch_shapes
  from qwen_image_rl.models.mmdit import QwenImageTransformer

  model = QwenImageTransformer(num_layers=num_layers)  # the released width
  rng = np.random.default_rng(0)
  state = {}
  for key, shape in expected_torch_shapes(model).items():
    state[key] = (0.02 * rng.standard_normal(shape, np.float32)).astype(ml_dtypes.bfloat16)
  save_state_dict(state, directory, max_shard_bytes=512 * 2**20)
  config = {**model.to_config(), "pooled_projection_dim": 768}  # as in the released config
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(config, f)
  return int(sum(v.nbytes for v in state.values()))


def child(directory: str, mode: str, scan_layers: bool) -> None:
  """Load the checkpoint and print one JSON line of memory figures."""
  import jax
  import jax.numpy as jnp

  from qwen_image_rl.convert import safetensors_io, transformer
  from qwen_image_rl.models.mmdit import QwenImageTransformer
  from qwen_image_rl.parallel import make_mesh

  devices = jax.devices()
  mesh = make_mesh({"data": 1, "fsdp": len(devices), "tensor": 1})
  baseline = _status_kib("VmRSS")
  if mode == "streaming":
    _, params = transformer.load_transformer(
      directory, jnp.bfloat16, mesh=mesh, scan_layers=scan_layers
    )
  else:
    # The eager way: the whole state dict in memory, then the params built from it.
    state = safetensors_io.load_state_dict(directory)
    config = safetensors_io.read_json(os.path.join(directory, "config.json"))
    config.pop("pooled_projection_dim")
    model = QwenImageTransformer.from_config(
      config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, scan_layers=scan_layers
    )
    params = transformer.params_from_torch_state_dict(state, model)
    del state
  jax.block_until_ready(params)
  param_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
  print(
    json.dumps(
      {
        "mode": mode,
        "devices": len(devices),
        "scan_layers": scan_layers,
        "baseline_rss_bytes": baseline * 1024,
        "peak_rss_bytes": _status_kib("VmHWM") * 1024,
        "param_bytes": int(param_bytes),
      }
    )
  )


def run_child(directory: str, mode: str, devices: int, scan_layers: bool) -> dict:
  env = dict(
    os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}"
  )
  out = subprocess.run(
    [
      sys.executable,
      os.path.abspath(__file__),
      f"--child={directory}",
      f"--mode={mode}",
      f"--scan_layers={scan_layers}",
    ],
    env=env,
    check=True,
    capture_output=True,
    text=True,
  )
  return json.loads(out.stdout.strip().splitlines()[-1])


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--num_layers", type=int, default=2)
  parser.add_argument("--devices", type=int, default=1)
  parser.add_argument("--scan_layers", type=lambda s: s.lower() == "true", default=True)
  parser.add_argument("--modes", default="streaming,eager")
  parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--mode", default="streaming", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    child(args.child, args.mode, args.scan_layers)
    return
  with tempfile.TemporaryDirectory() as directory:
    size = write_checkpoint(directory, args.num_layers)
    print(
      f"checkpoint: {args.num_layers} full-width layers, {size / 2**30:.2f} GiB of bf16 "
      f"tensors; loading on {args.devices} CPU device(s), scan_layers={args.scan_layers}"
    )
    for mode in args.modes.split(","):
      r = run_child(directory, mode, args.devices, args.scan_layers)
      growth = r["peak_rss_bytes"] - r["baseline_rss_bytes"]
      r.update(checkpoint_bytes=size, growth_over_checkpoint=round(growth / size, 3))
      print(
        f"{mode:>9}: baseline {r['baseline_rss_bytes'] / 2**30:.2f} GiB, peak "
        f"{r['peak_rss_bytes'] / 2**30:.2f} GiB, growth {growth / 2**30:.2f} GiB = "
        f"{growth / size:.2f}x the checkpoint (params {r['param_bytes'] / 2**30:.2f} GiB)"
      )
      print(json.dumps(r))


if __name__ == "__main__":
  main()
