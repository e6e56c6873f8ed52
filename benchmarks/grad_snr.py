"""How much signal one batch's gradient carries, per RL objective, with a 95% CI.

  python benchmarks/grad_snr.py --init_from=runs/demo/base/export/pipeline \
      [--task=t2i|edit] [--objective=grpo,nft,awm] [--batches=30] [--rollout=sde|ode] \
      [--advantage_std=group,batch] [--set rl.noise_level=1.2 ...]

At fixed (base) parameters, each of `--batches` iterations draws its own prompts and rollouts;
every objective's gradient g_i is computed on the same rollouts and advantages (no update), by
the functions the trainer runs (`rl/iteration.py`: roll_out, advantages, make_grad_fn and the
objective's make_batch). With g_i = s + n_i (signal plus independent noise of one batch of B
rollouts):

  |g|^2    = mean_i |g_i|^2                   (signal + noise)
  s^2      = mean_{i != j} g_i . g_j          (unbiased |signal|^2)
  B_noise  = B (|g|^2 - s^2) / s^2            the batch size at which signal equals noise
  signal   = s^2 / |g|^2                      the fraction of one batch's gradient that is signal

with a leave-one-batch-out jackknife 95% interval (estimate +- 1.96 jackknife std). A smaller
B_noise is a cleaner estimator: B_noise / B batches make one clean gradient step.

--rollout=sde (default) rolls out the GRPO sampler (ODE with SDE steps on the trained
timesteps), which every objective can score: GRPO on its transitions, the forward-process
objectives on the final latents. --rollout=ode rolls out the plain ODE with independent x_T
(the forward objectives' own training rollouts); GRPO has no transitions there and is skipped.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np

Z95 = 1.959964


def parse_value(text: str):
  for cast in (int, float):
    try:
      return cast(text)
    except ValueError:
      pass
  return {"true": True, "false": False}.get(text.lower(), text)


def noise_scale_stats(gram: np.ndarray, batch_size: int) -> dict[str, float]:
  """|g|^2, s^2, signal fraction and B_noise from the Gram matrix [n, n] of batch gradients."""
  n = gram.shape[0]
  g2 = float(np.trace(gram)) / n
  s2 = float(gram.sum() - np.trace(gram)) / (n * (n - 1))
  b_noise = batch_size * (g2 - s2) / s2 if s2 > 0 else float("inf")
  return dict(g2=g2, s2=s2, signal=s2 / g2 if g2 > 0 else float("nan"), b_noise=b_noise)


def jackknife(gram: np.ndarray, batch_size: int) -> dict[str, tuple[float, float, float]]:
  """{stat: (estimate, ci_low, ci_high)}: leave-one-batch-out jackknife 95% intervals."""
  n = gram.shape[0]
  full = noise_scale_stats(gram, batch_size)
  keep = [np.delete(np.delete(gram, i, 0), i, 1) for i in range(n)]
  loo = [noise_scale_stats(g, batch_size) for g in keep]
  out = {}
  for name, value in full.items():
    vals = np.array([d[name] for d in loo], np.float64)
    if not np.all(np.isfinite(vals)):
      out[name] = (value, float("nan"), float("nan"))
      continue
    std = float(np.sqrt((n - 1) / n * np.sum((vals - vals.mean()) ** 2)))
    out[name] = (value, value - Z95 * std, value + Z95 * std)
  return out


def build_config(args):
  from configs import grpo_edit, grpo_t2i

  c = (grpo_t2i if args.task == "t2i" else grpo_edit).get_config("tiny")
  c.init_from = args.init_from
  c.data.num_prompts = 1024
  if args.rollout == "ode":
    c.rl.objective = "nft"  # any forward objective: the roller then rolls out the plain ODE
    c.rl.shared_initial_noise = False
  c.update_from_flattened_dict({k: parse_value(v) for k, v in (s.split("=", 1) for s in args.set)})
  return c


def collect_gradients(s, objective_names, stds, batches, iteration):
  """{(objective, std): [flat float32 gradients]} and the median seconds of a rollout."""
  from qwen_image_rl.rl import objectives

  params = s.pipe.transformer_params
  grad_fns = {name: iteration.make_grad_fn(s, name) for name in objective_names}
  grads, seconds = {}, []
  with iteration.make_reward_pipeline(s.config, s.reward_fn) as reward_pipeline:
    for it in range(batches):
      t0 = time.perf_counter()
      key = jax.random.key(1000 + it)
      got = iteration.roll_out(s, params, key, 1000 + it, reward_pipeline)
      seconds.append(time.perf_counter() - t0)
      inputs = s.roller.policy_inputs(got.pool_index)
      for std in stds:
        s.config.rl.advantage_std = std
        adv, _ = iteration.advantages(s, got)
        for name in objective_names:
          batch = objectives.get(name).make_batch(s, params, got.result, inputs, jnp.asarray(adv))
          g, _ = grad_fns[name](params, batch, jax.random.fold_in(key, 7))
          flat = jnp.concatenate([x.ravel() for x in jax.tree.leaves(g)])
          grads.setdefault((name, std), []).append(np.asarray(flat, np.float32))
      print(
        f"batch {it + 1}/{batches}: composite reward "
        f"{float(iteration.composite_reward(s, got).mean()):.3f}",
        flush=True,
      )
  return grads, float(np.median(seconds))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--init_from", required=True)
  parser.add_argument("--task", default="t2i", choices=("t2i", "edit"))
  parser.add_argument(
    "--objective", default="grpo,nft,awm", help="comma-separated registered objectives"
  )
  parser.add_argument("--batches", type=int, default=30)
  parser.add_argument("--rollout", default="sde", choices=("sde", "ode"))
  parser.add_argument("--advantage_std", default="batch", help="comma-separated: group,batch")
  parser.add_argument(
    "--set", action="append", default=[], help="config override key=value, e.g. rl.noise_level=1.2"
  )
  args = parser.parse_args()
  if args.batches < 3:
    parser.error("--batches must be >= 3 for a jackknife interval (30 or more to rank settings)")

  from qwen_image_rl import host_memory, parallel
  from qwen_image_rl.rl import iteration, objectives

  host_memory.tune_malloc()
  c = build_config(args)
  names = [n for n in args.objective.split(",") if n]
  for n in names:
    objectives.get(n)  # KeyError naming the known objectives
  if args.rollout == "ode" and "grpo" in names:
    print("--rollout=ode records no SDE transitions: skipping grpo")
    names.remove("grpo")
  stds = [x for x in args.advantage_std.split(",") if x]
  mesh = parallel.make_mesh(dict(c.mesh))
  s = iteration.setup(c, mesh, parallel.as_rules(c.logical_axis_rules))
  grads, sec = collect_gradients(s, names, stds, args.batches, iteration)
  rl = c.rl
  print(
    f"\nsettings: {' '.join(args.set) or '(defaults)'}; task {args.task}, rollout "
    f"{args.rollout}, batch B = {s.batch_size} = {rl.prompts_per_step} x G={rl.group_size}, "
    f"{rl.num_steps} steps, K={rl.timesteps.num_train}, noise {rl.noise_level}, fm_draws "
    f"{rl.fm_draws}; {args.batches} batches, {sec:.1f} s per rollout batch (median)\n"
  )
  print("| objective | advantage std | signal fraction [95% CI] | B_noise [95% CI] |")
  print("|---|---|---|---|")
  for (name, std), vs in grads.items():
    v = np.stack(vs).astype(np.float64)
    stats = jackknife(v @ v.T, s.batch_size)
    sig, bn = stats["signal"], stats["b_noise"]
    print(
      f"| {name} | {std} | {sig[0]:.4f} [{sig[1]:.4f}, {sig[2]:.4f}] | "
      f"{bn[0]:.0f} [{bn[1]:.0f}, {bn[2]:.0f}] |"
    )


if __name__ == "__main__":
  main()
