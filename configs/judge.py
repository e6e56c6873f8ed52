"""Tiny multi-task VLM judge for the judge_* rewards (reward_sft trainer).

  python -m qwen_image_rl.main --config=configs/judge.py:tiny --workdir=runs/demo/judge
  python -m qwen_image_rl.main --config=configs/judge.py:tiny_pairwise \
      --workdir=runs/demo/judge_pairwise
  python -m qwen_image_rl.judge_eval --judge=runs/demo/judge/export/judge --split=val

Variants: tiny (pointwise: CoT SFT + expected-score regression, the paper's judge),
tiny_pairwise (Bradley-Terry on oracle-ordered pairs, same backbone and images; the paper's
ablation), tiny_describe (pointwise; the alignment chain of thought describes the image before
its verdicts, the instruction one the source and the output), tiny_describe_first (pointwise;
the judge first captions each image in a separate "Describe the image." pass, which cannot copy
the prompt, and the alignment and instruction prompts carry that caption: training shows the
true scene's caption there; `--config.language.steps=N` first trains its language model to
compare prompts with captions of renders, text alone), tiny_checklist (pointwise; the
alignment chain of thought goes through the prompt's items one by one, "small red circle good.
top left poor.", each a lookup in the image), tiny_decompose (tiny_checklist whose alignment
items come from the judge's own text-only decomposition of the prompt, "List the items of the
prompt.", then each gets the judge's verdict; VLMJudge.items_of). Add base-model samples with
--config.data.samples_from=runs/demo/base/export/pipeline.
"""

import ml_collections

from configs import common
from qwen_image_rl.judges import judge_data

VARIANTS = (
  "tiny",
  "tiny_pairwise",
  "tiny_describe",
  "tiny_describe_first",
  "tiny_checklist",
  "tiny_decompose",
)
CHECKLISTS = ("tiny_checklist", "tiny_decompose")


