"""On-policy distillation iteration: the split into teacher swap, student rollout, teacher passes
and update, and achieved FLOP/s next to a large-matmul peak measured in the same run.

  python benchmarks/opd_step.py --init_from=runs/demo/base/export/pipeline \
      [--teacher_t2i=runs/demo/rl_t2i --teacher_edit=runs/demo/rl_edit] [--iterations=4]
  python benchmarks/opd_step.py   # no --init_from: a tiny random diffusers pipeline (needs torch)

Teachers default to the student's own pipeline (same cost). Iterations alternate T2I and edit, so
every timed iteration swaps the teacher (host -> device and the old device copy freed): the worst
case of the router. The steps are `qwen_image_rl/rl/opd_iteration.py`'s, as the trainer runs
them. FLOPs come from XLA's cost analysis of the compiled functions (a scan body is counted
once, so the rollout's is scaled by its N steps); times are medians over the timed iterations
(the first of each task compiles). The peak is a 2048x2048 float32 matmul timed after warm-up.
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

from benchmarks.grpo_step import flops_of, matmul_peak


def cost_flops(s, task, state, teacher, key, it):
  """FLOPs of one iteration's rollout, teacher passes and update, from XLA's cost analysis."""
  from qwen_image_rl.rl import opd
  from qwen_image_rl.rl.rollout import num_micro_batches

  d, dist = s.data[task], s.distiller
  inputs = dist.inputs(task, it)
  x_T = jnp.zeros((dist.config.opd.batch_size, d.seq_len, d.channels), jnp.float32)
  rollout = flops_of(
    opd.jitted_trajectory(dist.model, d.img_shapes),
    state.params,
    x_T,
    inputs["cond"],
    inputs["mask"],
    d.sigmas,
    inputs["ref_latents"],
  ) * (len(d.sigmas) - 1)
  states, _ = dist.rollout(state.params, task, key, inputs)
  batch = {k: v for k, v in dist.batch(task, it, states, inputs).items() if v is not None}
  n = num_micro_batches(batch["states"].shape[0], dist.micro)
  teacher_flops = n * flops_of(
    opd.jitted_teacher_velocities(dist.model, d.img_shapes, n), teacher, batch, jnp.float32(4.0)
  )
  train = {k: v for k, v in batch.items() if k not in ("neg_cond", "neg_mask")}
  train["teacher_v"] = jnp.zeros_like(batch["states"])
  return rollout, teacher_flops, flops_of(dist.steps[task], state, train)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--init_from", default="")
  parser.add_argument("--teacher_t2i", default="")
  parser.add_argument("--teacher_edit", default="")
  parser.add_argument("--iterations", type=int, default=4, help="timed, after one per task")
  parser.add_argument("--batch_size", type=int, default=16)
  parser.add_argument("--num_steps", type=int, default=10)
  parser.add_argument("--num_train_steps", type=int, default=0)
  parser.add_argument("--micro_batch_size", type=int, default=0)
  args = parser.parse_args()
  from configs import opd as opd_config
  from qwen_image_rl import host_memory, parallel
  from qwen_image_rl.rl import opd_iteration

  host_memory.tune_malloc()
  c = opd_config.get_config("tiny")
  c.opd.update(
    dict(batch_size=args.batch_size, num_steps=args.num_steps, num_train_steps=args.num_train_steps)
  )
  if args.micro_batch_size:
    c.opd.micro_batch_size = args.micro_batch_size
  c.data.num_prompts = 64
  if args.init_from:
    c.init_from = args.init_from
  else:
    from tests import tiny_reference

    _, c.init_from = tiny_reference.build_t2i(tempfile.mkdtemp())
    c.data.image_size = 32
  c.teachers.t2i = args.teacher_t2i or c.init_from
  c.teachers.edit = args.teacher_edit or c.init_from
  mesh = parallel.make_mesh(dict(c.mesh))
  rules = parallel.as_rules(c.logical_axis_rules)
  s = opd_iteration.setup(c, mesh, rules)
  dist, bank, state = s.distiller, s.bank, s.state
  rows, flops = {"t2i": [], "edit": []}, {}
  with parallel.sharding_context(mesh, rules):
    for it in range(args.iterations + 2):  # the first of each task compiles
      task = ("t2i", "edit")[it % 2]
      t0 = time.perf_counter()
      teacher = bank.activate(task)
      t1 = time.perf_counter()
      key = jax.random.key(it)
      inputs = dist.inputs(task, it)
      states, _ = jax.block_until_ready(dist.rollout(state.params, task, key, inputs))
      t2 = time.perf_counter()
      batch = dist.batch(task, it, states, inputs)
      teacher_v = jax.block_until_ready(dist.teacher(teacher, task, batch))
      t3 = time.perf_counter()
      if task not in flops:
        flops[task] = cost_flops(s, task, state, teacher, key, it)
      state, _ = dist.update(state, task, batch, teacher_v)
      jax.block_until_ready(state)
      t4 = time.perf_counter()
      if it >= 2:
        rows[task].append(
          dict(swap=t1 - t0, rollout=t2 - t1, teacher=t3 - t2, update=t4 - t3, total=t4 - t0)
        )
  peak = matmul_peak()
  o = c.opd
  print(
    f"devices {jax.device_count()} ({jax.devices()[0].platform}); batch {o.batch_size}, "
    f"N={o.num_steps} steps ({o.num_train_steps or o.num_steps} trained), teacher CFG "
    f"{o.teacher_cfg_scale:g}, micro-batch {o.get('micro_batch_size')}; load: "
    f"{os.getloadavg()[0]:.1f}"
  )
  for task, timed in rows.items():
    if not timed:
      continue
    med = {k: float(np.median([r[k] for r in timed])) for k in timed[0]}
    f_roll, f_teach, f_upd = flops[task]
    print(
      f"{task}: iteration {med['total']:.2f} s = swap {med['swap']:.3f} s "
      f"({med['swap'] / med['total']:.0%}), student rollout {med['rollout']:.2f} s "
      f"({med['rollout'] / med['total']:.0%}, {f_roll / med['rollout'] / 1e9:.1f} GFLOP/s), "
      f"teacher passes {med['teacher']:.2f} s ({med['teacher'] / med['total']:.0%}, "
      f"{f_teach / med['teacher'] / 1e9:.1f} GFLOP/s), update {med['update']:.2f} s "
      f"({med['update'] / med['total']:.0%}, {f_upd / med['update'] / 1e9:.1f} GFLOP/s)"
    )
    total = f_roll + f_teach + f_upd
    print(
      f"{task}: whole iteration {total / med['total'] / 1e9:.1f} GFLOP/s = "
      f"{total / med['total'] / peak:.1%} of the peak"
    )
  print(f"peak (2048^2 f32 matmul, same run): {peak / 1e9:.1f} GFLOP/s")


if __name__ == "__main__":
  main()
