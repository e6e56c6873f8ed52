"""Rolling out an iteration's batch: prompts, initial noise, trained steps, chunked rollouts,
each chunk decoded and handed to the reward pipeline while the next one rolls out."""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from qwen_image_rl import parallel
from qwen_image_rl.data import examples
from qwen_image_rl.pipelines import common as pipe_common
from qwen_image_rl.rewards.async_pipeline import AsyncRewardPipeline, SyncRewardPipeline
from qwen_image_rl.rewards.base import RewardBatch
from qwen_image_rl.rl import rollout as rl_rollout
from qwen_image_rl.rl.prompts import PromptPool, negative_cond
from qwen_image_rl.rl.timesteps import select_timesteps


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
  # What the reward reported of its own scoring (e.g. a remote judge's remote/<name>/latency_p95_s,
  # retries, failures), summed over chunks for counts and averaged for the rest.
  reward_metrics: dict = dataclasses.field(default_factory=dict)


_COUNTS = ("requests", "retries", "failures", "invalid")


def merge_reward_metrics(per_chunk: dict[str, list[float]]) -> dict[str, float]:
  """One value per metric over an iteration's chunks: counts add up, the rest are averaged."""
  return {
    name: float(np.sum(v) if name.rsplit("/", 1)[-1] in _COUNTS else np.mean(v))
    for name, v in per_chunk.items()
  }


def make_reward_pipeline(config, reward_fn):
  """The reward scorer of an RL run: on a worker thread (rl.async_rewards) or inline."""
  cls = AsyncRewardPipeline if config.rl.async_rewards else SyncRewardPipeline
  return cls(reward_fn, max_pending=max(2, config.rl.rollout_chunks))


