"""One on-policy distillation iteration, as named steps (the trainer and the benchmark share them).

s = opd_iteration.setup(config, mesh, rules)  # student, tasks' prompts, teachers in host memory
task = s.distiller.task(it)                   # routing, a pure function of (seed, it)
teacher = s.bank.activate(task)               # swap the task's teacher onto the device
inputs = s.distiller.inputs(task, it)
states, _ = s.distiller.rollout(params, task, key, inputs)     # student ODE, every state
batch = s.distiller.batch(task, it, states, inputs)            # the trained states
teacher_v = s.distiller.teacher(teacher, task, batch)          # CFG velocities
state, metrics = s.distiller.update(state, task, batch, teacher_v)
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qwen_image_rl import optim, parallel
from qwen_image_rl.config_lib import ConfigError, transformer_overrides
from qwen_image_rl.data import examples
from qwen_image_rl.pipelines import common as pipe_common
from qwen_image_rl.pipelines.edit import QwenImageEditPipeline
from qwen_image_rl.pipelines.qwen_image import QwenImagePipeline
from qwen_image_rl.rl import opd, routing, teachers
from qwen_image_rl.rl.policy import (
  DTYPES,
  init_policy_state,
  load_base,
  resolve_pipeline_dir,
  with_params,
)
from qwen_image_rl.rl.prompts import conditioning, edit_pool, t2i_pool
from qwen_image_rl.trainers import common


def active_tasks(config) -> tuple[str, ...]:
  """The tasks the router can pick (a teacher is needed for each)."""
  f = config.opd.t2i_fraction
  return tuple(t for t, share in (("t2i", f), ("edit", 1.0 - f)) if share > 0)


class TaskData:
  """One task's prompt pool, negative prompt, image layout and schedule."""

  def __init__(self, config, pipe, task: str):
    self.task = task
    # data.prompt_file is the T2I prompt set here; edits come from the tiny world.
    self.pool = t2i_pool(config, pipe) if task == "t2i" else edit_pool(config, pipe, "")
    if not len(self.pool):
      raise ConfigError(f"the {task} prompt set is empty")
    cls = QwenImagePipeline if task == "t2i" else QwenImageEditPipeline
    self.neg_cond, self.neg_mask = conditioning(
      config,
      with_params(pipe, None, cls),
      [config.opd.negative_prompt],
      config.data.max_text_tokens,
    )
    size = config.data.image_size
    h, w = pipe_common.latent_size(size, size, pipe.vae_scale_factor)
    shape = pipe_common.img_shape(h, w)
    self.img_shapes = (shape, shape) if task == "edit" else (shape,)
    self.seq_len = shape[1] * shape[2]
    self.channels = 4 * pipe.latent_channels
    self.sigmas = np.asarray(pipe.schedule.sigmas(config.opd.num_steps, self.seq_len), np.float32)


