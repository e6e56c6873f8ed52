"""The RL loop's pluggable parts: the objectives registry, the config field that names one, and
the ODE-only rollout a forward-process objective asks for (records='final_latents')."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import grpo_t2i
from qwen_image_rl import trainers
from qwen_image_rl.config_lib import ConfigError
from qwen_image_rl.models.mmdit import QwenImageTransformer
from qwen_image_rl.pipelines import common as pipe_common
from qwen_image_rl.rl import objectives
from qwen_image_rl.rl import rollout as rl_rollout
from qwen_image_rl.sampling.schedule import FlowMatchSchedule

IMG = ((1, 4, 4),)
B, S, C, T = 4, 16, 16, 5


def test_registry_lookup_and_duplicates():
  grpo = objectives.get("grpo")
  assert grpo.records == "transitions" and "grpo" in objectives.names()
  with pytest.raises(KeyError, match="unknown RL objective 'dpo'.*awm.*grpo.*nft"):
    objectives.get("dpo")
  with pytest.raises(ValueError, match="registered twice"):
    objectives.register(grpo)
  with pytest.raises(ValueError, match="records="):
    objectives.Objective("bad", "images", grpo.make_step, grpo.make_batch)


def test_config_names_a_registered_objective(tmp_path):
  c = grpo_t2i.get_config("tiny")
  c.init_from = str(tmp_path)
  assert trainers.validate(c).name == "grpo"
  c.rl.objective = "dpo"
  with pytest.raises(ConfigError, match="config.rl.objective='dpo' is not one of"):
    trainers.validate(c)


def test_ode_only_rollout_is_the_pipelines_sampler():
  """No trained steps: nothing recorded, and the rollout integrates exactly what the eval
  pipelines' `denoise` does (one guided-velocity function for both)."""
  model = QwenImageTransformer(
    in_channels=C,
    out_channels=4,
    num_layers=1,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=16,
    axes_dims_rope=(4, 6, 6),
  )
  params = nn.meta.unbox(model.init_params(jax.random.key(0)))
  params = jax.tree.map(lambda p: p + 0.05 * jnp.ones_like(p), params)  # no zero layers
  k = jax.random.split(jax.random.key(1), 3)
  x_T = jax.random.normal(k[0], (B, S, C))
  cond, neg = jax.random.normal(k[1], (B, T, 16)), jax.random.normal(k[2], (B, 3, 16))
  mask = jnp.ones((B, T), jnp.int32).at[0, -2:].set(0)
  neg_mask = jnp.ones((B, 3), jnp.int32)
  sigmas = jnp.asarray(FlowMatchSchedule(shift=3.0).sigmas(5))
  result = rl_rollout.rollout(
    model,
    params,
    x_T,
    cond,
    mask,
    neg,
    neg_mask,
    sigmas,
    np.zeros((0,), np.int32),
    jax.random.key(2),
    cfg_scale=4.0,
    cfg_mode="rollout_only",
    noise_level=0.7,
    img_shapes=IMG,
  )
  assert result.latents_t.shape == (B, 0, S, C) and result.log_probs.shape == (B, 0)
  want = pipe_common.make_denoise(model, IMG)(
    params, x_T, cond, mask, neg, neg_mask, sigmas, jnp.float32(4.0)
  )
  err = float(jnp.max(jnp.abs(result.final_latents - want)))
  assert err <= 1e-6, err
