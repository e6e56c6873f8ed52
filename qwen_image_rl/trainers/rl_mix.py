"""`rl_mix` trainer: the Mix-RL baseline (paper sec. 7): one GRPO policy trained on T2I and edit
prompts together, with every reward of both teachers.

  python -m qwen_image_rl.main --config=configs/rl_mix.py:tiny --workdir=runs/rl_mix \
      --config.init_from=runs/demo/base/export/pipeline

The RL loop (`rl/iteration.py`) rolls out a batch of one task: its image layout (edit batches
carry reference tokens) and its rewards' inputs differ. So the mixing is per iteration, as OPD's
teacher routing is: iteration `it` trains the task `rl/routing.py` picks with
mix.t2i_fraction, on that task's prompts (config.tasks.<task>.data), rollout settings and
rewards with their category weights (config.tasks.<task>.rl / .rewards), through the grpo
trainer's iteration. One policy, one optimiser and one step count are shared by both tasks.
With total_steps = the two teachers' iterations together and t2i_fraction = the T2I teacher's
share, the run has the teachers' rollout budget.
"""

from __future__ import annotations

import contextlib
import os

import jax
import jax.numpy as jnp
import numpy as np

from qwen_image_rl import evaluation, optim, parallel
from qwen_image_rl.config_lib import ConfigError
from qwen_image_rl.pipelines.qwen_image import QwenImagePipeline
from qwen_image_rl.rl import iteration, routing
from qwen_image_rl.rl.policy import init_policy_state, with_params
from qwen_image_rl.trainers import common, grpo

REQUIRED = {
  "total_steps": int,
  "seed": int,
  "init_from": str,
  "model.dtype": str,
  "mix.t2i_fraction": float,
  "mix.route_block": int,
  "tasks.t2i.rl.task": str,
  "tasks.edit.rl.task": str,
}


def task_config(config, task: str):
  """The config of one task's GRPO iteration: config with rl / rewards / data of that task."""
  c = config.copy_and_resolve_references()
  for section in ("rl", "rewards", "data"):
    c[section] = config.tasks[task][section]
  c.trainer = "grpo"
  return c


def validate(config) -> None:
  if not 0.0 < config.mix.t2i_fraction < 1.0:
    raise ConfigError(
      f"config.mix.t2i_fraction={config.mix.t2i_fraction} must lie in (0, 1): "
      f"a mixed run trains both tasks (use the grpo trainer for one)"
    )
  if config.mix.route_block < 1:
    raise ConfigError(f"config.mix.route_block={config.mix.route_block} must be >= 1")
  for task in routing.TASKS:
    c = task_config(config, task)
    if c.rl.task != task:
      raise ConfigError(f"config.tasks.{task}.rl.task={c.rl.task!r}: expected {task!r}")
    if c.rl.kl_beta != 0:
      raise ConfigError(
        f"config.tasks.{task}.rl.kl_beta={c.rl.kl_beta}: Mix-RL runs without a KL reference"
      )
    try:
      grpo.validate(c)
    except ConfigError as e:
      raise ConfigError(f"config.tasks.{task}: {e}") from e


def train(config, workdir):
  """Mix-RL: one GRPO policy on T2I and edit prompts with all rewards (the OPD baseline)."""
  mesh = parallel.make_mesh(dict(config.mesh))
  rules = parallel.as_rules(config.logical_axis_rules)
  setups, pipes = {}, {}
  for task in routing.TASKS:
    c = task_config(config, task)
    # One copy of the base for both tasks, unless only one of them loads the text encoder.
    loads_text_encoder = not c.data.get("encoded_prompts", "")
    setups[task] = iteration.setup(c, mesh, rules, pipe=pipes.get(loads_text_encoder))
    pipes[loads_text_encoder] = setups[task].pipe
  ctx = common.make_context(config, workdir, mesh)
  pipe = setups["t2i"].pipe
  tx = optim.make_optimizer(config.optim, config.total_steps)
  state, shardings = init_policy_state(
    pipe.transformer, pipe.transformer_params, tx, mesh, rules, config.seed
  )
  for s in setups.values():
    s.pipe.transformer_params = None  # the policy lives in `state` now
  state, start = common.restore_or_keep(ctx, state, shardings)
  names = {t: list(s.names) for t, s in setups.items()}
  print(
    f"rl_mix: t2i fraction {config.mix.t2i_fraction:g}, rewards {names}; starting at "
    f"iteration {start}/{config.total_steps}",
    flush=True,
  )
  evaluator = grpo.Evaluator(config, pipe, ctx.logger)
  results = [None]
  # As in the grpo trainer, each jitted call enters `parallel.sharding_context` itself.
  with contextlib.ExitStack() as stack:
    if config.eval.at_start and start == 0 and evaluation.enabled(config.eval):
      results[0] = evaluator(0, state.params)
    base_key = jax.random.wrap_key_data(jnp.asarray(np.asarray(state.rng)))
    runs, last = {}, {}
    for task, s in setups.items():
      rewards = stack.enter_context(iteration.make_reward_pipeline(s.config, s.reward_fn))
      # Each task keeps its own training-reward window (their reward names differ).
      runs[task] = grpo.make_iteration(
        s,
        iteration.make_update_step(s, tx, shardings),
        base_key,
        rewards,
        grpo.Evaluator(config, pipe, None),
        last,
      )

    def run(state, it):
      task = routing.route_task(config.seed, it, config.mix.t2i_fraction, config.mix.route_block)
      state, scalars = runs[task](state, it)
      scalars["mix/task_is_t2i"] = float(task == "t2i")
      return state, scalars

    def on_step_end(done, state, scalars):
      if done % max(int(config.log.every), 1) == 0 or done == config.total_steps:
        task = "t2i" if scalars["mix/task_is_t2i"] else "edit"
        print(f"[{task}] " + grpo.iteration_summary(done, setups[task].names, scalars), flush=True)
      if (
        config.eval.every
        and done % config.eval.every == 0
        and done < config.total_steps
        and evaluation.enabled(config.eval)
      ):
        results[0] = evaluator(done, state.params)

    state, _ = common.fit(
      ctx,
      state,
      train_step=run,
      batch_for_step=lambda it: it,
      start_step=start,
      total_steps=config.total_steps,
      max_consecutive_nonfinite=config.max_consecutive_nonfinite,
      on_step_end=on_step_end,
      unit="iteration",
    )
    params = parallel.to_host(state.params)
    if evaluation.enabled(config.eval):
      results[0] = evaluator(config.total_steps, params)
  if parallel.is_primary():  # outside the mesh: the VAE's abstract shapes are host-side
    common.save_export(
      with_params(pipe, params, QwenImagePipeline).save_pretrained,
      os.path.join(workdir, "export", "pipeline"),
    )
  ctx.close()
  return results[0]
