"""GRPO for editing from the tiny base (the paper's edit RL run: instruction following + face ID).

  python -m qwen_image_rl.main --config=configs/grpo_edit.py:tiny --workdir=runs/demo/grpo_edit \
      --config.init_from=runs/demo/base/export/pipeline

Rewards: instruction_following + identity (the paper's edit pair) + preservation of what the
instruction did not touch. Without preservation the tiny run hacked instruction following
(measured from an earlier base: held-out preservation 0.823 -> 0.448 in 50 iterations). Portrait
edits weight identity; other edits leave it out (weight 0).
Measured from the demo's base (README "GRPO on the tiny base"): held-out instruction following
0.407 -> 0.408 after 60 iterations (0.432 in an earlier run, 0.409 after 100), preservation
0.911 -> 0.943, identity 0.060 -> 0.078; the issue's +0.10 is not reached.
'qwen_image_edit' is the full-size 20B setup (bf16, FSDP, remat) and needs real weights.
"""

from configs import grpo_t2i

EDIT_WEIGHTS = {
    "general": {"instruction_following": 0.7, "preservation": 0.3},
    "typography": {"instruction_following": 0.7, "preservation": 0.3},
    "portrait": {"instruction_following": 0.5, "identity": 0.3, "preservation": 0.2},
    "landscape": {"instruction_following": 0.7, "preservation": 0.3},
}


def get_config(arg: str = "tiny"):
  if arg not in ("tiny", "qwen_image_edit"):
    raise ValueError(f"configs/grpo_edit.py: unknown variant {arg!r}; known: ['tiny', "
                     f"'qwen_image_edit']")
  c = grpo_t2i.get_config("tiny" if arg == "tiny" else "qwen_image")
  c.rl.task = "edit"
  c.rl.category_weights = EDIT_WEIGHTS
  c.rewards.names = ("instruction_following", "identity", "preservation")
  c.data.num_prompts = 1024
  c.data.max_text_tokens = 32  # edit instructions are short (<= 14 tokens in the tiny world)
  if arg == "tiny":
    c.total_steps = 60  # measured: instruction following peaks near 60 iterations (README)
    c.eval.update(dict(num_t2i=0, num_edits=64))  # an edit policy: held-out edits only
  if arg == "qwen_image_edit":
    c.init_from = "/ckpt/Qwen-Image-Edit"
    c.rl.noise_level = 1.0  # Flow-GRPO qwenimage edit configs use 1.0-1.5
  return c
