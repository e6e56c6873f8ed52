"""Qwen2.5-VL text path + Qwen-Image prompt encoding vs transformers / diffusers (float32)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen_image_rl.convert.safetensors_io import CheckpointError, save_state_dict
from qwen_image_rl.convert.text_encoder import (
  load_text_encoder,
  params_from_torch_state_dict,
  save_text_encoder,
)
from qwen_image_rl.data.tokenizer import build_qwen_tokenizer
from qwen_image_rl.models import text_encoding as te
from qwen_image_rl.models.qwen2_5_vl import Qwen25VLTextModel
from qwen_image_rl.parallel import (
  DEFAULT_LOGICAL_AXIS_RULES,
  make_mesh,
  sharding_context,
  tree_shardings,
)
from tests import tiny_reference

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch

WORDS = [
  "a",
  "an",
  "the",
  "one",
  "two",
  "three",
  "red",
  "green",
  "blue",
  "yellow",
  "white",
  "black",
  "circle",
  "square",
  "triangle",
  "star",
  "small",
  "big",
  "tiny",
  "huge",
  "left",
  "right",
  "above",
  "below",
  "of",
  "next",
  "to",
  "and",
  "with",
  "on",
  "in",
  "sky",
  "sun",
  "moon",
  "face",
  "smiling",
  "glasses",
  "letter",
  "digit",
  "make",
  "it",
  "move",
  "remove",
  "add",
]
PROMPTS = [
  "a red circle",
  "two big blue squares left of a small yellow triangle above the green star",
  "a smiling face with glasses",
]
TOL = 1e-4


def _tiny_config(tokenizer):
  return tiny_reference.tiny_qwen2_5_vl_config(tokenizer, text_hidden=32)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  return build_qwen_tokenizer(WORDS, str(tmp_path_factory.mktemp("tokenizer")))


@pytest.fixture(scope="module")
def reference(tokenizer, tmp_path_factory):
  """A tiny random transformers model (with O(1) weights, so errors are not hidden), saved."""
  from transformers import Qwen2_5_VLForConditionalGeneration

  torch.manual_seed(0)
  model = Qwen2_5_VLForConditionalGeneration(_tiny_config(tokenizer)).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight") or "layernorm" in name:
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      elif "embed_tokens" in name:
        p.normal_(0.0, 1.0)
      else:
        p.normal_(0.0, 0.15)
  directory = str(tmp_path_factory.mktemp("text_encoder"))
  model.save_pretrained(directory)
  flax_model, params = load_text_encoder(directory)
  return dict(torch_model=model, directory=directory, model=flax_model, params=params)


def _torch_last_hidden(torch_model, input_ids, attention_mask=None, position_ids=None):
  kwargs = dict(
    input_ids=torch.as_tensor(np.asarray(input_ids), dtype=torch.long), output_hidden_states=True
  )
  if attention_mask is not None:
    kwargs["attention_mask"] = torch.as_tensor(np.asarray(attention_mask), dtype=torch.long)
  if position_ids is not None:
    kwargs["position_ids"] = torch.as_tensor(np.asarray(position_ids), dtype=torch.long)
  with torch.no_grad():
    return torch_model(**kwargs).hidden_states[-1].numpy()


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_forward_matches_transformers(reference, tokenizer, padding_side):
  texts = [te.T2I_TEMPLATE.format(p) for p in PROMPTS]
  old_side = tokenizer.padding_side
  tokenizer.padding_side = padding_side
  try:
    enc = tokenizer(texts, padding=True, return_tensors="np")
  finally:
    tokenizer.padding_side = old_side
  ids, mask = enc["input_ids"], enc["attention_mask"]
  assert (mask == 0).any(), "the batch must actually be padded"
  want = _torch_last_hidden(reference["torch_model"], ids, mask)
  got = np.asarray(
    jax.jit(reference["model"].apply)(
      {"params": reference["params"]}, jnp.asarray(ids), jnp.asarray(mask)
    )
  )
  valid = mask.astype(bool)
  err = np.abs(got - want)[valid].max()
  print(
    f"{padding_side}-padded hidden_states[-1] max abs err {err:.2e} "
    f"(max |x| {np.abs(want[valid]).max():.2f})"
  )
  assert err <= TOL


def test_three_stream_mrope_and_inputs_embeds(reference, tokenizer):
  """Distinct (t, h, w) position streams exercise the mrope_section recomposition."""
  ids = tokenizer([te.T2I_TEMPLATE.format(PROMPTS[1])], return_tensors="np")["input_ids"]
  length = ids.shape[1]
  rng = np.random.default_rng(0)
  position_ids = np.stack(
    [np.arange(length), rng.integers(0, 40, length), rng.integers(0, 40, length)]
  )[:, None, :]
  want = _torch_last_hidden(reference["torch_model"], ids, position_ids=position_ids)
  model, params = reference["model"], reference["params"]
  got = np.asarray(
    model.apply({"params": params}, jnp.asarray(ids), position_ids=jnp.asarray(position_ids))
  )
  err = np.abs(got - want).max()
  print(f"3-stream mRoPE max abs err {err:.2e}")
  assert err <= TOL
  embeds = params["embed_tokens"]["embedding"][ids]
  got_embeds = model.apply(
    {"params": params}, inputs_embeds=embeds, position_ids=jnp.asarray(position_ids)
  )
  np.testing.assert_allclose(np.asarray(got_embeds), got, atol=1e-6)


def test_template_drop_index(tokenizer):
  # Our tokenizer makes each template word one token, as the real Qwen vocabulary does, so it
  # reproduces diffusers' hard-coded start indices.
  assert te.template_drop_index(tokenizer, te.T2I_TEMPLATE) == te.T2I_DROP_IDX == 34
  assert te.template_drop_index(tokenizer, te.EDIT_TEMPLATE) == te.EDIT_DROP_IDX == 64
  assert te.template_drop_index(tokenizer, te.EDIT_PLUS_TEMPLATE) == 64
  drop = te.template_drop_index(tokenizer, te.EDIT_TEMPLATE)
  ids = tokenizer(te.EDIT_TEMPLATE.format("make it red"))["input_ids"]
  assert tokenizer.convert_ids_to_tokens(ids[drop]) == "<|vision_start|>"
  ids = tokenizer(te.T2I_TEMPLATE.format("red circle"))["input_ids"]
  assert tokenizer.decode(ids[34:36]) == "red circle"


def _tiny_pipeline(reference, tokenizer):
  from diffusers import (
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
  )

  torch.manual_seed(0)
  transformer = QwenImageTransformer2DModel(
    patch_size=2,
    in_channels=16,
    out_channels=4,
    num_layers=1,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    axes_dims_rope=(8, 4, 4),
  )
  vae = AutoencoderKLQwenImage(
    base_dim=24,
    z_dim=4,
    dim_mult=[1, 2, 4],
    num_res_blocks=1,
    temperal_downsample=[False, True],
    latents_mean=[0.0] * 4,
    latents_std=[1.0] * 4,
  )
  pipe = QwenImagePipeline(
    scheduler=FlowMatchEulerDiscreteScheduler(),
    vae=vae,
    text_encoder=reference["torch_model"],
    tokenizer=tokenizer,
    transformer=transformer,
  )
  # diffusers' 34 counts real-Qwen tokens; with this tokenizer it is the same by construction.
  pipe.prompt_template_encode_start_idx = te.template_drop_index(tokenizer, te.T2I_TEMPLATE)
  return pipe


@pytest.mark.parametrize(
  "max_sequence_length,padding_side", [(512, "right"), (5, "right"), (512, "left")]
)
def test_encode_prompts_matches_diffusers(reference, tokenizer, max_sequence_length, padding_side):
  pipe = _tiny_pipeline(reference, tokenizer)
  drop = pipe.prompt_template_encode_start_idx
  old_side = tokenizer.padding_side
  tokenizer.padding_side = padding_side  # diffusers pads on this side; we always pad right.
  try:
    with torch.no_grad():
      want, want_mask = pipe.encode_prompt(
        PROMPTS, device="cpu", max_sequence_length=max_sequence_length
      )
  finally:
    tokenizer.padding_side = old_side
  want = want.numpy()
  want_mask = np.ones(want.shape[:2], np.int64) if want_mask is None else want_mask.numpy()
  got, got_mask = te.encode_prompts(
    reference["model"],
    reference["params"],
    tokenizer,
    PROMPTS,
    template=te.T2I_TEMPLATE,
    drop_idx=drop,
    max_sequence_length=max_sequence_length,
  )
  assert got.shape == want.shape, (got.shape, want.shape)
  np.testing.assert_array_equal(np.asarray(got_mask), want_mask)
  err = np.abs(np.asarray(got) - want).max()
  print(
    f"encode_prompts (max_sequence_length={max_sequence_length}, diffusers padding "
    f"{padding_side}) shape {want.shape} "
    f"max abs err {err:.2e}"
  )
  assert err <= TOL
  if max_sequence_length == 512:
    assert (want_mask == 0).any()  # ragged batch: the padding path is exercised


def test_bfloat16_error_is_no_worse_than_transformers(reference, tokenizer):
  """bf16 compute: our error vs the float32 reference stays within 2x transformers' own."""
  import copy

  enc = tokenizer([te.T2I_TEMPLATE.format(p) for p in PROMPTS], padding=True, return_tensors="np")
  ids, mask = enc["input_ids"], enc["attention_mask"]
  valid = mask.astype(bool)
  want = _torch_last_hidden(reference["torch_model"], ids, mask)
  torch_bf16 = copy.deepcopy(reference["torch_model"]).to(torch.bfloat16)
  torch_err = np.abs(_torch_bf16_hidden(torch_bf16, ids, mask) - want)[valid].max()
  model, params = load_text_encoder(reference["directory"], dtype=jnp.bfloat16)
  got = model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
  assert got.dtype == jnp.bfloat16
  ours_err = np.abs(np.asarray(got, np.float32) - want)[valid].max()
  print(f"bfloat16 max abs err vs float32: ours {ours_err:.3e}, transformers {torch_err:.3e}")
  assert ours_err <= 2 * torch_err + 1e-2


