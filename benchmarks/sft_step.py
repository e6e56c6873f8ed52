"""Flow-matching (sft) train-step time of the tiny base for each way of compiling the MMDiT.

  python benchmarks/sft_step.py [--repeats=7] [--micro_batches=1,4]

Times the gradient of the sft loss (a T2I batch and an edit batch, the tiny config's shapes,
draws fixed) with unrolled or scanned blocks, with or without rematerialisation, and split into
`data.micro_batches` equal parts (as trainers/sft.py accumulates them), interleaved over
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


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument(
    "--micro_batches", default="1,4", help="comma-separated data.micro_batches values to time"
  )
  args = parser.parse_args()

  from configs import sft
  from qwen_image_rl import host_memory
  from qwen_image_rl.models.mmdit import QwenImageTransformer
  from qwen_image_rl.rl.objectives.forward import accumulate_grads
  from qwen_image_rl.trainers.sft import flow_matching_draws, velocity_loss

  host_memory.tune_malloc()  # as the trainers' entry point does
  config = sft.get_config("tiny")
  z_dim, text_dim = 8, config.model.text_encoder.hidden_size
  side = config.data.image_size // 8  # VAE /4 then 2x2 patches
  n, L = side * side, config.data.max_text_tokens
  bt, be = config.data.t2i_batch_size, config.data.edit_batch_size
  keys = jax.random.split(jax.random.key(0), 7)
  parts = {}
  for i, (task, b) in enumerate((("t2i", bt), ("edit", be))):
    x0 = jax.random.normal(keys[3 * i], (b, n, 4 * z_dim))
    t, eps = flow_matching_draws(keys[3 * i + 1], x0, 1.0)
    cond = jax.random.normal(keys[3 * i + 2], (b, L, text_dim))
    parts[task] = dict(x0=x0, cond=cond, mask=jnp.ones((b, L), jnp.int32), t=t, eps=eps)
  parts["edit"]["ref_latents"] = jax.random.normal(keys[6], (be, n, 4 * z_dim))

  peak = matmul_peak()
  print(
    f"tiny sft step: T2I batch {bt} + edit batch {be}, {n} latent tokens, {L} text tokens; "
    f"matmul peak {peak / 1e9:.0f} GFLOP/s; the configured step: "
    f"{dict(config.model.transformer_overrides)}, micro_batches "
    f"{config.data.get('micro_batches', 1)}"
  )
  transformer_cfg = dict(config.model.transformer)
  transformer_cfg.update(in_channels=4 * z_dim, out_channels=z_dim, joint_attention_dim=text_dim)
  steps, model_flops = {}, None
  for name, overrides in VARIANTS:
    model = QwenImageTransformer.from_config(transformer_cfg, **overrides)
    params = nn.meta.unbox(model.init_params(jax.random.key(0)))

    def loss(p, micro, model=model):
      total = velocity_loss(model, p, **micro["t2i"]) + velocity_loss(model, p, **micro["edit"])
      return total, {}

    for micro_batches in (int(m) for m in args.micro_batches.split(",")):
      step = jax.jit(lambda p, b, m=micro_batches, f=loss: accumulate_grads(f, p, b, m))
      if model_flops is None:  # the first variant: unrolled, one batch
        model_flops = flops_of(step, params, parts)
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
      f"({baseline / median:4.2f}x unrolled, one batch); model "
      f"{model_flops / median / 1e9:4.0f} GFLOP/s ({model_flops / median / peak:4.0%} of peak)"
    )


if __name__ == "__main__":
  main()
