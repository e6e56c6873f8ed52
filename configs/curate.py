"""Prompt curation by intra-group reward range (Qwen-Image-2.0-RL sec. 4), on the tiny base.

  python -m qwen_image_rl.main --config=configs/curate.py:tiny --workdir=runs/demo/curate \
      --config.init_from=runs/demo/base/export/pipeline
  python -m qwen_image_rl.main --config=configs/curate.py:edit --workdir=runs/demo/curate_edit \
      --config.init_from=runs/demo/base/export/pipeline

'tiny' curates T2I prompts with grpo_t2i's rewards and writes WORKDIR/curated_prompts.jsonl (use
it with grpo_t2i / rl_t2i via --config.data.prompt_file=runs/demo/curate/curated_prompts.jsonl);
'edit' curates the tiny world's edit triples with grpo_edit's rewards, and its file (each record
with its edit triple) feeds grpo_edit / rl_edit the same way. Both write results/curation.json.
More in README "GRPO on the tiny base".
"""

from configs import grpo_edit, grpo_t2i

VARIANTS = ("tiny", "edit")


def get_config(arg: str = "tiny"):
  if arg not in VARIANTS:
    raise ValueError(f"configs/curate.py: unknown variant {arg!r}; known: {list(VARIANTS)}")
  c = (grpo_t2i if arg == "tiny" else grpo_edit).get_config("tiny")
  c.trainer = "curate"
  c.data.num_prompts = 256
  c.rl.prompts_per_step = 32  # prompts sampled per batch
  c.rl.num_steps = 20  # ODE steps with CFG
  return c
