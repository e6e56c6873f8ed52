"""Qwen-Image prompt encoding: template, tokenise, run Qwen2.5-VL, keep the prompt's tokens.

Matches diffusers `QwenImagePipeline._get_qwen_prompt_embeds` + `encode_prompt`:
  1. format each prompt into the chat template and tokenise it;
  2. run the text model, take the last hidden state (after the final RMSNorm);
  3. per sample keep the attention_mask==1 tokens, drop the first `drop_idx` (the system prompt
     and "<|im_start|>user\\n"), right-pad with zeros to the batch max, build a 0/1 mask;
  4. truncate to `max_sequence_length`.
Differences, on purpose:
  * The mask is always returned as an int array; diffusers returns None when it is all ones.
  * We tokenise to `min(max_sequence_length, 1024) + drop_idx` tokens instead of diffusers'
    `1024 + drop_idx`. The model is causal, so the kept embeddings are identical; shorter inputs
    are cheaper.
  * Token arrays are right-padded by us (to a multiple of `pad_to_multiple_of`, to bound jit
    recompiles) whatever the tokenizer's padding side: RoPE is relative and attention causal, so
    valid-token embeddings do not depend on the padding (equal up to float rounding).
The ragged bookkeeping (lengths, gather indices) is numpy; the jitted part sees fixed shapes.

Edit prompts with source images (`encode_prompts_with_images`) follow diffusers' Edit /
Edit-Plus `_get_qwen_prompt_embeds`: image placeholders expanded by the Qwen2-VL processor rule,
the full VL model (vision tower + language model), no truncation.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qwen_image_rl.models.qwen2_5_vl_processor import expand_image_tokens

T2I_TEMPLATE = (
  "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, "
  "quantity, text, spatial relationships of the objects and background:<|im_end|>\n"
  "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
# diffusers' prompt_template_encode_start_idx for T2I: tokens of the real Qwen tokenizer up to and
# including "<|im_start|>user\n".
T2I_DROP_IDX = 34

EDIT_TEMPLATE = (
  "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, "
  "texture, objects, background), then explain how the user's text instruction should alter or "
  "modify the image. Generate a new image that meets the user's requirements while maintaining "
  "consistency with the original input where appropriate.<|im_end|>\n<|im_start|>user\n"
  "<|vision_start|><|image_pad|><|vision_end|>{}<|im_end|>\n<|im_start|>assistant\n"
)
# Edit-Plus template: the "Picture i: <|vision_start|>...<|vision_end|>" prefixes go into the
# prompt itself.
EDIT_PLUS_TEMPLATE = EDIT_TEMPLATE.replace("<|vision_start|><|image_pad|><|vision_end|>{}", "{}")
# diffusers' start_idx for Edit / Edit-Plus: again the real-tokenizer token count up to and
# including "<|im_start|>user\n"; the vision tokens that follow are kept.
EDIT_DROP_IDX = 64

# diffusers' `tokenizer_max_length`: prompts longer than this many tokens are cut.
TOKENIZER_MAX_LENGTH = 1024

_USER_TURN = "<|im_start|>user\n"


def template_drop_index(tokenizer, template: str) -> int:
  """Number of tokens of `template` up to and including "<|im_start|>user\\n".

  This is what diffusers' hard-coded start indices count: with the real Qwen2.5-VL tokenizer it
  gives 34 for T2I_TEMPLATE and 64 for EDIT_TEMPLATE / EDIT_PLUS_TEMPLATE (not checkable here:
  the real tokenizer cannot be loaded offline). For the edit templates the vision tokens come
  after this prefix and are kept, as in diffusers. With our small tokenizers the count differs,
  so pipelines compute it once with this function and pass `drop_idx` explicitly.
  The prefix ends at a newline that is its own pre-token (Qwen's regex isolates "\\n" before a
  letter or a special token), so the prefix tokenises the same alone as inside a full prompt.
  """
  pos = template.find(_USER_TURN)
  if pos < 0:
    raise ValueError(f"template has no {_USER_TURN!r} turn: {template[:80]!r}...")
  if template.find("{}") < pos:
    raise ValueError("template's '{}' slot comes before the user turn")
  prefix = template[: pos + len(_USER_TURN)]
  return len(tokenizer(prefix, add_special_tokens=False)["input_ids"])


@dataclasses.dataclass(frozen=True)
class TokenizedPrompts:
  """Right-padded token arrays plus the numpy bookkeeping that turns hidden states into embeds.

  input_ids, attention_mask: [B, L] int32, L a multiple of `pad_to_multiple_of`.
  gather_index: [B, S] int32 positions (into L) of each sample's kept tokens, 0 where padded.
  prompt_mask: [B, S] int32, 1 for real prompt tokens. S = min(max kept length, max_seq_len).
  """

  input_ids: np.ndarray
  attention_mask: np.ndarray
  gather_index: np.ndarray
  prompt_mask: np.ndarray


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def tokenize_prompts(
  tokenizer,
  prompts: Sequence[str] | str,
  template: str,
  drop_idx: int,
  max_sequence_length: int = 512,
  *,
  pad_to_multiple_of: int = 32,
) -> TokenizedPrompts:
  """Format `prompts` into `template`, tokenise, and precompute what encode keeps.

  drop_idx: leading template tokens to drop (T2I_DROP_IDX / EDIT_DROP_IDX for the real
    tokenizer, `template_drop_index(tokenizer, template)` for others).
  max_sequence_length: kept prompt tokens per sample (diffusers' default call value is 512;
    at most TOKENIZER_MAX_LENGTH).
  """
  if isinstance(prompts, str):
    prompts = [prompts]
  if not prompts:
    raise ValueError("tokenize_prompts: empty prompt list")
  if "{}" not in template:
    raise ValueError("template must contain a '{}' slot for the prompt")
  if not 0 < max_sequence_length <= TOKENIZER_MAX_LENGTH:
    raise ValueError(
      f"max_sequence_length={max_sequence_length}: must be in "
      f"(0, {TOKENIZER_MAX_LENGTH}] (diffusers' limit)"
    )
  if drop_idx < 0:
    raise ValueError(f"drop_idx={drop_idx} must be >= 0")
  texts = [template.format(p) for p in prompts]
  max_tokens = max_sequence_length + drop_idx
  enc = tokenizer(
    texts, max_length=max_tokens, truncation=True, padding=False, add_special_tokens=True
  )
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  return pack_token_lists(
    enc["input_ids"], pad_id, drop_idx, max_sequence_length, pad_to_multiple_of
  )


def pack_token_lists(
  token_lists: Sequence[Sequence[int]],
  pad_id: int,
  drop_idx: int,
  max_keep: int,
  pad_to_multiple_of: int = 32,
) -> TokenizedPrompts:
  """Right-pad token lists and precompute the gather that keeps tokens drop_idx onwards
  (at most `max_keep` per sample)."""
  ids = [list(x) for x in token_lists]
  lengths = np.array([len(x) for x in ids])
  too_short = np.flatnonzero(lengths <= drop_idx)
  if too_short.size:
    raise ValueError(
      f"prompts {too_short.tolist()} have <= drop_idx={drop_idx} tokens "
      f"({lengths[too_short].tolist()}); is drop_idx right for this tokenizer?"
    )

  batch = len(ids)
  length = _round_up(int(lengths.max()), pad_to_multiple_of)
  input_ids = np.full((batch, length), pad_id, np.int32)
  attention_mask = np.zeros((batch, length), np.int32)
  for b, row in enumerate(ids):
    input_ids[b, : len(row)] = row
    attention_mask[b, : len(row)] = 1

  kept = np.minimum(lengths - drop_idx, max_keep)
  seq = int(kept.max())
  positions = np.arange(seq)[None, :]
  prompt_mask = (positions < kept[:, None]).astype(np.int32)
  gather_index = np.where(prompt_mask == 1, drop_idx + positions, 0).astype(np.int32)
  return TokenizedPrompts(input_ids, attention_mask, gather_index, prompt_mask)


@functools.partial(jax.jit, static_argnums=0)
def _encode_tokens(model: nn.Module, params, input_ids, attention_mask, gather_index, prompt_mask):
  hidden = model.apply({"params": params}, input_ids, attention_mask)
  embeds = jnp.take_along_axis(hidden, gather_index[..., None], axis=1)
  return jnp.where(prompt_mask[..., None] == 1, embeds, jnp.zeros((), embeds.dtype))


def encode_tokenized(model: nn.Module, params, tokens: TokenizedPrompts):
  """Jitted text-model forward + gather. Returns (prompt_embeds [B,S,H], prompt_mask [B,S])."""
  embeds = _encode_tokens(
    model,
    params,
    jnp.asarray(tokens.input_ids),
    jnp.asarray(tokens.attention_mask),
    jnp.asarray(tokens.gather_index),
    jnp.asarray(tokens.prompt_mask),
  )
  return embeds, jnp.asarray(tokens.prompt_mask)


def encode_prompts(
  model: nn.Module,
  params,
  tokenizer,
  prompts: Sequence[str] | str,
  *,
  template: str,
  drop_idx: int,
  max_sequence_length: int = 512,
  pad_to_multiple_of: int = 32,
):
  """Qwen-Image prompt embeddings, as diffusers QwenImagePipeline.encode_prompt computes them.

  Returns (prompt_embeds [B, S, H] in the model dtype, prompt_embeds_mask [B, S] int32).
  To run sharded, call it under `parallel.sharding_context(mesh, rules)` with sharded params.
  """
  tokens = tokenize_prompts(
    tokenizer,
    prompts,
    template,
    drop_idx,
    max_sequence_length,
    pad_to_multiple_of=pad_to_multiple_of,
  )
  return encode_tokenized(model, params, tokens)


# diffusers QwenImageEditPlusPipeline: each reference image is announced in the user turn.
EDIT_PLUS_IMAGE_PROMPT = "Picture {}: <|vision_start|><|image_pad|><|vision_end|>"


def edit_plus_prompt(prompt: str, num_images: int) -> str:
  """ "Picture 1: <image>Picture 2: <image>..." + prompt, as diffusers' Edit-Plus builds it."""
  return "".join(EDIT_PLUS_IMAGE_PROMPT.format(i + 1) for i in range(num_images)) + prompt


