"""Reward serving: judge-server throughput, and how much reward latency an RL iteration hides.

  python benchmarks/reward_server.py [--requests=128] [--batch_sizes=1,8,32]
      [--concurrency=1,8,32,64] [--chunks=2,8,16] [--rollout_s=1.88] [--iterations=5]

1. Throughput: `python -m qwen_image_rl.serve --judge=oracle --max_batch=B` as a child process;
   the remote reward (rubric alignment) scores `--requests` tiny-world images with C requests in
   flight. Prints requests/s, per-request latency p50/p95 and the server's mean judge batch.
2. Overlap: an RL iteration's reward pattern without the model: the rollout of `--batch`
   samples is simulated by a jitted JAX computation (a chain of matmuls calibrated to take
   `--rollout_s` per iteration, 1.88 s = the tiny T2I config's measured rollout), split into
   `--chunks` chunks; after each chunk its images (pre-rendered tiny-world scenes) are submitted
   to the reward pipeline, and the iteration collects every chunk's scores at the end, as the
   GRPO trainer's Roller.collect does. Rewards: the composite (alignment, aesthetics, portrait),
   in-process oracle or remote oracle judge. The reward latency to hide is what a synchronous
   pipeline (SyncRewardPipeline: scoring in the caller after each chunk) spends scoring; the
   asynchronous pipeline (1 worker, as the trainer uses it, or `--workers` workers scoring chunks
   concurrently) leaves `wait` of it exposed: hidden share = 1 - median(wait) / median(sync
   reward seconds), medians over `--iterations` after a warm-up, all variants' iterations
   alternating so they see the same machine load. The last chunk's reward can only be waited
   for (nothing rolls out after it), so with one worker the share is at most about
   1 - 1/chunks.

Both the judge server and the simulated rollout run on this machine's CPU cores; on a real
deployment the judge runs on other machines.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np

from qwen_image_rl.data import (
  render,
  world,
)
from qwen_image_rl.rewards.async_pipeline import (
  AsyncRewardPipeline,
  SyncRewardPipeline,
)
from qwen_image_rl.rewards.base import RewardBatch
from qwen_image_rl.rewards.composite import CompositeReward
from qwen_image_rl.rewards.registry import make_reward
from qwen_image_rl.serving.local import local_server

T2I = ('alignment', 'aesthetics', 'portrait')


def tiny_world_batch(n: int, seed: int = 0, first_id: int = 0) -> RewardBatch:
  """n renders of tiny-world scenes, every other one noisy (so scores vary)."""
  specs = world.sample_scenes(seed, n)
  images = render.render_batch(specs, 64)
  noisy = np.arange(0, n, 2)
  images[noisy] = np.clip(
    images[noisy].astype(int) + np.random.default_rng(seed).normal(0, 25, images[noisy].shape),
    0,
    255,
  ).astype(np.uint8)
  return RewardBatch(
    images=images,
    prompts=['p'] * n,
    categories=[s.category for s in specs],
    sample_ids=first_id + np.arange(n),
    meta=[{'spec': s} for s in specs],
  )


def server_stats(server) -> dict:
  with urllib.request.urlopen(server.url + '/health', timeout=30) as response:
    return json.loads(response.read())


# --- 1. throughput ------------------------------------------------------------------------------


def throughput(args) -> list[dict]:
  batch = tiny_world_batch(args.requests)
  rows = []
  for max_batch in args.batch_sizes:
    with local_server('--judge=oracle', f'--max_batch={max_batch}') as server:
      make_reward('remote_alignment', base_url=server.base_url)(batch.select(range(8)))  # warm
      for concurrency in args.concurrency:
        reward = make_reward(
          'remote_alignment', base_url=server.base_url, max_concurrency=concurrency
        )
        before = server_stats(server)
        start = time.perf_counter()
        reward(batch)
        seconds = time.perf_counter() - start
        after = server_stats(server)
        m = reward.last_metrics
        row = dict(
          max_batch=max_batch,
          concurrency=concurrency,
          requests_per_s=args.requests / seconds,
          p50_ms=1e3 * m['remote/remote_alignment/latency_p50_s'],
          p95_ms=1e3 * m['remote/remote_alignment/latency_p95_s'],
          mean_judge_batch=(after['requests'] - before['requests'])
          / max(after['batches'] - before['batches'], 1),
        )
        rows.append(row)
        print(
          f"{max_batch:>9}{concurrency:>12}{row['requests_per_s']:>12.1f}"
          f"{row['p50_ms']:>10.1f}{row['p95_ms']:>10.1f}{row['mean_judge_batch']:>12.1f}",
          flush=True,
        )
  return rows


# --- 2. overlap ---------------------------------------------------------------------------------


def simulated_rollout():
  """`rollout(seconds)`: a jitted matmul chain calibrated (once) to take about `seconds`."""
  w = jax.random.normal(jax.random.key(0), (512, 512), jnp.float32) / 512**0.5

  @jax.jit
  def chain(x, n):
    return jax.lax.fori_loop(0, n, lambda i, y: jnp.tanh(y @ w), x)

  x = jnp.ones((256, 512), jnp.float32)
  chain(x, jnp.int32(20)).block_until_ready()  # compile; the step count is traced
  times = []
  for _ in range(5):
    start = time.perf_counter()
    chain(x, jnp.int32(20)).block_until_ready()
    times.append(time.perf_counter() - start)
  per_step = float(np.median(times)) / 20
  return lambda seconds: chain(x, jnp.int32(max(1, round(seconds / per_step)))).block_until_ready()


def rl_iteration(
  pipeline, images: RewardBatch, chunks: int, rollout, rollout_chunk_s: float, iteration: int
) -> dict:
  """One iteration's rollout, reward and wait seconds, in the pattern of Roller.collect."""
  size = images.size // chunks
  start = time.perf_counter()
  tickets, rollout_s = [], 0.0
  for c in range(chunks):
    t0 = time.perf_counter()
    rollout(rollout_chunk_s)
    rollout_s += time.perf_counter() - t0
    part = images.select(range(c * size, (c + 1) * size))
    part = RewardBatch(
      images=part.images,
      prompts=part.prompts,
      categories=part.categories,
      meta=part.meta,
      sample_ids=iteration * images.size + part.sample_ids,
    )
    tickets.append(pipeline.submit(part))
  reward_s = wait_s = 0.0
  for ticket in tickets:
    result = pipeline.result(ticket)
    reward_s += result.seconds
    wait_s += result.wait_seconds
  return dict(
    rollout_s=rollout_s, reward_s=reward_s, wait_s=wait_s, iteration_s=time.perf_counter() - start
  )