def _torch_bf16_hidden(torch_model, ids, mask):
  with torch.no_grad():
    out = torch_model(
      input_ids=torch.as_tensor(ids),
      attention_mask=torch.as_tensor(mask),
      output_hidden_states=True,
    ).hidden_states[-1]
  return out.float().numpy()


def test_config_forms_agree():
  v5 = {
    "text_config": {
      "vocab_size": 10,
      "hidden_size": 64,
      "intermediate_size": 8,
      "num_hidden_layers": 1,
      "num_attention_heads": 2,
      "num_key_value_heads": 1,
      "rms_norm_eps": 1e-6,
      "rope_parameters": {"rope_type": "default", "rope_theta": 5e5, "mrope_section": [4, 6, 6]},
    }
  }
  legacy = {
    "vocab_size": 10,
    "hidden_size": 64,
    "intermediate_size": 8,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "rms_norm_eps": 1e-6,
    "rope_theta": 5e5,
    "rope_scaling": {"type": "mrope", "mrope_section": [4, 6, 6]},
  }
  assert Qwen25VLTextModel.from_config(v5) == Qwen25VLTextModel.from_config(legacy)
  assert Qwen25VLTextModel.from_config(legacy).mrope_section == (4, 6, 6)
  with pytest.raises(ValueError, match="mrope_section"):
    bad = dict(legacy, rope_scaling={"type": "mrope", "mrope_section": [1, 1, 1]})
    Qwen25VLTextModel.from_config(bad).init(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32))


