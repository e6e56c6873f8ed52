"""RL update time against the micro-batch size, per tiny RL config, in one process.

  python benchmarks/update_micro_batches.py [--configs=grpo_t2i,rl_t2i,grpo_edit,rl_edit]
      [--micro=none,16,8,4,2] [--rounds=5] [--init_from=runs/demo/base/export/pipeline]
      [--objective=awm]  # every config with this rl.objective

For each config (its `tiny` variant, which must be able to load `--init_from`: the demo base
does both tasks) this rolls out one batch, then times the objective's update step on it with
each `rl.micro_batch_size` ('none': the whole batch at once), interleaved over rounds, and
prints the median seconds, the speed-up over 'none' and the largest parameter difference from
the 'none' update (micro-batches average equal parts, so only rounding differs).

Why it matters on CPU: one 64-sample GRPO batch holds every activation of 192 transitions
(6 MB per [B*K, 64, 128] tensor, 25 MB in the MLP), far beyond the 1 MB L2 per core, so the
elementwise half of the step streams from memory. Micro-batches of a few samples keep a
micro-step's activations in cache; the scan adds a loop of small matmuls instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


def parse_micro(text: str) -> list[int | None]:
  sizes = []
  for item in text.split(","):
    item = item.strip().lower()
    sizes.append(None if item == "none" else int(item))
  return sizes


def largest_gap(a, b) -> float:
  """max |a - b| over two parameter trees."""
  leaves = zip(jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b)))
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in leaves)


def time_updates(config_name: str, sizes, rounds: int, init_from: str, objective: str):
  """({size: (median seconds, max |params - params of the first size's update|)}, the largest
  parameter change of that update) for one tiny config."""
  from qwen_image_rl import host_memory, optim, parallel
  from qwen_image_rl.rl import iteration
  from qwen_image_rl.rl.policy import init_policy_state

  host_memory.tune_malloc()
  c = importlib.import_module(f"configs.{config_name}").get_config("tiny")
  if init_from:
    c.init_from = init_from
  if objective:
    c.rl.objective = objective
  c.rl.async_rewards = False
  c.data.num_prompts = 256
  mesh = parallel.make_mesh(dict(c.mesh))
  s = iteration.setup(c, mesh, parallel.as_rules(c.logical_axis_rules))
  tx = optim.make_optimizer(c.optim, 100)
  state0, shardings = init_policy_state(s.model, s.pipe.transformer_params, tx, mesh, s.rules, 0)
  with iteration.make_reward_pipeline(c, s.reward_fn) as pipeline:
    got = iteration.roll_out(s, state0.params, jax.random.key(0), 0, pipeline)
  adv, _ = iteration.advantages(s, got)
  steps, results = {}, {}
  for size in sizes:
    s.rl.micro_batch_size = size
    steps[size] = iteration.make_update_step(s, tx, shardings)
    state = jax.tree.map(jnp.copy, state0)  # the step donates its state
    new, _ = iteration.update(s, steps[size], state, got, adv)  # compiles
    results[size] = jax.device_get(new.params)
  times = {size: [] for size in sizes}
  for _ in range(rounds):
    for size in sizes:
      state = jax.tree.map(jnp.copy, state0)
      jax.block_until_ready(state)
      t0 = time.perf_counter()
      new, _ = iteration.update(s, steps[size], state, got, adv)
      jax.block_until_ready(new)
      times[size].append(time.perf_counter() - t0)
  base = results[sizes[0]]
  rows = {size: (float(np.median(times[size])), largest_gap(base, results[size])) for size in sizes}
  return rows, largest_gap(state0.params, base)  # state0 is never donated: copies are


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--configs", default="grpo_t2i,rl_t2i,grpo_edit,rl_edit")
  parser.add_argument("--micro", default="none,16,8,4,2")
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--init_from", default="", help="default: each config's init_from")
  parser.add_argument("--objective", default="", help="rl.objective for every config (e.g. awm)")
  args = parser.parse_args()
  sizes = parse_micro(args.micro)
  print(
    f"jax {jax.__version__} ({jax.default_backend()}), {os.cpu_count()} CPUs; medians of "
    f"{args.rounds} rounds; speed-up and parameter difference against micro={sizes[0]}; "
    f"rl.objective {args.objective or 'of each config'}"
  )
  for name in args.configs.split(","):
    rows, moved = time_updates(name.strip(), sizes, args.rounds, args.init_from, args.objective)
    first = rows[sizes[0]][0]
    for size, (seconds, diff) in rows.items():
      print(
        f"{name:10s} micro {size!s:>4s}: update {seconds:.3f} s, x{first / seconds:.2f}, "
        f"max |param diff| {diff:.1e} (the update moves params by up to {moved:.1e})",
        flush=True,
      )


if __name__ == "__main__":
  main()