def get_config(arg: str = "tiny"):
  if arg not in VARIANTS:
    raise ValueError(f"configs/judge.py: unknown variant {arg!r}; known: {list(VARIANTS)}")
  c = common.base()
  c.trainer = "reward_sft"
  c.total_steps = 400
  c.model = ml_collections.ConfigDict(
    dict(
      text=dict(
        hidden_size=96,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_theta=1e4,
        mrope_section=(4, 4, 4),
      ),
      # 4-pixel patches merged 4x4: a 64-pixel image is 16 tokens; one window covers it. (With
      # 8-pixel patches the tower cannot learn to see pixel noise; README, learned rewards.)
      vision=dict(
        depth=2,
        hidden_size=64,
        intermediate_size=128,
        num_heads=2,
        patch_size=4,
        spatial_merge_size=4,
        temporal_patch_size=2,
        window_size=64,
        fullatt_block_indexes=(1,),
      ),
    )
  )
  c.data = ml_collections.ConfigDict(
    dict(
      image_size=64,
      n_specs=1024,
      n_edits=512,
      variants=2,
      t2i_batch_size=24,
      edit_batch_size=8,
      no_cot_fraction=0.5,
      caption_batch_size=16,
      # Text-only "List the items of the prompt." examples a step (decompose judges).
      decompose_batch_size=16 if arg == "tiny_decompose" else 0,
      # One-item alignment checklists a step, the loss on the verdict (decompose judges; at
      # 1600 steps the verdicts still approve every item, README "Decompose, then check").
      drill_batch_size=16 if arg == "tiny_decompose" else 0,
      # Half the drills of items the oracle calls good, half of the rest (74% are good).
      drill_balance=False,
      samples_from="",
      # Alignment CoTs describe the image (judge_data.describe) before the verdicts, instruction
      # CoTs the source and the output.
      describe_in_cot=arg == "tiny_describe",
      # Alignment CoTs: a verdict per oracle dimension ('dims'), or per item of the prompt
      # ('checklist': "small red circle good. top left poor. ...", judge_data.alignment_items).
      cot_style="checklist" if arg in CHECKLISTS else "dims",
      # Scales each image variant's share of the mix (judge_data.VARIANT_PROBS).
      variant_weights=dict.fromkeys(judge_data.VARIANTS, 1.0),
      task_weights=dict(alignment=0.45, aesthetics=0.3, portrait=0.25),
    )
  )
  c.loss = ml_collections.ConfigDict(
    dict(
      kind="pairwise" if arg == "tiny_pairwise" else "pointwise",
      score_mse_weight=1.0,
      min_margin=0.02,
      caption_weight=1.0,
      decompose_weight=1.0,
      drill_weight=1.0,
    )
  )
  # The vision tower first learns to see (judges/perception.py; 0 steps skips it), then stays
  # fixed: fine-tuned with the judge it forgets (README, learned rewards).
  c.perception = ml_collections.ConfigDict(
    dict(
      steps=400,
      batch_size=64,
      lr=2e-3,
      n_images=4096,
      balance_groups=True,
      freeze_tower=True,
      # Also targets that bind attributes to objects and places (perception.bound_words); at
      # 400 steps no better judge (alignment 0.25 vs 0.27, README "What the tower alone reads").
      bound_targets=False,
      # The words' head scores each image token against a word embedding the language model
      # then starts from (perception.GroundedPerceptionModel): image tokens look like the words
      # they show.
      grounded=False,
      # Also per-token targets: each image token the words of the objects it shows, read by a
      # linear head shared by the tokens (judges/dense_targets.py), weighted as one more group.
      dense_targets=False,
      dense_weight=1.0,
      # The language model's embeddings of those words start as the directions in which the
      # per-token head reads them (needs dense_targets).
      dense_embeddings=False,
    )
  )
  # Longest training CoT + marker, in tokens: about 30 (verdicts; edits restate the instruction),
  # 99 with descriptions (an edit's CoT describes its source and its output), 39 checklists.
  c.judge = ml_collections.ConfigDict(
    dict(
      max_cot_tokens={"tiny_describe": 112, "tiny_checklist": 48, "tiny_decompose": 48}.get(
        arg, 40
      ),
      # Alignment and instruction prompts carry the judge's own caption of each image, written
      # in a separate pass before it judges (VLMJudge.describe_first); captions run to ~50 tokens.
      describe_first=arg == "tiny_describe_first",
      max_caption_tokens=64,
      # Alignment checklists over the judge's own items of the prompt (a text-only first pass,
      # at most max_item_tokens tokens); verdicts greedy (0) or the mean over that many sampled
      # checklists (VLMJudge._checklists).
      decompose=arg == "tiny_decompose",
      max_item_tokens=48,
      verdict_samples=0,
      # Verdicts read item by item, each after its phrase alone (as the drills train them).
      independent_items=arg == "tiny_decompose",
    )
  )
  # describe_first judges: the language model can first learn to compare the prompt with the
  # description of a render, text alone (reward_sft.pretrain_language; 0 steps skips it). Off:
  # 2000 steps (45 min) left the comparison unlearnt and the judge worse (README).
  c.language = ml_collections.ConfigDict(dict(steps=0, batch_size=32, lr=2e-3))
  # Before reward SFT, the language model can first learn to look items up in the image from
  # balanced item drills alone (reward_sft.pretrain_lookup; 0 steps skips it), its held-out
  # AUC logged on that many val specs' drills (held_out_batches of batch_size). fresh_scenes:
  # each step's drills on newly drawn scenes (a fixed set's are learnt by heart: README);
  # exact_renders: only images without pixel or face corruption, whose verdicts are the
  # content's (on the others the oracle's also read its detectors' failures).
  c.lookup = ml_collections.ConfigDict(
    dict(
      steps=0,
      batch_size=32,
      lr=2e-3,
      held_out_specs=128,
      held_out_batches=8,
      fresh_scenes=True,
      exact_renders=True,
    )
  )
  c.optim.lr = 2e-3
  c.optim.warmup_steps = 30
  c.optim.schedule = "cosine"
  c.checkpoint.every = 100
  c.log.every = 20
  return c
