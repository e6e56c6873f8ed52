"""Full Qwen2.5-VL (vision tower, multimodal RoPE, LM head, generation) vs transformers (float32).

A tiny random transformers Qwen2_5_VLForConditionalGeneration with window attention (3 vision
blocks, block 1 full attention, 2x2-merged windows) is saved with save_pretrained and loaded by
`load_qwen2_5_vl`; images go through both image processors.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen_image_rl.convert import load_qwen2_5_vl, save_qwen2_5_vl
from qwen_image_rl.data.tokenizer import build_qwen_tokenizer, special_token_ids
from qwen_image_rl.models import qwen2_5_vl_generate as gen
from qwen_image_rl.models.qwen2_5_vl_processor import (
  ImageProcessor,
  expand_image_tokens,
  smart_resize,
)
from qwen_image_rl.models.qwen2_5_vl_vision import vision_layout

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch

TOL = 1e-4
WORDS = [
  "a",
  "the",
  "red",
  "green",
  "blue",
  "circle",
  "square",
  "describe",
  "picture",
  "what",
  "is",
  "in",
  "this",
  "image",
  "and",
]
SIZES = [(84, 140), (56, 56), (112, 84)]  # (height, width) of the test images


def _config(tokenizer, tied: bool):
  from transformers import Qwen2_5_VLConfig

  ids = special_token_ids(tokenizer)
  return Qwen2_5_VLConfig(
    text_config=dict(
      vocab_size=len(tokenizer),
      hidden_size=32,
      intermediate_size=48,
      num_hidden_layers=2,
      num_attention_heads=4,
      num_key_value_heads=2,
      rope_scaling=dict(mrope_section=[1, 1, 2], rope_type="default", type="default"),
      rope_theta=1e4,
      rms_norm_eps=1e-6,
      bos_token_id=None,
      eos_token_id=ids["im_end_token_id"],
      pad_token_id=ids["pad_token_id"],
    ),
    vision_config=dict(
      depth=3,
      hidden_size=32,
      intermediate_size=24,
      num_heads=2,
      out_hidden_size=32,
      window_size=56,
      fullatt_block_indexes=[1],
    ),
    vocab_size=len(tokenizer),
    image_token_id=ids["image_token_id"],
    video_token_id=ids["video_token_id"],
    vision_start_token_id=ids["vision_start_token_id"],
    vision_end_token_id=ids["vision_end_token_id"],
    tie_word_embeddings=tied,
  )


def _randomise(model, seed):
  torch.manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight") or "layernorm" in name or "ln_q" in name or "norm" in name:
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      elif "embed_tokens" in name:
        p.normal_(0.0, 1.0)
      else:
        p.normal_(0.0, 0.15)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  return build_qwen_tokenizer(WORDS, str(tmp_path_factory.mktemp("tokenizer")))


def _build(tokenizer, directory, tied, seed=0):
  from transformers import Qwen2_5_VLForConditionalGeneration

  model = Qwen2_5_VLForConditionalGeneration(_config(tokenizer, tied)).eval()
  _randomise(model, seed)
  model.save_pretrained(directory)
  ours, params = load_qwen2_5_vl(directory)
  return dict(torch_model=model, model=ours, params=params, directory=directory)


@pytest.fixture(scope="module")
def reference(tokenizer, tmp_path_factory):
  return _build(tokenizer, str(tmp_path_factory.mktemp("vl")), tied=False)


def _images(seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in SIZES]


def _prompts(tokenizer, texts, images, padding_side="left"):
  processed = ImageProcessor()(images) if images else None
  if processed is not None:
    texts = expand_image_tokens(texts, processed["image_grid_thw"])
  old = tokenizer.padding_side
  tokenizer.padding_side = padding_side
  try:
    enc = tokenizer(texts, padding=True, return_tensors="np")
  finally:
    tokenizer.padding_side = old
  return enc["input_ids"], enc["attention_mask"], processed


def _torch_logits(ref, ids, mask, processed):
  kw = dict(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask))
  if processed is not None:
    kw.update(
      pixel_values=torch.as_tensor(processed["pixel_values"]),
      image_grid_thw=torch.as_tensor(processed["image_grid_thw"]),
      mm_token_type_ids=torch.as_tensor(
        (ids == ref["torch_model"].config.image_token_id).astype(np.int64)
      ),
    )
  with torch.no_grad():
    return ref["torch_model"](**kw).logits.numpy()


def _ours_logits(ref, ids, mask, processed):
  kw = (
    {}
    if processed is None
    else dict(
      pixel_values=jnp.asarray(processed["pixel_values"]),
      image_grid_thw=processed["image_grid_thw"],
    )
  )
  return np.asarray(
    ref["model"].apply(
      {"params": ref["params"]}, input_ids=jnp.asarray(ids), attention_mask=jnp.asarray(mask), **kw
    )
  )


def test_image_processor_matches_transformers():
  from PIL import Image
  from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
  from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
    smart_resize as torch_smart_resize,
  )

  rng = np.random.default_rng(1)
  rgb = rng.integers(0, 256, (90, 130, 3), dtype=np.uint8)
  rgba = rng.integers(0, 256, (61, 47, 4), dtype=np.uint8)
  images = [
    Image.fromarray(rgb),
    Image.fromarray(rgb[..., 0], "L"),
    Image.fromarray(rgba, "RGBA"),
    Image.fromarray(rgb[:9, :20]),  # below min_pixels
    Image.fromarray(rng.integers(0, 256, (700, 300, 3), dtype=np.uint8)),
  ]
  for kwargs in ({}, dict(min_pixels=28 * 28 * 8, max_pixels=28 * 28 * 40)):
    want = Qwen2VLImageProcessorPil(**kwargs)(images, return_tensors="np")
    got = ImageProcessor(**kwargs)(images)
    np.testing.assert_array_equal(got["image_grid_thw"], want["image_grid_thw"])
    err = np.abs(got["pixel_values"] - want["pixel_values"]).max()
    print(f"image processor {kwargs}: grids {got['image_grid_thw'].tolist()} max err {err:.1e}")
    assert err <= 1e-6
  for h, w in ((9, 20), (3000, 2000), (57, 1000)):  # upscaled, downscaled, elongated
    assert smart_resize(h, w) == torch_smart_resize(h, w)
  with pytest.raises(ValueError, match="aspect ratio"):
    smart_resize(2, 500)
  with pytest.raises(ValueError, match="uint8"):
    ImageProcessor()(np.zeros((30, 30, 3), np.float32))


@pytest.mark.parametrize("sizes", ["mixed", "equal"])
def test_vision_features_match_transformers(reference, sizes):
  # Mixed sizes give ragged windows (masked attention over all patches); equal sizes give equal
  # segments, which attend segment by segment.
  equal = np.random.default_rng(1).integers(0, 256, (3, 112, 112, 3), dtype=np.uint8)
  images = _images() if sizes == "mixed" else list(equal)
  processed = ImageProcessor()(images)
  grid = processed["image_grid_thw"]
  with torch.no_grad():
    want = (
      reference["torch_model"]
      .model.get_image_features(torch.as_tensor(processed["pixel_values"]), torch.as_tensor(grid))
      .pooler_output
    )
  want = torch.cat(want).numpy()
  model = reference["model"]
  layout = {k: jnp.asarray(v) for k, v in vision_layout(grid, model.vision_config).arrays().items()}
  got = jax.jit(model.visual.apply)(
    {"params": reference["params"]["visual"]}, jnp.asarray(processed["pixel_values"]), layout
  )
  err = np.abs(np.asarray(got) - want).max()
  print(f"vision features {want.shape} max abs err {err:.2e} (max |x| {np.abs(want).max():.1f})")
  assert layout["window_segments"].max() > len(images), "several windows per image"
  assert (
    layout["window_segments"].ndim == layout["full_segments"].ndim == (1 if sizes == "mixed" else 2)
  )
  assert err <= TOL


def test_merger_gradients_only_keeps_the_features_and_stops_the_blocks_gradients(reference):
  images = list(np.random.default_rng(2).integers(0, 256, (2, 56, 56, 3), dtype=np.uint8))
  processed = ImageProcessor()(images)
  model = reference["model"]
  layout = {
    k: jnp.asarray(v)
    for k, v in vision_layout(processed["image_grid_thw"], model.vision_config).arrays().items()
  }
  params, pixels = reference["params"]["visual"], jnp.asarray(processed["pixel_values"])
  merger_only = model.visual.clone(merger_gradients_only=True)

  def grads(tower):
    loss = lambda p: jnp.sum(jnp.sin(tower.apply({"params": p}, pixels, layout)))
    return jax.grad(loss)(params)

  np.testing.assert_array_equal(
    merger_only.apply({"params": params}, pixels, layout),
    model.visual.apply({"params": params}, pixels, layout),
  )
  full, stopped = grads(model.visual), grads(merger_only)
  for path, g in jax.tree_util.tree_flatten_with_path(stopped)[0]:
    name = jax.tree_util.keystr(path)
    want = dict(jax.tree_util.tree_flatten_with_path(full)[0])[path]
    if "merger" in name:
      np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-7, err_msg=name)
    else:
      assert not np.any(g) and np.any(want), name


def test_rope_index_matches_transformers(reference, tokenizer):
  texts = [
    "a <|vision_start|><|image_pad|><|vision_end|> red circle",
    "<|vision_start|><|image_pad|><|vision_end|>a<|vision_start|><|image_pad|>"
    "<|vision_end|> what is in this image",
  ]
  ids, mask, processed = _prompts(tokenizer, texts, _images())
  tm = reference["torch_model"].model
  want, want_delta = tm.get_rope_index(
    torch.as_tensor(ids),
    torch.as_tensor((ids == tm.config.image_token_id).astype(np.int64)),
    torch.as_tensor(processed["image_grid_thw"]),
    attention_mask=torch.as_tensor(mask),
  )
  got, delta = reference["model"].rope_index(ids, mask, processed["image_grid_thw"])
  np.testing.assert_array_equal(got, want.numpy())
  np.testing.assert_array_equal(delta, want_delta.numpy()[:, 0])


@pytest.mark.parametrize("case", ["one_image", "two_images", "batch_left_padded", "text_only"])
def test_logits_match_transformers(reference, tokenizer, case):
  images = _images()
  vis = "<|vision_start|><|image_pad|><|vision_end|>"
  if case == "one_image":
    texts, images = [f"<|im_start|>user\n{vis}describe this image<|im_end|>"], images[:1]
  elif case == "two_images":
    texts, images = [f"picture {vis} and picture {vis} what is in this image"], images[:2]
  elif case == "batch_left_padded":
    texts = [f"{vis}{vis} red", f"a blue square and {vis} what is in this picture"]
  else:
    texts, images = ["a red circle", "the blue square and a green circle"], []
  ids, mask, processed = _prompts(tokenizer, texts, images)
  want = _torch_logits(reference, ids, mask, processed)
  got = _ours_logits(reference, ids, mask, processed)
  valid = mask.astype(bool)
  err = np.abs(got - want)[valid].max()
  print(
    f"{case}: logits {want.shape} max abs err {err:.2e} (max |x| {np.abs(want[valid]).max():.1f})"
  )
  assert err <= TOL


def test_save_round_trip_and_tied_embeddings(tokenizer, tmp_path):
  from transformers import Qwen2_5_VLForConditionalGeneration

  ref = _build(tokenizer, str(tmp_path / "tied"), tied=True, seed=3)
  assert "lm_head" not in ref["params"]["language_model"]
  ids, mask, processed = _prompts(
    tokenizer, ["<|vision_start|><|image_pad|><|vision_end|> describe"], _images()[:1]
  )
  want = _torch_logits(ref, ids, mask, processed)
  assert np.abs(_ours_logits(ref, ids, mask, processed) - want).max() <= TOL
  out = str(tmp_path / "saved")
  save_qwen2_5_vl(ref["model"], ref["params"], out)
  reloaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(out).eval()
  assert reloaded.config.tie_word_embeddings
  again = _torch_logits(dict(ref, torch_model=reloaded), ids, mask, processed)
  np.testing.assert_allclose(again, want, atol=1e-6)


def test_greedy_generation_token_identical(reference, tokenizer):
  vis = "<|vision_start|><|image_pad|><|vision_end|>"
  texts = [f"{vis} describe", f"a red circle and {vis} what is in this image"]
  ids, mask, processed = _prompts(tokenizer, texts, _images()[:2])
  tm = reference["torch_model"]
  with torch.no_grad():
    want = tm.generate(
      input_ids=torch.as_tensor(ids),
      attention_mask=torch.as_tensor(mask),
      pixel_values=torch.as_tensor(processed["pixel_values"]),
      image_grid_thw=torch.as_tensor(processed["image_grid_thw"]),
      mm_token_type_ids=torch.as_tensor((ids == tm.config.image_token_id).astype(np.int64)),
      max_new_tokens=32,
      min_new_tokens=32,
      do_sample=False,
      eos_token_id=None,
      pad_token_id=0,
    ).numpy()[:, ids.shape[1] :]
  config = gen.GenerationConfig(max_new_tokens=32)
  got = np.asarray(
    gen.generate(
      reference["model"],
      reference["params"],
      ids,
      mask,
      pixel_values=processed["pixel_values"],
      image_grid_thw=processed["image_grid_thw"],
      config=config,
    )
  )
  print("generated", got.tolist())
  assert len(set(got[0].tolist())) > 1, "degenerate generation cannot test the cache"
  np.testing.assert_array_equal(got, want)


def test_text_generation_stop_tokens_and_scoring(reference, tokenizer):
  ids, mask, _ = _prompts(tokenizer, ["a red", "the blue square and a green circle is"], [])
  tm = reference["torch_model"]
  greedy = gen.GenerationConfig(max_new_tokens=12)
  got = np.asarray(gen.generate(reference["model"], reference["params"], ids, mask, config=greedy))
  with torch.no_grad():
    want = tm.generate(
      input_ids=torch.as_tensor(ids),
      attention_mask=torch.as_tensor(mask),
      max_new_tokens=12,
      min_new_tokens=12,
      do_sample=False,
      eos_token_id=None,
      pad_token_id=0,
    ).numpy()[:, ids.shape[1] :]
  np.testing.assert_array_equal(got, want)
  # Stop on the third token of sample 0: it is padded after, sample 1 runs on unchanged.
  stop = int(got[0, 2])
  if stop in got[1].tolist():
    pytest.fail("pick a stop token only sample 0 emits")
  stopped = np.asarray(
    gen.generate(
      reference["model"],
      reference["params"],
      ids,
      mask,
      config=gen.GenerationConfig(max_new_tokens=12, stop_token_ids=(stop,), pad_token_id=-1),
    )
  )
  first = got[0].tolist().index(stop)
  np.testing.assert_array_equal(stopped[0, : first + 1], got[0, : first + 1])
  assert (stopped[0, first + 1 :] == -1).all()
  np.testing.assert_array_equal(stopped[1], got[1])
  # Scoring: logits at chosen positions equal the full forward's.
  positions = np.array([[ids.shape[1] - 1, ids.shape[1] - 2], [0, 3]])
  full = _torch_logits(reference, ids, mask, None)
  scored = np.asarray(gen.score(reference["model"], reference["params"], ids, positions, mask))
  want_scored = np.take_along_axis(full, positions[..., None], axis=1)
  assert np.abs(scored - want_scored).max() <= TOL
  # Sampling: reproducible for one key, top_p -> 0 is greedy.
  sample = gen.GenerationConfig(max_new_tokens=12, temperature=0.7, top_p=0.9)
  a = gen.generate(
    reference["model"], reference["params"], ids, mask, config=sample, rng=jax.random.key(1)
  )
  b = gen.generate(
    reference["model"], reference["params"], ids, mask, config=sample, rng=jax.random.key(1)
  )
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  nucleus = gen.GenerationConfig(max_new_tokens=12, temperature=1.0, top_p=1e-6)
  np.testing.assert_array_equal(
    np.asarray(gen.generate(reference["model"], reference["params"], ids, mask, config=nucleus)),
    got,
  )


def test_top_p_filter_matches_transformers():
  from transformers.generation.logits_process import TopPLogitsWarper

  logits = np.random.default_rng(0).normal(size=(4, 50)).astype(np.float32) * 3
  for p in (0.3, 0.8, 0.95):
    want = TopPLogitsWarper(p)(None, torch.from_numpy(logits.copy())).numpy()
    got = np.asarray(gen.top_p_filter(jnp.asarray(logits), p))
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))


def test_bad_inputs(reference, tokenizer):
  ids, mask, processed = _prompts(
    tokenizer, ["<|vision_start|><|image_pad|><|vision_end|>"], _images()[:1]
  )
  with pytest.raises(ValueError, match="do not match"):
    reference["model"].apply(
      {"params": reference["params"]},
      jnp.asarray(ids[:, 2:]),
      pixel_values=jnp.asarray(processed["pixel_values"]),
      image_grid_thw=processed["image_grid_thw"],
    )
  with pytest.raises(ValueError, match="left-padded"):
    right = np.concatenate([ids, np.zeros_like(ids[:, :1])], axis=1)
    gen.generate(
      reference["model"],
      reference["params"],
      right,
      np.concatenate([mask, np.zeros_like(mask[:, :1])], axis=1),
    )
  with pytest.raises(ValueError, match="multiples of spatial_merge_size"):
    vision_layout([[1, 3, 4]], reference["model"].vision_config)


def test_7b_parameter_count_matches_transformers():
  """jax.eval_shape of the Qwen2.5-VL-7B config vs transformers' count (meta device, no
  weights)."""
  from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

  from qwen_image_rl.models.mmdit import count_params
  from qwen_image_rl.models.qwen2_5_vl_full import QWEN2_5_VL_7B_CONFIG, Qwen25VL

  with torch.device("meta"):
    reference = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**QWEN2_5_VL_7B_CONFIG))
  want = sum(p.numel() for p in reference.parameters())
  model = Qwen25VL.from_config(QWEN2_5_VL_7B_CONFIG, dtype=jnp.bfloat16)
  got = count_params(model.abstract_params())
  print(f"Qwen2.5-VL-7B: {got:,} params (transformers {want:,})")
  assert got == want
  assert 8.0e9 < got < 8.5e9
