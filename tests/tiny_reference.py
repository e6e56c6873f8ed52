"""Tiny random diffusers Qwen-Image pipelines on disk, for parity tests and benchmarks.

Builds PyTorch reference components (diffusers / transformers, random weights scaled so that
errors cannot hide in near-zero activations), a locally trained Qwen tokenizer, and saves a
diffusers-format directory. Needs torch, diffusers and transformers (imported lazily).
"""

from __future__ import annotations

import os

WORDS = [
  "a",
  "an",
  "the",
  "one",
  "two",
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
  "left",
  "right",
  "above",
  "below",
  "of",
  "and",
  "with",
  "on",
  "in",
  "sky",
  "sun",
  "moon",
  "face",
  "make",
  "it",
  "move",
  "remove",
  "add",
  "blurry",
  "ugly",
]

# diffusers' scheduler config of the released Qwen-Image (dynamic shift, shift_terminal).
QWEN_IMAGE_SCHEDULER = dict(
  base_image_seq_len=256,
  base_shift=0.5,
  max_image_seq_len=8192,
  max_shift=0.9,
  num_train_timesteps=1000,
  shift=1.0,
  shift_terminal=0.02,
  time_shift_type="exponential",
  use_dynamic_shifting=True,
)


def tiny_qwen2_5_vl_config(tokenizer, text_hidden: int = 32):
  """A 2-layer transformers Qwen2_5_VLConfig whose special ids come from `tokenizer`."""
  from transformers import Qwen2_5_VLConfig

  from qwen_image_rl.data.tokenizer import special_token_ids

  ids = special_token_ids(tokenizer)
  vocab = len(tokenizer)
  return Qwen2_5_VLConfig(
    text_config=dict(
      vocab_size=vocab,
      hidden_size=text_hidden,
      intermediate_size=48,
      num_hidden_layers=2,
      num_attention_heads=4,
      num_key_value_heads=2,
      rope_scaling=dict(mrope_section=[1, 1, 2], rope_type="default", type="default"),
      rope_theta=1e6,
      rms_norm_eps=1e-6,
      bos_token_id=None,
      eos_token_id=ids["im_end_token_id"],
      pad_token_id=ids["pad_token_id"],
    ),
    vision_config=dict(
      depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=text_hidden
    ),
    vocab_size=vocab,
    image_token_id=ids["image_token_id"],
    video_token_id=ids["video_token_id"],
    vision_start_token_id=ids["vision_start_token_id"],
    vision_end_token_id=ids["vision_end_token_id"],
  )


def build_components(directory: str, *, text_hidden: int = 32, seed: int = 0):
  """Random torch components + tokenizer; the tokenizer is saved under directory/tokenizer."""
  import torch
  from diffusers import (
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    QwenImageTransformer2DModel,
  )
  from transformers import Qwen2_5_VLForConditionalGeneration

  from qwen_image_rl.data.tokenizer import build_qwen_tokenizer

  tokenizer = build_qwen_tokenizer(WORDS, os.path.join(directory, "tokenizer_src"))
  torch.manual_seed(seed)
  config = tiny_qwen2_5_vl_config(tokenizer, text_hidden)
  text_encoder = Qwen2_5_VLForConditionalGeneration(config).eval()
  transformer = QwenImageTransformer2DModel(
    patch_size=2,
    in_channels=16,
    out_channels=4,
    num_layers=2,
    attention_head_dim=16,
    num_attention_heads=3,
    joint_attention_dim=text_hidden,
    axes_dims_rope=(8, 4, 4),
  ).eval()
  vae = AutoencoderKLQwenImage(
    base_dim=24,
    z_dim=4,
    dim_mult=[1, 2, 4],
    num_res_blocks=1,
    temperal_downsample=[False, True],
    latents_mean=[0.1, -0.2, 0.3, -0.1],
    latents_std=[1.5, 0.8, 1.2, 2.0],
  ).eval()
  with torch.no_grad():
    for name, p in text_encoder.named_parameters():
      if name.endswith("norm.weight") or "layernorm" in name:
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      elif "embed_tokens" in name:
        p.normal_(0.0, 1.0)
      elif not name.startswith(("model.visual", "visual")):
        p.normal_(0.0, 0.15)
    for p in transformer.parameters():
      if p.dim() == 2:  # O(1) modulation so the timestep and CFG paths matter
        p.normal_(0.0, 1.0 / p.shape[1] ** 0.5)
    for name, p in vae.named_parameters():
      if name.endswith("gamma"):
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
  scheduler = FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER)
  return dict(
    transformer=transformer,
    vae=vae,
    text_encoder=text_encoder,
    tokenizer=tokenizer,
    scheduler=scheduler,
  )


def build_t2i(directory: str, **kwargs):
  """A diffusers QwenImagePipeline saved to `directory`; returns (pipeline, directory)."""
  from diffusers import QwenImagePipeline

  from qwen_image_rl.models import text_encoding

  parts = build_components(directory, **kwargs)
  pipe = QwenImagePipeline(**parts)
  # diffusers hard-codes 34 (real Qwen tokens up to "<|im_start|>user\n"); ours has fewer.
  pipe.prompt_template_encode_start_idx = text_encoding.template_drop_index(
    parts["tokenizer"], text_encoding.T2I_TEMPLATE
  )
  path = os.path.join(directory, "pipeline")
  pipe.save_pretrained(path)
  return pipe, path


def tiny_judge_config():
  """The reward_sft judge (Qwen2.5-VL) at toy width: the `model` section of a judge config (the
  notebooks' micro judge)."""
  import copy

  import ml_collections

  from qwen_image_rl.notebook_lib import MICRO_JUDGE_MODEL

  return ml_collections.ConfigDict(dict(model=copy.deepcopy(MICRO_JUDGE_MODEL)))