def test_save_round_trip_through_transformers(reference, tmp_path):
  from transformers import Qwen2_5_VLForConditionalGeneration

  model, params, extra = load_text_encoder(reference["directory"], return_extra=True)
  assert any(k.startswith("visual.") for k in extra["state"])
  out_dir = str(tmp_path / "saved")
  save_text_encoder(model, params, out_dir, extra_state=extra["state"], config=extra["config"])
  reloaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(out_dir).eval()
  original = reference["torch_model"].state_dict()
  restored = reloaded.state_dict()
  assert set(original) == set(restored)
  for key, value in original.items():
    assert torch.equal(value, restored[key]), key
  ids = np.array([[3, 17, 40, 9, 101]])
  np.testing.assert_array_equal(
    _torch_last_hidden(reloaded, ids), _torch_last_hidden(reference["torch_model"], ids)
  )


def test_load_sharded_and_v5_prefix(reference, tmp_path):
  torch_model, model, params = (reference[k] for k in ("torch_model", "model", "params"))
  sharded = str(tmp_path / "sharded")
  torch_model.save_pretrained(sharded, max_shard_size="20KB")
  assert any(n.endswith(".safetensors.index.json") for n in os.listdir(sharded))
  _, sharded_params = load_text_encoder(sharded)
  jax.tree.map(np.testing.assert_array_equal, sharded_params, params)

  v5 = str(tmp_path / "v5")
  state = {k: v.numpy() for k, v in torch_model.state_dict().items()}
  assert any(k.startswith("model.language_model.") for k in state)
  save_state_dict(state, v5, filename="model.safetensors")
  with open(os.path.join(v5, "config.json"), "w") as f:
    f.write(torch_model.config.to_json_string())
  _, v5_params = load_text_encoder(v5)
  jax.tree.map(np.testing.assert_array_equal, v5_params, params)


