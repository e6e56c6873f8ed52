"""QwenImageVAE vs diffusers AutoencoderKLQwenImage on tiny random weights (float32)."""

import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen_image_rl import parallel
from qwen_image_rl.convert import vae as convert
from qwen_image_rl.convert.safetensors_io import CheckpointError
from qwen_image_rl.models.vae import (
  QwenImageVAE,
  abstract_variables,
  denormalize_latents,
  normalize_latents,
)

TOL = 1e-4

# The diffusers pipeline-test VAE (3 levels, x4), and a 4-level x8 one shaped like the real VAE.
CONFIGS = {
  "pipeline_test": dict(
    base_dim=24,
    z_dim=4,
    dim_mult=[1, 2, 4],
    num_res_blocks=1,
    temperal_downsample=[False, True],
    latents_mean=[0.0] * 4,
    latents_std=[1.0] * 4,
  ),
  "four_level": dict(
    base_dim=8,
    z_dim=4,
    dim_mult=[1, 2, 4, 4],
    num_res_blocks=2,
    temperal_downsample=[False, True, True],
    latents_mean=[0.1, -0.2, 0.3, -0.4],
    latents_std=[1.5, 0.5, 2.0, 1.2],
  ),
}


def _torch_vae(config, seed=0):
  import torch
  from diffusers import AutoencoderKLQwenImage

  torch.manual_seed(seed)
  vae = AutoencoderKLQwenImage(**config).eval()
  with torch.no_grad():  # non-trivial norm scales, so a gamma layout mistake cannot hide
    for name, p in vae.named_parameters():
      if name.endswith("gamma"):
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
  return vae


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
  """(name, torch vae, its saved directory, flax model, params loaded through load_vae)."""
  name = request.param
  vae = _torch_vae(CONFIGS[name])
  directory = str(tmp_path_factory.mktemp(name))
  vae.save_pretrained(directory)
  model, params = convert.load_vae(directory)
  return name, vae, directory, model, params


def _images(shape, seed):
  return np.random.RandomState(seed).uniform(-1, 1, shape).astype(np.float32)


def _torch_encode(vae, images_nhwc):
  import torch

  x = torch.from_numpy(images_nhwc).permute(0, 3, 1, 2)[:, :, None]  # [B, C, 1, H, W]
  with torch.no_grad():
    dist = vae.encode(x).latent_dist
  to_nhwc = lambda t: t[:, :, 0].permute(0, 2, 3, 1).numpy()
  return to_nhwc(dist.mode()), to_nhwc(dist.logvar)


def _torch_decode(vae, latents_nhwc):
  import torch

  z = torch.from_numpy(latents_nhwc).permute(0, 3, 1, 2)[:, :, None]
  with torch.no_grad():
    out = vae.decode(z).sample
  return out[:, :, 0].permute(0, 2, 3, 1).numpy()


@pytest.fixture(scope="module")
def jitted(pair):
  _, _, _, model, _ = pair
  encode = jax.jit(lambda p, x: model.apply(p, x, method=model.encode_moments))
  decode = jax.jit(lambda p, z: model.apply(p, z, method=model.decode))
  return encode, decode


@pytest.mark.torch
def test_encode_decode_match_diffusers(pair, jitted):
  name, vae, _, model, params = pair
  encode, decode = jitted
  r = model.spatial_compression_ratio
  images = _images((2, 4 * r, 6 * r, 3), seed=1)  # non-square
  t0 = time.time()
  mean, logvar = jax.device_get(encode(params, images))
  ref_mean, ref_logvar = _torch_encode(vae, images)
  assert mean.shape == (2, 4, 6, 4) == ref_mean.shape
  enc_err = float(np.max(np.abs(mean - ref_mean)))
  logvar_err = float(np.max(np.abs(logvar - ref_logvar)))

  latents = np.random.RandomState(2).normal(size=(2, 5, 3, 4)).astype(np.float32)  # non-square
  decoded = np.asarray(decode(params, latents))
  ref = _torch_decode(vae, latents)
  assert decoded.shape == (2, 5 * r, 3 * r, 3) == ref.shape
  dec_err = float(np.max(np.abs(decoded - ref)))
  unclipped = float(np.mean(np.abs(ref) < 1.0))
  print(
    f"\n[{name}] encode mean err {enc_err:.2e}, logvar err {logvar_err:.2e}, decode err "
    f"{dec_err:.2e} (|ref| scale {np.abs(ref_mean).max():.2f}, {unclipped:.0%} of decoded "
    f"pixels unclipped), {time.time() - t0:.1f}s"
  )
  assert enc_err <= TOL and logvar_err <= TOL and dec_err <= TOL
  assert unclipped > 0.5  # the decode comparison is not just two saturated images


