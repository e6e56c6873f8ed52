"""Flow-matching (sft) train-step time of the tiny base for each way of compiling the MMDiT.

  python benchmarks/sft_step.py [--repeats=7] [--micro_batches=1,4] [--text_tokens=48,16]

Times the gradient of the sft loss (a T2I batch and an edit batch, the tiny config's shapes,
draws fixed) with unrolled or scanned blocks, with or without rematerialisation, and split into
`data.micro_batches` equal parts (as trainers/sft.py accumulates them), with each task's text
stream as long as the trainer trims it to (its log prints them), interleaved over
repeats, and prints the median step time and the achieved model FLOP/s next to a 2048^2 float32
matmul peak measured in the same run. Model FLOPs are XLA's count for the unrolled one-batch
step (the same math in every variant): XLA counts a scan body once, and rematerialised forwards
are extra work, not model FLOPs.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.grpo_step import flops_of, matmul_peak

VARIANTS = (
  ("unrolled", dict(scan_layers=False, remat_policy="none")),
  ("unrolled+remat", dict(scan_layers=False, remat_policy="full")),
  ("scanned", dict(scan_layers=True, remat_policy="none")),
  ("scanned+remat", dict(scan_layers=True, remat_policy="full")),
)


Z_DIM = 8  # the tiny VAE's latent channels


def sft_parts(config, text_tokens: dict[str, int]):
  """One step's loss inputs at the tiny config's shapes (random values, draws fixed): per task
  (t2i, edit) x0, cond, mask, t, eps, and the edits' ref_latents; `text_tokens` per task."""
  from qwen_image_rl.trainers.sft import flow_matching_draws

  side = config.data.image_size // 8  # VAE /4 then 2x2 patches
  n, text_dim = side * side, config.model.text_encoder.hidden_size
  keys = jax.random.split(jax.random.key(0), 7)
  parts = {}
  batches = (("t2i", config.data.t2i_batch_size), ("edit", config.data.edit_batch_size))
  for i, (task, b) in enumerate(batches):
    x0 = jax.random.normal(keys[3 * i], (b, n, 4 * Z_DIM))
    t, eps = flow_matching_draws(keys[3 * i + 1], x0, 1.0)
    length = text_tokens[task]
    cond = jax.random.normal(keys[3 * i + 2], (b, length, text_dim))
    parts[task] = dict(x0=x0, cond=cond, mask=jnp.ones((b, length), jnp.int32), t=t, eps=eps)
  parts["edit"]["ref_latents"] = jax.random.normal(keys[6], (batches[1][1], n, 4 * Z_DIM))
  return parts


def transformer_config(config, text_dim: int, **changes) -> dict:
  """The tiny config's MMDiT fields with the VAE's and text encoder's sizes filled in."""
  fields = dict(config.model.transformer)
  fields.update(in_channels=4 * Z_DIM, out_channels=Z_DIM, joint_attention_dim=text_dim)
  fields.update(changes)
  return fields


def sft_loss(model):
  """loss(params, micro) -> (T2I + edit velocity loss, {}), as accumulate_grads takes it."""
  from qwen_image_rl.trainers.sft import velocity_loss

  def loss(params, micro):
    total = velocity_loss(model, params, **micro["t2i"]) + velocity_loss(
      model, params, **micro["edit"]
    )
    return total, {}

  return loss


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument(
    "--micro_batches", default="1,4", help="comma-separated data.micro_batches values to time"
  )
  parser.add_argument(
    "--text_tokens",
    default="48,16",
    help="T2I,edit text tokens: the tiny world's longest prompts (46 and 15 tokens) rounded up "
    "to 8, as trainers/sft.py trims them",
  )
  args = parser.parse_args()

  from configs import sft
  from qwen_image_rl import host_memory
  from qwen_image_rl.models.mmdit import QwenImageTransformer
  from qwen_image_rl.rl.objectives.forward import accumulate_grads

  host_memory.tune_malloc()  # as the trainers' entry point does
  config = sft.get_config("tiny")
  text_tokens = dict(zip(("t2i", "edit"), (int(v) for v in args.text_tokens.split(","))))
  parts = sft_parts(config, text_tokens)
  bt, be = config.data.t2i_batch_size, config.data.edit_batch_size
  n, text_dim = parts["t2i"]["x0"].shape[1], parts["t2i"]["cond"].shape[2]

  peak = matmul_peak()
  print(
    f"tiny sft step: T2I batch {bt} + edit batch {be}, {n} latent tokens, text tokens "
    f"{text_tokens['t2i']} (T2I) and {text_tokens['edit']} (edit); "
    f"matmul peak {peak / 1e9:.0f} GFLOP/s; the configured step: "
    f"{dict(config.model.transformer_overrides)}, micro_batches "
    f"{config.data.get('micro_batches', 1)}"
  )
  transformer_cfg = transformer_config(config, text_dim)
  steps, model_flops = {}, None
  for name, overrides in VARIANTS:
    model = QwenImageTransformer.from_config(transformer_cfg, **overrides)
    params = nn.meta.unbox(model.init_params(jax.random.key(0)))
    loss = sft_loss(model)
    if model_flops is None:  # the first variant (unrolled) on one batch, whatever is timed
      model_flops = flops_of(jax.jit(lambda p, b: accumulate_grads(loss, p, b, 1)), params, parts)
    for micro_batches in (int(m) for m in args.micro_batches.split(",")):
      step = jax.jit(lambda p, b, m=micro_batches, f=loss: accumulate_grads(f, p, b, m))
      jax.block_until_ready(step(params, parts))
      steps[name, micro_batches] = (step, params)
  times = {key: [] for key in steps}
  for _ in range(args.repeats):  # interleaved, so that load changes hit every variant alike
    for key, (step, params) in steps.items():
      start = time.perf_counter()
      jax.block_until_ready(step(params, parts))
      times[key].append(time.perf_counter() - start)
  baseline = float(np.median(times[next(iter(times))]))
  for (name, micro_batches), values in times.items():
    median = float(np.median(values))
    print(
      f"  {name:15s} micro_batches {micro_batches}: {median * 1e3:5.0f} ms/step "
      f"({baseline / median:4.2f}x the first row); model "
      f"{model_flops / median / 1e9:4.0f} GFLOP/s ({model_flops / median / peak:4.0%} of peak)"
    )


if __name__ == "__main__":
  main()