def overlap(args) -> list[dict]:
  """Per chunk count and reward: a synchronous baseline (scoring in the caller: the reward
  latency to hide) and asynchronous pipelines, iterations alternating so all see the same load.
  """
  images = tiny_world_batch(args.batch, seed=1)
  rows = []
  with local_server('--judge=oracle', '--max_batch=64') as server:
    rewards = {
      'in-process': CompositeReward({r: make_reward(r) for r in T2I}),
      'remote': CompositeReward(
        {r: make_reward(f'remote_{r}', base_url=server.base_url, max_concurrency=64) for r in T2I}
      ),
    }
    modes = [
      ('in-process', 'sync', 0),
      ('in-process', 'async', 1),
      ('remote', 'sync', 0),
      ('remote', 'async', 1),
      ('remote', 'async', args.workers),
    ]
    rollout = simulated_rollout()
    for chunks in args.chunks:
      pipelines = [
        SyncRewardPipeline(rewards[r])
        if kind == 'sync'
        else AsyncRewardPipeline(rewards[r], max_pending=max(2, chunks), workers=workers)
        for r, kind, workers in modes
      ]
      its = [[] for _ in modes]
      for it in range(args.iterations + 1):  # iteration 0 warms up
        for runs, pipeline in zip(its, pipelines):
          got = rl_iteration(pipeline, images, chunks, rollout, args.rollout_s / chunks, it)
          if it:
            runs.append(got)
      latency = {}  # reward -> median reward seconds of the synchronous iterations
      for (reward, kind, workers), runs, pipeline in zip(modes, its, pipelines):
        pipeline.close()
        med = {k: float(np.median([i[k] for i in runs])) for k in runs[0]}
        if kind == 'sync':
          latency[reward] = med['reward_s']
          continue
        hidden = 1 - med['wait_s'] / latency[reward]
        row = dict(
          chunks=chunks,
          reward=reward,
          workers=workers,
          sync_reward_s=latency[reward],
          hidden=hidden,
          **{k: v for k, v in med.items() if k != 'hidden'},
        )
        rows.append(row)
        print(
          f"{chunks:>7}  {reward:<11}{workers:>8}{latency[reward]:>10.2f}"
          f"{med['rollout_s']:>10.2f}{med['wait_s']:>9.2f}{med['iteration_s']:>12.2f}"
          f"{100 * hidden:>9.1f}%",
          flush=True,
        )
  return rows


def parse_ints(text: str) -> list[int]:
  return [int(v) for v in text.split(',') if v]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--requests', type=int, default=128)
  parser.add_argument('--batch_sizes', type=parse_ints, default=[1, 8, 32])
  parser.add_argument('--concurrency', type=parse_ints, default=[1, 8, 32, 64])
  parser.add_argument('--batch', type=int, default=64, help='rollout samples per iteration')
  parser.add_argument('--chunks', type=parse_ints, default=[2, 8, 16])
  parser.add_argument(
    '--rollout_s', type=float, default=1.88, help='simulated rollout seconds per iteration'
  )
  parser.add_argument('--iterations', type=int, default=5)
  parser.add_argument(
    '--workers', type=int, default=3, help='reward pipeline workers of the "remote xN" mode'
  )
  parser.add_argument('--skip', choices=('', 'throughput', 'overlap'), default='')
  args = parser.parse_args()
  if any(args.batch % c for c in args.chunks):
    parser.error(f'--batch={args.batch} must divide into every --chunks {args.chunks}')
  result = {}
  if args.skip != 'throughput':
    print(f'judge server throughput, oracle judge, {args.requests} requests (rubric alignment)')
    print(
      f"{'max_batch':>9}{'concurrency':>12}{'requests/s':>12}{'p50 ms':>10}{'p95 ms':>10}"
      f"{'judge batch':>12}"
    )
    result['throughput'] = throughput(args)
  if args.skip != 'overlap':
    print(
      f'\nRL iteration, {args.batch} samples, simulated rollout {args.rollout_s} s '
      f'(jitted JAX), rewards {"+".join(T2I)}; medians of {args.iterations} iterations'
    )
    print(
      f"{'chunks':>7}  {'reward':<11}{'workers':>8}{'reward s':>10}{'rollout s':>10}"
      f"{'wait s':>9}{'iteration s':>12}{'hidden':>10}"
    )
    result['overlap'] = overlap(args)
  print(json.dumps(result))


if __name__ == '__main__':
  main()
