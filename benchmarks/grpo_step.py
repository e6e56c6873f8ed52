"""GRPO iteration throughput: rollout samples/s, train step time, rollout/reward/update split, and
achieved FLOP/s next to a large-matmul peak measured in the same run.

  python benchmarks/grpo_step.py --init_from=runs/demo/base/export/pipeline [--iterations=3]
      [--scan_layers --remat_policy=full]  # how the MMDiT is compiled (transformer_overrides)
  python benchmarks/grpo_step.py   # no --init_from: a tiny random diffusers pipeline (needs torch)

FLOPs come from XLA's cost analysis of the compiled rollout (its scan body times N steps) and
train step (the same functions the trainer runs). Like the trainer, a single update per batch
skips the old-log-prob pass (the step's own log-probs are the old ones); --recompute_old times
the pass anyway, dispatched asynchronously, so its time shows up in the train step's. With --scan_layers XLA counts the scanned block once, so
the FLOP/s it prints are too low by about the layer count. Times are medians. The peak is a
2048x2048 float32 matmul timed after warm-up.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


def matmul_peak(n: int = 2048, repeats: int = 10) -> float:
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  start = time.perf_counter()
  for _ in range(repeats):
    out = f(a)
  out.block_until_ready()
  return 2 * n ** 3 * repeats / (time.perf_counter() - start)


def flops_of(jitted, *args) -> float:
  cost = jitted.lower(*args).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", 0.0))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--init_from", default="")
  parser.add_argument("--iterations", type=int, default=3)
  parser.add_argument("--group_size", type=int, default=8)
  parser.add_argument("--prompts_per_step", type=int, default=8)
  parser.add_argument("--num_steps", type=int, default=10)
  parser.add_argument("--scan_layers", action="store_true",
                      help="scanned MMDiT blocks (config.model.transformer_overrides)")
  parser.add_argument("--remat_policy", default="none")
  parser.add_argument("--malloc_tuning", default="true", choices=("true", "false"),
                      help="false: leave glibc malloc at its defaults (qwen_image_rl/"
                           "host_memory.py), to measure what the tuning buys")
  parser.add_argument("--recompute_old", action="store_true",
                      help="recompute old log-probs before the update (inner_updates > 1 does)")
  args = parser.parse_args()
  os.environ["QWEN_IMAGE_RL_MALLOC_TUNING"] = "1" if args.malloc_tuning == "true" else "0"

  import qwen_image_rl  # applies the malloc tuning unless switched off above
  from configs import grpo_t2i
  from qwen_image_rl import optim
  from qwen_image_rl.rl import reward_setup
  from qwen_image_rl.rl import rollout as rl_rollout
  from qwen_image_rl.rl.advantages import contiguous_group_ids, gdpo_advantages, sample_weights
  from qwen_image_rl.rl.grpo import make_grpo_train_step
  from qwen_image_rl.rewards.async_pipeline import AsyncRewardPipeline
  from qwen_image_rl.trainers import grpo
  from qwen_image_rl import parallel

  c = grpo_t2i.get_config("tiny")
  c.rl.update(dict(group_size=args.group_size, prompts_per_step=args.prompts_per_step,
                   num_steps=args.num_steps))
  c.data.num_prompts = 256
  c.model.transformer_overrides = dict(scan_layers=args.scan_layers,
                                       remat_policy=args.remat_policy)
  if args.init_from:
    c.init_from = args.init_from
  else:
    from qwen_image_rl.pipelines import tiny_reference
    _, c.init_from = tiny_reference.build_t2i(tempfile.mkdtemp())
    c.data.image_size = 32
  pipe = grpo.load_base(c)
  reward_fn = reward_setup.build_reward(c)
  weights = reward_setup.category_weights(c)
  cats = tuple(sorted(weights))
  table = reward_setup.weight_table(weights, cats, reward_fn.names)
  pool = grpo.build_pool(c, pipe)
  mesh = parallel.make_mesh(dict(c.mesh))
  rules = tuple(tuple(r) for r in c.logical_axis_rules)
  tx = optim.make_optimizer(c.optim, 100)
  state, shardings = grpo.init_policy_state(pipe.transformer, pipe.transformer_params, tx, mesh,
                                            rules, 0)
  roller = grpo.Roller(c, pipe, pool, reward_fn, mesh, rules)
  rl = c.rl
  step = jax.jit(make_grpo_train_step(
      pipe.transformer, tx, rules, micro_batch_size=None, cfg_mode=rl.cfg_mode,
      clip_eps=rl.clip_eps, noise_level=rl.noise_level, img_shapes=roller.img_shapes,
      cfg_scale=rl.cfg_scale, mesh=mesh), out_shardings=(shardings, None))
  groups = contiguous_group_ids(roller.batch, rl.group_size)
  rows = []
  rollout_flops = step_flops = None
  with AsyncRewardPipeline(reward_fn, max_pending=4) as rewards:
    for it in range(args.iterations + 1):  # iteration 0 compiles
      t0 = time.perf_counter()
      got = roller.collect(state.params, jax.random.key(it), it, rewards)
      t1 = time.perf_counter()
      cat_ids = np.array([cats.index(pool.categories[i]) for i in got.pool_index], np.int32)
      adv, _ = gdpo_advantages({n: got.scores[n] for n in reward_fn.names},
                               sample_weights(cat_ids, table, reward_fn.names), groups,
                               rl.prompts_per_step)
      inputs = roller.policy_inputs(got.pool_index)
      old = None if not args.recompute_old else rl_rollout.recompute_old_log_probs(
          pipe.transformer, state.params, got.result, **inputs, cfg_mode=rl.cfg_mode,
          cfg_scale=rl.cfg_scale, noise_level=rl.noise_level, img_shapes=roller.img_shapes,
          rules=rules)
      # rollout_only: the objective's policy is conditional, so the batch carries no negative.
      batch = rl_rollout.rollout_batch(got.result, inputs["cond"], inputs["mask"],
                                       advantages=jnp.asarray(adv), old_log_probs=old)
      if step_flops is None:
        step_flops = flops_of(step, state, batch)
        x_T = jnp.zeros((roller.chunk, roller.seq_len, roller.channels), jnp.float32)
        fn = rl_rollout._jitted_rollout(pipe.transformer, roller.img_shapes, True, rules)
        # XLA's cost analysis counts a while loop's body once: scale by the N scanned steps.
        rollout_flops = rl.rollout_chunks * rl.num_steps * flops_of(
            fn, state.params, x_T, pool.cond[:roller.chunk], pool.mask[:roller.chunk],
            roller.neg_cond, roller.neg_mask, roller.sigmas, roller.train_steps(
                jax.random.key(0), 0), jax.random.key(0), jnp.float32(rl.cfg_scale),
            jnp.float32(rl.noise_level), None)
      t2 = time.perf_counter()
      state, m = step(state, batch)
      jax.block_until_ready((state, m))  # the params too: the next rollout needs them
      t3 = time.perf_counter()
      if it > 0:
        rows.append(dict(rollout=got.rollout_seconds, reward=got.reward_seconds,
                         reward_wait=got.reward_wait_seconds, collect=t1 - t0,
                         old_logp=t2 - t1, update=t3 - t2, total=t3 - t0))
  # Medians over the timed iterations (the first, compiling one is not among them).
  med = {k: float(np.median([r[k] for r in rows])) for k in rows[0]}
  peak = matmul_peak()
  b = roller.batch
  print(f"devices {jax.device_count()} ({jax.devices()[0].platform}); batch {b} = "
        f"{rl.prompts_per_step} prompts x G={rl.group_size}, {rl.num_steps} steps, "
        f"K={rl.timesteps.num_train}, cfg_mode={rl.cfg_mode}, transformer "
        f"{dict(c.model.transformer_overrides)}, old log-probs "
        f"{'recomputed' if args.recompute_old else 'from the step (on-policy)'}, malloc tuned "
        f"{qwen_image_rl.MALLOC_TUNED}")
  print(f"rollout: {b / med['rollout']:.1f} samples/s ({med['rollout']:.2f} s incl. decode), "
        f"{rollout_flops / med['rollout'] / 1e9:.1f} GFLOP/s")
  print(f"reward: {med['reward']:.2f} s on the worker thread, main thread waited "
        f"{med['reward_wait']:.2f} s")
  print(f"old log-probs: {med['old_logp']:.2f} s; train step: {med['update']:.2f} s, "
        f"{step_flops / med['update'] / 1e9:.1f} GFLOP/s")
  print(f"iteration: {med['total']:.2f} s = rollout {med['rollout'] / med['total']:.0%}, "
        f"reward wait {med['reward_wait'] / med['total']:.0%}, old log-probs "
        f"{med['old_logp'] / med['total']:.0%}, update {med['update'] / med['total']:.0%}")
  print(f"peak (2048^2 f32 matmul, same run): {peak / 1e9:.1f} GFLOP/s; rollout at "
        f"{rollout_flops / med['rollout'] / peak:.1%}, train step at "
        f"{step_flops / med['update'] / peak:.1%} of it")


if __name__ == "__main__":
  main()
