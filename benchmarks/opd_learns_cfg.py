"""Does the OPD student learn CFG? The base pipeline as both teachers at CFG 4, the student (the
same base) trained with the opd iteration, and the student's CFG-free samples compared with the
teacher's CFG samples from the same held-out noise and prompts, before and after.

  python benchmarks/opd_learns_cfg.py --init_from=runs/demo/base/export/pipeline \
      [--iterations=60] [--eval_prompts=32]
  python benchmarks/opd_learns_cfg.py   # no --init_from: a tiny random diffusers pipeline

Printed per task: the relative velocity error ||v_student - v_teacher||^2 / ||v_teacher||^2 on
the student's own states (first and last iterations), and the relative latent distance of the
final samples ||x_student(CFG 1) - x_teacher(CFG 4)||^2 / ||x_teacher||^2 before and after
(the gap CFG makes, and how much of it the student closed).
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


def final_samples(dist, params, task, cfg_scale, it, bank_params=None):
  """Final latents of the held-out batch `it` (fixed noise): the student's ODE at CFG 1, or
  `bank_params`' guided ODE at cfg_scale."""
  from qwen_image_rl.pipelines import common as pipe_common

  d, inputs, key = dist.data[task], dist.inputs(task, it), jax.random.key(10_000 + it)
  if bank_params is None:
    return np.asarray(dist.rollout(params, task, key, inputs)[1])
  b = dist.config.opd.batch_size
  x_T = dist.put(jax.random.normal(key, (b, d.seq_len, d.channels), jnp.float32))  # the same
  fn = pipe_common.make_denoise(dist.model, d.img_shapes)
  neg = dist.put(np.repeat(d.neg_cond, b, 0)), dist.put(np.repeat(d.neg_mask, b, 0))
  return np.asarray(
    fn(
      bank_params,
      x_T,
      inputs["cond"],
      inputs["mask"],
      *neg,
      d.sigmas,
      jnp.float32(cfg_scale),
      inputs["ref_latents"],
    )
  )


def gap(dist, params, teacher, task, n_batches):
  """Mean relative squared distance of student CFG-1 and teacher CFG-4 final latents."""
  out = []
  for j in range(n_batches):
    it = 1_000_000 + j  # batches no training iteration draws
    s = final_samples(dist, params, task, 1.0, it)
    t = final_samples(dist, None, task, dist.config.opd.teacher_cfg_scale, it, teacher)
    out.append(np.sum((s - t) ** 2) / np.sum(t**2))
  return float(np.mean(out))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--init_from", default="")
  parser.add_argument("--iterations", type=int, default=60)
  parser.add_argument("--eval_batches", type=int, default=2)
  parser.add_argument("--lr", type=float, default=1e-4)
  args = parser.parse_args()
  from configs import opd as opd_config
  from qwen_image_rl import host_memory, parallel
  from qwen_image_rl.rl import opd_iteration

  host_memory.tune_malloc()
  c = opd_config.get_config("tiny")
  c.data.num_prompts = 128
  c.optim.lr = args.lr
  c.total_steps = args.iterations
  if args.init_from:
    c.init_from = args.init_from
  else:
    from tests import tiny_reference

    _, c.init_from = tiny_reference.build_t2i(tempfile.mkdtemp())
    c.data.image_size = 32
  c.teachers.t2i = c.teachers.edit = c.init_from
  mesh = parallel.make_mesh(dict(c.mesh))
  rules = parallel.as_rules(c.logical_axis_rules)
  s = opd_iteration.setup(c, mesh, rules)
  dist, bank, state = s.distiller, s.bank, s.state
  before = {}
  with parallel.sharding_context(mesh, rules):
    for task in s.data:
      before[task] = gap(dist, state.params, bank.activate(task), task, args.eval_batches)
    run = dist.make_iteration(jax.random.key(0))
    history = {t: [] for t in s.data}
    start = time.time()
    for it in range(args.iterations):
      state, scalars = run(state, it)
      task = "t2i" if scalars["opd/task_is_t2i"] else "edit"
      history[task].append(scalars[f"train/relative_error_{task}"])
    seconds = time.time() - start
    after = {t: gap(dist, state.params, bank.activate(t), t, args.eval_batches) for t in s.data}
  print(
    f"{args.iterations} iterations in {seconds:.0f} s (load {os.getloadavg()[0]:.1f}); "
    f"teacher = the base at CFG {c.opd.teacher_cfg_scale:g}, lr {args.lr:g}"
  )
  for task in s.data:
    h = history[task]
    print(
      f"{task}: velocity relative error {np.mean(h[:3]):.4f} (first 3) -> "
      f"{np.mean(h[-3:]):.4f} (last 3); sample gap student(CFG 1) vs teacher(CFG 4) "
      f"{before[task]:.4f} -> {after[task]:.4f}"
    )


if __name__ == "__main__":
  main()