@pytest.mark.torch
def test_save_vae_round_trips_through_diffusers(pair, jitted, tmp_path):
  import torch
  from diffusers import AutoencoderKLQwenImage

  _, vae, _, model, params = pair
  encode, decode = jitted
  out_dir = str(tmp_path / "vae")
  convert.save_vae(model, params, out_dir)
  reloaded = AutoencoderKLQwenImage.from_pretrained(out_dir).eval()
  public = lambda cfg: {k: v for k, v in cfg.items() if not k.startswith("_")}
  assert public(reloaded.config) == public(vae.config)
  original = vae.state_dict()
  restored = reloaded.state_dict()
  assert set(original) == set(restored)
  for key in original:  # includes time_conv and every temporal tap, bit for bit
    assert torch.equal(original[key], restored[key]), key
  r = model.spatial_compression_ratio
  images = _images((1, 2 * r, 3 * r, 3), seed=3)
  np.testing.assert_array_equal(_torch_encode(reloaded, images)[0], _torch_encode(vae, images)[0])
  # ...and our own load of the saved directory gives the same params.
  model2, params2 = convert.load_vae(out_dir)
  assert model2 == model
  jax.tree.map(np.testing.assert_array_equal, params2, params)


@pytest.mark.torch
def test_time_conv_is_loaded_but_unused(pair):
  _, vae, _, model, params = pair
  time_keys = [k for k in vae.state_dict() if "time_conv" in k]
  assert time_keys, "every config here has a temporal resampler"
  state = convert.params_to_torch_state_dict(params)
  for key in time_keys:
    np.testing.assert_array_equal(state[key], vae.state_dict()[key].numpy())


def _broken(state, kind):
  state = dict(state)
  if kind == "missing":
    key = "encoder.down_blocks.0.conv1.weight"
    del state[key]
  elif kind == "unexpected":
    key = "encoder.extra_layer.weight"
    state[key] = np.zeros((2, 2), np.float32)
  else:
    key = "decoder.mid_block.attentions.0.norm.gamma"
    state[key] = np.ones((state[key].shape[0], 1, 1, 1), np.float32)  # [C,1,1,1], wants [C,1,1]
  return state, key


@pytest.mark.torch
@pytest.mark.parametrize("kind", ["missing", "unexpected", "wrong_shape"])
def test_bad_checkpoint_names_the_key(pair, kind, tmp_path):
  from qwen_image_rl.convert.safetensors_io import save_state_dict

  _, _, directory, model, params = pair
  state, key = _broken(convert.params_to_torch_state_dict(params), kind)
  with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
    convert.params_from_torch_state_dict(state, model)
  # Same through a directory on disk: the message names the directory as well.
  bad_dir = tmp_path / "bad"
  save_state_dict(state, str(bad_dir))
  with open(os.path.join(directory, "config.json")) as f:
    (bad_dir / "config.json").write_text(f.read())
  with pytest.raises(CheckpointError, match="bad") as info:
    convert.load_vae(str(bad_dir))
  assert key in str(info.value)


def test_config_round_trip_and_validation():
  config = dict(CONFIGS["four_level"], attn_scales=[], dropout=0.0, input_channels=3)
  model = QwenImageVAE.from_config({"_class_name": "AutoencoderKLQwenImage", **config})
  assert model.to_config() == config
  assert model.spatial_compression_ratio == 8
  default = QwenImageVAE()
  assert default.z_dim == 16 and len(default.latents_mean) == 16
  with pytest.raises(ValueError, match="base_channels"):
    QwenImageVAE.from_config({**config, "base_channels": 8})
  with pytest.raises(ValueError, match="temperal_downsample"):
    QwenImageVAE.from_config({**config, "temperal_downsample": [False]})
  with pytest.raises(ValueError, match="latents_std"):
    QwenImageVAE.from_config({**config, "latents_std": [1.0] * 3})
  with pytest.raises(ValueError, match="attn_scales"):
    QwenImageVAE.from_config({**config, "attn_scales": [0.5]})
  model = QwenImageVAE.from_config(config)
  params = jax.tree.map(
    lambda s: np.zeros(s.shape, s.dtype), nn.meta.unbox(abstract_variables(model))
  )
  with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
    model.apply(params, np.zeros((1, 3, 8, 8), np.float32), method=model.encode)


