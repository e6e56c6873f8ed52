"""Prompt pools of an RL run: every prompt's text, category, reward metadata and conditioning,
encoded once (and, for editing, the source images and their packed latents)."""

from __future__ import annotations

import dataclasses

import numpy as np

from qwen_image_rl.config_lib import ConfigError
from qwen_image_rl.data import examples, prompt_files
from qwen_image_rl.pipelines import common as pipe_common
from qwen_image_rl.pipelines.edit import QwenImageEditPipeline
from qwen_image_rl.pipelines.prompt_encoding import encode_fixed_length
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


def t2i_pool(config, pipe) -> PromptPool:
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
  cond, mask = encode_with(pipe, prompts, data.max_text_tokens)
  return PromptPool(prompts, categories, metas, cond, mask)


def edit_pool(config, pipe) -> PromptPool:
  data = config.data
  ex = examples.edit_examples(config.seed, data.num_prompts, "train", data.image_size)
  edit_pipe = with_params(pipe, pipe.transformer_params, QwenImageEditPipeline)
  cond, mask = encode_with(edit_pipe, ex.instructions, data.max_text_tokens)
  latents = []
  for i in range(0, len(ex), 128):
    z, _ = edit_pipe.encode_image(ex.sources[i : i + 128], image_area=None)
    latents.append(np.asarray(pipe_common.pack_latents(z)))
  return PromptPool(
    ex.instructions,
    ex.categories,
    tuple({"edit": e} for e in ex.edits),
    cond,
    mask,
    sources=ex.sources,
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
  cond, mask = encode_with(task_pipe, [config.rl.negative_prompt], config.data.max_text_tokens)
  return np.repeat(cond, batch, axis=0), np.repeat(mask, batch, axis=0)
