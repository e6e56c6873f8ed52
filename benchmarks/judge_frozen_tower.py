"""Judge training speed with the frozen tower's backward pass skipped, against computing it.

  python benchmarks/judge_frozen_tower.py [--steps=60] [--variant=tiny_checklist]

reward_sft keeps the pre-trained vision tower fixed (`perception.freeze_tower`): only its merger
learns. The tower is built with `merger_gradients_only` (the blocks' output under
stop_gradient), so XLA drops the blocks' backward pass; before, their gradients were computed
and then zeroed. Each setting trains the variant for --steps steps (2 perception steps, 128
specs, in a fresh temporary workdir, one after the other in child processes) and reports the
median of the trainer's own steps/s readings (every 20 steps, compile excluded) and the final
loss. The losses differ a little: the gradient clip's global norm no longer counts the tower's
(discarded) gradients.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile

import numpy as np

RATE = re.compile(r"step \d+/\d+ \([\d.]+%\), ([\d.]+) steps/s")


def child(variant: str, steps: int, merger_only: bool, workdir: str) -> None:
  from configs import judge
  from qwen_image_rl import main
  from qwen_image_rl.trainers import reward_sft

  if not merger_only:  # the tower as before: every block's gradient computed, then zeroed
    build = reward_sft.build_model
    reward_sft.build_model = lambda c, t: (
      lambda m: m.clone(visual=m.visual.clone(merger_gradients_only=False))
    )(build(c, t))
  c = judge.get_config(variant)
  c.total_steps = steps
  c.perception.update(steps=2, n_images=64)
  c.data.update(n_specs=128, n_edits=64)
  c.checkpoint.every, c.log.every = 10 * steps, 20
  history = main.run(c, workdir)
  print(f"FINAL_LOSS {history[-1]['loss']:.6f}", flush=True)


def run(variant: str, steps: int, merger_only: bool) -> dict:
  with tempfile.TemporaryDirectory() as workdir:
    args = [sys.executable, __file__, f"--variant={variant}", f"--steps={steps}"]
    args += [f"--child={'merger' if merger_only else 'all'}", f"--workdir={workdir}"]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
  rates = [float(r) for r in RATE.findall(out)]
  loss = re.search(r"FINAL_LOSS ([\d.eE+-]+)", out)
  return {
    "steps_per_s": round(float(np.median(rates)), 3),
    "readings": rates,
    "final_loss": float(loss.group(1)),
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=60)
  parser.add_argument("--variant", default="tiny_checklist")
  parser.add_argument("--child", choices=("merger", "all"), default=None, help=argparse.SUPPRESS)
  parser.add_argument("--workdir", default="", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    child(args.variant, args.steps, args.child == "merger", args.workdir)
    return
  results = {
    "merger_gradients_only": run(args.variant, args.steps, True),
    "all_gradients": run(args.variant, args.steps, False),
  }
  results["speedup"] = round(
    results["merger_gradients_only"]["steps_per_s"] / results["all_gradients"]["steps_per_s"], 3
  )
  print(results, flush=True)


if __name__ == "__main__":
  main()
