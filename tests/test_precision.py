"""Float32 master weights with bf16 compute: a 1e-5 AdamW step changes every weight that has a
gradient, while bf16-stored weights round most of the update away."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import common
from qwen_image_rl import precision
from qwen_image_rl.models.mmdit import QwenImageTransformer
from qwen_image_rl.optim import make_optimizer


def _optim(lr=1e-5):
  optim = common.base().optim  # the shipped AdamW settings (clip 1.0, no warmup)
  optim.lr = lr
  return optim


def _one_step(params, grads, lr=1e-5, return_updates=False):
  tx = make_optimizer(_optim(lr), total_steps=10)
  updates, _ = tx.update(grads, tx.init(params), params)
  new = jax.tree.map(lambda p, u: (p + u).astype(p.dtype), params, updates)
  return (new, updates) if return_updates else new


def _model_config(dtype, master_weights=None):
  model = dict(dtype=dtype)
  if master_weights is not None:
    model["master_weights"] = master_weights
  return ml_collections.ConfigDict(dict(model=model))


def test_bf16_storage_rounds_most_of_a_1e5_update_away():
  rng = np.random.default_rng(0)
  weights = (0.02 * rng.standard_normal((512, 512))).astype(np.float32)
  grads = rng.standard_normal((512, 512)).astype(np.float32)
  bf16 = {"w": jnp.asarray(weights, jnp.bfloat16)}
  stored_bf16 = precision.fraction_changed(bf16, _one_step(bf16, {"w": grads.astype(jnp.bfloat16)}))
  master = {"w": jnp.asarray(bf16["w"], jnp.float32)}  # the same weights, kept in float32
  stepped = _one_step(master, {"w": jnp.asarray(grads)})
  print(
    f"fraction of N(0, 0.02) weights changed by one lr-1e-5 AdamW step: bf16 storage "
    f"{stored_bf16:.3f}, float32 master {precision.fraction_changed(master, stepped):.3f}"
  )
  assert 0.10 < stored_bf16 < 0.20  # ~15%: the update is below half a bf16 ulp for the rest
  assert precision.fraction_changed(master, stepped) == 1.0
  # Each master weight moved against its gradient by at most lr (Adam's first step is
  # lr * g / (|g| + eps): lr itself unless |g| is near eps).
  delta = np.abs(np.asarray(stepped["w"] - master["w"]))
  assert np.all(np.sign(np.asarray(stepped["w"] - master["w"])) == -np.sign(grads))
  assert np.all(delta <= 1.001e-5) and abs(np.median(delta) - 1e-5) < 1e-8


def test_settings_resolve_storage_dtype():
  assert precision.model_dtypes(_model_config("bfloat16")) == {
    "dtype": jnp.bfloat16,
    "param_dtype": jnp.float32,
  }
  assert precision.model_dtypes(_model_config("bfloat16", "off"))["param_dtype"] == jnp.bfloat16
  assert precision.model_dtypes(_model_config("float32"))["param_dtype"] == jnp.float32
  assert precision.model_dtypes(_model_config("float32", "on"))["param_dtype"] == jnp.float32
  with pytest.raises(ValueError, match="master_weights='yes'"):
    precision.model_dtypes(_model_config("bfloat16", "yes"))
  with pytest.raises(ValueError, match="config.model.dtype='fp8'"):
    precision.model_dtypes(_model_config("fp8"))
  with pytest.raises(ValueError, match=r"\['w'\] \(bfloat16\)"):
    precision.check_master_params(
      {"w": jnp.zeros(2, jnp.bfloat16)}, precision.model_dtypes(_model_config("bfloat16"))
    )


@pytest.mark.parametrize("master_weights", ["auto", "off"])
def test_bf16_model_with_master_weights_learns_at_1e5(master_weights):
  dtypes = precision.model_dtypes(_model_config("bfloat16", master_weights))
  model = QwenImageTransformer(
    patch_size=2,
    in_channels=16,
    out_channels=4,
    num_layers=1,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=24,
    axes_dims_rope=(4, 6, 6),
    **dtypes,
  )
  rng = np.random.default_rng(1)
  params = jax.tree.map(
    lambda s: jnp.asarray(0.02 * rng.standard_normal(s.shape), s.dtype),
    nn.meta.unbox(model.abstract_params()),
  )  # N(0, 0.02), no init compile
  x = jnp.asarray(rng.standard_normal((2, 12, 16)), jnp.bfloat16)
  ctx = jnp.asarray(rng.standard_normal((2, 5, 24)), jnp.bfloat16)
  t = jnp.asarray([0.3, 0.8])

  def loss(p):
    out = model.apply({"params": p}, x, ctx, None, t, ((1, 3, 4),))
    return jnp.mean(jnp.square(out.astype(jnp.float32)))

  grad_fn = jax.jit(jax.grad(loss))
  grads = grad_fn(params)
  new, updates = _one_step(params, grads, return_updates=True)
  moved = [np.asarray(a != b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(new))]
  # A weight should change when its update is at least half a float32 ulp of the weight (a few
  # entries whose gradient is far below AdamW's eps get updates smaller than that).
  half_ulp = [0.5 * np.abs(np.spacing(np.asarray(p, np.float32))) for p in jax.tree.leaves(params)]
  should_move = [
    np.abs(np.asarray(u, np.float32)) >= h for u, h in zip(jax.tree.leaves(updates), half_ulp)
  ]
  should = sum(int(h.sum()) for h in should_move)
  did = sum(int((m & h).sum()) for m, h in zip(moved, should_move))
  # The compute runs in bf16 either way: the matmuls of the step are bf16 dots.
  hlo = grad_fn.lower(params).as_text()
  assert "bf16" in hlo and any("dot_general" in ln and "bf16" in ln for ln in hlo.splitlines())
  print(
    f"master_weights={master_weights}: {did} of {should} weights that should move moved "
    f"({sum(x.size for x in should_move)} weights)"
  )
  if master_weights == "auto":
    precision.check_master_params(params, dtypes)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(new))
    assert did == should > 0
  else:
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(new))
    assert did < 0.5 * should


@pytest.mark.torch
def test_rl_policy_of_a_bf16_config_keeps_float32_masters(tmp_path):
  """load_base with model.dtype=bfloat16: f32 params (the master weights), bf16 compute."""
  from configs import grpo_t2i
  from qwen_image_rl.rl import policy
  from tests import tiny_reference

  _, path = tiny_reference.build_t2i(str(tmp_path))
  config = grpo_t2i.get_config("tiny")
  config.init_from = path
  config.model.dtype = "bfloat16"
  pipe = policy.load_base(config)
  assert pipe.transformer.dtype == jnp.bfloat16
  dtypes = {x.dtype for x in jax.tree.leaves(pipe.transformer_params)}
  assert dtypes == {jnp.dtype(jnp.float32)}
  config.model.master_weights = "off"
  pipe = policy.load_base(config)
  assert {x.dtype for x in jax.tree.leaves(pipe.transformer_params)} == {jnp.dtype(jnp.bfloat16)}
