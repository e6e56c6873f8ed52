"""`opd` trainer: on-policy distillation of the T2I and edit teachers into one CFG-free student
(paper sec. 7).

  python -m qwen_image_rl.main --config=configs/opd.py:tiny --workdir=runs/demo/opd \
      --config.init_from=runs/demo/base/export/pipeline \
      --config.teachers.t2i=runs/demo/rl_t2i --config.teachers.edit=runs/demo/rl_edit

One iteration (a "step" of config.total_steps), every draw a pure function of (seed, iteration):
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
import time

import jax
import jax.numpy as jnp
import numpy as np

from qwen_image_rl import evaluation, optim, parallel
from qwen_image_rl.config_lib import ConfigError, transformer_overrides
from qwen_image_rl.data import examples
from qwen_image_rl.pipelines import common as pipe_common
from qwen_image_rl.pipelines.edit import QwenImageEditPipeline
from qwen_image_rl.pipelines.qwen_image import QwenImagePipeline
from qwen_image_rl.rl import opd, teachers
from qwen_image_rl.rl.policy import (
    DTYPES, init_policy_state, load_base, resolve_pipeline_dir, with_params)
from qwen_image_rl.rl.prompts import edit_pool, encode_with, t2i_pool
from qwen_image_rl.trainers import common

REQUIRED = {
    "total_steps": int, "seed": int, "init_from": str, "model.dtype": str,
    "data.image_size": int, "data.max_text_tokens": int, "data.num_prompts": int,
    "data.prompt_file": str, "teachers.t2i": str, "teachers.edit": str,
    "opd.t2i_fraction": float, "opd.batch_size": int, "opd.num_steps": int,
    "opd.num_train_steps": int, "opd.teacher_cfg_scale": float, "opd.student_cfg_scale": float,
    "opd.negative_prompt": str, "opd.max_consecutive_nonfinite": int}


def validate(config) -> None:
  o = config.opd
  if not 0.0 <= o.t2i_fraction <= 1.0:
    raise ConfigError(f"config.opd.t2i_fraction={o.t2i_fraction} must lie in [0, 1]")
  for name in ("batch_size", "num_steps", "max_consecutive_nonfinite"):
    if o[name] < 1:
      raise ConfigError(f"config.opd.{name}={o[name]} must be >= 1")
  if not 0 <= o.num_train_steps <= o.num_steps:
    raise ConfigError(f"config.opd.num_train_steps={o.num_train_steps} must lie in [0, "
                      f"opd.num_steps={o.num_steps}] (0: all steps)")
  if o.teacher_cfg_scale < 1.0:
    raise ConfigError(f"config.opd.teacher_cfg_scale={o.teacher_cfg_scale} must be >= 1")
  mb = o.get("micro_batch_size")
  if mb is not None and (mb < 1 or o.batch_size % mb):
    raise ConfigError(f"config.opd.micro_batch_size={mb} must divide opd.batch_size="
                      f"{o.batch_size}")
  if config.model.dtype not in DTYPES:
    raise ConfigError(f"config.model.dtype={config.model.dtype!r}: one of {sorted(DTYPES)}")


def active_tasks(config) -> tuple[str, ...]:
  """The tasks the router can pick (a teacher is needed for each)."""
  f = config.opd.t2i_fraction
  return tuple(t for t, share in (("t2i", f), ("edit", 1.0 - f)) if share > 0)


class TaskData:
  """One task's prompt pool, negative prompt, image layout and schedule."""

  def __init__(self, config, pipe, task: str):
    self.task = task
    self.pool = t2i_pool(config, pipe) if task == "t2i" else edit_pool(config, pipe)
    if not len(self.pool):
      raise ConfigError(f"the {task} prompt set is empty")
    cls = QwenImagePipeline if task == "t2i" else QwenImageEditPipeline
    self.neg_cond, self.neg_mask = encode_with(with_params(pipe, None, cls),
                                               [config.opd.negative_prompt],
                                               config.data.max_text_tokens)
    size = config.data.image_size
    h, w = pipe_common.latent_size(size, size, pipe.vae_scale_factor)
    shape = pipe_common.img_shape(h, w)
    self.img_shapes = (shape, shape) if task == "edit" else (shape,)
    self.seq_len = shape[1] * shape[2]
    self.channels = 4 * pipe.latent_channels
    self.sigmas = np.asarray(pipe.schedule.sigmas(config.opd.num_steps, self.seq_len),
                             np.float32)


