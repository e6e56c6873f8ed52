"""Pallas TPU flash attention for the joint attention: in Pallas' TPU interpret mode on CPU it
matches the XLA attention (forward and gradients, with padded text keys masked), per shard under
a mesh; off TPU the switch falls back to the XLA path; it AOT-compiles for a TPU topology."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from qwen_image_rl.models import attention_kernels, layers
from qwen_image_rl.parallel import DEFAULT_LOGICAL_AXIS_RULES, make_mesh


def _qkv(batch=2, seq=200, heads=2, head_dim=128, seed=0):
  rng = np.random.default_rng(seed)
  q, k, v = (
    jnp.asarray(rng.standard_normal((batch, seq, heads, head_dim)), jnp.float32) for _ in range(3)
  )
  lengths = np.array([seq, seq - 50] * (batch // 2))
  mask = jnp.asarray(np.arange(seq)[None] < lengths[:, None])  # padded text keys at the end
  return q, k, v, mask


def _loss(fn):
  return lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)))  # a non-trivial cotangent


def test_flash_matches_xla_forward_and_gradients_in_interpret_mode():
  q, k, v, mask = _qkv()  # 200 tokens: padded to a 256 block inside the kernel

  def flash(q, k, v):
    return attention_kernels.attention(q, k, v, mask, implementation="flash", kernel_off_tpu=True)

  def xla(q, k, v):
    return layers.dot_product_attention(q, k, v, mask)

  with attention_kernels.interpret_mode():
    out = flash(q, k, v)
    grads = jax.grad(_loss(flash), argnums=(0, 1, 2))(q, k, v)
  ref_grads = jax.grad(_loss(xla), argnums=(0, 1, 2))(q, k, v)
  np.testing.assert_allclose(out, xla(q, k, v), atol=1e-5)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(g, r, atol=1e-5)
  # Masked keys get no gradient, as in the XLA path.
  assert float(jnp.abs(grads[1][1, 150:]).max()) == 0.0


def test_flash_runs_per_shard_under_a_mesh(monkeypatch):
  """The shard_map wiring: each device gets whole sequences of its own samples and heads. The
  local kernel is swapped for the XLA attention here (TPU interpret mode is too slow for 8
  simulated devices); the kernel itself is checked above and compiled for TPU below."""
  seen = []

  def local(q, k, v, mask, block):
    seen.append(q.shape)
    return layers.dot_product_attention(q, k, v, mask.astype(bool))

  monkeypatch.setattr(attention_kernels, "flash_attention_local", local)
  mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  q, k, v, mask = _qkv(batch=4, seq=130, heads=4, head_dim=16)
  spec = NamedSharding(mesh, P(("fsdp", "data"), None, "tensor", None))
  q, k, v = (jax.device_put(x, spec) for x in (q, k, v))

  @jax.jit
  def flash(q, k, v, mask):
    with nn.logical_axis_rules(DEFAULT_LOGICAL_AXIS_RULES):
      return attention_kernels.attention(q, k, v, mask, implementation="flash", kernel_off_tpu=True)

  with jax.set_mesh(mesh):
    out = flash(q, k, v, mask)
    hlo = flash.lower(q, k, v, mask).compile().as_text()
  np.testing.assert_allclose(out, layers.dot_product_attention(q, k, v, mask), atol=1e-5)
  assert seen[0] == (1, 130, 2, 16)  # batch 4 over fsdp*data = 4, heads 4 over tensor = 2
  assert out.sharding.spec == P(("fsdp", "data"), None, "tensor", None)
  assert "all-gather" not in hlo  # each device attends its own shard


def test_switch_falls_back_to_xla_off_tpu_and_rejects_unknown():
  q, k, v, mask = _qkv(seq=64, head_dim=16)
  flash = attention_kernels.attention(q, k, v, mask, implementation="flash", query_chunk=32)
  np.testing.assert_array_equal(flash, layers.chunked_attention(q, k, v, mask, 32))
  with pytest.raises(ValueError, match="'splash'"):
    attention_kernels.attention(q, k, v, mask, implementation="splash")


def test_flash_aot_compiles_for_a_tpu_topology():
  pytest.importorskip("libtpu", reason="AOT compilation for TPU needs libtpu (jax[tpu])")
  from jax.experimental import topologies

  devices = topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x2x1").devices
  mesh = make_mesh({"data": 1, "fsdp": -1, "tensor": 1}, devices)
  spec = NamedSharding(mesh, P(("fsdp", "data"), None, "tensor", None))
  shape = (4, 640, 2, 128)

  def loss(q, k, v, mask):
    with nn.logical_axis_rules(DEFAULT_LOGICAL_AXIS_RULES):
      out = attention_kernels.attention(q, k, v, mask, implementation="flash", kernel_off_tpu=True)
    return jnp.sum(out.astype(jnp.float32))

  step = jax.jit(
    jax.grad(loss, argnums=(0, 1, 2)),
    in_shardings=(spec,) * 3 + (NamedSharding(mesh, P(("fsdp", "data"))),),
  )
  args = [jax.ShapeDtypeStruct(shape, jnp.bfloat16)] * 3 + [
    jax.ShapeDtypeStruct(shape[:2], jnp.bool_)
  ]
  # conftest sets 'highest' precision, which bf16 Mosaic matmuls cannot honour.
  with jax.set_mesh(mesh), jax.default_matmul_precision("default"):
    lowered = step.lower(*args)
    compiled = lowered.compile()
  assert "tpu_custom_call" in lowered.as_text()  # the Mosaic kernel, not the XLA fallback
  assert compiled.memory_analysis().temp_size_in_bytes < 2**30


def test_transformer_rejects_an_unknown_attention_implementation():
  from qwen_image_rl.models.mmdit import QwenImageTransformer

  with pytest.raises(ValueError, match="attention_implementation='cudnn'"):
    QwenImageTransformer(
      num_layers=1,
      attention_head_dim=8,
      num_attention_heads=2,
      axes_dims_rope=(2, 2, 4),
      attention_implementation="cudnn",
    )
