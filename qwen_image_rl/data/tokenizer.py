"""A small Qwen2-style byte-level BPE tokenizer, built offline with the `tokenizers` library.

The real Qwen2.5-VL tokenizer (151k tokens) cannot be fetched here, and the tiny world needs a
vocabulary of its own anyway. `build_qwen_tokenizer` trains a byte-level BPE with exactly the
pipeline transformers' `Qwen2Tokenizer` uses (NFC, Qwen's split regex, byte-level mapping), adds
the Qwen special tokens, and saves `tokenizer.json` + `tokenizer_config.json` so that
`transformers.AutoTokenizer.from_pretrained(directory)` and `Qwen2Tokenizer.from_pretrained`
load it offline. Every training word becomes a single token (BPE merges run to completion), so
tiny-world captions tokenise into short, readable sequences.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence

# Qwen's special tokens, in the order of their ids in the real vocabulary (151643...). Ours get
# ids right after the BPE vocabulary, in this order.
QWEN_SPECIAL_TOKENS = (
  "<|endoftext|>",
  "<|im_start|>",
  "<|im_end|>",
  "<|vision_start|>",
  "<|vision_end|>",
  "<|image_pad|>",
  "<|video_pad|>",
)

# Same regex as transformers' Qwen2Tokenizer (and the real tokenizer.json).
QWEN_PRETOKENIZE_REGEX = (
  r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
  r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def _qwen_pipeline(tokenizer):
  """Install Qwen2's normaliser, pre-tokeniser and decoder on a `tokenizers.Tokenizer`."""
  from tokenizers import Regex, decoders, normalizers, pre_tokenizers

  tokenizer.normalizer = normalizers.NFC()
  tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
    [
      pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ]
  )
  tokenizer.decoder = decoders.ByteLevel()
  return tokenizer


def _training_corpus(words: Sequence[str], extra_texts: Iterable[str]) -> list[str]:
  # Qwen's regex glues a leading space to a word, so train both " word" and "word" forms.
  corpus = []
  for w in words:
    corpus.append(w)
    corpus.append(" " + w)
  corpus.extend(extra_texts)
  return corpus


def build_qwen_tokenizer(
  words: Sequence[str],
  directory: str,
  *,
  extra_texts: Iterable[str] | None = None,
  model_max_length: int = 32768,
  padding_side: str = "right",
):
  """Train a Qwen2-compatible byte-level BPE on `words` (+ `extra_texts`) and save it.

  Args:
    words: vocabulary words; each becomes one token (with and without a leading space).
    directory: where `tokenizer.json` and `tokenizer_config.json` are written.
    extra_texts: more training text. Defaults to the Qwen-Image prompt templates, so their
      system prompts tokenise compactly.
    model_max_length, padding_side: written to `tokenizer_config.json`.

  Returns:
    The saved tokenizer loaded back through `transformers.AutoTokenizer` (offline).
  """
  from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, trainers

  if padding_side not in ("left", "right"):
    raise ValueError(f"padding_side={padding_side!r}: expected 'left' or 'right'")
  if extra_texts is None:
    from qwen_image_rl.models import text_encoding  # Late import: templates live there.

    extra_texts = [
      t.replace("{}", "") for t in (text_encoding.T2I_TEMPLATE, text_encoding.EDIT_TEMPLATE)
    ]
  # Special tokens must not take part in BPE training; split the texts around them.
  extra_texts = [piece for t in extra_texts for piece in _split_special(t) if piece]

  tok = _qwen_pipeline(
    Tokenizer(
      models.BPE(
        unk_token=None,
        continuing_subword_prefix="",
        end_of_word_suffix="",
        fuse_unk=False,
        byte_fallback=False,
      )
    )
  )
  trainer = trainers.BpeTrainer(
    vocab_size=1_000_000,  # Never reached: merges stop once every pre-token is one token.
    min_frequency=1,
    show_progress=False,
    special_tokens=[],
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
  )
  tok.train_from_iterator(_training_corpus(list(words), extra_texts), trainer=trainer)
  tok.add_special_tokens(
    [AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS]
  )

  os.makedirs(directory, exist_ok=True)
  tok.save(os.path.join(directory, "tokenizer.json"))
  added = {
    str(tok.token_to_id(t)): {
      "content": t,
      "lstrip": False,
      "normalized": False,
      "rstrip": False,
      "single_word": False,
      "special": True,
    }
    for t in QWEN_SPECIAL_TOKENS
  }
  config = {
    "tokenizer_class": "Qwen2Tokenizer",
    "model_max_length": model_max_length,
    "padding_side": padding_side,
    "bos_token": None,
    "eos_token": "<|im_end|>",  # As in Qwen2.5-VL's tokenizer_config.json.
    "pad_token": "<|endoftext|>",
    "unk_token": None,
    "clean_up_tokenization_spaces": False,
    "split_special_tokens": False,
    "errors": "replace",
    "add_prefix_space": False,
    "added_tokens_decoder": added,
    "additional_special_tokens": [t for t in QWEN_SPECIAL_TOKENS if t != "<|endoftext|>"],
  }
  with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
    json.dump(config, f, indent=2)
  return load_tokenizer(directory)


def _split_special(text: str) -> list[str]:
  pattern = "|".join(re.escape(t) for t in QWEN_SPECIAL_TOKENS)
  return re.split(pattern, text)


def load_tokenizer(directory: str):
  """A transformers tokenizer from a local directory (ours or a real Qwen tokenizer).

  The class that tokenizer_config.json names (Qwen2Tokenizer for ours and Qwen-Image's) is
  loaded directly, which is what `AutoTokenizer` resolves to; `AutoTokenizer` itself imports
  PyTorch when it is installed (~2 s of CPU per process, on every host of a pod). Any other
  directory goes through `AutoTokenizer`.
  """
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"tokenizer directory not found: {directory}")
  import transformers

  cls = getattr(transformers, _configured_class(directory) or "", None)
  if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedTokenizerBase)):
    cls = transformers.AutoTokenizer
  return cls.from_pretrained(directory, local_files_only=True)


def _configured_class(directory: str) -> str | None:
  try:
    with open(os.path.join(directory, "tokenizer_config.json")) as f:
      name = json.load(f).get("tokenizer_class")
  except (OSError, ValueError, AttributeError):
    return None
  return name if isinstance(name, str) and name.isidentifier() else None


def special_token_ids(tokenizer) -> dict[str, int]:
  """Ids of the Qwen special tokens, keyed like Qwen2_5_VLConfig fields where one exists."""
  ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
  missing = [t for t, i in ids.items() if i is None or i == tokenizer.unk_token_id]
  if missing:
    raise ValueError(f"tokenizer lacks the Qwen special tokens {missing}")
  return {
    "pad_token_id": ids["<|endoftext|>"],
    "im_start_token_id": ids["<|im_start|>"],
    "im_end_token_id": ids["<|im_end|>"],
    "vision_start_token_id": ids["<|vision_start|>"],
    "vision_end_token_id": ids["<|vision_end|>"],
    "image_token_id": ids["<|image_pad|>"],
    "video_token_id": ids["<|video_pad|>"],
  }
