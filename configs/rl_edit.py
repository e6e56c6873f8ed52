"""RL for editing from the tiny base with a forward-process objective (beyond the paper).

  python -m qwen_image_rl.main --config=configs/rl_edit.py:tiny --workdir=runs/demo/rl_edit \
      --config.init_from=runs/demo/base/export/pipeline

configs/grpo_edit.py:tiny (rewards, weights, evaluation) with rl_t2i's objective settings, and
shaping of the near-constant edit rewards: preservation enters as the penalty
-max(0, 0.9 - R) (no reward for "preserving more" than the threshold), identity only in groups
where the oracle read a face (some identity score >= 0.2).

'placebo' is the control run: the same with advantages shuffled within each prompt group
(rl.placebo), so its held-out change is what the optimiser's noise alone does to the base.
"""

from configs import grpo_edit, rl_t2i


def get_config(arg: str = "tiny"):
  if arg not in ("tiny", "placebo"):
    raise ValueError(f"configs/rl_edit.py: unknown variant {arg!r}; known: ['tiny', 'placebo']")
  c = rl_t2i.forward_rl(grpo_edit.get_config("tiny"))
  c.rl.shaping.update(dict(preservation_threshold=0.9, identity_floor=0.2))
  c.rl.placebo = arg == "placebo"
  c.total_steps = 40
  return c
