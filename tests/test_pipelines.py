"""JAX Qwen-Image pipelines vs diffusers' QwenImagePipeline / QwenImageEditPipeline (float32).

A tiny random diffusers pipeline (Qwen-Image scheduler config, non-trivial VAE latent stats) is
saved with save_pretrained; ours loads the same directory. Given the same initial latents, the
decoded images must agree to <= 1e-3 on [0, 1].
"""

import functools
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen_image_rl.convert.safetensors_io import CheckpointError
from qwen_image_rl.pipelines import (
  QwenImageEditPipeline,
  QwenImagePipeline,
  calculate_dimensions,
  common,
  edit,
)
from tests import tiny_reference

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch

TOL = 1e-3
PROMPTS = ["a red circle", "two big blue squares left of a small yellow triangle"]
NEGATIVE = ["blurry", "ugly black square"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("tiny_qwen_image"))
  torch_pipe, path = tiny_reference.build_t2i(directory)
  ours = QwenImagePipeline.from_pretrained(path)
  return dict(torch_pipe=torch_pipe, path=path, ours=ours)


def _torch_noise(pipe, batch, height, width, seed=0):
  """Packed initial latents exactly as diffusers' prepare_latents draws them."""
  h, w = common.latent_size(height, width, pipe.vae_scale_factor)
  g = torch.Generator().manual_seed(seed)
  noise = torch.randn((batch, 1, 4, h, w), generator=g)
  return pipe._pack_latents(noise, batch, 4, h, w)


def _diffusers_images(pipe, **kwargs):
  with torch.no_grad():
    out = pipe(output_type="np", **kwargs).images
  return np.asarray(out)


def _max_err(a, b):
  assert a.shape == b.shape, (a.shape, b.shape)
  return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def test_pack_unpack_match_diffusers():
  from diffusers import QwenImagePipeline as TorchPipeline

  x = np.random.default_rng(0).normal(size=(2, 6, 10, 16)).astype(np.float32)  # NHWC
  want = TorchPipeline._pack_latents(torch.from_numpy(x.transpose(0, 3, 1, 2)), 2, 16, 6, 10)
  got = common.pack_latents(jnp.asarray(x))
  np.testing.assert_array_equal(np.asarray(got), want.numpy())
  np.testing.assert_array_equal(np.asarray(common.unpack_latents(got, 6, 10)), x)
  unpacked = TorchPipeline._unpack_latents(want, 6 * 8, 10 * 8, 8)[:, :, 0]
  np.testing.assert_array_equal(unpacked.numpy().transpose(0, 2, 3, 1), x)


def test_t2i_matches_diffusers_with_cfg(reference):
  pipe, ours = reference["torch_pipe"], reference["ours"]
  latents = _torch_noise(pipe, 2, 32, 32)
  kwargs = dict(num_inference_steps=4, true_cfg_scale=4.0, height=32, width=32)
  want = _diffusers_images(
    pipe, prompt=PROMPTS, negative_prompt=NEGATIVE, latents=latents, **kwargs
  )
  start = time.perf_counter()
  got = ours(
    PROMPTS, negative_prompt=NEGATIVE, latents=latents.numpy(), output_type="float", **kwargs
  )
  elapsed = time.perf_counter() - start
  err = _max_err(got, want)
  print(f"T2I CFG 4.0, 4 steps, 2x32x32: max abs err {err:.2e} (ours {elapsed:.2f}s incl. jit)")
  assert err <= TOL
  assert want.std() > 0.05  # a real image, not a constant
  uint8 = ours(PROMPTS, negative_prompt=NEGATIVE, latents=latents.numpy(), **kwargs)
  assert uint8.dtype == np.uint8 and uint8.shape == (2, 32, 32, 3)
  assert np.abs(uint8.astype(int) - (want * 255).round().astype(int)).max() <= 1
  # CFG changes the result (so the comparison above exercised it).
  plain = ours(PROMPTS, latents=latents.numpy(), output_type="float", **kwargs)
  assert _max_err(plain, got) > 1e-2


