"""Flow-matching (sft) train-step time of the tiny base for each way of compiling the MMDiT.

  python benchmarks/sft_step.py [--repeats=7]

Times value_and_grad of the sft loss (a T2I batch and an edit batch, the tiny config's shapes)
with unrolled or scanned blocks and with or without rematerialisation, and prints the median step
time and the achieved model FLOP/s next to a 2048^2 float32 matmul peak measured in the same run.
Model FLOPs are XLA's count for the unrolled step (the same math in every variant): XLA counts a
scan body once, and rematerialised forwards are extra work, not model FLOPs. On XLA:CPU the
unrolled backward is slow: fusion duplicates the whole residual gradient chain into each
weight-gradient transpose; scanned + remat blocks avoid it.
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
  args = parser.parse_args()

  from configs import sft
  from qwen_image_rl import host_memory
  from qwen_image_rl.models.mmdit import QwenImageTransformer
  from qwen_image_rl.trainers.sft import flow_matching_loss

  host_memory.tune_malloc()  # as the trainers' entry point does
  config = sft.get_config("tiny")
  z_dim, text_dim = 8, config.model.text_encoder.hidden_size
  side = config.data.image_size // 8  # VAE /4 then 2x2 patches
  n, L = side * side, config.data.max_text_tokens
  bt, be = config.data.t2i_batch_size, config.data.edit_batch_size
  keys = jax.random.split(jax.random.key(0), 6)
  batch = dict(
    t2i_x0=jax.random.normal(keys[0], (bt, n, 4 * z_dim)),
    t2i_cond=jax.random.normal(keys[1], (bt, L, text_dim)),
    t2i_mask=jnp.ones((bt, L), jnp.int32),
    edit_x0=jax.random.normal(keys[2], (be, n, 4 * z_dim)),
    edit_ref_latents=jax.random.normal(keys[3], (be, n, 4 * z_dim)),
    edit_cond=jax.random.normal(keys[4], (be, L, text_dim)),
    edit_mask=jnp.ones((be, L), jnp.int32),
  )

  peak = matmul_peak()
  print(
    f"tiny sft step: T2I batch {bt} + edit batch {be}, {n} latent tokens, {L} text tokens; "
    f"matmul peak {peak / 1e9:.0f} GFLOP/s"
  )
  transformer_cfg = dict(config.model.transformer)
  transformer_cfg.update(in_channels=4 * z_dim, out_channels=z_dim, joint_attention_dim=text_dim)
  baseline = model_flops = None
  for name, overrides in VARIANTS:
    model = QwenImageTransformer.from_config(transformer_cfg, **overrides)
    params = nn.meta.unbox(model.init_params(jax.random.key(0)))

    def loss(p, b, key):
      k1, k2 = jax.random.split(key)
      return flow_matching_loss(
        model, p, b["t2i_x0"], b["t2i_cond"], b["t2i_mask"], k1
      ) + flow_matching_loss(
        model,
        p,
        b["edit_x0"],
        b["edit_cond"],
        b["edit_mask"],
        k2,
        ref_latents=b["edit_ref_latents"],
      )

    step = jax.jit(jax.value_and_grad(loss))
    flops = flops_of(step, params, batch, keys[5])
    jax.block_until_ready(step(params, batch, keys[5]))
    times = []
    for _ in range(args.repeats):
      start = time.perf_counter()
      jax.block_until_ready(step(params, batch, keys[5]))
      times.append(time.perf_counter() - start)
    median = float(np.median(times))
    baseline = baseline or median
    model_flops = model_flops or flops  # the first variant is the unrolled one
    print(
      f"  {name:15s} {median * 1e3:7.0f} ms/step  ({baseline / median:4.2f}x unrolled)  "
      f"XLA count {flops / 1e9:5.1f} GFLOP; model {model_flops / median / 1e9:4.0f} GFLOP/s "
      f"({model_flops / median / peak:4.0%} of peak)"
    )


if __name__ == "__main__":
  main()
