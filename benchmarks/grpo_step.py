"""GRPO iteration throughput: rollout samples/s, train step time, rollout/reward/update split, and
achieved FLOP/s next to a large-matmul peak measured in the same run.

  python benchmarks/grpo_step.py --init_from=runs/demo/base/export/pipeline [--iterations=3]
      [--scan_layers --remat_policy=full]  # how the MMDiT is compiled (transformer_overrides)
      [--rollout_chunks=N] [--micro_batch_size=M]  # default: configs/grpo_t2i.py:tiny; M=0: none
  python benchmarks/grpo_step.py   # no --init_from: a tiny random diffusers pipeline (needs torch)

FLOPs come from XLA's cost analysis of the compiled rollout (its scan body times N steps) and
train step: the set-up and iteration steps of `qwen_image_rl/rl/iteration.py`, which the trainer
composes. Like the trainer, a single update per batch skips the old-log-prob pass (the step's
own log-probs are the old ones); --recompute_old runs it (rl.old_log_probs='recompute'), inside
the update's time. With --scan_layers XLA counts the scanned block once, so the FLOP/s it prints
are too low by about the layer count. Times are medians. The peak is a 2048x2048 float32 matmul
timed after warm-up.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np


def matmul_peak(n: int = 2048, repeats: int = 10) -> float:
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  start = time.perf_counter()
  for _ in range(repeats):
    out = f(a)
  out.block_until_ready()
  return 2 * n**3 * repeats / (time.perf_counter() - start)


def flops_of(jitted, *args) -> float:
  cost = jitted.lower(*args).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", 0.0))


def update_step_flops(s, tx, state, batch) -> float:
  """FLOPs of the update step on `batch` (`s`: iteration.setup's RLSetup). XLA's cost analysis
  counts a micro-batch scan's body once, so this compiles the same step on the whole batch at
  once (rl.micro_batch_size unset): the same model FLOPs, counted in full."""
  from qwen_image_rl import parallel

  rl = s.rl.copy_and_resolve_references()
  rl.micro_batch_size = None
  step = jax.jit(s.objective.make_step(s.model, tx, s.rules, rl, s.img_shapes))
  with parallel.sharding_context(s.mesh, s.rules):  # as iteration.update calls it
    return flops_of(step, state, batch, None)


def rollout_step_flops(s, params) -> float:
  """FLOPs of one denoising step of a rollout chunk (`s`: iteration.setup's RLSetup). XLA's cost
  analysis counts the sampler's while-loop body once, so this is per step: scale it by the
  chunks and steps of an iteration."""
  from qwen_image_rl import parallel
  from qwen_image_rl.rl import rollout as rl_rollout

  roller, rl = s.roller, s.rl
  fn = rl_rollout.jitted_rollout(s.model, roller.img_shapes, True)
  x_T = jnp.zeros((roller.chunk, roller.seq_len, roller.channels), jnp.float32)
  with parallel.sharding_context(s.mesh, s.rules):  # as rl_rollout.rollout calls it
    return flops_of(
      fn,
      params,
      x_T,
      s.pool.cond[: roller.chunk],
      s.pool.mask[: roller.chunk],
      roller.neg_cond,
      roller.neg_mask,
      roller.sigmas,
      roller.train_steps(jax.random.key(0), 0),
      jax.random.key(0),
      jnp.float32(rl.cfg_scale),
      jnp.float32(rl.noise_level),
      None,
    )


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--init_from", default="")
  parser.add_argument("--iterations", type=int, default=3)
  parser.add_argument("--group_size", type=int, default=8)
  parser.add_argument("--prompts_per_step", type=int, default=8)
  parser.add_argument("--num_steps", type=int, default=10)
  parser.add_argument("--rollout_chunks", type=int, default=0, help="0: the config's")
  parser.add_argument("--micro_batch_size", type=int, default=-1, help="-1: the config's; 0: none")
  parser.add_argument(
    "--scan_layers",
    action="store_true",
    help="scanned MMDiT blocks (config.model.transformer_overrides)",
  )
  parser.add_argument("--remat_policy", default="none")
  parser.add_argument(
    "--malloc_tuning",
    default="true",
    choices=("true", "false"),
    help="false: leave glibc malloc at its defaults (qwen_image_rl/"
    "host_memory.py), to measure what the tuning buys",
  )
  parser.add_argument(
    "--recompute_old",
    action="store_true",
    help="recompute old log-probs before the update (inner_updates > 1 does)",
  )
  args = parser.parse_args()
  from configs import grpo_t2i
  from qwen_image_rl import host_memory, optim, parallel
  from qwen_image_rl.rl import iteration
  from qwen_image_rl.rl.policy import init_policy_state

  malloc_tuned = host_memory.tune_malloc() if args.malloc_tuning == "true" else False
  c = grpo_t2i.get_config("tiny")
  c.rl.update(
    dict(
      group_size=args.group_size, prompts_per_step=args.prompts_per_step, num_steps=args.num_steps
    )
  )
  c.rl.old_log_probs = "recompute" if args.recompute_old else "auto"
  if args.rollout_chunks:
    c.rl.rollout_chunks = args.rollout_chunks
  if args.micro_batch_size >= 0:
    c.rl.micro_batch_size = args.micro_batch_size or None
  c.data.num_prompts = 256
  c.model.transformer_overrides = dict(scan_layers=args.scan_layers, remat_policy=args.remat_policy)
  if args.init_from:
    c.init_from = args.init_from
  else:
    from tests import tiny_reference

    _, c.init_from = tiny_reference.build_t2i(tempfile.mkdtemp())
    c.data.image_size = 32
  # The trainer's set-up and iteration steps, as it calls them (qwen_image_rl/rl/iteration.py).
  mesh = parallel.make_mesh(dict(c.mesh))
  rules = parallel.as_rules(c.logical_axis_rules)
  s = iteration.setup(c, mesh, rules)
  tx = optim.make_optimizer(c.optim, 100)
  state, shardings = init_policy_state(s.model, s.pipe.transformer_params, tx, mesh, rules, 0)
  step = iteration.make_update_step(s, tx, shardings)
  rl, roller = c.rl, s.roller
  rows = []
  rollout_flops = step_flops = None
  with iteration.make_reward_pipeline(c, s.reward_fn) as reward_pipeline:
    for it in range(args.iterations + 1):  # iteration 0 compiles
      t0 = time.perf_counter()
      got = iteration.roll_out(s, state.params, jax.random.key(it), it, reward_pipeline)
      t1 = time.perf_counter()
      iteration.score(s, got)
      adv, _ = iteration.advantages(s, got)
      if step_flops is None:
        batch = s.objective.make_batch(
          s, state.params, got.result, roller.policy_inputs(got.pool_index), jnp.asarray(adv)
        )
        step_flops = update_step_flops(s, tx, state, batch)
        rollout_flops = rl.rollout_chunks * rl.num_steps * rollout_step_flops(s, state.params)
      t2 = time.perf_counter()
      state, _ = iteration.update(s, step, state, got, adv)
      jax.block_until_ready(state)  # the params too: the next rollout needs them
      t3 = time.perf_counter()
      if it > 0:
        rows.append(
          dict(
            rollout=got.rollout_seconds,
            reward=got.reward_seconds,
            reward_wait=got.reward_wait_seconds,
            collect=t1 - t0,
            update=t3 - t2,
            total=t3 - t0,
          )
        )
  # Medians over the timed iterations (the first, compiling one is not among them).
  med = {k: float(np.median([r[k] for r in rows])) for k in rows[0]}
  peak = matmul_peak()
  b = roller.batch
  print(
    f"devices {jax.device_count()} ({jax.devices()[0].platform}); batch {b} = "
    f"{rl.prompts_per_step} prompts x G={rl.group_size}, {rl.num_steps} steps, "
    f"K={rl.timesteps.num_train}, cfg_mode={rl.cfg_mode}, {rl.rollout_chunks} rollout chunks, "
    f"micro-batch {rl.micro_batch_size}, transformer "
    f"{dict(c.model.transformer_overrides)}, old log-probs "
    f"{'recomputed' if args.recompute_old else 'from the step (on-policy)'}, malloc tuned "
    f"{malloc_tuned}"
  )
  print(
    f"rollout: {b / med['rollout']:.1f} samples/s ({med['rollout']:.2f} s incl. decode), "
    f"{rollout_flops / med['rollout'] / 1e9:.1f} GFLOP/s"
  )
  print(
    f"reward: {med['reward']:.2f} s on the worker thread, main thread waited "
    f"{med['reward_wait']:.2f} s"
  )
  print(
    f"update (old log-probs if recomputed, then the train step): {med['update']:.2f} s, "
    f"train step {step_flops / med['update'] / 1e9:.1f} GFLOP/s"
  )
  print(
    f"iteration: {med['total']:.2f} s = rollout {med['rollout'] / med['total']:.0%}, "
    f"reward wait {med['reward_wait'] / med['total']:.0%}, update "
    f"{med['update'] / med['total']:.0%}"
  )
  print(
    f"peak (2048^2 f32 matmul, same run): {peak / 1e9:.1f} GFLOP/s; rollout at "
    f"{rollout_flops / med['rollout'] / peak:.1%}, train step at "
    f"{step_flops / med['update'] / peak:.1%} of it"
  )


if __name__ == "__main__":
  main()
