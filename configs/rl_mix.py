"""The Mix-RL baseline (paper sec. 7): one GRPO run on T2I and edit prompts with all rewards.

  python -m qwen_image_rl.main --config=configs/rl_mix.py:tiny --workdir=runs/rl_mix \
      --config.init_from=runs/demo/base/export/pipeline

Each task keeps its teacher's settings (configs/grpo_t2i.py, configs/grpo_edit.py): prompts,
rollouts, rewards (alignment, aesthetics, portrait / instruction_following, identity,
preservation) and category weights. Iterations are routed per task (trainers/rl_mix.py). The
rollout budget equals the two teachers' together: total_steps = 120 + 60 iterations of 64
rollouts, T2I on 120 / 180 of them.

Results: README "On-policy distillation".
"""

import ml_collections

from configs import common, grpo_edit, grpo_t2i


def get_config(arg: str = "tiny"):
  if arg != "tiny":
    raise ValueError(f"configs/rl_mix.py: unknown variant {arg!r}; known: ['tiny']")
  t2i, edit = grpo_t2i.get_config("tiny"), grpo_edit.get_config("tiny")
  c = common.base()
  c.trainer = "rl_mix"
  c.init_from = t2i.init_from
  c.model = t2i.model
  c.tasks = ml_collections.ConfigDict(
    {
      task: dict(rl=src.rl, rewards=src.rewards, data=src.data)
      for task, src in (("t2i", t2i), ("edit", edit))
    }
  )
  c.total_steps = t2i.total_steps + edit.total_steps  # the teachers' rollouts together
  c.mix = ml_collections.ConfigDict(
    dict(t2i_fraction=t2i.total_steps / c.total_steps, route_block=1)
  )
  c.max_consecutive_nonfinite = 3
  c.optim = t2i.optim
  c.checkpoint = t2i.checkpoint
  c.log = t2i.log
  c.eval = common.tiny_eval()  # both tasks
  c.eval.every = 0
  c.eval.at_start = False
  return c
