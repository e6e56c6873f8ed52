"""GRPO for text-to-image from the tiny base (Qwen-Image-2.0-RL sec. 1-5).

  python -m qwen_image_rl.main --config=configs/grpo_t2i.py:tiny --workdir=runs/demo/grpo_t2i \
      --config.init_from=runs/demo/base/export/pipeline

Rewards: alignment + aesthetics + portrait (the paper's T2I trio, tiny world oracle analogues),
combined per prompt category (portrait prompts weight the portrait reward more, typography
prompts weight alignment more). Hybrid CFG (CFG at rollout only), a high-noise timestep subset,
GDPO advantages, asynchronous rewards. 'qwen_image' is the full-size 20B setup (bf16, FSDP,
remat) for a 32-chip slice (v5p-32), 'qwen_image_256' the same run laid out for 256 chips
(v6e-256: 32 GiB HBM per chip); both need real weights in config.init_from. Their fit and
compiler-estimated speed: README "Pods" (benchmarks/aot_train_steps.py).

Results, runtime and how the settings were chosen: README "GRPO on the tiny base".
"""

import ml_collections

from configs import common

# Aesthetics is easy to hack (measured: weight 0.3 raised it 0.5 -> 0.95 in 25 iterations while
# the held-out oracle fell 0.244 -> 0.198), so it only breaks ties here.
T2I_WEIGHTS = {
  "general": {"alignment": 0.9, "aesthetics": 0.1, "portrait": 0.0},
  "typography": {"alignment": 0.95, "aesthetics": 0.05, "portrait": 0.0},
  "portrait": {"alignment": 0.6, "aesthetics": 0.05, "portrait": 0.35},
  "landscape": {"alignment": 0.9, "aesthetics": 0.1, "portrait": 0.0},
}


# The learned judge's counterpart of each oracle T2I reward (judges/rewards.py).
JUDGE_REWARDS = {
  "alignment": "judge_alignment",
  "aesthetics": "judge_aesthetics",
  "portrait": "judge_portrait",
}


def with_judge_rewards(c, judge_dir: str, cot: bool = True):
  """The T2I run trained on a learned judge (a reward_sft export, WORKDIR/export/judge) instead
  of the oracle: each oracle reward is replaced by its judge_* counterpart under the same
  category weights, so the held-out evaluation's oracle is never seen by training."""
  c.rewards.names = tuple(JUDGE_REWARDS[n] for n in c.rewards.names)
  c.rewards.kwargs = {n: dict(judge_dir=judge_dir, cot=cot) for n in c.rewards.names}
  c.rl.category_weights = {
    category: {JUDGE_REWARDS[k]: v for k, v in weights.items()}
    for category, weights in c.rl.category_weights.items()
  }
  return c


def rl_section(task: str, weights) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(
    dict(
      task=task,
      objective="grpo",  # a registered RL objective (qwen_image_rl/rl/objectives/)
      group_size=8,  # G rollouts per prompt
      prompts_per_step=8,  # prompt groups per iteration
      rollout_chunks=2,  # chunk n is scored while chunk n + 1 rolls out
      num_steps=10,  # rollout denoising steps N (paper: 40)
      cfg_mode="rollout_only",  # hybrid CFG: 'rollout_only' | 'both' | 'none'
      cfg_scale=4.0,
      negative_prompt="",
      noise_level=0.8,  # the SDE's a in sigma_t = a sqrt(t / (1 - t))
      shared_initial_noise=True,  # the G rollouts of a prompt start from the same x_T
      clip_eps=0.01,
      kl_beta=0.0,
      inner_updates=1,
      # 'auto': a single update takes its own log-probs as the old ones (ratio exactly 1);
      # 'recompute': a separate forward pass first, as more than one update always does.
      old_log_probs="auto",
      micro_batch_size=ml_collections.config_dict.placeholder(int),
      adv_eps=1e-4,
      adv_clip=5.0,
      whiten_advantages=False,
      # 'group': each reward divided by its prompt group's std (GDPO, the paper's Eq. 10);
      # 'batch': centred per group, weighted, then divided by one batch-wide std (Flow-GRPO).
      advantage_std="group",
      # A control run: advantages shuffled within each prompt group before the update, so it
      # trains on noise with the real run's statistics (its held-out change is the drift).
      placebo=False,
      # Shaping of near-constant rewards (0 = off): preservation as -max(0, tau - R); identity
      # weighted only in groups where some sample reaches the floor (a face was read).
      shaping=dict(preservation_threshold=0.0, identity_floor=0.0),
      sde_type="flow_grpo",  # grpo's SDE step: 'flow_grpo' | 'cps' (coefficients-preserving)
      # Forward-process objectives ('nft', 'awm', 'raft'): (t, eps) draws per sample and update, and
      # where t comes from ('schedule': the rollout's sigmas; 'uniform': U(0, 1)).
      fm_draws=4,
      fm_time="schedule",
      nft=dict(
        beta=1.0, adv_max=5.0, old_policy="ema", ema_decay=0.5, ema_ramp=0.001, refresh_every=1
      ),
      awm=dict(clip=5.0, weighting="uniform"),
      raft=dict(top_k=1, min_advantage=0.0),  # flow matching on each group's best rollouts
      async_rewards=True,
      max_consecutive_nonfinite=3,
      timesteps=dict(
        strategy="high_noise",
        num_train=3,
        first_m=5,
        power=1.0,
        window_start=0,
        slide_every=1,
        slide_stride=1,
      ),
      category_weights=weights,
      curation=dict(threshold=0.05, output="curated_prompts.jsonl", bins=20),
    )
  )


