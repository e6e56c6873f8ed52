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


def trim_padding(cond, mask, multiple: int = 8):
  """(cond, mask) cut to the longest prompt's token count rounded up to `multiple` (never past
  the encoded length). Exact for the DiT: padding is masked out of attention and text RoPE
  positions do not depend on the padded length; a shorter text stream is cheaper in every block.
  """
  used = int(np.asarray(mask).sum(axis=1).max()) if len(mask) else 0
  length = min(cond.shape[1], max(multiple, -(-used // multiple) * multiple))
  return cond[:, :length], mask[:, :length]


# ------------------------------------------------------------------------------------------
# Pre-encoded prompt sets: encode once, train without the text encoder on the device
# ------------------------------------------------------------------------------------------

ENCODED_FORMAT = 1


def save_encoded_prompts(path: str, texts: Sequence[str], cond, mask) -> None:
  """Write fixed-length conditioning of `texts` (from `encode_fixed_length`) to an .npz file.

  Only the tokens up to the longest prompt's end are stored (past it every row is zero with
  mask 0); `load_encoded_prompts` pads back to the encoded length.
  """
  cond, mask = np.asarray(cond, np.float32), np.asarray(mask, np.int32)
  if cond.shape[:2] != mask.shape or len(texts) != len(cond):
    raise ValueError(
      f"save_encoded_prompts: {len(texts)} texts, cond {cond.shape} and mask {mask.shape} "
      "do not agree"
    )
  if len(set(texts)) != len(texts):
    raise ValueError("save_encoded_prompts: texts must be distinct (they are the lookup keys)")
  used = int(mask.sum(axis=1).max()) if len(mask) else 0
  if np.any(cond[:, used:]) or np.any(mask[:, used:]):
    raise ValueError("save_encoded_prompts: conditioning past every prompt's end is not zero")
  with open(path, "wb") as f:  # np.savez would append '.npz' to a path without it
    np.savez(
      f,
      format=np.int32(ENCODED_FORMAT),
      length=np.int32(cond.shape[1]),
      texts=np.asarray(list(texts), dtype=str),
      cond=cond[:, :used],
      mask=mask[:, :used],
    )


class EncodedPrompts:
  """A pre-encoded prompt set read from `save_encoded_prompts`' file, looked up by text."""

  def __init__(self, path: str):
    try:
      with np.load(path) as data:
        fields = {k: data[k] for k in data.files}
    except (OSError, ValueError) as e:
      raise ValueError(f"encoded prompts {path!r}: cannot read ({e})") from e
    missing = {"format", "length", "texts", "cond", "mask"} - set(fields)
    if missing or int(fields["format"]) != ENCODED_FORMAT:
      raise ValueError(
        f"encoded prompts {path!r}: not a format-{ENCODED_FORMAT} file from "
        f"save_encoded_prompts (missing {sorted(missing)})"
      )
    self.path = path
    self.length = int(fields["length"])
    self.cond, self.mask = fields["cond"], fields["mask"]
    self.index = {str(t): i for i, t in enumerate(fields["texts"])}

  def __len__(self):
    return len(self.index)

  def lookup(self, texts: Sequence[str], length: int):
    """(cond float32 [N, length, D], mask int32 [N, length]) of `texts`, as
    `encode_fixed_length(..., length=length, truncate=True)` gave them at encoding time."""
    if length != self.length:
      raise ValueError(
        f"encoded prompts {self.path!r} were encoded with {self.length} text tokens, "
        f"the config asks for {length} (data.max_text_tokens): encode them again"
      )
    missing = [t for t in texts if t not in self.index]
    if missing:
      raise ValueError(
        f"encoded prompts {self.path!r}: {len(missing)} prompt(s) are not in the file, e.g. "
        f"{missing[0]!r}; encode the run's prompt set again"
      )
    rows = np.array([self.index[t] for t in texts], np.int64)
    used = self.cond.shape[1]
    cond = np.zeros((len(rows), length, self.cond.shape[2]), np.float32)
    mask = np.zeros((len(rows), length), np.int32)
    cond[:, :used], mask[:, :used] = self.cond[rows], self.mask[rows]
    return cond, mask
