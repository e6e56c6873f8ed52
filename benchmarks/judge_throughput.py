"""Judge throughput: images scored per second with and without chain of thought (CPU).

Loads a judge exported by reward_sft (or builds the configs/judge.py:tiny model with random
weights when --judge is not given; a random judge rarely emits the score marker, so its CoT
rows run the full --max_cot_tokens, the worst case), scores --batch held-out alignment images
per call, and reports the median of --runs calls after --warmup (jit compile excluded), the
CoT / no-CoT time ratio, and the invalid count of the CoT runs.

  JAX_PLATFORMS=cpu .venv/bin/python benchmarks/judge_throughput.py \
      --judge=runs/demo/judge/export/judge --batch=32
"""

from __future__ import annotations

import argparse
import json
import os
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
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--runs", type=int, default=3)
  args = parser.parse_args()

  from qwen_image_rl.judges import judge_data as D
  from qwen_image_rl.judges.vlm_judge import VLMJudge

  judge = (
    VLMJudge.load(args.judge, max_cot_tokens=args.max_cot_tokens, batch_size=args.batch)
    if args.judge
    else _random_judge(args.max_cot_tokens)
  )
  judge.batch_size = args.batch
  data = D.t2i_set(11, args.batch // 2 + args.batch % 2, "val", 64)
  images, prompts = data.images[: args.batch], list(data.prompts[: args.batch])
  result = {
    "judge": args.judge or "random configs/judge.py:tiny",
    "batch": args.batch,
    "max_cot_tokens": args.max_cot_tokens,
  }
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