@pytest.mark.parametrize("problem", ["missing", "unexpected", "wrong_shape"])
def test_bad_checkpoint_names_the_key(reference, problem):
  from safetensors.numpy import load_file

  state = load_file(os.path.join(reference["directory"], "model.safetensors"))
  key = "model.layers.1.self_attn.k_proj.bias"
  if problem == "missing":
    del state[key]
  elif problem == "unexpected":
    key = "model.layers.0.self_attn.rotary.inv_freq"
    state[key] = np.zeros(4, np.float32)
  else:
    state[key] = np.zeros(3, np.float32)
  with pytest.raises(CheckpointError, match=key.replace(".", r"\.")) as info:
    params_from_torch_state_dict(state, reference["model"])
  assert problem.split("_")[0] in str(info.value)


def test_sharded_scanned_forward_matches_single_device(reference, tokenizer):
  model, params = reference["model"], reference["params"]
  state = {k: v.numpy() for k, v in reference["torch_model"].state_dict().items()}
  scan_model = Qwen25VLTextModel.from_config(
    reference["torch_model"].config.to_dict(), scan_layers=True, remat_policy="full"
  )
  scan_params = params_from_torch_state_dict(state, scan_model)
  prompts = PROMPTS + ["a tiny white moon in the sky"]
  enc = tokenizer([te.T2I_TEMPLATE.format(p) for p in prompts], padding=True, return_tensors="np")
  ids, mask = jnp.asarray(enc["input_ids"]), jnp.asarray(enc["attention_mask"])
  want = np.asarray(model.apply({"params": params}, ids, mask))

  mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  rules = DEFAULT_LOGICAL_AXIS_RULES
  abstract = jax.eval_shape(scan_model.init, jax.random.PRNGKey(0), ids, mask)["params"]
  shardings = tree_shardings(abstract, mesh, rules)
  q_spec = shardings["layers"]["layer"]["self_attn"]["q_proj"]["kernel"].spec
  assert "tensor" in jax.tree.leaves(tuple(q_spec)), q_spec  # really split, not replicated
  placed = jax.tree.map(jax.device_put, scan_params, shardings)

  def forward(p, i, m):
    return scan_model.apply({"params": p}, i, m)

  with sharding_context(mesh, rules):
    got = jax.jit(forward)(placed, ids, mask)
  assert len(got.sharding.device_set) == 8
  valid = np.asarray(mask).astype(bool)
  err = np.abs(np.asarray(got) - want)[valid].max()
  print(f"sharded (data2 fsdp2 tensor2) scanned+remat vs single device max abs err {err:.2e}")
  assert err <= 1e-5
