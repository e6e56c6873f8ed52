"""`grpo` trainer: GRPO post-training of a Qwen-Image policy for T2I or editing (paper sec. 1-5).

One iteration (a "step" of config.total_steps):
  1. prompts: rl.prompts_per_step prompt groups, a pure function of (seed, iteration), from the
     tiny world's train split or a prompt file (e.g. one written by the `curate` trainer);
  2. rollouts: rl.group_size SDE rollouts per prompt on the selected timesteps (rl.timesteps),
     CFG per rl.cfg_mode, in rl.rollout_chunks chunks. Each chunk is decoded and handed to the
     reward pipeline, which scores it on a worker thread while the next chunk rolls out
     (AsyncRewardPipeline; every chunk uses the same policy, so the run stays on-policy);
  3. advantages: GDPO (per reward, per prompt group) with per-category weights (Eq. 10);
  4. rl.inner_updates clipped-objective updates (micro-batched) against old log-probs
     recomputed with the policy's own branch (ratio 1 at the first update); with a single
     update the step uses its own log-probs as old ones (ratio exactly 1, one forward less).
A NaN/inf reward or loss skips the iteration's update with a warning; rl.max_consecutive_nonfinite
in a row raise NonFiniteError, leaving the last good checkpoint. Every random draw derives from
(seed, iteration), so a resumed run is bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import math
import os
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from qwen_image_rl import config_lib, evaluation, metrics, optim, parallel
from qwen_image_rl.config_lib import ConfigError
from qwen_image_rl.data import examples, prompt_files, world
from qwen_image_rl.pipelines import common as pipe_common
from qwen_image_rl.pipelines.edit import QwenImageEditPipeline
from qwen_image_rl.pipelines.qwen_image import QwenImagePipeline
from qwen_image_rl.rewards.async_pipeline import AsyncRewardPipeline, SyncRewardPipeline
from qwen_image_rl.rewards.base import RewardBatch
from qwen_image_rl.rewards.composite import category_weighted_sum
from qwen_image_rl.rl import reward_setup
from qwen_image_rl.rl import rollout as rl_rollout
from qwen_image_rl.rl.advantages import contiguous_group_ids, gdpo_advantages, sample_weights
from qwen_image_rl.rl import grpo as rl_grpo
from qwen_image_rl.rl.timesteps import STRATEGIES, select_timesteps, validate_timestep_config
from qwen_image_rl.train_state import TrainState
from qwen_image_rl.trainers import common

TASKS = ("t2i", "edit")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


# ---------------------------------------------------------------------------------------------
# Config checks (before anything is built or compiled).
# ---------------------------------------------------------------------------------------------


def validate_rl(config) -> None:
  """Checks of config.rl shared by grpo and curate; raises ConfigError naming the field."""
  rl = config.rl
  config_lib.check_choice(config, "rl.task", TASKS)
  if not isinstance(rl.group_size, int) or rl.group_size < 2:
    raise ConfigError(f"config.rl.group_size={rl.group_size!r}: GRPO needs at least 2 rollouts "
                      f"per prompt (advantages are normalised within each group)")
  config_lib.check_positive(config, "rl.prompts_per_step", "rl.num_steps")
  if rl.cfg_mode not in rl_rollout.CFG_MODES:
    raise ConfigError(f"config.rl.cfg_mode={rl.cfg_mode!r} is not one of "
                      f"{list(rl_rollout.CFG_MODES)}")
  if rl.cfg_mode != "none" and not rl.cfg_scale > 1.0:
    raise ConfigError(f"config.rl.cfg_scale={rl.cfg_scale}: must be > 1 with cfg_mode="
                      f"{rl.cfg_mode!r} (or use cfg_mode='none')")
  weights = reward_setup.category_weights(config)
  config_lib.check_choice(config, "model.dtype", DTYPES)
  if config.data.prompt_file:
    if rl.task == "edit":
      raise ConfigError("config.data.prompt_file is only supported for rl.task='t2i' (edit "
                        "prompts come from the tiny world's edit triples)")
    try:
      records = prompt_files.read_prompt_file(config.data.prompt_file)
    except (OSError, ValueError) as e:
      raise ConfigError(f"config.data.prompt_file: {e}") from e
    reward_setup.check_categories_covered(weights, [r.category for r in records],
                                          f"config.data.prompt_file={config.data.prompt_file}")
  elif config.data.num_prompts < 1:
    raise ConfigError(f"config.data.num_prompts={config.data.num_prompts}: the prompt set is "
                      f"empty (set it > 0 or give config.data.prompt_file)")
  else:
    reward_setup.check_categories_covered(weights, world.CATEGORIES, "the tiny world")


def _validate(config):
  validate_rl(config)
  rl = config.rl
  ts = rl.timesteps
  if ts.strategy not in STRATEGIES:
    raise ConfigError(f"config.rl.timesteps.strategy={ts.strategy!r} is not one of "
                      f"{list(STRATEGIES)}")
  try:
    validate_timestep_config(ts.strategy, ts.num_train, ts.first_m, rl.num_steps,
                             window_start=ts.window_start, slide_every=ts.slide_every,
                             where="config.rl.timesteps")
  except ValueError as e:
    raise ConfigError(str(e)) from e
  config_lib.check_positive(config, "rl.inner_updates", "rl.rollout_chunks", "rl.clip_eps")
  if rl.prompts_per_step % rl.rollout_chunks:
    raise ConfigError(f"config.rl.rollout_chunks={rl.rollout_chunks} must divide "
                      f"config.rl.prompts_per_step={rl.prompts_per_step}")
  batch = rl.prompts_per_step * rl.group_size
  if rl.micro_batch_size is not None and (rl.micro_batch_size < 1 or batch % rl.micro_batch_size):
    raise ConfigError(f"config.rl.micro_batch_size={rl.micro_batch_size} must divide the batch "
                      f"prompts_per_step * group_size = {batch}")
  if rl.kl_beta < 0:
    raise ConfigError(f"config.rl.kl_beta={rl.kl_beta} must be >= 0")
  if not rl.noise_level > 0:
    raise ConfigError(f"config.rl.noise_level={rl.noise_level} must be > 0 (the SDE's a; 0 "
                      f"makes the trained steps deterministic and their log-probs undefined)")


# ---------------------------------------------------------------------------------------------
# The base pipeline and the policy's pipelines.
# ---------------------------------------------------------------------------------------------


def resolve_pipeline_dir(init_from: str) -> str:
  """A diffusers pipeline directory, or a workdir holding export/pipeline."""
  if not init_from:
    raise ConfigError("config.init_from is required: a diffusers-format pipeline directory "
                      "(e.g. runs/demo/base/export/pipeline) or a workdir that exported one")
  for candidate in (init_from, os.path.join(init_from, "export", "pipeline")):
    if os.path.isfile(os.path.join(candidate, pipe_common.MODEL_INDEX)):
      return candidate
  raise ConfigError(f"config.init_from={init_from!r}: no {pipe_common.MODEL_INDEX} there nor in "
                    f"its export/pipeline")


def load_base(config) -> QwenImagePipeline:
  directory = resolve_pipeline_dir(config.init_from)
  return QwenImagePipeline.from_pretrained(
      directory, dtype=DTYPES[config.model.dtype], vae_dtype=jnp.float32,
      transformer_overrides=config_lib.transformer_overrides(config))


def with_params(pipe, params, cls=None):
  """A pipeline like `pipe` (same components) with other transformer params, as class `cls`."""
  cls = cls or type(pipe)
  if cls is type(pipe):
    out = copy.copy(pipe)
    out.transformer_params = params
    return out
  return cls(pipe.transformer, params, pipe.vae, pipe.vae_params, pipe.text_encoder,
             pipe.text_encoder_params, pipe.tokenizer, pipe.schedule,
             text_encoder_extra=pipe.text_encoder_extra)


REWARD_WINDOW = 10  # iterations averaged for the training rewards written with eval results


# ---------------------------------------------------------------------------------------------
# Prompt pools: everything a rollout needs per prompt, encoded once.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class PromptPool:
  prompts: tuple[str, ...]
  categories: tuple[str, ...]
  metas: tuple[dict, ...]  # reward metadata: {'spec': ...} or {'edit': ...}
  cond: np.ndarray  # [N, L, D]
  mask: np.ndarray  # [N, L]
  sources: Optional[np.ndarray] = None  # uint8 [N, H, W, 3] (edit)
  ref_latents: Optional[np.ndarray] = None  # packed [N, S, C] (edit)

  def __len__(self):
    return len(self.prompts)


def encode_fixed(pipe, texts, length: int, chunk: int = 256):
  """Prompt embeddings padded to exactly `length` tokens (one compile for every batch)."""
  d = pipe.transformer.joint_attention_dim
  cond = np.zeros((len(texts), length, d), np.float32)
  mask = np.zeros((len(texts), length), np.int32)
  for i in range(0, len(texts), chunk):
    e, m = pipe.encode_prompt(list(texts[i:i + chunk]), max_sequence_length=length)
    e, m = np.asarray(e, np.float32)[:, :length], np.asarray(m)[:, :length]
    cond[i:i + len(e), :e.shape[1]] = e
    mask[i:i + len(e), :m.shape[1]] = m
  return cond, mask


def t2i_pool(config, pipe) -> PromptPool:
  data = config.data
  if data.prompt_file:
    records = prompt_files.read_prompt_file(data.prompt_file)
    prompts = tuple(r.prompt for r in records)
    categories = tuple(r.category for r in records)
    metas = tuple({"spec": r.extra["spec"]} if "spec" in r.extra else {} for r in records)
  else:
    ex = examples.t2i_examples(config.seed, data.num_prompts, "train", data.image_size)
    prompts, categories = ex.prompts, ex.categories
    metas = tuple({"spec": s} for s in ex.specs)
  cond, mask = encode_fixed(pipe, prompts, data.max_text_tokens)
  return PromptPool(prompts, categories, metas, cond, mask)


def edit_pool(config, pipe) -> PromptPool:
  data = config.data
  ex = examples.edit_examples(config.seed, data.num_prompts, "train", data.image_size)
  edit_pipe = with_params(pipe, pipe.transformer_params, QwenImageEditPipeline)
  cond, mask = encode_fixed(edit_pipe, ex.instructions, data.max_text_tokens)
  latents = []
  for i in range(0, len(ex), 128):
    z, _ = edit_pipe.encode_image(ex.sources[i:i + 128], image_area=None)
    latents.append(np.asarray(pipe_common.pack_latents(z)))
  return PromptPool(ex.instructions, ex.categories, tuple({"edit": e} for e in ex.edits), cond,
                    mask, sources=ex.sources, ref_latents=np.concatenate(latents))


def build_pool(config, pipe) -> PromptPool:
  pool = t2i_pool(config, pipe) if config.rl.task == "t2i" else edit_pool(config, pipe)
  if not len(pool):
    raise ConfigError("the prompt set is empty")
  return pool


def negative_embeds(config, pipe, batch: int):
  """The negative prompt's embeddings, broadcast to `batch` rows."""
  cls = QwenImagePipeline if config.rl.task == "t2i" else QwenImageEditPipeline
  cond, mask = encode_fixed(with_params(pipe, pipe.transformer_params, cls),
                            [config.rl.negative_prompt], config.data.max_text_tokens)
  return np.repeat(cond, batch, axis=0), np.repeat(mask, batch, axis=0)


