"""Weight loading that scales: tensors read one at a time and placed straight into their target
shardings (8 simulated devices), equal to the unsharded load; diffusers-ignored config keys."""

import json
import logging

import flax.linen as nn
import jax
import ml_dtypes
import numpy as np
import pytest

from qwen_image_rl.convert import placement
from qwen_image_rl.convert.safetensors_io import (
  CheckpointError,
  SafetensorsReader,
  load_state_dict,
  save_state_dict,
)
from qwen_image_rl.convert.transformer import load_transformer, save_transformer
from qwen_image_rl.convert.vae import load_vae, save_vae
from qwen_image_rl.models.mmdit import QwenImageTransformer
from qwen_image_rl.models.vae import QwenImageVAE, abstract_variables
from qwen_image_rl.parallel import DEFAULT_LOGICAL_AXIS_RULES, make_mesh, tree_shardings

TINY = dict(
  patch_size=2,
  in_channels=16,
  out_channels=4,
  num_layers=3,
  attention_head_dim=16,
  num_attention_heads=4,
  joint_attention_dim=24,
  axes_dims_rope=(4, 6, 6),
)
MESH = {"data": 1, "fsdp": 4, "tensor": 2}


def _random_params(abstract, seed, dtype=None):
  """Random parameters from shapes alone (no init compile)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
    lambda s: rng.standard_normal(s.shape).astype(dtype or s.dtype), nn.meta.unbox(abstract)
  )


def _assert_placed(tree, shardings):
  """Every leaf has its target sharding and each device holds exactly its own shard."""
  n_split = 0
  for leaf, sharding in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
    assert leaf.sharding == sharding
    want = sharding.shard_shape(leaf.shape)
    assert [s.data.shape for s in leaf.addressable_shards] == [want] * len(jax.devices())
    n_split += want != leaf.shape
  return n_split


def _assert_equal_trees(a, b):
  flat_a, flat_b = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)
  assert len(flat_a) == len(flat_b)
  for (path, x), y in zip(flat_a, flat_b):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape, path
    np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("scan,dtype", [(True, "bfloat16"), (False, "float32")])
def test_sharded_transformer_load_equals_unsharded(tmp_path, scan, dtype):
  dtype = np.dtype(getattr(ml_dtypes, dtype, dtype))
  source = QwenImageTransformer(**TINY, dtype=dtype, param_dtype=dtype)
  save_transformer(source, _random_params(source.abstract_params(), 1), str(tmp_path))

  model, host = load_transformer(str(tmp_path), dtype, scan_layers=scan)
  mesh = make_mesh(MESH)
  shardings = tree_shardings(model.abstract_params(), mesh, DEFAULT_LOGICAL_AXIS_RULES)
  _, sharded = load_transformer(str(tmp_path), dtype, scan_layers=scan, mesh=mesh)

  _assert_equal_trees(sharded, host)
  assert _assert_placed(sharded, shardings) >= 20  # most kernels are split, not replicated
  kernel = sharded["transformer_blocks" if scan else "transformer_blocks_0"]["img_mlp"]["proj_in"][
    "kernel"
  ]  # [layers,] embed 64 -> fsdp 4, mlp 256 -> tensor 2
  assert kernel.addressable_shards[0].data.shape == ((3,) if scan else ()) + (16, 128)
  assert all(leaf.dtype == dtype for leaf in jax.tree.leaves(sharded))
  # The unsharded default is on one device, as before.
  assert {d for leaf in jax.tree.leaves(host) for d in leaf.devices()} == {jax.devices()[0]}


def test_explicit_shardings_and_layers_written_in_place(tmp_path):
  model = QwenImageTransformer(**TINY, scan_layers=True)
  params = _random_params(model.abstract_params(), 2)
  save_transformer(model, params, str(tmp_path))
  mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  shardings = tree_shardings(model.abstract_params(), mesh, DEFAULT_LOGICAL_AXIS_RULES)
  _, loaded = load_transformer(str(tmp_path), scan_layers=True, shardings=shardings)
  _assert_equal_trees(loaded, params)
  _assert_placed(loaded, shardings)


def test_stacked_leaf_rejects_missing_layers_and_wrong_shapes():
  mesh = make_mesh(MESH)
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "fsdp"))
  stack = placement.StackedLeaf((3, 8, 2), sharding, np.float32)
  stack.set(0, np.ones((8, 2), np.float32))
  stack.set(2, np.full((8, 2), 3.0, np.float32))
  with pytest.raises(ValueError, match=r"layers \[1\] were never written"):
    stack.result()
  with pytest.raises(ValueError, match="shape"):
    stack.set(1, np.ones((2, 8), np.float32))
  stack.set(1, np.full((8, 2), 2.0, np.float32))
  out = stack.result()
  assert out.sharding == sharding and out.addressable_shards[0].data.shape == (3, 2, 2)
  np.testing.assert_array_equal(np.asarray(out)[:, 0, 0], [1.0, 2.0, 3.0])


def test_sharded_vae_load_equals_host_load(tmp_path):
  model = QwenImageVAE(
    base_dim=8,
    z_dim=4,
    dim_mult=(1, 2, 4, 4),
    num_res_blocks=1,
    temperal_downsample=(False, True, True),
    latents_mean=(0.0,) * 4,
    latents_std=(1.0,) * 4,
  )
  save_vae(model, _random_params(abstract_variables(model), 3), str(tmp_path))
  _, host = load_vae(str(tmp_path))
  assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(host))
  mesh = make_mesh(MESH)
  _, sharded = load_vae(str(tmp_path), mesh=mesh)
  _assert_equal_trees(sharded, host)
  shardings = tree_shardings(abstract_variables(model), mesh, DEFAULT_LOGICAL_AXIS_RULES)
  assert _assert_placed(sharded, shardings) >= 1


def test_unknown_config_keys_warn_like_diffusers(tmp_path, caplog):
  """The released transformer/config.json carries `pooled_projection_dim`, which diffusers'
  from_config drops with a warning; the loader does the same (from_config stays strict)."""
  model = QwenImageTransformer(**TINY)
  save_transformer(model, _random_params(model.abstract_params(), 0), str(tmp_path))
  config = json.loads((tmp_path / "config.json").read_text())
  (tmp_path / "config.json").write_text(json.dumps({**config, "pooled_projection_dim": 768}))
  with caplog.at_level(logging.WARNING):
    loaded, _ = load_transformer(str(tmp_path))
  assert loaded == model
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert any("pooled_projection_dim" in w and "ignored" in w for w in warnings), warnings
  with pytest.raises(ValueError, match="unknown config keys"):
    QwenImageTransformer.from_config({**config, "pooled_projection_dim": 768})


def test_reader_reads_every_dtype_and_diagnoses_truncation(tmp_path):
  state = {
    "a": np.arange(6, dtype=np.float32).reshape(2, 3),
    "b": np.arange(4).astype(ml_dtypes.bfloat16),
    "c": np.array([1, -2], np.int64),
    "d": np.zeros((0, 4), np.float16),
  }
  save_state_dict(state, str(tmp_path), max_shard_bytes=24)  # several shards + an index
  assert len(list(tmp_path.glob("*.safetensors"))) > 1
  reader = SafetensorsReader(str(tmp_path))
  assert reader.shapes() == {k: v.shape for k, v in state.items()}
  for key, value in load_state_dict(str(tmp_path)).items():
    assert value.dtype == state[key].dtype
    np.testing.assert_array_equal(value, state[key])
  shard = sorted(tmp_path.glob("*.safetensors"))[0]
  shard.write_bytes(shard.read_bytes()[:-3])
  with pytest.raises(CheckpointError, match="does not fit its data offsets"):
    SafetensorsReader(str(tmp_path))
  shard.write_bytes(b"\x05")
  with pytest.raises(CheckpointError, match="bad header length"):
    SafetensorsReader(str(tmp_path))