class Distiller:
  """The iteration's steps as methods (the benchmark times them one by one)."""

  def __init__(self, config, model, data: dict, bank, tx, shardings, mesh, rules):
    self.config, self.model, self.data, self.bank = config, model, data, bank
    self.mesh, self.rules = mesh, rules
    o = config.opd
    self.micro = o.get("micro_batch_size")
    self.steps = {
      task: jax.jit(
        opd.make_opd_train_step(
          model, tx, rules, img_shapes=d.img_shapes, micro_batch_size=self.micro
        ),
        donate_argnums=(0,),
        out_shardings=(shardings, None),
      )
      for task, d in data.items()
    }

  def put(self, x):
    return (
      None
      if x is None
      else parallel.host_to_global(x, parallel.batch_sharding(self.mesh, np.shape(x), self.rules))
    )

  def task(self, it: int) -> str:
    o = self.config.opd
    return routing.route_task(self.config.seed, it, o.t2i_fraction, o.route_block)

  def inputs(self, task: str, it: int) -> dict:
    """The batch's conditioning (batch-sharded)."""
    d, b = self.data[task], self.config.opd.batch_size
    index = examples.batch_indices(self.config.seed, it, len(d.pool), b, stream=7)
    return dict(
      cond=self.put(d.pool.cond[index]),
      mask=self.put(d.pool.mask[index]),
      ref_latents=None if d.pool.ref_latents is None else self.put(d.pool.ref_latents[index]),
    )

  def rollout(self, params, task: str, key, inputs):
    """States [B, N, S, C] of the student's CFG-free ODE, and its final latents."""
    d = self.data[task]
    x_T = jax.random.normal(key, (self.config.opd.batch_size, d.seq_len, d.channels), jnp.float32)
    return opd.student_trajectory(
      self.model,
      params,
      self.put(x_T),
      inputs["cond"],
      inputs["mask"],
      d.sigmas,
      img_shapes=d.img_shapes,
      ref_latents=inputs["ref_latents"],
      mesh=self.mesh,
      rules=self.rules,
    )

  def batch(self, task: str, it: int, states, inputs) -> dict:
    d, o = self.data[task], self.config.opd
    idx = opd.select_steps(self.config.seed, it, o.num_steps, o.num_train_steps)
    b = o.batch_size
    return dict(
      inputs,
      states=states[:, idx],
      sigmas=jnp.asarray(d.sigmas[idx]),
      neg_cond=self.put(np.repeat(d.neg_cond, b, 0)),
      neg_mask=self.put(np.repeat(d.neg_mask, b, 0)),
    )

  def teacher(self, teacher_params, task: str, batch):
    return opd.teacher_velocities(
      self.model,
      teacher_params,
      batch,
      cfg_scale=self.config.opd.teacher_cfg_scale,
      img_shapes=self.data[task].img_shapes,
      micro_batch_size=self.micro,
      mesh=self.mesh,
      rules=self.rules,
    )

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
        self.rollout(state.params, task, jax.random.fold_in(base_key, it), inputs)
      )
      t2 = time.perf_counter()
      batch = self.batch(task, it, states, inputs)
      teacher_v = jax.block_until_ready(self.teacher(teacher_params, task, batch))
      t3 = time.perf_counter()
      state, m = self.update(state, task, batch, teacher_v)
      m = common.scalar_metrics(m)
      t4 = time.perf_counter()
      scalars = {
        "loss": m["loss"],
        "train/grad_norm": m["grad_norm"],
        f"train/loss_{task}": m["loss"],
        f"train/relative_error_{task}": m["relative_error"],
        "opd/task_is_t2i": float(task == "t2i"),
        "perf/swap_seconds": swapped,
        "perf/rollout_seconds": t2 - t1,
        "perf/teacher_seconds": t3 - t2,
        "perf/update_seconds": t4 - t3,
        "perf/iteration_seconds": t4 - t0,
      }
      return state, scalars

    return run


@dataclasses.dataclass
class OPDSetup:
  pipe: Any  # the base pipeline (its transformer params moved into `state`)
  data: dict  # {task: TaskData}
  bank: teachers.TeacherBank
  tx: Any
  state: Any  # the student's TrainState
  shardings: Any
  distiller: Distiller


def setup(config, mesh, rules) -> OPDSetup:
  """Checks the teachers against the student (ConfigError naming a missing or mismatched one,
  before anything loads), then loads the student, the tasks' prompts and the teachers."""
  tasks = active_tasks(config)
  dirs = teachers.check_teachers(
    {t: config.teachers[t] for t in tasks}, resolve_pipeline_dir(config.init_from)
  )
  pipe = load_base(config)
  data = {t: TaskData(config, pipe, t) for t in tasks}
  tx = optim.make_optimizer(config.optim, config.total_steps)
  state, shardings = init_policy_state(
    pipe.transformer, pipe.transformer_params, tx, mesh, rules, config.seed
  )
  pipe.transformer_params = None  # the student lives in `state` now
  bank = teachers.TeacherBank.load(
    dirs, shardings.params, DTYPES[config.model.dtype], transformer_overrides(config)
  )
  distiller = Distiller(config, pipe.transformer, data, bank, tx, shardings, mesh, rules)
  return OPDSetup(pipe, data, bank, tx, state, shardings, distiller)
