"""Prompt curation by intra-group reward range (Qwen-Image-2.0-RL sec. 4), on the tiny base.

  python -m qwen_image_rl.main --config=configs/curate.py:tiny --workdir=runs/demo/curate \
      --config.init_from=runs/demo/base/export/pipeline

Writes WORKDIR/curated_prompts.jsonl (use it with grpo_t2i via
--config.data.prompt_file=runs/demo/curate/curated_prompts.jsonl) and results/curation.json.
More in README "GRPO on the tiny base".
"""

from configs import grpo_t2i


def get_config(arg: str = "tiny"):
  if arg not in ("tiny",):
    raise ValueError(f"configs/curate.py: unknown variant {arg!r}; known: ['tiny']")
  c = grpo_t2i.get_config("tiny")
  c.trainer = "curate"
  c.data.num_prompts = 256
  c.rl.prompts_per_step = 32  # prompts sampled per batch
  c.rl.num_steps = 20  # ODE steps with CFG
  return c
