"""Checks of `config.rl` before anything is built: one home for the rules the RL trainers share.

`check_rollout` is what every trainer that rolls out the base policy needs (grpo, curate);
`check_update` adds what the grpo trainer's updates need. Both raise ConfigError naming the
field.
"""

from __future__ import annotations

from qwen_image_rl import config_lib, precision
from qwen_image_rl.config_lib import ConfigError
from qwen_image_rl.data import prompt_files, world
from qwen_image_rl.rl import objectives, reward_setup
from qwen_image_rl.rl.objectives import awm, forward, nft, raft
from qwen_image_rl.rl.objectives.grpo import OLD_LOG_PROBS
from qwen_image_rl.rl.policy import DTYPES
from qwen_image_rl.rl.rollout import CFG_MODES
from qwen_image_rl.rl.timesteps import STRATEGIES, validate_timestep_config
from qwen_image_rl.sampling.sde import SDE_TYPES

TASKS = ("t2i", "edit")


def check_prompts(config, weights) -> None:
  """The prompt set exists and every category it holds has reward weights."""
  rl = config.rl
  if config.data.prompt_file:
    try:
      if rl.task == "edit":
        records = [r for r, _ in prompt_files.read_edit_prompt_file(config.data.prompt_file)]
      else:
        records = prompt_files.read_prompt_file(config.data.prompt_file)
    except (OSError, ValueError) as e:
      raise ConfigError(f"config.data.prompt_file: {e}") from e
    reward_setup.check_categories_covered(
      weights, [r.category for r in records], f"config.data.prompt_file={config.data.prompt_file}"
    )
  elif config.data.num_prompts < 1:
    raise ConfigError(
      f"config.data.num_prompts={config.data.num_prompts}: the prompt set is "
      f"empty (set it > 0 or give config.data.prompt_file)"
    )
  else:
    reward_setup.check_categories_covered(weights, world.CATEGORIES, "the tiny world")
  check_encoded_prompts(config)


def check_encoded_prompts(config) -> None:
  """data.encoded_prompts (no text encoder loaded) needs a T2I run without evaluation, which
  encodes its own held-out prompts."""
  path = config.data.get("encoded_prompts", "")
  if not path:
    return
  if config.rl.task != "t2i":
    raise ConfigError(
      f"config.data.encoded_prompts is for rl.task='t2i' (got {config.rl.task!r}): edit "
      "instructions are encoded with their source images"
    )
  cfg = config.get("eval", None)
  if cfg is not None and (cfg.get("num_t2i", 0) > 0 or cfg.get("num_edits", 0) > 0):
    raise ConfigError(
      "config.data.encoded_prompts loads no text encoder, but evaluation encodes its own "
      "prompts: set eval.num_t2i = eval.num_edits = 0 or leave data.encoded_prompts empty"
    )


def check_rollout(config) -> None:
  """Task, group size, CFG, reward weights, model dtype and the prompt set."""
  rl = config.rl
  config_lib.check_choice(config, "rl.task", TASKS)
  if not isinstance(rl.group_size, int) or rl.group_size < 2:
    raise ConfigError(
      f"config.rl.group_size={rl.group_size!r}: GRPO needs at least 2 rollouts "
      f"per prompt (advantages are normalised within each group)"
    )
  config_lib.check_positive(config, "rl.prompts_per_step", "rl.num_steps")
  config_lib.check_choice(config, "rl.cfg_mode", CFG_MODES)
  if rl.cfg_mode != "none" and not rl.cfg_scale > 1.0:
    raise ConfigError(
      f"config.rl.cfg_scale={rl.cfg_scale}: must be > 1 with cfg_mode="
      f"{rl.cfg_mode!r} (or use cfg_mode='none')"
    )
  weights = reward_setup.category_weights(config)
  config_lib.check_choice(config, "model.dtype", DTYPES)
  if "master_weights" in config.model:
    config_lib.check_choice(config, "model.master_weights", precision.SETTINGS)
  check_prompts(config, weights)