def test_cfg_needs_scale_above_one_and_a_negative(reference):
  ours = reference["ours"]
  embeds, mask = ours.encode_prompt(PROMPTS[:1])
  neg, neg_mask = ours.encode_prompt(NEGATIVE[:1])
  latents = _torch_noise(reference["torch_pipe"], 1, 32, 32).numpy()
  run = functools.partial(
    ours,
    prompt_embeds=embeds,
    prompt_embeds_mask=mask,
    latents=latents,
    num_inference_steps=2,
    height=32,
    width=32,
    output_type="latent",
  )
  no_cfg = np.asarray(run(true_cfg_scale=1.0))
  np.testing.assert_array_equal(np.asarray(run(true_cfg_scale=4.0)), no_cfg)  # no negative
  np.testing.assert_array_equal(
    np.asarray(
      run(true_cfg_scale=1.0, negative_prompt_embeds=neg, negative_prompt_embeds_mask=neg_mask)
    ),
    no_cfg,
  )
  assert (
    _max_err(
      run(true_cfg_scale=4.0, negative_prompt_embeds=neg, negative_prompt_embeds_mask=neg_mask),
      no_cfg,
    )
    > 1e-3
  )


@pytest.mark.parametrize("height,width", [(36, 44), (40, 24)])
def test_sizes_not_divisible_like_diffusers(reference, height, width):
  pipe, ours = reference["torch_pipe"], reference["ours"]
  latents = _torch_noise(pipe, 1, height, width, seed=1)
  kwargs = dict(num_inference_steps=2, true_cfg_scale=1.0, height=height, width=width)
  want = _diffusers_images(pipe, prompt=PROMPTS[:1], latents=latents, **kwargs)
  got = ours(PROMPTS[:1], latents=latents.numpy(), output_type="float", **kwargs)
  err = _max_err(got, want)
  print(f"T2I {height}x{width} -> {want.shape[1:3]}: max abs err {err:.2e}")
  assert got.shape[1:3] == ours.output_size(height, width) == want.shape[1:3]
  assert err <= TOL
  with pytest.raises(ValueError, match="at least 8"):
    ours(PROMPTS[:1], height=4, width=32, num_inference_steps=1)


def test_seed_and_num_images_per_prompt(reference):
  ours = reference["ours"]
  kwargs = dict(num_inference_steps=2, height=32, width=32, output_type="latent")
  a = np.asarray(ours(PROMPTS, seed=3, num_images_per_prompt=2, **kwargs))
  b = np.asarray(ours(PROMPTS, seed=3, num_images_per_prompt=2, **kwargs))
  assert a.shape == (4, 16, 16)
  np.testing.assert_array_equal(a, b)
  assert _max_err(a[0], a[1]) > 1e-3  # different noise per image
  with pytest.raises(ValueError, match="prompt"):
    ours(num_inference_steps=1)
  with pytest.raises(ValueError, match="output_type"):
    ours(PROMPTS, output_type="pil")


def _edit_pipes(reference):
  from diffusers import QwenImageEditPipeline as TorchEdit

  tp = reference["torch_pipe"]
  torch_edit = TorchEdit(
    scheduler=tp.scheduler,
    vae=tp.vae,
    text_encoder=tp.text_encoder,
    tokenizer=tp.tokenizer,
    processor=None,
    transformer=tp.transformer,
  )
  o = reference["ours"]
  ours = QwenImageEditPipeline(
    o.transformer,
    o.transformer_params,
    o.vae,
    o.vae_params,
    o.text_encoder,
    o.text_encoder_params,
    o.tokenizer,
    o._scheduler_config,
    text_encoder_extra=o.text_encoder_extra,
  )
  return torch_edit, ours


