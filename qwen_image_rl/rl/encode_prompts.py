"""Encode an RL run's prompt set once, so that the run never puts the text encoder on a device.

  python -m qwen_image_rl.rl.encode_prompts --config=configs/grpo_t2i.py:qwen_image \
      --output=/ckpt/prompts_512.npz [--config.init_from=/ckpt/Qwen-Image]

Loads only the text encoder and tokenizer of config.init_from, encodes the config's T2I prompt
set (data.prompt_file or the tiny world's) and the negative prompt exactly as the trainer would
(rl/prompts.py), and writes them with pipelines/prompt_encoding.save_encoded_prompts. Then run
the trainer with `--config.data.encoded_prompts=/ckpt/prompts_512.npz`.
"""

from __future__ import annotations

import os
import sys
import types

from absl import app, flags
from ml_collections import config_flags

from qwen_image_rl import precision
from qwen_image_rl.config_lib import ConfigError
from qwen_image_rl.models import text_encoding
from qwen_image_rl.pipelines.qwen_image import QwenImagePipeline
from qwen_image_rl.rl.policy import resolve_pipeline_dir
from qwen_image_rl.rl.prompts import write_encoded_prompts

FLAGS = flags.FLAGS


def _define_flags():
  # Only when run as a program: `qwen_image_rl.main` defines --config in processes that import
  # this module's functions.
  config_flags.DEFINE_config_file("config", None, "The RL run's config file.")
  flags.DEFINE_string("output", None, "The .npz file to write.")


def load_text_encoder_only(config):
  """What rl/prompts.encode_with reads of a pipeline: the text encoder, its params, the
  tokenizer, the T2I template and its drop index (no transformer, no VAE)."""
  from qwen_image_rl.convert.text_encoder import load_text_encoder
  from qwen_image_rl.data.tokenizer import load_tokenizer

  directory = resolve_pipeline_dir(config.init_from)
  tokenizer = load_tokenizer(os.path.join(directory, "tokenizer"))
  dtype = precision.model_dtypes(config)["dtype"]  # as load_base loads it for the live path
  model, params = load_text_encoder(os.path.join(directory, "text_encoder"), dtype=dtype)
  template = QwenImagePipeline.TEMPLATE
  return types.SimpleNamespace(
    text_encoder=model,
    text_encoder_params=params,
    tokenizer=tokenizer,
    TEMPLATE=template,
    drop_idx=text_encoding.template_drop_index(tokenizer, template),
  )


def encode_config_prompts(config, output: str) -> int:
  """Write the config's prompt set and negative prompt(s) to `output`; returns the count."""
  pipe = load_text_encoder_only(config)
  negatives = [config[s].negative_prompt for s in ("rl", "opd") if s in config]
  return write_encoded_prompts(config, pipe, output, negatives)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  try:
    n = encode_config_prompts(FLAGS.config, FLAGS.output)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(f"wrote {n} encoded prompts to {FLAGS.output}")


if __name__ == "__main__":
  _define_flags()
  flags.mark_flags_as_required(["config", "output"])
  app.run(main)