class Distiller:
  """The iteration's steps as methods (the benchmark times them one by one)."""

  def __init__(self, config, model, data: dict, bank, tx, shardings, mesh, rules):
    self.config, self.model, self.data, self.bank = config, model, data, bank
    self.mesh, self.rules = mesh, rules
    o = config.opd
    self.micro = o.get("micro_batch_size")
    self.steps = {task: jax.jit(
        opd.make_opd_train_step(model, tx, rules, img_shapes=d.img_shapes,
                                micro_batch_size=self.micro),
        donate_argnums=(0,), out_shardings=(shardings, None)) for task, d in data.items()}

  def put(self, x):
    return None if x is None else jax.device_put(
        x, parallel.batch_sharding(self.mesh, np.shape(x), self.rules))

  def task(self, it: int) -> str:
    return opd.route_task(self.config.seed, it, self.config.opd.t2i_fraction)

  def inputs(self, task: str, it: int) -> dict:
    """The batch's conditioning (batch-sharded)."""
    d, b = self.data[task], self.config.opd.batch_size
    index = examples.batch_indices(self.config.seed, it, len(d.pool), b, stream=7)
    return dict(cond=self.put(d.pool.cond[index]), mask=self.put(d.pool.mask[index]),
                ref_latents=None if d.pool.ref_latents is None
                else self.put(d.pool.ref_latents[index]))

  def rollout(self, params, task: str, key, inputs):
    """States [B, N, S, C] of the student's CFG-free ODE, and its final latents."""
    d = self.data[task]
    x_T = jax.random.normal(key, (self.config.opd.batch_size, d.seq_len, d.channels),
                            jnp.float32)
    return opd.student_trajectory(self.model, params, self.put(x_T), inputs["cond"],
                                  inputs["mask"], d.sigmas, img_shapes=d.img_shapes,
                                  ref_latents=inputs["ref_latents"], mesh=self.mesh,
                                  rules=self.rules)

  def batch(self, task: str, it: int, states, inputs) -> dict:
    d, o = self.data[task], self.config.opd
    idx = opd.select_steps(self.config.seed, it, o.num_steps, o.num_train_steps)
    b = o.batch_size
    return dict(inputs, states=states[:, idx], sigmas=jnp.asarray(d.sigmas[idx]),
                neg_cond=self.put(np.repeat(d.neg_cond, b, 0)),
                neg_mask=self.put(np.repeat(d.neg_mask, b, 0)))

  def teacher(self, teacher_params, task: str, batch):
    return opd.teacher_velocities(
        self.model, teacher_params, batch, cfg_scale=self.config.opd.teacher_cfg_scale,
        img_shapes=self.data[task].img_shapes, micro_batch_size=self.micro, mesh=self.mesh,
        rules=self.rules)

  def update(self, state, task: str, batch, teacher_v):
    train = {k: v for k, v in batch.items() if k not in ("neg_cond", "neg_mask")}
    with parallel.sharding_context(self.mesh, self.rules):
      return self.steps[task](state, dict(train, teacher_v=teacher_v))

  def make_iteration(self, base_key):
    """train_step(state, it) for `common.fit`."""

    def run(state, it):
      t0 = time.perf_counter()
      task = self.task(it)
      swaps = self.bank.swaps
      teacher_params = self.bank.activate(task)
      swapped = self.bank.last_swap_seconds if self.bank.swaps > swaps else 0.0
      t1 = time.perf_counter()
      inputs = self.inputs(task, it)
      states, _ = jax.block_until_ready(
          self.rollout(state.params, task, jax.random.fold_in(base_key, it), inputs))
      t2 = time.perf_counter()
      batch = self.batch(task, it, states, inputs)
      teacher_v = jax.block_until_ready(self.teacher(teacher_params, task, batch))
      t3 = time.perf_counter()
      state, m = self.update(state, task, batch, teacher_v)
      m = common.scalar_metrics(m)
      t4 = time.perf_counter()
      scalars = {"loss": m["loss"], "train/grad_norm": m["grad_norm"],
                 f"train/loss_{task}": m["loss"],
                 f"train/relative_error_{task}": m["relative_error"],
                 "opd/task_is_t2i": float(task == "t2i"), "perf/swap_seconds": swapped,
                 "perf/rollout_seconds": t2 - t1, "perf/teacher_seconds": t3 - t2,
                 "perf/update_seconds": t4 - t3, "perf/iteration_seconds": t4 - t0}
      return state, scalars

    return run


