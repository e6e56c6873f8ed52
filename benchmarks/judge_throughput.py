"""Judge throughput: images scored per second with and without chain of thought (CPU).

Loads a judge exported by reward_sft (or builds the configs/judge.py:tiny model with random
weights when --judge is not given; a random judge rarely emits the score marker, so its CoT
rows run the full --max_cot_tokens, the worst case), scores --batch held-out alignment images
per call, and reports the median of --runs calls after --warmup (jit compile excluded), the
CoT / no-CoT time ratio, and the invalid count of the CoT runs. A decomposing judge
(configs/judge.py:tiny_decompose) writes its CoT as a text-only decomposition then a checklist,
one forward pass per item, `--verdict_samples` times (-1: its exported setting).

The judge's share of an RL iteration: --rl_log names the log of an RL run on the judge
(configs/rl_t2i.py:judge=DIR) and, optionally, --baseline_log the same run on the oracle; the
trainer's per-iteration lines give the median iteration time, reward time (scored on a thread
beside the rollout and update) and the time the update waited for it, and the median iteration
time over the oracle run's (iteration 1, which compiles, is left out).

  JAX_PLATFORMS=cpu .venv/bin/python benchmarks/judge_throughput.py \
      --judge=runs/demo/judge/export/judge --batch=32
  JAX_PLATFORMS=cpu .venv/bin/python benchmarks/judge_throughput.py \
      --judge=runs/judge_decompose/export/judge --batch=32 --verdict_samples=8
  JAX_PLATFORMS=cpu .venv/bin/python benchmarks/judge_throughput.py --no_scoring \
      --rl_log=runs/rl_t2i_judge.log --baseline_log=runs/rl_t2i.log
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _median_seconds(fn, warmup: int, runs: int) -> float:
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


ITERATION_LINE = re.compile(
  r"iteration (\d+):.*; ([\d.]+)s \(rollout ([\d.]+), reward ([\d.]+) waited ([\d.]+), "
  r"update ([\d.]+)\)"
)


def iteration_times(log_path: str) -> dict:
  """Median seconds per iteration, of its reward scoring and of the wait for it (iterations
  after the first), from an RL run's log."""
  rows = []
  with open(log_path) as f:
    for line in f:
      m = ITERATION_LINE.search(line)
      if m and int(m.group(1)) > 1:
        rows.append([float(g) for g in m.groups()[1:]])
  if not rows:
    raise SystemExit(f"error: no RL iteration lines in {log_path!r}")
  total, rollout, reward, waited, update = (statistics.median(c) for c in zip(*rows))
  return {
    "iterations": len(rows),
    "iteration_s": total,
    "rollout_s": rollout,
    "reward_s": reward,
    "waited_s": waited,
    "update_s": update,
    "reward_share": reward / total,
    "waited_share": waited / total,
  }


def _random_judge(max_cot_tokens: int):
  import jax
  import jax.numpy as jnp

  from configs import judge as judge_config
  from qwen_image_rl.judges import vlm_judge as V
  from qwen_image_rl.trainers import reward_sft

  config = judge_config.get_config("tiny")
  tokenizer = V.build_judge_tokenizer(tempfile.mkdtemp())
  model = reward_sft.build_model(config, tokenizer)
  params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  return V.VLMJudge(
    model, params, tokenizer, reward_sft.build_processor(config), max_cot_tokens=max_cot_tokens
  )


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--judge", default="", help="reward_sft export (default: random tiny)")
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--max_cot_tokens", type=int, default=40)
  parser.add_argument(
    "--verdict_samples", type=int, default=-1, help="decomposing judges (-1: exported value)"
  )
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--runs", type=int, default=3)
  parser.add_argument("--rl_log", default="", help="log of an RL run on the judge")
  parser.add_argument("--baseline_log", default="", help="log of the same RL run on the oracle")
  parser.add_argument("--no_scoring", action="store_true", help="only the RL log figures")
  args = parser.parse_args()
  result = {}
  if args.rl_log:
    result["rl"] = iteration_times(args.rl_log)
    if args.baseline_log:
      result["rl_oracle"] = iteration_times(args.baseline_log)
      result["rl_iteration_over_oracle"] = (
        result["rl"]["iteration_s"] / result["rl_oracle"]["iteration_s"]
      )
  if args.no_scoring:
    print(json.dumps(result), flush=True)
    return

  from qwen_image_rl.judges import judge_data as D
  from qwen_image_rl.judges.vlm_judge import VLMJudge

  judge = (
    VLMJudge.load(args.judge, max_cot_tokens=args.max_cot_tokens, batch_size=args.batch)
    if args.judge
    else _random_judge(args.max_cot_tokens)
  )
  judge.batch_size = args.batch
  if args.verdict_samples >= 0:
    judge.verdict_samples = args.verdict_samples
  data = D.t2i_set(11, args.batch // 2 + args.batch % 2, "val", 64)
  images, prompts = data.images[: args.batch], list(data.prompts[: args.batch])
  result.update(
    judge=args.judge or "random configs/judge.py:tiny",
    batch=args.batch,
    max_cot_tokens=args.max_cot_tokens,
    decompose=judge.decompose,
    verdict_samples=judge.verdict_samples if judge.decompose else None,
  )
  for mode in ("no_cot", "cot"):
    last = {}

    def call():
      last["out"] = judge.score("alignment", images, prompts, cot=mode == "cot")

    seconds = _median_seconds(call, args.warmup, args.runs)
    result[f"{mode}/seconds_per_batch"] = seconds
    result[f"{mode}/images_per_s"] = args.batch / seconds
    result[f"{mode}/invalid"] = last["out"].invalid_count
  result["cot_over_no_cot_time"] = (
    result["cot/seconds_per_batch"] / result["no_cot/seconds_per_batch"]
  )
  print(json.dumps(result), flush=True)


if __name__ == "__main__":
  main()
