"""`grpo` trainer: GRPO post-training of a Qwen-Image policy for T2I or editing (paper sec. 1-5).

  python -m qwen_image_rl.main --config=configs/grpo_t2i.py:tiny --workdir=runs/demo/grpo_t2i \
      --config.init_from=runs/demo/base/export/pipeline

One iteration (a "step" of config.total_steps) is `rl/iteration.py`'s named steps:
  1. roll out: rl.prompts_per_step prompt groups, a pure function of (seed, iteration), from the
     tiny world's train split or a prompt file (e.g. one written by the `curate` trainer);
     rl.group_size SDE rollouts each on the selected timesteps (rl.timesteps), CFG per
     rl.cfg_mode, in rl.rollout_chunks chunks, each scored on a worker thread while the next
     rolls out (every chunk uses the same policy, so the run stays on-policy);
  2. score: per-reward statistics and the category-weighted composite;
  3. advantages: GDPO (per reward, per prompt group) with per-category weights (Eq. 10);
  4. update: rl.inner_updates steps of the objective named by rl.objective (rl/objectives/).
A NaN/inf reward or loss skips the iteration's update with a warning; rl.max_consecutive_nonfinite
in a row raise NonFiniteError, leaving the last good checkpoint. Every random draw derives from
(seed, iteration), so a resumed run is bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import collections
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from qwen_image_rl import evaluation, metrics, parallel, precision
from qwen_image_rl.parallel import batch_check
from qwen_image_rl.pipelines.edit import QwenImageEditPipeline
from qwen_image_rl.pipelines.qwen_image import QwenImagePipeline
from qwen_image_rl.rl import config_checks, iteration
from qwen_image_rl.rl.policy import init_policy_state, task_pipeline_class, with_params
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
  "rl.task": str,
  "rl.objective": str,
  "rl.group_size": int,
  "rl.prompts_per_step": int,
  "rl.num_steps": int,
  "rl.cfg_mode": str,
  "rl.cfg_scale": float,
  "rl.noise_level": float,
  "rl.clip_eps": float,
  "rl.kl_beta": float,
  "rl.inner_updates": int,
  "rl.rollout_chunks": int,
  "rl.timesteps.strategy": str,
  "rl.timesteps.num_train": int,
  "rl.shared_initial_noise": bool,
  "rewards.names": tuple,
}
REWARD_WINDOW = 10  # iterations averaged for the training rewards written with eval results


def validate(config) -> None:
  config_checks.check_rollout(config)
  config_checks.check_update(config)


def iteration_summary(done: int, names, scalars) -> str:
  return (
    f"iteration {done}: loss {scalars['train/loss']:.4g}, reward "
    + ", ".join(f"{n} {scalars[f'reward/{n}/mean']:.3f}" for n in names)
    + f"; {scalars['perf/iteration_seconds']:.1f}s (rollout "
    f"{scalars['perf/rollout_seconds']:.1f}, reward {scalars['perf/reward_seconds']:.1f}"
    f" waited {scalars['perf/reward_wait_seconds']:.1f}, update "
    f"{scalars['perf/update_seconds']:.1f})"
  )


class Evaluator:
  """Held-out evaluation of the policy, with the recent training rewards next to it."""

  def __init__(self, config, pipe, logger):
    self.config, self.pipe, self.logger = config, pipe, logger
    self.recent_rewards = collections.deque(maxlen=REWARD_WINDOW)

  def __call__(self, step: int, params):
    params = parallel.to_host(params)  # every process: a collective where params span hosts
    t2i = with_params(self.pipe, params, QwenImagePipeline)
    edit = with_params(self.pipe, params, QwenImageEditPipeline)
    results = evaluation.evaluate(
      t2i, edit, self.config.eval, step=step, seed=self.config.seed, logger=self.logger
    )
    if self.recent_rewards:
      # The reward model's view next to the oracle's held-out scores (the "human's").
      results["rewards"] = {
        k: float(np.mean([r[k] for r in self.recent_rewards])) for k in self.recent_rewards[-1]
      }
      results["rewards_window"] = len(self.recent_rewards)
    self.logger.write_results(f"eval_{step}", results)
    print(f"eval at iteration {step}:\n{evaluation.format_table(results)}", flush=True)
    return results


def make_iteration(
  s: iteration.RLSetup, update_step, base_key, reward_pipeline, evaluator, last, ref_params=None
):
  """train_step(state, it) for `common.fit`: one RL iteration. Keeps the iteration's rollout
  images in `last` for the image log."""

  def run(state, it):
    t_iter = time.perf_counter()
    got = iteration.roll_out(s, state.params, jax.random.fold_in(base_key, it), it, reward_pipeline)
    last["images"] = got.images
    last["histograms"] = reward_histograms(s, got)
    scalars = iteration.score(s, got)
    evaluator.recent_rewards.append(
      {k[len("reward/") :]: v for k, v in scalars.items() if k.endswith("/mean")}
    )
    t_update = time.perf_counter()
    finite = iteration.scores_finite(got)
    scalars["rollout/nonfinite_reward"] = float(not finite)
    if finite:
      adv, adv_stats = iteration.advantages(s, got)
      state, update_metrics = iteration.update(s, update_step, state, got, adv, ref_params)
      scalars.update(adv_stats)
      scalars.update(update_metrics)
      last["histograms"].update(category_histograms("advantage_hist", np.asarray(adv), s, got))
    else:
      scalars["loss"] = float("nan")
    last["group"] = first_group(s, got, np.asarray(adv) if finite else None)
    now = time.perf_counter()
    scalars.update(
      {
        "perf/rollout_seconds": got.rollout_seconds,
        "perf/reward_seconds": got.reward_seconds,
        "perf/reward_wait_seconds": got.reward_wait_seconds,
        "perf/update_seconds": now - t_update,
        "perf/iteration_seconds": now - t_iter,
        "perf/samples_per_sec": s.batch_size / max(now - t_iter, 1e-9),
        "rollout/samples": float(s.batch_size),
        "rollout/train_step_mean": float(np.mean(np.asarray(got.result.step_indices))),
      }
    )
    scalars.update(got.reward_metrics)  # a remote judge's latency, retries and failures
    return state, scalars

  return run


def run_banner(s, start: int) -> str:
  rl = s.rl
  return (
    f"grpo[{rl.task}]: {len(s.pool)} prompts, batch {s.batch_size} = "
    f"{rl.prompts_per_step} x G={rl.group_size}, {rl.num_steps} steps, "
    f"K={rl.timesteps.num_train} trained ({rl.timesteps.strategy}), cfg_mode={rl.cfg_mode}, "
    f"objective {rl.objective}, rewards {list(s.names)}"
    + ("; PLACEBO: advantages shuffled within groups" if rl.get("placebo", False) else "")
    + f"; starting at iteration {start}/{s.config.total_steps}"
  )


def category_histograms(tag: str, values, s, got) -> dict[str, np.ndarray]:
  """{tag/all: values, tag/<category>: that category's values} for TensorBoard."""
  cats = np.asarray(iteration.sample_categories(s, got), dtype=object)
  out = {f"{tag}/all": values}
  out.update({f"{tag}/{c}": values[cats == c] for c in sorted(set(cats))})
  return out


def reward_histograms(s, got) -> dict[str, np.ndarray]:
  """Each reward's distribution over the rollout, overall and per prompt category."""
  out = {}
  for name, value in got.scores.items():
    out.update(category_histograms(f"reward_hist/{name}", np.asarray(value), s, got))
  return out


def first_group(s, got, adv) -> dict:
  """The first prompt group of the rollout with each sample's rewards (and advantage)."""
  g = s.rl.group_size
  captions = [
    [f"{name[:5]} {float(got.scores[name][i]):.3f}" for name in got.scores]
    + ([f"adv {float(adv[i]):+.2f}"] if adv is not None else [])
    for i in range(g)
  ]
  index = int(got.pool_index[0])
  title = f"[{s.pool.categories[index]}] {s.pool.prompts[index]}"
  return {"images": got.images[:g], "title": title, "captions": captions}


def log_rollout_images(logger, step: int, images, group_size: int, group=None) -> None:
  """The first four groups of the last rollout, one group per row; and the first group under
  its prompt, each image above its rewards (`rollout/group`)."""
  grid = metrics.image_grid(images[: min(len(images), 4 * group_size)], group_size)
  logger.images(step, {"rollout/images": grid})
  if group is not None:
    logger.images(
      step,
      {"rollout/group": metrics.captioned_grid(group["images"], group["title"], group["captions"])},
    )


def train(config, workdir):
  """GRPO for T2I or editing with hybrid CFG, timestep subsets, GDPO advantages, async rewards."""
  rl = config.rl
  mesh = parallel.make_mesh(dict(config.mesh))
  rules = parallel.as_rules(config.logical_axis_rules)
  s = iteration.setup(config, mesh, rules)
  ctx = common.make_context(config, workdir, mesh)
  pipe = s.pipe
  tx = iteration.make_optimizer(s, config.total_steps * rl.inner_updates)
  # A mesh axis that does not divide the rollout batch silently replicates it: say so.
  batch_check.check_batches(
    batch_check.config_batches(config, ["rl.prompts_per_step*rl.group_size"]),
    mesh,
    rules,
    mode="warn",
  )
  state, shardings = init_policy_state(
    s.model, pipe.transformer_params, tx, mesh, rules, config.seed
  )
  ref_params = None
  if rl.kl_beta > 0:  # a frozen copy of the initial policy
    ref_params = jax.tree.map(lambda x: x.copy(), state.params)
  pipe.transformer_params = None  # the policy lives in `state` now
  state, start = common.restore_or_keep(ctx, state, shardings)
  print(run_banner(s, start), flush=True)
  if start == 0:  # once per run (a resumed run already wrote them)
    ctx.logger.hparams(config)
  evaluator = Evaluator(config, pipe, ctx.logger)
  results = [None]  # the latest evaluation's
  # Each jitted rollout, decode and update enters `parallel.sharding_context` itself; the
  # evaluation and export run outside it (flax unboxing under a mesh would constrain).
  if config.eval.at_start and start == 0 and evaluation.enabled(config.eval):
    results[0] = evaluator(0, state.params)
  base_key = jax.random.wrap_key_data(jnp.asarray(np.asarray(state.rng)))  # state is donated
  last = {}

  def on_step_end(done, state, scalars):
    log_every = max(int(config.log.every), 1)
    if done % log_every == 0 or done == config.total_steps:
      print(iteration_summary(done, s.names, scalars), flush=True)
      ctx.logger.histograms(done, last["histograms"])
    if config.log.images_every and done % config.log.images_every == 0:
      log_rollout_images(ctx.logger, done, last["images"], rl.group_size, last.get("group"))
    if (
      config.eval.every
      and done % config.eval.every == 0
      and done < config.total_steps
      and evaluation.enabled(config.eval)
    ):
      results[0] = evaluator(done, state.params)

  def on_skip(done, scalars):
    ctx.logger.scalars(
      done, {k: v for k, v in scalars.items() if k.startswith(("reward/", "perf/"))}
    )
    return "reward" if scalars["rollout/nonfinite_reward"] else "loss"

  with iteration.make_reward_pipeline(config, s.reward_fn) as reward_pipeline:
    run = make_iteration(
      s,
      iteration.make_update_step(s, tx, shardings),
      base_key,
      reward_pipeline,
      evaluator,
      last,
      ref_params,
    )
    state, _ = common.fit(
      ctx,
      state,
      train_step=run,
      batch_for_step=lambda it: it,
      start_step=start,
      total_steps=config.total_steps,
      max_consecutive_nonfinite=rl.max_consecutive_nonfinite,
      on_step_end=on_step_end,
      on_skip=on_skip,
      unit="iteration",
    )
  params = parallel.to_host(state.params)
  if parallel.is_primary():
    # Exported in the compute dtype (the released bf16 format), not the f32 master weights.
    exported = precision.cast_floating(params, precision.model_dtypes(config)["dtype"])
    common.save_export(
      with_params(pipe, exported, task_pipeline_class(rl.task)).save_pretrained,
      os.path.join(workdir, "export", "pipeline"),
    )
  if evaluation.enabled(config.eval):
    results[0] = evaluator(config.total_steps, params)
  ctx.close()
  return results[0]