# ---------------------------------------------------------------------------------------------
# The policy state on the mesh.
# ---------------------------------------------------------------------------------------------


def policy_shardings(model, tx, mesh, rules):
  boxed = model.abstract_params()
  params = parallel.tree_shardings(boxed, mesh, rules)
  opt = parallel.tree_shardings(jax.eval_shape(tx.init, boxed), mesh, rules)
  rep = parallel.replicated(mesh)
  return TrainState(step=rep, params=params, opt_state=opt, rng=rep)


def init_policy_state(model, params, tx, mesh, rules, seed: int):
  """TrainState holding `params` (loaded weights) sharded by their logical axes."""
  shardings = policy_shardings(model, tx, mesh, rules)
  params = parallel.shard_tree(params, shardings.params)
  with mesh:
    opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
  rep = shardings.step
  state = TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), rep), params=params,
                     opt_state=opt_state,
                     rng=jax.device_put(jax.random.key_data(jax.random.key(seed)), rep))
  return state, shardings


# ---------------------------------------------------------------------------------------------
# Rollouts + asynchronous rewards.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Collected:
  result: rl_rollout.RolloutResult  # all chunks, concatenated
  pool_index: np.ndarray  # [B] prompt of each sample
  sample_ids: np.ndarray  # [B]
  scores: dict  # {name: float32 [B]}
  images: np.ndarray  # uint8 [B, H, W, 3]
  rollout_seconds: float
  reward_seconds: float
  reward_wait_seconds: float


