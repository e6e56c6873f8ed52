"""The policy of an RL run: the base pipeline it starts from and its sharded train state."""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np

from qwen_image_rl import parallel, precision
from qwen_image_rl.config_lib import ConfigError, transformer_overrides
from qwen_image_rl.pipelines import common as pipe_common
from qwen_image_rl.pipelines.edit import QwenImageEditPipeline
from qwen_image_rl.pipelines.qwen_image import QwenImagePipeline
from qwen_image_rl.train_state import TrainState

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def resolve_pipeline_dir(init_from: str) -> str:
  """A diffusers pipeline directory, or a workdir holding export/pipeline."""
  if not init_from:
    raise ConfigError(
      "config.init_from is required: a diffusers-format pipeline directory "
      "(e.g. runs/demo/base/export/pipeline) or a workdir that exported one"
    )
  return pipe_common.require_pipeline_dir(init_from, "config.init_from", ConfigError)


def load_base(config) -> QwenImagePipeline:
  """The base pipeline; a bf16 model keeps float32 master weights (config.model.master_weights,
  see precision.py) and computes in bf16."""
  directory = resolve_pipeline_dir(config.init_from)
  dtypes = precision.model_dtypes(config)
  overrides = dict(transformer_overrides(config))
  overrides.setdefault("param_dtype", dtypes["param_dtype"])
  return QwenImagePipeline.from_pretrained(
    directory,
    dtype=dtypes["dtype"],
    vae_dtype=jnp.float32,
    transformer_overrides=overrides,
    # Pre-encoded prompts (rl/prompts.py): the text encoder is never loaded.
    load_text_encoder=not config.data.get("encoded_prompts", ""),
  )


def load_exported(path: str, name: str, error: type[Exception] = FileNotFoundError):
  """(t2i, edit) float32 pipelines sharing one set of components, from an exported pipeline or
  the workdir that exported it; `name` is the setting or flag that gave `path`, for the error.
  The edit pipeline is built as the RL trainers build theirs (`with_params`)."""
  directory = pipe_common.require_pipeline_dir(path, name, error)
  t2i = QwenImagePipeline.from_pretrained(directory, dtype=jnp.float32)
  return t2i, with_params(t2i, t2i.transformer_params, QwenImageEditPipeline)


def task_pipeline_class(task: str):
  return QwenImagePipeline if task == "t2i" else QwenImageEditPipeline


def with_params(pipe, params, cls=None):
  """A pipeline like `pipe` (same components) with other transformer params, as class `cls`."""
  cls = cls or type(pipe)
  if cls is type(pipe):
    out = copy.copy(pipe)
    out.transformer_params = params
    return out
  return cls(
    pipe.transformer,
    params,
    pipe.vae,
    pipe.vae_params,
    pipe.text_encoder,
    pipe.text_encoder_params,
    pipe.tokenizer,
    pipe.schedule,
    text_encoder_extra=pipe.text_encoder_extra,
  )


def policy_shardings(model, tx, mesh, rules):
  boxed = model.abstract_params()
  params = parallel.tree_shardings(boxed, mesh, rules)
  opt = parallel.tree_shardings(jax.eval_shape(tx.init, boxed), mesh, rules)
  rep = parallel.replicated(mesh)
  return TrainState(step=rep, params=params, opt_state=opt, rng=rep)


def init_policy_state(model, params, tx, mesh, rules, seed: int):
  """TrainState holding `params` (loaded weights) sharded by their logical axes."""
  shardings = policy_shardings(model, tx, mesh, rules)
  params = parallel.shard_tree(params, shardings.params)
  with parallel.sharding_context(mesh, rules):
    opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
  rep = shardings.step
  state = TrainState(
    step=parallel.host_to_global(np.zeros((), np.int32), rep),
    params=params,
    opt_state=opt_state,
    rng=parallel.host_to_global(np.asarray(jax.random.key_data(jax.random.key(seed))), rep),
  )
  return state, shardings