def check_update(config) -> None:
  """The objective, the trained timesteps, chunks, micro-batches and the loss settings."""
  rl = config.rl
  config_lib.check_choice(config, "rl.objective", objectives.names())
  config_lib.check_choice(config, "rl.old_log_probs", OLD_LOG_PROBS)
  ts = rl.timesteps
  config_lib.check_choice(config, "rl.timesteps.strategy", STRATEGIES)
  try:
    validate_timestep_config(
      ts.strategy,
      ts.num_train,
      ts.first_m,
      rl.num_steps,
      window_start=ts.window_start,
      slide_every=ts.slide_every,
      where="config.rl.timesteps",
    )
  except ValueError as e:
    raise ConfigError(str(e)) from e
  config_lib.check_positive(config, "rl.inner_updates", "rl.rollout_chunks", "rl.clip_eps")
  if rl.prompts_per_step % rl.rollout_chunks:
    raise ConfigError(
      f"config.rl.rollout_chunks={rl.rollout_chunks} must divide "
      f"config.rl.prompts_per_step={rl.prompts_per_step}"
    )
  batch = rl.prompts_per_step * rl.group_size
  if rl.micro_batch_size is not None and (rl.micro_batch_size < 1 or batch % rl.micro_batch_size):
    raise ConfigError(
      f"config.rl.micro_batch_size={rl.micro_batch_size} must divide the batch "
      f"prompts_per_step * group_size = {batch}"
    )
  if rl.kl_beta < 0:
    raise ConfigError(f"config.rl.kl_beta={rl.kl_beta} must be >= 0")
  check_objective_settings(config)
  if not rl.noise_level > 0:
    raise ConfigError(
      f"config.rl.noise_level={rl.noise_level} must be > 0 (the SDE's a; 0 "
      f"makes the trained steps deterministic and their log-probs undefined)"
    )


ADVANTAGE_STDS = ("group", "batch")


def check_objective_settings(config) -> None:
  """Advantage normalisation, the forward-process objectives' draws and settings."""
  rl = config.rl
  if "sde_type" in rl:
    config_lib.check_choice(config, "rl.sde_type", SDE_TYPES)
  if "advantage_std" in rl:
    config_lib.check_choice(config, "rl.advantage_std", ADVANTAGE_STDS)
  if rl.get("sde_type", "flow_grpo") == "cps":
    check_cps(config)
  if objectives.get(rl.objective).records != "final_latents":
    return
  if rl.shared_initial_noise:
    raise ConfigError(
      f"config.rl.shared_initial_noise=True with rl.objective={rl.objective!r}: "
      f"its rollout is the deterministic ODE, so rollouts sharing x_T are "
      f"identical and every advantage is 0; set it to False"
    )
  if not isinstance(rl.get("fm_draws", 4), int) or rl.get("fm_draws", 4) < 1:
    raise ConfigError(f"config.rl.fm_draws={rl.get('fm_draws')!r} must be an integer >= 1")
  if "fm_time" in rl:
    config_lib.check_choice(config, "rl.fm_time", forward.TIME_SAMPLING)
  if rl.objective == "nft":
    s = nft.settings(rl)
    if not s["beta"] > 0.0 or not s["adv_max"] > 0:
      raise ConfigError(f"config.rl.nft: beta={s['beta']} and adv_max={s['adv_max']} must be > 0")
    try:
      nft.wrap_optimizer(None, rl)
    except ValueError as e:
      raise ConfigError(f"config.rl.nft: {e}") from e
  if rl.objective == "raft":
    s = raft.settings(rl)
    if not 1 <= s["top_k"] <= rl.group_size:
      raise ConfigError(
        f"config.rl.raft.top_k={s['top_k']}: must be in [1, rl.group_size={rl.group_size}]"
      )
  if rl.objective == "awm":
    s = awm.settings(rl)
    if not s["clip"] > 0 or s["weighting"] not in awm.WEIGHTINGS:
      raise ConfigError(
        f"config.rl.awm: clip={s['clip']} must be > 0 and weighting="
        f"{s['weighting']!r} one of {awm.WEIGHTINGS}"
      )


def check_cps(config) -> None:
  """CPS: a noise level a in (0, 1] and no trained step that ends at t' = 0 (std s = 0 there)."""
  rl = config.rl
  if not 0.0 < rl.noise_level <= 1.0:
    raise ConfigError(
      f"config.rl.noise_level={rl.noise_level}: with rl.sde_type='cps' it is a "
      f"in s = t' sin(a pi / 2) and must lie in (0, 1]"
    )
  ts = rl.timesteps
  last_trainable = rl.num_steps if ts.first_m is None else ts.first_m
  if ts.strategy == "all" or last_trainable >= rl.num_steps:
    raise ConfigError(
      f"config.rl.timesteps: with rl.sde_type='cps' the last step (to t' = 0, "
      f"std 0) cannot be trained; set first_m < num_steps={rl.num_steps}"
    )