def test_edit_matches_diffusers_vae_path(reference, monkeypatch):
  from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit
  from PIL import Image

  torch_edit, ours = _edit_pipes(reference)
  area = 48 * 48  # instead of 1024^2, on both sides, to keep the test small
  original = pipeline_qwenimage_edit.calculate_dimensions
  monkeypatch.setattr(
    pipeline_qwenimage_edit, "calculate_dimensions", lambda _, ratio: original(area, ratio)
  )
  pixels = np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8)
  image = Image.fromarray(pixels)
  assert ours.source_dimensions(image, area) == (64, 32)  # resized, aspect kept
  embeds, mask = ours.encode_prompt(["make it red"])
  neg, neg_mask = ours.encode_prompt(["blurry"])
  latents = _torch_noise(torch_edit, 2, 32, 64, seed=2)
  kwargs = dict(num_inference_steps=4, true_cfg_scale=4.0, num_images_per_prompt=2)
  with torch.no_grad():
    want = torch_edit(
      image=image,
      prompt_embeds=torch.from_numpy(np.asarray(embeds)),
      prompt_embeds_mask=torch.from_numpy(np.asarray(mask)).long(),
      negative_prompt_embeds=torch.from_numpy(np.asarray(neg)),
      negative_prompt_embeds_mask=torch.from_numpy(np.asarray(neg_mask)).long(),
      latents=latents,
      output_type="np",
      **kwargs,
    ).images
  got = ours(
    image,
    prompt_embeds=embeds,
    prompt_embeds_mask=mask,
    negative_prompt_embeds=neg,
    negative_prompt_embeds_mask=neg_mask,
    latents=latents.numpy(),
    output_type="float",
    image_area=area,
    **kwargs,
  )
  err = _max_err(got, want)
  print(f"Edit CFG 4.0, 4 steps, 2 x 32x64 (source 32x48 -> 64x32): max abs err {err:.2e}")
  assert err <= TOL
  # uint8 arrays are accepted as well as PIL images.
  again = ours(
    pixels,
    prompt_embeds=embeds,
    prompt_embeds_mask=mask,
    negative_prompt_embeds=neg,
    negative_prompt_embeds_mask=neg_mask,
    latents=latents.numpy(),
    output_type="float",
    image_area=area,
    **kwargs,
  )
  np.testing.assert_array_equal(again, got)


def test_edit_resize_like_diffusers_for_tiny_images(reference):
  from diffusers.image_processor import VaeImageProcessor
  from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import (
    calculate_dimensions as torch_dims,
  )
  from PIL import Image

  for ratio in (1.0, 0.5, 4 / 3, 16 / 9, 0.37, 2.9):
    assert calculate_dimensions(1024 * 1024, ratio) == torch_dims(1024 * 1024, ratio)[:2]
  _, ours = _edit_pipes(reference)
  # diffusers always resizes to ~1024^2: a 32x32 source becomes 1024x1024.
  tiny = Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 32, 3), np.uint8))
  assert ours.source_dimensions(tiny) == (1024, 1024)
  assert ours.source_dimensions(tiny, image_area=None) == (32, 32)
  processor = VaeImageProcessor(vae_scale_factor=8)
  source = Image.fromarray(np.random.default_rng(2).integers(0, 256, (24, 40, 3), np.uint8))
  cw, ch = ours.source_dimensions(source)
  want = processor.preprocess(processor.resize(source, ch, cw), ch, cw).numpy()
  got = edit.preprocess_images([source], cw, ch)
  np.testing.assert_array_equal(got, want.transpose(0, 2, 3, 1))
  with pytest.raises(NotImplementedError, match="vision tower"):
    ours(tiny, "make it red", vision_conditioning=True)


def test_save_pretrained_round_trip_through_diffusers(reference, tmp_path):
  from diffusers import QwenImagePipeline as TorchPipeline

  ours = reference["ours"]
  out = str(tmp_path / "saved")
  ours.save_pretrained(out)
  loaded = TorchPipeline.from_pretrained(out)
  loaded.prompt_template_encode_start_idx = ours.drop_idx
  original = reference["torch_pipe"]
  for name in ("transformer", "vae", "text_encoder"):
    want = getattr(original, name).state_dict()
    got = getattr(loaded, name).state_dict()
    assert set(got) == set(want), name
    for k in want:
      assert torch.equal(got[k], want[k]), (name, k)
  public = lambda c: {k: v for k, v in dict(c).items() if not k.startswith("_")}
  assert public(loaded.scheduler.config) == public(original.scheduler.config)
  latents = _torch_noise(original, 1, 32, 32, seed=4)
  kwargs = dict(
    prompt=PROMPTS[:1],
    negative_prompt=NEGATIVE[:1],
    num_inference_steps=3,
    true_cfg_scale=4.0,
    height=32,
    width=32,
  )
  np.testing.assert_array_equal(
    _diffusers_images(loaded, latents=latents, **kwargs),
    _diffusers_images(original, latents=latents, **kwargs),
  )
  reloaded = QwenImagePipeline.from_pretrained(out)
  np.testing.assert_array_equal(
    reloaded(latents=latents.numpy(), output_type="float", **kwargs),
    ours(latents=latents.numpy(), output_type="float", **kwargs),
  )