def tiny_model() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(
    dict(dtype="float32", master_weights="auto", transformer_overrides={})
  )


def qwen_image_model() -> ml_collections.ConfigDict:
  """The 20B Qwen-Image DiT: bf16 params + compute, scanned and rematerialised layers."""
  return ml_collections.ConfigDict(
    dict(
      dtype="bfloat16",
      master_weights="auto",  # float32 params and AdamW moments, bf16 compute (precision.py)
      transformer_overrides=dict(
        scan_layers=True,
        remat_policy="full",
        attention_query_chunk=1024,
        attention_implementation="flash",
      ),
      # Shapes of the released transformer/config.json, for abstract shapes without weights.
      transformer=dict(
        patch_size=2,
        in_channels=64,
        out_channels=16,
        num_layers=60,
        attention_head_dim=128,
        num_attention_heads=24,
        joint_attention_dim=3584,
        axes_dims_rope=(16, 56, 56),
      ),
    )
  )


VARIANTS = ("tiny", "qwen_image", "qwen_image_256")


def layout_for_256_chips(c):
  """The full-size run on 256 chips: every chip holds one sample of each micro-batch and of each
  rollout chunk (a mesh axis that does not divide a batch replicates it), and the state is
  sharded 256 ways so that it fits v6e's 32 GiB."""
  c.mesh = common.mesh(data=-1, fsdp=256, tensor=1)
  c.rl.rollout_chunks = 2  # 512 / 2 = 256 rollouts per chunk
  c.rl.micro_batch_size = 256
  return c


def get_config(arg: str = "tiny"):
  if arg not in VARIANTS:
    raise ValueError(f"configs/grpo_t2i.py: unknown variant {arg!r}; known: {list(VARIANTS)}")
  c = common.base()
  c.trainer = "grpo"
  c.init_from = "runs/demo/base/export/pipeline"
  c.total_steps = 120  # measured: held-out gains flatten after ~120 iterations
  c.model = tiny_model()
  c.data = ml_collections.ConfigDict(
    dict(image_size=64, max_text_tokens=48, num_prompts=2048, prompt_file="")
  )
  c.rl = rl_section("t2i", T2I_WEIGHTS)
  c.rewards = ml_collections.ConfigDict(
    dict(names=("alignment", "aesthetics", "portrait"), kwargs={})
  )
  c.optim.lr = 1e-4  # measured: 3e-4 (Flow-GRPO's LoRA rate) degrades the tiny base
  c.optim.grad_clip_norm = 1.0
  c.checkpoint.every = 10
  c.log.every = 1
  c.log.progress_every = 5
  c.log.images_every = 10
  c.eval = common.tiny_eval()
  c.eval.num_edits = 0  # a T2I policy: held-out prompts only
  c.eval.every = 0  # before and after only: each eval costs several iterations
  c.eval.at_start = True
  # Micro-batches of 8 samples (24 transitions) keep the update's activations in cache: 1.4x
  # faster than one 64-sample batch on the 2-core CPU, the same gradient to rounding (README,
  # benchmarks/update_micro_batches.py); 4 rollout chunks make the rollout faster than 2.
  c.rl.micro_batch_size = 8
  c.rl.rollout_chunks = 4
  if arg.startswith("qwen_image"):
    c.init_from = "/ckpt/Qwen-Image"
    c.model = qwen_image_model()
    c.mesh = common.mesh(data=-1, fsdp=8, tensor=1)
    c.data.image_size = 1024
    c.data.max_text_tokens = 512
    c.data.num_prompts = 0
    c.data.prompt_file = ""  # set to the curated .jsonl; empty -> tiny world prompts
    c.data.num_prompts = 4096
    c.rl.group_size = 16  # Flow-GRPO's Qwen-Image configs
    c.rl.prompts_per_step = 32
    c.rl.rollout_chunks = 8
    c.rl.num_steps = 40  # paper: 40-step rollouts
    c.rl.noise_level = 1.2  # Flow-GRPO qwenimage T2I
    c.rl.clip_eps = 1e-4
    c.rl.inner_updates = 1
    c.rl.micro_batch_size = 16
    c.rl.timesteps.update(dict(strategy="high_noise", num_train=6, first_m=16))
    c.total_steps = 1000
    c.optim.lr = 1e-5
    c.optim.warmup_steps = 20
    c.checkpoint.every = 20
    c.log.images_every = 50
    c.eval.every = 100
    c.eval.at_start = False
    c.eval.num_t2i = 0
    c.eval.num_edits = 0
  if arg == "qwen_image_256":
    layout_for_256_chips(c)
  return c
