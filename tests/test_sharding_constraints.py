"""Activation sharding constraints reach the compiled program of every jitted entry point.

Each test lowers one function the trainers run (the MMDiT forward, the GRPO rollout, the GRPO
train step) on an 8-device data2 x fsdp2 x tensor2 mesh under `parallel.sharding_context` and
reads the constraints from the lowered text. With the mesh entered as a context manager
(deprecated in jax 0.10) flax sees no mesh and drops every one of them (0 constraints), with no
change in the results, which is why only the program text can tell.
"""

import collections
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qwen_image_rl import parallel
from qwen_image_rl.models.mmdit import QwenImageTransformer
from qwen_image_rl.rl import rollout as rl_rollout
from qwen_image_rl.rl.objectives import grpo
from qwen_image_rl.train_state import TrainState

RULES = parallel.DEFAULT_LOGICAL_AXIS_RULES
B, S, C, T, K, N = 8, 16, 16, 6, 2, 4
IMG = ((1, 4, 4),)
BATCH = '{"fsdp", "data"}'  # act_batch under the default rules
HEADS = '{"tensor"}'  # act_heads


def constraint_specs(text: str) -> collections.Counter:
  """Per-dimension mesh axes of every sharding constraint in a lowered program."""
  return collections.Counter(re.findall(r"sdy\.sharding_constraint %\S+ <@mesh, \[(.*?)\]>", text))


@pytest.fixture(scope="module")
def mesh():
  return parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})


@pytest.fixture(scope="module")
def model():
  return QwenImageTransformer(
    in_channels=C,
    out_channels=4,
    num_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=16,
    axes_dims_rope=(4, 6, 6),
  )


@pytest.fixture(scope="module")
def params(model):
  return nn.meta.unbox(model.init_params(jax.random.key(0)))


def _text(x, d=16):
  return jnp.zeros((x, T, d)), jnp.ones((x, T), jnp.int32)


def test_mmdit_forward_keeps_activation_constraints(mesh, model, params):
  cond, mask = _text(B)
  fwd = jax.jit(lambda p, x, c, m, t: model.apply({"params": p}, x, c, m, t, IMG))
  args = (params, jnp.zeros((B, S, C)), cond, mask, jnp.zeros((B,)))
  with parallel.sharding_context(mesh, RULES):
    specs = constraint_specs(fwd.lower(*args).as_text())
  # Per block: the image and text streams' [B, L, D] activations and the [B, L, H, D] heads.
  assert specs[f"{BATCH}, {{}}, {{}}"] >= 2 * model.num_layers, specs
  assert specs[f"{BATCH}, {{}}, {HEADS}, {{}}"] >= 2 * model.num_layers, specs
  with parallel.sharding_context(None, RULES):  # no mesh: nothing to constrain against
    assert not constraint_specs(fwd.lower(*args).as_text())


def test_rollout_keeps_latent_constraints(mesh, model, params):
  cond, mask = _text(B)
  fn = rl_rollout.jitted_rollout(model, IMG, True)
  args = (
    params,
    jnp.zeros((B, S, C)),
    cond,
    mask,
    cond,
    mask,
    jnp.linspace(1.0, 0.0, N + 1),
    jnp.arange(K, dtype=jnp.int32),
    jax.random.key(0),
    jnp.float32(4.0),
    jnp.float32(0.7),
    None,
  )
  with parallel.sharding_context(mesh, RULES):
    specs = constraint_specs(fn.lower(*args).as_text())
  assert specs[f"{BATCH}, {{}}, {{}}"] >= 1, specs  # the carried latent x_t
  assert specs[f"{BATCH}, {{}}, {{}}, {{}}"] >= 2, specs  # the [B, K, S, C] transition buffers
  assert specs[f"{BATCH}, {{}}, {HEADS}, {{}}"] >= 2 * model.num_layers, specs  # the DiT inside


def test_grpo_train_step_keeps_constraints(mesh, model, params):
  tx = optax.adam(1e-4)
  state = TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    opt_state=tx.init(params),
    rng=jax.random.key_data(jax.random.key(0)),
  )
  cond, mask = _text(B)
  batch = dict(
    latents_t=jnp.zeros((B, K, S, C)),
    latents_next=jnp.zeros((B, K, S, C)),
    sigmas=jnp.full((B, K), 0.5),
    sigmas_next=jnp.full((B, K), 0.4),
    cond=cond,
    mask=mask,
    advantages=jnp.asarray(np.linspace(-1, 1, B), jnp.float32),
  )
  step = jax.jit(
    grpo.make_grpo_train_step(
      model,
      tx,
      RULES,
      micro_batch_size=4,
      cfg_mode="rollout_only",
      clip_eps=1e-3,
      noise_level=0.7,
      img_shapes=IMG,
    )
  )
  with parallel.sharding_context(mesh, RULES):
    specs = constraint_specs(step.lower(state, batch).as_text())
  assert specs[f"{BATCH}, {{}}, {{}}, {{}}"] >= 1, specs  # the stored transitions
  assert specs[f"{BATCH}, {{}}, {HEADS}, {{}}"] >= 2 * model.num_layers, specs
