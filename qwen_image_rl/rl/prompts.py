"""Prompt pools of an RL run: every prompt's text, category, reward metadata and conditioning,
encoded once (and, for editing, the source images and their packed latents).

With `config.data.encoded_prompts` (a file from `write_encoded_prompts`, e.g. via
`python -m qwen_image_rl.rl.encode_prompts`), T2I conditioning is read from that file instead:
the run then loads no text encoder (rl/policy.load_base) and it never goes on the device.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import numpy as np

from qwen_image_rl.config_lib import ConfigError
from qwen_image_rl.data import examples, prompt_files, render
from qwen_image_rl.pipelines import common as pipe_common
from qwen_image_rl.pipelines.edit import QwenImageEditPipeline
from qwen_image_rl.pipelines.prompt_encoding import (
  EncodedPrompts,
  encode_fixed_length,
  save_encoded_prompts,
)
from qwen_image_rl.rl.policy import task_pipeline_class, with_params


@dataclasses.dataclass
class PromptPool:
  prompts: tuple[str, ...]
  categories: tuple[str, ...]
  metas: tuple[dict, ...]  # reward metadata: {'spec': ...} or {'edit': ...}
  cond: np.ndarray  # [N, L, D]
  mask: np.ndarray  # [N, L]
  sources: np.ndarray | None = None  # uint8 [N, H, W, 3] (edit)
  ref_latents: np.ndarray | None = None  # packed [N, S, C] (edit)

  def __len__(self):
    return len(self.prompts)


def encode_with(pipe, texts, length: int):
  """Prompt conditioning [N, length, D] / [N, length] with `pipe`'s encoder and template."""
  return encode_fixed_length(
    pipe.text_encoder,
    pipe.text_encoder_params,
    pipe.tokenizer,
    texts,
    template=pipe.TEMPLATE,
    drop_idx=pipe.drop_idx,
    length=length,
    truncate=True,
  )


def encoded_prompts_path(config) -> str:
  """config.data.encoded_prompts ('' or absent: encode with the live text encoder)."""
  return config.data.get("encoded_prompts", "") or ""


@functools.lru_cache(maxsize=1)
def _read_encoded(path: str, mtime: float) -> EncodedPrompts:
  del mtime  # part of the cache key: a rewritten file is read again
  return EncodedPrompts(path)


def conditioning(config, pipe, texts, length: int):
  """[N, length, D] / [N, length] conditioning of `texts`: from the pre-encoded file when the
  config names one, else from `pipe`'s text encoder."""
  path = encoded_prompts_path(config)
  if not path:
    return encode_with(pipe, texts, length)
  if not os.path.isfile(path):
    raise ConfigError(f"config.data.encoded_prompts={path!r}: no such file")
  try:
    return _read_encoded(path, os.path.getmtime(path)).lookup(list(texts), length)
  except ValueError as e:
    raise ConfigError(f"config.data.encoded_prompts: {e}") from e


def t2i_prompts(config):
  """(prompts, categories, reward metadata) of the T2I prompt set, in pool order."""
  data = config.data
  if data.prompt_file:
    records = prompt_files.read_prompt_file(data.prompt_file)
    prompts = tuple(r.prompt for r in records)
    categories = tuple(r.category for r in records)
    metas = tuple({"spec": r.extra["spec"]} if "spec" in r.extra else {} for r in records)
  else:
    ex = examples.t2i_examples(config.seed, data.num_prompts, "train", data.image_size)
    prompts, categories = ex.prompts, ex.categories
    metas = tuple({"spec": s} for s in ex.specs)
  return prompts, categories, metas


def t2i_pool(config, pipe) -> PromptPool:
  prompts, categories, metas = t2i_prompts(config)
  cond, mask = conditioning(config, pipe, prompts, config.data.max_text_tokens)
  return PromptPool(prompts, categories, metas, cond, mask)


def write_encoded_prompts(config, pipe, path: str, negative_prompts=()) -> int:
  """Encode the run's T2I prompt set and `negative_prompts` once with `pipe`'s text encoder
  (exactly as the pool and the negative prompt are encoded live) and write them to `path` for
  config.data.encoded_prompts. Returns the number of texts written."""
  if config.rl.task != "t2i":
    raise ConfigError("pre-encoded prompts are for T2I runs (edit prompts see the source image)")
  length = config.data.max_text_tokens
  prompts = list(t2i_prompts(config)[0])
  cond, mask = encode_with(pipe, prompts, length)
  extra = [t for t in dict.fromkeys(negative_prompts) if t not in set(prompts)]
  conds, masks = [cond], [mask]
  for text in extra:  # one at a time, as negative_cond encodes it
    c, m = encode_with(pipe, [text], length)
    conds.append(c)
    masks.append(m)
  texts = prompts + extra
  save_encoded_prompts(path, texts, np.concatenate(conds), np.concatenate(masks))
  return len(texts)


def edit_prompts(config, prompt_file: str | None = None):
  """(instructions, categories, edits, uint8 sources) of the edit prompt set, in pool order:
  the edit prompt file's records (their sources rendered from the edits' specs) or the tiny
  world's train edits. prompt_file: default config.data.prompt_file; '' for the tiny world's."""
  data = config.data
  prompt_file = data.prompt_file if prompt_file is None else prompt_file
  if prompt_file:
    pairs = prompt_files.read_edit_prompt_file(prompt_file)
    edits = tuple(e for _, e in pairs)
    sources = render.render_batch([e.source for e in edits], data.image_size)
    return tuple(r.prompt for r, _ in pairs), tuple(r.category for r, _ in pairs), edits, sources
  ex = examples.edit_examples(config.seed, data.num_prompts, "train", data.image_size)
  return ex.instructions, ex.categories, ex.edits, ex.sources


def edit_pool(config, pipe, prompt_file: str | None = None) -> PromptPool:
  data = config.data
  if encoded_prompts_path(config):
    raise ConfigError(
      "config.data.encoded_prompts covers T2I prompts only: edit instructions are encoded "
      "with their source images (an OPD run with edits needs the live text encoder)"
    )
  instructions, categories, edits, sources = edit_prompts(config, prompt_file)
  edit_pipe = with_params(pipe, pipe.transformer_params, QwenImageEditPipeline)
  cond, mask = encode_with(edit_pipe, instructions, data.max_text_tokens)
  latents = []
  for i in range(0, len(instructions), 128):
    z, _ = edit_pipe.encode_image(sources[i : i + 128], image_area=None)
    latents.append(np.asarray(pipe_common.pack_latents(z)))
  return PromptPool(
    instructions,
    categories,
    tuple({"edit": e} for e in edits),
    cond,
    mask,
    sources=sources,
    ref_latents=np.concatenate(latents),
  )


def build_pool(config, pipe) -> PromptPool:
  pool = t2i_pool(config, pipe) if config.rl.task == "t2i" else edit_pool(config, pipe)
  if not len(pool):
    raise ConfigError("the prompt set is empty")
  return pool


def negative_cond(config, pipe, batch: int):
  """The negative prompt's conditioning, broadcast to `batch` rows."""
  task_pipe = with_params(pipe, pipe.transformer_params, task_pipeline_class(config.rl.task))
  length = config.data.max_text_tokens
  cond, mask = conditioning(config, task_pipe, [config.rl.negative_prompt], length)
  return np.repeat(cond, batch, axis=0), np.repeat(mask, batch, axis=0)
