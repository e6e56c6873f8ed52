"""The one prompt encoder of training code: conditioning padded to a fixed token count.

Trainers encode whole prompt sets once and index into them per batch, so every batch has the
same text length (one compile). Embeddings are exactly the pipelines' `encode_prompt` (diffusers'
template and drop index), zero-padded with mask 0 past each prompt's end.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from qwen_image_rl.models import text_encoding


class PromptTooLongError(ValueError):
  """A prompt has more tokens than the fixed length and truncation was not allowed."""


def encode_fixed_length(
  text_encoder,
  params,
  tokenizer,
  texts: Sequence[str],
  *,
  template: str,
  drop_idx: int,
  length: int,
  truncate: bool = False,
  chunk: int = 256,
):
  """(cond float32 [N, length, D], mask int32 [N, length]) of `texts` under `template`.

  truncate=False raises PromptTooLongError when a prompt has more than `length` tokens (after
  the template's dropped prefix); True cuts it to `length`, as the pipelines'
  `max_sequence_length` does.
  """
  if not truncate:
    ids = tokenizer([template.format(t) for t in texts])["input_ids"]
    longest = max(len(row) for row in ids) - drop_idx
    if longest > length:
      raise PromptTooLongError(
        f"would truncate prompts: the longest has {longest} tokens (limit {length})"
      )
  cond = np.zeros((len(texts), length, text_encoder.hidden_size), np.float32)
  mask = np.zeros((len(texts), length), np.int32)
  for i in range(0, len(texts), chunk):
    e, m = text_encoding.encode_prompts(
      text_encoder,
      params,
      tokenizer,
      list(texts[i : i + chunk]),
      template=template,
      drop_idx=drop_idx,
      max_sequence_length=length,
    )
    e, m = np.asarray(e, np.float32)[:, :length], np.asarray(m)[:, :length]
    cond[i : i + len(e), : e.shape[1]] = e
    mask[i : i + len(e), : m.shape[1]] = m
  return cond, mask
