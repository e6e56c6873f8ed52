"""What the CPU cotangent barriers buy the tiny GRPO update, measured in one process.

  python benchmarks/grpo_update_barriers.py [--rounds=4] [--batch=64]

Compiles the GRPO train step (rl/objectives/grpo.py, the conditional branch of hybrid CFG, no
micro-batches) of the issue-18 MMDiT (grpo_step_torch.TINY_TRANSFORMER: hidden 128, 4 layers,
16 image + 48 text tokens, K = 3 transitions per sample) twice, with
`layers.CPU_COTANGENT_BARRIERS` off and on, checks that both give the same parameters, then
times them interleaved on one random batch. Prints the medians, the minima and the median of
the per-round ratio off / on (> 1: the barriers help).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import flax.linen as nn  # noqa: E402
import grpo_step_torch as ref  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from qwen_image_rl.models import layers  # noqa: E402
from qwen_image_rl.models.mmdit import QwenImageTransformer  # noqa: E402
from qwen_image_rl.parallel.partitioning import DEFAULT_LOGICAL_AXIS_RULES  # noqa: E402
from qwen_image_rl.rl.objectives.grpo import make_grpo_train_step  # noqa: E402
from qwen_image_rl.train_state import TrainState  # noqa: E402

K, TOKENS, CHANNELS, TEXT = 3, 16, 64, 48
IMG_SHAPES = ((1, 4, 4),)


def random_batch(batch: int) -> dict:
  r = np.random.default_rng(0)
  normal = lambda *shape: jnp.asarray(r.normal(size=shape).astype(np.float32))
  sigmas = np.array([1.0, 0.9, 0.8], np.float32)
  mask = np.ones((batch, TEXT), np.int32)
  mask[:, 40:] = 0
  return dict(
    latents_t=normal(batch, K, TOKENS, CHANNELS),
    latents_next=normal(batch, K, TOKENS, CHANNELS),
    sigmas=jnp.asarray(np.tile(sigmas, (batch, 1))),
    sigmas_next=jnp.asarray(np.tile(sigmas - 0.05, (batch, 1))),
    cond=normal(batch, TEXT, ref.TINY_TRANSFORMER["joint_attention_dim"]),
    mask=jnp.asarray(mask),
    neg_cond=None,
    neg_mask=None,
    ref_latents=None,
    advantages=normal(batch),
    old_log_probs=None,
  )


def compiled_step(model, tx, state, batch, barriers: bool):
  layers.CPU_COTANGENT_BARRIERS = barriers  # read while tracing
  try:
    step = make_grpo_train_step(
      model,
      tx,
      DEFAULT_LOGICAL_AXIS_RULES,
      micro_batch_size=None,
      cfg_mode="rollout_only",
      clip_eps=0.01,
      noise_level=0.8,
      img_shapes=IMG_SHAPES,
      cfg_scale=4.0,
    )
    return jax.jit(step).lower(state, batch, None).compile()
  finally:
    layers.CPU_COTANGENT_BARRIERS = True


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--rounds", type=int, default=4)
  parser.add_argument("--batch", type=int, default=64)
  args = parser.parse_args()
  config = dict(ref.TINY_TRANSFORMER, axes_dims_rope=tuple(ref.TINY_TRANSFORMER["axes_dims_rope"]))
  model = QwenImageTransformer(**config)
  params = nn.meta.unbox(model.init_params(jax.random.key(0)))
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-4, weight_decay=0.0))
  state = TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    opt_state=tx.init(params),
    rng=jax.random.key_data(jax.random.key(0)),
  )
  batch = random_batch(args.batch)
  steps = {on: compiled_step(model, tx, state, batch, on) for on in (False, True)}
  new = {on: jax.block_until_ready(fn(state, batch, None))[0] for on, fn in steps.items()}
  diff = max(
    float(jnp.max(jnp.abs(a - b)))
    for a, b in zip(jax.tree.leaves(new[False].params), jax.tree.leaves(new[True].params))
  )
  times = {False: [], True: []}
  for _ in range(args.rounds):
    for on, fn in steps.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fn(state, batch, None))
      times[on].append(time.perf_counter() - t0)
  ratio = [a / b for a, b in zip(times[False], times[True])]
  print(
    f"GRPO update, batch {args.batch} x K={K} transitions, {args.rounds} rounds; max |param "
    f"difference| off vs on: {diff:g}"
  )
  for on in (False, True):
    print(
      f"barriers {'on ' if on else 'off'}: median {np.median(times[on]):.3f} s, "
      f"min {min(times[on]):.3f} s"
    )
  print(f"off / on: median {np.median(ratio):.2f} (range {min(ratio):.2f}-{max(ratio):.2f})")


if __name__ == "__main__":
  main()
