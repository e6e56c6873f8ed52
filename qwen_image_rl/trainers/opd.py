"""`opd` trainer: on-policy distillation of the T2I and edit teachers into one CFG-free student
(paper sec. 7).

  python -m qwen_image_rl.main --config=configs/opd.py:tiny --workdir=runs/demo/opd \
      --config.init_from=runs/demo/base/export/pipeline \
      --config.teachers.t2i=runs/demo/rl_t2i --config.teachers.edit=runs/demo/rl_edit

One iteration (a "step" of config.total_steps), every draw a pure function of (seed, iteration),
is `rl/opd_iteration.py`'s named steps:
  1. route: the batch's task, 't2i' with probability opd.t2i_fraction, else 'edit';
     that task's teacher becomes the device-resident one (rl/teachers.py);
  2. student rollout: opd.batch_size prompts of the task, the student's conditional Euler ODE
     over opd.num_steps steps, every state recorded (stop-gradient);
  3. teacher: its true-CFG velocity (opd.teacher_cfg_scale, the negative prompt
     opd.negative_prompt) at the trained states (all N, or opd.num_train_steps of them);
  4. update: one optimiser step on the mean ||v_student - v_teacher||^2 (rl/opd.py).
A non-finite loss skips the update; opd.max_consecutive_nonfinite in a row stop the run.
Held-out evaluation samples the student at opd.student_cfg_scale (1: no CFG).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from qwen_image_rl import evaluation, parallel
from qwen_image_rl.config_lib import ConfigError
from qwen_image_rl.pipelines.edit import QwenImageEditPipeline
from qwen_image_rl.pipelines.qwen_image import QwenImagePipeline
from qwen_image_rl.rl import opd_iteration
from qwen_image_rl.rl.policy import DTYPES, with_params
from qwen_image_rl.trainers import common

REQUIRED = {
  "total_steps": int,
  "seed": int,
  "init_from": str,
  "model.dtype": str,
  "data.image_size": int,
  "data.max_text_tokens": int,
  "data.num_prompts": int,
  "data.prompt_file": str,
  "teachers.t2i": str,
  "teachers.edit": str,
  "opd.t2i_fraction": float,
  "opd.route_block": int,
  "opd.batch_size": int,
  "opd.num_steps": int,
  "opd.num_train_steps": int,
  "opd.teacher_cfg_scale": float,
  "opd.student_cfg_scale": float,
  "opd.negative_prompt": str,
  "opd.max_consecutive_nonfinite": int,
}


def validate(config) -> None:
  o = config.opd
  if not 0.0 <= o.t2i_fraction <= 1.0:
    raise ConfigError(f"config.opd.t2i_fraction={o.t2i_fraction} must lie in [0, 1]")
  for name in ("batch_size", "num_steps", "route_block", "max_consecutive_nonfinite"):
    if o[name] < 1:
      raise ConfigError(f"config.opd.{name}={o[name]} must be >= 1")
  if not 0 <= o.num_train_steps <= o.num_steps:
    raise ConfigError(
      f"config.opd.num_train_steps={o.num_train_steps} must lie in [0, "
      f"opd.num_steps={o.num_steps}] (0: all steps)"
    )
  if o.teacher_cfg_scale < 1.0:
    raise ConfigError(f"config.opd.teacher_cfg_scale={o.teacher_cfg_scale} must be >= 1")
  mb = o.get("micro_batch_size")
  if mb is not None and (mb < 1 or o.batch_size % mb):
    raise ConfigError(f"config.opd.micro_batch_size={mb} must divide opd.batch_size={o.batch_size}")
  if config.model.dtype not in DTYPES:
    raise ConfigError(f"config.model.dtype={config.model.dtype!r}: one of {sorted(DTYPES)}")


def make_evaluator(config, pipe, logger):
  """Held-out evaluation of the student on both tasks at opd.student_cfg_scale."""
  cfg = config.eval.copy_and_resolve_references()
  cfg.cfg_scale = config.opd.student_cfg_scale

  def run(step: int, params):
    params = parallel.to_host(params)  # every process: a collective where params span hosts
    results = evaluation.evaluate(
      with_params(pipe, params, QwenImagePipeline),
      with_params(pipe, params, QwenImageEditPipeline),
      cfg,
      step=step,
      seed=config.seed,
      logger=logger,
    )
    print(
      f"eval at iteration {step} (student CFG {cfg.cfg_scale:g}):\n"
      f"{evaluation.format_table(results)}",
      flush=True,
    )
    return results

  return run


def train(config, workdir):
  """On-policy distillation: a CFG-free student from the T2I and edit teachers (paper sec. 7)."""
  mesh = parallel.make_mesh(dict(config.mesh))
  rules = parallel.as_rules(config.logical_axis_rules)
  s = opd_iteration.setup(config, mesh, rules)  # fails on a bad teacher before building
  ctx = common.make_context(config, workdir, mesh)
  pipe, bank, distiller = s.pipe, s.bank, s.distiller
  state, start = common.restore_or_keep(ctx, s.state, s.shardings)
  o = config.opd
  print(
    f"opd: tasks {list(s.data)} (t2i fraction {o.t2i_fraction:g}), batch {o.batch_size}, "
    f"{o.num_steps} steps ({o.num_train_steps or o.num_steps} trained), teacher CFG "
    f"{o.teacher_cfg_scale:g}, teachers {bank.directories}; starting at iteration "
    f"{start}/{config.total_steps}",
    flush=True,
  )
  evaluate = make_evaluator(config, pipe, ctx.logger)
  results = [None]
  # The rollout, teacher and update calls enter `parallel.sharding_context` themselves; the
  # evaluation and export run outside it (flax unboxing under a mesh would constrain).
  if config.eval.at_start and start == 0 and evaluation.enabled(config.eval):
    results[0] = evaluate(0, state.params)
  base_key = jax.random.wrap_key_data(jnp.asarray(np.asarray(state.rng)))

  def on_step_end(done, state, scalars):
    if done % max(int(config.log.every), 1) == 0 or done == config.total_steps:
      task = "t2i" if scalars["opd/task_is_t2i"] else "edit"
      print(
        f"iteration {done} [{task}]: loss {scalars['loss']:.4g} (relative "
        f"{scalars[f'train/relative_error_{task}']:.3f}); "
        f"{scalars['perf/iteration_seconds']:.2f}s (swap "
        f"{scalars['perf/swap_seconds']:.2f}, rollout {scalars['perf/rollout_seconds']:.2f}"
        f", teacher {scalars['perf/teacher_seconds']:.2f}, update "
        f"{scalars['perf/update_seconds']:.2f})",
        flush=True,
      )
    if (
      config.eval.every
      and done % config.eval.every == 0
      and done < config.total_steps
      and evaluation.enabled(config.eval)
    ):
      results[0] = evaluate(done, state.params)

  state, _ = common.fit(
    ctx,
    state,
    train_step=distiller.make_iteration(base_key),
    batch_for_step=lambda it: it,
    start_step=start,
    total_steps=config.total_steps,
    max_consecutive_nonfinite=o.max_consecutive_nonfinite,
    on_step_end=on_step_end,
    unit="iteration",
  )
  bank.release()
  params = parallel.to_host(state.params)
  if evaluation.enabled(config.eval):
    results[0] = evaluate(config.total_steps, params)
  if parallel.is_primary():
    common.save_export(
      with_params(pipe, params, QwenImagePipeline).save_pretrained,
      os.path.join(workdir, "export", "pipeline"),
    )
  ctx.close()
  return results[0]
