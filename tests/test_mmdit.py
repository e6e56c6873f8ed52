"""Qwen-Image MMDiT: float32 parity with diffusers on tiny random models, checkpoint IO, sharding
and the 20B parameter count."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen_image_rl.convert.safetensors_io import CheckpointError
from qwen_image_rl.convert.transformer import (
  load_transformer,
  params_from_torch_state_dict,
  params_to_torch_state_dict,
  save_transformer,
)
from qwen_image_rl.models import layers
from qwen_image_rl.models.mmdit import QwenImageTransformer, count_params
from qwen_image_rl.parallel import (
  DEFAULT_LOGICAL_AXIS_RULES,
  batch_sharding,
  make_mesh,
  shard_tree,
  sharding_context,
  tree_shardings,
)

TOL = 1e-4
TINY = dict(
  patch_size=2,
  in_channels=16,
  out_channels=4,
  num_layers=2,
  attention_head_dim=32,
  num_attention_heads=2,
  joint_attention_dim=24,
  axes_dims_rope=(8, 12, 12),
)
T2I = ((1, 4, 6),)
EDIT = ((1, 4, 6), (1, 2, 3), (1, 3, 3))


def _torch_model(seed=0, **overrides):
  import torch
  from diffusers import QwenImageTransformer2DModel

  torch.manual_seed(seed)
  model = QwenImageTransformer2DModel(**{**TINY, **overrides}).eval()
  with torch.no_grad():  # Move norms and biases off their trivial init so they are tested too.
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  return model


def _state_dict(torch_model):
  return {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}


def _inputs(img_shapes, batch=2, txt_len=7, pad_from=None, in_channels=16, joint_dim=24, seed=1):
  rng = np.random.default_rng(seed)
  n = sum(math.prod(s) for s in img_shapes)
  mask = None
  if pad_from is not None:
    mask = np.ones((batch, txt_len), np.float32)
    mask[-1, pad_from:] = 0.0
  return dict(
    hidden_states=rng.standard_normal((batch, n, in_channels), np.float32),
    encoder_hidden_states=rng.standard_normal((batch, txt_len, joint_dim), np.float32),
    encoder_hidden_states_mask=mask,
    timestep=rng.uniform(0.05, 1.0, (batch,)).astype(np.float32),
    img_shapes=img_shapes,
  )


def _torch_forward(torch_model, inputs):
  import torch

  n_target = math.prod(inputs["img_shapes"][0])
  mask = inputs["encoder_hidden_states_mask"]
  with torch.no_grad():
    out = torch_model(
      hidden_states=torch.from_numpy(inputs["hidden_states"]),
      encoder_hidden_states=torch.from_numpy(inputs["encoder_hidden_states"]),
      encoder_hidden_states_mask=None if mask is None else torch.from_numpy(mask),
      timestep=torch.from_numpy(inputs["timestep"]),
      img_shapes=[list(inputs["img_shapes"])] * inputs["hidden_states"].shape[0],
    ).sample
  return out[:, :n_target].numpy()


def _flax_forward(model, params, inputs):
  shapes = inputs["img_shapes"]
  args = {k: None if v is None else jnp.asarray(v) for k, v in inputs.items() if k != "img_shapes"}
  fwd = jax.jit(lambda p, a: model.apply({"params": p}, **a, img_shapes=shapes))
  return np.asarray(fwd(params, args))


@pytest.fixture(scope="module")
def torch_models():
  return {False: _torch_model(0), True: _torch_model(0, zero_cond_t=True)}


# ------------------------------------------------------------------------------------------------
# Parity with diffusers
# ------------------------------------------------------------------------------------------------


@pytest.mark.torch
@pytest.mark.parametrize(
  "name,img_shapes,pad_from,zero_cond_t,scan",
  [
    ("t2i_nonsquare", T2I, None, False, False),
    ("padded_mask", ((1, 3, 5),), 4, False, True),
    ("edit_two_refs", EDIT, 5, False, False),
    ("edit_zero_cond_t", EDIT, 5, True, True),
  ],
)
def test_matches_diffusers(torch_models, name, img_shapes, pad_from, zero_cond_t, scan):
  torch_model = torch_models[zero_cond_t]
  model = QwenImageTransformer.from_config(dict(torch_model.config), scan_layers=scan)
  params = params_from_torch_state_dict(_state_dict(torch_model), model)
  inputs = _inputs(img_shapes, pad_from=pad_from)
  ref = _torch_forward(torch_model, inputs)
  out = _flax_forward(model, params, inputs)
  err = float(np.abs(out - ref).max())
  print(f"{name}: max abs err {err:.2e} (|ref| max {np.abs(ref).max():.2f})")
  assert out.shape == ref.shape == (2, math.prod(img_shapes[0]), 16)
  assert err <= TOL, name


@pytest.mark.torch
def test_mask_and_zero_cond_t_change_outputs(torch_models):
  """The parity cases exercise real behaviour: the mask and zero_cond_t each matter."""
  sd = _state_dict(torch_models[False])
  plain = QwenImageTransformer.from_config(dict(torch_models[False].config))
  zero = QwenImageTransformer.from_config(dict(torch_models[True].config))
  params = params_from_torch_state_dict(sd, plain)
  inputs = _inputs(EDIT, pad_from=3)
  unmasked = dict(inputs, encoder_hidden_states_mask=None)
  out = _flax_forward(plain, params, inputs)
  assert np.abs(out[-1] - _flax_forward(plain, params, unmasked)[-1]).max() > 1e-3
  assert np.abs(out - _flax_forward(zero, params, inputs)).max() > 1e-3


def test_scan_and_loop_agree():
  loop = QwenImageTransformer(**TINY)
  scan = QwenImageTransformer(
    **TINY, scan_layers=True, remat_policy="dots_saveable", attention_query_chunk=16
  )  # 46 tokens: 3 blocks, the last padded
  params = nn.meta.unbox(loop.init_params(jax.random.key(0)))
  sd = params_to_torch_state_dict(params, loop)
  scan_params = params_from_torch_state_dict(sd, scan)
  assert scan_params["transformer_blocks"]["attn"]["to_q"]["kernel"].shape == (2, 64, 64)
  inputs = _inputs(EDIT, pad_from=5)
  err = np.abs(_flax_forward(loop, params, inputs) - _flax_forward(scan, scan_params, inputs)).max()
  print(f"scan vs loop: {err:.2e}")
  assert err <= 1e-5
  # The inverse conversion is exact in both layouts.
  back = params_to_torch_state_dict(scan_params, scan)
  assert all(np.array_equal(back[k], sd[k]) for k in sd)


def test_chunked_attention_matches_plain():
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal((2, 37, 3, 8), np.float32)) for _ in range(3))
  mask = jnp.asarray(np.arange(37)[None, :] < np.array([[37], [30]]))

  def loss(fn, q):
    return jnp.sum(jnp.sin(fn(q, k, v, mask)))

  plain = jax.value_and_grad(lambda q: loss(layers.dot_product_attention, q))(q)
  chunked = jax.value_and_grad(
    lambda q: loss(lambda *a: layers.chunked_attention(*a, query_chunk=10), q)
  )(q)
  for a, b in zip(plain, chunked):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_materialize_cotangent_is_an_identity_that_xla_cpu_cannot_fuse_through():
  plain = lambda x: jnp.sum(jnp.sin(x * 2.0) ** 2 * x)
  cut = lambda x: jnp.sum(jnp.sin(layers.materialize_cotangent(x * 2.0)) ** 2 * x)
  x = jnp.linspace(-1.0, 1.0, 8)
  np.testing.assert_allclose(jax.grad(cut)(x), jax.grad(plain)(x), rtol=1e-6, atol=1e-7)
  # A NaN in the cotangent's first element takes the other branch: still the identity.
  nan_first = x.at[0].set(jnp.nan)
  np.testing.assert_array_equal(
    np.isnan(jax.grad(cut)(nan_first)), np.isnan(jax.grad(plain)(nan_first))
  )
  np.testing.assert_allclose(
    jax.grad(cut)(nan_first)[1:], jax.grad(plain)(nan_first)[1:], rtol=1e-6, atol=1e-7
  )
  # On CPU the backward keeps the barrier (a conditional) that splits the fusion.
  assert "conditional(" in jax.jit(jax.grad(cut)).lower(x).compile().as_text()
  assert "conditional(" not in jax.jit(jax.grad(plain)).lower(x).compile().as_text()


def test_config_round_trip_and_rejections():
  model = QwenImageTransformer.from_config(
    {"_class_name": "QwenImageTransformer2DModel", "_diffusers_version": "0.36.0", **TINY}
  )
  assert QwenImageTransformer.from_config(model.to_config()) == model
  assert model.to_config()["axes_dims_rope"] == [8, 12, 12]
  for flag in ("guidance_embeds", "use_additional_t_cond", "use_layer3d_rope"):
    with pytest.raises(NotImplementedError, match=flag):
      QwenImageTransformer(**TINY, **{flag: True})
  with pytest.raises(ValueError, match="unknown config keys"):
    QwenImageTransformer.from_config({**TINY, "num_blocks": 3})
  with pytest.raises(ValueError, match="remat_policy"):
    QwenImageTransformer(**TINY, remat_policy="some")
  with pytest.raises(ValueError, match="axes_dims_rope"):
    QwenImageTransformer(**{**TINY, "axes_dims_rope": (8, 8, 8)})


def test_adaln_zero_init_starts_every_block_as_the_identity():
  """init_scheme='adaln_zero' zeroes the modulation and proj_out kernels only: the blocks pass
  their input through (gates 0), the output is 0, and one gradient step moves it."""
  model = QwenImageTransformer(**TINY, init_scheme="adaln_zero")
  params = nn.meta.unbox(model.init_params(jax.random.key(0)))
  torch_init = nn.meta.unbox(QwenImageTransformer(**TINY).init_params(jax.random.key(0)))
  zeroed = {("norm_out",), ("proj_out",)}
  zeroed |= {(f"transformer_blocks_{i}", m) for i in range(2) for m in ("img_mod", "txt_mod")}
  for path, kernel in jax.tree_util.tree_leaves_with_path(params):
    if path[-1].key == "kernel":
      layer = tuple(k.key for k in path[:-1])
      assert np.any(np.asarray(kernel)) == (layer not in zeroed), layer
  same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), params, torch_init)
  assert same["transformer_blocks_0"]["attn"]["to_q"]["kernel"]
  assert not same["proj_out"]["kernel"]

  inputs = {k: v for k, v in _inputs(T2I).items() if k != "img_shapes"}

  def loss(p):
    out = model.apply({"params": p}, **inputs, img_shapes=T2I)
    return jnp.mean((out - 1.0) ** 2), out

  (_, out), grads = jax.value_and_grad(loss, has_aux=True)(params)
  assert not np.any(np.asarray(out))
  # proj_out's zero kernel stops the gradient upstream: the first step trains proj_out alone.
  reached = {k for k, g in grads.items() if any(np.any(np.asarray(x)) for x in jax.tree.leaves(g))}
  assert reached == {"proj_out"}
  stepped = jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)
  reached = {
    k
    for k, g in jax.grad(lambda p: loss(p)[0])(stepped).items()
    if any(np.any(np.asarray(x)) for x in jax.tree.leaves(g))
  }
  assert {"norm_out", "transformer_blocks_0", "transformer_blocks_1"} <= reached
  with pytest.raises(ValueError, match="init_scheme"):
    QwenImageTransformer(**TINY, init_scheme="zeros")


def test_msrope_positions():
  """Centred h/w positions, frame = image index, text after the largest image on all axes."""
  img, txt = layers.msrope_angles(((1, 5, 4), (1, 2, 2)), 3, (2, 2, 2), theta=10000.0)
  # With 2 dims per axis the angle is the position itself (inv_freq = 1).
  np.testing.assert_array_equal(img[:20, 1].reshape(5, 4)[:, 0], [-3, -2, -1, 0, 1])
  np.testing.assert_array_equal(img[:4, 2], [-2, -1, 0, 1])
  np.testing.assert_array_equal(img[20:, 0], [1, 1, 1, 1])
  np.testing.assert_array_equal(txt, np.repeat(np.arange(2, 5)[:, None], 3, axis=1))


# ------------------------------------------------------------------------------------------------
# Checkpoint IO
# ------------------------------------------------------------------------------------------------


@pytest.mark.torch
@pytest.mark.parametrize("scan,shard_bytes", [(False, 5 * 2**30), (True, 40_000)])
def test_save_load_round_trip(tmp_path, torch_models, scan, shard_bytes):
  import torch
  from diffusers import QwenImageTransformer2DModel

  torch_model = torch_models[True]
  torch_model.save_pretrained(tmp_path / "src")
  model, params = load_transformer(str(tmp_path / "src"), scan_layers=scan)
  assert model.zero_cond_t and model.scan_layers == scan
  save_transformer(model, params, str(tmp_path / "dst"), max_shard_bytes=shard_bytes)
  reloaded = QwenImageTransformer2DModel.from_pretrained(str(tmp_path / "dst")).eval()
  inputs = _inputs(EDIT, pad_from=5)
  np.testing.assert_array_equal(
    _torch_forward(reloaded, inputs), _torch_forward(torch_model, inputs)
  )
  for k, v in torch_model.state_dict().items():
    assert torch.equal(reloaded.state_dict()[k], v), k


@pytest.mark.parametrize(
  "corrupt,expected",
  [
    ("missing", "missing keys: transformer_blocks.1.attn.norm_k.weight"),
    ("unexpected", "unexpected keys: transformer_blocks.2.img_mod.1.weight"),
    (
      "shape",
      "wrong shapes: transformer_blocks.0.attn.to_q.weight (checkpoint (64, 63), model (64, 64))",
    ),
  ],
)
def test_bad_checkpoints_name_the_key(tmp_path, corrupt, expected):
  from qwen_image_rl.convert.safetensors_io import save_state_dict

  model = QwenImageTransformer(**TINY)
  sd = params_to_torch_state_dict(model.init_params(jax.random.key(0)), model)
  if corrupt == "missing":
    del sd["transformer_blocks.1.attn.norm_k.weight"]
  elif corrupt == "unexpected":
    sd["transformer_blocks.2.img_mod.1.weight"] = np.zeros((384, 64), np.float32)
  else:
    sd["transformer_blocks.0.attn.to_q.weight"] = np.zeros((64, 63), np.float32)
  with pytest.raises(CheckpointError, match=expected.replace("(", r"\(").replace(")", r"\)")):
    params_from_torch_state_dict(sd, model)
  save_state_dict(sd, str(tmp_path))
  (tmp_path / "config.json").write_text(__import__("json").dumps(model.to_config()))
  with pytest.raises(CheckpointError, match=str(tmp_path)):
    load_transformer(str(tmp_path))


# ------------------------------------------------------------------------------------------------
# Sharding
# ------------------------------------------------------------------------------------------------


def test_sharded_forward_and_grad_match_one_device():
  rules = DEFAULT_LOGICAL_AXIS_RULES
  model = QwenImageTransformer(
    **{**TINY, "num_attention_heads": 4, "attention_head_dim": 16, "axes_dims_rope": (4, 6, 6)},
    scan_layers=True,
    remat_policy="full",
  )
  abstract = model.abstract_params()
  params = nn.meta.unbox(model.init_params(jax.random.key(0)))
  inputs = _inputs(EDIT, batch=8, pad_from=4)
  # A different text length per sample, so a batch shard that meets another shard's mask shows.
  inputs["encoder_hidden_states_mask"] = (
    np.arange(7)[None, :] < np.array([7, 5, 6, 3, 7, 2, 4, 1])[:, None]
  ).astype(np.float32)
  shapes = inputs.pop("img_shapes")
  args = {k: jnp.asarray(v) for k, v in inputs.items()}

  def loss(p, a):  # The output rides along as aux, so one compile checks forward and grad.
    out = model.apply({"params": p}, **a, img_shapes=shapes)
    return jnp.mean(jnp.square(out)), out

  (ref_loss, ref_out), ref_grad = jax.jit(jax.value_and_grad(loss, has_aux=True))(params, args)

  mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  shardings = tree_shardings(abstract, mesh, rules)
  sharded = shard_tree(params, shardings)

  def under_mesh(p, a):
    return jax.value_and_grad(loss, has_aux=True)(p, a)

  # Inputs split over the data-parallel axes, as the trainers feed them.
  sharded_args = {
    k: jax.device_put(v, batch_sharding(mesh, v.shape, rules)) for k, v in args.items()
  }
  with sharding_context(mesh, rules):
    (val, out), grad = jax.jit(under_mesh, out_shardings=((None, None), shardings))(
      sharded, sharded_args
    )

  kernel = sharded["transformer_blocks"]["attn"]["to_q"]["kernel"]  # [layers, embed, heads]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
  assert kernel.addressable_shards[0].data.shape == (2, 32, 32)
  assert grad["transformer_blocks"]["img_mlp"]["proj_in"]["kernel"].sharding.spec == (
    jax.sharding.PartitionSpec(None, "fsdp", "tensor")
  )
  out_err = float(np.abs(np.asarray(out) - np.asarray(ref_out)).max())
  grad_err = max(
    float(np.abs(np.asarray(g) - np.asarray(r)).max())
    for g, r in zip(jax.tree.leaves(grad), jax.tree.leaves(ref_grad))
  )
  print(
    f"sharded vs one device: out {out_err:.2e}, loss {abs(val - ref_loss):.2e}, grad {grad_err:.2e}"
  )
  assert out_err <= 1e-5 and abs(val - ref_loss) <= 1e-5 and grad_err <= 1e-5


def test_batch_sharded_masked_forward_matches_one_device():
  """Regression: with act_batch -> ('data', 'fsdp') on a data2 x fsdp2 x tensor2 CPU mesh, XLA
  swapped batch shards inside the masked joint attention (errors ~5e-4 on samples 2-5)."""
  rules = DEFAULT_LOGICAL_AXIS_RULES
  model = QwenImageTransformer(
    in_channels=16,
    out_channels=4,
    num_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=16,
    axes_dims_rope=(4, 6, 6),
  )
  params = nn.meta.unbox(model.init_params(jax.random.key(0)))
  rng = np.random.default_rng(3)
  x = rng.standard_normal((8, 16, 16), np.float32)
  ctx = rng.standard_normal((8, 6, 16), np.float32)
  t = np.linspace(0.1, 0.9, 8).astype(np.float32)
  mask = (np.arange(6)[None] < np.array([6, 4, 5, 3, 6, 2, 6, 1])[:, None]).astype(np.int32)
  shapes = ((1, 4, 4),)
  ref = model.apply({"params": params}, x, ctx, mask, t, shapes)
  mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  sharded = shard_tree(params, tree_shardings(model.abstract_params(), mesh, rules))
  put = lambda a: jax.device_put(a, batch_sharding(mesh, a.shape, rules))

  def fwd(p, x, c, m, t):
    return model.apply({"params": p}, x, c, m, t, shapes)

  with sharding_context(mesh, rules):
    out = jax.jit(fwd)(sharded, put(x), put(ctx), put(mask), put(t))
  per_sample = np.abs(np.asarray(out) - np.asarray(ref)).max(axis=(1, 2))
  assert per_sample.max() <= 1e-5, per_sample


# ------------------------------------------------------------------------------------------------
# Scale
# ------------------------------------------------------------------------------------------------


def _qwen_image_param_count(d=3072, joint=3584, layers_=60, head_dim=128, in_ch=64, out=64):
  linear = lambda i, o: i * o + o
  block = (
    2 * linear(d, 6 * d)
    + 8 * linear(d, d)
    + 4 * head_dim
    + 2 * (linear(d, 4 * d) + linear(4 * d, d))
  )
  top = (
    linear(256, d)
    + linear(d, d)
    + joint
    + linear(in_ch, d)
    + linear(joint, d)
    + linear(d, 2 * d)
    + linear(d, out)
  )
  return top + layers_ * block


def test_default_config_has_20b_params():
  model = QwenImageTransformer(scan_layers=True, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  n = count_params(model.abstract_params())
  assert n == _qwen_image_param_count() == 20_430_401_088  # diffusers' count (meta-device build)
  assert abs(n - 20.43e9) < 0.01e9