class Roller:
  """Draws the prompts of an iteration, rolls them out and scores them (async)."""

  def __init__(self, config, pipe, pool: PromptPool, reward_fn, mesh, rules):
    self.config, self.pipe, self.pool, self.mesh, self.rules = config, pipe, pool, mesh, rules
    self.reward_fn = reward_fn
    rl = config.rl
    self.group = rl.group_size
    self.batch = rl.prompts_per_step * rl.group_size
    self.chunk = self.batch // rl.rollout_chunks
    size = config.data.image_size
    self.latent_h, self.latent_w = pipe_common.latent_size(size, size, pipe.vae_scale_factor)
    shape = pipe_common.img_shape(self.latent_h, self.latent_w)
    self.img_shapes = (shape, shape) if rl.task == "edit" else (shape,)
    self.seq_len = shape[1] * shape[2]
    self.channels = 4 * pipe.latent_channels
    self.sigmas = np.asarray(pipe.schedule.sigmas(rl.num_steps, self.seq_len), np.float32)
    self.neg_cond, self.neg_mask = negative_embeds(config, pipe, self.chunk)

  def _put(self, x):
    if x is None:
      return None
    return jax.device_put(x, parallel.batch_sharding(self.mesh, np.shape(x), self.rules))

  def policy_inputs(self, pool_index) -> dict:
    """Conditioning of a whole rollout batch, batch-sharded: cond, mask, neg_cond and neg_mask
    (the negative prompt, repeated per sample) and ref_latents (editing; else None)."""
    pool = self.pool
    return dict(
        cond=self._put(pool.cond[pool_index]), mask=self._put(pool.mask[pool_index]),
        neg_cond=self._put(np.repeat(self.neg_cond[:1], len(pool_index), 0)),
        neg_mask=self._put(np.repeat(self.neg_mask[:1], len(pool_index), 0)),
        ref_latents=None if pool.ref_latents is None else self._put(pool.ref_latents[pool_index]))

  def initial_noise(self, key):
    """x_T [chunk, S, C]; with rl.shared_initial_noise the G rollouts of a prompt share it.

    Shared noise (DanceGRPO) leaves the trained SDE steps as the only source of difference
    within a group, so the group-normalised advantage credits exactly the transitions the
    objective trains instead of mostly the luck of the starting point.
    """
    if not self.config.rl.shared_initial_noise:
      return jax.random.normal(key, (self.chunk, self.seq_len, self.channels), jnp.float32)
    per_group = jax.random.normal(key, (self.chunk // self.group, self.seq_len, self.channels),
                                  jnp.float32)
    return jnp.repeat(per_group, self.group, axis=0)

  def train_steps(self, key, iteration: int):
    ts = self.config.rl.timesteps
    idx, _ = select_timesteps(
        jax.random.fold_in(key, 0), ts.strategy, self.config.rl.num_steps, ts.num_train,
        ts.first_m, power=ts.power, sigmas=self.sigmas[:-1], window_start=ts.window_start,
        train_step=iteration, slide_every=ts.slide_every, slide_stride=ts.slide_stride)
    return np.asarray(idx)

  def prompt_indices(self, iteration: int) -> np.ndarray:
    rl = self.config.rl
    groups = examples.batch_indices(self.config.seed, iteration, len(self.pool),
                                    rl.prompts_per_step, stream=3)
    return np.repeat(groups, self.group)  # the G rollouts of a prompt are adjacent

  def reward_batch(self, index, images, ids) -> RewardBatch:
    pool = self.pool
    return RewardBatch(images=images, prompts=[pool.prompts[i] for i in index],
                       categories=[pool.categories[i] for i in index], sample_ids=ids,
                       source_images=None if pool.sources is None else pool.sources[index],
                       meta=[pool.metas[i] for i in index])

  def collect(self, params, key, iteration: int, pipeline) -> Collected:
    rl = self.config.rl
    index = self.prompt_indices(iteration)
    train_idx = self.train_steps(key, iteration)
    ids = iteration * self.batch + np.arange(self.batch, dtype=np.int64)
    tickets, results, images = [], [], []
    start = time.perf_counter()
    rollout_seconds = 0.0
    for c in range(rl.rollout_chunks):
      part = slice(c * self.chunk, (c + 1) * self.chunk)
      t0 = time.perf_counter()
      x_T = self.initial_noise(jax.random.fold_in(key, 1 + c))
      res = rl_rollout.rollout(
          self.pipe.transformer, params, self._put(x_T), self._put(self.pool.cond[index[part]]),
          self._put(self.pool.mask[index[part]]), self._put(self.neg_cond),
          self._put(self.neg_mask), self.sigmas, train_idx, jax.random.fold_in(key, 1000 + c),
          cfg_scale=rl.cfg_scale, cfg_mode=rl.cfg_mode, noise_level=rl.noise_level,
          img_shapes=self.img_shapes,
          ref_latents=None if self.pool.ref_latents is None
          else self._put(self.pool.ref_latents[index[part]]), rules=self.rules)
      decoded = pipe_common.decode_packed(self.pipe.vae, self.pipe.vae_params,
                                          res.final_latents, self.latent_h, self.latent_w)
      chunk_images = pipe_common.to_uint8(np.asarray(decoded))
      rollout_seconds += time.perf_counter() - t0
      # Scored on the worker thread while the next chunk rolls out.
      tickets.append(pipeline.submit(self.reward_batch(index[part], chunk_images, ids[part])))
      results.append(res)
      images.append(chunk_images)
    scores, reward_seconds, wait = {}, 0.0, 0.0
    for c, ticket in enumerate(tickets):
      scored = pipeline.result(ticket, expect_sample_ids=ids[c * self.chunk:(c + 1) * self.chunk])
      reward_seconds += scored.seconds
      wait += scored.wait_seconds
      for name, value in scored.scores.items():
        scores.setdefault(name, []).append(value)
    scores = {name: np.concatenate(v) for name, v in scores.items()}
    result = jax.tree.map(lambda *xs: jnp.concatenate(xs), *results)
    result = result.replace(step_indices=results[0].step_indices)
    del start
    return Collected(result, index, ids, scores, np.concatenate(images), rollout_seconds,
                     reward_seconds, wait)


def reward_pipeline(config, reward_fn):
  cls = AsyncRewardPipeline if config.rl.async_rewards else SyncRewardPipeline
  return cls(reward_fn, max_pending=max(2, config.rl.rollout_chunks))


# ---------------------------------------------------------------------------------------------
# Logging helpers.
# ---------------------------------------------------------------------------------------------


def reward_metrics(scores, categories, weights) -> dict[str, float]:
  out = {}
  for name, value in scores.items():
    finite = value[np.isfinite(value)]
    out[f"reward/{name}/mean"] = float(finite.mean()) if finite.size else float("nan")
    out[f"reward/{name}/std"] = float(finite.std()) if finite.size else float("nan")
    out[f"reward/{name}/nan_count"] = float(np.isnan(value).sum())
  if all(np.isfinite(v).all() for v in scores.values()):
    composite = category_weighted_sum(scores, categories, weights)
    out["reward/composite/mean"] = float(composite.mean())
    cats = np.asarray(categories, dtype=object)
    for c in sorted(set(categories)):
      out[f"reward/composite/{c}"] = float(composite[cats == c].mean())
  return out


def _has_nonfinite(scores) -> bool:
  return any(not np.isfinite(v).all() for v in scores.values())


# ---------------------------------------------------------------------------------------------
# The trainer.
# ---------------------------------------------------------------------------------------------


@config_lib.register_trainer("grpo", required={
    "total_steps": int, "seed": int, "init_from": str, "model.dtype": str,
    "data.image_size": int, "data.max_text_tokens": int, "data.num_prompts": int,
    "data.prompt_file": str, "rl.task": str, "rl.group_size": int, "rl.prompts_per_step": int,
    "rl.num_steps": int, "rl.cfg_mode": str, "rl.cfg_scale": float, "rl.noise_level": float,
    "rl.clip_eps": float, "rl.kl_beta": float, "rl.inner_updates": int,
    "rl.rollout_chunks": int, "rl.timesteps.strategy": str, "rl.timesteps.num_train": int,
    "rl.shared_initial_noise": bool, "rewards.names": tuple}, validate=_validate)
def train(config, workdir):
  """GRPO for T2I or editing with hybrid CFG, timestep subsets, GDPO advantages, async rewards."""
  rl = config.rl
  pipe = load_base(config)  # ConfigError on a bad init_from, before any compile
  reward_fn = reward_setup.build_reward(config)
  names = tuple(reward_fn.names)
  weights = reward_setup.category_weights(config)
  categories = tuple(sorted(weights))
  table = reward_setup.weight_table(weights, categories, names)
  pool = build_pool(config, pipe)
  reward_setup.check_categories_covered(weights, pool.categories, "the prompt set")
  category_of = {c: i for i, c in enumerate(categories)}

  ctx = common.make_context(config, workdir)
  model = pipe.transformer
  tx = optim.make_optimizer(config.optim, config.total_steps * rl.inner_updates)
  state, shardings = init_policy_state(model, pipe.transformer_params, tx, ctx.mesh, ctx.rules,
                                       config.seed)
  ref_params = None
  if rl.kl_beta > 0:  # a frozen copy of the initial policy
    ref_params = jax.tree.map(lambda x: x.copy(), state.params)
  pipe.transformer_params = None  # the policy lives in `state` now
  state, start = common.restore_or_keep(ctx, state, shardings)
  roller = Roller(config, pipe, pool, reward_fn, ctx.mesh, ctx.rules)
  print(f"grpo[{rl.task}]: {len(pool)} prompts, batch {roller.batch} = "
        f"{rl.prompts_per_step} x G={rl.group_size}, {rl.num_steps} steps, "
        f"K={rl.timesteps.num_train} trained ({rl.timesteps.strategy}), cfg_mode={rl.cfg_mode}, "
        f"rewards {list(names)}; starting at iteration {start}/{config.total_steps}", flush=True)

  step_fn = jax.jit(rl_grpo.make_grpo_train_step(
      model, tx, ctx.rules, micro_batch_size=rl.micro_batch_size, cfg_mode=rl.cfg_mode,
      clip_eps=rl.clip_eps, noise_level=rl.noise_level, img_shapes=roller.img_shapes,
      cfg_scale=rl.cfg_scale, kl_beta=rl.kl_beta, mesh=ctx.mesh),
      donate_argnums=(0,), out_shardings=(shardings, None))
  group_ids = contiguous_group_ids(roller.batch, rl.group_size)
  # Training reward means of the last iterations: eval results report their average next to the
  # oracle's held-out scores (the reward model's view vs the "human's").
  recent_rewards = collections.deque(maxlen=REWARD_WINDOW)

  def run_eval(step):
    params = jax.device_get(state.params)
    t2i = with_params(pipe, params, QwenImagePipeline)
    edit = with_params(pipe, params, QwenImageEditPipeline)
    results = evaluation.evaluate(t2i, edit, config.eval, step=step, seed=config.seed,
                                  logger=ctx.logger)
    if recent_rewards:
      results["rewards"] = {k: float(np.mean([r[k] for r in recent_rewards]))
                            for k in recent_rewards[-1]}
      results["rewards_window"] = len(recent_rewards)
    ctx.logger.write_results(f"eval_{step}", results)
    print(f"eval at iteration {step}:\n{evaluation.format_table(results)}", flush=True)
    return results

  results = None
  if config.eval.at_start and start == 0 and evaluation.enabled(config.eval):
    results = run_eval(0)
  base_key = jax.random.wrap_key_data(jnp.asarray(np.asarray(state.rng)))  # state is donated
  nonfinite = 0
  log_every = max(int(config.log.every), 1)
  with reward_pipeline(config, reward_fn) as rewards:
    for it in range(start, config.total_steps):
      t_iter = time.perf_counter()
      key = jax.random.fold_in(base_key, it)
      got = roller.collect(state.params, key, it, rewards)
      sample_categories = [pool.categories[i] for i in got.pool_index]
      scalars = reward_metrics(got.scores, sample_categories, weights)
      recent_rewards.append({k[len("reward/"):]: v for k, v in scalars.items()
                             if k.endswith("/mean")})
      t_update = time.perf_counter()
      skipped = _has_nonfinite(got.scores)
      if skipped:
        reason = "non-finite reward"
      else:
        cat_ids = np.array([category_of[c] for c in sample_categories], np.int32)
        adv, adv_stats = gdpo_advantages(
            {n: got.scores[n] for n in names}, sample_weights(cat_ids, table, names), group_ids,
            rl.prompts_per_step, eps=rl.adv_eps, whiten=rl.whiten_advantages,
            clip=rl.adv_clip if rl.adv_clip > 0 else None)
        scalars.update({f"train/{k}": float(v) for k, v in adv_stats.items()
                        if k.startswith("advantage/")})
        inputs = roller.policy_inputs(got.pool_index)
        old = None  # one update: the step takes the current log-probs as old (ratio 1)
        if rl.inner_updates > 1:  # later updates need them fixed before the first one
          old = rl_rollout.recompute_old_log_probs(
              model, state.params, got.result, **inputs, cfg_mode=rl.cfg_mode,
              cfg_scale=rl.cfg_scale, noise_level=rl.noise_level, img_shapes=roller.img_shapes,
              micro_batch_size=rl.micro_batch_size, rules=ctx.rules)
        if not rl_rollout.policy_is_guided(rl.cfg_mode):
          # The unconditional branch enters the objective only with cfg_mode='both'.
          inputs.update(neg_cond=None, neg_mask=None)
        batch = rl_rollout.rollout_batch(got.result, **inputs, advantages=jnp.asarray(adv),
                                         old_log_probs=old)
        history = []
        for _ in range(rl.inner_updates):
          state, m = step_fn(state, batch, ref_params)
          history.append(common.scalar_metrics(m))
        scalars["rollout/behaviour_log_prob"] = float(jnp.mean(got.result.log_probs))
        scalars["rollout/old_log_prob"] = (history[0]["log_prob_mean"] if old is None
                                           else float(jnp.mean(old)))
        skipped = any(not math.isfinite(h["loss"]) for h in history)
        reason = "non-finite loss"
        scalars.update({f"train/{k}": v for k, v in history[-1].items()})
        scalars["train/first_ratio_mean"] = history[0]["ratio_mean"]
      done = it + 1
      now = time.perf_counter()
      scalars.update({
          "perf/rollout_seconds": got.rollout_seconds, "perf/reward_seconds": got.reward_seconds,
          "perf/reward_wait_seconds": got.reward_wait_seconds,
          "perf/update_seconds": now - t_update, "perf/iteration_seconds": now - t_iter,
          "perf/samples_per_sec": roller.batch / max(now - t_iter, 1e-9),
          "rollout/samples": float(roller.batch),
          "rollout/train_step_mean": float(np.mean(np.asarray(got.result.step_indices)))})
      if skipped:
        nonfinite += 1
        logging.warning("iteration %d: %s, update skipped (%d in a row)", done, reason, nonfinite)
        print(f"warning: iteration {done}: {reason}, update skipped ({nonfinite} in a row)",
              flush=True)
        ctx.logger.scalars(done, {k: v for k, v in scalars.items()
                                  if k.startswith(("reward/", "perf/"))})
        if nonfinite >= rl.max_consecutive_nonfinite:
          ctx.checkpointer.wait()
          raise common.NonFiniteError(
              f"{nonfinite} consecutive iterations with a {reason} at iteration {done}; "
              f"stopping. The last good checkpoint is step {ctx.checkpointer.latest_step()} in "
              f"{ctx.checkpointer.directory}")
        continue
      nonfinite = 0
      if done % log_every == 0 or done == config.total_steps:
        ctx.logger.scalars(done, scalars)
        print(f"iteration {done}: loss {scalars['train/loss']:.4g}, reward "
              + ", ".join(f"{n} {scalars[f'reward/{n}/mean']:.3f}" for n in names)
              + f"; {scalars['perf/iteration_seconds']:.1f}s (rollout "
              f"{scalars['perf/rollout_seconds']:.1f}, reward {scalars['perf/reward_seconds']:.1f}"
              f" waited {scalars['perf/reward_wait_seconds']:.1f}, update "
              f"{scalars['perf/update_seconds']:.1f})", flush=True)
      if config.log.images_every and done % config.log.images_every == 0:
        ctx.logger.images(done, {"rollout/images": metrics.image_grid(
            got.images[:min(len(got.images), 4 * rl.group_size)], rl.group_size)})
      ctx.logger.progress(done)
      ctx.checkpointer.maybe_save(done, state, extra={"step": done})
      if config.eval.every and done % config.eval.every == 0 and done < config.total_steps \
          and evaluation.enabled(config.eval):
        results = run_eval(done)
  ctx.checkpointer.save(config.total_steps, state, extra={"step": config.total_steps})
  ctx.checkpointer.wait()

  params = jax.device_get(state.params)
  final_cls = QwenImagePipeline if rl.task == "t2i" else QwenImageEditPipeline
  if jax.process_index() == 0:
    with_params(pipe, params, final_cls).save_pretrained(
        os.path.join(workdir, "export", "pipeline"))
  if evaluation.enabled(config.eval):
    results = run_eval(config.total_steps)
  ctx.close()
  return results