class Roller:
  """Draws the prompts of an iteration, rolls them out and scores them (async).

  record_transitions=False (an objective that trains on final latents only) rolls out the
  plain ODE with no trained steps.
  """

  def __init__(
    self, config, pipe, pool: PromptPool, mesh, rules, *, record_transitions: bool = True
  ):
    self.config, self.pipe, self.pool, self.mesh, self.rules = config, pipe, pool, mesh, rules
    self.record_transitions = record_transitions
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
    self.neg_cond, self.neg_mask = negative_cond(config, pipe, self.chunk)

  def put(self, x):
    """A host array, sharded over the batch (None stays None)."""
    if x is None:
      return None
    return parallel.host_to_global(x, parallel.batch_sharding(self.mesh, np.shape(x), self.rules))

  def policy_inputs(self, pool_index) -> dict:
    """Conditioning of a whole rollout batch, batch-sharded: cond, mask, neg_cond and neg_mask
    (the negative prompt, repeated per sample) and ref_latents (editing; else None)."""
    pool = self.pool
    return dict(
      cond=self.put(pool.cond[pool_index]),
      mask=self.put(pool.mask[pool_index]),
      neg_cond=self.put(np.repeat(self.neg_cond[:1], len(pool_index), 0)),
      neg_mask=self.put(np.repeat(self.neg_mask[:1], len(pool_index), 0)),
      ref_latents=None if pool.ref_latents is None else self.put(pool.ref_latents[pool_index]),
    )

  def initial_noise(self, key):
    """x_T [chunk, S, C]; with rl.shared_initial_noise the G rollouts of a prompt share it.

    Shared noise (DanceGRPO) leaves the trained SDE steps as the only source of difference
    within a group, so the group-normalised advantage credits exactly the transitions the
    objective trains instead of mostly the luck of the starting point.
    """
    if not self.config.rl.shared_initial_noise:
      return jax.random.normal(key, (self.chunk, self.seq_len, self.channels), jnp.float32)
    per_group = jax.random.normal(
      key, (self.chunk // self.group, self.seq_len, self.channels), jnp.float32
    )
    return jnp.repeat(per_group, self.group, axis=0)

  def train_steps(self, key, iteration: int):
    """The iteration's trained step indices [K] (empty without recorded transitions)."""
    if not self.record_transitions:
      return np.zeros((0,), np.int32)
    ts = self.config.rl.timesteps
    idx, _ = select_timesteps(
      jax.random.fold_in(key, 0),
      ts.strategy,
      self.config.rl.num_steps,
      ts.num_train,
      ts.first_m,
      power=ts.power,
      sigmas=self.sigmas[:-1],
      window_start=ts.window_start,
      train_step=iteration,
      slide_every=ts.slide_every,
      slide_stride=ts.slide_stride,
    )
    return np.asarray(idx)

  def prompt_indices(self, iteration: int) -> np.ndarray:
    rl = self.config.rl
    groups = examples.batch_indices(
      self.config.seed, iteration, len(self.pool), rl.prompts_per_step, stream=3
    )
    return np.repeat(groups, self.group)  # the G rollouts of a prompt are adjacent

  def reward_batch(self, index, images, ids) -> RewardBatch:
    pool = self.pool
    return RewardBatch(
      images=images,
      prompts=[pool.prompts[i] for i in index],
      categories=[pool.categories[i] for i in index],
      sample_ids=ids,
      source_images=None if pool.sources is None else pool.sources[index],
      meta=[pool.metas[i] for i in index],
    )

  def rollout_chunk(self, params, key, index, train_idx, c: int):
    """Chunk c of the batch: (RolloutResult, uint8 images)."""
    rl = self.config.rl
    x_T = self.initial_noise(jax.random.fold_in(key, 1 + c))
    res = rl_rollout.rollout(
      self.pipe.transformer,
      params,
      self.put(x_T),
      self.put(self.pool.cond[index]),
      self.put(self.pool.mask[index]),
      self.put(self.neg_cond),
      self.put(self.neg_mask),
      self.sigmas,
      train_idx,
      jax.random.fold_in(key, 1000 + c),
      cfg_scale=rl.cfg_scale,
      cfg_mode=rl.cfg_mode,
      noise_level=rl.noise_level,
      img_shapes=self.img_shapes,
      ref_latents=None if self.pool.ref_latents is None else self.put(self.pool.ref_latents[index]),
      rules=self.rules,
      mesh=self.mesh,
      sde_type=rl.get("sde_type", "flow_grpo"),
    )
    with parallel.sharding_context(self.mesh, self.rules):
      decoded = pipe_common.decode_packed(
        self.pipe.vae, self.pipe.vae_params, res.final_latents, self.latent_h, self.latent_w
      )
    return res, pipe_common.to_uint8(parallel.to_host(decoded))

  def collect(self, params, key, iteration: int, reward_pipeline) -> Collected:
    index = self.prompt_indices(iteration)
    train_idx = self.train_steps(key, iteration)
    ids = iteration * self.batch + np.arange(self.batch, dtype=np.int64)
    tickets, results, images = [], [], []
    rollout_seconds = 0.0
    for c in range(self.config.rl.rollout_chunks):
      part = slice(c * self.chunk, (c + 1) * self.chunk)
      t0 = time.perf_counter()
      res, chunk_images = self.rollout_chunk(params, key, index[part], train_idx, c)
      rollout_seconds += time.perf_counter() - t0
      # Scored on the worker thread while the next chunk rolls out; on a pod each process
      # scores its share of the chunk and the scores are gathered below.
      mine = parallel.process_rows(self.chunk)
      batch = self.reward_batch(index[part][mine], chunk_images[mine], ids[part][mine])
      tickets.append(reward_pipeline.submit(batch))
      results.append(res)
      images.append(chunk_images)
    scores, reward_seconds, wait, reward_metrics = {}, 0.0, 0.0, {}
    for c, ticket in enumerate(tickets):
      part = slice(c * self.chunk, (c + 1) * self.chunk)
      mine = parallel.process_rows(self.chunk)
      scored = reward_pipeline.result(ticket, expect_sample_ids=ids[part][mine])
      reward_seconds += scored.seconds
      wait += scored.wait_seconds
      for name in sorted(scored.scores):  # the same order on every process: a collective
        value = np.asarray(scored.scores[name], np.float32)
        scores.setdefault(name, []).append(parallel.gather_rows(value, self.chunk))
      for name, value in scored.extra_metrics.items():
        reward_metrics.setdefault(name, []).append(float(value))
    scores = {name: np.concatenate(v) for name, v in scores.items()}
    result = jax.tree.map(lambda *xs: jnp.concatenate(xs), *results)
    result = result.replace(step_indices=results[0].step_indices)
    return Collected(
      result,
      index,
      ids,
      scores,
      np.concatenate(images),
      rollout_seconds,
      reward_seconds,
      wait,
      merge_reward_metrics(reward_metrics),
    )