@pytest.mark.parametrize(
  "remove,match",
  [
    ("model_index.json", "model_index.json"),
    ("vae/config.json", "vae/config.json"),
    ("transformer/diffusion_pytorch_model.safetensors", "transformer"),
    ("scheduler/scheduler_config.json", "scheduler_config.json"),
    ("tokenizer", "tokenizer"),
  ],
)
def test_missing_component_file_is_a_clear_error(reference, tmp_path, remove, match):
  copy = str(tmp_path / "copy")
  shutil.copytree(reference["path"], copy)
  target = os.path.join(copy, remove)
  shutil.rmtree(target) if os.path.isdir(target) else os.remove(target)
  with pytest.raises(CheckpointError, match=match):
    QwenImagePipeline.from_pretrained(copy)


def test_denoise_with_sharded_params_matches(reference):
  from qwen_image_rl import parallel

  ours = reference["ours"]
  embeds, mask = ours.encode_prompt(PROMPTS)
  neg, neg_mask = ours.encode_prompt(NEGATIVE)
  x = common.pack_latents(jax.random.normal(jax.random.key(0), (2, 8, 8, 4)))
  sigmas = jnp.asarray(ours.schedule.sigmas(3, x.shape[1]))
  fn = common.make_denoise(ours.transformer, ((1, 4, 4),))
  want = fn(ours.transformer_params, x, embeds, mask, neg, neg_mask, sigmas, 4.0)
  mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  rules = parallel.DEFAULT_LOGICAL_AXIS_RULES
  shardings = parallel.tree_shardings(ours.transformer.abstract_params(), mesh, rules)
  params = parallel.shard_tree(ours.transformer_params, shardings)
  assert any(
    len(p.sharding.device_set) > 1 and not p.sharding.is_fully_replicated
    for p in jax.tree.leaves(params)
  )
  with parallel.sharding_context(mesh, rules):
    got = fn(params, x, embeds, mask, neg, neg_mask, sigmas, 4.0)
  err = _max_err(got, want)
  print(f"denoise with params sharded on data2 x fsdp2 x tensor2: max abs err {err:.2e}")
  assert err <= 1e-4


def test_edit_text_prompt_and_save_round_trip(reference, tmp_path):
  """Text prompts go through the edit template without image tokens; the saved edit pipeline
  (processor: None) loads in diffusers and gives our result for the same embeddings."""
  from diffusers import QwenImageEditPipeline as TorchEdit

  _, ours = _edit_pipes(reference)
  pixels = np.random.default_rng(3).integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)
  assert "<|image_pad|>" not in ours.TEMPLATE and "{}" in ours.TEMPLATE
  kwargs = dict(
    num_inference_steps=2, true_cfg_scale=4.0, image_area=None, seed=0, output_type="float"
  )
  got = ours(pixels, "make it red", negative_prompt="blurry", **kwargs)
  assert got.shape == (1, 32, 32, 3)
  embeds, mask = ours.encode_prompt("make it red")
  neg, neg_mask = ours.encode_prompt("blurry")
  np.testing.assert_array_equal(
    ours(
      pixels,
      prompt_embeds=embeds,
      prompt_embeds_mask=mask,
      negative_prompt_embeds=neg,
      negative_prompt_embeds_mask=neg_mask,
      **kwargs,
    ),
    got,
  )
  out = str(tmp_path / "edit")
  ours.save_pretrained(out)
  loaded = TorchEdit.from_pretrained(out, processor=None)  # no processor is written
  assert loaded.processor is None and loaded.transformer is not None
  reloaded = QwenImageEditPipeline.from_pretrained(out)
  np.testing.assert_array_equal(
    reloaded(pixels, "make it red", negative_prompt="blurry", **kwargs), got
  )