def test_latent_normalisation():
  z = jax.random.normal(jax.random.key(0), (2, 3, 5, 4)) * 3
  mean, std = [0.1, -0.2, 0.3, -0.4], [1.5, 0.5, 2.0, 1.2]
  n = normalize_latents(z, mean, std)
  np.testing.assert_allclose(n, (np.asarray(z) - np.asarray(mean)) / np.asarray(std), rtol=1e-6)
  np.testing.assert_allclose(denormalize_latents(n, mean, std), z, atol=1e-5)


def test_logical_axes_on_params():
  model = QwenImageVAE.from_config(CONFIGS["four_level"])
  axes = parallel.get_logical_axes(abstract_variables(model))["params"]
  enc = axes["encoder"]
  assert tuple(enc["conv_in"]["kernel"]) == (None, None, None, "conv_in", "conv_out")
  assert tuple(enc["down_blocks_2"]["resample_1"]["kernel"]) == (None, None, "conv_in", "conv_out")
  assert tuple(enc["conv_in"]["bias"]) == ("conv_out",)
  assert tuple(enc["norm_out"]["gamma"]) == ("norm",)


@pytest.mark.torch
def test_sharded_encode_decode_match_single_device(pair, jitted):
  name, _, _, model, params = pair
  encode, decode = jitted
  rules = parallel.DEFAULT_LOGICAL_AXIS_RULES
  mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  assert mesh.devices.size == 8
  r = model.spatial_compression_ratio
  images = _images((4, 2 * r, 3 * r, 3), seed=4)
  ref_mean, _ = encode(params, images)
  ref_images = decode(params, ref_mean)

  param_shardings = parallel.tree_shardings(abstract_variables(model), mesh, rules)
  sharded_params = parallel.shard_tree(params, param_shardings)
  conv_in = sharded_params["params"]["encoder"]["conv_in"]["kernel"]
  assert not conv_in.sharding.is_fully_replicated  # conv_out axis split over fsdp
  batch = parallel.batch_sharding(mesh, 4, rules)

  def under_mesh(method):
    def fn(p, x):
      return model.apply(p, x, method=method)

    jitted = jax.jit(fn, in_shardings=(param_shardings, batch), out_shardings=batch)

    def call(p, x):
      with parallel.sharding_context(mesh, rules):
        return jitted(p, x)

    return call

  x = jax.device_put(images, batch)
  mean = under_mesh(model.encode)(sharded_params, x)
  out = under_mesh(model.decode)(sharded_params, jax.device_put(np.asarray(ref_mean), batch))
  assert len(mean.sharding.device_set) == 8
  enc_err = float(jnp.max(jnp.abs(mean - ref_mean)))
  dec_err = float(jnp.max(jnp.abs(out - ref_images)))
  print(f"\n[{name}] 8-device vs 1-device: encode err {enc_err:.2e}, decode err {dec_err:.2e}")
  assert enc_err <= 1e-5 and dec_err <= 1e-5


@pytest.mark.torch
def test_full_size_config_has_exactly_the_diffusers_keys():
  from diffusers import AutoencoderKLQwenImage

  reference = {k: tuple(v.shape) for k, v in AutoencoderKLQwenImage().state_dict().items()}
  assert convert.expected_torch_shapes(QwenImageVAE()) == reference  # 126.9M params, no compute


@pytest.mark.torch
def test_bfloat16_compute_and_gradients(pair, jitted):
  name, _, directory, model, params = pair
  encode, decode = jitted
  model16, params16 = convert.load_vae(directory, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  assert jax.tree.leaves(params16)[0].dtype == jnp.bfloat16
  r = model.spatial_compression_ratio
  images = _images((1, 2 * r, 2 * r, 3), seed=5)
  mean16 = jax.jit(lambda p, x: model16.apply(p, x, method=model16.encode))(params16, images)
  mean32, _ = encode(params, images)
  assert mean16.dtype == jnp.float32
  err = float(jnp.max(jnp.abs(mean16 - mean32)) / jnp.max(jnp.abs(mean32)))
  assert err < 0.1, err  # bf16 rounding only, relative to the latent scale
  # Differentiable decode (reward gradients flow through the VAE): finite, non-zero.
  loss = lambda z: jnp.sum(model.apply(params, z, method=model.decode) ** 2)
  grad = jax.jit(jax.grad(loss))(mean32)
  assert np.isfinite(np.asarray(grad)).all() and float(jnp.abs(grad).max()) > 0
  print(f"\n[{name}] bf16 vs f32 encode relative err {err:.2e}")