def make_evaluator(config, pipe, logger):
  """Held-out evaluation of the student on both tasks at opd.student_cfg_scale."""
  cfg = config.eval.copy_and_resolve_references()
  cfg.cfg_scale = config.opd.student_cfg_scale

  def run(step: int, params):
    params = jax.device_get(params)
    results = evaluation.evaluate(with_params(pipe, params, QwenImagePipeline),
                                  with_params(pipe, params, QwenImageEditPipeline), cfg,
                                  step=step, seed=config.seed, logger=logger)
    print(f"eval at iteration {step} (student CFG {cfg.cfg_scale:g}):\n"
          f"{evaluation.format_table(results)}", flush=True)
    return results

  return run


def train(config, workdir):
  """On-policy distillation: a CFG-free student from the T2I and edit teachers (paper sec. 7)."""
  tasks = active_tasks(config)
  dirs = teachers.check_teachers({t: config.teachers[t] for t in tasks},
                                 resolve_pipeline_dir(config.init_from))
  mesh = parallel.make_mesh(dict(config.mesh))
  rules = parallel.as_rules(config.logical_axis_rules)
  ctx = common.make_context(config, workdir, mesh)
  pipe = load_base(config)
  data = {t: TaskData(config, pipe, t) for t in tasks}
  tx = optim.make_optimizer(config.optim, config.total_steps)
  state, shardings = init_policy_state(pipe.transformer, pipe.transformer_params, tx, mesh,
                                       rules, config.seed)
  pipe.transformer_params = None  # the student lives in `state` now
  bank = teachers.TeacherBank.load(dirs, shardings.params, DTYPES[config.model.dtype],
                                   transformer_overrides(config))
  state, start = common.restore_or_keep(ctx, state, shardings)
  o = config.opd
  print(f"opd: tasks {list(tasks)} (t2i fraction {o.t2i_fraction:g}), batch {o.batch_size}, "
        f"{o.num_steps} steps ({o.num_train_steps or o.num_steps} trained), teacher CFG "
        f"{o.teacher_cfg_scale:g}, teachers {dirs}; starting at iteration "
        f"{start}/{config.total_steps}", flush=True)
  evaluate = make_evaluator(config, pipe, ctx.logger)
  distiller = Distiller(config, pipe.transformer, data, bank, tx, shardings, mesh, rules)
  results = [None]
  with parallel.sharding_context(mesh, rules):
    if config.eval.at_start and start == 0 and evaluation.enabled(config.eval):
      results[0] = evaluate(0, state.params)
    base_key = jax.random.wrap_key_data(jnp.asarray(np.asarray(state.rng)))

    def on_step_end(done, state, scalars):
      if done % max(int(config.log.every), 1) == 0 or done == config.total_steps:
        task = "t2i" if scalars["opd/task_is_t2i"] else "edit"
        print(f"iteration {done} [{task}]: loss {scalars['loss']:.4g} (relative "
              f"{scalars[f'train/relative_error_{task}']:.3f}); "
              f"{scalars['perf/iteration_seconds']:.2f}s (swap "
              f"{scalars['perf/swap_seconds']:.2f}, rollout {scalars['perf/rollout_seconds']:.2f}"
              f", teacher {scalars['perf/teacher_seconds']:.2f}, update "
              f"{scalars['perf/update_seconds']:.2f})", flush=True)
      if config.eval.every and done % config.eval.every == 0 and done < config.total_steps \
          and evaluation.enabled(config.eval):
        results[0] = evaluate(done, state.params)

    state, _ = common.fit(ctx, state, train_step=distiller.make_iteration(base_key),
                          batch_for_step=lambda it: it, start_step=start,
                          total_steps=config.total_steps,
                          max_consecutive_nonfinite=o.max_consecutive_nonfinite,
                          on_step_end=on_step_end, unit="iteration")
    bank.release()
    params = jax.device_get(state.params)
    if jax.process_index() == 0:
      with_params(pipe, params, QwenImagePipeline).save_pretrained(
          os.path.join(workdir, "export", "pipeline"))
    if evaluation.enabled(config.eval):
      results[0] = evaluate(config.total_steps, params)
  ctx.close()
  return results[0]