@functools.partial(jax.jit, static_argnums=0)
def _encode_vl_tokens(
  model: nn.Module,
  params,
  input_ids,
  attention_mask,
  position_ids,
  pixel_values,
  vision_layout,
  gather_index,
  prompt_mask,
):
  hidden = model.apply(
    {"params": params},
    input_ids,
    attention_mask,
    pixel_values,
    position_ids=position_ids,
    vision_layout=vision_layout,
    output_hidden=True,
  )
  embeds = jnp.take_along_axis(hidden, gather_index[..., None], axis=1)
  return jnp.where(prompt_mask[..., None] == 1, embeds, jnp.zeros((), embeds.dtype))


def encode_prompts_with_images(
  model: nn.Module,
  params,
  tokenizer,
  image_processor,
  texts: Sequence[str],
  images: Sequence,
  *,
  drop_idx: int,
  mrope: bool = True,
  pad_to_multiple_of: int = 32,
):
  """Embeddings of full prompt `texts` whose `<|image_pad|>` placeholders show `images`.

  Matches diffusers' Edit / Edit-Plus `_get_qwen_prompt_embeds`: the Qwen2-VL processor expands
  each placeholder to its image's merged-token count, the VL model (vision tower + language
  model, `Qwen25VL` with params {"visual", "language_model"}) runs, and per sample the tokens
  from `drop_idx` on are kept (no truncation, as diffusers' edit pipelines). Images are taken
  in text order across the batch. mrope=True gives image tokens their 3-D rotary positions as
  the model was trained (transformers v4); mrope=False reproduces transformers v5 called as
  diffusers calls it (no mm_token_type_ids, so positions are arange(L)).
  Returns (prompt_embeds [B, S, H], prompt_embeds_mask [B, S] int32).
  """
  if not texts:
    raise ValueError("encode_prompts_with_images: empty prompt list")
  processed = image_processor(list(images))
  grid = processed["image_grid_thw"]
  expanded = expand_image_tokens(texts, grid, image_processor.merge_size)
  enc = tokenizer(expanded, padding=False, truncation=False, add_special_tokens=True)
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  tokens = pack_token_lists(
    enc["input_ids"], pad_id, drop_idx, max(map(len, enc["input_ids"])), pad_to_multiple_of
  )
  if mrope:
    position_ids = model.rope_index(tokens.input_ids, tokens.attention_mask, grid)[0]
  else:
    position_ids = np.broadcast_to(
      np.arange(tokens.input_ids.shape[1], dtype=np.int32), tokens.input_ids.shape
    )
  position_ids = jnp.asarray(position_ids)
  layout = {k: jnp.asarray(v) for k, v in model.layout(grid).items()}
  embeds = _encode_vl_tokens(
    model,
    params,
    jnp.asarray(tokens.input_ids),
    jnp.asarray(tokens.attention_mask),
    position_ids,
    jnp.asarray(processed["pixel_values"]),
    layout,
    jnp.asarray(tokens.gather_index),
    jnp.asarray(tokens.prompt_mask),
  )
  return embeds, jnp.asarray(tokens.prompt_mask)
