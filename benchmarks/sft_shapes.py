"""Sft step time of the tiny base for other MMDiT sizes and text lengths, as the trainer runs it.

  python benchmarks/sft_shapes.py [--shapes=4x128,4x96,2x192] [--text_tokens=48:16,48:48]
      [--repeats=7]

Each shape is LAYERSxWIDTH (width = heads x the config's 32-dim heads); each text setting is
T2I:EDIT text tokens. Every combination's gradient step (unrolled blocks, the config's
data.micro_batches, the tiny config's batches) is timed interleaved over repeats, so that load
changes hit every variant alike; prints parameters, median ms/step and the speed relative to
the first combination. What one step buys is measured by training, not here (README, "The tiny
world": what the base learns follows the examples it sees at a given size).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn
import jax
import numpy as np

from benchmarks.sft_step import sft_loss, sft_parts, transformer_config


def parse_pairs(text: str, sep: str, flag: str, example: str) -> list[tuple[int, int]]:
  """'A<sep>B,A<sep>B' -> [(A, B), ...] of integers; a malformed item exits naming the flag."""
  pairs = []
  for item in text.split(","):
    first, _, second = item.partition(sep)
    if not (first.isdigit() and second.isdigit()):
      raise SystemExit(f"--{flag}: {item!r} is not like {example}")
    pairs.append((int(first), int(second)))
  return pairs


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--shapes", default="4x128,4x96,2x192")
  parser.add_argument("--text_tokens", default="48:16")
  parser.add_argument("--repeats", type=int, default=7)
  args = parser.parse_args()

  from configs import sft
  from qwen_image_rl import host_memory
  from qwen_image_rl.models.mmdit import QwenImageTransformer, count_params
  from qwen_image_rl.rl.objectives.forward import accumulate_grads

  host_memory.tune_malloc()  # as the trainers' entry point does
  config = sft.get_config("tiny")
  head_dim = config.model.transformer.attention_head_dim
  micro_batches = config.data.get("micro_batches", 1)
  steps = {}
  for layers, width in parse_pairs(args.shapes, "x", "shapes", "4x128"):
    if width % head_dim:
      raise SystemExit(f"--shapes: width {width} is not a multiple of the {head_dim}-dim heads")
    for t2i_tokens, edit_tokens in parse_pairs(args.text_tokens, ":", "text_tokens", "48:16"):
      parts = sft_parts(config, {"t2i": t2i_tokens, "edit": edit_tokens})
      text_dim = parts["t2i"]["cond"].shape[2]
      fields = transformer_config(
        config, text_dim, num_layers=layers, num_attention_heads=width // head_dim
      )
      model = QwenImageTransformer.from_config(fields, **config.model.transformer_overrides)
      params = nn.meta.unbox(model.init_params(jax.random.key(0)))
      loss = sft_loss(model)
      step = jax.jit(lambda p, b, f=loss: accumulate_grads(f, p, b, micro_batches))
      jax.block_until_ready(step(params, parts))  # compile
      name = f"{layers} layers x {width}, text {t2i_tokens}:{edit_tokens}"
      steps[name] = (step, params, parts)
  times = {name: [] for name in steps}
  for _ in range(args.repeats):
    for name, (step, params, parts) in steps.items():
      start = time.perf_counter()
      jax.block_until_ready(step(params, parts))
      times[name].append(time.perf_counter() - start)
  first = float(np.median(next(iter(times.values()))))
  print(
    f"tiny sft gradient step, micro_batches {micro_batches}, T2I batch "
    f"{config.data.t2i_batch_size} + edit batch {config.data.edit_batch_size}:"
  )
  for name, values in times.items():
    median = float(np.median(values))
    print(
      f"  {name:32s} {count_params(steps[name][1]) / 1e6:5.2f}M params  "
      f"{median * 1e3:5.0f} ms/step ({first / median:4.2f}x the first)"
    )


if __name__ == "__main__":
  main()
