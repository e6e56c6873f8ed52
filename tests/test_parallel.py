"""Mesh construction, logical-axis shardings, and 8-device vs 1-device equality of a train step."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from qwen_image_rl import parallel
from qwen_image_rl.optim import make_optimizer

RULES = parallel.DEFAULT_LOGICAL_AXIS_RULES


class TinyMlp(nn.Module):
  width: int = 64
  hidden: int = 256

  @nn.compact
  def __call__(self, x):
    init = nn.initializers.lecun_normal()
    w1 = self.param(
      "w1", nn.with_logical_partitioning(init, ("embed", "mlp")), (self.width, self.hidden)
    )
    w2 = self.param(
      "w2", nn.with_logical_partitioning(init, ("mlp", "embed")), (self.hidden, self.width)
    )
    h = nn.with_logical_constraint(jnp.tanh(x @ w1), ("act_batch", "act_mlp"))
    return nn.with_logical_constraint(h @ w2, ("act_batch", "act_embed"))


def _train_fn(model, tx, mesh):
  def loss_fn(params, x, y):
    return jnp.mean((model.apply({"params": params}, x) - y) ** 2)

  def step(params, opt_state, x, y):
    with nn.logical_axis_rules(RULES):
      loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return step


def _optim():
  # SGD: Adam's m/sqrt(v) turns reduction-order rounding of ~0 gradients into O(lr) updates,
  # which would test Adam's conditioning rather than the sharding.
  return ml_collections.ConfigDict(
    dict(
      name="sgd",
      lr=0.1,
      warmup_steps=0,
      schedule="constant",
      b1=0.9,
      b2=0.999,
      eps=1e-8,
      weight_decay=0.01,
      grad_clip_norm=1.0,
    )
  )


def _run(mesh, steps=3):
  model, tx = TinyMlp(), make_optimizer(_optim(), 10)
  x = jax.random.normal(jax.random.key(1), (16, 64))
  y = jax.random.normal(jax.random.key(2), (16, 64))
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), x))["params"]
  shardings = parallel.tree_shardings(abstract, mesh, RULES)
  params = jax.jit(
    lambda: nn.meta.unbox(model.init(jax.random.key(0), x)["params"]), out_shardings=shardings
  )()
  opt_state = tx.init(params)
  data = parallel.batch_sharding(mesh, 2)
  x, y = jax.device_put(x, data), jax.device_put(y, data)
  step = jax.jit(_train_fn(model, tx, mesh), donate_argnums=(0, 1))
  losses = []
  with parallel.sharding_context(mesh, RULES):
    for _ in range(steps):
      params, opt_state, loss = step(params, opt_state, x, y)
      losses.append(float(loss))
  return params, losses


def test_mesh_resolves_minus_one_and_rejects_bad_shapes():
  assert parallel.resolve_mesh_shape({"data": -1, "tensor": 2}, 8) == {
    "data": 4,
    "fsdp": 1,
    "tensor": 2,
  }
  with pytest.raises(ValueError, match="at most one axis"):
    parallel.resolve_mesh_shape({"data": -1, "fsdp": -1}, 8)
  with pytest.raises(ValueError, match="multiply to"):
    parallel.resolve_mesh_shape({"data": 3, "fsdp": 1, "tensor": 1}, 8)
  with pytest.raises(ValueError, match="unknown mesh axes"):
    parallel.resolve_mesh_shape({"model": 2}, 8)


def test_sharded_step_matches_single_device():
  assert jax.device_count() == 8
  mesh8 = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  mesh1 = parallel.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
  params8, losses8 = _run(mesh8)
  params1, losses1 = _run(mesh1)
  np.testing.assert_allclose(losses8, losses1, rtol=0, atol=1e-6)
  for a, b in zip(jax.tree.leaves(params8), jax.tree.leaves(params1)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6)
  # The (embed, mlp) kernel is split 2-way on fsdp and 2-way on tensor: a quarter per device.
  w1 = params8["w1"]
  assert w1.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  shard_shapes = {s.data.shape for s in w1.addressable_shards}
  assert shard_shapes == {(32, 128)}
  assert losses8[-1] < losses8[0]


def test_indivisible_dims_fall_back_to_replication():
  mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  s = parallel.logical_sharding((6, 3), ("embed", "mlp"), mesh, RULES)
  assert s.spec == jax.sharding.PartitionSpec("fsdp", None)
